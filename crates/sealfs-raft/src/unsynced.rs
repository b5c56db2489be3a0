//! A leader's own entries that its disk has not yet synced.
//!
//! openraft 0.9 sends a leader's new entries to its followers only once the leader's log says
//! they are stored, so a command would wait for the leader's sync and then for a follower's,
//! one after the other. Instead, a leader's log reports its own entries stored as soon as they
//! are handed to the writer (readable from memory), and its sync runs while the followers
//! write and sync theirs. openraft then counts the leader toward the majority before its disk
//! has the entries, so until that sync ends nothing may treat them as committed:
//!
//! - the leader does not apply them, so no client is answered ([`Unsynced::wait`], in the
//!   state machine's `apply`);
//! - the committed index the leader sends its followers, and the one it stores, stays before
//!   them ([`Unsynced::clamp`]), so no follower applies them either.
//!
//! Everything applied or acknowledged is thus synced on a majority (the leader and a follower
//! that synced before it answered), as when the two syncs ran in series. If the leader's
//! machine loses power before its sync, its unsynced entries are simply not committed: no
//! replica applied them, and a new leader may replace them.
//!
//! A leader whose disk hangs would go on sending heartbeats while it can apply nothing, and
//! keep its place: once a sync has waited [`STALL`], it stops sending
//! ([`Unsynced::stalled`]), so that the followers elect another.

use std::time::{Duration, Instant};

use openraft::LogId;
use tokio::sync::watch;

use crate::wal::Wal;
use crate::NodeId;

/// How long a leader's sync may take before the leader stops sending, and so lets another
/// replica take over: more than the longest election timeout, so that a slow sync under load
/// does not move the leader.
pub const STALL: Duration = Duration::from_millis(2_500);

/// The runs of entries (first and last id, when handed) handed to the log by the leader and
/// not yet synced, and the error of a failed sync.
#[derive(Default)]
struct Runs {
    runs: Vec<(LogId<NodeId>, LogId<NodeId>, Instant)>,
    failed: Option<String>,
}

impl Runs {
    /// The first unsynced entry: every entry of the log before it is synced.
    fn first(&self) -> Option<LogId<NodeId>> {
        self.runs.iter().map(|r| r.0).min()
    }

    fn remove(&mut self, first: LogId<NodeId>, last: LogId<NodeId>) {
        self.runs.retain(|r| (r.0, r.1) != (first, last));
    }
}

/// A group's unsynced entries of its own (see the module's documentation).
pub struct Unsynced(watch::Sender<Runs>);

impl Default for Unsynced {
    fn default() -> Self {
        Unsynced(watch::Sender::new(Runs::default()))
    }
}

impl Unsynced {
    /// Notes a run handed to the log, before it is handed.
    pub fn handed(&self, first: LogId<NodeId>, last: LogId<NodeId>) {
        self.0
            .send_modify(|r| r.runs.push((first, last, Instant::now())));
    }

    /// Notes that the run was not handed after all (the writer refused it).
    pub fn withdrawn(&self, first: LogId<NodeId>, last: LogId<NodeId>) {
        self.0.send_modify(|r| r.remove(first, last));
    }

    /// Notes the end of a run's write: synced, or failed (then nothing after it is trusted).
    pub fn written(&self, first: LogId<NodeId>, last: LogId<NodeId>, r: Result<(), String>) {
        self.0.send_modify(|s| match r {
            Ok(()) => s.remove(first, last),
            Err(e) => {
                s.failed.get_or_insert(e);
            }
        });
    }

    /// Waits until every entry up to `upto` is synced. Entries this leader did not hand over
    /// unsynced were synced before openraft counted them, so only the runs matter: it waits
    /// while one starts at or before `upto`.
    pub async fn wait(&self, upto: LogId<NodeId>) -> Result<(), String> {
        let mut rx = self.0.subscribe();
        let s = rx
            .wait_for(|s| s.failed.is_some() || s.first().is_none_or(|f| f > upto))
            .await
            .map_err(|_| "the group's log stopped".to_string())?;
        match &s.failed {
            Some(e) => Err(format!("the raft log could not sync: {e}")),
            None => Ok(()),
        }
    }

    /// Whether a run has waited longer than `limit` for its sync, or a sync failed: a leader
    /// then stops sending.
    pub fn stalled(&self, limit: Duration) -> bool {
        let s = self.0.borrow();
        s.failed.is_some() || s.runs.iter().any(|r| r.2.elapsed() > limit)
    }

    /// `committed`, or the last entry before the first unsynced one if that is earlier: the
    /// committed index a leader may tell its followers or store.
    pub fn clamp(
        &self,
        committed: Option<LogId<NodeId>>,
        log: &Wal,
        group: u64,
    ) -> Option<LogId<NodeId>> {
        let first = self.0.borrow().first();
        match first {
            Some(f) if committed >= Some(f) => {
                // A run is still in the log: one that a new leader's entries replace is synced
                // (and gone from the runs) before the truncation that removes it is done.
                let before = f.index.checked_sub(1).and_then(|i| log.log_id(group, i));
                before.filter(|b| *b < f).min(committed)
            }
            _ => committed,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use openraft::CommittedLeaderId;

    use super::*;
    use crate::wal::Rec;

    fn id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[tokio::test]
    async fn nothing_past_an_unsynced_run_is_applied_or_told_committed() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        let recs = (1..=5)
            .map(|i| Rec::Entry {
                group: 9,
                log_id: id(2, i),
                bytes: Arc::new(vec![i as u8]),
            })
            .collect();
        wal.write_blocking(recs, true).unwrap();
        let u = Arc::new(Unsynced::default());
        assert_eq!(u.clamp(Some(id(2, 5)), &wal, 9), Some(id(2, 5)));
        u.wait(id(2, 5)).await.unwrap();

        // Entries 4 and 5 handed by the leader, not yet synced.
        u.handed(id(2, 4), id(2, 5));
        assert_eq!(u.clamp(Some(id(2, 5)), &wal, 9), Some(id(2, 3)));
        assert_eq!(u.clamp(Some(id(2, 3)), &wal, 9), Some(id(2, 3)));
        assert_eq!(u.clamp(Some(id(2, 2)), &wal, 9), Some(id(2, 2)));
        assert_eq!(u.clamp(None, &wal, 9), None);
        u.wait(id(2, 3)).await.unwrap();
        let waiting = tokio::spawn({
            let u = u.clone();
            async move { u.wait(id(2, 4)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "entry 4 applied before it was synced"
        );

        u.written(id(2, 4), id(2, 5), Ok(()));
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(u.clamp(Some(id(2, 5)), &wal, 9), Some(id(2, 5)));

        // A run whose sync failed: waiting for it is an error, not a hang.
        u.handed(id(2, 6), id(2, 6));
        u.written(id(2, 6), id(2, 6), Err("disk gone".into()));
        let e = u.wait(id(2, 6)).await.unwrap_err();
        assert!(e.contains("disk gone"), "{e}");

        // A run the writer refused is forgotten.
        let u = Unsynced::default();
        u.handed(id(3, 7), id(3, 8));
        u.withdrawn(id(3, 7), id(3, 8));
        u.wait(id(3, 8)).await.unwrap();
    }
}
