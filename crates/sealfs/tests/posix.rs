//! The mount under real suites and programs, each on a `sealfs up` of its own:
//! - pjdfstest on the mount beside the machine's own disk, in the same run;
//! - fsx, 100,000 operations; fio --verify=crc32c of 1 GiB sequential and of 4 KiB random
//!   writes, read back after the caches are dropped;
//! - git (a 2,000-file commit and fsck), tar and diff -r of a real source tree, sqlite3 with
//!   10,000 inserts and its integrity check, a C build, and flock and fcntl locks.
//!
//! The tools come from scripts/test (Debian packages and `cargo install`).

use std::collections::BTreeMap;
use std::path::Path;

mod common;
use common::{drop_caches, run, Up};

/// pjdfstest's verdict per test name ("ok", "FAILED", "skipped") and its summary line.
fn pjdfstest(dir: &Path, config: &Path) -> (BTreeMap<String, String>, String) {
    // pjdfstest exits non-zero when a test fails: read its report either way.
    let out = std::process::Command::new("timeout")
        .args(["900", "pjdfstest", "-c"])
        .arg(config)
        .arg("-p")
        .arg(dir)
        .current_dir(dir)
        .output()
        .expect("pjdfstest (scripts/test installs it: cargo install --locked pjdfstest)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut verdicts = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        if let (Some(name), Some(v), None) = (w.next(), w.next(), w.next()) {
            if name.contains("::") && ["ok", "FAILED", "skipped"].contains(&v) {
                verdicts.insert(name.to_string(), v.to_string());
            }
        }
    }
    let summary = text
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| panic!("no summary from pjdfstest: {}", common::tail(&text, 3000)))
        .to_string();
    (verdicts, summary)
}

#[test]
fn pjdfstest_passes_what_the_local_disk_passes() {
    let up = Up::start();
    let config = up.dir.path().join("pjdfstest.toml");
    std::fs::write(
        &config,
        r#"[features]
posix_fallocate = {}
utimensat = {}
utime_now = {}
rename_ctime = {}
[settings]
naptime = 0.01
allow_remount = false
[dummy_auth]
entries = [["nobody", "nogroup"], ["daemon", "daemon"]]
"#,
    )
    .unwrap();
    // The machine's own disk: a folder beside the test's data (not tmpfs).
    let local = up.dir.path().join("local");
    std::fs::create_dir(&local).unwrap();
    let (on_disk, disk_summary) = pjdfstest(&local, &config);
    let ours = up.mnt.join("pjdfstest");
    std::fs::create_dir(&ours).unwrap();
    let (on_sealfs, sealfs_summary) = pjdfstest(&ours, &config);
    println!("local disk: {disk_summary}\nsealfs:     {sealfs_summary}");
    assert!(on_disk.len() > 300, "{disk_summary}");

    // Every test that passes on the local disk passes on the mount, but one that pjdfstest
    // itself skips there: glibc cannot tell LINK_MAX for a FUSE file system (pathconf says
    // 127, "unknown"), so link::link_count_max does not run (docs/mount.md).
    let not_run_on_fuse = ["link::link_count_max"];
    let mut missing = Vec::new();
    for (name, v) in &on_disk {
        let ours = on_sealfs.get(name).map(String::as_str).unwrap_or("absent");
        if v == "ok" && ours != "ok" && !(ours == "skipped" && not_run_on_fuse.contains(&&**name)) {
            missing.push(format!("{name}: {ours}"));
        }
    }
    assert!(
        missing.is_empty(),
        "pass on the local disk, not on sealfs: {missing:?}"
    );
    let failed: Vec<&String> = on_sealfs
        .iter()
        .filter(|(_, v)| *v == "FAILED")
        .map(|(n, _)| n)
        .collect();
    assert!(failed.is_empty(), "failed on sealfs: {failed:?}");
}

