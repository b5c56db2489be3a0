//! A running server: its disks through kelp (shard store for every blade with a shard here),
//! holdfast of the blades whose shard 0 is here, replica of the metadata partitions the map
//! gives it; all on one listener, the operations told apart by their range.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kelp::{LocalStore, LocalStoreConfig, ShardStore};
use sealfs_client::blades::{BladeHost, InProcess};
use sealfs_manager::MapCache;
use sealfs_meta::{HostConfig, MetaClient, MetaHost};
use sealfs_raft::{Peers, RaftRouter};
use sealfs_rpc::{
    ClusterKey, Handler, Request, Response, Server, ServerConfig, ServerHandle, Status,
};
use sealfs_shard::ShardService;

/// What a server needs to start.
pub struct NodeSettings {
    pub listen: String,
    pub data_dir: PathBuf,
    pub disks: Vec<PathBuf>,
    pub zone: String,
    pub key: ClusterKey,
    pub manager: Option<String>,
    pub host: HostConfig,
    pub scrub: Scrub,
    pub reclaim: crate::reclaim::Reclaim,
    /// The servers in this process: this one adds its store and handler to them by the
    /// address it listens on (and registers with), and its holdfasts reach their stores, its
    /// own among them, directly.
    pub near: InProcess,
}

/// How often and how fast a server scrubs the blades it is the holdfast of (DESIGN 4.5).
#[derive(Clone, Copy, Debug)]
pub struct Scrub {
    /// Time between the end of one scrub and the start of the next (the first starts this
    /// long after the server).
    pub every: Duration,
    /// Bytes of cells read a second (0: no bound).
    pub pace: u64,
}

impl Default for Scrub {
    /// Every cell read once a week, at 32 MB/s: a 10 TB server's share reads in 3.6 days.
    fn default() -> Self {
        Scrub {
            every: Duration::from_secs(7 * 24 * 3600),
            pace: 32_000_000,
        }
    }
}

struct Dispatch {
    shards: ShardService,
    router: Arc<RaftRouter>,
    meta: Option<Arc<MetaHost>>,
    blades: Option<Arc<BladeHost>>,
}

#[async_trait]
impl Handler for Dispatch {
    async fn handle(&self, req: Request) -> Response {
        match req.op >> 8 {
            0x01 => self.shards.handle(req).await,
            0x02 => self.router.handle(req).await,
            0x04 if self.meta.is_some() => self.meta.as_ref().expect("checked").handle(req).await,
            0x05 if self.blades.is_some() => {
                self.blades.as_ref().expect("checked").handle(req).await
            }
            _ => Response::error(
                Status::UnknownOp as u16,
                format!("server: unknown operation {:#x}", req.op),
            ),
        }
    }
}

/// A running server.
pub struct Node {
    handle: ServerHandle,
    meta: Option<Arc<MetaHost>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    near: InProcess,
    /// Shard files found on the disks at start.
    pub found: usize,
}

/// Capacity and free bytes of the file system holding `dir`.
fn disk_space(dir: &std::path::Path) -> (u64, u64) {
    match rustix::fs::statvfs(dir) {
        Ok(s) => (
            s.f_blocks.saturating_mul(s.f_frsize),
            s.f_bavail.saturating_mul(s.f_frsize),
        ),
        Err(_) => (0, 0),
    }
}

