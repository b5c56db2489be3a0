//! The sealfs client library (DESIGN 5.5): namespace operations routed to the partitions that
//! own them, file data written as fronds of about 2 MiB to the blades' holdfasts and read
//! straight from the shards (hedged), `sync` before a write is acknowledged as durable.
//!
//! Every call returns a POSIX error ([`Errno`]) so that the FUSE mount and the CLI can use it as
//! it is; a partition without a majority answers [`Errno::UNAVAILABLE`] within the deadline.

pub mod blades;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use kelp::{Address, BladeReader, HedgeConfig, Reference};
use sealfs_manager::map::{BladeState, ClusterMap, ServerState, Volume};
use sealfs_manager::MapCache;
use sealfs_meta::{
    check_name, dir_partition, now_nanos, partition_of, root_ino, second_step, Attr, DirEntry,
    Errno, Extent, Kind, MetaClient, Op, Query, Reply, SetAttr, Unsettled, PATH_MAX,
    RENAME_EXCHANGE, RENAME_NOREPLACE,
};
use sealfs_raft::Peers;
use sealfs_rpc::{ClusterKey, Request, RpcError};

pub use sealfs_meta::{Errno as Error, Kind as FileKind};

/// A file, symlink or special file for [`Sealfs::create`] to make.
#[derive(Clone, Debug)]
pub struct NewFile<'a> {
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// The device number of a character or block device.
    pub rdev: u32,
    /// What a symlink points to.
    pub target: &'a [u8],
    /// Whether a name already taken fails with EEXIST (else the file there is returned).
    pub exclusive: bool,
}

impl NewFile<'static> {
    /// A regular file with `perm`, owned by root, made only where the name is free.
    pub fn file(perm: u16) -> Self {
        NewFile {
            kind: Kind::File,
            perm,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: b"",
            exclusive: true,
        }
    }
}

use blades::{
    AppendReq, Appended, BladeReq, InProcess, UpdateReq, OP_APPEND, OP_BLADE_SYNC, OP_UPDATE,
    STATUS_SEALED,
};

/// Data bytes per frond the client writes (the last frond of a write may be shorter).
pub const FROND_BYTES: usize = 2 << 20;
/// Fronds of one write in flight at once.
const FRONDS_IN_FLIGHT: usize = 4;
/// Writable blades the client keeps per profile before it asks for more.
const BLADES_WANTED: usize = 4;
/// Fronds a client keeps after reading them (an in-place blob update gives a frond new
/// bytes: blob reads skip this cache).
const FROND_CACHE: usize = 8;
/// Fronds at least this long are read in part when a read wants a small piece of them.
const PARTIAL_READ_FROND_MIN: usize = 64 << 10;
/// A blade whose holdfast failed is avoided this long.
const AVOID: Duration = Duration::from_secs(10);

/// What `statfs` reports for a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeStat {
    /// Bytes the volume may hold (its quota, or the cluster's usable capacity).
    pub capacity: u64,
    /// Bytes used (the sizes of its files).
    pub used: u64,
    /// Bytes free.
    pub free: u64,
    /// Inodes in use.
    pub inodes: u64,
}

/// A blade latency older than this is measured again.
const LATENCY_STALE: Duration = Duration::from_secs(2);

/// One append in flight to a blade, counted while it lives (dropped with a cancelled call).
struct Queued<'a> {
    writer: &'a Mutex<WriterState>,
    blade: u32,
}

impl<'a> Queued<'a> {
    fn new(writer: &'a Mutex<WriterState>, blade: u32) -> Self {
        *writer
            .lock()
            .expect("writer")
            .inflight
            .entry(blade)
            .or_default() += 1;
        Queued { writer, blade }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = w.inflight.get_mut(&self.blade) {
            *n -= 1;
            if *n == 0 {
                w.inflight.remove(&self.blade);
            }
        }
    }
}

/// Ranges of a file appended and not yet recorded ([`Sealfs::stage_ranges`]).
#[derive(Debug)]
pub struct Staged {
    ino: u64,
    extents: Vec<Extent>,
    blades: BTreeSet<u32>,
    total: usize,
}

impl Staged {
    /// The blades the ranges were appended to.
    pub fn blades(&self) -> &BTreeSet<u32> {
        &self.blades
    }
}

#[derive(Default)]
struct WriterState {
    /// Holdfast latency in µs (EWMA) by blade, and when it was last measured.
    latency: HashMap<u32, (f64, Instant)>,
    /// Appends this client has in flight, by blade.
    inflight: HashMap<u32, usize>,
    /// Blades to avoid until then.
    avoid: HashMap<u32, Instant>,
    /// Blades whose holdfast said they are sealed (before the map says so).
    sealed: std::collections::HashSet<u32>,
    turn: usize,
}

/// A connection to one volume of a cluster.
#[derive(Clone)]
pub struct Sealfs {
    maps: MapCache,
    peers: Peers,
    meta: MetaClient,
    volume: Volume,
    volume_name: String,
    root: u64,
    readers: Arc<Mutex<HashMap<u32, Arc<BladeReader>>>>,
    writer: Arc<Mutex<WriterState>>,
    allocating: Arc<tokio::sync::Mutex<()>>,
    usage: Arc<Mutex<Option<(Instant, u64, u64)>>>,
    fronds: Arc<Mutex<std::collections::VecDeque<(u64, Bytes)>>>,
    /// Shard stores of servers in this process, read without the network.
    near: InProcess,
    /// Stipes readers found bad, on their way to the blades' holdfasts.
    suspects: tokio::sync::mpsc::Sender<(u32, Vec<u32>)>,
    _tasks: Arc<Tasks>,
}

/// The client's background tasks, stopped with its last clone.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Tells each blade's holdfast of the stipes where a read found a bad cell, so that it repairs
/// them before its next scrub. Best effort: the scrub finds what is not told.
async fn tell_holdfasts(
    maps: MapCache,
    peers: Peers,
    mut rx: tokio::sync::mpsc::Receiver<(u32, Vec<u32>)>,
) {
    while let Some((blade, mut stipes)) = rx.recv().await {
        stipes.truncate(blades::SUSPECT_MAX);
        let map = maps.get();
        let Some(addr) = blades::holdfast_addr(&map, blade) else {
            continue;
        };
        tracing::info!(
            "blade {blade:08x}: {} stipe(s) read with a bad cell, told to its holdfast",
            stipes.len()
        );
        let req = Request {
            op: blades::OP_BLADE_SUSPECT,
            epoch: map.epoch,
            meta: Bytes::from(
                postcard::to_stdvec(&blades::SuspectReq { blade, stipes }).unwrap_or_default(),
            ),
            data: Bytes::new(),
        };
        let r = peers.client(&addr).call(req, Duration::from_secs(10)).await;
        if let Err(e) = r.and_then(|r| r.into_result()) {
            tracing::debug!("telling blade {blade:08x}'s holdfast of bad cells: {e}");
        }
    }
}

fn io<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> Errno + '_ {
    move |e| {
        tracing::warn!("{what}: {e}");
        Errno::IO
    }
}

/// [`io`] for a data operation's reply: a holdfast that found no space on enough of its
/// blade's disks ([`sealfs_shard::STATUS_NO_SPACE`]) is ENOSPC, anything else EIO.
fn data_io(what: &str) -> impl FnOnce(RpcError) -> Errno + '_ {
    move |e| {
        tracing::warn!("{what}: {e}");
        match no_space(&e) {
            true => Errno::NOSPC,
            false => Errno::IO,
        }
    }
}

fn no_space(e: &RpcError) -> bool {
    matches!(e, RpcError::Remote { status, .. } if *status == sealfs_shard::STATUS_NO_SPACE)
}

fn entry(r: Reply) -> Result<(u64, Kind), Errno> {
    match r.err()? {
        Reply::Entry { ino, kind, .. } => Ok((ino, kind)),
        _ => Err(Errno::IO),
    }
}

fn attr(r: Reply) -> Result<Attr, Errno> {
    match r.err()? {
        Reply::Attr(a) => Ok(a),
        _ => Err(Errno::IO),
    }
}

