//! Raft storage: the logs, votes, committed ids and latest snapshots of all the groups of a
//! server in one redb file ([`LogDb`]), written by one committer that shares each fsync among
//! every write waiting; appends and votes are synced before they are reported done. The state
//! machine is the application's [`Machine`]: held in memory and restored from the snapshot at
//! start, or kept on disk by the machine with its applied position (openraft then re-applies
//! the committed log after it).

// openraft's traits fix the error type (`StorageError`), large as it is.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use std::ops::Bound;

use redb::{Database, ReadableDatabase, TableDefinition, WriteTransaction};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{Machine, NodeId, Reply, TypeConfig};

/// (group << 64 | index) -> entry.
const LOGS: TableDefinition<u128, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const SNAP: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");

type SErr = StorageError<NodeId>;
type KvTable = TableDefinition<'static, &'static str, &'static [u8]>;

fn rerr<E: std::error::Error + 'static>(e: E) -> SErr {
    StorageIOError::read(AnyError::new(&e)).into()
}

fn werr<E: std::error::Error + 'static>(e: E) -> SErr {
    StorageIOError::write(AnyError::new(&e)).into()
}

fn get_kv<T: DeserializeOwned>(db: &Database, tbl: KvTable, k: &str) -> Result<Option<T>, SErr> {
    let tx = db.begin_read().map_err(rerr)?;
    let t = tx.open_table(tbl).map_err(rerr)?;
    match t.get(k).map_err(rerr)? {
        Some(g) => Ok(Some(postcard::from_bytes(g.value()).map_err(rerr)?)),
        None => Ok(None),
    }
}

type Work = Box<dyn FnOnce(&WriteTransaction) -> Result<(), String> + Send>;

/// A write for the committer, and whom to tell when it is on disk.
struct Job {
    work: Work,
    durable: bool,
    done: Box<dyn FnOnce(Result<(), String>) + Send>,
}

/// Jobs one commit takes at most.
const BATCH_MAX: usize = 1024;

/// The Raft file of a server, shared by all its groups: logs, votes and snapshots. Writes go
/// through one committer thread that gathers every write waiting (from any group) into one
/// transaction, synced once: concurrent operations of all partitions share one fsync.
#[derive(Clone)]
pub struct LogDb(Arc<LogDbInner>);

struct LogDbInner {
    db: Arc<Database>,
    jobs: std::sync::mpsc::SyncSender<Job>,
}

type OpenFiles =
    std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, std::sync::Weak<LogDbInner>>>;

/// The Raft files open in this process, so that a group restarted in the same process shares
/// the file instead of failing to open it twice.
static OPEN: std::sync::OnceLock<OpenFiles> = std::sync::OnceLock::new();

impl LogDb {
    /// Opens (creating) the file, or returns it if this process has it open.
    pub fn open(path: &std::path::Path) -> Result<LogDb, redb::Error> {
        let open = OPEN.get_or_init(Default::default);
        let mut files = open.lock().expect("open raft files");
        let canon = path
            .parent()
            .and_then(|p| p.canonicalize().ok())
            .map(|p| p.join(path.file_name().unwrap_or_default()))
            .unwrap_or_else(|| path.to_path_buf());
        if let Some(inner) = files.get(&canon).and_then(|w| w.upgrade()) {
            return Ok(LogDb(inner));
        }
        // A committer that is still letting go of the file (its last user just left).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match Database::create(path) {
                Ok(db) => break Arc::new(db),
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let tx = db.begin_write()?;
        tx.open_table(LOGS)?;
        tx.open_table(META)?;
        tx.open_table(SNAP)?;
        tx.commit()?;
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(BATCH_MAX * 4);
        let cdb = db.clone();
        std::thread::Builder::new()
            .name("raft-commit".into())
            .spawn(move || committer(cdb, rx))
            .map_err(redb::Error::Io)?;
        let inner = Arc::new(LogDbInner { db, jobs });
        files.insert(canon, Arc::downgrade(&inner));
        Ok(LogDb(inner))
    }

    /// Runs `work` in the next commit; returns once it is on disk (synced if `durable`).
    async fn write(
        &self,
        durable: bool,
        work: impl FnOnce(&WriteTransaction) -> Result<(), String> + Send + 'static,
    ) -> Result<(), SErr> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            durable,
            Box::new(work),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StorageIOError::write(AnyError::error(e)).into()),
            Err(_) => Err(StorageIOError::write(AnyError::error("raft committer stopped")).into()),
        }
    }

    fn submit(
        &self,
        durable: bool,
        work: Work,
        done: Box<dyn FnOnce(Result<(), String>) + Send>,
    ) -> Result<(), SErr> {
        self.0
            .jobs
            .send(Job {
                work,
                durable,
                done,
            })
            .map_err(|_| StorageIOError::write(AnyError::error("raft committer stopped")).into())
    }
}

