//! The partitions a server hosts: it starts a replica of every partition the map gives it (the
//! first member of a replica set makes the group), answers commands and queries on the leaders,
//! completes the intents its commands record, and on the leaders it runs the background driver
//! of intents left behind and the orphan scan.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use sealfs_manager::map::ClusterMap;
use sealfs_raft::{Group, GroupError, Peers, RaftRouter};
use sealfs_rpc::{Request, Response, Status};

use crate::{
    group_of, now_nanos, Errno, FollowUp, Intent, MetaClient, Nanos, Op, PartitionMachine, Query,
    ReplicaReport, Reply, Unsettled, OP_META_READ, OP_META_REPLICAS, OP_META_ROOM, OP_META_WRITE,
    RESTART_AFTER,
};

/// Settings of the partitions' background work.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Intents older than this are driven by the background task (the client's own drive is
    /// normally done well before).
    pub intent_grace: Duration,
    /// Half-done operations older than this are settled by the orphan scan. Longer than any
    /// operation's deadline, so that a client still working is never overtaken.
    pub orphan_grace: Duration,
    /// How often the background work runs.
    pub every: Duration,
    /// Bytes kept free on the disk of the partitions' files: below this, commands that add
    /// metadata (creates, mkdirs, links, extents, xattrs) are refused with ENOSPC before they
    /// reach the Raft log, so that removals, renames and truncates still find room to free
    /// space.
    pub reserve: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            intent_grace: Duration::from_secs(5),
            orphan_grace: Duration::from_secs(60),
            every: Duration::from_secs(2),
            reserve: RESERVE_DEFAULT,
        }
    }
}

/// [`HostConfig::reserve`] unless set: room for the removals that free a full disk (a
/// partition's store copies the pages it changes; the Raft log takes 16 MiB segments).
pub const RESERVE_DEFAULT: u64 = 64 << 20;

/// The metadata partitions of one server.
pub struct MetaHost {
    dir: PathBuf,
    router: Arc<RaftRouter>,
    peers: Peers,
    client: MetaClient,
    groups: RwLock<HashMap<u32, Group>>,
    log: std::sync::Mutex<Option<sealfs_raft::LogDb>>,
    starting: tokio::sync::Mutex<()>,
    /// When each stopped replica was last started again.
    restarted: std::sync::Mutex<HashMap<u32, std::time::Instant>>,
    /// The other members of each partition hosted here (their addresses), from the map.
    others: RwLock<HashMap<u32, Vec<String>>>,
    /// Whether each server asked had room, and when it answered.
    rooms: std::sync::Mutex<HashMap<String, (std::time::Instant, bool)>>,
    cfg: HostConfig,
}

/// How long a server's answer to [`OP_META_ROOM`] is taken as true.
const ROOM_FRESH: Duration = Duration::from_secs(1);

fn reply(r: &Reply) -> Response {
    match postcard::to_stdvec(r) {
        Ok(b) => Response::ok(Bytes::from(b), Bytes::new()),
        Err(e) => Response::error(Status::Internal as u16, e.to_string()),
    }
}

fn group_reply(e: GroupError, g: &Group) -> Reply {
    match e {
        GroupError::NotLeader(_) => Reply::Redirect(g.leader()),
        GroupError::Unavailable(m) => {
            tracing::debug!("partition unavailable: {m}");
            Reply::Error(Errno::UNAVAILABLE)
        }
    }
}

impl MetaHost {
    /// Partitions kept under `dir`, their Raft messages through `router`.
    pub fn new(
        dir: PathBuf,
        router: Arc<RaftRouter>,
        peers: Peers,
        client: MetaClient,
        cfg: HostConfig,
    ) -> Arc<Self> {
        Arc::new(MetaHost {
            dir,
            router,
            peers,
            client,
            groups: RwLock::default(),
            log: std::sync::Mutex::new(None),
            starting: tokio::sync::Mutex::new(()),
            restarted: std::sync::Mutex::default(),
            others: RwLock::default(),
            rooms: std::sync::Mutex::default(),
            cfg,
        })
    }