impl Sealfs {
    /// Connects to volume `volume` of the cluster whose manager is at `manager`, waiting up to
    /// `wait` for the manager to lay out the partitions (a cluster still starting).
    pub async fn connect(
        manager: &str,
        key: ClusterKey,
        volume: &str,
        wait: Duration,
    ) -> Result<Sealfs, String> {
        Sealfs::connect_beside(manager, key, volume, wait, InProcess::default()).await
    }

    /// As [`Sealfs::connect`], in a process that also runs the servers `near`: their disks
    /// are read, and their handlers called, directly rather than over the network.
    pub async fn connect_beside(
        manager: &str,
        key: ClusterKey,
        volume: &str,
        wait: Duration,
        near: InProcess,
    ) -> Result<Sealfs, String> {
        let maps = MapCache::new(manager, key.clone());
        let start = Instant::now();
        let map = loop {
            match maps.refresh().await {
                Ok(m) if !m.partitions.is_empty() => break m,
                Ok(_) if start.elapsed() < wait => {}
                Ok(m) => {
                    let up = m
                        .servers
                        .values()
                        .filter(|s| s.state == ServerState::Up)
                        .count();
                    return Err(format!(
                        "the cluster has no metadata partitions yet ({up} servers up; the manager lays them out once enough servers are up for its replica count)"
                    ));
                }
                Err(e) if start.elapsed() >= wait => return Err(e.to_string()),
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let Some(v) = map.volumes.get(volume).cloned() else {
            let names: Vec<&String> = map.volumes.keys().collect();
            return Err(format!("no volume {volume:?} (volumes: {names:?})"));
        };
        let peers = Peers::with_in_process(key, near.servers());
        let meta = MetaClient::new(maps.clone(), peers.clone());
        let root = root_ino(v.id, map.partitions.len() as u32);
        let watch = maps.watch(Duration::from_secs(1));
        let (suspects, told) = tokio::sync::mpsc::channel(64);
        let telling = tokio::spawn(tell_holdfasts(maps.clone(), peers.clone(), told));
        let fs = Sealfs {
            maps,
            peers,
            meta,
            volume: v,
            volume_name: volume.to_string(),
            root,
            readers: Arc::default(),
            writer: Arc::default(),
            allocating: Arc::default(),
            usage: Arc::default(),
            fronds: Arc::default(),
            near,
            suspects,
            _tasks: Arc::new(Tasks(vec![watch, telling])),
        };
        let op = Op::EnsureRoot {
            ino: root,
            volume: fs.volume.id,
            perm: 0o755,
            uid: 0,
            gid: 0,
            now: 0,
        };
        let start = Instant::now();
        loop {
            match fs.meta.write(partition_of(root), &op).await {
                Ok(r) => {
                    attr(r).map_err(|e| format!("the volume's root: {e}"))?;
                    break;
                }
                Err(e) if start.elapsed() >= wait => return Err(format!("the volume's root: {e}")),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        Ok(fs)
    }

    /// The volume's root inode.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The volume.
    pub fn volume(&self) -> (&str, &Volume) {
        (&self.volume_name, &self.volume)
    }

    /// The cluster map as last seen.
    pub fn map(&self) -> Arc<ClusterMap> {
        self.maps.get()
    }

    /// The metadata router.
    pub fn meta(&self) -> &MetaClient {
        &self.meta
    }

    /// Sets how long one metadata operation may take, retries included.
    pub fn set_deadline(&mut self, d: Duration) {
        self.meta.deadline = d;
    }

    // ----- namespace -----

    /// Applies `op` on partition `p`; an error reply is an error.
    async fn cmd(&self, p: u32, op: &Op) -> Result<Reply, Errno> {
        self.meta.write(p, op).await?.err()
    }

    /// The entry `name` in `parent`.
    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<(u64, Kind), Errno> {
        check_name(name)?;
        let q = Query::Lookup {
            parent,
            name: name.to_vec(),
        };
        entry(self.meta.read(partition_of(parent), &q).await?)
    }

    /// The attributes of the child `name` of `parent`: one round trip when its inode is in
    /// its parent's partition (every file's is), two for a directory elsewhere.
    pub async fn lookup_attr(&self, parent: u64, name: &[u8]) -> Result<Attr, Errno> {
        check_name(name)?;
        let q = Query::LookupAttr {
            parent,
            name: name.to_vec(),
        };
        match self.meta.read(partition_of(parent), &q).await?.err()? {
            Reply::Attr(a) => Ok(a),
            Reply::Entry { ino, .. } => self.getattr(ino).await,
            _ => Err(Errno::IO),
        }
    }

    /// The attributes of `ino`.
    pub async fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        attr(
            self.meta
                .read(partition_of(ino), &Query::GetAttr { ino })
                .await?,
        )
    }

    /// The inode at `path` (absolute within the volume).
    pub async fn resolve(&self, path: &str) -> Result<u64, Errno> {
        let mut ino = self.root;
        for name in split(path)? {
            ino = self.lookup(ino, name.as_bytes()).await?.0;
        }
        Ok(ino)
    }

    /// The parent directory of `path` and the last name.
    pub async fn resolve_parent<'a>(&self, path: &'a str) -> Result<(u64, &'a str), Errno> {
        let parts = split(path)?;
        let Some((last, dirs)) = parts.split_last() else {
            return Err(Errno::INVAL);
        };
        let mut ino = self.root;
        for name in dirs {
            ino = self.lookup(ino, name.as_bytes()).await?.0;
        }
        Ok((ino, last))
    }

    /// Makes a file, symlink or special file: `new` says which.
    pub async fn create(&self, parent: u64, name: &[u8], new: &NewFile<'_>) -> Result<Attr, Errno> {
        let (a, _) = self.create_in(parent, name, new).await?;
        Ok(a)
    }

    /// [`Self::create`], with the parent's attributes just after the new entry was added when
    /// the inode is new (`None` when `create` found a file of that name).
    pub async fn create_in(
        &self,
        parent: u64,
        name: &[u8],
        new: &NewFile<'_>,
    ) -> Result<(Attr, Option<Attr>), Errno> {
        check_name(name)?;
        self.check_quota(0).await?;
        let op = Op::Create {
            parent,
            name: name.to_vec(),
            kind: new.kind,
            perm: new.perm,
            uid: new.uid,
            gid: new.gid,
            rdev: new.rdev,
            target: new.target.to_vec(),
            exclusive: new.exclusive,
            now: 0,
        };
        match self.meta.write(partition_of(parent), &op).await?.err()? {
            Reply::Made { attr, parent } => Ok((attr, Some(parent))),
            Reply::Entry { ino, .. } => Ok((self.getattr(ino).await?, None)),
            _ => Err(Errno::IO),
        }
    }

    /// Makes a directory: its inode in the partition its name hashes to, its entry in the
    /// parent's (two steps; a stop between them leaves a pending inode the orphan scan removes).
    pub async fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<Attr, Errno> {
        Ok(self.mkdir_in(parent, name, perm, uid, gid).await?.0)
    }

    /// [`Self::mkdir`], with the parent's attributes just after the new entry was added.
    ///
    /// The parent is not asked about first: the entry's step refuses a parent that is not a
    /// directory or holds the name already, and the inode made for nothing is then removed.
    pub async fn mkdir_in(
        &self,
        parent: u64,
        name: &[u8],
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<(Attr, Attr), Errno> {
        check_name(name)?;
        self.check_quota(0).await?;
        let child_p = dir_partition(parent, name, self.meta.partitions());
        let started = now_nanos();
        let a = attr(
            self.meta
                .write(
                    child_p,
                    &Op::MkdirAlloc {
                        parent,
                        name: name.to_vec(),
                        perm,
                        uid,
                        gid,
                        volume: self.volume.id,
                        now: 0,
                    },
                )
                .await?,
        )?;
        let link = Op::MkdirLink {
            parent,
            name: name.to_vec(),
            ino: a.ino,
            now: 0,
        };
        let e = match self
            .cmd(partition_of(parent), &second_step(started, link))
            .await
        {
            Ok(Reply::Changed { parent, .. }) => return Ok((a, parent)),
            Ok(_) => return Ok((a, self.getattr(parent).await?)),
            Err(e) => e,
        };
        self.mkdir_link_failed(a, parent, name, e).await
    }

    /// What a mkdir does when its link step (`MkdirLink` of `a`, made by `MkdirAlloc`) failed
    /// with `e`: the mkdir's answer. Public for the tests that stage the failure.
    #[doc(hidden)]
    pub async fn mkdir_link_failed(
        &self,
        a: Attr,
        parent: u64,
        name: &[u8],
        e: Errno,
    ) -> Result<(Attr, Attr), Errno> {
        if e == Errno::UNAVAILABLE {
            // The link may still be applied: the orphan scan decides by the entry.
            return Err(e);
        }
        let child_p = dir_partition(parent, name, self.meta.partitions());
        // A link applied whose answer was lost is refused (EEXIST) when sent again: the entry
        // decides what happened.
        match self.lookup(parent, name).await {
            Ok((ino, _)) if ino == a.ino => return Ok((a, self.getattr(parent).await?)),
            Ok(_) | Err(Errno::NOENT) | Err(Errno::NOTDIR) => {
                // Not linked: undo now rather than wait for the orphan scan.
                let undo = Op::Settle {
                    item: Unsettled::PendingDir {
                        ino: a.ino,
                        parent,
                        name: name.to_vec(),
                    },
                    entry_exists: false,
                    now: 0,
                };
                let _ = self.meta.write(child_p, &undo).await;
            }
            // Unknown: the orphan scan decides by the entry.
            Err(_) => {}
        }
        Err(e)
    }

    /// Removes a file's entry (the inode goes with its last link).
    pub async fn unlink(&self, parent: u64, name: &[u8]) -> Result<(), Errno> {
        self.unlink_in(parent, name).await.map(|_| ())
    }

    /// [`Self::unlink`], with the parent's attributes just after the entry was removed.
    pub async fn unlink_in(&self, parent: u64, name: &[u8]) -> Result<Option<Attr>, Errno> {
        check_name(name)?;
        let op = Op::Unlink {
            parent,
            name: name.to_vec(),
            dir: false,
            now: 0,
        };
        match self.meta.write(partition_of(parent), &op).await?.err()? {
            Reply::Changed { parent, .. } => Ok(Some(parent)),
            _ => Ok(None),
        }
    }

    /// Keeps `ino` past its last link while a mount has it open (see [`Op::Keep`]).
    pub async fn keep(&self, ino: u64) -> Result<(), Errno> {
        let op = Op::Keep { ino, now: 0 };
        self.meta.write(partition_of(ino), &op).await?.err()?;
        Ok(())
    }

    /// The mount closed `ino`: it goes if it has no link left.
    pub async fn unkeep(&self, ino: u64) -> Result<(), Errno> {
        let op = Op::Unkeep { ino };
        self.meta.write(partition_of(ino), &op).await?.err()?;
        Ok(())
    }

    /// Removes an empty directory.
    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> Result<(), Errno> {
        self.rmdir_in(parent, name).await.map(|_| ())
    }

    /// [`Self::rmdir`], with the inode of the directory removed and the parent's attributes
    /// just after.
    pub async fn rmdir_in(&self, parent: u64, name: &[u8]) -> Result<(u64, Option<Attr>), Errno> {
        check_name(name)?;
        let (ino, kind) = self.lookup(parent, name).await?;
        if kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let remote = partition_of(ino) != partition_of(parent);
        let mut op = Op::Unlink {
            parent,
            name: name.to_vec(),
            dir: true,
            now: 0,
        };
        if remote {
            let started = now_nanos();
            self.prepare_rmdir(ino, parent, name).await?;
            op = second_step(started, op);
        }
        let e = match self.cmd(partition_of(parent), &op).await {
            Ok(Reply::Changed { parent, .. }) => return Ok((ino, Some(parent))),
            Ok(_) => return Ok((ino, None)),
            Err(e) => e,
        };
        if remote && e != Errno::UNAVAILABLE {
            // The dying mark is taken back (not after UNAVAILABLE: the Unlink may still be
            // applied). That is so even when the entry no longer names the directory: another
            // client may have renamed it away meanwhile, and a dying directory whose entry is
            // gone is destroyed by the orphan scan. The cost is the other case, an Unlink
            // applied whose answer was lost and refused (ENOENT) when sent again, with its
            // Destroy not yet applied: the directory, empty, is then left with no entry.
            let _ = self
                .meta
                .write(partition_of(ino), &Op::RmdirAbort { ino })
                .await;
        }
        Err(e)
    }

    async fn prepare_rmdir(&self, ino: u64, parent: u64, name: &[u8]) -> Result<(), Errno> {
        let op = Op::RmdirPrepare {
            ino,
            parent,
            name: name.to_vec(),
            now: 0,
        };
        self.meta.write(partition_of(ino), &op).await?.err()?;
        Ok(())
    }

    /// A hard link to `ino` named `name` in `parent`.
    pub async fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr, Errno> {
        check_name(name)?;
        if partition_of(ino) == partition_of(parent) {
            let op = Op::Link {
                ino,
                parent,
                name: name.to_vec(),
                now: 0,
            };
            return attr(self.meta.write(partition_of(parent), &op).await?);
        }
        let prep = Op::LinkPrepare {
            ino,
            parent,
            name: name.to_vec(),
            now: 0,
        };
        let started = now_nanos();
        let a = attr(self.meta.write(partition_of(ino), &prep).await?)?;
        let add = Op::LinkEntry {
            ino,
            kind: a.kind,
            parent,
            name: name.to_vec(),
            now: 0,
        };
        if let Err(e) = self
            .cmd(partition_of(parent), &second_step(started, add))
            .await
        {
            if e != Errno::UNAVAILABLE {
                let undo = Op::Settle {
                    item: Unsettled::Link {
                        ino,
                        parent,
                        name: name.to_vec(),
                    },
                    entry_exists: false,
                    now: 0,
                };
                let _ = self.meta.write(partition_of(ino), &undo).await;
            }
            return Err(e);
        }
        Ok(a)
    }

    /// Renames `(sp, sn)` to `(dp, dn)` with RENAME_NOREPLACE or RENAME_EXCHANGE flags.
    pub async fn rename(
        &self,
        sp: u64,
        sn: &[u8],
        dp: u64,
        dn: &[u8],
        flags: u32,
    ) -> Result<(), Errno> {
        check_name(sn)?;
        check_name(dn)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 {
            return Err(Errno::INVAL);
        }
        let (ino, kind) = self.lookup(sp, sn).await?;
        if kind == Kind::Dir && sp != dp && self.is_ancestor(ino, dp).await? {
            return Err(Errno::INVAL);
        }
        let victim = match self.lookup(dp, dn).await {
            Ok(v) => Some(v),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(e),
        };
        if victim.is_some_and(|v| v.0 == ino) {
            return Ok(());
        }
        if flags & RENAME_EXCHANGE != 0 && partition_of(sp) != partition_of(dp) {
            // An exchange across partitions is not supported yet.
            return Err(Errno::XDEV);
        }
        // A directory that will be replaced, living in another partition than the entry that
        // names it, is made dying first (the partition of the entry cannot check it is empty).
        let mut prepared = None;
        let started = now_nanos();
        if let Some((v, Kind::Dir)) = victim {
            if flags == 0 && kind == Kind::Dir && partition_of(v) != partition_of(dp) {
                self.prepare_rmdir(v, dp, dn).await?;
                prepared = Some(v);
            }
        }
        let abort = |e: Errno| async move {
            if let Some(v) = prepared {
                if e != Errno::UNAVAILABLE {
                    let _ = self
                        .meta
                        .write(partition_of(v), &Op::RmdirAbort { ino: v })
                        .await;
                }
            }
            Err(e)
        };
        if partition_of(sp) == partition_of(dp) {
            let op = Op::Rename {
                src_parent: sp,
                src_name: sn.to_vec(),
                dst_parent: dp,
                dst_name: dn.to_vec(),
                flags,
                now: 0,
            };
            let op = match prepared {
                Some(_) => second_step(started, op),
                None => op,
            };
            return match self.cmd(partition_of(sp), &op).await {
                Ok(_) => Ok(()),
                Err(e) => abort(e).await,
            };
        }
        let lock = Op::RenameLock {
            src_parent: sp,
            src_name: sn.to_vec(),
            dst_parent: dp,
            dst_name: dn.to_vec(),
            now: 0,
        };
        let (ino, kind) = match self
            .meta
            .write(partition_of(sp), &lock)
            .await
            .and_then(entry)
        {
            Ok(e) => e,
            Err(e) => return abort(e).await,
        };
        let put = Op::RenameIn {
            ino,
            kind,
            src_parent: sp,
            dst_parent: dp,
            dst_name: dn.to_vec(),
            noreplace: flags & RENAME_NOREPLACE != 0,
            now: 0,
        };
        if let Err(e) = self.cmd(partition_of(dp), &second_step(started, put)).await {
            if e != Errno::UNAVAILABLE {
                let unlock = Op::RenameUnlock {
                    src_parent: sp,
                    src_name: sn.to_vec(),
                };
                let _ = self.meta.write(partition_of(sp), &unlock).await;
            }
            return abort(e).await;
        }
        let finish = Op::RenameFinish {
            src_parent: sp,
            src_name: sn.to_vec(),
            now: 0,
        };
        // Past this point the rename has happened; if the source cannot be told now, the
        // orphan scan finishes it (the destination exists).
        let _ = self.meta.write(partition_of(sp), &finish).await;
        Ok(())
    }

    /// Whether directory `dir` is `ino` or one of its ancestors.
    async fn is_ancestor(&self, dir: u64, mut ino: u64) -> Result<bool, Errno> {
        for _ in 0..PATH_MAX {
            if ino == dir {
                return Ok(true);
            }
            if ino == self.root {
                return Ok(false);
            }
            let parent = match self
                .meta
                .read(partition_of(ino), &Query::Parent { ino })
                .await?
                .err()?
            {
                Reply::Parent(p) => p,
                _ => return Err(Errno::IO),
            };
            if parent == ino {
                return Ok(false);
            }
            ino = parent;
        }
        Err(Errno::IO)
    }

    /// Entries of directory `ino` after cookie `after` (0: from the start), at most `max`.
    pub async fn readdir(&self, ino: u64, after: u64, max: u32) -> Result<Vec<DirEntry>, Errno> {
        match self
            .meta
            .read(partition_of(ino), &Query::ReadDir { ino, after, max })
            .await?
            .err()?
        {
            Reply::Entries(e) => Ok(e),
            _ => Err(Errno::IO),
        }
    }

    /// As [`Self::readdir`], with the attributes of each entry whose inode is in the
    /// directory's partition (a file's, unless it came by a rename or link from another); the
    /// others' are for the caller to ask ([`Self::getattr`]).
    pub async fn readdir_plus(
        &self,
        ino: u64,
        after: u64,
        max: u32,
    ) -> Result<Vec<(DirEntry, Option<Attr>)>, Errno> {
        let q = Query::ReadDirPlus { ino, after, max };
        match self.meta.read(partition_of(ino), &q).await?.err()? {
            Reply::EntriesPlus(e) => Ok(e),
            _ => Err(Errno::IO),
        }
    }

    /// Every entry of directory `ino`.
    pub async fn readdir_all(&self, ino: u64) -> Result<Vec<DirEntry>, Errno> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let batch = self
                .readdir(ino, after, sealfs_meta::READDIR_MAX as u32)
                .await?;
            let Some(last) = batch.last() else {
                return Ok(out);
            };
            after = last.cookie;
            out.extend(batch);
        }
    }

    /// A symlink's target.
    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        match self
            .meta
            .read(partition_of(ino), &Query::ReadLink { ino })
            .await?
            .err()?
        {
            Reply::Target(t) => Ok(t),
            _ => Err(Errno::IO),
        }
    }

