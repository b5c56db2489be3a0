//! Running the `sealfs` binary from tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How a started `sealfs` process turned out.
pub enum Started {
    /// Running; its first line of output.
    Running(Child, String),
    /// It exited before printing a line: its exit code and what it wrote to stderr.
    Exited(Option<i32>, String),
}

/// Starts `sealfs` with `args` and `env` (SEALFS_SECRET is cleared unless given) and waits up to
/// 20 s for its first line of output.
pub fn start(args: &[&str], env: &[(&str, &str)]) -> Started {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sealfs"));
    cmd.args(args)
        .env_remove("SEALFS_SECRET")
        .env(
            "SEALFS_LOG",
            std::env::var("SEALFS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start sealfs");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
    if line.is_empty() {
        let out = child.wait_with_output().expect("wait for sealfs");
        return Started::Exited(
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
    }
    // Keep draining stderr so that a chatty process never blocks on a full pipe; into
    // SEALFS_TEST_LOGS/PID.log when that folder is given (to look into a failure).
    if let Some(mut err) = child.stderr.take() {
        let to = std::env::var_os("SEALFS_TEST_LOGS").and_then(|d| {
            let path = std::path::Path::new(&d).join(format!("{}.log", child.id()));
            std::fs::File::create(path).ok()
        });
        std::thread::spawn(move || match to {
            Some(mut f) => std::io::copy(&mut err, &mut f),
            None => std::io::copy(&mut err, &mut std::io::sink()),
        });
    }
    Started::Running(child, line)
}

/// Starts a process that must come up; returns it and the address its first line names.
pub fn start_listening(args: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    match start(args, env) {
        Started::Running(child, line) => {
            let addr = line
                .split("listening on ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
                .to_string();
            (child, addr)
        }
        Started::Exited(code, err) => panic!("sealfs {args:?} exited ({code:?}): {err}"),
    }
}

/// Stops a child with SIGKILL and reaps it.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `n` distinct loopback addresses with ports free right now (for a process that must keep its address
/// across restarts), below the kernel's ephemeral range: a port from that range could be taken
/// by some outgoing connection before the process binds it.
pub fn free_addrs(n: usize) -> Vec<String> {
    let held = sealfs_rpc::ports::quiet_listeners("127.0.0.1", n).expect("bind free ports");
    held.iter()
        .map(|l| l.local_addr().expect("address").to_string())
        .collect()
}

/// A running `sealfs` process, killed (SIGKILL) when dropped.
pub struct Proc(pub Child, pub String);

impl Drop for Proc {
    fn drop(&mut self) {
        kill(&mut self.0);
    }
}

/// A manager and `n` servers with 4 disks each, as separate processes, under one folder.
pub struct Cluster {
    pub dir: std::path::PathBuf,
    pub secret: String,
    pub manager: Option<Proc>,
    pub manager_addr: String,
    pub servers: Vec<Option<Proc>>,
    pub server_addrs: Vec<String>,
    pub partitions: u32,
    /// Flags given to every server after the usual ones.
    pub server_flags: Vec<String>,
}

impl Cluster {
    /// Starts the manager (P partitions, 3 replicas) and `n` servers.
    pub fn start(dir: &std::path::Path, n: usize, partitions: u32) -> Cluster {
        Cluster::start_with(dir, n, partitions, &[])
    }

    /// [`Cluster::start`], each server given `server_flags` too.
    pub fn start_with(
        dir: &std::path::Path,
        n: usize,
        partitions: u32,
        server_flags: &[&str],
    ) -> Cluster {
        let mut addrs = free_addrs(n + 1);
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            secret: "files test cluster secret".into(),
            manager: None,
            manager_addr: addrs.remove(0),
            servers: (0..n).map(|_| None).collect(),
            server_addrs: addrs,
            partitions,
            server_flags: server_flags.iter().map(|f| f.to_string()).collect(),
        };
        c.start_manager();
        for s in 0..n {
            c.start_server(s);
        }
        c
    }

    fn spawn(&self, args: &[String]) -> Proc {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (child, addr) = start_listening(&args, &[("SEALFS_SECRET", self.secret.as_str())]);
        Proc(child, addr)
    }

    pub fn start_manager(&mut self) {
        let args: Vec<String> = [
            "manager",
            "--listen",
            &self.manager_addr,
            "--data-dir",
            &self.dir.join("manager").display().to_string(),
            "--down-after-ms",
            "3000",
            "--partitions",
            &self.partitions.to_string(),
            "--replicas",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.manager = Some(self.spawn(&args));
    }

    pub fn start_server(&mut self, s: usize) {
        let mut args: Vec<String> = vec![
            "--manager".into(),
            self.manager_addr.clone(),
            "server".into(),
            "--listen".into(),
            self.server_addrs[s].clone(),
            "--data-dir".into(),
            self.dir.join(format!("s{s}/state")).display().to_string(),
            "--orphan-grace-ms".into(),
            "10000".into(),
        ];
        for d in 0..4 {
            let disk = self.dir.join(format!("s{s}/disk{d}"));
            std::fs::create_dir_all(&disk).expect("disk folder");
            args.extend(["--disk".into(), disk.display().to_string()]);
        }
        args.extend(self.server_flags.iter().cloned());
        self.servers[s] = Some(self.spawn(&args));
    }

    /// SIGKILLs server `s`.
    pub fn kill_server(&mut self, s: usize) {
        self.servers[s] = None;
    }

    /// SIGKILLs every process.
    pub fn kill_all(&mut self) {
        for s in &mut self.servers {
            *s = None;
        }
        self.manager = None;
    }

    /// The cluster key.
    pub fn key(&self) -> sealfs_rpc::ClusterKey {
        sealfs_rpc::ClusterKey::from_secret(self.secret.as_bytes())
    }

    /// Runs the `sealfs` CLI against this cluster; its exit code, stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_sealfs"))
            .arg("--manager")
            .arg(&self.manager_addr)
            .args(args)
            .env("SEALFS_SECRET", &self.secret)
            .env("SEALFS_LOG", "error")
            .output()
            .expect("run sealfs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// True if `at` is a mount point of this process's namespace.
pub fn mounted(at: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == at.to_str())
}

/// A `sealfs up` process (a manager, 4 servers and the mount, in one process) on a folder of
/// its own; SIGKILLed and unmounted when dropped.
pub struct Up {
    pub child: Child,
    pub mnt: std::path::PathBuf,
    pub dir: tempfile::TempDir,
}

impl Up {
    /// Starts `sealfs up` with 8 partitions and waits until it has mounted.
    pub fn start() -> Up {
        let dir = tempfile::tempdir().expect("temporary folder");
        let mnt = dir.path().join("mnt");
        let data = dir.path().join("data");
        let args = [
            "up",
            mnt.to_str().expect("path"),
            "--data-dir",
            data.to_str().expect("path"),
            "--partitions",
            "8",
        ];
        match start(&args, &[]) {
            Started::Running(child, line) => {
                assert!(line.contains("mounted at"), "{line}");
                Up { child, mnt, dir }
            }
            Started::Exited(code, err) => panic!("sealfs up exited ({code:?}): {err}"),
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        kill(&mut self.child);
        if mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Runs `cmd` with `args` in `cwd`, at most `secs` seconds (coreutils `timeout`); returns its
/// output, or panics with what it printed if it failed or is not installed.
pub fn run(cwd: &std::path::Path, secs: u32, cmd: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg(secs.to_string())
        .arg(cmd)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (scripts/test installs what the tests need)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd} {args:?} in {} failed ({}): {}",
        cwd.display(),
        out.status,
        tail(&text, 4000)
    );
    text
}

/// The last `n` bytes of `s` (at a character boundary).
pub fn tail(s: &str, n: usize) -> &str {
    let mut at = s.len().saturating_sub(n);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
}

/// Empties the kernel's page, dentry and inode caches (as root), so that reads go to the
/// file system.
pub fn drop_caches() {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (needs root)");
}
