//! Blades as servers and clients see them: layouts built from the cluster map, the holdfasts a
//! server runs for the blades whose shard 0 it holds, and the data operations on the wire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use kelp::{BladeLayout, Holdfast, HoldfastConfig, KelpError, Profile, ShardPlacement, ShardStore};
use sealfs_manager::map::{BladeChange, BladeState, ClusterMap};
use sealfs_manager::MapCache;
use sealfs_raft::Peers;
use sealfs_rpc::{Handler, Request, Response, Status};
use sealfs_shard::RemoteStore;
use sealfs_shard::STATUS_NO_SPACE;
use serde::{Deserialize, Serialize};

/// Append an encoded frond to a blade: meta [`AppendReq`], data the frond; reply [`Appended`].
pub const OP_APPEND: u16 = 0x0501;
/// Make a blade's acknowledged appends durable on k + w shards: meta [`BladeReq`].
pub const OP_BLADE_SYNC: u16 = 0x0502;

/// Replace a frond in place with data of the same length (two-phase update): meta
/// [`UpdateReq`], data the encoded frond; reply [`Appended`] with the new sequence.
pub const OP_UPDATE: u16 = 0x0503;

/// The blades this server holds open: [`BladeReport`]s (meta empty).
pub const OP_BLADE_REPORT: u16 = 0x0504;

/// Stipes of a blade where a reader found a cell damaged or missing, for its holdfast to
/// repair: meta [`SuspectReq`].
pub const OP_BLADE_SUSPECT: u16 = 0x0505;

/// What this server's holdfasts did since it started: [`HoldfastReport`] (meta empty).
pub const OP_HOLDFAST_REPORT: u16 = 0x0506;

/// The scrubs, repairs and reclaims of one server's holdfasts since it started.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct HoldfastReport {
    /// Scrubs finished.
    pub scrubs: u64,
    /// When the last one ended (Unix seconds; 0: none yet).
    pub last_scrub_end: u64,
    /// Its length, in seconds.
    pub last_scrub_secs: f64,
    /// Stipes it read.
    pub last_scrub_stipes: u64,
    /// Stipes it rebuilt cells of.
    pub last_scrub_fixed: u64,
    /// Stipes it found with fewer than k valid cells.
    pub last_scrub_unrecoverable: u64,
    /// Stipes the scrubs rebuilt cells of, since the start.
    pub scrub_fixed: u64,
    /// Cells rewritten by repair (a write's missed cells, a reader's tip) since the start.
    pub repaired_cells: u64,
    /// Blades reclaimed (their shard files deleted) since the start.
    pub reclaimed: u64,
}

/// Stipes told to a holdfast at once, at most.
pub const SUSPECT_MAX: usize = 4096;

/// Stipes of `blade` to check.
#[derive(Serialize, Deserialize)]
pub struct SuspectReq {
    pub blade: u32,
    pub stipes: Vec<u32>,
}

/// One open blade of a server.
#[derive(Serialize, Deserialize, Debug)]
pub struct BladeReport {
    pub blade: u32,
    /// Payload bytes appended.
    pub append_pointer: u64,
    /// Stipes known to miss cells (repair runs every few seconds).
    pub degraded: u64,
}

/// An in-place update of the frond at `address`.
#[derive(Serialize, Deserialize)]
pub struct UpdateReq {
    pub blade: u32,
    pub address: u64,
    pub len: u32,
    pub seq: u32,
}

/// Seconds a server's start waits at most for the shards of its blades before opening them.
const OPEN_WAIT_TRIES: u32 = 30;

/// Deadline of one shard call.
pub const SHARD_DEADLINE: Duration = Duration::from_secs(10);

/// Which blade.
#[derive(Serialize, Deserialize)]
pub struct BladeReq {
    pub blade: u32,
}

/// An append.
#[derive(Serialize, Deserialize)]
pub struct AppendReq {
    pub blade: u32,
    /// A blob (nothing in the namespace will refer to it): the blade is marked as holding
    /// blobs, never reclaimed, before the append.
    pub blob: bool,
}

