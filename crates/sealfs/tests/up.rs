//! `sealfs up`: one process runs a manager, four servers and the mount; SIGTERM unmounts and
//! stops it; run again it finds its data; SIGKILLed right after an fsync returns, the data
//! is intact and the mount point works when it starts again.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::Proc;

fn mounted(at: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(at.to_str().unwrap()))
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if mounted(&self.0) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

/// `sealfs up`, killed when dropped (a failed test leaves no process behind).
fn up(data: &Path, mnt: &Path) -> Proc {
    let args = [
        "up",
        mnt.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--partitions",
        "8",
    ];
    match common::start(&args, &[]) {
        common::Started::Running(child, line) => {
            let p = Proc(child, mnt.display().to_string());
            assert!(line.contains("mounted at"), "{line}");
            p
        }
        common::Started::Exited(code, err) => panic!("sealfs up exited ({code:?}): {err}"),
    }
}

#[test]
fn up_mounts_stops_cleanly_and_finds_its_data_again() {
    let dir = tempfile::tempdir().unwrap();
    let (data, mnt) = (dir.path().join("data"), dir.path().join("mnt"));
    let _u = Unmount(mnt.clone());
    let mut child = up(&data, &mnt);
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::create_dir(mnt.join("dir")).unwrap();
    std::fs::write(mnt.join("dir/file"), &body).unwrap();

    // SIGTERM while a process still has its working folder in the mount: unmounted (the
    // busy mount detached), exit 0.
    let mut inside = std::process::Command::new("sleep")
        .arg("60")
        .current_dir(mnt.join("dir"))
        .spawn()
        .unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "sealfs up did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    common::kill(&mut inside);
    assert!(status.success());
    assert!(!mounted(&mnt));

    // Again: the data is there.
    let mut child = up(&data, &mnt);
    assert!(std::fs::read(mnt.join("dir/file")).unwrap() == body);

    // SIGKILL right after an fsync returns: the data is intact when it starts again.
    let mut f = std::fs::File::create(mnt.join("synced")).unwrap();
    f.write_all(&body[..1_000_000]).unwrap();
    f.sync_all().unwrap();
    common::kill(&mut child.0);
    let mut child = up(&data, &mnt);
    assert!(std::fs::read(mnt.join("synced")).unwrap() == body[..1_000_000]);
    assert!(std::fs::read(mnt.join("dir/file")).unwrap() == body);
    common::kill(&mut child.0);
}