    fn group(&self, p: u32) -> Option<Group> {
        self.groups.read().expect("groups").get(&p).cloned()
    }

    /// The partitions hosted here and whether this replica leads each.
    pub fn hosted(&self) -> BTreeMap<u32, bool> {
        self.groups
            .read()
            .expect("groups")
            .iter()
            .map(|(p, g)| (*p, g.is_leader()))
            .collect()
    }

    /// Starts the replicas `map` gives server `me` that are not running yet.
    pub async fn follow(&self, map: &ClusterMap, me: u64) -> Result<(), String> {
        let _one = self.starting.lock().await;
        self.restart_stopped().await;
        *self.others.write().expect("others") = map
            .partitions
            .iter()
            .enumerate()
            .filter(|(_, set)| set.contains(&me))
            .map(|(p, set)| {
                let addrs = set
                    .iter()
                    .filter(|s| **s != me)
                    .filter_map(|s| map.servers.get(s).map(|e| e.addr.clone()))
                    .collect();
                (p as u32, addrs)
            })
            .collect();
        for (p, set) in map.partitions.iter().enumerate() {
            let p = p as u32;
            if !set.contains(&me) || self.group(p).is_some() {
                continue;
            }
            std::fs::create_dir_all(&self.dir)
                .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
            let machine = PartitionMachine::open(p, &self.dir.join(format!("p{p:04}.state.redb")))?;
            let log = {
                let mut l = self.log.lock().expect("log");
                match &*l {
                    Some(log) => log.clone(),
                    None => {
                        let path = self.dir.join("raft.wal");
                        let log = sealfs_raft::LogDb::open(&path)?;
                        *l = Some(log.clone());
                        log
                    }
                }
            };
            let g = Group::start(
                group_of(p),
                me,
                &log,
                Box::new(machine),
                self.router.clone(),
                self.peers.clone(),
            )
            .await
            .map_err(|e| e.to_string())?;
            if set.first() == Some(&me) {
                let members: BTreeMap<u64, String> = set
                    .iter()
                    .filter_map(|s| map.servers.get(s).map(|e| (*s, e.addr.clone())))
                    .collect();
                if members.len() == set.len() {
                    g.initialize(members).await.map_err(|e| e.to_string())?;
                }
            }
            self.groups.write().expect("groups").insert(p, g);
        }
        Ok(())
    }

    /// Takes out the replicas that stopped on their own (their log or store failed: a full
    /// disk, say), at most once per [`RESTART_AFTER`] each, so that [`MetaHost::follow`] starts
    /// them again from their files, as a restart of the server would: once the disk has room,
    /// they catch up from their leaders.
    async fn restart_stopped(&self) {
        let stopped: Vec<(u32, Group, String)> = self
            .groups
            .read()
            .expect("groups")
            .iter()
            .filter_map(|(p, g)| g.stopped().map(|why| (*p, g.clone(), why)))
            .collect();
        for (p, g, why) in stopped {
            {
                let mut r = self.restarted.lock().expect("restarted");
                if r.get(&p).is_some_and(|t| t.elapsed() < RESTART_AFTER) {
                    continue;
                }
                r.insert(p, std::time::Instant::now());
            }
            tracing::warn!("partition {p}: the replica stopped ({why}); starting it again");
            self.groups.write().expect("groups").remove(&p);
            g.shutdown().await;
        }
    }