    /// Changes attributes (a smaller size truncates).
    pub async fn setattr(&self, ino: u64, set: SetAttr) -> Result<Attr, Errno> {
        if let Some(size) = set.size {
            let now = self.getattr(ino).await?.size;
            if size > now {
                self.check_quota(size - now).await?;
            }
        }
        attr(
            self.meta
                .write(partition_of(ino), &Op::SetAttr { ino, set, now: 0 })
                .await?,
        )
    }

    /// An extended attribute.
    pub async fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, Errno> {
        let q = Query::GetXattr {
            ino,
            name: name.to_vec(),
        };
        match self.meta.read(partition_of(ino), &q).await?.err()? {
            Reply::Value(v) => Ok(v),
            _ => Err(Errno::IO),
        }
    }

    /// The names of the extended attributes.
    pub async fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, Errno> {
        match self
            .meta
            .read(partition_of(ino), &Query::ListXattr { ino })
            .await?
            .err()?
        {
            Reply::Names(n) => Ok(n),
            _ => Err(Errno::IO),
        }
    }

    /// Sets an extended attribute (XATTR_CREATE / XATTR_REPLACE flags).
    pub async fn setxattr(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: u32,
    ) -> Result<(), Errno> {
        let op = Op::SetXattr {
            ino,
            name: name.to_vec(),
            value: value.to_vec(),
            flags,
            now: 0,
        };
        self.meta.write(partition_of(ino), &op).await?.err()?;
        Ok(())
    }

