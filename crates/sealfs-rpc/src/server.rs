//! The server side: accepts connections, checks the cluster secret, reads frames and runs a
//! bounded number of requests per connection at once through the handler.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::auth::{self, ClusterKey};
use crate::frame::{
    read_body, read_header, Header, Kind, ReadError, DATA_BYTES_MAX, META_BYTES_MAX, READ_BUFFER,
};
use crate::wire::{writer, Outgoing, WRITE_QUEUE_MAX};
use crate::{Request, Response, Status};

/// Time a handler gets past the request's deadline before the server gives up on it.
pub(crate) const DEADLINE_GRACE: Duration = Duration::from_millis(50);

/// What serves requests.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. Unknown operations answer `Status::UnknownOp`.
    async fn handle(&self, req: Request) -> Response;
}

/// Settings of a server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Requests of one connection handled at once; the connection is not read further until one
    /// finishes.
    pub inflight_per_connection: usize,
    /// Connections open at once at most; more are closed right after accept.
    pub connections_max: usize,
    /// Bytes of requests (metadata and data) of one connection read and not yet answered, at
    /// most (never less than one frame's bound): a frame past it waits, its body unread, until
    /// requests of that connection finish. Per connection, so that requests waiting on one
    /// peer never hold up another's (a holdfast's request can wait on a call to a peer).
    pub request_bytes_per_connection: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            inflight_per_connection: 256,
            connections_max: 4096,
            request_bytes_per_connection: 256 << 20,
        }
    }
}

/// One frame's bytes at most.
const FRAME_BODY_MAX: usize = META_BYTES_MAX as usize + DATA_BYTES_MAX as usize;

/// A running server; dropping it (or `shutdown`) closes the listener and every connection.
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
    accepted: Arc<AtomicU64>,
}

impl ServerHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections that passed the handshake so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(mut self) {
        self.stop.notify_one();
        let _ = (&mut self.task).await;
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The server.
pub struct Server;

impl Server {
    /// Listens on `addr` (port 0 picks one) and serves with `handler`.
    pub async fn bind(
        addr: &str,
        key: ClusterKey,
        cfg: ServerConfig,
        handler: Arc<dyn Handler>,
    ) -> std::io::Result<ServerHandle> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(Notify::new());
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            key,
            cfg,
            handler,
            stop.clone(),
            accepted.clone(),
        ));
        Ok(ServerHandle {
            addr,
            stop,
            task,
            accepted,
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    key: ClusterKey,
    cfg: ServerConfig,
    handler: Arc<dyn Handler>,
    stop: Arc<Notify>,
    accepted: Arc<AtomicU64>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.notified() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    if conns.len() >= cfg.connections_max {
                        tracing::warn!("refusing connection from {peer}: {} open", conns.len());
                        continue;
                    }
                    let (key, handler, accepted, cfg) = (key.clone(), handler.clone(), accepted.clone(), cfg.clone());
                    conns.spawn(async move {
                        if let Err(e) = serve(stream, peer, key, cfg, handler, accepted).await {
                            tracing::info!("connection from {peer}: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    // Every connection ends before `shutdown` returns: none answers another request after.
    conns.shutdown().await;
}

async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    key: ClusterKey,
    cfg: ServerConfig,
    handler: Arc<dyn Handler>,
    accepted: Arc<AtomicU64>,
) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    auth::server(&mut stream, &key)
        .await
        .map_err(|e| e.to_string())?;
    accepted.fetch_add(1, Ordering::Relaxed);
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let (tx, rx) = mpsc::channel(WRITE_QUEUE_MAX);
    let write = tokio::spawn(writer(wr, rx));
    let slots = Arc::new(Semaphore::new(cfg.inflight_per_connection.max(1)));
    let budget = Arc::new(Semaphore::new(
        cfg.request_bytes_per_connection
            .clamp(FRAME_BODY_MAX, Semaphore::MAX_PERMITS),
    ));
    let mut requests = JoinSet::new();
    let outcome = loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let header = match read_header(&mut rd).await {
            Ok(h) if h.kind == Kind::Request && h.id != 0 => h,
            Ok(h) => {
                break Err(format!(
                    "unexpected frame kind {:?} with id {}",
                    h.kind, h.id
                ))
            }
            Err(e) => break read_failed(e),
        };
        // The header's lengths are within a frame's bounds, so within the budget's.
        let bytes = header.meta_len + header.data_len;
        let budget = budget
            .clone()
            .acquire_many_owned(bytes)
            .await
            .expect("semaphore never closed");
        let frame = match read_body(&mut rd, header).await {
            Ok(f) => f,
            Err(e) => break read_failed(e),
        };
        while requests.try_join_next().is_some() {}
        let (handler, tx) = (handler.clone(), tx.clone());
        requests.spawn(async move {
            let h = frame.header;
            let req = Request {
                op: h.op,
                epoch: h.epoch,
                meta: frame.meta,
                data: frame.data,
            };
            let resp = if h.deadline_ms > 0 {
                // A little grace, so that the client's own deadline ends the call first and the
                // server stops work nobody waits for.
                let limit = Duration::from_millis(h.deadline_ms as u64) + DEADLINE_GRACE;
                tokio::time::timeout(limit, handler.handle(req))
                    .await
                    .unwrap_or_else(|_| {
                        Response::error(
                            Status::Timeout as u16,
                            format!("deadline of {} ms passed", h.deadline_ms),
                        )
                    })
            } else {
                handler.handle(req).await
            };
            let _ = tx.send(response(h, resp)).await;
            drop((permit, budget));
        });
    };
    if let Err(msg) = &outcome {
        // Say why before closing; the id 0 tells the client it is about the connection.
        let h = Header {
            kind: Kind::Response,
            op: 0,
            status: Status::BadFrame as u16,
            deadline_ms: 0,
            id: 0,
            epoch: 0,
            meta_len: 0,
            data_len: 0,
        };
        let _ = tx
            .send(response(
                h,
                Response::error(Status::BadFrame as u16, msg.clone()),
            ))
            .await;
        tracing::warn!("closing connection from {peer}: {msg}");
    } else {
        // Let the requests already read finish and answer.
        while requests.join_next().await.is_some() {}
    }
    drop(tx);
    requests.abort_all();
    let _ = write.await;
    outcome
}

/// How a connection ends when a read fails.
fn read_failed(e: ReadError) -> Result<(), String> {
    match e {
        ReadError::Closed => Ok(()),
        ReadError::Frame(e) => Err(e.to_string()),
        ReadError::Io(e) => Err(format!("read: {e}")),
    }
}

fn response(req: Header, mut r: Response) -> Outgoing {
    if r.meta.len() > META_BYTES_MAX as usize || r.data.len() > DATA_BYTES_MAX as usize {
        // The peer would take such a frame for a broken stream and drop the connection with
        // every call on it: this call alone fails.
        let msg = format!(
            "operation {:#x}: a response of {} metadata and {} data bytes (at most {META_BYTES_MAX} and {DATA_BYTES_MAX})",
            req.op,
            r.meta.len(),
            r.data.len()
        );
        tracing::error!("{msg}");
        r = Response::error(Status::Internal as u16, msg);
    }
    Outgoing {
        header: Header {
            kind: Kind::Response,
            op: req.op,
            status: r.status,
            deadline_ms: 0,
            id: req.id,
            epoch: r.epoch,
            meta_len: r.meta.len() as u32,
            data_len: r.data.len() as u32,
        },
        meta: r.meta,
        data: if r.data.is_empty() {
            Bytes::new()
        } else {
            r.data
        },
    }
}