#[test]
fn fsx_finds_no_miscompare() {
    let up = Up::start();
    let work = up.mnt.join("fsx");
    std::fs::create_dir(&work).unwrap();
    let artifacts = up.dir.path().join("fsx-artifacts");
    std::fs::create_dir(&artifacts).unwrap();
    let out = run(
        &work,
        1500,
        "fsx",
        &[
            "-N",
            "100000",
            "-S",
            "20261202",
            "-P",
            artifacts.to_str().unwrap(),
            work.join("file").to_str().unwrap(),
        ],
    );
    assert!(out.contains("All operations completed A-OK"), "{out}");
}

/// A test of its own, so that it runs beside fsx (the two are the longest of the suite).
#[test]
fn fio_verify_finds_no_miscompare() {
    let up = Up::start();
    // fio writes with a CRC-32C in every block, the caches are dropped, and a second run
    // of the same job reads every block back and checks it.
    let fio = up.mnt.join("fio");
    std::fs::create_dir(&fio).unwrap();
    for (name, rw, bs, size) in [
        ("sequential", "write", "1M", "1G"),
        ("random", "randwrite", "4k", "64M"),
    ] {
        let file = fio.join(name);
        let job = [
            format!("--name={name}"),
            format!("--filename={}", file.display()),
            format!("--rw={rw}"),
            format!("--bs={bs}"),
            format!("--size={size}"),
            "--ioengine=psync".into(),
            "--verify=crc32c".into(),
            "--end_fsync=1".into(),
        ];
        let mut args: Vec<&str> = job.iter().map(String::as_str).collect();
        args.push("--do_verify=0");
        let out = run(&fio, 600, "fio", &args);
        assert!(out.contains("err= 0"), "{out}");
        drop_caches();
        args.pop();
        args.push("--verify_only");
        let out = run(&fio, 600, "fio", &args);
        assert!(out.contains("err= 0"), "{out}");
        assert!(!out.contains("verify:"), "{out}");
    }
}

/// A real source tree to copy: a crate's sources from cargo's registry, else this repository.
fn source_tree() -> std::path::PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cargo"));
    let registry = home.join("registry/src");
    let found = std::fs::read_dir(&registry).ok().and_then(|d| {
        d.flatten().find_map(|index| {
            let mut v: Vec<_> = std::fs::read_dir(index.path())
                .ok()?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("tokio-1."))
                })
                .collect();
            v.sort();
            v.pop()
        })
    });
    found.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