    /// Removes an extended attribute.
    pub async fn removexattr(&self, ino: u64, name: &[u8]) -> Result<(), Errno> {
        let op = Op::RemoveXattr {
            ino,
            name: name.to_vec(),
            now: 0,
        };
        self.meta.write(partition_of(ino), &op).await?.err()?;
        Ok(())
    }

    /// Bytes and inodes the volume uses, summed over all partitions.
    pub async fn usage(&self) -> Result<(u64, u64), Errno> {
        let parts = self.meta.partitions();
        let replies: Vec<Reply> = stream::iter(0..parts)
            .map(|p| async move { self.meta.read(p, &Query::Usage).await })
            .buffer_unordered(16)
            .try_collect()
            .await?;
        let (mut bytes, mut inodes) = (0, 0);
        for r in replies {
            if let Reply::Usage(list) = r {
                for (v, b, i) in list {
                    if v == self.volume.id {
                        bytes += b;
                        inodes += i;
                    }
                }
            }
        }
        *self.usage.lock().expect("usage") = Some((Instant::now(), bytes, inodes));
        Ok((bytes, inodes))
    }

    /// The volume's capacity and use.
    pub async fn statfs(&self) -> Result<VolumeStat, Errno> {
        let (used, inodes) = self.usage().await?;
        let map = self.maps.get();
        let (k, n) = (self.volume.k as u64, (self.volume.k + self.volume.m) as u64);
        let raw: u64 = map
            .servers
            .values()
            .filter(|s| s.state == ServerState::Up)
            .flat_map(|s| s.disks.iter().map(|d| d.capacity))
            .sum();
        let raw_free: u64 = map
            .servers
            .values()
            .filter(|s| s.state == ServerState::Up)
            .flat_map(|s| s.disks.iter().map(|d| d.free))
            .sum();
        let usable = raw / n.max(1) * k;
        let usable_free = raw_free / n.max(1) * k;
        let (capacity, free) = if self.volume.quota > 0 {
            (
                self.volume.quota,
                self.volume.quota.saturating_sub(used).min(usable_free),
            )
        } else {
            (usable, usable_free)
        };
        Ok(VolumeStat {
            capacity,
            used,
            free,
            inodes,
        })
    }

    /// Fails with EDQUOT if `more` bytes would take the volume past its quota (usage is
    /// re-read at most every second, so concurrent writers may pass it by that much).
    pub async fn check_quota(&self, more: u64) -> Result<(), Errno> {
        if self.volume.quota == 0 {
            return Ok(());
        }
        let cached = *self.usage.lock().expect("usage");
        let used = match cached {
            Some((t, b, _)) if t.elapsed() < Duration::from_secs(1) => b,
            _ => self.usage().await?.0,
        };
        if used.saturating_add(more) > self.volume.quota {
            return Err(Errno::DQUOT);
        }
        Ok(())
    }

