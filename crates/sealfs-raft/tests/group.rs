//! A group of three replicas on real sockets: writes reach every replica, a stopped leader is
//! replaced within seconds and nothing committed is lost, and a replica restarted from its redb
//! file catches up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sealfs_raft::{Group, GroupError, LogDb, Machine, Peers, RaftRouter};
use sealfs_rpc::{ClusterKey, Server, ServerConfig, ServerHandle};

/// A log of the strings written, in order.
#[derive(Default)]
struct Journal(Vec<String>);

impl Machine for Journal {
    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        self.0.push(String::from_utf8_lossy(command).into_owned());
        (self.0.len() as u64).to_le_bytes().to_vec()
    }
    fn snapshot(&self) -> Vec<u8> {
        postcard::to_stdvec(&self.0).unwrap()
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.0 = postcard::from_bytes(snapshot).map_err(|e| e.to_string())?;
        Ok(())
    }
}

fn entries(m: &dyn Machine) -> Vec<String> {
    postcard::from_bytes(&m.snapshot()).unwrap()
}

struct Replica {
    node: u64,
    addr: String,
    server: Option<ServerHandle>,
    group: Option<Group>,
    dir: std::path::PathBuf,
}

fn key() -> ClusterKey {
    ClusterKey::from_secret(b"raft test secret")
}

impl Replica {
    async fn start(node: u64, addr: &str, dir: &std::path::Path) -> Replica {
        let router = Arc::new(RaftRouter::default());
        let server = Server::bind(addr, key(), ServerConfig::default(), router.clone())
            .await
            .unwrap();
        let addr = server.addr().to_string();
        let group = Group::start(
            7,
            node,
            &LogDb::open(&dir.join(format!("node{node}.wal"))).unwrap(),
            Box::new(Journal::default()),
            router,
            Peers::new(key()),
        )
        .await
        .unwrap();
        Replica {
            node,
            addr,
            server: Some(server),
            group: Some(group),
            dir: dir.to_path_buf(),
        }
    }

    async fn stop(&mut self) {
        if let Some(g) = self.group.take() {
            g.shutdown().await;
        }
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }

    fn group(&self) -> &Group {
        self.group.as_ref().expect("running")
    }
}

