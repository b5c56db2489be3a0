//! Metadata through the client library on a local 4-server cluster (separate processes on
//! loopback, 4 disks each under a temporary folder): creates, stats and unlinks of empty files
//! per second with 1, 4 and 16 concurrent callers, each caller in its own directory.
//!
//! `cargo build --release -p sealfs && cargo run --release -p sealfs --example meta_bench -- [FILES_PER_LEVEL] [PARTITIONS] [CALLERS,...]`
//!
//! `META_BENCH_SERVER_THREADS=N` sets the tokio worker threads of the manager and the servers.
//!
//! Beside each rate it prints the CPU time the manager and servers took per operation (from
//! `/proc/PID/stat`). On a busy virtual machine it moves with the host as the rates do
//! (docs/meta-bench.md), so it tells builds apart only when they differ by a lot.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sealfs_client::{NewFile, Sealfs};
use sealfs_rpc::ClusterKey;

const SECRET: &str = "metadata benchmark secret";

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user and system) the processes `pids` have taken so far.
fn cpu_time(pids: &[u32]) -> Duration {
    // `/proc` counts in USER_HZ, 100 a second on Linux whatever the kernel's own tick.
    let tick = Duration::from_millis(10);
    let ticks: u64 = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|st| {
            // The fields after the command name (which may hold spaces) start with the state;
            // utime and stime are the 12th and 13th of them.
            let rest = st.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            n(11) + n(12)
        })
        .sum();
    tick * ticks as u32
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

fn spawn(bin: &std::path::Path, args: &[String]) -> Kill {
    let mut c = Command::new(bin)
        .args(args)
        .env("SEALFS_SECRET", SECRET)
        .env("SEALFS_LOG", "error")
        // Tokio's worker threads for the manager and the servers, if set (the benchmark's own
        // client keeps its default): 4 servers sharing a small machine may do better with 1.
        .envs(
            std::env::var("META_BENCH_SERVER_THREADS")
                .ok()
                .map(|n| ("TOKIO_WORKER_THREADS", n)),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sealfs");
    let mut line = String::new();
    let _ = BufReader::new(c.stdout.take().expect("stdout")).read_line(&mut line);
    assert!(line.contains("listening"), "sealfs {args:?}: {line}");
    Kill(c)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let per_level: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4000);
    let partitions: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(64);
    // A third argument picks the levels, e.g. `16` or `1,16`.
    let levels: Vec<usize> = match args.get(3) {
        None => vec![1, 4, 16],
        Some(a) => a
            .split(',')
            .map(|l| match l.parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    eprintln!("meta_bench: callers per level must be numbers above 0: {a}");
                    std::process::exit(2);
                }
            })
            .collect(),
    };
    let exe = std::env::current_exe().expect("exe");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("sealfs"))
        .expect("target folder");
    assert!(
        bin.exists(),
        "build the binary first: cargo build --release -p sealfs"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let maddr = free_addr();
    let s = |v: &str| v.to_string();
    let manager = spawn(
        &bin,
        &[
            s("manager"),
            s("--listen"),
            maddr.clone(),
            s("--data-dir"),
            dir.path().join("m").display().to_string(),
            s("--partitions"),
            partitions.to_string(),
        ],
    );
    let mut servers = Vec::new();
    for i in 0..4 {
        let mut a = vec![
            s("--manager"),
            maddr.clone(),
            s("server"),
            s("--listen"),
            free_addr(),
            s("--data-dir"),
            dir.path().join(format!("s{i}/state")).display().to_string(),
        ];
        for d in 0..4 {
            let p = dir.path().join(format!("s{i}/d{d}"));
            std::fs::create_dir_all(&p).expect("disk");
            a.extend([s("--disk"), p.display().to_string()]);
        }
        servers.push(spawn(&bin, &a));
    }
    let fs = Sealfs::connect(
        &maddr,
        ClusterKey::from_secret(SECRET.as_bytes()),
        "default",
        Duration::from_secs(60),
    )
    .await
    .expect("connect");
    println!(
        "metadata: 4 servers x 4 disks, {partitions} partitions x 3 replicas, {per_level} files per level"
    );
    let mut pids: Vec<u32> = servers.iter().map(|k: &Kill| k.0.id()).collect();
    pids.push(manager.0.id());
    println!(
        "| callers | creates/s | stats/s | unlinks/s | server CPU per create / stat / unlink (us) |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for callers in levels {
        let each = per_level / callers;
        let mut dirs = Vec::new();
        for c in 0..callers {
            let name = format!("l{callers}c{c}");
            dirs.push(
                fs.mkdir(fs.root(), name.as_bytes(), 0o755, 0, 0)
                    .await
                    .expect("mkdir")
                    .ino,
            );
        }
        let phase = |what: u8| {
            let fs = fs.clone();
            let (dirs, pids) = (dirs.clone(), pids.clone());
            async move {
                let (t, cpu) = (Instant::now(), cpu_time(&pids));
                let tasks: Vec<_> = dirs
                    .iter()
                    .map(|&d| {
                        let fs = fs.clone();
                        tokio::spawn(async move {
                            for i in 0..each {
                                let name = format!("f{i}");
                                match what {
                                    0 => {
                                        fs.create(d, name.as_bytes(), &NewFile::file(0o644))
                                            .await
                                            .expect("create");
                                    }
                                    1 => {
                                        let (ino, _) =
                                            fs.lookup(d, name.as_bytes()).await.expect("lookup");
                                        fs.getattr(ino).await.expect("stat");
                                    }
                                    _ => fs.unlink(d, name.as_bytes()).await.expect("unlink"),
                                }
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("caller");
                }
                let ops = (each * dirs.len()) as f64;
                // A process gone meanwhile counts no more: never below zero.
                let cpu = cpu_time(&pids).saturating_sub(cpu).as_secs_f64();
                (ops / t.elapsed().as_secs_f64(), cpu / ops * 1e6)
            }
        };
        let (c, cc) = phase(0).await;
        let (st, sc) = phase(1).await;
        let (u, uc) = phase(2).await;
        println!("| {callers} | {c:.0} | {st:.0} | {u:.0} | {cc:.0} / {sc:.0} / {uc:.0} |");
    }
    drop(servers);
}