    // ----- data -----

    /// Open blades of the volume's profile whose holdfast is up, allocating some when there
    /// are fewer than wanted. Blobs and files' fronds go to separate blades (`blobs`): a
    /// blade with blobs is never reclaimed.
    async fn writable_blades(&self, blobs: bool) -> Result<Vec<u32>, Errno> {
        let v = &self.volume;
        let sealed = self.writer.lock().expect("writer").sealed.clone();
        let pick = |map: &ClusterMap| -> Vec<u32> {
            map.blades
                .iter()
                .filter(|(_, b)| b.k == v.k && b.m == v.m && b.w == v.w)
                .filter(|(id, b)| {
                    b.state == BladeState::Open && b.blobs == blobs && !sealed.contains(*id)
                })
                // Files' data goes to blades that can be reclaimed once it is deleted.
                .filter(|(id, _)| blobs || map.reclaim_from.is_none_or(|f| **id >= f))
                .filter(|(_, b)| {
                    map.servers
                        .get(&b.shards[0].server)
                        .is_some_and(|s| s.state == ServerState::Up)
                })
                .map(|(id, _)| *id)
                .collect()
        };
        let map = self.maps.get();
        // Blades the map no longer has open need no entry of their own: the set stays as
        // small as the blades being sealed.
        self.writer.lock().expect("writer").sealed.retain(|b| {
            map.blades
                .get(b)
                .is_some_and(|e| e.state == BladeState::Open)
        });
        let have = pick(&map);
        if have.len() >= BLADES_WANTED {
            return Ok(have);
        }
        let _one = self.allocating.lock().await;
        let map = self.maps.refresh().await.map_err(io("map"))?;
        let mut have = pick(&map);
        let up = map
            .servers
            .values()
            .filter(|s| s.state == ServerState::Up)
            .count();
        while have.len() < BLADES_WANTED.min(up.max(1)) {
            match self.maps.manager().allocate(v.k, v.m, v.w).await {
                Ok((id, _)) => have.push(id),
                Err(e) => {
                    if have.is_empty() {
                        tracing::warn!("no blade to write to: {e}");
                        return Err(Errno::NOSPC);
                    }
                    break;
                }
            }
        }
        self.maps.refresh().await.map_err(io("map"))?;
        Ok(have)
    }

    /// The blades to try for the next frond, best first: not avoided, lowest expected wait
    /// (latency times the appends in flight), turning.
    fn blade_order(&self, blades: &[u32]) -> Vec<u32> {
        let mut w = self.writer.lock().expect("writer");
        let now = Instant::now();
        w.avoid.retain(|_, t| *t > now);
        w.turn = w.turn.wrapping_add(1);
        let turn = w.turn;
        let mut order: Vec<(bool, u64, usize, u32)> = blades
            .iter()
            .enumerate()
            .map(|(i, b)| {
                // A latency not measured for a while is tried again: one slow append (a blade
                // opening) must not keep a blade out for good.
                let lat = w
                    .latency
                    .get(b)
                    .filter(|(_, at)| now.duration_since(*at) < LATENCY_STALE)
                    .map_or(0.0, |(l, _)| *l);
                let queued = w.inflight.get(b).copied().unwrap_or(0) as f64;
                // Waits within 2x count as equal, so that load turns over the blades.
                let bucket = (lat.max(1.0) * (1.0 + queued)).log2() as u64;
                (
                    w.avoid.contains_key(b),
                    bucket,
                    (i + turn) % blades.len().max(1),
                    *b,
                )
            })
            .collect();
        order.sort_unstable();
        order.into_iter().map(|o| o.3).collect()
    }

    fn holdfast_addr(&self, blade: u32) -> Option<String> {
        blades::holdfast_addr(&self.maps.get(), blade)
    }

    /// Appends one frond of `data` (a blob's if `blob`); tries other blades when a holdfast
    /// fails. ENOSPC when none took it and one of them had no room on enough of its disks.
    async fn append(&self, data: &[u8], blob: bool) -> Result<Reference, Errno> {
        let encoded = kelp::frond::encode(data).map_err(io("encode"))?;
        let mut last = Errno::IO;
        for attempt in 0..3 {
            let blades = self.writable_blades(blob).await?;
            for blade in self.blade_order(&blades) {
                let Some(addr) = self.holdfast_addr(blade) else {
                    continue;
                };
                let req = Request {
                    op: OP_APPEND,
                    epoch: self.maps.get().epoch,
                    meta: Bytes::from(
                        postcard::to_stdvec(&AppendReq { blade, blob }).unwrap_or_default(),
                    ),
                    data: encoded.clone(),
                };
                let t = Instant::now();
                let queued = Queued::new(&self.writer, blade);
                let r = self
                    .peers
                    .client(&addr)
                    .call(req, Duration::from_secs(30))
                    .await
                    .and_then(|r| r.into_result());
                drop(queued);
                let mut w = self.writer.lock().expect("writer");
                match r.map(|r| postcard::from_bytes::<Appended>(&r.meta)) {
                    Ok(Ok(a)) => {
                        let now = Instant::now();
                        let us = now.duration_since(t).as_micros() as f64;
                        let e = w.latency.entry(blade).or_insert((us, now));
                        *e = (0.8 * e.0 + 0.2 * us, now);
                        return Ok(Reference {
                            address: Address(a.address),
                            len: a.len,
                            seq: a.seq,
                        });
                    }
                    Ok(Err(e)) => tracing::warn!("append reply from {addr}: {e}"),
                    Err(RpcError::Remote { status, .. }) if status == STATUS_SEALED => {
                        // Full: the next call of writable_blades leaves it out.
                        w.sealed.insert(blade);
                    }
                    Err(e) => {
                        tracing::debug!("append to blade {blade:08x} at {addr}: {e}");
                        w.avoid.insert(blade, Instant::now() + AVOID);
                        // ENOSPC once any blade had no room (and none took the frond).
                        if no_space(&e) {
                            last = Errno::NOSPC;
                        }
                    }
                }
            }
            let _ = self.maps.refresh().await;
            tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
        }
        Err(last)
    }

    /// STALE if `blade` was reclaimed or is being reclaimed (its appends are lost: they must
    /// be written again), as the manager's map now has it; else `e`.
    async fn reclaimed_or(&self, blade: u32, e: Errno) -> Errno {
        match self.maps.refresh().await {
            Ok(map) => match map.blades.get(&blade) {
                Some(b) if b.state != BladeState::Deleting => e,
                _ => Errno::STALE,
            },
            Err(_) => e,
        }
    }

