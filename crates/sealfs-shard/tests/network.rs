//! A holdfast whose 16 shards live on 4 servers (each a shard service over 4 disks) reached over
//! real sockets on loopback: servers stop and come back, nothing acknowledged is lost.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kelp::{
    frond, BladeLayout, Holdfast, HoldfastConfig, LocalStore, LocalStoreConfig, Profile, Reference,
};
use sealfs_rpc::{Client, ClientConfig, ClusterKey, Server, ServerConfig, ServerHandle};
use sealfs_shard::{spread_layout, ShardService};

const BLADE: u32 = 0x51;

fn key() -> ClusterKey {
    ClusterKey::from_secret(b"network test")
}

struct Node {
    disks: Vec<PathBuf>,
    addr: String,
    handle: Option<ServerHandle>,
}

impl Node {
    async fn start(disks: Vec<PathBuf>, addr: &str, name: &str) -> Node {
        let store = LocalStore::open(name, &disks, LocalStoreConfig::default()).unwrap();
        let service = Arc::new(ShardService::new(Arc::new(store)));
        let handle = Server::bind(addr, key(), ServerConfig::default(), service)
            .await
            .unwrap();
        Node {
            disks,
            addr: handle.addr().to_string(),
            handle: Some(handle),
        }
    }

    async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }

    async fn restart(&mut self, name: &str) {
        self.stop().await;
        *self = Node::start(self.disks.clone(), &self.addr.clone(), name).await;
    }
}

async fn cluster(dir: &std::path::Path) -> Vec<Node> {
    let mut nodes = Vec::new();
    for s in 0..4 {
        let disks = (0..4)
            .map(|d| dir.join(format!("server{s}/disk{d}")))
            .collect();
        nodes.push(Node::start(disks, "127.0.0.1:0", &format!("server{s}")).await);
    }
    nodes
}

fn layout(nodes: &[Node]) -> BladeLayout {
    // One client (one connection) per server, shared by that server's four shards.
    let clients: Vec<Arc<Client>> = nodes
        .iter()
        .map(|n| Arc::new(Client::new(n.addr.clone(), key(), ClientConfig::default())))
        .collect();
    spread_layout(
        BLADE,
        Profile::default(),
        &clients,
        4,
        Duration::from_secs(5),
    )
    .unwrap()
}

fn config() -> HoldfastConfig {
    HoldfastConfig {
        op_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

async fn put(h: &Holdfast, n: usize, seed: u64, out: &mut Vec<(Reference, Vec<u8>)>) {
    let mut x = seed | 1;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 300_000) as usize;
        let data: Vec<u8> = (0..len)
            .map(|b| (b as u64 * 31 + i as u64 + seed) as u8)
            .collect();
        out.push((h.append(frond::encode(&data).unwrap()).await.unwrap(), data));
    }
}

async fn check(h: &Holdfast, fronds: &[(Reference, Vec<u8>)]) {
    for (r, d) in fronds {
        let got = h
            .read(*r)
            .await
            .unwrap_or_else(|e| panic!("read {}: {e}", r.address));
        assert!(got == d[..], "frond at {} differs", r.address);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_stop_and_return_without_losing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path()).await;
    let h = Holdfast::open(layout(&nodes), config()).await.unwrap();
    let mut fronds = Vec::new();
    put(&h, 40, 1, &mut fronds).await;
    h.sync().await.unwrap();
    check(&h, &fronds).await;
    // The cells are spread over all 16 disks of the 4 servers.
    for n in &nodes {
        for d in &n.disks {
            let files = std::fs::read_dir(d.join("kelp/blades")).unwrap().count();
            assert!(files >= 2, "{} holds a shard file", d.display());
        }
    }

    // One server stops: its 4 shards are gone; 12 of 16 still take writes and serve reads.
    nodes[1].stop().await;
    check(&h, &fronds).await;
    put(&h, 20, 2, &mut fronds).await;
    h.sync().await.unwrap();
    h.quiesce().await;
    assert!(!h.degraded().is_empty());

    // It comes back (same disks, same address): repair brings its shards up to date.
    nodes[1].restart("server1").await;
    let mut report = h.repair().await.unwrap();
    for _ in 0..20 {
        if report.cells_failed == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        report = h.scrub(None).await.unwrap();
    }
    // Repair rewrote the cells it missed, or found them already written: the writes left to
    // finish in the background may reach it once it is back. Either way nothing is left, and
    // the reads below from its 4 shards and server 0's 4 (exactly k) show its cells are current.
    assert!(
        report.cells_failed == 0 && report.unrecoverable.is_empty(),
        "{report:?}"
    );
    assert_eq!(h.scrub(None).await.unwrap().stipes_fixed, 0);

    // Two servers stop: 8 shards left, exactly k. Reads still work; writes fail clearly.
    nodes[2].stop().await;
    nodes[3].stop().await;
    check(&h, &fronds).await;
    let started = std::time::Instant::now();
    let err = h
        .append(frond::encode(b"no quorum").unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("of the 12"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // Everything back; a holdfast opened afresh over the network recovers the blade.
    nodes[2].restart("server2").await;
    nodes[3].restart("server3").await;
    drop(h);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let h = Holdfast::open(layout(&nodes), config()).await.unwrap();
    check(&h, &fronds).await;
    let report = h.scrub(None).await.unwrap();
    assert!(
        report.unrecoverable.is_empty() && report.cells_failed == 0,
        "{report:?}"
    );
    put(&h, 5, 3, &mut fronds).await;
    check(&h, &fronds).await;
    for n in &mut nodes {
        n.stop().await;
    }
}
