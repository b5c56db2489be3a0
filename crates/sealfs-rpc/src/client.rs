//! The client side: a few long-lived connections to one peer, requests multiplexed over them by
//! id, deadlines, and reconnection with exponential backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::auth::{self, ClusterKey};
use crate::frame::{read_frame, Frame, Header, Kind, DATA_BYTES_MAX, META_BYTES_MAX, READ_BUFFER};
use crate::server::{Handler, DEADLINE_GRACE};
use crate::wire::{writer, Outgoing, WRITE_QUEUE_MAX};
use crate::{Request, Response, RpcError, Status};

/// What the servers running in this process offer, by the address each listens on.
pub struct Registry<T: ?Sized>(Arc<RwLock<HashMap<String, Arc<T>>>>);

impl<T: ?Sized> Clone for Registry<T> {
    fn clone(&self) -> Self {
        Registry(self.0.clone())
    }
}

impl<T: ?Sized> Default for Registry<T> {
    fn default() -> Self {
        Registry(Arc::default())
    }
}

impl<T: ?Sized> Registry<T> {
    /// Adds what the server listening on `addr` offers.
    pub fn add(&self, addr: String, what: Arc<T>) {
        self.0.write().expect("registry").insert(addr, what);
    }

    /// Removes the server listening on `addr` (it stops).
    pub fn remove(&self, addr: &str) {
        self.0.write().expect("registry").remove(addr);
    }

    /// What the server listening on `addr` offers, if it runs in this process.
    pub fn get(&self, addr: &str) -> Option<Arc<T>> {
        self.0.read().expect("registry").get(addr).cloned()
    }
}

/// The request handlers of the servers running in this process. A client of one of them hands
/// its requests to the handler directly (a task of its own, with the same deadlines) instead of
/// through a loopback connection to its own process.
pub type InProcess = Registry<dyn Handler>;

/// Settings of a client.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Connections to the peer (requests spread over them).
    pub connections: usize,
    /// Deadline of a connection attempt (TCP and handshake).
    pub connect_timeout: Duration,
    /// First wait after a failed connection attempt; it doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest wait between connection attempts.
    pub backoff_max: Duration,
    /// Requests in flight to the peer at most; more wait.
    pub inflight_max: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connections: 1,
            connect_timeout: Duration::from_secs(3),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            inflight_max: 1024,
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Frame>>>>;

struct Conn {
    tx: mpsc::Sender<Outgoing>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

#[derive(Default)]
struct Slot {
    conn: Option<Arc<Conn>>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

/// A client of one peer.
pub struct Client {
    peer: String,
    key: ClusterKey,
    cfg: ClientConfig,
    slots: Vec<tokio::sync::Mutex<Slot>>,
    next_slot: AtomicUsize,
    next_id: AtomicU64,
    inflight: Arc<Semaphore>,
    connects: AtomicU64,
    near: InProcess,
}

impl Client {
    /// A client of the peer at `peer` (host:port). Nothing connects until the first call.
    pub fn new(peer: impl Into<String>, key: ClusterKey, cfg: ClientConfig) -> Self {
        let n = cfg.connections.max(1);
        Client {
            peer: peer.into(),
            key,
            slots: (0..n)
                .map(|_| tokio::sync::Mutex::new(Slot::default()))
                .collect(),
            next_slot: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            inflight: Arc::new(Semaphore::new(cfg.inflight_max.max(1))),
            connects: AtomicU64::new(0),
            near: InProcess::default(),
            cfg,
        }
    }

    /// Calls the peer's handler directly while it runs in this process (in `near`).
    pub fn with_in_process(mut self, near: InProcess) -> Self {
        self.near = near;
        self
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Connections opened so far (reconnections included).
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Sends `req` and waits for its response, at most `deadline` in all (connecting included).
    pub async fn call(&self, req: Request, deadline: Duration) -> Result<Response, RpcError> {
        let start = Instant::now();
        let due = start + deadline;
        if req.meta.len() > META_BYTES_MAX as usize || req.data.len() > DATA_BYTES_MAX as usize {
            return Err(RpcError::Meta(format!(
                "request of {} + {} bytes is over the frame limits",
                req.meta.len(),
                req.data.len()
            )));
        }
        let timeout = |ms| RpcError::Timeout {
            peer: self.peer.clone(),
            op: req.op,
            ms,
        };
        let _permit = tokio::time::timeout_at(due.into(), self.inflight.acquire())
            .await
            .map_err(|_| timeout(deadline.as_millis() as u64))?
            .expect("semaphore never closed");
        if let Some(handler) = self.near.get(&self.peer) {
            return self.call_in_process(handler, req, due, deadline).await;
        }
        let conn = self.connection(due).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().expect("pending").insert(id, tx);
        let left = due.saturating_duration_since(Instant::now());
        let header = Header {
            kind: Kind::Request,
            op: req.op,
            status: 0,
            deadline_ms: left.as_millis().clamp(1, u32::MAX as u128) as u32,
            id,
            epoch: req.epoch,
            meta_len: req.meta.len() as u32,
            data_len: req.data.len() as u32,
        };
        let sent = conn
            .tx
            .send(Outgoing {
                header,
                meta: req.meta,
                data: req.data,
            })
            .await;
        if sent.is_err() {
            conn.pending.lock().expect("pending").remove(&id);
            return Err(RpcError::ConnectionLost(self.peer.clone()));
        }
        match tokio::time::timeout_at(due.into(), rx).await {
            Ok(Ok(f)) => Ok(Response {
                status: f.header.status,
                epoch: f.header.epoch,
                meta: f.meta,
                data: f.data,
            }),
            Ok(Err(_)) => Err(RpcError::ConnectionLost(self.peer.clone())),
            Err(_) => {
                // A late response finds no waiter and is dropped.
                conn.pending.lock().expect("pending").remove(&id);
                Err(timeout(deadline.as_millis() as u64))
            }
        }
    }

    /// A call to a server in this process: its handler runs as a task of its own, as on a
    /// connection, ended like there at the deadline and a little grace past it, so that the
    /// caller giving up does not cancel the handler halfway.
    async fn call_in_process(
        &self,
        handler: Arc<dyn Handler>,
        req: Request,
        due: Instant,
        deadline: Duration,
    ) -> Result<Response, RpcError> {
        let limit = due.saturating_duration_since(Instant::now()) + DEADLINE_GRACE;
        let (ms, op) = (deadline.as_millis() as u64, req.op);
        let task = tokio::spawn(async move {
            tokio::time::timeout(limit, handler.handle(req))
                .await
                .unwrap_or_else(|_| {
                    Response::error(
                        Status::Timeout as u16,
                        format!("deadline of {ms} ms passed"),
                    )
                })
        });
        match tokio::time::timeout_at(due.into(), task).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(RpcError::ConnectionLost(self.peer.clone())),
            Err(_) => Err(RpcError::Timeout {
                peer: self.peer.clone(),
                op,
                ms,
            }),
        }
    }