    /// Answers a metadata request.
    pub async fn handle(&self, req: Request) -> Response {
        match req.op {
            OP_META_WRITE => {
                let Ok((p, mut op)) = postcard::from_bytes::<(u32, Op)>(&req.meta) else {
                    return Response::error(
                        Status::BadRequest as u16,
                        "malformed metadata command",
                    );
                };
                let Some(g) = self.group(p) else {
                    return reply(&Reply::Redirect(None));
                };
                // One line per command at `--log trace` (how many commands a workload
                // makes, by kind: docs/performance.md).
                tracing::trace!("partition {p}: command {}", kind(op.inner()));
                if adds(op.inner()) && !self.majority_has_room(p).await {
                    return reply(&Reply::Error(Errno::NOSPC));
                }
                let now = now_nanos();
                op.set_now(now);
                op.set_deadline(now, self.step_allowed());
                reply(&self.write(p, &g, &op).await)
            }
            OP_META_READ => {
                let Ok((p, q)) = postcard::from_bytes::<(u32, Query)>(&req.meta) else {
                    return Response::error(Status::BadRequest as u16, "malformed metadata query");
                };
                let Some(g) = self.group(p) else {
                    return reply(&Reply::Redirect(None));
                };
                let Ok(qb) = postcard::to_stdvec(&q) else {
                    return Response::error(Status::Internal as u16, "encode");
                };
                match g.query(&qb).await {
                    Ok(b) => Response::ok(Bytes::from(b), Bytes::new()),
                    Err(e) => reply(&group_reply(e, &g)),
                }
            }
            OP_META_ROOM => Response::ok(Bytes::from(vec![u8::from(self.room())]), Bytes::new()),
            OP_META_REPLICAS => {
                let list: Vec<ReplicaReport> = self
                    .groups
                    .read()
                    .expect("groups")
                    .iter()
                    .map(|(p, g)| ReplicaReport {
                        partition: *p,
                        stopped: g.stopped(),
                    })
                    .collect();
                match postcard::to_stdvec(&list) {
                    Ok(b) => Response::ok(Bytes::from(b), Bytes::new()),
                    Err(_) => Response::error(Status::Internal as u16, "encode"),
                }
            }
            op => Response::error(
                Status::UnknownOp as u16,
                format!("metadata: unknown operation {op:#x}"),
            ),
        }
    }

    /// Whether the disk of the partitions' files has more than the reserve free (true when
    /// that cannot be told: the log's own writes then report a full disk).
    fn room(&self) -> bool {
        match rustix::fs::statvfs(&self.dir) {
            Ok(s) => s.f_bavail.saturating_mul(s.f_frsize) >= self.cfg.reserve,
            Err(_) => true,
        }
    }

    /// Whether a majority of partition `p`'s members (this one among them) has more than the
    /// reserve free. Then a command that adds metadata goes ahead, as it did before there was
    /// a reserve: if a short member's log fills, it stops and the others go on. With fewer,
    /// the partition would lose its quorum as their logs fill (their disks fill together, or
    /// share one), and with it the removals that free space: the command is refused. A
    /// member that does not answer within a second counts as short; answers are kept a
    /// second.
    async fn majority_has_room(&self, p: u32) -> bool {
        let others = self
            .others
            .read()
            .expect("others")
            .get(&p)
            .cloned()
            .unwrap_or_default();
        let members = others.len() + 1;
        let need = members / 2 + 1;
        let here = usize::from(self.room());
        if here >= need {
            return true;
        }
        let asked = futures::future::join_all(others.into_iter().map(|addr| async move {
            let known = self.rooms.lock().expect("rooms").get(&addr).copied();
            if let Some((_, room)) = known.filter(|k| k.0.elapsed() < ROOM_FRESH) {
                return room;
            }
            let req = Request {
                op: OP_META_ROOM,
                epoch: 0,
                meta: Bytes::new(),
                data: Bytes::new(),
            };
            let room = self
                .peers
                .client(&addr)
                .call(req, Duration::from_secs(1))
                .await
                .is_ok_and(|r| r.status == 0 && r.meta.first() == Some(&1));
            let now = std::time::Instant::now();
            self.rooms.lock().expect("rooms").insert(addr, (now, room));
            room
        }))
        .await;
        here + asked.into_iter().filter(|r| *r).count() >= need
    }

