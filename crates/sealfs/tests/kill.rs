//! Real `sealfs server` processes on loopback hold a blade's shards; servers are SIGKILLed in the
//! middle of a workload and restarted, and every acknowledged frond stays intact.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kelp::{
    frond, BladeLayout, Holdfast, HoldfastConfig, Profile, Reference, ShardPlacement, ShardStore,
};
use sealfs_rpc::{Client, ClientConfig, ClusterKey};
use sealfs_shard::RemoteStore;

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
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sealfs"));
        cmd.args(["server", "--listen", listen, "--data-dir"])
            .arg(data);
        for d in disks {
            cmd.arg("--disk").arg(d);
        }
        let mut child = cmd
            .env("SEALFS_SECRET", SECRET)
            .env("SEALFS_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sealfs server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the server says where it listens");
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        Proc {
            child,
            addr,
            disks: disks.to_vec(),
            data: data.to_path_buf(),
        }
    }

    /// SIGKILL, then wait for the process to be gone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    let key = ClusterKey::from_secret(SECRET.as_bytes());
    let clients: Vec<Arc<Client>> = procs
        .iter()
        .map(|p| {
            Arc::new(Client::new(
                p.addr.clone(),
                key.clone(),
                ClientConfig::default(),
            ))
        })
        .collect();
    let shards = (0..16)
        .map(|j| ShardPlacement {
            store: Arc::new(RemoteStore::new(
                clients[j % 4].clone(),
                Duration::from_secs(5),
            )) as Arc<dyn ShardStore>,
            disk: (j / 4) as u32,
        })
        .collect();
    BladeLayout::new(BLADE, Profile::default(), shards).unwrap()
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
    let mut procs: Vec<Proc> = (0..4)
        .map(|s| {
            let disks: Vec<PathBuf> = (0..4)
                .map(|d| dir.path().join(format!("s{s}/disk{d}")))
                .collect();
            Proc::start(
                &dir.path().join(format!("s{s}/state")),
                &disks,
                "127.0.0.1:0",
            )
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
    let run = |args: &[&str], secret: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sealfs"));
        cmd.args(args).env_remove("SEALFS_SECRET");
        if let Some(s) = secret {
            cmd.env("SEALFS_SECRET", s);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let d = disk.to_str().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let (code, err) = run(
        &[
            "server",
            "--data-dir",
            state,
            "--disk",
            d,
            "--listen",
            "127.0.0.1:0",
        ],
        None,
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("no cluster secret"), "{err}");
    let (code, err) = run(
        &[
            "server",
            "--data-dir",
            state,
            "--disk",
            d,
            "--listen",
            "127.0.0.1:0",
        ],
        Some("short"),
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("at least 16 bytes"), "{err}");
    let (code, err) = run(
        &[
            "server",
            "--data-dir",
            state,
            "--disk",
            "/nonexistent/disk",
            "--listen",
            "127.0.0.1:0",
        ],
        Some(SECRET),
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("is not a folder"), "{err}");
    let (code, err) = run(
        &[
            "server",
            "--data-dir",
            state,
            "--disk",
            d,
            "--listen",
            "not an address",
        ],
        Some(SECRET),
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot listen"), "{err}");
    let (code, err) = run(&["server", "--data-dir", state], Some(SECRET));
    assert_eq!(code, Some(2));
    assert!(err.contains("no disks"), "{err}");
}

/// Starts `sealfs server` with `args` and environment `env`; returns its first line (or its
/// error), then stops it.
fn first_line(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sealfs"));
    cmd.args(args)
        .env_remove("SEALFS_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
    if line.is_empty() {
        let out = child.wait_with_output().unwrap();
        return (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    (None, line)
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
