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
        .env("SEALFS_LOG", "warn")
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
    // Keep draining stderr so that a chatty process never blocks on a full pipe.
    if let Some(mut err) = child.stderr.take() {
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
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