    /// Proposes `op` on partition `p` and completes the intents it recorded.
    async fn write(&self, p: u32, g: &Group, op: &Op) -> Reply {
        let Ok(b) = postcard::to_stdvec(op) else {
            return Reply::Error(Errno::INVAL);
        };
        let r = match g.write(b).await {
            Ok(out) => postcard::from_bytes::<Reply>(&out).unwrap_or(Reply::Error(Errno::IO)),
            Err(e) => return group_reply(e, g),
        };
        let intents = match &r {
            Reply::Entry { intents, .. }
            | Reply::Changed { intents, .. }
            | Reply::Intents(intents) => intents.clone(),
            _ => vec![],
        };
        for i in intents {
            let id = i.id;
            if after_reply(op, &i.op) {
                let (client, g) = (self.client.clone(), g.clone());
                tokio::spawn(async move {
                    if follow_up(&client, i).await.is_ok() {
                        let _ = forget_intent(&g, id).await;
                    }
                });
                continue;
            }
            match self.follow_up(i).await {
                // The operation is whole once its follow-up is applied: the reply need not
                // wait for the intent to be forgotten (if that is lost, the background driver
                // applies the follow-up again, which does nothing the second time).
                Ok(()) => {
                    let g = g.clone();
                    tokio::spawn(async move { forget_intent(&g, id).await });
                }
                Err(e) => {
                    tracing::warn!("partition {p}: intent left for the background driver: {e}")
                }
            }
        }
        r
    }

    /// Applies an intent's follow-up on its partition, then forgets it here.
    async fn drive(&self, p: u32, i: Intent) -> Result<(), Errno> {
        let id = i.id;
        self.follow_up(i).await?;
        let g = self.group(p).ok_or(Errno::UNAVAILABLE)?;
        forget_intent(&g, id).await
    }

    /// Applies an intent's follow-up on its partition (once, however often it is asked).
    async fn follow_up(&self, i: Intent) -> Result<(), Errno> {
        follow_up(&self.client, i).await
    }

    /// One pass of background work on the partitions led here: intents left behind are driven,
    /// half-done operations older than the grace are settled. Returns how many it settled.
    pub async fn background_pass(&self) -> usize {
        let led: Vec<(u32, Group)> = self
            .groups
            .read()
            .expect("groups")
            .iter()
            .filter(|(_, g)| g.is_leader())
            .map(|(p, g)| (*p, g.clone()))
            .collect();
        let mut settled = 0;
        let now = now_nanos();
        let ago = |d: Duration| -> Nanos { now - d.as_nanos().min(i64::MAX as u128) as i64 };
        for (p, g) in led {
            let q = |q: Query| postcard::to_stdvec(&q).unwrap_or_default();
            let intents = g
                .query(&q(Query::Intents {
                    before: ago(self.cfg.intent_grace),
                }))
                .await;
            if let Ok(Ok(Reply::Intents(list))) = intents.map(|b| postcard::from_bytes::<Reply>(&b))
            {
                for i in list {
                    if self.drive(p, i).await.is_ok() {
                        settled += 1;
                    }
                }
            }
            let unsettled = g
                .query(&q(Query::Unsettled {
                    before: ago(self.cfg.orphan_grace),
                }))
                .await;
            if let Ok(Ok(Reply::Unsettled(list))) =
                unsettled.map(|b| postcard::from_bytes::<Reply>(&b))
            {
                for item in list {
                    if self.settle(&g, item).await.is_ok() {
                        settled += 1;
                    }
                }
            }
        }
        settled
    }

    /// How long after its first step began a second step may be applied ([`Op::Within`]):
    /// half the orphan grace, so that the scan, which settles first steps older than the
    /// grace, decides after any second step that can still land (with clocks within a
    /// quarter of the grace of each other).
    fn step_allowed(&self) -> Nanos {
        (self.cfg.orphan_grace / 2)
            .as_nanos()
            .min(Nanos::MAX as u128) as Nanos
    }

