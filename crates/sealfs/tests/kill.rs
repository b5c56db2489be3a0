//! Real `sealfs server` processes on loopback hold a blade's shards; servers are SIGKILLed in the
//! middle of a workload and restarted, and every acknowledged frond stays intact.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use kelp::{frond, BladeLayout, Holdfast, HoldfastConfig, Profile, Reference};
use sealfs_rpc::{Client, ClientConfig, ClusterKey};
use sealfs_shard::spread_layout;

mod common;

const SECRET: &str = "kill test cluster secret";
const BLADE: u32 = 0x6b;

struct Proc {
    child: Child,
    addr: String,
    disks: Vec<PathBuf>,
    data: PathBuf,
}

impl Proc {
    fn start(data: &Path, disks: &[PathBuf], listen: &str) -> Proc {
        for d in disks {
            std::fs::create_dir_all(d).unwrap();
        }
        let data_s = data.display().to_string();
        let mut args = vec!["server", "--listen", listen, "--data-dir", &data_s];
        let disk_s: Vec<String> = disks.iter().map(|d| d.display().to_string()).collect();
        for d in &disk_s {
            args.extend(["--disk", d.as_str()]);
        }
        let (child, addr) = common::start_listening(&args, &[("SEALFS_SECRET", SECRET)]);
        Proc {
            child,
            addr,
            disks: disks.to_vec(),
            data: data.to_path_buf(),
        }
    }

    /// SIGKILL, then wait for the process to be gone.
    fn kill(&mut self) {
        common::kill(&mut self.child);
    }