/// The blade is sealed (full): append elsewhere.
pub const STATUS_SEALED: u16 = 258;

/// Payload bytes after which a blade takes no more appends, unless set otherwise.
pub const SEAL_DEFAULT: u64 = 1 << 30;

/// Where an appended frond is.
#[derive(Serialize, Deserialize)]
pub struct Appended {
    pub address: u64,
    pub len: u32,
    pub seq: u32,
}

/// The servers that run in this process (`sealfs up` runs all of them beside the mount), by
/// the address each listens on: their shard stores, which layouts use directly, and their
/// request handlers, which [`Peers`] made with [`InProcess::servers`] call directly, rather
/// than either over a loopback connection to this same process.
#[derive(Clone, Default)]
pub struct InProcess {
    stores: sealfs_rpc::Registry<dyn ShardStore>,
    servers: sealfs_rpc::InProcess,
}

impl InProcess {
    /// Adds the server listening on `addr`: its shard store and its handler.
    pub fn add(&self, addr: String, store: Arc<dyn ShardStore>, handler: Arc<dyn Handler>) {
        self.servers.add(addr.clone(), handler);
        self.stores.add(addr, store);
    }

    /// Removes the server listening on `addr` (it stops).
    pub fn remove(&self, addr: &str) {
        self.servers.remove(addr);
        self.stores.remove(addr);
    }

    /// The handlers, for [`Peers::with_in_process`].
    pub fn servers(&self) -> sealfs_rpc::InProcess {
        self.servers.clone()
    }
}

/// The layout of `blade` from `map`: shards on servers in this process (`near`, a server's
/// own among them) use their stores directly, the rest are reached through `peers`.
pub fn layout_for(
    map: &ClusterMap,
    blade: u32,
    near: &InProcess,
    peers: &Peers,
) -> kelp::Result<BladeLayout> {
    let b = map
        .blades
        .get(&blade)
        .ok_or_else(|| KelpError::invalid(format!("blade {blade:08x} is not in the map")))?;
    let profile = Profile::new(b.k, b.m, b.w)?;
    let mut shards = Vec::with_capacity(b.shards.len());
    for h in &b.shards {
        let addr = map
            .servers
            .get(&h.server)
            .map(|s| s.addr.as_str())
            .ok_or_else(|| KelpError::invalid(format!("server {} is not in the map", h.server)))?;
        let store = near.stores.get(addr).unwrap_or_else(|| {
            Arc::new(RemoteStore::new(peers.client(addr), SHARD_DEADLINE)) as Arc<dyn ShardStore>
        });
        shards.push(ShardPlacement {
            store,
            disk: h.disk,
        });
    }
    BladeLayout::new(blade, profile, shards)
}

/// The holdfasts of one server, opened on first use.
pub struct BladeHost {
    maps: MapCache,
    peers: Peers,
    near: InProcess,
    me: Mutex<Option<u64>>,
    /// Each blade's holdfast, opened once (an open reads the blade's tail: one slow open must
    /// not hold up the others).
    open: Mutex<HashMap<u32, Arc<tokio::sync::OnceCell<Holdfast>>>>,
    /// Payload bytes after which a blade is sealed.
    seal_at: std::sync::atomic::AtomicU64,
    /// When this server first saw each of its blades sealed.
    sealed_at: Mutex<HashMap<u32, std::time::Instant>>,
    /// Blades whose shard files are being deleted: never opened again.
    gone: Mutex<std::collections::HashSet<u32>>,
    /// When each blade open here last took an append (or was first seen without one).
    last_append: Mutex<HashMap<u32, std::time::Instant>>,
    /// Blades whose shard files were all found deleted once: dropped when found so again.
    deleted_once: Mutex<std::collections::HashSet<u32>>,
    /// What the holdfasts here did.
    stats: Mutex<HoldfastReport>,
}

/// The answer to a data operation that failed: bad input, no space left on enough of the
/// blade's disks ([`STATUS_NO_SPACE`], which the client tells its caller as ENOSPC when no
/// blade has room), or not now.
fn failed(e: KelpError) -> Response {
    match e {
        KelpError::Invalid(_) | KelpError::Frond { .. } => err(Status::BadRequest, e.to_string()),
        e if e.is_no_space() => Response::error(STATUS_NO_SPACE, e.to_string()),
        e => err(Status::Unavailable, e.to_string()),
    }
}

