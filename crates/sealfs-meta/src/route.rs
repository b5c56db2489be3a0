//! Reaching partitions: a command or query goes to the partition's leader (remembered, learned
//! from redirects), tried over the replica set until a deadline; a partition without a
//! majority fails with [`Errno::UNAVAILABLE`] when the deadline passes instead of hanging.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sealfs_manager::MapCache;
use sealfs_raft::Peers;
use sealfs_rpc::Request;

use crate::{Errno, Op, Query, Reply, OP_META_READ, OP_META_WRITE};

/// A random id for a command, drawn from the system's generator: two clients never draw the
/// same one (2^-64 for 2^32 commands kept at once).
fn request_id() -> Result<u128, Errno> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|_| Errno::IO)?;
    Ok(u128::from_le_bytes(b))
}

/// A client of the metadata partitions.
#[derive(Clone)]
pub struct MetaClient {
    maps: MapCache,
    peers: Peers,
    leaders: Arc<Mutex<HashMap<u32, u64>>>,
    /// How long one operation may take in all, retries included.
    pub deadline: Duration,
}

impl MetaClient {
    /// A client routing with `maps`, over `peers`' connections.
    pub fn new(maps: MapCache, peers: Peers) -> Self {
        MetaClient {
            maps,
            peers,
            leaders: Arc::default(),
            deadline: Duration::from_secs(10),
        }
    }

    /// The map cache it routes with.
    pub fn maps(&self) -> &MapCache {
        &self.maps
    }

    /// The server last seen leading partition `p`.
    pub fn leader(&self, p: u32) -> Option<u64> {
        self.leaders.lock().expect("leaders").get(&p).copied()
    }

    /// The number of partitions (0 until the manager has laid them out).
    pub fn partitions(&self) -> u32 {
        self.maps.get().partitions.len() as u32
    }

    /// Applies `op` on partition `p`, once: it is sent again after a lost answer (see
    /// [`Op::Once`]), and a second try must not answer what the first one did to the state.
    /// (Follow-ups of intents are once by their own id already.)
    pub async fn write(&self, p: u32, op: &Op) -> Result<Reply, Errno> {
        let once;
        let op = match op {
            Op::Apply { .. } => op,
            op => {
                once = Op::Once {
                    id: request_id()?,
                    now: 0,
                    op: Box::new(op.clone()),
                };
                &once
            }
        };
        let body = postcard::to_stdvec(&(p, op)).map_err(|_| Errno::INVAL)?;
        self.call(p, OP_META_WRITE, body).await
    }

    /// Asks partition `p` (a linearizable read on its leader).
    pub async fn read(&self, p: u32, q: &Query) -> Result<Reply, Errno> {
        let body = postcard::to_stdvec(&(p, q)).map_err(|_| Errno::INVAL)?;
        self.call(p, OP_META_READ, body).await
    }

    async fn call(&self, p: u32, op: u16, body: Vec<u8>) -> Result<Reply, Errno> {
        let start = Instant::now();
        let body = Bytes::from(body);
        let mut round = 0u32;
        let mut last = Errno::UNAVAILABLE;
        loop {
            let mut map = self.maps.get();
            if map.partitions.is_empty() || p as usize >= map.partitions.len() {
                map = self.maps.refresh().await.map_err(|_| Errno::UNAVAILABLE)?;
            }
            let Some(set) = map.partitions.get(p as usize).cloned() else {
                return Err(if map.partitions.is_empty() {
                    Errno::UNAVAILABLE
                } else {
                    Errno::INVAL
                });
            };
            // The known leader first, then the others.
            let mut order = set.clone();
            if let Some(l) = self.leaders.lock().expect("leaders").get(&p).copied() {
                if let Some(i) = order.iter().position(|&s| s == l) {
                    order.swap(0, i);
                }
            }
            let mut tried = 0;
            let mut next = order.first().copied();
            while let Some(server) = next.take() {
                tried += 1;
                if start.elapsed() >= self.deadline {
                    return Err(last);
                }
                let Some(addr) = map.servers.get(&server).map(|s| s.addr.clone()) else {
                    continue;
                };
                let req = Request {
                    op,
                    epoch: map.epoch,
                    meta: body.clone(),
                    data: Bytes::new(),
                };
                let left = self.deadline.saturating_sub(start.elapsed());
                let per_try = left.min(Duration::from_secs(3));
                match self.peers.client(&addr).call(req, per_try).await {
                    Ok(r) if r.status == 0 => match postcard::from_bytes::<Reply>(&r.meta) {
                        Ok(Reply::Redirect(Some(l)))
                            if set.contains(&l) && tried <= order.len() =>
                        {
                            self.leaders.lock().expect("leaders").insert(p, l);
                            next = Some(l);
                            continue;
                        }
                        Ok(Reply::Redirect(_)) => last = Errno::UNAVAILABLE,
                        Ok(Reply::Error(Errno::UNAVAILABLE)) => last = Errno::UNAVAILABLE,
                        Ok(reply) => {
                            self.leaders.lock().expect("leaders").insert(p, server);
                            return Ok(reply);
                        }
                        Err(_) => return Err(Errno::IO),
                    },
                    Ok(r) => {
                        tracing::debug!("partition {p} on {addr}: status {}", r.status);
                        last = Errno::UNAVAILABLE;
                    }
                    Err(e) => {
                        tracing::debug!("partition {p} on {addr}: {e}");
                        last = Errno::UNAVAILABLE;
                    }
                }
                // Next replica in order.
                let at = order.iter().position(|&s| s == server).unwrap_or(0);
                if tried < order.len() {
                    next = order.get((at + 1) % order.len()).copied();
                }
            }
            round += 1;
            if start.elapsed() >= self.deadline {
                return Err(last);
            }
            // No replica answered as leader: an election may be under way.
            tokio::time::sleep(Duration::from_millis((50 * round as u64).min(500))).await;
            if round.is_multiple_of(4) {
                let _ = self.maps.refresh().await;
            }
        }
    }
}