async fn leader(replicas: &[Replica]) -> usize {
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if let Some(i) = replicas
            .iter()
            .position(|r| r.group.as_ref().is_some_and(|g| g.is_leader()))
        {
            return i;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader elected within 20 s");
}

async fn wait_for(r: &Replica, n: usize) -> Vec<String> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let got = r.group().read_local(entries).await;
        if got.len() >= n || Instant::now() > until {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three replicas of group 7 on loopback, their files in `dir`, started and initialized;
/// with the index of the elected leader.
async fn three(dir: &std::path::Path) -> (Vec<Replica>, usize) {
    let mut rs = Vec::new();
    for node in 1..=3 {
        rs.push(Replica::start(node, "127.0.0.1:0", dir).await);
    }
    let members: BTreeMap<u64, String> = rs.iter().map(|r| (r.node, r.addr.clone())).collect();
    rs[0].group().initialize(members).await.unwrap();
    let l = leader(&rs).await;
    (rs, l)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_the_loss_of_their_leader() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rs, l) = three(dir.path()).await;
    let mut written = Vec::new();
    for i in 0..60 {
        let cmd = format!("entry {i}");
        let reply = rs[l].group().write(cmd.clone().into_bytes()).await.unwrap();
        written.push(cmd);
        assert_eq!(
            u64::from_le_bytes(reply.try_into().unwrap()),
            written.len() as u64
        );
    }
    // A follower refuses writes and names the leader.
    let f = (l + 1) % 3;
    match rs[f].group().write(b"x".to_vec()).await {
        Err(GroupError::NotLeader(Some(addr))) => assert_eq!(addr, rs[l].addr),
        other => panic!("a follower wrote: {other:?}"),
    }
    // Linearizable read on the leader; every replica has applied it all.
    assert_eq!(rs[l].group().read(entries).await.unwrap(), written);
    for r in &rs {
        assert_eq!(wait_for(r, written.len()).await, written);
    }

    // One follower takes a snapshot (it is restored from it at the final restart).
    rs[f].group().snapshot_now().await.unwrap();
    // The leader stops: the other two elect one and go on.
    rs[l].stop().await;
    let nl = leader(&rs).await;
    assert_ne!(nl, l);
    for i in 60..90 {
        let cmd = format!("entry {i}");
        rs[nl]
            .group()
            .write(cmd.clone().into_bytes())
            .await
            .unwrap();
        written.push(cmd);
    }
    assert_eq!(rs[nl].group().read(entries).await.unwrap(), written);

    // It restarts from its redb file on its address and catches up.
    let addr = rs[l].addr.clone();
    let node = rs[l].node;
    rs[l] = Replica::start(node, &addr, &rs[l].dir.clone()).await;
    assert_eq!(wait_for(&rs[l], written.len()).await, written);

    // Two of three stopped: no majority, writes fail instead of hanging forever.
    let nl = leader(&rs).await;
    let others: Vec<usize> = (0..3).filter(|&i| i != nl).collect();
    rs[others[0]].stop().await;
    rs[others[1]].stop().await;
    // Within its read lease (900 ms after a majority last answered) the leader may still read:
    // no other can have been elected yet. Past it, it must ask a majority.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let res = tokio::time::timeout(Duration::from_secs(30), rs[nl].group().read(entries)).await;
    assert!(
        !matches!(res, Ok(Ok(_))),
        "a lone replica must not serve linearizable reads"
    );
    for r in &mut rs {
        r.stop().await;
    }

    // Every replica restarts from its file (one of them from a snapshot plus the log after it):
    // a leader is elected again and all that was committed is there.
    let mut rs2 = Vec::new();
    for r in &rs {
        rs2.push(Replica::start(r.node, &r.addr, &r.dir).await);
    }
    let l = leader(&rs2).await;
    assert_eq!(rs2[l].group().read(entries).await.unwrap(), written);
    rs2[l]
        .group()
        .write(b"after the restart".to_vec())
        .await
        .unwrap();
    written.push("after the restart".into());
    for r in &rs2 {
        assert_eq!(wait_for(r, written.len()).await, written);
    }
    for r in &mut rs2 {
        r.stop().await;
    }
}

/// A snapshot chunk from a peer names its own offset. One far past what has arrived is refused
/// (a cursor would fill the gap with a terabyte of zeros and abort the process), and the group
/// goes on committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_chunk_far_past_the_end_is_refused() {
    use openraft::error::{InstallSnapshotError, RaftError};
    use openraft::raft::{InstallSnapshotRequest, InstallSnapshotResponse};
    use openraft::{SnapshotMeta, Vote};
    use sealfs_rpc::{Client, ClientConfig, Request};

    let dir = tempfile::tempdir().unwrap();
    let (mut rs, l) = three(dir.path()).await;
    rs[l].group().write(b"before".to_vec()).await.unwrap();
    let f = (l + 1) % 3;

    let client = Client::new(rs[f].addr.clone(), key(), ClientConfig::default());
    type Answer = Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>;
    let chunk = |offset: u64| {
        let req: InstallSnapshotRequest<sealfs_raft::TypeConfig> = InstallSnapshotRequest {
            vote: Vote::new_committed(1_000, rs[l].node),
            meta: SnapshotMeta {
                snapshot_id: "far".into(),
                ..Default::default()
            },
            offset,
            data: vec![1],
            done: false,
        };
        Request {
            op: sealfs_raft::network::OP_SNAPSHOT,
            epoch: 0,
            meta: postcard::to_stdvec(&7u64).unwrap().into(),
            data: postcard::to_stdvec(&req).unwrap().into(),
        }
    };
    let send = |offset: u64| {
        let (client, req) = (&client, chunk(offset));
        async move {
            let resp = client.call(req, Duration::from_secs(10)).await.unwrap();
            assert_eq!(resp.status, 0, "{:?}", resp.meta);
            postcard::from_bytes::<Answer>(&resp.data).unwrap()
        }
    };
    assert!(send(0).await.is_ok(), "the first chunk is taken");
    let far = send(1 << 40).await;
    assert!(far.is_err(), "a chunk at 1 TiB was taken: {far:?}");

    // The follower and its group are unharmed.
    rs[l].group().write(b"after".to_vec()).await.unwrap();
    assert_eq!(wait_for(&rs[f], 2).await, ["before", "after"]);
    for r in &mut rs {
        r.stop().await;
    }
}