/// The address of the server holding shard 0 of `blade` (its holdfast), as `map` has it.
pub fn holdfast_addr(map: &ClusterMap, blade: u32) -> Option<String> {
    let b = map.blades.get(&blade)?;
    map.servers.get(&b.shards[0].server).map(|s| s.addr.clone())
}

fn err(status: Status, m: impl Into<String>) -> Response {
    Response::error(status as u16, m)
}

fn appended(r: kelp::Reference) -> Response {
    let a = Appended {
        address: r.address.0,
        len: r.len,
        seq: r.seq,
    };
    match postcard::to_stdvec(&a) {
        Ok(m) => Response::ok(Bytes::from(m), Bytes::new()),
        Err(e) => err(Status::Internal, e.to_string()),
    }
}

impl BladeHost {
    /// The holdfasts of a server whose own store, with those of any other server in the same
    /// process, is in `near` (by the address it registers with).
    pub fn new(maps: MapCache, peers: Peers, near: InProcess) -> Self {
        BladeHost {
            maps,
            peers,
            near,
            me: Mutex::new(None),
            open: Mutex::new(HashMap::new()),
            seal_at: SEAL_DEFAULT.into(),
            sealed_at: Mutex::default(),
            gone: Mutex::default(),
            last_append: Mutex::default(),
            deleted_once: Mutex::default(),
            stats: Mutex::default(),
        }
    }

