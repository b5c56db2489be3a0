//! Raft storage: the log, the vote, the committed id and the latest snapshot in one redb file
//! (every commit synced), and a state machine held in memory by the application's [`Machine`],
//! restored from the snapshot at start (openraft then re-applies the committed log after it).

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
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{Machine, NodeId, Reply, TypeConfig};

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_logs");
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

fn put_kv<T: Serialize>(db: &Database, tbl: KvTable, k: &str, v: &T) -> Result<(), SErr> {
    let b = postcard::to_stdvec(v).map_err(werr)?;
    let tx = db.begin_write().map_err(werr)?;
    tx.open_table(tbl)
        .map_err(werr)?
        .insert(k, b.as_slice())
        .map_err(werr)?;
    tx.commit().map_err(werr)
}

/// Opens (creating) the redb file of a group, with its tables.
pub fn open_db(path: &std::path::Path) -> Result<Arc<Database>, redb::Error> {
    let db = Database::create(path)?;
    let tx = db.begin_write()?;
    tx.open_table(LOGS)?;
    tx.open_table(META)?;
    tx.open_table(SNAP)?;
    tx.commit()?;
    Ok(Arc::new(db))
}

/// The Raft log of one group.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// The log in `db`.
    pub fn new(db: Arc<Database>) -> Self {
        LogStore { db }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let tx = self.db.begin_read().map_err(rerr)?;
        let t = tx.open_table(LOGS).map_err(rerr)?;
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let mut out = Vec::new();
        for item in t.range::<u64>(bounds).map_err(rerr)? {
            let (_k, v) = item.map_err(rerr)?;
            out.push(postcard::from_bytes::<Entry<TypeConfig>>(v.value()).map_err(rerr)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<NodeId>> = get_kv(&self.db, META, "last_purged")?;
        let tx = self.db.begin_read().map_err(rerr)?;
        let t = tx.open_table(LOGS).map_err(rerr)?;
        let last = match t.last().map_err(rerr)? {
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
        put_kv(&self.db, META, "vote", vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        get_kv(&self.db, META, "vote")
    }

    async fn save_committed(&mut self, c: Option<LogId<NodeId>>) -> Result<(), SErr> {
        put_kv(&self.db, META, "committed", &c)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(get_kv::<Option<LogId<NodeId>>>(&self.db, META, "committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let tx = self.db.begin_write().map_err(werr)?;
        {
            let mut t = tx.open_table(LOGS).map_err(werr)?;
            for e in entries {
                let b = postcard::to_stdvec(&e).map_err(werr)?;
                t.insert(e.log_id.index, b.as_slice()).map_err(werr)?;
            }
        }
        // Durable (synced) when commit returns; only then is the append reported flushed.
        tx.commit().map_err(werr)?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let tx = self.db.begin_write().map_err(werr)?;
        tx.open_table(LOGS)
            .map_err(werr)?
            .retain_in(log_id.index.., |_, _| false)
            .map_err(werr)?;
        tx.commit().map_err(werr)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let p = postcard::to_stdvec(&log_id).map_err(werr)?;
        let tx = self.db.begin_write().map_err(werr)?;
        tx.open_table(META)
            .map_err(werr)?
            .insert("last_purged", p.as_slice())
            .map_err(werr)?;
        tx.open_table(LOGS)
            .map_err(werr)?
            .retain_in(..=log_id.index, |_, _| false)
            .map_err(werr)?;
        tx.commit().map_err(werr)
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
    db: Arc<Database>,
    seq: Arc<AtomicU64>,
}

impl StateMachineStore {
    /// The state machine over `machine`, restored from the snapshot stored in `db` if any.
    pub fn open(db: Arc<Database>, mut machine: Box<dyn Machine>) -> Result<Self, SErr> {
        let mut last_applied = None;
        let mut last_membership = StoredMembership::default();
        let on_disk = machine
            .applied()
            .map_err(|e| SErr::from(StorageIOError::read_state_machine(AnyError::error(e))))?;
        if let Some(pos) = on_disk {
            let p: Position = postcard::from_bytes(&pos).map_err(rerr)?;
            last_applied = p.0;
            last_membership = p.1;
        } else if let Some(s) = get_kv::<StoredSnapshot>(&db, SNAP, "current")? {
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
            db,
            seq: Arc::new(AtomicU64::new(0)),
        })
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
        put_kv(
            &self.db,
            SNAP,
            "current",
            &StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            },
        )?;
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
        put_kv(
            &self.db,
            SNAP,
            "current",
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        Ok(
            get_kv::<StoredSnapshot>(&self.db, SNAP, "current")?.map(|s| Snapshot {
                meta: s.meta,
                snapshot: Box::new(Cursor::new(s.data)),
            }),
        )
    }
}