#[test]
fn programs_run_on_the_mount() {
    let up = Up::start();
    let m = &up.mnt;

    // git: a 2,000-file tree, committed and checked.
    let repo = m.join("repo");
    for d in 0..40 {
        let dir = repo.join(format!("dir{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..50 {
            let body = format!("file {d}/{f}\n").repeat(1 + (d * 50 + f) % 37);
            std::fs::write(dir.join(format!("f{f:02}.txt")), body).unwrap();
        }
    }
    run(&repo, 300, "git", &["init", "-q"]);
    run(&repo, 600, "git", &["add", "-A"]);
    let id = ["-c", "user.name=sealfs", "-c", "user.email=tests@sealfs"];
    let commit: Vec<&str> = id
        .iter()
        .copied()
        .chain(["commit", "-q", "-m", "tree"])
        .collect();
    run(&repo, 600, "git", &commit);
    run(&repo, 600, "git", &["fsck", "--full", "--strict"]);
    let files = run(&repo, 300, "git", &["ls-files"]);
    assert_eq!(files.lines().count(), 2000);
    let status = run(&repo, 300, "git", &["status", "--porcelain"]);
    assert!(status.trim().is_empty(), "{status}");

    // tar: a real source tree extracted on the mount is the same as the original.
    let src = source_tree();
    let tarball = up.dir.path().join("src.tar");
    let parent = src.parent().unwrap();
    let name = src.file_name().unwrap().to_str().unwrap();
    run(
        parent,
        300,
        "tar",
        &[
            "--exclude=target",
            "--exclude=.git",
            "-cf",
            tarball.to_str().unwrap(),
            name,
        ],
    );
    let x = m.join("extract");
    std::fs::create_dir(&x).unwrap();
    run(&x, 600, "tar", &["-xf", tarball.to_str().unwrap()]);
    let original = up.dir.path().join("original");
    std::fs::create_dir(&original).unwrap();
    run(&original, 300, "tar", &["-xf", tarball.to_str().unwrap()]);
    drop_caches();
    run(
        m,
        600,
        "diff",
        &["-r", original.to_str().unwrap(), x.to_str().unwrap()],
    );

    // sqlite3: 10,000 inserts in 100 transactions, then its integrity check.
    let db = m.join("db.sqlite");
    let script = format!(
        r#"
import sqlite3
c = sqlite3.connect({db:?})
c.execute("create table t (k integer primary key, v text)")
for t in range(100):
    with c:
        for i in range(100):
            k = t * 100 + i
            c.execute("insert into t values (?, ?)", (k, "value %d" % (k * 7)))
c.close()
c = sqlite3.connect({db:?})
print(c.execute("pragma integrity_check").fetchone()[0])
print(c.execute("select count(*), sum(k) from t").fetchone())
"#,
        db = db.to_str().unwrap()
    );
    drop_caches();
    let out = run(m, 600, "python3", &["-c", &script]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["ok", "(10000, 49995000)"],
        "{out}"
    );

    // A C program built with make from the mount, and run.
    let c = m.join("cbuild");
    std::fs::create_dir(&c).unwrap();
    std::fs::write(c.join("add.h"), "int add(int a, int b);\n").unwrap();
    std::fs::write(
        c.join("add.c"),
        "#include \"add.h\"\nint add(int a, int b) { return a + b; }\n",
    )
    .unwrap();
    std::fs::write(
        c.join("main.c"),
        "#include <stdio.h>\n#include \"add.h\"\nint main(void) { printf(\"%d\\n\", add(40, 2)); return 0; }\n",
    )
    .unwrap();
    std::fs::write(
        c.join("Makefile"),
        "hello: main.o add.o\n\tcc -o $@ main.o add.o\n%.o: %.c add.h\n\tcc -O2 -c -o $@ $<\n",
    )
    .unwrap();
    run(&c, 300, "make", &[]);
    assert_eq!(
        run(&c, 60, c.join("hello").to_str().unwrap(), &[]).trim(),
        "42"
    );

    // Locks between two processes on the mount: flock and fcntl.
    let lockfile = m.join("lockfile");
    std::fs::write(&lockfile, b"x").unwrap();
    let script = format!(
        r#"
import fcntl, os, time
path = {path:?}
for kind in ("flock", "fcntl"):
    lock = (lambda f, op: fcntl.flock(f, op)) if kind == "flock" else (lambda f, op: fcntl.lockf(f, op))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        f = open(path, "r+")
        lock(f, fcntl.LOCK_EX)
        os.write(w, b"1")
        time.sleep(1.0)
        os._exit(0)
    os.read(r, 1)
    f = open(path, "r+")
    try:
        lock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print(kind, "not exclusive")
    except OSError:
        print(kind, "held")
    os.waitpid(pid, 0)
    lock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print(kind, "taken")
    f.close()
"#,
        path = lockfile.to_str().unwrap()
    );
    let out = run(m, 60, "python3", &["-c", &script]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["flock held", "flock taken", "fcntl held", "fcntl taken"],
        "{out}"
    );
}

#[test]
fn an_unlinked_open_file_lives_until_closed() {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;
    let up = Up::start();
    let p = up.mnt.join("doomed");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.write_all(b"before").unwrap();
    f.sync_all().unwrap();
    std::fs::remove_file(&p).unwrap();
    assert!(!p.exists());
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    f.write_all(b" and after").unwrap();
    f.sync_all().unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "before and after");
    // A new file of the same name is another file.
    std::fs::write(&p, b"new").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"new");
    drop(f);
    assert_eq!(std::fs::read(&p).unwrap(), b"new");
}

