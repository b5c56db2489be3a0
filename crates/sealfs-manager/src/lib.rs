//! The sealfs manager (DESIGN 5.4): the cluster map in a Raft group (1 or 3 replicas), server
//! registration and heartbeats, servers declared down after a timeout, blade placement, and the
//! epoch that clients and servers watch.

pub mod map;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use map::{ClusterMap, Command, Disk, Outcome};
use sealfs_raft::{Group, GroupError, Machine, Peers, RaftRouter};
use sealfs_rpc::{
    Client, ClientConfig, ClusterKey, Handler, Request, Response, Server, ServerConfig,
    ServerHandle, Status,
};
use serde::{Deserialize, Serialize};

/// Register a server.
pub const OP_REGISTER: u16 = 0x0301;
/// A server's heartbeat.
pub const OP_HEARTBEAT: u16 = 0x0302;
/// Allocate a blade.
pub const OP_ALLOCATE: u16 = 0x0303;
/// Fetch the map (returned only if newer than the caller's epoch).
pub const OP_MAP: u16 = 0x0304;
/// Create or delete a volume.
pub const OP_VOLUME: u16 = 0x0305;
/// Move a blade a step in its life: sealed, holding blobs, being deleted, dropped.
pub const OP_BLADE_CHANGE: u16 = 0x0306;

/// The Raft group id of the manager.
pub const MANAGER_GROUP: u64 = 0;

#[derive(Default)]
struct MapMachine(ClusterMap);

impl Machine for MapMachine {
    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        let out = match postcard::from_bytes::<Command>(command) {
            Ok(c) => self.0.apply(c),
            Err(e) => Outcome::Refused(format!("malformed command: {e}")),
        };
        postcard::to_stdvec(&out).unwrap_or_default()
    }
    fn snapshot(&self) -> Vec<u8> {
        postcard::to_stdvec(&self.0).unwrap_or_default()
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.0 = ClusterMap::decode(snapshot)?;
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Serialize, Deserialize)]
struct RegisterReq {
    addr: String,
    zone: String,
    disks: Vec<Disk>,
}

#[derive(Serialize, Deserialize)]
struct HeartbeatReq {
    server: u64,
    free: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
enum VolumeReq {
    Create {
        name: String,
        quota: u64,
        k: u8,
        m: u8,
        w: u8,
    },
    Delete {
        name: String,
    },
}

#[derive(Serialize, Deserialize)]
struct ChangeReq {
    id: u32,
    change: map::BladeChange,
}

#[derive(Serialize, Deserialize)]
struct AllocateReq {
    k: u8,
    m: u8,
    w: u8,
}

struct Service {
    router: Arc<RaftRouter>,
    group: OnceLock<Group>,
}

impl Service {
    async fn write(&self, c: Command) -> Response {
        let Some(g) = self.group.get() else {
            return Response::error(Status::Unavailable as u16, "the manager is starting");
        };
        let cmd = match postcard::to_stdvec(&c) {
            Ok(b) => b,
            Err(e) => return Response::error(Status::Internal as u16, e.to_string()),
        };
        match g.write(cmd).await {
            Ok(reply) => Response::ok(Bytes::from(reply), Bytes::new()),
            Err(e) => group_error(e),
        }
    }