/// Takes every job waiting, runs them in one transaction and commits it once (synced if any
/// job asked for it), then tells each job. A failed job fails the whole commit.
fn committer(db: Arc<Database>, rx: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|j| j.durable);
        let mut dones = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), String> {
            let mut tx = db.begin_write().map_err(|e| e.to_string())?;
            if !durable {
                tx.set_durability(redb::Durability::None)
                    .map_err(|e| e.to_string())?;
            }
            for j in batch {
                dones.push(j.done);
                (j.work)(&tx)?;
            }
            tx.commit().map_err(|e| e.to_string())
        })();
        if let Err(e) = &result {
            tracing::error!("raft log commit failed: {e}");
        }
        for d in dones {
            d(result.clone());
        }
    }
}

fn key(group: u64, index: u64) -> u128 {
    (group as u128) << 64 | index as u128
}

fn put_in<T: Serialize>(tx: &WriteTransaction, tbl: KvTable, k: &str, v: &T) -> Result<(), String> {
    let b = postcard::to_stdvec(v).map_err(|e| e.to_string())?;
    tx.open_table(tbl)
        .map_err(|e| e.to_string())?
        .insert(k, b.as_slice())
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The Raft log of one group, in its server's [`LogDb`].
#[derive(Clone)]
pub struct LogStore {
    log: LogDb,
    group: u64,
}

impl LogStore {
    /// The log of `group` in `log`.
    pub fn new(log: LogDb, group: u64) -> Self {
        LogStore { log, group }
    }

    fn k(&self, name: &str) -> String {
        format!("{}/{name}", self.group)
    }

    async fn put<T: Serialize + Send + 'static>(
        &self,
        durable: bool,
        name: &str,
        v: T,
    ) -> Result<(), SErr> {
        let k = self.k(name);
        self.log
            .write(durable, move |tx| put_in(tx, META, &k, &v))
            .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let tx = self.log.0.db.begin_read().map_err(rerr)?;
        let t = tx.open_table(LOGS).map_err(rerr)?;
        let g = self.group;
        let lo = match range.start_bound() {
            Bound::Included(&i) => key(g, i),
            Bound::Excluded(&i) => key(g, i).saturating_add(1),
            Bound::Unbounded => key(g, 0),
        };
        let hi = match range.end_bound() {
            Bound::Included(&i) => key(g, i),
            Bound::Excluded(&0) => return Ok(Vec::new()),
            Bound::Excluded(&i) => key(g, i - 1),
            Bound::Unbounded => key(g, u64::MAX),
        };
        let mut out = Vec::new();
        if lo > hi {
            return Ok(out);
        }
        for item in t.range::<u128>(lo..=hi).map_err(rerr)? {
            let (_k, v) = item.map_err(rerr)?;
            out.push(postcard::from_bytes::<Entry<TypeConfig>>(v.value()).map_err(rerr)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<NodeId>> =
            get_kv(&self.log.0.db, META, &self.k("last_purged"))?;
        let tx = self.log.0.db.begin_read().map_err(rerr)?;
        let t = tx.open_table(LOGS).map_err(rerr)?;
        let last_of_group = t
            .range::<u128>(key(self.group, 0)..=key(self.group, u64::MAX))
            .map_err(rerr)?
            .next_back()
            .transpose()
            .map_err(rerr)?;
        let last = match last_of_group {
            Some((_k, v)) => Some(
                postcard::from_bytes::<Entry<TypeConfig>>(v.value())
                    .map_err(rerr)?
                    .log_id,
            ),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        // Synced before it is returned: a vote must never be forgotten.
        self.put(true, "vote", *vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        get_kv(&self.log.0.db, META, &self.k("vote"))
    }

    async fn save_committed(&mut self, c: Option<LogId<NodeId>>) -> Result<(), SErr> {
        // Not synced: after a crash the committed index is found again from a majority.
        self.put(false, "committed", c).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(get_kv::<Option<LogId<NodeId>>>(&self.log.0.db, META, &self.k("committed"))?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let g = self.group;
        let mut rows = Vec::new();
        for e in entries {
            rows.push((
                key(g, e.log_id.index),
                postcard::to_stdvec(&e).map_err(werr)?,
            ));
        }
        // openraft reads the entries back as soon as this returns, so it returns once the
        // commit that carries them is done (synced): appends of one group go one commit at a
        // time, while the committer still shares each sync among all the groups of the server.
        let r = self
            .log
            .write(true, move |tx| {
                let mut t = tx.open_table(LOGS).map_err(|e| e.to_string())?;
                for (k, b) in rows {
                    t.insert(k, b.as_slice()).map_err(|e| e.to_string())?;
                }
                Ok(())
            })
            .await;
        match r {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let (lo, hi) = (key(self.group, log_id.index), key(self.group, u64::MAX));
        self.log
            .write(true, move |tx| {
                tx.open_table(LOGS)
                    .map_err(|e| e.to_string())?
                    .retain_in(lo..=hi, |_, _| false)
                    .map_err(|e| e.to_string())
            })
            .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let (lo, hi) = (key(self.group, 0), key(self.group, log_id.index));
        let k = self.k("last_purged");
        self.log
            .write(true, move |tx| {
                put_in(tx, META, &k, &log_id)?;
                tx.open_table(LOGS)
                    .map_err(|e| e.to_string())?
                    .retain_in(lo..=hi, |_, _| false)
                    .map_err(|e| e.to_string())
            })
            .await
    }
}

/// The applied state: the application's machine and what Raft needs to know about it.
pub struct Applied {
    /// The last log id applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// The last membership applied.
    pub last_membership: StoredMembership<NodeId, BasicNode>,
    /// The application's state.
    pub machine: Box<dyn Machine>,
}

/// What a machine on disk stores with its state: the last log id and membership applied.
#[derive(Serialize, Deserialize)]
struct Position(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>);

fn commit_machine(st: &mut Applied, durable: bool) -> Result<(), SErr> {
    let pos = postcard::to_stdvec(&Position(st.last_applied, st.last_membership.clone()))
        .map_err(werr)?;
    st.machine
        .commit(&pos, durable)
        .map_err(|e| SErr::from(StorageIOError::write_state_machine(AnyError::error(e))))
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The state machine of one group.
#[derive(Clone)]
pub struct StateMachineStore {
    /// The applied state (read it after `ensure_linearizable` for linearizable reads).
    pub state: Arc<tokio::sync::RwLock<Applied>>,
    log: LogDb,
    snap_key: String,
    seq: Arc<AtomicU64>,
}

impl StateMachineStore {
    /// The state machine of `group` over `machine`, restored from the group's snapshot in
    /// `log` if the machine does not keep its own state.
    pub fn open(log: LogDb, group: u64, mut machine: Box<dyn Machine>) -> Result<Self, SErr> {
        let snap_key = format!("{group}/snapshot");
        let mut last_applied = None;
        let mut last_membership = StoredMembership::default();
        let on_disk = machine
            .applied()
            .map_err(|e| SErr::from(StorageIOError::read_state_machine(AnyError::error(e))))?;
        if let Some(pos) = on_disk {
            let p: Position = postcard::from_bytes(&pos).map_err(rerr)?;
            last_applied = p.0;
            last_membership = p.1;
        } else if let Some(s) = get_kv::<StoredSnapshot>(&log.0.db, SNAP, &snap_key)? {
            machine.restore(&s.data).map_err(|e| {
                SErr::from(StorageIOError::read_snapshot(
                    Some(s.meta.signature()),
                    AnyError::error(e),
                ))
            })?;
            last_applied = s.meta.last_log_id;
            last_membership = s.meta.last_membership.clone();
        }
        Ok(StateMachineStore {
            state: Arc::new(tokio::sync::RwLock::new(Applied {
                last_applied,
                last_membership,
                machine,
            })),
            log,
            snap_key,
            seq: Arc::new(AtomicU64::new(0)),
        })
    }
}

impl StateMachineStore {
    async fn store_snapshot(&self, s: StoredSnapshot) -> Result<(), SErr> {
        let k = self.snap_key.clone();
        self.log
            .write(true, move |tx| put_in(tx, SNAP, &k, &s))
            .await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let (data, last, membership) = {
            // A machine on disk is synced first, so that the log the snapshot covers (which
            // may then be purged) is never needed to rebuild it.
            let mut st = self.state.write().await;
            commit_machine(&mut st, true)?;
            (
                st.machine.snapshot(),
                st.last_applied,
                st.last_membership.clone(),
            )
        };
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{n}", l.leader_id, l.index),
            None => format!("--{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id,
        };
        self.store_snapshot(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), SErr> {
        let st = self.state.read().await;
        Ok((st.last_applied, st.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut st = self.state.write().await;
        let mut out = Vec::new();
        for entry in entries {
            st.last_applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => Reply::default(),
                EntryPayload::Normal(cmd) => Reply(st.machine.apply(&cmd.0)),
                EntryPayload::Membership(m) => {
                    st.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Reply::default()
                }
            });
        }
        // The log is synced; the machine's own file need not be (Raft re-applies after a crash).
        commit_machine(&mut st, false)?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        {
            let mut st = self.state.write().await;
            st.machine.restore(&data).map_err(|e| {
                SErr::from(StorageIOError::read_snapshot(
                    Some(meta.signature()),
                    AnyError::error(e),
                ))
            })?;
            st.last_applied = meta.last_log_id;
            st.last_membership = meta.last_membership.clone();
            commit_machine(&mut st, true)?;
        }
        self.store_snapshot(StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        Ok(
            get_kv::<StoredSnapshot>(&self.log.0.db, SNAP, &self.snap_key)?.map(|s| Snapshot {
                meta: s.meta,
                snapshot: Box::new(Cursor::new(s.data)),
            }),
        )
    }
}