/// A file made here and still open is shown from what its create gave, with what this mount
/// holds for it laid over: its size after held writes, its mode after a held chmod, and its
/// link count after links are made and removed (those are not held, so they must show).
#[test]
fn an_open_files_attributes_follow_what_is_done_to_it() {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let up = Up::start();
    let (p, q) = (up.mnt.join("open"), up.mnt.join("second name"));
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.write_all(b"12345").unwrap();
    let m = f.metadata().unwrap();
    assert_eq!((m.len(), m.nlink()), (5, 1));
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .unwrap();
    assert_eq!(f.metadata().unwrap().mode() & 0o7777, 0o600);
    std::fs::hard_link(&p, &q).unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 2);
    std::fs::remove_file(&p).unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 1);
    std::fs::remove_file(&q).unwrap();
    let m = f.metadata().unwrap();
    assert_eq!((m.len(), m.nlink()), (5, 0));
    f.write_all(b"678").unwrap();
    assert_eq!(f.metadata().unwrap().len(), 8);
}

/// The mount shows a folder's attributes from the reply of a create made in it (the kernel
/// asks for them after every create); every other change made in the folder shows too.
#[test]
fn a_folders_attributes_follow_each_change_made_in_it() {
    use std::os::unix::fs::MetadataExt;
    let up = Up::start();
    let d = up.mnt.join("folder");
    std::fs::create_dir(&d).unwrap();
    let seen = || {
        let m = std::fs::metadata(&d).unwrap();
        (
            (m.mtime(), m.mtime_nsec()),
            (m.ctime(), m.ctime_nsec()),
            m.nlink(),
        )
    };
    let steps: [(&str, &dyn Fn(), u64); 8] = [
        (
            "create a",
            &|| std::fs::write(d.join("a"), b"a").unwrap(),
            2,
        ),
        (
            "create b",
            &|| std::fs::write(d.join("b"), b"b").unwrap(),
            2,
        ),
        (
            "mkdir sub",
            &|| std::fs::create_dir(d.join("sub")).unwrap(),
            3,
        ),
        (
            "create c",
            &|| std::fs::write(d.join("c"), b"c").unwrap(),
            3,
        ),
        (
            "unlink a",
            &|| std::fs::remove_file(d.join("a")).unwrap(),
            3,
        ),
        (
            "rename c",
            &|| std::fs::rename(d.join("c"), d.join("e")).unwrap(),
            3,
        ),
        (
            "rmdir sub",
            &|| std::fs::remove_dir(d.join("sub")).unwrap(),
            2,
        ),
        (
            "link b",
            &|| std::fs::hard_link(d.join("b"), d.join("f")).unwrap(),
            2,
        ),
    ];
    let mut last = seen();
    for (step, run, nlink) in steps {
        run();
        let now = seen();
        assert!(
            now.0 > last.0 && now.1 > last.1,
            "{step}: {last:?} then {now:?}"
        );
        assert_eq!(now.2, nlink, "{step}");
        last = now;
    }
    let names: std::collections::BTreeSet<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["b", "e", "f"].map(String::from).into());
}

/// A hole punched in an open file (`fallocate`), then more written than the mount holds for
/// a file: the writes go on and read back (the send the punch's zeros asked for is started,
/// not left marked as running).
#[test]
fn writes_go_on_after_a_hole_is_punched_in_an_open_file() {
    let up = Up::start();
    let script = r#"
import os, subprocess
p = "holes"
fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
os.write(fd, b"x" * (8 << 20))
os.fsync(fd)
subprocess.run(["fallocate", "-p", "-o", "0", "-l", str(8 << 20), p], check=True)
for i in range(24):
    os.write(fd, bytes([i + 1]) * (1 << 20))
os.fsync(fd)
os.close(fd)
with open(p, "rb") as f:
    data = f.read()
assert len(data) == 32 << 20, len(data)
assert data[: 8 << 20] == bytes(8 << 20), "the hole reads as zeros"
for i in range(24):
    at = (8 + i) << 20
    assert data[at : at + (1 << 20)] == bytes([i + 1]) * (1 << 20), i
print("ok")
"#;
    // SIGKILL: a write stuck in the mount ignores a plain TERM.
    let out = run(
        &up.mnt,
        120,
        "timeout",
        &["-s", "KILL", "90", "python3", "-c", script],
    );
    assert_eq!(out.trim(), "ok");
}

