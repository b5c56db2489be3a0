//! Raft storage: the logs and votes of all the groups of a server in its log ([`LogDb`], our own
//! segment files written by one thread that shares each `fdatasync` among every write waiting), and
//! each group's latest snapshot in a file beside it. Appends and votes are synced before they are
//! reported done, but for a leader's own entries, which are reported done when handed to the writer
//! and kept from being applied until synced (`unsynced.rs`). The state machine is the application's
//! [`Machine`]: held in memory and restored from the snapshot at start, or kept on disk by the
//! machine with its applied position (openraft then re-applies the committed log after it).

// openraft's traits fix the error type (`StorageError`), large as it is.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Write;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use serde::{Deserialize, Serialize};

use crate::unsynced::Unsynced;
use crate::wal::{Rec, Wal};
use crate::{Machine, NodeId, Reply, SnapshotBytes, TypeConfig};

type SErr = StorageError<NodeId>;

fn rerr(e: impl std::fmt::Display) -> SErr {
    StorageIOError::read(AnyError::error(e)).into()
}

fn werr(e: impl std::fmt::Display) -> SErr {
    StorageIOError::write(AnyError::error(e)).into()
}

/// The Raft log of a server, shared by all its groups: a folder of segment files (see
/// [`crate::wal`]) and a snapshot file per group.
#[derive(Clone)]
pub struct LogDb(Wal);

impl LogDb {
    /// Opens (creating) the log in folder `dir`, or returns it if this process has it open.
    pub fn open(dir: &Path) -> Result<LogDb, String> {
        Wal::open(dir).map(LogDb)
    }

    pub(crate) fn wal(&self) -> &Wal {
        &self.0
    }

    fn snapshot_path(&self, group: u64) -> PathBuf {
        self.0.dir().join(format!("snap-{group:016x}"))
    }

    /// A group's latest snapshot, checked against its CRC.
    fn read_snapshot(&self, group: u64) -> Result<Option<StoredSnapshot>, SErr> {
        let path = self.snapshot_path(group);
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(rerr(format!("{}: {e}", path.display()))),
        };
        // The snapshot's bytes and its metadata (the membership, a few KiB): a longer file is
        // damage, not read into memory.
        if len > crate::snapshot::SNAPSHOT_BYTES_MAX + (1 << 20) {
            return Err(rerr(format!(
                "{}: {len} bytes, longer than a snapshot can be",
                path.display()
            )));
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(rerr(format!("{}: {e}", path.display()))),
        };
        let bad = || rerr(format!("{}: damaged (fails its CRC)", path.display()));
        let (crc, body) = bytes.split_at_checked(4).ok_or_else(bad)?;
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(bad());
        }
        postcard::from_bytes(body)
            .map(Some)
            .map_err(|e| rerr(format!("{}: {e}", path.display())))
    }

    /// Stores a group's snapshot in place of the last: written aside, synced, renamed over it.
    async fn write_snapshot(&self, group: u64, s: &StoredSnapshot) -> Result<(), SErr> {
        let body = postcard::to_stdvec(s).map_err(werr)?;
        let path = self.snapshot_path(group);
        tokio::task::spawn_blocking(move || {
            let tmp = path.with_extension("tmp");
            let r = (|| -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&crc32c::crc32c(&body).to_le_bytes())?;
                f.write_all(&body)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                let dir = path.parent().unwrap_or(Path::new("."));
                std::fs::File::open(dir)?.sync_all()
            })();
            r.map_err(|e| werr(format!("{}: {e}", path.display())))
        })
        .await
        .map_err(werr)?
    }
}

/// The Raft log of one group, in its server's [`LogDb`].
#[derive(Clone)]
pub struct LogStore {
    log: LogDb,
    group: u64,
    node: NodeId,
    unsynced: Arc<Unsynced>,
}

impl LogStore {
    /// The log of `group` in `log`, on replica `node`.
    pub(crate) fn new(log: LogDb, group: u64, node: NodeId, unsynced: Arc<Unsynced>) -> Self {
        LogStore {
            log,
            group,
            node,
            unsynced,
        }
    }

    /// Whether `entries` are this replica's own as the leader of the vote it stored: a leader
    /// elected (its vote committed) appending the entries of its term.
    fn own(&self, entries: &[Rec]) -> bool {
        let Some(vote) = self.log.0.meta(self.group).vote else {
            return false;
        };
        let leader = *vote.leader_id();
        vote.is_committed()
            && leader.node_id == self.node
            && entries
                .iter()
                .all(|r| matches!(r, Rec::Entry { log_id, .. } if log_id.leader_id == leader))
    }

