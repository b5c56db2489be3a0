//! Raft groups for sealfs (DESIGN 5.1, 5.4): the manager's cluster map and each metadata partition
//! are a group of 1 or 3 (R) replicas running openraft. A group keeps its log, vote and snapshots
//! in its server's log (our own segment files, [`wal`]; every append synced before a client is
//! answered: a follower's before it answers its leader, a leader's own beside its followers', see
//! `unsynced.rs`), sends its messages on the sealfs wire (one connection per pair of servers,
//! shared by all groups), and applies committed commands to the application's [`Machine`].

pub mod network;
pub mod snapshot;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod unsynced;
pub mod wal;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Raft, ServerState};
use serde::{Deserialize, Serialize};

pub use network::{Peers, RaftRouter};
pub use snapshot::SnapshotBytes;
pub use store::LogDb;
use store::{LogStore, StateMachineStore};

/// A server's id within a group.
pub type NodeId = u64;

/// A command to apply, serialized by the application.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Command(pub Vec<u8>);

/// What applying a command returned.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply(pub Vec<u8>);

openraft::declare_raft_types!(
    /// The Raft types of every sealfs group.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotBytes,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The replicated state of a group, as the application defines it. Applying must be
/// deterministic: every replica applies the same commands in the same order.
pub trait Machine: Send + Sync + 'static {
    /// Applies one committed command and returns its reply.
    fn apply(&mut self, command: &[u8]) -> Vec<u8>;
    /// The whole state, for a snapshot.
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the state with a snapshot's.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;
    /// Answers a read-only query on the applied state (the application's encoding).
    fn query(&self, _query: &[u8]) -> Vec<u8> {
        Vec::new()
    }
    /// For a machine that keeps its state on disk: the applied position it last stored with
    /// [`Machine::commit`]. Such a machine is not restored from the group's snapshot at start;
    /// Raft re-applies the log after this position. `None` for a machine held in memory.
    fn applied(&self) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }
    /// Ends a batch of applied commands: a machine on disk stores their effects together with
    /// `applied` (an opaque position) in one transaction, synced when `durable`. Errors stop the
    /// group (a replica that cannot store what it applied must not go on).
    fn commit(&mut self, _applied: &[u8], _durable: bool) -> Result<(), String> {
        Ok(())
    }
}

/// Errors of a group.
#[derive(Debug)]
pub enum GroupError {
    /// This replica is not the leader; the leader's address if known.
    NotLeader(Option<String>),
    /// No quorum, shut down, or a storage failure.
    Unavailable(String),
}

impl std::fmt::Display for GroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupError::NotLeader(Some(a)) => write!(f, "not the leader; the leader is at {a}"),
            GroupError::NotLeader(None) => write!(f, "not the leader, and no leader is known"),
            GroupError::Unavailable(m) => write!(f, "raft group unavailable: {m}"),
        }
    }
}

impl std::error::Error for GroupError {}

/// One replica of a group on this server.
#[derive(Clone)]
pub struct Group {
    id: u64,
    node: NodeId,
    raft: Raft<TypeConfig>,
    sm: StateMachineStore,
    router: Arc<RaftRouter>,
    lease: Arc<std::sync::Mutex<Lease>>,
}

/// How long after a majority last answered it a leader serves reads without asking again:
/// less than the shortest election timeout, so no other replica can have been elected in the
/// meantime (a follower that heard from the leader refuses votes for the longest election
/// timeout; one that restarted waits at least the shortest before it stands).
const LEASE: Duration = Duration::from_millis(ELECTION_TIMEOUT_MIN_MS - 100);
const ELECTION_TIMEOUT_MIN_MS: u64 = 1_000;

/// A leader's read lease: until when, in which term.
#[derive(Clone, Copy, Default)]
struct Lease {
    until: Option<std::time::Instant>,
    term: u64,
}

/// Timing of every group: heartbeats every 250 ms, elections after 1 to 2 s without one.
/// openraft 0.9 also gives every append the heartbeat interval to be answered in, and backs
/// off 500 ms from a follower that did not: an append is synced on the follower first, and a
/// busy disk takes more than 100 ms (with 100 ms, 200 files put at once stalled a partition
/// past its 10 s deadline, one run in two under the unoptimized build).
fn config() -> Arc<openraft::Config> {
    let c = openraft::Config {
        cluster_name: "sealfs".into(),
        heartbeat_interval: 250,
        election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
        election_timeout_max: 2_000,
        install_snapshot_timeout: 2000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(10_000),
        ..Default::default()
    };
    Arc::new(c.validate().expect("valid raft timing"))
}