    fn restart(&mut self) {
        self.kill();
        let addr = self.addr.clone();
        *self = Proc::start(&self.data.clone(), &self.disks.clone(), &addr);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn layout(procs: &[Proc]) -> BladeLayout {
    // One client (one connection) per server, shared by that server's four shards.
    let clients: Vec<Arc<Client>> = procs
        .iter()
        .map(|p| {
            Arc::new(Client::new(
                p.addr.clone(),
                ClusterKey::from_secret(SECRET.as_bytes()),
                ClientConfig::default(),
            ))
        })
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

fn data(i: usize) -> Vec<u8> {
    let len = (i * 7919) % 200_000;
    (0..len).map(|b| (b * 131 + i * 7) as u8).collect()
}

async fn check(h: &Holdfast, acked: &[(Reference, usize)]) {
    for (r, i) in acked {
        let got = h
            .read(*r)
            .await
            .unwrap_or_else(|e| panic!("frond {i} at {}: {e}", r.address));
        assert!(got == data(*i), "frond {i} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_servers_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // Addresses kept across restarts, picked where no outgoing connection takes them.
    let addrs = common::free_addrs(4);
    let mut procs: Vec<Proc> = (0..4)
        .map(|s| {
            let disks: Vec<PathBuf> = (0..4)
                .map(|d| dir.path().join(format!("s{s}/disk{d}")))
                .collect();
            Proc::start(&dir.path().join(format!("s{s}/state")), &disks, &addrs[s])
        })
        .collect();
    let h = Holdfast::open(layout(&procs), config()).await.unwrap();
    let mut acked = Vec::new();
    for i in 0..60 {
        if i == 20 {
            procs[2].kill(); // in the middle of the workload
        }
        let r = h
            .append(frond::encode(&data(i)).unwrap())
            .await
            .expect("12 of 16 shards still take writes");
        acked.push((r, i));
    }
    h.sync().await.unwrap();
    check(&h, &acked).await;

    // Server 2 comes back on its address with its disks; repair catches its shards up.
    procs[2].restart();
    let mut report = h.repair().await.unwrap();
    for _ in 0..40 {
        if report.cells_failed == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        report = h.scrub(None).await.unwrap();
    }
    assert!(
        report.cells_rewritten > 0 && report.cells_failed == 0,
        "{report:?}"
    );
    assert_eq!(h.scrub(None).await.unwrap().stipes_fixed, 0);

    // Every process killed at once in the middle of appends, then all restarted.
    let writer = {
        let h = h.clone();
        tokio::spawn(async move {
            let mut more = Vec::new();
            for i in 60..200 {
                match h.append(frond::encode(&data(i)).unwrap()).await {
                    Ok(r) => more.push((r, i)),
                    Err(_) => break,
                }
            }
            more
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    for p in &mut procs {
        p.kill();
    }
    acked.extend(writer.await.unwrap());
    drop(h);
    for p in &mut procs {
        p.restart();
    }
    let h = Holdfast::open(layout(&procs), config()).await.unwrap();
    assert!(h.recovery_report().unrecoverable.is_empty());
    check(&h, &acked).await;
    let r = h.append(frond::encode(&data(999)).unwrap()).await.unwrap();
    assert_eq!(h.read(r).await.unwrap(), data(999));
}

#[test]
fn the_server_refuses_bad_arguments_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d0");
    std::fs::create_dir_all(&disk).unwrap();
    let (d, state) = (
        disk.display().to_string(),
        dir.path().join("state").display().to_string(),
    );
    let base = ["server", "--data-dir", state.as_str()];
    let any = "127.0.0.1:0";
    let cases: [(&[&str], Option<&str>, &str); 8] = [
        (&["--disk", &d, "--listen", any], None, "no cluster secret"),
        (
            &["--disk", &d, "--listen", any],
            Some("short"),
            "at least 16 bytes",
        ),
        (
            &["--disk", "/nonexistent/disk", "--listen", any],
            Some(SECRET),
            "is not a folder",
        ),
        (
            &["--disk", &d, "--listen", "not an address"],
            Some(SECRET),
            "cannot listen",
        ),
        (&["--listen", any], Some(SECRET), "no disks"),
        (
            &["--disk", &d, "--listen", any, "--scrub-every-s", "0"],
            Some(SECRET),
            "--scrub-every-s must be at least 1",
        ),
        (
            &["--disk", &d, "--listen", any, "--seal-idle-s", "0"],
            Some(SECRET),
            "--seal-idle-s and --reclaim-every-s must be at least 1",
        ),
        (
            &["--disk", &d, "--listen", any, "--seal-mb", "0"],
            Some(SECRET),
            "--seal-mb, --seal-idle-s",
        ),
    ];
    for (extra, secret, want) in cases {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let env: Vec<(&str, &str)> = secret.map(|s| ("SEALFS_SECRET", s)).into_iter().collect();
        match common::start(&args, &env) {
            common::Started::Exited(code, err) => {
                assert_eq!(code, Some(2), "{args:?}");
                assert!(err.contains(want), "{args:?}: {err}");
            }
            common::Started::Running(mut c, line) => {
                common::kill(&mut c);
                panic!("{args:?} started: {line}");
            }
        }
    }
}

/// Starts `sealfs` and returns (None, first line) if it came up, else (exit code, stderr).
fn first_line(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    match common::start(args, env) {
        common::Started::Running(mut child, line) => {
            common::kill(&mut child);
            (None, line)
        }
        common::Started::Exited(code, err) => (code, err),
    }
}

#[test]
fn settings_come_from_flags_then_environment_then_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s);
    for d in ["a", "b", "c"] {
        std::fs::create_dir_all(p(d)).unwrap();
    }
    std::fs::write(p("secret"), format!("{SECRET}\n")).unwrap();
    let config = p("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ndisks = [\"{}\", \"{}\"]\nsecret_file = \"{}\"\n",
            p("state").display(),
            p("a").display(),
            p("b").display(),
            p("secret").display()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    // Everything from the file.
    let (_, line) = first_line(&["server", "--config", cfg], &[]);
    assert!(
        line.contains("listening on 127.0.0.1:") && line.contains("with 2 disks"),
        "{line}"
    );
    // A flag wins over the file.
    let c = p("c");
    let (_, line) = first_line(
        &["server", "--config", cfg, "--disk", c.to_str().unwrap()],
        &[],
    );
    assert!(line.contains("with 1 disks"), "{line}");
    // The environment wins over the file, and the config file can come from it too.
    let (code, err) = first_line(
        &["server"],
        &[("SEALFS_CONFIG", cfg), ("SEALFS_LISTEN", "not an address")],
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot listen on not an address"), "{err}");
    // A file with an unknown key or bad syntax is refused with its name.
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\ndiskz = []\n").unwrap();
    let (code, err) = first_line(&["server", "--config", cfg], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("server.toml") && err.contains("diskz"),
        "{err}"
    );
    std::fs::write(&config, "listen = [").unwrap();
    let (code, err) = first_line(&["server", "--config", cfg], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("server.toml"), "{err}");
}