    /// Seals blades once they hold `bytes` of payload.
    pub fn set_seal_at(&self, bytes: u64) {
        self.seal_at
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn sealed(&self, h: &Holdfast) -> bool {
        h.append_pointer() >= self.seal_at.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Seals the blades open here that are full, or that hold data and took no append for
    /// `idle` (so that what they hold can be reclaimed once no file uses it), and are not
    /// sealed in the map yet: clients stop choosing them.
    pub async fn seal_full(&self, idle: Duration) {
        let map = self.maps.get();
        let now = std::time::Instant::now();
        for h in self.opened() {
            let blade = h.layout().blade;
            let open = map
                .blades
                .get(&blade)
                .is_some_and(|b| b.state == BladeState::Open);
            let idle = {
                let mut last = self.last_append.lock().expect("last append");
                now.duration_since(*last.entry(blade).or_insert(now)) >= idle
            };
            if open && (self.sealed(&h) || (idle && h.append_pointer() > 0)) {
                match self
                    .maps
                    .manager()
                    .change_blade(blade, BladeChange::Seal)
                    .await
                {
                    Ok(()) => {
                        tracing::info!("blade {blade:08x} sealed at {} bytes", h.append_pointer())
                    }
                    Err(e) => tracing::warn!("sealing blade {blade:08x}: {e}"),
                }
            }
        }
    }

    /// The blades this server is the holdfast of that have been sealed, without blobs, for
    /// at least `grace` as far as this server has seen (since its start at most): those
    /// whose last appends had time to be recorded, or given up.
    pub fn sealed_since(&self, grace: Duration) -> Vec<u32> {
        let Some(me) = *self.me.lock().expect("me") else {
            return Vec::new();
        };
        let map = self.maps.get();
        let mut seen = self.sealed_at.lock().expect("sealed");
        let now = std::time::Instant::now();
        let mut out = Vec::new();
        for (id, b) in &map.blades {
            if b.shards[0].server != me || b.state != BladeState::Sealed || b.blobs {
                continue;
            }
            if now.duration_since(*seen.entry(*id).or_insert(now)) >= grace {
                out.push(*id);
            }
        }
        out
    }

    /// The blades this server is the holdfast of whose deletion began.
    pub fn deleting(&self) -> Vec<u32> {
        let Some(me) = *self.me.lock().expect("me") else {
            return Vec::new();
        };
        self.maps
            .get()
            .blades
            .iter()
            .filter(|(_, b)| b.shards[0].server == me && b.state == BladeState::Deleting)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Deletes the shard files of `blade` (marked Deleting in the map) wherever they are,
    /// and drops it from the map once a later call found every one of them deleted too (a
    /// repair begun before the first could still have written a cell). While a shard's
    /// server does not answer, the blade stays Deleting and the next pass tries again.
    /// Returns whether the blade was dropped.
    pub async fn delete(&self, blade: u32) -> Result<bool, String> {
        self.gone.lock().expect("gone").insert(blade);
        self.open.lock().expect("open").remove(&blade);
        let map = self.maps.get();
        let layout = layout_for(&map, blade, &self.near, &self.peers).map_err(|e| e.to_string())?;
        let n = layout.shards.len();
        let removed = futures::stream::iter(0..n)
            .map(|j| {
                let (store, key) = (layout.shards[j].store.clone(), layout.key(j));
                async move {
                    match tokio::time::timeout(SHARD_DEADLINE, store.delete(key)).await {
                        Ok(Ok(())) => true,
                        Ok(Err(e)) => {
                            tracing::warn!("blade {blade:08x}: shard {j} not deleted: {e}");
                            false
                        }
                        Err(_) => false,
                    }
                }
            })
            .buffer_unordered(16)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await;
        let again = {
            let mut once = self.deleted_once.lock().expect("deleted once");
            if removed < n {
                once.remove(&blade);
                tracing::info!("blade {blade:08x}: {removed} of {n} shard files deleted so far");
                return Ok(false);
            }
            !once.insert(blade)
        };
        if !again {
            return Ok(false);
        }
        self.maps
            .manager()
            .change_blade(blade, BladeChange::Drop)
            .await
            .map_err(|e| e.to_string())?;
        // Out of the map: nothing opens it again, so nothing of it needs keeping here.
        self.sealed_at.lock().expect("sealed").remove(&blade);
        self.last_append.lock().expect("last append").remove(&blade);
        self.gone.lock().expect("gone").remove(&blade);
        self.deleted_once
            .lock()
            .expect("deleted once")
            .remove(&blade);
        self.stats.lock().expect("stats").reclaimed += 1;
        tracing::info!("blade {blade:08x} reclaimed: its {n} shard files deleted");
        Ok(true)
    }

    /// Sets this server's id (once registered).
    pub fn set_me(&self, id: u64) {
        *self.me.lock().expect("me") = Some(id);
    }

    /// The holdfasts open here.
    fn opened(&self) -> Vec<Holdfast> {
        self.open
            .lock()
            .expect("open")
            .values()
            .filter_map(|c| c.get().cloned())
            .collect()
    }

    /// Blades with an open holdfast here, and their append pointers.
    pub async fn open_blades(&self) -> Vec<(u32, u64, usize)> {
        self.opened()
            .iter()
            .map(|h| (h.layout().blade, h.append_pointer(), h.degraded().len()))
            .collect()
    }

    /// Opens the holdfast of every blade whose shard 0 is on this server, two at a time, so
    /// that the first writes after a start find them open. A blade that cannot open yet (its
    /// shard servers not up) opens on first use.
    pub async fn open_all(&self) {
        let Some(mine) = self.mine().await else {
            return;
        };
        let t = std::time::Instant::now();
        let opened = futures::stream::iter(mine)
            .map(|blade| async move {
                // Every shard answering first: servers starting beside this one may not
                // listen yet, and an open without them marks the blade's tail for repair.
                for _ in 0..OPEN_WAIT_TRIES {
                    if self.all_shards_answer(blade).await {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                self.holdfast(blade).await.is_ok()
            })
            .buffer_unordered(2)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await;
        if opened > 0 {
            tracing::info!("opened {opened} blade(s) in {:.1?}", t.elapsed());
        }
    }

    /// The blades whose shard 0 is on this server (it is their holdfast), but those being
    /// reclaimed; `None` before it registered or while the manager does not answer.
    async fn mine(&self) -> Option<Vec<u32>> {
        let me = (*self.me.lock().expect("me"))?;
        let map = self.maps.refresh().await.ok()?;
        let mine = map
            .blades
            .iter()
            .filter(|(_, b)| b.shards.first().is_some_and(|s| s.server == me))
            .filter(|(_, b)| b.state != BladeState::Deleting)
            .map(|(id, _)| *id)
            .collect();
        Some(mine)
    }

    /// Scrubs every blade this server is the holdfast of, one after the other, reading at most
    /// `pace` bytes of cells a second (0: no bound): every cell is read and those missing,
    /// stale or corrupt are rebuilt (DESIGN 4.5). Returns what it found, over all blades.
    pub async fn scrub_pass(&self, pace: u64) -> kelp::RepairReport {
        let mut all = kelp::RepairReport::default();
        let Some(mine) = self.mine().await else {
            return all;
        };
        let t = std::time::Instant::now();
        let blades = mine.len();
        for blade in mine {
            let r = match self.holdfast(blade).await {
                Ok(h) => h.scrub((pace > 0).then_some(pace)).await,
                Err(e) => {
                    let why = String::from_utf8_lossy(&e.meta).into_owned();
                    tracing::warn!("scrub: blade {blade:08x} does not open: {why}");
                    continue;
                }
            };
            match r {
                Ok(r) => {
                    if !r.unrecoverable.is_empty() {
                        tracing::error!(
                            "scrub: blade {blade:08x} has {} stipes with fewer than k valid \
                             cells: {:?}",
                            r.unrecoverable.len(),
                            r.unrecoverable
                        );
                    }
                    all.add(r);
                }
                Err(e) => tracing::warn!("scrub of blade {blade:08x}: {e}"),
            }
        }
        {
            let mut st = self.stats.lock().expect("stats");
            st.scrubs += 1;
            st.last_scrub_end = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            st.last_scrub_secs = t.elapsed().as_secs_f64();
            st.last_scrub_stipes = all.stipes_checked;
            st.last_scrub_fixed = all.stipes_fixed;
            st.scrub_fixed += all.stipes_fixed;
            st.last_scrub_unrecoverable = all.unrecoverable.len() as u64;
        }
        tracing::info!(
            "scrub of {blades} blade(s) in {:.1?}: {} stipes read, {} fixed ({} cells \
             rewritten), {} cells still to repair",
            t.elapsed(),
            all.stipes_checked,
            all.stipes_fixed,
            all.cells_rewritten,
            all.cells_failed
        );
        all
    }

    /// True if every shard store of `blade`, as the map now places them, answers.
    async fn all_shards_answer(&self, blade: u32) -> bool {
        let Ok(map) = self.maps.refresh().await else {
            return false;
        };
        let Ok(layout) = layout_for(&map, blade, &self.near, &self.peers) else {
            return false;
        };
        futures::stream::iter(0..layout.shards.len())
            .map(|j| {
                let store = layout.shards[j].store.clone();
                let key = layout.key(j);
                async move {
                    matches!(
                        tokio::time::timeout(Duration::from_secs(2), store.stipes(key)).await,
                        Ok(Ok(_))
                    )
                }
            })
            .buffer_unordered(16)
            .all(std::future::ready)
            .await
    }

    async fn holdfast(&self, blade: u32) -> Result<Holdfast, Response> {
        if self.gone.lock().expect("gone").contains(&blade) {
            return Err(err(
                Status::BadRequest,
                format!("blade {blade:08x} was reclaimed"),
            ));
        }
        let Some(me) = *self.me.lock().expect("me") else {
            return Err(err(
                Status::Unavailable,
                "the server has not registered yet",
            ));
        };
        let cell = self
            .open
            .lock()
            .expect("open")
            .entry(blade)
            .or_default()
            .clone();
        cell.get_or_try_init(|| self.open_one(blade, me))
            .await
            .cloned()
    }

    async fn open_one(&self, blade: u32, me: u64) -> Result<Holdfast, Response> {
        // A blade's shards stay where they were placed: a map that has the blade places it as
        // the newest would, and the manager is asked only for a blade this one lacks.
        let mut map = self.maps.get();
        if !map.blades.contains_key(&blade) {
            map = self
                .maps
                .refresh()
                .await
                .map_err(|e| err(Status::Unavailable, e.to_string()))?;
        }
        let Some(b) = map.blades.get(&blade) else {
            return Err(err(Status::BadRequest, format!("no blade {blade:08x}")));
        };
        if b.state == BladeState::Deleting {
            return Err(err(
                Status::BadRequest,
                format!("blade {blade:08x} is being reclaimed"),
            ));
        }
        if b.shards[0].server != me {
            let mut r = err(
                Status::StaleEpoch,
                format!("blade {blade:08x} is not held here"),
            );
            r.epoch = map.epoch;
            return Err(r);
        }
        let layout = layout_for(&map, blade, &self.near, &self.peers)
            .map_err(|e| err(Status::Internal, e.to_string()))?;
        Holdfast::open(layout, HoldfastConfig::default())
            .await
            .map_err(|e| err(Status::Unavailable, format!("blade {blade:08x}: {e}")))
    }

    /// Answers a data operation.
    pub async fn handle(&self, req: Request) -> Response {
        if req.op == OP_BLADE_REPORT {
            let list: Vec<BladeReport> = self
                .open_blades()
                .await
                .into_iter()
                .map(|(blade, append_pointer, degraded)| BladeReport {
                    blade,
                    append_pointer,
                    degraded: degraded as u64,
                })
                .collect();
            return match postcard::to_stdvec(&list) {
                Ok(m) => Response::ok(Bytes::from(m), Bytes::new()),
                Err(e) => err(Status::Internal, e.to_string()),
            };
        }
        if req.op == OP_HOLDFAST_REPORT {
            let st = self.stats.lock().expect("stats").clone();
            return match postcard::to_stdvec(&st) {
                Ok(m) => Response::ok(Bytes::from(m), Bytes::new()),
                Err(e) => err(Status::Internal, e.to_string()),
            };
        }
        let Ok(b) = postcard::from_bytes::<BladeReq>(&req.meta) else {
            return err(Status::BadRequest, "malformed blade request");
        };
        let h = match self.holdfast(b.blade).await {
            Ok(h) => h,
            Err(r) => return r,
        };
        match req.op {
            OP_APPEND => {
                let Ok(a) = postcard::from_bytes::<AppendReq>(&req.meta) else {
                    return err(Status::BadRequest, "malformed append request");
                };
                let (state, marked) = match self.maps.get().blades.get(&a.blade) {
                    Some(b) => (b.state, b.blobs),
                    None => (BladeState::Open, false),
                };
                if self.sealed(&h) || state != BladeState::Open {
                    return Response::error(
                        STATUS_SEALED,
                        format!("blade {:08x} is sealed", a.blade),
                    );
                }
                if a.blob && !marked {
                    if let Err(e) = self
                        .maps
                        .manager()
                        .change_blade(a.blade, BladeChange::Blobs)
                        .await
                    {
                        return err(Status::Unavailable, e.to_string());
                    }
                }
                let r = h.append(req.data).await;
                self.last_append
                    .lock()
                    .expect("last append")
                    .insert(a.blade, std::time::Instant::now());
                match r {
                    Ok(r) => appended(r),
                    Err(e) => failed(e),
                }
            }
            OP_UPDATE => {
                let Ok(u) = postcard::from_bytes::<UpdateReq>(&req.meta) else {
                    return err(Status::BadRequest, "malformed update request");
                };
                let r = kelp::Reference {
                    address: kelp::Address(u.address),
                    len: u.len,
                    seq: u.seq,
                };
                if r.address.blade() != u.blade {
                    return err(Status::BadRequest, "the address is not in this blade");
                }
                match h.update(r, req.data).await {
                    Ok(r) => appended(r),
                    Err(e) => failed(e),
                }
            }
            OP_BLADE_SUSPECT => match postcard::from_bytes::<SuspectReq>(&req.meta) {
                Ok(r) if r.stipes.len() <= SUSPECT_MAX => {
                    let taken = h.suspect(&r.stipes);
                    tracing::info!(
                        "blade {:08x}: a reader found {taken} stipe(s) with a bad cell",
                        r.blade
                    );
                    Response::ok(Bytes::new(), Bytes::new())
                }
                _ => err(Status::BadRequest, "malformed suspect request"),
            },
            OP_BLADE_SYNC => match h.sync().await {
                Ok(()) => Response::ok(Bytes::new(), Bytes::new()),
                Err(e) => failed(e),
            },
            op => err(
                Status::UnknownOp,
                format!("data: unknown operation {op:#x}"),
            ),
        }
    }

    /// Repairs the degraded stipes of every open blade; returns how many cells it rebuilt.
    pub async fn repair_pass(&self) -> u64 {
        let hs = self.opened();
        let mut fixed = 0;
        for h in hs {
            if h.degraded().is_empty() {
                continue;
            }
            match h.repair().await {
                Ok(r) => {
                    fixed += r.cells_rewritten;
                    self.stats.lock().expect("stats").repaired_cells += r.cells_rewritten;
                }
                Err(e) => tracing::debug!("repair of blade {:08x}: {e}", h.layout().blade),
            }
        }
        fixed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sealfs_manager::map::{Command, Disk, Outcome};
    use sealfs_rpc::ClusterKey;

    struct NoServer;

    #[async_trait::async_trait]
    impl Handler for NoServer {
        async fn handle(&self, _: Request) -> Response {
            err(Status::Unavailable, "not a server")
        }
    }

    fn remote(peers: &Peers, addr: &str) -> Arc<dyn ShardStore> {
        Arc::new(RemoteStore::new(peers.client(addr), SHARD_DEADLINE))
    }

    #[tokio::test]
    async fn layouts_reach_stores_in_this_process_directly_and_the_rest_over_the_network() {
        let mut map = ClusterMap::default();
        for s in 0..4 {
            map.apply(Command::Register {
                addr: format!("127.0.0.1:{}", 7000 + s),
                zone: String::new(),
                disks: vec![
                    Disk {
                        capacity: 1 << 40,
                        free: 1 << 40,
                    };
                    4
                ],
                now_ms: 0,
            });
        }
        let Outcome::Blade(blade, _) = map.apply(Command::AllocateBlade { k: 8, m: 8, w: 4 })
        else {
            panic!("no blade")
        };
        let peers = Peers::new(ClusterKey::from_secret(b"test"));
        let id_of = |addr: &str| {
            *map.servers
                .iter()
                .find(|(_, s)| s.addr == addr)
                .expect("registered")
                .0
        };
        let (own_id, own) = (id_of("127.0.0.1:7000"), remote(&peers, "127.0.0.1:7000"));
        let (near_id, near_store) = (id_of("127.0.0.1:7001"), remote(&peers, "127.0.0.1:7001"));
        // A server's own store is registered like the others (`Node::start` does so).
        let near = InProcess::default();
        for (addr, store) in [("127.0.0.1:7000", &own), ("127.0.0.1:7001", &near_store)] {
            near.add(addr.into(), store.clone(), Arc::new(NoServer));
        }
        let b = &map.blades[&blade];

        // Shards of the servers in this process on their stores, the others each on a store
        // of its own.
        let layout = layout_for(&map, blade, &near, &peers).expect("layout");
        for (h, p) in b.shards.iter().zip(&layout.shards) {
            assert_eq!(p.disk, h.disk);
            assert_eq!(Arc::ptr_eq(&p.store, &own), h.server == own_id);
            assert_eq!(Arc::ptr_eq(&p.store, &near_store), h.server == near_id);
        }
        assert!(b.shards.iter().any(|h| h.server == near_id));

        // A server that stopped is reached over the network again.
        near.remove("127.0.0.1:7001");
        let layout = layout_for(&map, blade, &near, &peers).expect("layout");
        for (h, p) in b.shards.iter().zip(&layout.shards) {
            assert!(!Arc::ptr_eq(&p.store, &near_store));
            assert_eq!(Arc::ptr_eq(&p.store, &own), h.server == own_id);
            if h.server != own_id {
                assert!(p.store.name().starts_with("127.0.0.1:700"));
            }
        }
    }
}