/// A file in more pieces than one reply names (its extents read a 16 MiB window at a time)
/// reads back right, across windows and within them, and a write made while it is open shows
/// in the next read (what was kept of its extents is dropped).
#[test]
fn a_file_in_more_pieces_than_one_reply_names_reads_back_right() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const BLOCK: usize = 4096;
    // 6 windows of 16 MiB; every other block rewritten: 24,576 extents, over the 16,384 one
    // reply carries.
    const BLOCKS: u64 = 6 * 4096;
    const WINDOW: u64 = 16 << 20;
    let block = |b: u64, round: u8| -> Vec<u8> {
        let mut v: Vec<u8> = (0..BLOCK)
            .map(|i| (b as usize * 31 + i * 7 + round as usize * 101) as u8)
            .collect();
        v[..8].copy_from_slice(&b.to_le_bytes());
        v[8] = round;
        v
    };
    let up = Up::start();
    let p = up.mnt.join("pieces");
    {
        let f = std::fs::File::create(&p).unwrap();
        let mut chunk = Vec::with_capacity(1 << 20);
        for b in 0..BLOCKS {
            chunk.extend(block(b, 0));
            if chunk.len() == 1 << 20 {
                f.write_all_at(&chunk, (b + 1) * BLOCK as u64 - (1 << 20))
                    .unwrap();
                chunk.clear();
            }
        }
        f.sync_all().unwrap();
        for b in (0..BLOCKS).step_by(2) {
            f.write_all_at(&block(b, 1), b * BLOCK as u64).unwrap();
        }
        f.sync_all().unwrap();
    }
    let want = |b: u64| block(b, b.is_multiple_of(2) as u8);
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(0o40000) // O_DIRECT: every read reaches the mount
        .open(&p)
        .unwrap();
    // Opened now, before the reads keep anything (an open drops what is kept).
    let w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    // O_DIRECT wants an aligned buffer.
    let mut space = vec![0u8; 3 * BLOCK];
    let pad = space.as_ptr().align_offset(BLOCK);
    let buf = &mut space[pad..pad + 2 * BLOCK];
    let mut read = |at: u64, len: usize| -> Vec<u8> {
        direct.read_exact_at(&mut buf[..len], at).unwrap();
        buf[..len].to_vec()
    };
    let mut seed = 0x5EA1u64;
    let mut blocks: Vec<u64> = (0..6).flat_map(|w| [w * 4096, w * 4096 + 4095]).collect();
    for _ in 0..400 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        blocks.push((seed >> 33) % BLOCKS);
    }
    for &b in &blocks {
        assert!(read(b * BLOCK as u64, BLOCK) == want(b), "block {b}");
    }
    // Two blocks across the first window's end.
    let across = read(WINDOW - BLOCK as u64, 2 * BLOCK);
    assert!(across[..BLOCK] == want(4095) && across[BLOCK..] == want(4096));
    // Rewritten while open (and sent): the next reads see it.
    for b in [5, 3 * 4096 + 1] {
        w.write_all_at(&block(b, 2), b * BLOCK as u64).unwrap();
    }
    w.sync_all().unwrap();
    for b in [5, 3 * 4096 + 1] {
        assert!(
            read(b * BLOCK as u64, BLOCK) == block(b, 2),
            "block {b} rewritten"
        );
    }
    assert!(read(6 * BLOCK as u64, BLOCK) == want(6));
}

