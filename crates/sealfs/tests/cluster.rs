//! A manager and four servers as separate processes on loopback: servers register and heartbeat,
//! blades are placed over all their disks, `sealfs status` shows it, and a SIGKILLed server is
//! declared down and comes back up when it restarts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use sealfs_manager::map::ServerState;
use sealfs_manager::ManagerClient;
use sealfs_rpc::ClusterKey;

mod common;

const SECRET: &str = "cluster test cluster secret";

struct Proc(Child, String);

impl Drop for Proc {
    fn drop(&mut self) {
        common::kill(&mut self.0);
    }
}

fn spawn(args: &[String]) -> Proc {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (child, addr) = common::start_listening(&args, &[("SEALFS_SECRET", SECRET)]);
    Proc(child, addr)
}

fn server(dir: &Path, s: usize, manager: &str, listen: &str) -> Proc {
    let mut args: Vec<String> = vec![
        "server".into(),
        "--manager".into(),
        manager.into(),
        "--listen".into(),
        listen.into(),
    ];
    args.extend([
        "--data-dir".into(),
        dir.join(format!("s{s}/state")).display().to_string(),
    ]);
    for d in 0..4 {
        let disk: PathBuf = dir.join(format!("s{s}/disk{d}"));
        std::fs::create_dir_all(&disk).unwrap();
        args.extend(["--disk".into(), disk.display().to_string()]);
    }
    spawn(&args)
}

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_register_blades_spread_and_dead_servers_go_down() {
    let dir = tempfile::tempdir().unwrap();
    // Addresses kept across restarts, picked where no outgoing connection takes them.
    let mut addrs = common::free_addrs(5);
    let manager = spawn(&[
        "manager".into(),
        "--listen".into(),
        addrs.remove(0),
        "--data-dir".into(),
        dir.path().join("manager").display().to_string(),
        "--down-after-ms".into(),
        "1500".into(),
    ]);
    let mut servers: Vec<Proc> = (0..4)
        .map(|s| server(dir.path(), s, &manager.1, &addrs[s]))
        .collect();
    let m = ManagerClient::new(&manager.1, ClusterKey::from_secret(SECRET.as_bytes()));
    let map = until("4 servers up", async || {
        let map = m.map().await.ok()?;
        (map.servers
            .values()
            .filter(|s| s.state == ServerState::Up && s.disks.len() == 4)
            .count()
            == 4)
            .then_some(map)
    })
    .await;
    assert!(map
        .servers
        .values()
        .all(|s| s.disks.iter().all(|d| d.capacity > 0)));

    // A blade over the 16 disks of the 4 servers.
    let (blade, b) = m.allocate(8, 8, 4).await.unwrap();
    let mut disks: Vec<(u64, u32)> = b.shards.iter().map(|h| (h.server, h.disk)).collect();
    disks.sort();
    disks.dedup();
    assert_eq!(disks.len(), 16);
    assert!(
        m.allocate(8, 8, 9).await.is_err(),
        "a bad profile is refused"
    );

    // `sealfs status` shows it.
    let out = Command::new(env!("CARGO_BIN_EXE_sealfs"))
        .args(["--manager", &manager.1, "status"])
        .env("SEALFS_SECRET", SECRET)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("servers: 4 (4 up)") && text.contains(&format!("blade {blade:08x} 8+8+4")),
        "{text}"
    );

    // A SIGKILLed server is declared down after the timeout, with a new epoch; restarted, it is up.
    let epoch = m.map().await.unwrap().epoch;
    let addr = servers[2].1.clone();
    drop(servers.remove(2));
    let map = until("server declared down", async || {
        let map = m.map().await.ok()?;
        map.servers
            .values()
            .any(|s| s.addr == addr && s.state == ServerState::Down)
            .then_some(map)
    })
    .await;
    assert!(map.epoch > epoch);
    assert!(
        m.allocate(8, 8, 4).await.is_err(),
        "12 disks up cannot hold a 16-shard blade"
    );
    servers.push(server(dir.path(), 2, &manager.1, &addr));
    until("server up again", async || {
        let map = m.map().await.ok()?;
        map.servers
            .values()
            .any(|s| s.addr == addr && s.state == ServerState::Up)
            .then_some(())
    })
    .await;
    assert_eq!(
        m.map().await.unwrap().servers.len(),
        4,
        "same address, same server"
    );
    // The map survives a restart of the manager (its Raft log is on disk).
    let before = m.map().await.unwrap();
    let maddr = manager.1.clone();
    drop(manager);
    let manager = spawn(&[
        "manager".into(),
        "--listen".into(),
        maddr.clone(),
        "--data-dir".into(),
        dir.path().join("manager").display().to_string(),
    ]);
    let m = ManagerClient::new(&manager.1, ClusterKey::from_secret(SECRET.as_bytes()));
    let after = until("the manager back", async || m.map().await.ok()).await;
    assert_eq!(after.blades, before.blades);
    assert_eq!(after.servers.len(), 4);
}