    async fn serve(&self, req: Request) -> Response {
        let bad = |e: postcard::Error| {
            Response::error(Status::BadRequest as u16, format!("manager request: {e}"))
        };
        match req.op {
            OP_REGISTER => match postcard::from_bytes::<RegisterReq>(&req.meta) {
                Ok(r) => {
                    self.write(Command::Register {
                        addr: r.addr,
                        zone: r.zone,
                        disks: r.disks,
                        now_ms: now_ms(),
                    })
                    .await
                }
                Err(e) => bad(e),
            },
            OP_HEARTBEAT => match postcard::from_bytes::<HeartbeatReq>(&req.meta) {
                Ok(h) => {
                    self.write(Command::Heartbeat {
                        server: h.server,
                        free: h.free,
                        now_ms: now_ms(),
                    })
                    .await
                }
                Err(e) => bad(e),
            },
            OP_ALLOCATE => match postcard::from_bytes::<AllocateReq>(&req.meta) {
                Ok(a) => {
                    self.write(Command::Allocate {
                        k: a.k,
                        m: a.m,
                        w: a.w,
                    })
                    .await
                }
                Err(e) => bad(e),
            },
            OP_BLADE_CHANGE => match postcard::from_bytes::<ChangeReq>(&req.meta) {
                Ok(c) => {
                    self.write(Command::ChangeBlade {
                        id: c.id,
                        change: c.change,
                    })
                    .await
                }
                Err(e) => bad(e),
            },
            OP_VOLUME => match postcard::from_bytes::<VolumeReq>(&req.meta) {
                Ok(VolumeReq::Create {
                    name,
                    quota,
                    k,
                    m,
                    w,
                }) => {
                    self.write(Command::CreateVolume {
                        name,
                        quota,
                        k,
                        m,
                        w,
                    })
                    .await
                }
                Ok(VolumeReq::Delete { name }) => self.write(Command::DeleteVolume { name }).await,
                Err(e) => bad(e),
            },
            OP_MAP => {
                let Some(g) = self.group.get() else {
                    return Response::error(Status::Unavailable as u16, "the manager is starting");
                };
                match g.read(|m| m.snapshot()).await {
                    Ok(map) => {
                        let epoch = postcard::from_bytes::<ClusterMap>(&map)
                            .map(|m| m.epoch)
                            .unwrap_or(0);
                        let mut r = Response::ok(Bytes::from(map), Bytes::new());
                        r.epoch = epoch;
                        if req.epoch >= epoch && req.epoch != 0 {
                            // The caller's map is current: say so without sending it again.
                            r.meta = Bytes::new();
                        }
                        r
                    }
                    Err(e) => group_error(e),
                }
            }
            op => Response::error(
                Status::UnknownOp as u16,
                format!("manager: unknown operation {op:#x}"),
            ),
        }
    }
}

fn group_error(e: GroupError) -> Response {
    Response::error(Status::Unavailable as u16, e.to_string())
}

#[async_trait]
impl Handler for Service {
    async fn handle(&self, req: Request) -> Response {
        if (0x0200..0x0300).contains(&req.op) {
            self.router.handle(req).await
        } else {
            self.serve(req).await
        }
    }
}

/// How the namespace is laid out when enough servers are up.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Metadata partitions (a power of two).
    pub partitions: u32,
    /// Replicas per partition; partitions are laid out once this many servers are up.
    pub replicas: u8,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            partitions: 64,
            replicas: 3,
        }
    }
}

/// A running manager.
pub struct Manager {
    server: ServerHandle,
    group: Group,
    detector: tokio::task::JoinHandle<()>,
}

