//! The FUSE mount as a program uses it: a manager, four servers and `sealfs mount` as separate
//! processes, files made, written, read, renamed, linked and removed through the kernel; a
//! second mount sees what the first closed; SIGTERM unmounts cleanly; a mount left stale by a
//! SIGKILLed client is recovered by the next `sealfs mount`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::{Cluster, Proc};

fn contents(i: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&i.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    out
}

/// `sealfs mount` of the cluster's volume at `at`, killed when dropped (a failed test leaves
/// no process behind).
fn mount(c: &Cluster, at: &Path) -> Proc {
    // A stale mount point (ENOTCONN) exists but cannot be looked at: sealfs mount deals with it.
    let _ = std::fs::create_dir_all(at);
    let args = ["--manager", &c.manager_addr, "mount", at.to_str().unwrap()];
    match common::start(&args, &[("SEALFS_SECRET", c.secret.as_str())]) {
        common::Started::Running(child, line) => {
            let p = Proc(child, at.display().to_string());
            assert!(line.contains("mounted at"), "{line}");
            p
        }
        common::Started::Exited(code, err) => panic!("sealfs mount exited ({code:?}): {err}"),
    }
}

fn mounted(at: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(at.to_str().unwrap()))
}

fn stop(mut p: Proc, at: &Path) {
    let child = &mut p.0;
    // SIGTERM: it unmounts and exits.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let t = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(status.success(), "sealfs mount exited with {status}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "sealfs mount did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!mounted(at), "still mounted after SIGTERM");
}

/// Unmounts (lazily) whatever a failed test leaves mounted.
struct Unmount(Vec<std::path::PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for p in &self.0 {
            if mounted(p) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(p)
                    .status();
            }
        }
    }
}