    async fn sync_blades(&self, blades: &BTreeSet<u32>) -> Result<(), Errno> {
        stream::iter(blades.iter().copied())
            .map(|blade| async move {
                let Some(addr) = self.holdfast_addr(blade) else {
                    return Err(self.reclaimed_or(blade, Errno::IO).await);
                };
                let req = Request {
                    op: OP_BLADE_SYNC,
                    epoch: self.maps.get().epoch,
                    meta: Bytes::from(postcard::to_stdvec(&BladeReq { blade }).unwrap_or_default()),
                    data: Bytes::new(),
                };
                let r = self
                    .peers
                    .client(&addr)
                    .call(req, Duration::from_secs(30))
                    .await
                    .and_then(|r| r.into_result());
                match r {
                    Ok(_) => Ok(()),
                    Err(e) => Err(self.reclaimed_or(blade, data_io("sync")(e)).await),
                }
            })
            .buffer_unordered(8)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Writes `data` at `offset` of file `ino`: fronds of up to 2 MiB appended (several in
    /// flight), synced on k + w shards, then recorded in the file's metadata (synced by a
    /// majority). When it returns, the bytes survive the loss of power of every machine.
    pub async fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<Attr, Errno> {
        self.write_ranges(ino, &[(offset, data)]).await
    }

    /// Writes several ranges of file `ino` at once, later ranges over earlier ones where they
    /// overlap. Small ranges share fronds (each extent names its place in its frond), so a
    /// burst of scattered small writes costs one append, one sync per blade and one metadata
    /// command, not one of each per range. Durable when it returns, as [`Sealfs::write`].
    pub async fn write_ranges(&self, ino: u64, ranges: &[(u64, &[u8])]) -> Result<Attr, Errno> {
        self.write_ranges_then(ino, ranges, None).await
    }

    /// [`Sealfs::write_ranges`], then sets `then` (times, owner, mode; not a size) in the
    /// same metadata command: a flush and the utimens that waited for it cost one Raft write.
    pub async fn write_ranges_then(
        &self,
        ino: u64,
        ranges: &[(u64, &[u8])],
        then: Option<SetAttr>,
    ) -> Result<Attr, Errno> {
        if then.as_ref().is_some_and(|t| t.size.is_some()) {
            return Err(Errno::INVAL);
        }
        if ranges.iter().all(|r| r.1.is_empty()) {
            return match then {
                Some(set) => self.setattr(ino, set).await,
                None => self.getattr(ino).await,
            };
        }
        let staged = self.stage_ranges(ino, ranges).await?;
        match self.commit_staged(ino, staged, then.clone()).await {
            // A blade of the fronds was reclaimed before they were recorded (they took
            // longer than its grace): append them again, to open blades.
            Err(Errno::STALE) => {
                tracing::warn!("write of file {ino}: a blade was reclaimed; writing again");
                let staged = self.stage_ranges(ino, ranges).await?;
                self.commit_staged(ino, staged, then).await
            }
            r => r,
        }
    }

    /// The first half of [`Sealfs::write_ranges`]: the ranges appended as fronds (or kept
    /// inline), neither synced nor recorded. [`Sealfs::commit_staged`] makes them the file's;
    /// until then the file does not change. A caller may stage the next ranges while the
    /// last ones commit, as long as it commits them in order.
    pub async fn stage_ranges(&self, ino: u64, ranges: &[(u64, &[u8])]) -> Result<Staged, Errno> {
        let total: usize = ranges.iter().map(|r| r.1.len()).sum();
        for (offset, data) in ranges {
            offset.checked_add(data.len() as u64).ok_or(Errno::FBIG)?;
        }
        self.check_quota(total as u64).await?;
        if ranges
            .iter()
            .all(|(o, d)| o + d.len() as u64 <= sealfs_meta::INLINE_FILE_BYTES)
        {
            // Within the file's first bytes: kept in the extents themselves, one command.
            let extents = ranges
                .iter()
                .filter(|(_, d)| !d.is_empty())
                .map(|(o, d)| Extent::inline(*o, d))
                .collect();
            return Ok(Staged {
                ino,
                extents,
                blades: BTreeSet::new(),
                total,
            });
        }
        let fronds = pack(ranges);
        let started = std::time::Instant::now();
        let extents: Vec<Vec<Extent>> = stream::iter(fronds)
            .map(|(bytes, pieces)| async move {
                let r = self.append(&bytes, false).await?;
                Ok::<Vec<Extent>, Errno>(
                    pieces
                        .into_iter()
                        .map(|(offset, skip, len)| Extent {
                            offset,
                            len: len as u64,
                            blade: r.address.blade(),
                            address: r.address.0,
                            frond_len: r.len,
                            seq: r.seq,
                            skip,
                            inline: Vec::new(),
                            inline_crc: 0,
                        })
                        .collect(),
                )
            })
            .buffered(FRONDS_IN_FLIGHT)
            .try_collect()
            .await?;
        let extents: Vec<Extent> = extents.into_iter().flatten().collect();
        tracing::debug!(
            "write of file {ino}: {total} bytes appended in {:?}",
            started.elapsed()
        );
        let blades = extents.iter().map(|e| e.blade).collect();
        Ok(Staged {
            ino,
            extents,
            blades,
            total,
        })
    }

    /// The second half of [`Sealfs::write_ranges_then`]: the staged fronds synced on k + w
    /// shards, then recorded in the file's metadata with `then` (synced by a majority).
    pub async fn commit_staged(
        &self,
        ino: u64,
        staged: Staged,
        then: Option<SetAttr>,
    ) -> Result<Attr, Errno> {
        if staged.ino != ino || then.as_ref().is_some_and(|t| t.size.is_some()) {
            return Err(Errno::INVAL);
        }
        let started = std::time::Instant::now();
        self.sync_blades(&staged.blades).await?;
        let synced = started.elapsed();
        let a = self
            .record_extents(ino, staged.extents, staged.total, then)
            .await?;
        tracing::debug!(
            "write of file {ino}: synced in {synced:?}, recorded in {:?}",
            started.elapsed() - synced
        );
        Ok(a)
    }

    /// Records `extents` (`total` bytes) as file `ino`'s, then sets `then`, synced by a Raft
    /// majority.
    async fn record_extents(
        &self,
        ino: u64,
        extents: Vec<Extent>,
        total: usize,
        mut then: Option<SetAttr>,
    ) -> Result<Attr, Errno> {
        // One command per 512 extents (1 GiB of whole fronds), to keep commands small; the
        // attributes go with the last.
        let mut last = None;
        let batches = extents.chunks(512);
        let n = batches.len();
        for (i, batch) in batches.enumerate() {
            let op = Op::Write {
                ino,
                extents: batch.to_vec(),
                now: 0,
                then: if i + 1 == n { then.take() } else { None },
            };
            last = Some(attr(self.meta.write(partition_of(ino), &op).await?)?);
        }
        // Count this write in the cached usage until it is read again (an overwrite is
        // counted too: the quota errs on the safe side for at most a second).
        if let Some(u) = self.usage.lock().expect("usage").as_mut() {
            u.1 = u.1.saturating_add(total as u64);
        }
        last.ok_or(Errno::IO)
    }

    // ----- blobs (the kelp blob API) -----

    /// Stores `data` (up to 64 MiB) as one frond, synced on k + w shards; returns where it is.
    pub async fn blob_put(&self, data: &[u8]) -> Result<Reference, Errno> {
        if data.len() > kelp::frond::FROND_DATA_BYTES_MAX {
            return Err(Errno::FBIG);
        }
        let r = self.append(data, true).await?;
        self.sync_blades(&[r.address.blade()].into()).await?;
        Ok(r)
    }

    /// Reads the blob at `r` (its BLAKE3 checked).
    pub async fn blob_get(&self, r: Reference) -> Result<Bytes, Errno> {
        self.reader(r.address.blade())?
            .read_frond(r)
            .await
            .map_err(|e| match e {
                kelp::KelpError::Invalid(_) | kelp::KelpError::Frond { .. } => Errno::INVAL,
                e => io("blob read")(e),
            })
    }

    /// Replaces the blob at `r` in place with `data` of the same length; returns the new
    /// reference (a new sequence), synced.
    pub async fn blob_update(&self, r: Reference, data: &[u8]) -> Result<Reference, Errno> {
        if data.len() != r.len as usize {
            return Err(Errno::INVAL);
        }
        let blade = r.address.blade();
        let addr = self.holdfast_addr(blade).ok_or(Errno::INVAL)?;
        let encoded = kelp::frond::encode(data).map_err(io("encode"))?;
        let u = UpdateReq {
            blade,
            address: r.address.0,
            len: r.len,
            seq: r.seq,
        };
        let req = Request {
            op: OP_UPDATE,
            epoch: self.maps.get().epoch,
            meta: Bytes::from(postcard::to_stdvec(&u).map_err(io("encode"))?),
            data: encoded,
        };
        let resp = self
            .peers
            .client(&addr)
            .call(req, Duration::from_secs(30))
            .await
            .map_err(io("update"))?;
        if resp.status == sealfs_rpc::Status::BadRequest as u16 {
            tracing::warn!(
                "blob update refused: {}",
                String::from_utf8_lossy(&resp.meta)
            );
            return Err(Errno::INVAL);
        }
        let resp = resp.into_result().map_err(data_io("update"))?;
        let a: Appended = postcard::from_bytes(&resp.meta).map_err(io("update reply"))?;
        self.sync_blades(&[blade].into()).await?;
        Ok(Reference {
            address: Address(a.address),
            len: a.len,
            seq: a.seq,
        })
    }

    fn reader(&self, blade: u32) -> Result<Arc<BladeReader>, Errno> {
        if let Some(r) = self.readers.lock().expect("readers").get(&blade) {
            return Ok(r.clone());
        }
        let map = self.maps.get();
        let layout =
            blades::layout_for(&map, blade, &self.near, &self.peers).map_err(io("layout"))?;
        let suspects = self.suspects.clone();
        let r = Arc::new(
            BladeReader::new(layout, HedgeConfig::default()).with_suspect(Arc::new(
                move |blade, stipes| {
                    // Dropped when many are waiting: the scrub finds them.
                    let _ = suspects.try_send((blade, stipes));
                },
            )),
        );
        self.readers
            .lock()
            .expect("readers")
            .insert(blade, r.clone());
        Ok(r)
    }

    async fn read_extent(&self, e: &Extent, from: u64, to: u64) -> Result<Bytes, Errno> {
        if e.is_inline() {
            if !e.inline_intact() {
                tracing::warn!(
                    "the inline bytes at offset {} do not match their CRC-32C",
                    e.offset
                );
                return Err(Errno::IO);
            }
            let skip = (e.skip as u64 + (from - e.offset)) as usize;
            let end = skip + (to - from) as usize;
            return e
                .inline
                .get(skip..end)
                .map(Bytes::copy_from_slice)
                .ok_or(Errno::IO);
        }
        let reader = match self.reader(e.blade) {
            Ok(r) => r,
            Err(_) => {
                let _ = self.maps.refresh().await;
                self.reader(e.blade)?
            }
        };
        let skip = (e.skip as u64 + (from - e.offset)) as usize;
        let len = (to - from) as usize;
        // Whole fronds are read and their BLAKE3 checked; the last few are kept, so that a
        // file read in small pieces (as the kernel does) reads each frond once.
        let cached = self
            .fronds
            .lock()
            .expect("frond cache")
            .iter()
            .find(|(a, _)| *a == e.address)
            .map(|(_, b)| b.clone());
        let r = Reference {
            address: Address(e.address),
            len: e.frond_len,
            seq: e.seq,
        };
        let frond_len = e.frond_len as usize;
        if cached.is_none()
            && skip > 0
            && frond_len >= PARTIAL_READ_FROND_MIN
            && len * 4 < frond_len
        {
            // A small piece from the middle of a large frond (random reads): just its cells,
            // each checked by its CRC (DESIGN 3.4), rather than the whole frond.
            return self.read_piece(&reader, r, skip, len).await;
        }
        let data = match cached {
            Some(d) => d,
            None => {
                let d = reader.read_frond(r).await.map_err(io("read"))?;
                let mut c = self.fronds.lock().expect("frond cache");
                if c.len() >= FROND_CACHE {
                    c.pop_front();
                }
                c.push_back((e.address, d.clone()));
                d
            }
        };
        if skip + len > data.len() {
            return Err(Errno::IO);
        }
        Ok(data.slice(skip..skip + len))
    }

    /// Reads `len` bytes of frond `r`'s data from byte `skip` on, without the rest of the frond.
    async fn read_piece(
        &self,
        reader: &BladeReader,
        r: Reference,
        skip: usize,
        len: usize,
    ) -> Result<Bytes, Errno> {
        if skip + len > r.len as usize {
            return Err(Errno::IO);
        }
        let p = reader.layout().profile;
        let stipe_bytes = p.stipe_payload_bytes() as u64;
        let frond_start = r.address.byte_offset();
        let start = frond_start + kelp::frond::FROND_HEADER_BYTES as u64 + skip as u64;
        // The reference's sequence is that of the frond's first stipe; later stipes were
        // written whole by the frond's own append.
        let seq = if start / stipe_bytes == frond_start / stipe_bytes {
            r.seq
        } else {
            1
        };
        reader.read_range(start, len, seq).await.map_err(io("read"))
    }

    /// Reads up to `len` bytes of file `ino` at `offset` (fewer at the end of the file; holes
    /// read as zeros).
    pub async fn read(&self, ino: u64, offset: u64, len: u64) -> Result<Vec<u8>, Errno> {
        Ok(self.read_sized(ino, offset, len).await?.0)
    }

    /// As [`Sealfs::read`], with the file's size as the read saw it.
    pub async fn read_sized(
        &self,
        ino: u64,
        offset: u64,
        len: u64,
    ) -> Result<(Vec<u8>, u64), Errno> {
        let (extents, size) = self.extents_in(ino, offset, len).await?;
        Ok((self.read_extents(&extents, size, offset, len).await?, size))
    }

    /// Every extent of file `ino` and its size (what a mount keeps while a file is open).
    pub async fn extents(&self, ino: u64) -> Result<(Vec<Extent>, u64), Errno> {
        self.extents_in(ino, 0, u64::MAX).await
    }

    /// The extents of file `ino` that reach into `len` bytes at `offset`, and its size (FBIG:
    /// more than one reply carries).
    pub async fn extents_in(
        &self,
        ino: u64,
        offset: u64,
        len: u64,
    ) -> Result<(Vec<Extent>, u64), Errno> {
        let q = Query::Extents { ino, offset, len };
        match self.meta.read(partition_of(ino), &q).await?.err()? {
            Reply::Extents(e, s) => Ok((e, s)),
            _ => Err(Errno::IO),
        }
    }

    /// Copies `n` bytes of file `from` at `from_off` to file `to` at `to_off` by reading and
    /// writing them, a few MiB at a time; returns the destination's size after.
    async fn copy_bytes(
        &self,
        from: u64,
        from_off: u64,
        to: u64,
        to_off: u64,
        n: u64,
    ) -> Result<u64, Errno> {
        const CHUNK: u64 = 8 << 20;
        let mut size = self.getattr(to).await?.size;
        let mut done = 0;
        while done < n {
            let want = CHUNK.min(n - done);
            let bytes = self.read(from, from_off + done, want).await?;
            if bytes.is_empty() {
                break;
            }
            size = self.write(to, to_off + done, &bytes).await?.size;
            done += bytes.len() as u64;
        }
        Ok(size)
    }

    /// Copies `len` bytes of file `from` at `from_off` to file `to` at `to_off` without
    /// moving them: the copy's extents name the same fronds (kelp never rewrites a frond,
    /// and a blade is reclaimed only once no extent names it, so sharing one is safe), and
    /// a hole in the source is written as zeros. One metadata command for the whole copy
    /// however large; the bytes are copied instead when a blade of the source is being
    /// reclaimed. Stops at the source's end; returns the bytes copied. FBIG if the source
    /// range has more extents than a reply carries.
    pub async fn copy_range(
        &self,
        from: u64,
        from_off: u64,
        to: u64,
        to_off: u64,
        len: u64,
    ) -> Result<u64, Errno> {
        let q = Query::Extents {
            ino: from,
            offset: from_off,
            len,
        };
        let (extents, size) = match self.meta.read(partition_of(from), &q).await?.err()? {
            Reply::Extents(e, s) => (e, s),
            _ => return Err(Errno::IO),
        };
        let end = from_off.saturating_add(len).min(size);
        if end <= from_off {
            return Ok(0);
        }
        let n = end - from_off;
        let stop = to_off.checked_add(n).ok_or(Errno::FBIG)?;
        self.check_quota(n).await?;
        let (copies, holes) = shift_extents(&extents, from_off, end, to_off)?;
        // A hole over bytes the destination has must be zeros there; past its end it is left
        // a hole (the size is set below).
        let was = self.getattr(to).await?.size;
        let holes: Vec<(u64, u64)> = holes
            .into_iter()
            .filter(|(at, _)| *at < was)
            .map(|(at, l)| (at, l.min(was - at)))
            .collect();
        if holes.iter().map(|h| h.1).sum::<u64>() > COPY_ZEROS_MAX {
            return Err(Errno::FBIG);
        }
        if !holes.is_empty() {
            let zeros: Vec<Vec<u8>> = holes.iter().map(|(_, l)| vec![0u8; *l as usize]).collect();
            let ranges: Vec<(u64, &[u8])> = holes
                .iter()
                .zip(&zeros)
                .map(|((at, _), z)| (*at, z.as_slice()))
                .collect();
            self.write_ranges(to, &ranges).await?;
        }
        let mut size = was;
        if !copies.is_empty() {
            size = match self.record_extents(to, copies, n as usize, None).await {
                Ok(a) => a.size,
                // A blade of the source is being reclaimed (its live extents take no new
                // references): the bytes are copied instead.
                Err(Errno::STALE) => self.copy_bytes(from, from_off, to, to_off, n).await?,
                Err(e) => return Err(e),
            };
        }
        if size < stop {
            let grow = SetAttr {
                size: Some(stop),
                ..Default::default()
            };
            self.setattr(to, grow).await?;
        }
        Ok(n)
    }

    /// Reads `[offset, offset + len)` given the extents covering it and the file's size.
    pub async fn read_extents(
        &self,
        extents: &[Extent],
        size: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, Errno> {
        let end = offset.saturating_add(len).min(size);
        if end <= offset {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        // Extents come sorted by offset, none overlapping another (as a partition gives
        // them): skip to the first that reaches past `offset` instead of looking at each of a
        // file's thousands for every 4 KiB read.
        debug_assert!(extents
            .windows(2)
            .all(|w| w[0].offset + w[0].len <= w[1].offset));
        let first = extents.partition_point(|e| e.offset + e.len <= offset);
        // By index, not a copy of each extent (a small file's carries its bytes).
        let parts: Vec<(usize, u64, u64)> = extents[first..]
            .iter()
            .enumerate()
            .take_while(|(_, e)| e.offset < end)
            .filter_map(|(i, e)| {
                let a = e.offset.max(offset);
                let b = (e.offset + e.len).min(end);
                (a < b).then_some((first + i, a, b))
            })
            .collect();
        let got: Vec<(u64, Bytes)> = stream::iter(parts)
            .map(|(i, a, b)| async move {
                Ok::<_, Errno>((a, self.read_extent(&extents[i], a, b).await?))
            })
            .buffered(FRONDS_IN_FLIGHT)
            .try_collect()
            .await?;
        for (a, bytes) in got {
            let at = (a - offset) as usize;
            out[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(out)
    }
}

/// A frond's bytes and the pieces in it: (file offset, offset in the frond, length).
type Packed = (Vec<u8>, Vec<(u64, u32, usize)>);

/// Lays `ranges` out as fronds of at most [`FROND_BYTES`]: a range longer than that is cut,
/// shorter ones share a frond, in order (so that a later range still lands after an earlier
/// one it overlaps, in the order of the extents).
fn pack(ranges: &[(u64, &[u8])]) -> Vec<Packed> {
    let mut out: Vec<Packed> = Vec::new();
    for (offset, data) in ranges {
        for (i, piece) in data.chunks(FROND_BYTES).enumerate() {
            let at = offset + (i * FROND_BYTES) as u64;
            match out.last_mut() {
                Some((bytes, pieces)) if bytes.len() + piece.len() <= FROND_BYTES => {
                    pieces.push((at, bytes.len() as u32, piece.len()));
                    bytes.extend_from_slice(piece);
                }
                _ => out.push((piece.to_vec(), vec![(at, 0, piece.len())])),
            }
        }
    }
    out
}

/// A blob reference as text: `ADDRESS:LEN:SEQ` in hex (the address holds the blade).
pub fn format_ref(r: Reference) -> String {
    format!("{:016x}:{:x}:{:x}", r.address.0, r.len, r.seq)
}

/// Parses [`format_ref`]'s text.
pub fn parse_ref(s: &str) -> Result<Reference, String> {
    let bad =
        || format!("blob reference {s:?}: expected ADDRESS:LEN:SEQ in hex, as blob put prints");
    let parts: Vec<&str> = s.trim().split(':').collect();
    let [a, l, q] = parts.as_slice() else {
        return Err(bad());
    };
    Ok(Reference {
        address: Address(u64::from_str_radix(a, 16).map_err(|_| bad())?),
        len: u32::from_str_radix(l, 16).map_err(|_| bad())?,
        seq: u32::from_str_radix(q, 16).map_err(|_| bad())?,
    })
}

/// The names of an absolute path within a volume; `.` parts dropped, `..` refused.
pub fn split(path: &str) -> Result<Vec<&str>, Errno> {
    if path.len() > PATH_MAX {
        return Err(Errno::NAMETOOLONG);
    }
    if path.contains('\0') {
        return Err(Errno::INVAL);
    }
    let mut out = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(Errno::INVAL),
            p => {
                check_name(p.as_bytes())?;
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// The most zeros a copy writes for the holes of its source over the destination's bytes;
/// past it the copy is refused (FBIG) and the caller copies the bytes itself.
pub const COPY_ZEROS_MAX: u64 = 64 << 20;

/// A copy's extents and its holes (destination offset, length).
pub type Shifted = (Vec<Extent>, Vec<(u64, u64)>);

/// The extents of source bytes `[from, end)` moved to start at `to` (cut at the range's
/// edges; an inline extent keeps only its bytes in range), and the holes between them as
/// (destination offset, length). IO if an extent (from a reply) names bytes it cannot hold.
pub fn shift_extents(extents: &[Extent], from: u64, end: u64, to: u64) -> Result<Shifted, Errno> {
    let mut copies = Vec::new();
    let mut holes = Vec::new();
    let mut at = from;
    let mut sorted: Vec<&Extent> = extents.iter().collect();
    sorted.sort_by_key(|e| e.offset);
    for e in sorted {
        let a = e.offset.max(at);
        let b = e.offset.saturating_add(e.len).min(end);
        if a >= b {
            continue;
        }
        if a > at {
            holes.push((to + (at - from), a - at));
        }
        let skip = e.skip as u64 + (a - e.offset);
        let offset = to + (a - from);
        copies.push(if e.is_inline() {
            let bytes = usize::try_from(skip)
                .ok()
                .and_then(|s| e.inline.get(s..s + (b - a) as usize))
                .ok_or(Errno::IO)?;
            Extent::inline(offset, bytes)
        } else {
            Extent {
                offset,
                len: b - a,
                skip: u32::try_from(skip).map_err(|_| Errno::IO)?,
                inline: Vec::new(),
                inline_crc: 0,
                ..e.clone()
            }
        });
        at = b;
    }
    if at < end {
        holes.push((to + (at - from), end - at));
    }
    Ok((copies, holes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frond(offset: u64, len: u64, skip: u32) -> Extent {
        Extent {
            offset,
            len,
            blade: 3,
            address: 4096,
            frond_len: 1 << 20,
            seq: 9,
            skip,
            inline: Vec::new(),
            inline_crc: 0,
        }
    }

    #[test]
    fn shifted_extents_name_the_same_bytes_and_holes_are_found() {
        // Source: frond bytes at [100, 300), a hole [300, 400), inline "abcdef" at [400, 406).
        let src = vec![Extent::inline(400, b"abcdef"), frond(100, 200, 50)];
        let (copies, holes) = shift_extents(&src, 150, 404, 1000).unwrap();
        assert_eq!(copies.len(), 2);
        let f = &copies[0];
        assert_eq!(
            (f.offset, f.len, f.skip, f.blade, f.address),
            (1000, 150, 100, 3, 4096)
        );
        let i = &copies[1];
        assert_eq!((i.offset, i.inline.as_slice()), (1250, &b"abcd"[..]));
        assert!(i.inline_intact());
        assert_eq!(holes, vec![(1150, 100)]);
        // A range that starts and ends in holes.
        let (copies, holes) = shift_extents(&src, 0, 500, 0).unwrap();
        assert_eq!(copies.len(), 2);
        assert_eq!(holes, vec![(0, 100), (300, 100), (406, 94)]);
        // An inline extent that claims more than it holds is an error, not a panic.
        let mut bad = Extent::inline(0, b"xy");
        bad.len = 10;
        assert_eq!(shift_extents(&[bad], 0, 10, 0), Err(Errno::IO));
    }
}