    async fn settle(&self, g: &Group, item: Unsettled) -> Result<(), Errno> {
        let (parent, name, ino) = item.decider();
        // A command on the deciding partition, not a read: no second step is applied there
        // after it (see `Op::Within`), so the answer cannot change under the settlement.
        let decide = Op::Decide {
            parent,
            name: name.to_vec(),
            ino,
            now: 0,
        };
        let exists = match self
            .client
            .write(crate::partition_of(parent), &decide)
            .await?
        {
            Reply::Entry { ino: found, .. } => found == ino,
            Reply::Error(Errno::NOENT) => false,
            Reply::Error(e) => return Err(e),
            _ => return Err(Errno::IO),
        };
        tracing::info!("orphan scan: settling {item:?} (entry exists: {exists})");
        let op = Op::Settle {
            item,
            entry_exists: exists,
            now: now_nanos(),
        };
        let b = postcard::to_stdvec(&op).map_err(|_| Errno::INVAL)?;
        g.write(b).await.map_err(|_| Errno::UNAVAILABLE)?;
        Ok(())
    }

    /// Runs the background work every `cfg.every` until the returned task is aborted.
    pub fn run_background(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(me.cfg.every).await;
                me.background_pass().await;
            }
        })
    }

    /// Stops every replica.
    pub async fn shutdown(&self) {
        let groups: Vec<Group> = self
            .groups
            .write()
            .expect("groups")
            .drain()
            .map(|(_, g)| g)
            .collect();
        for g in groups {
            g.shutdown().await;
        }
        self.log.lock().expect("log").take();
    }
}

/// Whether the follow-up `f` of `op` is driven after the reply instead of before it: when the
/// operation is whole without it and what it changes is seen by no one but the orphan scan.
///
/// - A mkdir's `Confirm`: the new directory's entry is in place. Its inode leaving the pending
///   state changes nothing a client sees; the orphan scan keeps a pending directory while the
///   name it was made under holds it, and a rename that moves it confirms it before its own
///   reply (the `Confirm` of two directories exchanged in one folder is driven before the
///   rename's reply: after it, that name no longer holds the directory).
///
/// If such a follow-up is lost, the background driver applies it. (An rmdir's `Destroy` is
/// driven before the reply: until it lands, the removed directory's inode still answers a
/// `getattr` by its number.)
fn after_reply(op: &Op, f: &FollowUp) -> bool {
    match op {
        Op::Once { op, .. } | Op::Within { op, .. } => after_reply(op, f),
        op => matches!((op, f), (Op::MkdirLink { .. }, FollowUp::Confirm { .. })),
    }
}

/// The name of a command's kind (`Create`, `SetAttr`, ...).
fn kind(op: &Op) -> String {
    let d = format!("{op:?}");
    d.split([' ', '{']).next().unwrap_or_default().to_string()
}

/// Applies an intent's follow-up on its partition (once, however often it is asked).
async fn follow_up(client: &MetaClient, i: Intent) -> Result<(), Errno> {
    client.write(i.to, &Op::Apply { intent: i }).await?.err()?;
    Ok(())
}

/// Forgets intent `id` on the partition that recorded it (its follow-up is applied).
async fn forget_intent(g: &Group, id: u64) -> Result<(), Errno> {
    let b = postcard::to_stdvec(&Op::ClearIntent { id }).map_err(|_| Errno::INVAL)?;
    g.write(b).await.map_err(|_| Errno::UNAVAILABLE)?;
    Ok(())
}

/// Whether `op` begins an operation that adds metadata (refused when the disk is nearly
/// full). Later steps of an operation already begun, removals, renames and attribute changes
/// are not: what was started finishes, and what frees space still can.
fn adds(op: &Op) -> bool {
    // Not a volume's root: every client makes sure of it when it connects, and a client
    // that cannot connect cannot remove files either.
    matches!(
        op,
        Op::Create { .. }
            | Op::MkdirAlloc { .. }
            | Op::Link { .. }
            | Op::LinkPrepare { .. }
            | Op::Write { .. }
            | Op::SetXattr { .. }
    )
}