#[test]
fn files_through_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 4, 8);
    let m = dir.path().join("mnt");
    let _unmount = Unmount(vec![m.clone(), dir.path().join("mnt2")]);
    let child = mount(&c, &m);
    assert!(mounted(&m));

    // Files of many sizes, written and read back.
    for (i, len) in [0usize, 1, 4095, 4096, 100_000, 3 << 20, (5 << 20) + 7]
        .into_iter()
        .enumerate()
    {
        let p = m.join(format!("f{i}"));
        std::fs::write(&p, contents(i as u64, len)).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), len as u64);
        assert!(
            std::fs::read(&p).unwrap() == contents(i as u64, len),
            "f{i}"
        );
    }
    // Overwrite in the middle, extend, truncate.
    let p = m.join("f5");
    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.seek(SeekFrom::Start(1000)).unwrap();
    f.write_all(b"middle").unwrap();
    f.seek(SeekFrom::Start((3 << 20) + 10)).unwrap();
    f.write_all(b"past the end").unwrap();
    drop(f);
    let mut want = contents(5, 3 << 20);
    want[1000..1006].copy_from_slice(b"middle");
    want.resize((3 << 20) + 10, 0);
    want.extend_from_slice(b"past the end");
    assert!(std::fs::read(&p).unwrap() == want);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(2000)
        .unwrap();
    assert!(std::fs::read(&p).unwrap() == want[..2000]);
    // Small reads at odd offsets.
    let mut f = std::fs::File::open(m.join("f6")).unwrap();
    f.seek(SeekFrom::Start(4_000_001)).unwrap();
    let mut buf = vec![0u8; 10_000];
    f.read_exact(&mut buf).unwrap();
    assert!(buf == contents(6, (5 << 20) + 7)[4_000_001..4_010_001]);

    // Directories, renames, links.
    std::fs::create_dir_all(m.join("a/b/c")).unwrap();
    std::fs::rename(m.join("f4"), m.join("a/b/c/moved")).unwrap();
    assert!(std::fs::read(m.join("a/b/c/moved")).unwrap() == contents(4, 100_000));
    assert!(!m.join("f4").exists());
    std::fs::rename(m.join("a/b"), m.join("b2")).unwrap();
    assert!(m.join("b2/c/moved").exists());
    std::fs::hard_link(m.join("f3"), m.join("b2/hard")).unwrap();
    assert_eq!(std::fs::metadata(m.join("f3")).unwrap().nlink(), 2);
    std::os::unix::fs::symlink("f3", m.join("sym")).unwrap();
    assert_eq!(
        std::fs::read_link(m.join("sym")).unwrap().to_str(),
        Some("f3")
    );
    assert!(std::fs::read(m.join("sym")).unwrap() == contents(3, 4096));
    let mut names: Vec<String> = std::fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["a", "b2", "f0", "f1", "f2", "f3", "f5", "f6", "sym"]
    );
    assert!(std::fs::remove_dir(m.join("b2")).is_err(), "not empty");
    std::fs::remove_file(m.join("b2/hard")).unwrap();
    assert_eq!(std::fs::metadata(m.join("f3")).unwrap().nlink(), 1);
    std::fs::remove_dir_all(m.join("b2")).unwrap();
    assert!(!m.join("b2").exists());
    // Permissions and errors as the kernel reports them.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(m.join("f1"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        std::fs::metadata(m.join("f1")).unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read(m.join("nothing")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    assert!(std::fs::create_dir(m.join("a")).is_err());
    assert!(std::fs::write(m.join("x".repeat(256)), b"").is_err());

    // A second mount sees what the first wrote and closed, and its renames.
    let m2 = dir.path().join("mnt2");
    let child2 = mount(&c, &m2);
    assert!(std::fs::read(m2.join("f6")).unwrap() == contents(6, (5 << 20) + 7));
    std::fs::write(m2.join("from2"), b"written on the second").unwrap();
    std::fs::rename(m.join("f2"), m.join("f2-renamed")).unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // past the kernel's 1 s caches
    assert_eq!(
        std::fs::read(m.join("from2")).unwrap(),
        b"written on the second"
    );
    assert!(m2.join("f2-renamed").exists() && !m2.join("f2").exists());
    // Close-to-open: a file the second mount wrote and read (its kernel holds its size and
    // times for the attribute TTL) and the first then grew and closed reads whole when
    // opened again there at once, and shows its new size. (Before the mount told its kernel
    // to drop what it held, it read "aaaa" for up to a second; with the kernel's writeback
    // cache, which keeps a file's own size over the server's, for as long as it was cached.)
    for round in 0..3 {
        let name = format!("grown{round}");
        std::fs::write(m2.join(&name), b"aaaa").unwrap();
        assert_eq!(std::fs::read(m2.join(&name)).unwrap(), b"aaaa");
        assert_eq!(std::fs::metadata(m2.join(&name)).unwrap().len(), 4);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(m.join(&name))
            .unwrap();
        f.write_all(b"bbbbbb").unwrap();
        drop(f);
        let mut f = std::fs::File::open(m2.join(&name)).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 10);
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"aaaabbbbbb");
    }

    // Mode, owner and times set on a file with bytes held (as tar does before close) show at
    // once on this mount, and reach the other with the bytes at close. A write after an
    // mtime was set moves it on again.
    let long_ago = std::time::UNIX_EPOCH + Duration::from_secs(1_153_704_088);
    let held = m.join("held");
    let mut f = std::fs::File::create(&held).unwrap();
    f.write_all(b"bytes held until close").unwrap();
    f.set_modified(long_ago).unwrap();
    std::os::unix::fs::fchown(&f, Some(1), Some(2)).unwrap();
    f.set_permissions(std::fs::Permissions::from_mode(0o640))
        .unwrap();
    let here = std::fs::metadata(&held).unwrap();
    assert_eq!(
        (here.mode() & 0o7777, here.uid(), here.gid(), here.len()),
        (0o640, 1, 2, 22)
    );
    assert_eq!(here.modified().unwrap(), long_ago);
    drop(f);
    std::thread::sleep(Duration::from_millis(1100));
    let there = std::fs::metadata(m2.join("held")).unwrap();
    assert_eq!(
        (there.mode() & 0o7777, there.uid(), there.gid()),
        (0o640, 1, 2)
    );
    assert_eq!(there.modified().unwrap(), long_ago);
    assert_eq!(
        std::fs::read(m2.join("held")).unwrap(),
        b"bytes held until close"
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&held)
        .unwrap();
    f.write_all(b"!").unwrap();
    f.set_modified(long_ago).unwrap();
    f.write_all(b"!").unwrap();
    drop(f);
    std::thread::sleep(Duration::from_millis(1100));
    let there = std::fs::metadata(m2.join("held")).unwrap();
    assert_eq!(there.len(), 24);
    assert!(
        there.modified().unwrap() > long_ago,
        "a write after the mtime"
    );

    // Xattrs of a file made here and open: absent ones are known without asking (the kernel
    // asks before every write), and one set or removed through the mount is seen at once.
    use rustix::fs::{fgetxattr, fremovexattr, fsetxattr, XattrFlags};
    let mut f = std::fs::File::create_new(m.join("xattrs")).unwrap();
    let mut buf = [0u8; 64];
    f.write_all(b"one").unwrap();
    assert!(fgetxattr(&f, "user.k", &mut buf).is_err(), "absent");
    fsetxattr(&f, "user.k", b"v1", XattrFlags::empty()).unwrap();
    f.write_all(b"two").unwrap();
    assert_eq!(fgetxattr(&f, "user.k", &mut buf).unwrap(), 2);
    assert_eq!(&buf[..2], b"v1");
    fremovexattr(&f, "user.k").unwrap();
    assert!(fgetxattr(&f, "user.k", &mut buf).is_err(), "removed");
    fsetxattr(&f, "user.k", b"v2", XattrFlags::empty()).unwrap();
    drop(f);
    std::thread::sleep(Duration::from_millis(1100));
    let g = std::fs::File::open(m2.join("xattrs")).unwrap();
    assert_eq!(fgetxattr(&g, "user.k", &mut buf).unwrap(), 2);
    assert_eq!(&buf[..2], b"v2");
    assert_eq!(std::fs::read(m2.join("xattrs")).unwrap(), b"onetwo");

    // copy_file_range shares the source's fronds (std::fs::copy and std::io::copy use it):
    // a large file, an inline one, and a sparse source over a destination with bytes, whose
    // holes must read back as zeros there.
    std::fs::copy(m.join("f6"), m.join("f6-copy")).unwrap();
    assert!(std::fs::read(m2.join("f6-copy")).unwrap() == contents(6, (5 << 20) + 7));
    std::fs::copy(m.join("held"), m.join("held-copy")).unwrap();
    assert_eq!(
        std::fs::read(m.join("held-copy")).unwrap(),
        b"bytes held until close!!"
    );
    let sparse = m.join("sparse");
    let mut src = std::fs::File::create(&sparse).unwrap();
    src.set_len(3 << 20).unwrap();
    src.seek(SeekFrom::Start(1 << 20)).unwrap();
    src.write_all(b"data between holes").unwrap();
    drop(src);
    std::fs::write(m.join("over"), vec![b'x'; 4 << 20]).unwrap();
    let mut src = std::fs::File::open(&sparse).unwrap();
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .open(m.join("over"))
        .unwrap();
    assert_eq!(std::io::copy(&mut src, &mut dst).unwrap(), 3 << 20);
    drop(dst);
    let mut want = vec![0u8; 3 << 20];
    want[1 << 20..(1 << 20) + 18].copy_from_slice(b"data between holes");
    want.extend(vec![b'x'; 1 << 20]);
    assert!(std::fs::read(m2.join("over")).unwrap() == want);
    // SEEK_DATA and SEEK_HOLE see the holes.
    use rustix::fs::{seek, SeekFrom as At};
    let f = std::fs::File::open(&sparse).unwrap();
    assert_eq!(seek(&f, At::Data(0)).unwrap(), 1 << 20);
    assert_eq!(seek(&f, At::Hole(0)).unwrap(), 0);
    assert_eq!(seek(&f, At::Hole(1 << 20)).unwrap(), (1 << 20) + 18);
    assert!(
        seek(&f, At::Data((1 << 20) + 18)).is_err(),
        "no data after it: ENXIO"
    );
    stop(child2, &m2);

    // SIGKILL leaves the mount point stale; the next mount recovers it.
    let mut child = child;
    common::kill(&mut child.0);
    std::thread::sleep(Duration::from_millis(1200)); // past the cached attributes of the root
    let err = std::fs::read_dir(&m).map(|_| ()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(107), "ENOTCONN: {err}");
    let child = mount(&c, &m);
    assert!(std::fs::read(m.join("f6")).unwrap() == contents(6, (5 << 20) + 7));
    stop(child, &m);
}