impl Manager {
    /// Starts a one-replica manager listening on `listen`, with its Raft state under `data_dir`;
    /// servers silent for `down_after` are declared down.
    ///
    /// With `peers` (the listening addresses of all manager replicas, this one's among them)
    /// the map is a group of those replicas; the first one makes the group. Empty: one replica.
    pub async fn start(
        listen: &str,
        data_dir: &Path,
        key: ClusterKey,
        down_after: Duration,
        layout: Layout,
        peers: &[String],
    ) -> Result<Manager, String> {
        let me = if peers.is_empty() {
            1
        } else {
            match peers.iter().position(|p| p == listen) {
                Some(i) => i as u64 + 1,
                None => {
                    return Err(format!(
                        "--listen {listen} must be one of the --peers ({})",
                        peers.join(",")
                    ))
                }
            }
        };
        std::fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
        let router = Arc::new(RaftRouter::default());
        let service = Arc::new(Service {
            router: router.clone(),
            group: OnceLock::new(),
        });
        let server = Server::bind(
            listen,
            key.clone(),
            ServerConfig::default(),
            service.clone(),
        )
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = server.addr().to_string();
        let group = Group::start(
            MANAGER_GROUP,
            me,
            &sealfs_raft::LogDb::open(&data_dir.join("manager.wal"))?,
            Box::new(MapMachine::default()),
            router,
            Peers::new(key),
        )
        .await
        .map_err(|e| e.to_string())?;
        let members: std::collections::BTreeMap<u64, String> = if peers.is_empty() {
            [(1, addr)].into_iter().collect()
        } else {
            peers
                .iter()
                .enumerate()
                .map(|(i, a)| (i as u64 + 1, a.clone()))
                .collect()
        };
        if me == 1 {
            group.initialize(members).await.map_err(|e| e.to_string())?;
        }
        let _ = service.group.set(group.clone());
        let g = group.clone();
        let detector = tokio::spawn(async move {
            let tick = (down_after / 4).max(Duration::from_millis(50));
            // A replica that just became leader (a failover, a restart) has not heard the
            // heartbeats sent meanwhile: it declares nobody down before a full timeout of
            // its own has passed.
            let mut leading_since: Option<std::time::Instant> = None;
            loop {
                tokio::time::sleep(tick).await;
                if !g.is_leader() {
                    leading_since = None;
                    continue;
                }
                let since = *leading_since.get_or_insert_with(std::time::Instant::now);
                {
                    let (unlaid, unmarked) = g
                        .read_local(|m| {
                            postcard::from_bytes::<ClusterMap>(&m.snapshot())
                                .map(|map| (map.partitions.is_empty(), map.reclaim_from.is_none()))
                                .unwrap_or((false, false))
                        })
                        .await;
                    if unmarked {
                        // Blades allocated before this version may hold blobs unmarked:
                        // those from here on can be reclaimed.
                        if let Ok(cmd) = postcard::to_stdvec(&Command::Reclaimable) {
                            let _ = g.write(cmd).await;
                        }
                    }
                    if unlaid {
                        let c = Command::InitPartitions {
                            count: layout.partitions,
                            replicas: layout.replicas,
                        };
                        if let Ok(cmd) = postcard::to_stdvec(&c) {
                            let _ = g.write(cmd).await;
                        }
                    }
                    if since.elapsed() >= down_after {
                        let before_ms = now_ms().saturating_sub(down_after.as_millis() as u64);
                        if let Ok(cmd) = postcard::to_stdvec(&Command::MarkDown { before_ms }) {
                            let _ = g.write(cmd).await;
                        }
                    }
                }
            }
        });
        Ok(Manager {
            server,
            group,
            detector,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr()
    }

    /// Stops it.
    pub async fn shutdown(self) {
        self.detector.abort();
        self.group.shutdown().await;
        self.server.shutdown().await;
    }
}

/// Errors of manager calls.
#[derive(Debug)]
pub struct ManagerError(pub String);

impl std::fmt::Display for ManagerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ManagerError {}

/// What servers and clients use to talk to the manager: one or several replicas (a comma
/// separated list), tried in turn until one answers as the leader.
pub struct ManagerClient {
    clients: Vec<Client>,
    good: std::sync::atomic::AtomicUsize,
    deadline: Duration,
}

impl ManagerClient {
    /// A client of the manager at `addrs` (`host:port[,host:port...]`).
    pub fn new(addrs: &str, key: ClusterKey) -> Self {
        let clients = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| Client::new(a.to_string(), key.clone(), ClientConfig::default()))
            .collect();
        ManagerClient {
            clients,
            good: std::sync::atomic::AtomicUsize::new(0),
            deadline: Duration::from_secs(10),
        }
    }

    async fn call(
        &self,
        op: u16,
        meta: Vec<u8>,
        epoch: u64,
    ) -> Result<sealfs_rpc::Response, ManagerError> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.clients.is_empty() {
            return Err(ManagerError("no manager address given".into()));
        }
        let start = std::time::Instant::now();
        let meta = Bytes::from(meta);
        let n = self.clients.len();
        let mut last = String::new();
        loop {
            let first = self.good.load(Relaxed);
            for k in 0..n {
                let i = (first + k) % n;
                let c = &self.clients[i];
                let req = Request {
                    op,
                    epoch,
                    meta: meta.clone(),
                    data: Bytes::new(),
                };
                let left = self.deadline.saturating_sub(start.elapsed());
                match c.call(req, left.min(Duration::from_secs(5))).await {
                    Ok(r) if r.status == Status::Ok as u16 => {
                        self.good.store(i, Relaxed);
                        return Ok(r);
                    }
                    // Not the leader, no quorum yet, or down: the next replica.
                    Ok(r) if r.status == Status::Unavailable as u16 => {
                        last =
                            format!("manager {}: {}", c.peer(), String::from_utf8_lossy(&r.meta));
                    }
                    Ok(r) => {
                        return r
                            .into_result()
                            .map_err(|e| ManagerError(format!("manager {}: {e}", c.peer())))
                    }
                    Err(e) => last = format!("manager {}: {e}", c.peer()),
                }
            }
            if start.elapsed() >= self.deadline {
                return Err(ManagerError(last));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn outcome(&self, op: u16, meta: Vec<u8>) -> Result<Outcome, ManagerError> {
        let r = self.call(op, meta, 0).await?;
        postcard::from_bytes(&r.meta).map_err(|e| ManagerError(format!("manager reply: {e}")))
    }

    fn enc<T: Serialize>(v: &T) -> Vec<u8> {
        postcard::to_stdvec(v).unwrap_or_default()
    }

    /// Registers a server; returns its id.
    pub async fn register(
        &self,
        addr: &str,
        zone: &str,
        disks: Vec<Disk>,
    ) -> Result<u64, ManagerError> {
        let req = RegisterReq {
            addr: addr.into(),
            zone: zone.into(),
            disks,
        };
        match self.outcome(OP_REGISTER, Self::enc(&req)).await? {
            Outcome::Registered(id) => Ok(id),
            other => Err(ManagerError(format!("register: {other:?}"))),
        }
    }

    /// Sends a heartbeat.
    pub async fn heartbeat(&self, server: u64, free: Vec<u64>) -> Result<Outcome, ManagerError> {
        self.outcome(OP_HEARTBEAT, Self::enc(&HeartbeatReq { server, free }))
            .await
    }

    /// Allocates a blade with profile k+m+w.
    pub async fn allocate(
        &self,
        k: u8,
        m: u8,
        w: u8,
    ) -> Result<(u32, map::BladeEntry), ManagerError> {
        match self
            .outcome(OP_ALLOCATE, Self::enc(&AllocateReq { k, m, w }))
            .await?
        {
            Outcome::Blade(id, b) => Ok((id, b)),
            Outcome::Refused(e) => Err(ManagerError(format!("allocate: {e}"))),
            other => Err(ManagerError(format!("allocate: {other:?}"))),
        }
    }

    /// Moves blade `id` a step in its life (done again, nothing changes).
    pub async fn change_blade(
        &self,
        id: u32,
        change: map::BladeChange,
    ) -> Result<(), ManagerError> {
        match self
            .outcome(OP_BLADE_CHANGE, Self::enc(&ChangeReq { id, change }))
            .await?
        {
            Outcome::Done => Ok(()),
            Outcome::Refused(e) => Err(ManagerError(format!("blade change: {e}"))),
            other => Err(ManagerError(format!("blade change: {other:?}"))),
        }
    }

    /// The current map; None if `known_epoch` is already current.
    pub async fn map_since(&self, known_epoch: u64) -> Result<Option<ClusterMap>, ManagerError> {
        let r = self.call(OP_MAP, Vec::new(), known_epoch).await?;
        if r.meta.is_empty() {
            return Ok(None);
        }
        let map: ClusterMap =
            postcard::from_bytes(&r.meta).map_err(|e| ManagerError(format!("map: {e}")))?;
        map.check()
            .map_err(|e| ManagerError(format!("map of epoch {}: {e}", map.epoch)))?;
        Ok(Some(map))
    }

    /// The current map.
    pub async fn map(&self) -> Result<ClusterMap, ManagerError> {
        Ok(self.map_since(0).await?.unwrap_or_default())
    }

    /// Creates a volume; returns its id.
    pub async fn create_volume(
        &self,
        name: &str,
        quota: u64,
        k: u8,
        m: u8,
        w: u8,
    ) -> Result<u32, ManagerError> {
        let req = VolumeReq::Create {
            name: name.into(),
            quota,
            k,
            m,
            w,
        };
        match self.outcome(OP_VOLUME, Self::enc(&req)).await? {
            Outcome::Volume(id) => Ok(id),
            Outcome::Refused(e) => Err(ManagerError(e)),
            other => Err(ManagerError(format!("create volume: {other:?}"))),
        }
    }

    /// Deletes a volume.
    pub async fn delete_volume(&self, name: &str) -> Result<(), ManagerError> {
        match self
            .outcome(
                OP_VOLUME,
                Self::enc(&VolumeReq::Delete { name: name.into() }),
            )
            .await?
        {
            Outcome::Done => Ok(()),
            Outcome::Refused(e) => Err(ManagerError(e)),
            other => Err(ManagerError(format!("delete volume: {other:?}"))),
        }
    }
}

/// A cached cluster map, refreshed from the manager when asked and in the background.
#[derive(Clone)]
pub struct MapCache {
    manager: Arc<ManagerClient>,
    map: Arc<std::sync::RwLock<Arc<ClusterMap>>>,
}

impl MapCache {
    /// An empty cache of the map of the manager at `addr`.
    pub fn new(addr: &str, key: ClusterKey) -> Self {
        MapCache {
            manager: Arc::new(ManagerClient::new(addr, key)),
            map: Arc::new(std::sync::RwLock::new(Arc::new(ClusterMap::default()))),
        }
    }

    /// The manager's client.
    pub fn manager(&self) -> &ManagerClient {
        &self.manager
    }

    /// The map as last fetched.
    pub fn get(&self) -> Arc<ClusterMap> {
        self.map.read().expect("map lock").clone()
    }

    /// Fetches the map if the manager has a newer one; returns the current one.
    pub async fn refresh(&self) -> Result<Arc<ClusterMap>, ManagerError> {
        let known = self.get().epoch;
        if let Some(m) = self.manager.map_since(known).await? {
            let mut w = self.map.write().expect("map lock");
            if m.epoch > w.epoch || known == 0 {
                *w = Arc::new(m);
            }
        }
        Ok(self.get())
    }

    /// Refreshes every `every` until dropped (the task ends with the returned handle).
    pub fn watch(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = me.refresh().await {
                    tracing::debug!("map refresh: {e}");
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every map request with the same map, as a broken or hostile manager would.
    struct Sends(ClusterMap);

    #[async_trait]
    impl Handler for Sends {
        async fn handle(&self, _: Request) -> Response {
            let meta = postcard::to_stdvec(&self.0).unwrap();
            Response::ok(Bytes::from(meta), Bytes::new())
        }
    }

    /// A map that fails its check is refused where it arrives: the client and the servers
    /// keep the map they had instead of indexing past the end of a blade's shards.
    #[tokio::test]
    async fn a_map_that_fails_its_check_is_refused_when_it_arrives() {
        let key = ClusterKey::from_secret(b"map test secret");
        let mut map = ClusterMap::default();
        map.apply(Command::Register {
            addr: "127.0.0.1:1".into(),
            zone: String::new(),
            disks: vec![Disk {
                capacity: 1 << 30,
                free: 1 << 30,
            }],
            now_ms: 0,
        });
        map.partitions = vec![vec![1], vec![1, 9]];
        let srv = Server::bind(
            "127.0.0.1:0",
            key.clone(),
            ServerConfig::default(),
            Arc::new(Sends(map)),
        )
        .await
        .unwrap();
        let cache = MapCache::new(&srv.addr().to_string(), key);
        let e = cache.refresh().await.unwrap_err().to_string();
        assert!(e.contains("partition 1: no server 9"), "{e}");
        assert_eq!(cache.get().epoch, 0, "the map was taken");
        srv.shutdown().await;
    }
}
