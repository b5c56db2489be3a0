//! The manager as a group of three processes: servers and clients name all three; the loss of
//! any one (the leader included) leaves the cluster working.

use std::time::{Duration, Instant};

use sealfs_client::{NewFile, Sealfs};

mod common;
use common::{free_addrs, start_listening, Proc};

const SECRET: &str = "three managers test secret";

fn spawn(args: Vec<String>) -> Proc {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (c, a) = start_listening(&args, &[("SEALFS_SECRET", SECRET)]);
    Proc(c, a)
}

fn manager(dir: &std::path::Path, i: usize, addrs: &[String]) -> Proc {
    spawn(vec![
        "manager".into(),
        "--listen".into(),
        addrs[i].clone(),
        "--data-dir".into(),
        dir.join(format!("m{i}")).display().to_string(),
        "--peers".into(),
        addrs.join(","),
        "--partitions".into(),
        "8".into(),
        "--down-after-ms".into(),
        "3000".into(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_managers_survive_the_loss_of_any_one() {
    let dir = tempfile::tempdir().unwrap();
    let maddrs = free_addrs(3);
    let all = maddrs.join(",");
    let mut managers: Vec<Option<Proc>> = (0..3)
        .map(|i| Some(manager(dir.path(), i, &maddrs)))
        .collect();
    let _servers: Vec<Proc> = (0..4)
        .map(|s| {
            let mut a = vec![
                "--manager".to_string(),
                all.clone(),
                "server".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--data-dir".into(),
                dir.path().join(format!("s{s}/state")).display().to_string(),
            ];
            for d in 0..4 {
                let p = dir.path().join(format!("s{s}/d{d}"));
                std::fs::create_dir_all(&p).unwrap();
                a.extend(["--disk".into(), p.display().to_string()]);
            }
            spawn(a)
        })
        .collect();
    let key = sealfs_rpc::ClusterKey::from_secret(SECRET.as_bytes());
    let fs = Sealfs::connect(&all, key.clone(), "default", Duration::from_secs(60))
        .await
        .expect("connect through three managers");
    let write = |name: &'static str| {
        let fs = fs.clone();
        async move {
            let a = fs
                .create(fs.root(), name.as_bytes(), &NewFile::file(0o644))
                .await?;
            fs.write(a.ino, 0, &vec![7u8; 3 << 20]).await
        }
    };
    write("before").await.unwrap();
    #[allow(clippy::needless_range_loop)] // each is killed, then started again in its slot
    // Each of the three in turn is killed (the leader among them) and brought back.
    for victim in 0..managers.len() {
        managers[victim].take();
        let m = sealfs_manager::ManagerClient::new(&all, key.clone());
        let t = Instant::now();
        let map = m.map().await.expect("the map from the two left");
        assert_eq!(map.servers.len(), 4);
        eprintln!(
            "manager {victim} killed: map served in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        // Blade allocation is a write to the map: it needs the new leader.
        m.allocate(8, 8, 4)
            .await
            .expect("allocate with two of three");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sealfs"))
            .args(["--manager", &all, "status"])
            .env("SEALFS_SECRET", SECRET)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("(4 up)"));
        managers[victim] = Some(manager(dir.path(), victim, &maddrs));
        // The one brought back takes the entries it missed before the next is killed: killed
        // before that, two of three would be behind, and the two left need two elections (the
        // one behind stands first and is refused) instead of one. Under the test command's
        // load that once took longer than the client's 10 s.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    write("after").await.unwrap();
    let (ino, _) = fs.lookup(fs.root(), b"before").await.unwrap();
    assert_eq!(fs.read(ino, 0, 3 << 20).await.unwrap(), vec![7u8; 3 << 20]);
    // Two of three down: the map cannot be changed, and says so within the deadline.
    managers[0] = None;
    managers[1] = None;
    let m = sealfs_manager::ManagerClient::new(&all, key);
    let t = Instant::now();
    assert!(m.allocate(8, 8, 4).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(15));
}