impl Group {
    /// Starts replica `node` of group `id` with its log in `log` (the server's Raft file),
    /// reachable through `router` on this server's RPC listener and reaching others through
    /// `peers`.
    pub async fn start(
        id: u64,
        node: NodeId,
        log: &LogDb,
        machine: Box<dyn Machine>,
        router: Arc<RaftRouter>,
        peers: Peers,
    ) -> Result<Group, GroupError> {
        let unavailable = |e: String| GroupError::Unavailable(format!("group {id}: {e}"));
        let unsynced = Arc::new(unsynced::Unsynced::default());
        let sm = StateMachineStore::open(log.clone(), id, machine, unsynced.clone())
            .map_err(|e| unavailable(e.to_string()))?;
        let net = network::NetFactory {
            group: id,
            peers,
            log: log.clone(),
            unsynced: unsynced.clone(),
        };
        let raft = Raft::new(
            node,
            config(),
            net,
            LogStore::new(log.clone(), id, node, unsynced),
            sm.clone(),
        )
        .await
        .map_err(|e| unavailable(e.to_string()))?;
        router.add(id, raft.clone());
        Ok(Group {
            id,
            node,
            raft,
            sm,
            router,
            lease: Arc::default(),
        })
    }

    /// The leader's term now, if this replica is the leader.
    fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.state == ServerState::Leader).then_some(m.current_term)
    }

    /// Notes that a majority answered a message this leader sent after `asked` in `term`.
    fn extend_lease(&self, asked: std::time::Instant, term: Option<u64>) {
        if let Some(term) = term.filter(|t| self.leading_term() == Some(*t)) {
            let mut l = self.lease.lock().expect("lease");
            if l.term != term || l.until < Some(asked + LEASE) {
                *l = Lease {
                    until: Some(asked + LEASE),
                    term,
                };
            }
        }
    }

    /// Whether this leader's lease still holds.
    fn leased(&self) -> bool {
        let l = *self.lease.lock().expect("lease");
        l.until.is_some_and(|u| std::time::Instant::now() < u)
            && self.leading_term() == Some(l.term)
    }

    /// Makes the group of `members` (node id -> address). Run on one replica of a new group;
    /// running it again, or on a group that exists, does nothing.
    pub async fn initialize(&self, members: BTreeMap<NodeId, String>) -> Result<(), GroupError> {
        if self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .next()
            .is_some()
        {
            // Made before (a restart): nothing to do.
            return Ok(());
        }
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .into_iter()
            .map(|(k, a)| (k, BasicNode::new(a)))
            .collect();
        match self.raft.initialize(nodes).await {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(GroupError::Unavailable(e.to_string())),
        }
    }

    /// Replicates and applies `command` (on the leader); returns its reply once a majority has it.
    pub async fn write(&self, command: Vec<u8>) -> Result<Vec<u8>, GroupError> {
        let (asked, term) = (std::time::Instant::now(), self.leading_term());
        match self.raft.client_write(Command(command)).await {
            Ok(r) => {
                // A majority stored it: they heard from this leader after `asked`.
                self.extend_lease(asked, term);
                Ok(r.data.0)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(GroupError::NotLeader(f.leader_node.map(|n| n.addr)))
            }
            Err(e) => Err(GroupError::Unavailable(e.to_string())),
        }
    }

    /// Runs `f` on the state after confirming leadership with a majority (a linearizable read):
    /// at once while the leader's lease holds ([`LEASE`] after a majority last answered it),
    /// else after a round of heartbeats.
    pub async fn read<T>(&self, f: impl FnOnce(&dyn Machine) -> T) -> Result<T, GroupError> {
        if !self.leased() {
            let (asked, term) = (std::time::Instant::now(), self.leading_term());
            if let Err(e) = self.raft.ensure_linearizable().await {
                return Err(match e.forward_to_leader::<BasicNode>() {
                    Some(fw) => {
                        GroupError::NotLeader(fw.leader_node.as_ref().map(|n| n.addr.clone()))
                    }
                    None => GroupError::Unavailable(e.to_string()),
                });
            }
            self.extend_lease(asked, term);
        }
        // A leader restarted in its own term does not know its last entries were committed
        // (the committed index is not synced), and openraft then reads at that index: wait
        // until everything in the leader's log is applied, so that nothing acknowledged before
        // the restart is missed.
        let last = self.raft.metrics().borrow().last_log_index;
        if let Some(last) = last {
            self.raft
                .wait(Some(Duration::from_secs(5)))
                .applied_index_at_least(Some(last), "the leader's log applied")
                .await
                .map_err(|e| GroupError::Unavailable(e.to_string()))?;
        }
        let st = self.sm.state.read().await;
        Ok(f(st.machine.as_ref()))
    }

    /// A linearizable [`Machine::query`].
    pub async fn query(&self, q: &[u8]) -> Result<Vec<u8>, GroupError> {
        self.read(|m| m.query(q)).await
    }

    /// Runs `f` on this replica's applied state, without checking it is current.
    pub async fn read_local<T>(&self, f: impl FnOnce(&dyn Machine) -> T) -> T {
        let st = self.sm.state.read().await;
        f(st.machine.as_ref())
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Whether this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// The index of the last log entry applied here.
    pub fn applied_index(&self) -> Option<u64> {
        self.raft.metrics().borrow().last_applied.map(|l| l.index)
    }

    /// Waits (at most `timeout`) until some replica is the known leader.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .ok()
            .and_then(|m| m.current_leader)
    }

    /// Builds a snapshot of the applied state now (normally every 10,000 entries) and waits for it.
    pub async fn snapshot_now(&self) -> Result<(), GroupError> {
        let want = self.applied_index();
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| GroupError::Unavailable(e.to_string()))?;
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.snapshot.map(|l| l.index) >= want, "a snapshot")
            .await
            .map(|_| ())
            .map_err(|e| GroupError::Unavailable(e.to_string()))
    }

    /// This replica's node id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Why this replica stopped on its own (its log or store failed, or it panicked), if it
    /// has; not when it was shut down.
    pub fn stopped(&self) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        match &m.running_state {
            Ok(()) | Err(openraft::error::Fatal::Stopped) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Stops this replica.
    pub async fn shutdown(&self) {
        self.router.remove(self.id);
        let _ = self.raft.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Instant;

    use sealfs_rpc::{ClusterKey, Server, ServerConfig, ServerHandle};

    use super::*;
    use crate::wal::held;

    /// A machine that keeps the commands applied.
    #[derive(Default)]
    struct Applied(Vec<Vec<u8>>);

    impl Machine for Applied {
        fn apply(&mut self, command: &[u8]) -> Vec<u8> {
            self.0.push(command.to_vec());
            Vec::new()
        }
        fn snapshot(&self) -> Vec<u8> {
            postcard::to_stdvec(&self.0).unwrap()
        }
        fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
            self.0 = postcard::from_bytes(snapshot).map_err(|e| e.to_string())?;
            Ok(())
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < end, "{what}: not within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    type Replica = (Group, ServerHandle, PathBuf);

    /// Three replicas of a group, each with its own log folder and RPC server; returns them and
    /// which one leads.
    async fn three(dir: &std::path::Path) -> (Vec<Replica>, usize) {
        let key = ClusterKey::from_secret(b"raft group test secret");
        let mut rs: Vec<Replica> = Vec::new();
        for node in 1..=3 {
            let router = Arc::new(RaftRouter::default());
            let server = Server::bind(
                "127.0.0.1:0",
                key.clone(),
                ServerConfig::default(),
                router.clone(),
            )
            .await
            .unwrap();
            let wal = dir.join(format!("raft{node}"));
            let log = LogDb::open(&wal).unwrap();
            let machine = Box::new(Applied::default());
            let g = Group::start(7, node, &log, machine, router, Peers::new(key.clone()))
                .await
                .unwrap();
            rs.push((g, server, wal));
        }
        let members = rs
            .iter()
            .map(|(g, s, _)| (g.node(), s.addr().to_string()))
            .collect();
        rs[0].0.initialize(members).await.unwrap();
        until("a leader", || rs.iter().any(|r| r.0.is_leader())).await;
        let l = rs.iter().position(|r| r.0.is_leader()).unwrap();
        (rs, l)
    }

    /// A second command given to a leader whose syncs are held, after a first one.
    struct Held {
        rs: Vec<Replica>,
        /// Which replica leads.
        l: usize,
        leader: Group,
        /// The index the second command goes to.
        x: u64,
        /// The leader's term.
        term: u64,
        /// The second command's answer.
        write: tokio::task::JoinHandle<Result<Vec<u8>, GroupError>>,
    }

    /// [`three`], after one command, with the leader's syncs held, and a second command
    /// given to the leader.
    async fn three_with_the_leaders_sync_held(dir: &std::path::Path) -> Held {
        let (rs, l) = three(dir).await;
        let leader = rs[l].0.clone();
        leader.write(b"one".to_vec()).await.unwrap();
        held::set(&rs[l].2, true);
        let (x, term) = {
            let m = leader.raft.metrics().borrow().clone();
            (m.last_log_index.unwrap() + 1, m.current_term)
        };
        let write = tokio::spawn({
            let leader = leader.clone();
            async move { leader.write(b"two".to_vec()).await }
        });
        Held {
            rs,
            l,
            leader,
            x,
            term,
            write,
        }
    }

    /// Waits until a replica other than `old` leads, has it take a command, and returns
    /// its applied index then.
    async fn another_leader_writes(rs: &[Replica], old: usize) -> Option<u64> {
        let other = || {
            rs.iter()
                .enumerate()
                .position(|(i, r)| i != old && r.0.is_leader())
        };
        until("another leader", || other().is_some()).await;
        let n = other().unwrap();
        tokio::time::timeout(Duration::from_secs(10), rs[n].0.write(b"three".to_vec()))
            .await
            .expect("the new leader answers")
            .unwrap();
        rs[n].0.applied_index()
    }

    async fn stop(rs: Vec<Replica>) {
        for (g, s, _) in rs {
            g.shutdown().await;
            s.shutdown().await;
        }
    }

    /// The leader's sync and a follower's run side by side, yet a command is applied and
    /// answered only once the leader's disk has it, and no follower is told it is committed
    /// before then (see `unsynced`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_replicates_while_it_syncs_and_applies_only_what_it_synced() {
        let dir = tempfile::tempdir().unwrap();
        let Held {
            rs,
            l,
            leader,
            x,
            term,
            write,
        } = three_with_the_leaders_sync_held(dir.path()).await;
        let followers: Vec<Group> = (0..3)
            .filter(|i| *i != l)
            .map(|i| rs[i].0.clone())
            .collect();
        // (A leader that waited for its own sync before sending would also stop its
        // heartbeats, and lose its place: the entry must come in the leader's term.)
        until(
            "the followers have the entry while the leader syncs",
            || {
                followers.iter().all(|f| {
                    let m = f.raft.metrics();
                    let m = m.borrow();
                    m.current_term == term && m.last_log_index >= Some(x)
                })
            },
        )
        .await;
        // Heartbeats go out every 250 ms with the committed index (and stop once the sync
        // has waited `unsynced::STALL`, 2.5 s).
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!write.is_finished(), "answered before the leader synced");
        assert!(
            leader.is_leader(),
            "the leader lost its place while it synced"
        );
        for (g, _, _) in &rs {
            assert!(
                g.applied_index() < Some(x),
                "node {} applied an entry the leader has not synced",
                g.node()
            );
        }

        held::set(&rs[l].2, false);
        tokio::time::timeout(Duration::from_secs(10), write)
            .await
            .expect("answered once synced")
            .unwrap()
            .unwrap();
        until("every replica applied it", || {
            rs.iter().all(|r| r.0.applied_index() >= Some(x))
        })
        .await;
        stop(rs).await;
    }

    /// A leader whose sync hangs applies nothing, so it must not keep its place by its
    /// heartbeats: it falls silent and the others elect one of them, which goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_whose_sync_hangs_gives_way() {
        let dir = tempfile::tempdir().unwrap();
        let Held {
            rs,
            l,
            write: stuck,
            ..
        } = three_with_the_leaders_sync_held(dir.path()).await;
        let x = another_leader_writes(&rs, l).await;

        held::set(&rs[l].2, false);
        // The old leader's command was on the followers: the new leader committed it.
        let _ = tokio::time::timeout(Duration::from_secs(10), stuck).await;
        until("every replica applied everything", || {
            rs.iter().all(|r| r.0.applied_index() >= x)
        })
        .await;
        stop(rs).await;
    }

    /// A leader whose log cannot sync (a disk's write error) applies and answers nothing it
    /// did not sync, and stops; the others elect one of them, which commits the command the
    /// old leader had sent them, and goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_whose_sync_fails_answers_nothing_and_the_others_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let Held {
            rs,
            l,
            leader: old,
            x,
            write: failed,
            ..
        } = three_with_the_leaders_sync_held(dir.path()).await;
        let others: Vec<usize> = (0..3).filter(|i| *i != l).collect();
        until("the followers have the entry", || {
            others
                .iter()
                .all(|i| rs[*i].0.raft.metrics().borrow().last_log_index >= Some(x))
        })
        .await;
        held::fail(&rs[l].2, true);
        held::set(&rs[l].2, false);
        let r = tokio::time::timeout(Duration::from_secs(10), failed)
            .await
            .expect("the failed leader answers")
            .unwrap();
        assert!(r.is_err(), "acknowledged a command its disk did not sync");
        assert!(
            old.applied_index() < Some(x),
            "applied a command it did not sync"
        );
        let y = another_leader_writes(&rs, l).await;
        until(
            "the others applied the old leader's command and the new one",
            || others.iter().all(|i| rs[*i].0.applied_index() >= y),
        )
        .await;
        assert!(y > Some(x));
        held::fail(&rs[l].2, false);
        stop(rs).await;
    }
}