impl Node {
    /// Opens the disks, listens, and (with a manager) registers and takes up its work.
    pub async fn start(s: NodeSettings) -> Result<Node, String> {
        for d in &s.disks {
            if !d.is_dir() {
                return Err(format!(
                    "disk {} is not a folder (create it or mount the drive there)",
                    d.display()
                ));
            }
        }
        std::fs::create_dir_all(&s.data_dir).map_err(|e| {
            format!(
                "cannot create the data folder {}: {e}",
                s.data_dir.display()
            )
        })?;
        let store = LocalStore::open(s.listen.clone(), &s.disks, LocalStoreConfig::default())
            .map_err(|e| e.to_string())?;
        let report = store.scan_report();
        for bad in &report.mismatched {
            tracing::warn!(
                "left out {}: its cells belong to another shard file",
                bad.display()
            );
        }
        let found = report.found;
        let store: Arc<dyn ShardStore> = Arc::new(store);
        let router = Arc::new(RaftRouter::default());
        let peers = Peers::with_in_process(s.key.clone(), s.near.servers());
        let maps = s.manager.as_ref().map(|m| MapCache::new(m, s.key.clone()));
        let meta_client = maps
            .as_ref()
            .map(|maps| MetaClient::new(maps.clone(), peers.clone()));
        let meta = maps.as_ref().zip(meta_client.clone()).map(|(_, client)| {
            MetaHost::new(
                s.data_dir.join("meta"),
                router.clone(),
                peers.clone(),
                client,
                s.host.clone(),
            )
        });
        let blades = maps
            .as_ref()
            .map(|maps| Arc::new(BladeHost::new(maps.clone(), peers.clone(), s.near.clone())));
        let dispatch = Arc::new(Dispatch {
            shards: ShardService::new(store.clone()),
            router,
            meta: meta.clone(),
            blades: blades.clone(),
        });
        let handle = Server::bind(
            &s.listen,
            s.key.clone(),
            ServerConfig::default(),
            dispatch.clone(),
        )
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", s.listen))?;
        s.near
            .add(handle.addr().to_string(), store.clone(), dispatch);
        let mut tasks = Vec::new();
        if let (Some(maps), Some(meta), Some(blades), Some(meta_client)) =
            (maps, meta.clone(), blades, meta_client)
        {
            tasks.push(tokio::spawn(crate::reclaim::run(
                s.reclaim,
                blades.clone(),
                meta_client,
                maps.clone(),
            )));
            // The map followed every second on its own, not only between passes of following
            // the partitions (which may take a while): a holdfast opens a blade with it when
            // the manager does not answer.
            tasks.push(maps.watch(Duration::from_secs(1)));
            tasks.push(tokio::spawn(take_part(
                maps,
                meta.clone(),
                blades.clone(),
                handle.addr().to_string(),
                s.zone.clone(),
                s.disks.clone(),
            )));
            tasks.push(meta.run_background());
            let scrubbing = blades.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    let n = blades.repair_pass().await;
                    if n > 0 {
                        tracing::info!("repair rewrote {n} cells");
                    }
                }
            }));
            let scrub = s.scrub;
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(scrub.every).await;
                    scrubbing.scrub_pass(scrub.pace).await;
                }
            }));
        }
        Ok(Node {
            handle,
            meta,
            tasks,
            near: s.near,
            found,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.handle.addr()
    }

    /// Stops it: background work, partitions, then the listener.
    pub async fn shutdown(self) {
        self.near.remove(&self.handle.addr().to_string());
        for t in &self.tasks {
            t.abort();
        }
        if let Some(m) = &self.meta {
            m.shutdown().await;
        }
        self.handle.shutdown().await;
    }
}

/// Registers with the manager and heartbeats every second (registering again when the manager
/// no longer knows this server), and follows the map: partition replicas to start, its id for
/// the holdfasts.
async fn take_part(
    maps: MapCache,
    meta: Arc<MetaHost>,
    blades: Arc<BladeHost>,
    addr: String,
    zone: String,
    disks: Vec<PathBuf>,
) {
    let m = maps.manager();
    let mut id = None;
    let mut following: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let space: Vec<(u64, u64)> = disks.iter().map(|d| disk_space(d)).collect();
        match id {
            None => {
                let ds = space
                    .iter()
                    .map(|&(capacity, free)| sealfs_manager::map::Disk { capacity, free })
                    .collect();
                match m.register(&addr, &zone, ds).await {
                    Ok(i) => {
                        tracing::info!("registered with the manager as server {i}");
                        blades.set_me(i);
                        id = Some(i);
                        let blades = blades.clone();
                        tokio::spawn(async move { blades.open_all().await });
                    }
                    Err(e) => tracing::warn!("cannot register with the manager: {e}"),
                }
            }
            Some(i) => match m.heartbeat(i, space.iter().map(|s| s.1).collect()).await {
                Ok(sealfs_manager::map::Outcome::UnknownServer) => id = None,
                Ok(_) => {}
                Err(e) => tracing::warn!("heartbeat: {e}"),
            },
        }
        if let Some(i) = id {
            // Following the map (starting partition replicas) may take a while: it runs
            // beside the heartbeats, never in their way, one pass at a time.
            if following.as_ref().is_none_or(|t| t.is_finished()) {
                let (maps, meta) = (maps.clone(), meta.clone());
                following = Some(tokio::spawn(async move {
                    match maps.refresh().await {
                        Ok(map) => {
                            if let Err(e) = meta.follow(&map, i).await {
                                tracing::warn!("metadata partitions: {e}");
                            }
                        }
                        Err(e) => tracing::debug!("map: {e}"),
                    }
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(if id.is_some() { 1000 } else { 300 })).await;
    }
}