    async fn write(&self, recs: Vec<Rec>, durable: bool) -> Result<(), SErr> {
        self.log.0.write(recs, durable).await.map_err(werr)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let lo = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let hi = match range.end_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&0) => return Ok(Vec::new()),
            Bound::Excluded(&i) => i - 1,
            Bound::Unbounded => u64::MAX,
        };
        let log = self.log.0.clone();
        let group = self.group;
        // The entries a leader sends and a replica applies are the last ones, in memory.
        let raw = match log.recent_entries(group, lo, hi) {
            Some(raw) => raw,
            None => tokio::task::spawn_blocking(move || log.entries(group, lo, hi))
                .await
                .map_err(rerr)?
                .map_err(rerr)?,
        };
        raw.iter()
            .map(|b| postcard::from_bytes::<Entry<TypeConfig>>(b).map_err(rerr))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged = self.log.0.meta(self.group).purged;
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: self.log.0.last(self.group).or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        // Synced before it is returned: a vote must never be forgotten.
        let group = self.group;
        self.write(vec![Rec::Vote { group, vote: *vote }], true)
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        Ok(self.log.0.meta(self.group).vote)
    }

    async fn save_committed(&mut self, c: Option<LogId<NodeId>>) -> Result<(), SErr> {
        // Not synced, nor waited for: after a crash the committed index is found again from a
        // majority. Written lazily, with the next batch (it lands after the entries it
        // covers): one write of its own, and a wake-up of the writer, per command on every
        // replica cost more than it saves a restart. Never past what this replica has synced:
        // a restart applies up to it.
        let group = self.group;
        self.log.0.write_lazily(Rec::Committed {
            group,
            committed: self.unsynced.clamp(c, &self.log.0, group),
        });
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self.log.0.meta(self.group).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let group = self.group;
        let mut recs = Vec::new();
        let mut ids = None;
        for e in entries {
            let (first, _) = ids.get_or_insert((e.log_id, e.log_id));
            ids = Some((*first, e.log_id));
            recs.push(Rec::Entry {
                group,
                log_id: e.log_id,
                bytes: Arc::new(postcard::to_stdvec(&e).map_err(werr)?),
            });
        }
        // Returns at once, the entries readable from memory. A follower's are reported
        // stored at `callback`, after the sync (the writer shares it among all the groups of
        // the server), and only then does it answer the leader. A leader's own are reported
        // stored now, so that openraft sends them to the followers while this disk syncs
        // them; until it has, they are not applied nor told committed ([`Unsynced`]).
        let Some((first, last)) = ids else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        if !self.own(&recs) {
            let synced = Box::new(move |r: Result<(), String>| {
                callback.log_io_completed(r.map_err(std::io::Error::other))
            });
            return self.log.0.write_then(recs, true, synced).map_err(werr);
        }
        self.unsynced.handed(first, last);
        let unsynced = self.unsynced.clone();
        let written = Box::new(move |r: Result<(), String>| unsynced.written(first, last, r));
        if let Err(e) = self.log.0.write_then(recs, true, written) {
            self.unsynced.withdrawn(first, last);
            return Err(werr(e));
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let group = self.group;
        let from = log_id.index;
        self.write(vec![Rec::Truncate { group, from }], true).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let group = self.group;
        self.write(
            vec![Rec::Purge {
                group,
                upto: log_id,
            }],
            true,
        )
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
    group: u64,
    seq: Arc<AtomicU64>,
    unsynced: Arc<Unsynced>,
}

impl StateMachineStore {
    /// The state machine of `group` over `machine`, restored from the group's snapshot in
    /// `log` if the machine does not keep its own state.
    pub(crate) fn open(
        log: LogDb,
        group: u64,
        mut machine: Box<dyn Machine>,
        unsynced: Arc<Unsynced>,
    ) -> Result<Self, SErr> {
        let mut last_applied = None;
        let mut last_membership = StoredMembership::default();
        let on_disk = machine
            .applied()
            .map_err(|e| SErr::from(StorageIOError::read_state_machine(AnyError::error(e))))?;
        if let Some(pos) = on_disk {
            let p: Position = postcard::from_bytes(&pos).map_err(rerr)?;
            last_applied = p.0;
            last_membership = p.1;
        } else if let Some(s) = log.read_snapshot(group)? {
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
            group,
            seq: Arc::new(AtomicU64::new(0)),
            unsynced,
        })
    }
}

impl StateMachineStore {
    async fn store_snapshot(&self, s: StoredSnapshot) -> Result<(), SErr> {
        self.log.write_snapshot(self.group, &s).await
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
            snapshot: Box::new(SnapshotBytes::new(data)),
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
        let entries: Vec<_> = entries.into_iter().collect();
        if let Some(last) = entries.last() {
            // A leader's own entries are committed by openraft before its own disk may have
            // synced them: applied (and answered) only once it has.
            self.unsynced.wait(last.log_id).await.map_err(werr)?;
        }
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

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotBytes>, SErr> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<SnapshotBytes>,
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
        Ok(self.log.read_snapshot(self.group)?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(SnapshotBytes::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> StoredSnapshot {
        StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: None,
                last_membership: StoredMembership::default(),
                snapshot_id: "s1".into(),
            },
            data: b"the machine's state".to_vec(),
        }
    }

    #[tokio::test]
    async fn a_snapshot_is_read_back_and_a_damaged_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogDb::open(&dir.path().join("wal")).unwrap();
        assert!(log.read_snapshot(3).unwrap().is_none());
        // A file far longer than a snapshot can be (sparse) is refused before it is read.
        let path = log.snapshot_path(3);
        std::fs::File::create(&path)
            .unwrap()
            .set_len(crate::snapshot::SNAPSHOT_BYTES_MAX * 2)
            .unwrap();
        let Err(e) = log.read_snapshot(3) else {
            panic!("an 8 GiB snapshot file was read");
        };
        let e = e.to_string();
        assert!(e.contains("longer than a snapshot can be"), "{e}");
        log.write_snapshot(3, &snapshot()).await.unwrap();
        let back = log.read_snapshot(3).unwrap().unwrap();
        assert_eq!(back.data, snapshot().data);
        assert_eq!(back.meta.snapshot_id, "s1");
        // One flipped byte, then a file cut to less than its CRC: errors, not a state.
        let path = log.snapshot_path(3);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(log.read_snapshot(3).is_err());
        std::fs::write(&path, [1, 2]).unwrap();
        assert!(log.read_snapshot(3).is_err());
    }
}