    async fn connection(&self, due: Instant) -> Result<Arc<Conn>, RpcError> {
        let i = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = tokio::time::timeout_at(due.into(), self.slots[i].lock())
            .await
            .map_err(|_| self.unreachable("deadline passed while waiting to connect"))?;
        if let Some(c) = slot
            .conn
            .as_ref()
            .filter(|c| c.alive.load(Ordering::Acquire))
        {
            return Ok(c.clone());
        }
        slot.conn = None;
        if let Some(at) = slot.retry_at {
            // Fail fast while backing off: a dead peer must not hold its callers (and the locks
            // they hold) for the length of the backoff.
            let wait = at.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                return Err(self.unreachable(&format!(
                    "{} (next attempt in {} ms)",
                    slot.last_error,
                    wait.as_millis()
                )));
            }
        }
        let limit = self
            .cfg
            .connect_timeout
            .min(due.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(limit, self.connect()).await {
            Ok(Ok(c)) => {
                slot.failures = 0;
                slot.retry_at = None;
                slot.conn = Some(c.clone());
                Ok(c)
            }
            outcome => {
                let reason = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no connection within {} ms", limit.as_millis()),
                };
                slot.failures = slot.failures.saturating_add(1);
                let wait = self
                    .cfg
                    .backoff_min
                    .saturating_mul(1 << slot.failures.min(16).saturating_sub(1))
                    .min(self.cfg.backoff_max);
                slot.retry_at = Some(Instant::now() + wait);
                slot.last_error = reason.clone();
                Err(self.unreachable(&reason))
            }
        }
    }

    fn unreachable(&self, reason: &str) -> RpcError {
        RpcError::Unreachable {
            peer: self.peer.clone(),
            reason: reason.to_string(),
        }
    }

    async fn connect(&self) -> Result<Arc<Conn>, RpcError> {
        let mut stream = TcpStream::connect(&self.peer).await?;
        stream.set_nodelay(true)?;
        auth::client(&mut stream, &self.key).await?;
        self.connects.fetch_add(1, Ordering::Relaxed);
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_MAX);
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let peer = self.peer.clone();
        {
            let alive = alive.clone();
            tokio::spawn(async move {
                if let Err(e) = writer(wr, rx).await {
                    tracing::debug!("connection to {peer}: write: {e}");
                }
                alive.store(false, Ordering::Release);
            });
        }
        {
            let (alive, pending, peer) = (alive.clone(), pending.clone(), self.peer.clone());
            tokio::spawn(async move {
                loop {
                    match read_frame(&mut rd).await {
                        Ok(f) if f.header.kind == Kind::Response && f.header.id != 0 => {
                            let waiter = pending.lock().expect("pending").remove(&f.header.id);
                            if let Some(w) = waiter {
                                let _ = w.send(f);
                            }
                        }
                        Ok(f) => {
                            let msg = String::from_utf8_lossy(&f.meta).into_owned();
                            tracing::warn!(
                                "connection to {peer} closed by a protocol error (status {}): {msg}",
                                f.header.status
                            );
                            debug_assert!(
                                f.header.status == Status::BadFrame as u16
                                    || f.header.kind == Kind::Request
                            );
                            break;
                        }
                        Err(e) => {
                            tracing::debug!("connection to {peer}: {e}");
                            break;
                        }
                    }
                }
                alive.store(false, Ordering::Release);
                // Waiters get `ConnectionLost` when their senders drop.
                pending.lock().expect("pending").clear();
            });
        }
        Ok(Arc::new(Conn { tx, pending, alive }))
    }
}