/// The bounds on what the mount keeps of a file's extents: a window in more pieces than it
/// keeps (4,096), more windows than it keeps (64) and more window reads than it makes per
/// open (128). Reads there ask for their own range instead, and every one reads back right,
/// holes as zeros.
#[test]
fn reads_past_what_the_mount_keeps_of_a_file_read_back_right() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const WINDOW: u64 = 16 << 20;
    const WINDOWS: u64 = 136;
    // The first window in 1 KiB pieces 2 KiB apart (8,192 extents); the others in 64 pieces
    // of 4 KiB each: 16,832 extents, more than one reply names.
    const SMALL: u64 = 1024;
    const PIECES_SMALL: u64 = 8192;
    const PIECES: u64 = 64;
    // The byte written at `x` (0 in the holes).
    let byte = |x: u64| ((x as usize * 131 / 7) % 251) as u8;
    let written = |x: u64| {
        let (w, off) = (x / WINDOW, x % WINDOW);
        if w == 0 {
            off % (2 * SMALL) < SMALL
        } else {
            w < WINDOWS && off % (WINDOW / PIECES) < 4096
        }
    };
    let want = |at: u64, len: u64| -> Vec<u8> {
        (at..at + len)
            .map(|x| if written(x) { byte(x) } else { 0 })
            .collect()
    };
    let piece = |at: u64, len: u64| -> Vec<u8> { (at..at + len).map(byte).collect() };
    let big_at = |w: u64, i: u64| w * WINDOW + i * (WINDOW / PIECES);
    let up = Up::start();
    let p = up.mnt.join("sparse");
    // O_DIRECT: each 1 KiB write reaches the mount as it is (not merged into pages).
    let mut space = vec![0u8; 3 * 4096];
    let pad = space.as_ptr().align_offset(4096);
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(0o40000)
            .open(&p)
            .unwrap();
        for i in 0..PIECES_SMALL {
            let at = i * 2 * SMALL;
            let buf = &mut space[pad..pad + SMALL as usize];
            buf.copy_from_slice(&piece(at, SMALL));
            f.write_all_at(buf, at).unwrap();
        }
        for w in 1..WINDOWS {
            for i in 0..PIECES {
                let at = big_at(w, i);
                let buf = &mut space[pad..pad + 4096];
                buf.copy_from_slice(&piece(at, 4096));
                f.write_all_at(buf, at).unwrap();
            }
        }
        f.sync_all().unwrap();
    }
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(0o40000) // every read reaches the mount
        .open(&p)
        .unwrap();
    let mut read = |at: u64, len: usize| -> Vec<u8> {
        let buf = &mut space[pad..pad + len];
        direct.read_exact_at(buf, at).unwrap();
        buf.to_vec()
    };
    // The first window: pieces and the holes between them, and a page across its end.
    for i in [0, 1, 4095, 8191] {
        let at = i * 2 * SMALL;
        assert!(read(at, 4096) == want(at, 4096), "first window, piece {i}");
    }
    // Every other window twice over: 270 window reads, past what one open keeps and makes.
    for pass in 0..2 {
        for w in 1..WINDOWS {
            let i = (w * 7 + pass * 3) % PIECES;
            let at = big_at(w, i);
            assert!(
                read(at, 4096) == piece(at, 4096),
                "window {w} piece {i} pass {pass}"
            );
            assert!(
                read(at + 4096, 4096).iter().all(|&b| b == 0),
                "the hole after window {w} piece {i}"
            );
        }
    }
}

/// A folder's listing brings its entries' attributes (readdirplus): each shows as a stat of
/// it would, files, folders (their inodes in other partitions), a symlink, and an open file
/// whose bytes the mount still holds; the listing goes on across batches.
#[test]
fn a_listing_shows_each_entry_as_a_stat_would() {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let up = Up::start();
    let d = up.mnt.join("listed");
    std::fs::create_dir(&d).unwrap();
    let mut want = BTreeMap::new();
    for i in 0..300u64 {
        std::fs::write(d.join(format!("f{i}")), vec![7u8; i as usize]).unwrap();
        want.insert(format!("f{i}"), ('f', i));
    }
    for i in 0..5 {
        std::fs::create_dir(d.join(format!("s{i}"))).unwrap();
        want.insert(format!("s{i}"), ('d', 0));
    }
    std::os::unix::fs::symlink("f1", d.join("l")).unwrap();
    want.insert("l".into(), ('l', 2));
    let mut open = std::fs::File::create(d.join("open")).unwrap();
    open.write_all(&[1; 10]).unwrap();
    want.insert("open".into(), ('f', 10));
    // Past the attribute TTL, so that what the stats below see is what the listing brought.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let listed: BTreeMap<String, (char, u64)> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            let kind = match m.mode() & 0o170000 {
                0o040000 => 'd',
                0o120000 => 'l',
                _ => 'f',
            };
            let size = if kind == 'd' { 0 } else { m.len() };
            (e.file_name().into_string().unwrap(), (kind, size))
        })
        .collect();
    assert_eq!(listed, want);
    drop(open);
}
