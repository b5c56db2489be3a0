//! Files end to end: a manager and four servers with four disks each as separate processes on
//! loopback, files put and got through the client library (and the CLI), servers SIGKILLed in
//! the middle of the work.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sealfs_client::{Error, FileKind, NewFile, Sealfs};
use sealfs_meta::{now_nanos, partition_of, second_step, Op, Reply, SetAttr};

mod common;
use common::Cluster;

/// Deterministic contents of file `i`, `len` bytes.
fn contents(i: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&i.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    out
}

async fn connect(c: &Cluster) -> Sealfs {
    Sealfs::connect(&c.manager_addr, c.key(), "default", Duration::from_secs(60))
        .await
        .expect("connect")
}

async fn put(fs: &Sealfs, name: &str, data: &[u8]) -> Result<u64, Error> {
    let a = fs
        .create(fs.root(), name.as_bytes(), &NewFile::file(0o644))
        .await?;
    fs.write(a.ino, 0, data).await?;
    Ok(a.ino)
}

async fn get(fs: &Sealfs, name: &str) -> Result<Vec<u8>, Error> {
    let (ino, _) = fs.lookup(fs.root(), name.as_bytes()).await?;
    let size = fs.getattr(ino).await?.size;
    fs.read(ino, 0, size).await
}

/// The files under `dir` (at any depth) whose names end in `.ext`, in a stable order.
fn files_under(dir: &Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == ext) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Shard files with data on each disk of each server.
fn shard_files(dir: &Path, servers: usize) -> BTreeMap<(usize, usize), usize> {
    let mut out = BTreeMap::new();
    for s in 0..servers {
        for d in 0..4 {
            let files = files_under(&dir.join(format!("s{s}/disk{d}")), "kelp");
            let n = files
                .iter()
                .filter(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
                .count();
            out.insert((s, d), n);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_files_round_trip_spread_over_all_disks_with_metadata_on_three_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 4, 8);
    let fs = connect(&c).await;
    // Sizes from 0 bytes to 64 MiB: many small, some of several fronds, two of 64 MiB.
    let sizes: Vec<usize> = (0..200u64)
        .map(|i| match i {
            0 => 0,
            1 => 1,
            2 => 4095,
            3 => 4096,
            4 => 4080 * 8 + 1,
            5 | 6 => 64 << 20,
            i if i % 10 == 0 => (2 << 20) + (i as usize * 7919) % (6 << 20),
            i => (i as usize * 104_729) % (256 << 10),
        })
        .collect();
    let t = Instant::now();
    let fsr = &fs;
    futures::future::try_join_all(sizes.iter().enumerate().map(|(i, &len)| async move {
        put(fsr, &format!("f{i:03}"), &contents(i as u64, len)).await
    }))
    .await
    .expect("put 200 files");
    let total: usize = sizes.iter().sum();
    eprintln!(
        "put 200 files, {} MiB, in {:.1} s",
        total >> 20,
        t.elapsed().as_secs_f64()
    );
    for (i, &len) in sizes.iter().enumerate() {
        let got = get(&fs, &format!("f{i:03}")).await.expect("get");
        assert_eq!(got.len(), len, "file {i} length");
        assert!(got == contents(i as u64, len), "file {i} differs");
    }
    // Small pieces from the middle of large fronds are read by themselves (their cells
    // only), across cell and stipe boundaries: the same bytes.
    let big = contents(5, 64 << 20);
    let (ino, _) = fs.lookup(fs.root(), b"f005").await.unwrap();
    for at in [
        4097u64,
        32_639,
        32_640,
        1_000_003,
        (2 << 20) + 77,
        (63 << 20) + 12_345,
    ] {
        for len in [1u64, 4096, 40_000] {
            let got = fs.read(ino, at, len).await.unwrap();
            assert!(
                got[..] == big[at as usize..(at + len) as usize],
                "{len} bytes at {at}"
            );
        }
    }
    let names: BTreeSet<Vec<u8>> = fs
        .readdir_all(fs.root())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names.len(), 200);

    // The cells are on all 16 disks of the 4 servers.
    let files = shard_files(dir.path(), 4);
    assert_eq!(files.len(), 16);
    for ((s, d), n) in &files {
        assert!(*n > 0, "server {s} disk {d} holds no shard file: {files:?}");
    }
    // Every partition has a replica (its own Raft log and state file) on exactly 3 servers.
    for p in 0..8 {
        let holders = (0..4)
            .filter(|s| {
                dir.path()
                    .join(format!("s{s}/state/meta/p{p:04}.state.redb"))
                    .exists()
            })
            .count();
        assert_eq!(holders, 3, "partition {p} replicas");
    }

    // The CLI does the same through the same library.
    let local = dir.path().join("local");
    std::fs::write(&local, contents(999, 3 << 20)).unwrap();
    let (code, _, err) = c.cli(&["mkdir", "-p", "/cli/deep/er"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = c.cli(&["put", local.to_str().unwrap(), "/cli/deep/er/"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = c.cli(&["ls", "/cli/deep/er"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("3145728 local"), "{out}");
    let back = dir.path().join("back");
    let (code, _, err) = c.cli(&["get", "/cli/deep/er/local", back.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read(&back).unwrap() == contents(999, 3 << 20));
    let (code, _, err) = c.cli(&["mv", "/cli/deep/er/local", "/moved"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = c.cli(&["rm", "/cli/deep/er"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = c.cli(&["rm", "/cli"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("not empty"), "{err}");
    let (code, out, _) = c.cli(&["stat", "/moved"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("size 3145728"), "{out}");
    let (code, out, _) = c.cli(&["status"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("all 8 partitions answer"), "{out}");
    let (code, _, err) = c.cli(&["get", "/nothing/here", "-"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no such file"), "{err}");
}

/// Puts files `f{from}..` until `stop`; returns the names and contents of those acknowledged.
async fn workload(fs: Sealfs, from: u64, count: u64) -> Vec<(String, usize)> {
    let mut done = Vec::new();
    for i in from..from + count {
        let len = ((i * 7919) as usize % (3 << 20)) + 1;
        let name = format!("w{i:04}");
        let t = Instant::now();
        match put(&fs, &name, &contents(i, len)).await {
            Ok(_) => done.push((name, len)),
            Err(e) => eprintln!("put {name} failed after {:?}: {e:?}", t.elapsed()),
        }
    }
    done
}

fn index_of(name: &str) -> u64 {
    name[1..].parse().unwrap()
}

async fn check_all(fs: &Sealfs, files: &[(String, usize)]) {
    for (name, len) in files {
        let got = get(fs, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == contents(index_of(name), *len), "{name} changed");
    }
}

async fn healthy(c: &Cluster, within: Duration) {
    let t = Instant::now();
    loop {
        let (code, out, _) = c.cli(&["status"]);
        if code == Some(0)
            && out.contains("(4 up)")
            && out.contains("partitions answer")
            && out.contains("replicas: all")
            && out.contains("degraded stipes: 0")
            && !out.contains("did not answer")
        {
            return;
        }
        assert!(t.elapsed() < within, "cluster not healthy: {out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_workload_loses_nothing_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 4, 8);
    let fs = connect(&c).await;
    let before = workload(fs.clone(), 0, 20).await;
    assert_eq!(before.len(), 20);
    let running = tokio::spawn(workload(fs.clone(), 100, 30));
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill_server(1);
    let killed_at = Instant::now();
    // Reads work within seconds: hedged shard reads, partitions that elect a new leader.
    check_all(&fs, &before).await;
    eprintln!(
        "all {} files read back {:.1} s after the kill",
        before.len(),
        killed_at.elapsed().as_secs_f64()
    );
    let during = running.await.unwrap();
    // Writes resume: new files go in with a server down.
    let after = workload(fs.clone(), 200, 10).await;
    if after.len() != 10 {
        let (_, status, _) = c.cli(&["status"]);
        panic!(
            "writes resume with one server down: {} of 10 went in\n{status}",
            after.len()
        );
    }
    check_all(&fs, &during).await;
    check_all(&fs, &after).await;
    // The stipes written while it was down miss its cells: the holdfasts know them.
    let (_, out, _) = c.cli(&["status"]);
    let degraded: u64 = out
        .split("degraded stipes: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(degraded > 0, "no stipe waits for the killed server: {out}");
    c.start_server(1);
    // It catches up: repair rewrites its cells, its partitions replay their logs.
    healthy(&c, Duration::from_secs(60)).await;
    eprintln!("{degraded} degraded stipes repaired after the restart");
    let all: Vec<(String, usize)> = before.into_iter().chain(during).chain(after).collect();
    check_all(&fs, &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_killed_reads_go_on_where_a_majority_is_left_and_the_rest_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 4, 8);
    let mut fs = connect(&c).await;
    // Files in 16 directories, so that they spread over the partitions.
    let mut files = Vec::new();
    for d in 0..16u64 {
        let dn = format!("d{d}");
        let di = fs
            .mkdir(fs.root(), dn.as_bytes(), 0o755, 0, 0)
            .await
            .unwrap()
            .ino;
        for j in 0..3u64 {
            let i = d * 10 + j;
            let len = ((i * 7919) as usize % (1 << 20)) + 1;
            let a = fs
                .create(di, format!("f{j}").as_bytes(), &NewFile::file(0o644))
                .await
                .unwrap();
            fs.write(a.ino, 0, &contents(i, len)).await.unwrap();
            files.push((di, d, j, a.ino, len));
        }
    }
    let map = fs.map();
    let ids: Vec<u64> = c
        .server_addrs
        .iter()
        .map(|a| *map.servers.iter().find(|(_, s)| &s.addr == a).unwrap().0)
        .collect();
    c.kill_server(2);
    c.kill_server(3);
    let dead: BTreeSet<u64> = [ids[2], ids[3]].into();
    let has_majority = |p: u32| {
        map.partitions[p as usize]
            .iter()
            .filter(|s| !dead.contains(s))
            .count()
            >= 2
    };
    fs.set_deadline(Duration::from_secs(2));
    let (mut served, mut refused) = (0, 0);
    for (di, d, j, ino, len) in &files {
        if !has_majority(partition_of(*di)) && *j > 0 {
            // One refused file per directory is enough (each waits out the deadline).
            continue;
        }
        let t = Instant::now();
        let r = async {
            let (found, _) = fs.lookup(*di, format!("f{j}").as_bytes()).await?;
            assert_eq!(found, *ino);
            fs.read(*ino, 0, *len as u64).await
        }
        .await;
        if has_majority(partition_of(*di)) {
            let got = r.unwrap_or_else(|e| panic!("d{d}/f{j} on a partition with a majority: {e}"));
            assert!(got == contents(d * 10 + j, *len), "d{d}/f{j} changed");
            served += 1;
        } else {
            assert_eq!(r.err(), Some(Error::UNAVAILABLE), "d{d}/f{j}");
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "failed after {:?}",
                t.elapsed()
            );
            refused += 1;
        }
    }
    // Every partition answers or fails within its deadline.
    let mut lost = 0;
    for p in 0..8 {
        let t = Instant::now();
        let r = fs.meta().read(p, &sealfs_meta::Query::Usage).await;
        assert_eq!(r.is_ok(), has_majority(p), "partition {p}: {r:?}");
        if r.is_err() {
            lost += 1;
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "partition {p} took {:?}",
                t.elapsed()
            );
        }
    }
    eprintln!(
        "with 2 of 4 servers: {served} files served, {refused} refused as unavailable, {lost} of 8 partitions without a majority"
    );
    c.start_server(2);
    c.start_server(3);
    healthy(&c, Duration::from_secs(60)).await;
    fs.set_deadline(Duration::from_secs(10));
    for (_, d, j, ino, len) in &files {
        let got = fs.read(*ino, 0, *len as u64).await.unwrap();
        assert!(got == contents(d * 10 + j, *len), "d{d}/f{j} after restart");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_killed_mid_workload_every_acknowledged_file_is_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 4, 8);
    let fs = connect(&c).await;
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let a2 = acked.clone();
    let f2 = fs.clone();
    let task = tokio::spawn(async move {
        for i in 0..1000u64 {
            let len = ((i * 7919) as usize % (3 << 20)) + 1;
            let name = format!("k{i:04}");
            if put(&f2, &name, &contents(i, len)).await.is_ok() {
                a2.lock().unwrap().push((name, len));
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    c.kill_all();
    task.abort();
    let acked: Vec<(String, usize)> = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    drop(fs);
    c.start_manager();
    for s in 0..4 {
        c.start_server(s);
    }
    healthy(&c, Duration::from_secs(60)).await;
    let fs = connect(&c).await;
    check_all(&fs, &acked).await;
    eprintln!(
        "{} acknowledged files intact after every process was killed",
        acked.len()
    );
}

/// A directory made on another partition than its parent, and so on: runs the steps of each
/// two-partition operation by hand, stopping after each (as a client killed there would),
/// and checks that the orphan scan leaves the namespace whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_partition_operations_stopped_at_every_step_are_settled() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 4, 8);
    let fs = connect(&c).await;
    let root = fs.root();
    let parts = fs.meta().partitions();
    // Names whose directory lands on another partition than the root's.
    let remote = |prefix: &str| -> Vec<String> {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .filter(|n| sealfs_meta::dir_partition(root, n.as_bytes(), parts) != partition_of(root))
            .take(4)
            .collect()
    };
    let w = |p: u32, op: Op| {
        let fs = fs.clone();
        async move { fs.meta().write(p, &op).await.and_then(Reply::err) }
    };
    // A mkdir's first step alone: a pending directory `name` of the root, on partition `p`.
    let alloc = |p: u32, name: &str| {
        let op = Op::MkdirAlloc {
            parent: root,
            name: name.as_bytes().to_vec(),
            perm: 0o755,
            uid: 0,
            gid: 0,
            volume: 1,
            now: 0,
        };
        let w = w(p, op);
        async move {
            match w.await.unwrap() {
                Reply::Attr(a) => a,
                r => panic!("{r:?}"),
            }
        }
    };

    // A rename's first step alone: `name` in `src` locked for `dst` in the root.
    let lock = |src: u64, name: &str, dst: &str| {
        let op = Op::RenameLock {
            src_parent: src,
            src_name: name.as_bytes().to_vec(),
            dst_parent: root,
            dst_name: dst.as_bytes().to_vec(),
            now: 0,
        };
        w(partition_of(src), op)
    };

    // mkdir stopped after step 1 (pending inode, no entry): the scan removes the inode.
    let names = remote("mk");
    let p = sealfs_meta::dir_partition(root, names[0].as_bytes(), parts);
    let orphan = alloc(p, &names[0]).await;
    // mkdir complete, then rmdir stopped after step 1 (dying, entry still there): the scan
    // brings the directory back to life.
    let kept = fs
        .mkdir(root, names[1].as_bytes(), 0o755, 0, 0)
        .await
        .unwrap();
    w(
        partition_of(kept.ino),
        Op::RmdirPrepare {
            ino: kept.ino,
            parent: root,
            name: names[1].as_bytes().to_vec(),
            now: 0,
        },
    )
    .await
    .unwrap();
    // A file linked across partitions, stopped after step 1 (counted, no entry): the scan
    // takes the count back.
    let sub = fs
        .mkdir(root, names[2].as_bytes(), 0o755, 0, 0)
        .await
        .unwrap();
    let file = fs
        .create(sub.ino, b"file", &NewFile::file(0o644))
        .await
        .unwrap();
    assert_ne!(partition_of(file.ino), partition_of(root));
    w(
        partition_of(file.ino),
        Op::LinkPrepare {
            ino: file.ino,
            parent: root,
            name: b"halflink".to_vec(),
            now: 0,
        },
    )
    .await
    .unwrap();
    // A rename across partitions stopped after step 2 (locked source, destination made):
    // the scan finishes it.
    let started = now_nanos();
    let moved = fs
        .create(sub.ino, b"moving", &NewFile::file(0o644))
        .await
        .unwrap();
    lock(sub.ino, "moving", "moved").await.unwrap();
    // The coordinator's partition leader is killed between the steps.
    let map = fs.map();
    let leader = fs.meta().leader(partition_of(root)).unwrap();
    let victim = c
        .server_addrs
        .iter()
        .position(|a| map.servers[&leader].addr == *a)
        .unwrap();
    c.kill_server(victim);
    // Step 2 waits for a new leader. Past its deadline (half the scan's grace after step 1
    // began) it is refused, and the scan unlocks the source instead: either way, one name.
    let put = Op::RenameIn {
        ino: moved.ino,
        kind: FileKind::File,
        src_parent: sub.ino,
        dst_parent: root,
        dst_name: b"moved".to_vec(),
        noreplace: false,
        now: 0,
    };
    let renamed = match w(partition_of(root), second_step(started, put)).await {
        Ok(_) => true,
        Err(Error::TIMEDOUT) => false,
        Err(e) => panic!("rename's step 2: {e}"),
    };
    // And a rename locked whose destination never came: the scan unlocks it.
    fs.create(sub.ino, b"staying", &NewFile::file(0o644))
        .await
        .unwrap();
    lock(sub.ino, "staying", "never").await.unwrap();
    c.start_server(victim);

    // The scan (10 s grace in these servers) settles everything.
    let t = Instant::now();
    loop {
        let settled = async {
            let gone = matches!(fs.getattr(orphan.ino).await, Err(Error::NOENT));
            let alive = fs.getattr(kept.ino).await.ok()?;
            let f = fs.getattr(file.ino).await.ok()?;
            // The file under one name: the new one if step 2 was applied, else the old.
            let (new, old) = (fs.lookup(root, b"moved"), fs.lookup(sub.ino, b"moving"));
            let one_name = match (new.await, old.await) {
                (Ok((i, _)), Err(Error::NOENT)) => renamed && i == moved.ino,
                (Err(Error::NOENT), Ok((i, _))) => !renamed && i == moved.ino,
                _ => false,
            };
            // Once unlocked, the entry can be removed.
            let unlocked = match fs.unlink(sub.ino, b"staying").await {
                Ok(()) | Err(Error::NOENT) => true,
                Err(Error::BUSY) => false,
                Err(e) => panic!("unlink: {e}"),
            };
            Some(gone && alive.kind == FileKind::Dir && f.nlink == 1 && one_name && unlocked)
        }
        .await;
        if settled == Some(true) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not settled after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The revived directory takes entries again; the unlocked file can be removed.
    fs.create(kept.ino, b"inside", &NewFile::file(0o644))
        .await
        .unwrap();
    // No entry lost or duplicated; link counts right.
    let root_names: BTreeSet<Vec<u8>> = fs
        .readdir_all(root)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(root_names.contains(b"moved".as_slice()), renamed);
    assert!(!root_names.contains(names[0].as_bytes()));
    assert!(!root_names.contains(b"halflink".as_slice()));
    let sub_names: Vec<Vec<u8>> = fs
        .readdir_all(sub.ino)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    let mut want = vec![b"file".to_vec()];
    if !renamed {
        want.push(b"moving".to_vec());
        fs.unlink(sub.ino, b"moving").await.expect("unlocked");
    }
    want.sort();
    let mut sub_names = sub_names;
    sub_names.sort();
    assert_eq!(sub_names, want);
    // The full operations, across partitions, keep the counts.
    let d = fs
        .mkdir(root, names[3].as_bytes(), 0o755, 0, 0)
        .await
        .unwrap();
    assert_eq!(fs.getattr(root).await.unwrap().nlink, 2 + 3);
    fs.rename(root, names[3].as_bytes(), sub.ino, b"d", 0)
        .await
        .unwrap();
    assert_eq!(fs.getattr(sub.ino).await.unwrap().nlink, 3);
    fs.link(file.ino, root, b"hard").await.unwrap();
    assert_eq!(fs.getattr(file.ino).await.unwrap().nlink, 2);
    fs.unlink(sub.ino, b"file").await.unwrap();
    assert_eq!(fs.getattr(file.ino).await.unwrap().nlink, 1);
    fs.rmdir(sub.ino, b"d").await.unwrap();
    assert!(matches!(fs.getattr(d.ino).await, Err(Error::NOENT)));
    assert_eq!(fs.getattr(sub.ino).await.unwrap().nlink, 2);
    // A mkdir whose link was applied but answered with an error (its answer lost, and the
    // link refused when sent again): the entry names the new inode, so the mkdir succeeded and
    // the directory stays.
    let names = remote("lost");
    let p = sealfs_meta::dir_partition(root, names[0].as_bytes(), parts);
    let made = alloc(p, &names[0]).await;
    let link = Op::MkdirLink {
        parent: root,
        name: names[0].as_bytes().to_vec(),
        ino: made.ino,
        now: 0,
    };
    w(partition_of(root), link.clone()).await.unwrap();
    assert_eq!(w(partition_of(root), link).await.err(), Some(Error::EXIST));
    let (a, _) = fs
        .mkdir_link_failed(made.clone(), root, names[0].as_bytes(), Error::EXIST)
        .await
        .unwrap();
    assert_eq!(a.ino, made.ino);
    assert_eq!(fs.getattr(made.ino).await.unwrap().kind, FileKind::Dir);
    fs.create(made.ino, b"in", &NewFile::file(0o644))
        .await
        .expect("the directory is whole");
    // The same failure with the name another's: the inode made for nothing goes.
    let spare = alloc(p, &names[0]).await;
    let r = fs
        .mkdir_link_failed(spare.clone(), root, names[0].as_bytes(), Error::EXIST)
        .await;
    assert_eq!(r.err(), Some(Error::EXIST));
    assert_eq!(fs.getattr(spare.ino).await.err(), Some(Error::NOENT));

    // Second steps that come after the scan settled their first step alone are refused: a
    // mkdir's link after its pending directory went, a rename's destination after its source
    // was unlocked. Applied, the first would leave an entry naming nothing, the second a file
    // under two names.
    let names = remote("late");
    let p = sealfs_meta::dir_partition(root, names[0].as_bytes(), parts);
    let started = now_nanos();
    let gone = alloc(p, &names[0]).await;
    let late = fs
        .create(sub.ino, b"late", &NewFile::file(0o644))
        .await
        .unwrap();
    lock(sub.ino, "late", "lateout").await.unwrap();
    let t = Instant::now();
    while !matches!(fs.getattr(gone.ino).await, Err(Error::NOENT)) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "pending directory kept"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    loop {
        match fs.rename(sub.ino, b"late", sub.ino, b"late2", 0).await {
            Ok(()) => break,
            Err(Error::BUSY) => {}
            Err(e) => panic!("rename: {e}"),
        }
        assert!(t.elapsed() < Duration::from_secs(60), "source kept locked");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let link = Op::MkdirLink {
        parent: root,
        name: names[0].as_bytes().to_vec(),
        ino: gone.ino,
        now: 0,
    };
    let r = w(partition_of(root), second_step(started, link)).await;
    assert_eq!(r.err(), Some(Error::TIMEDOUT));
    assert_eq!(
        fs.lookup(root, names[0].as_bytes()).await.err(),
        Some(Error::NOENT)
    );
    let put = Op::RenameIn {
        ino: late.ino,
        kind: FileKind::File,
        src_parent: sub.ino,
        dst_parent: root,
        dst_name: b"lateout".to_vec(),
        noreplace: false,
        now: 0,
    };
    let r = w(partition_of(root), second_step(started, put)).await;
    assert_eq!(r.err(), Some(Error::TIMEDOUT));
    assert_eq!(fs.lookup(root, b"lateout").await.err(), Some(Error::NOENT));
    assert_eq!(fs.lookup(sub.ino, b"late2").await.unwrap().0, late.ino);
}

/// Whether partition `p` holds an unsettled first step decided by the entry `item`.
async fn unsettled(fs: &Sealfs, p: u32, item: (u64, &[u8], u64)) -> Result<bool, Error> {
    let q = sealfs_meta::Query::Unsettled {
        before: now_nanos(),
    };
    match fs.meta().read(p, &q).await.and_then(Reply::err)? {
        Reply::Unsettled(list) => Ok(list.iter().any(|u| u.decider() == item)),
        r => panic!("{r:?}"),
    }
}

/// A directory of the root, made, whose partition has other replicas than the root's; and
/// the indices of two servers whose loss leaves the root's partition without a majority and
/// the directory's with one (the root partition's replica the other lacks, and another).
struct Beside {
    ino: u64,
    name: String,
}

async fn directory_beside_the_root(
    c: &Cluster,
    fs: &Sealfs,
    prefix: &str,
) -> (Beside, usize, usize) {
    let root = fs.root();
    let parts = fs.meta().partitions();
    let map = fs.map();
    let replicas =
        |p: u32| -> BTreeSet<u64> { map.partitions[p as usize].iter().copied().collect() };
    let deciding = replicas(partition_of(root));
    let name = (0..1000)
        .map(|i| format!("{prefix}{i}"))
        .find(|n| replicas(sealfs_meta::dir_partition(root, n.as_bytes(), parts)) != deciding)
        .expect("a partition with other replicas than the root's");
    let made = fs.mkdir(root, name.as_bytes(), 0o755, 0, 0).await.unwrap();
    let lacking = *deciding
        .difference(&replicas(partition_of(made.ino)))
        .next()
        .unwrap();
    let second = *deciding.iter().find(|&&s| s != lacking).unwrap();
    let index = |id: u64| {
        c.server_addrs
            .iter()
            .position(|a| map.servers[&id].addr == *a)
            .unwrap()
    };
    let beside = Beside {
        ino: made.ino,
        name,
    };
    (beside, index(lacking), index(second))
}

/// The orphan scan decides a half-done operation by asking the partition that holds its
/// entry. While that partition has no majority, the scan must wait rather than guess: an
/// rmdir stopped after its first step (the directory dying, its entry still in place) keeps
/// the directory through the outage, and the scan brings it back once the partition answers.
/// A scan that took the missing answer for "no entry" would remove a directory whose entry
/// stays, a name pointing nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orphan_scan_waits_while_the_deciding_partition_has_no_majority() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 4, 8);
    let fs = connect(&c).await;
    let root = fs.root();
    let (kept, x, y) = directory_beside_the_root(&c, &fs, "outage").await;
    let dying_p = partition_of(kept.ino);
    let name = kept.name.clone();

    let prepare = Op::RmdirPrepare {
        ino: kept.ino,
        parent: root,
        name: name.as_bytes().to_vec(),
        now: 0,
    };
    fs.meta()
        .write(dying_p, &prepare)
        .await
        .and_then(Reply::err)
        .unwrap();
    let item = (root, name.as_bytes(), kept.ino);
    assert_eq!(unsettled(&fs, dying_p, item).await, Ok(true));

    c.kill_server(x);
    c.kill_server(y);
    // Past the grace (10 s in these servers), a scan's question (10 s deadline) and two more
    // passes (2 s apart).
    tokio::time::sleep(Duration::from_secs(26)).await;
    let t = Instant::now();
    let still = loop {
        match unsettled(&fs, dying_p, item).await {
            Ok(found) => break found,
            Err(e) => {
                // The dying directory's partition re-elects if a killed server led it.
                assert!(t.elapsed() < Duration::from_secs(20), "unsettled: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    assert!(
        still,
        "settled while its deciding partition had no majority"
    );
    assert_eq!(fs.getattr(kept.ino).await.unwrap().kind, FileKind::Dir);

    c.start_server(x);
    c.start_server(y);
    healthy(&c, Duration::from_secs(60)).await;
    // The scan now finds the entry and brings the directory back.
    let t = Instant::now();
    while unsettled(&fs, dying_p, item).await != Ok(false) {
        assert!(t.elapsed() < Duration::from_secs(60), "never settled");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(fs.lookup(root, name.as_bytes()).await.unwrap().0, kept.ino);
    fs.create(kept.ino, b"inside", &NewFile::file(0o644))
        .await
        .expect("the directory is whole");
    assert_eq!(fs.getattr(kept.ino).await.unwrap().nlink, 2);
}

/// A link across partitions whose second step (the entry, on the root's partition) waits out
/// its deadline while that partition has no majority: the partition refuses it once back, and
/// the client undoes the first step itself (the count taken back, no name), before the orphan
/// scan's grace is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_whose_second_step_came_too_late_is_undone_by_its_client() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 4, 8);
    let fs = connect(&c).await;
    let root = fs.root();
    let (sub, x, y) = directory_beside_the_root(&c, &fs, "linksrc").await;
    let f = fs
        .create(sub.ino, b"f", &NewFile::file(0o644))
        .await
        .unwrap();
    c.kill_server(x);
    c.kill_server(y);
    let started = Instant::now();
    let link = {
        let fs = fs.clone();
        tokio::spawn(async move { fs.link(f.ino, root, b"linked").await })
    };
    // Past the second step's deadline (half the 10 s grace; a leader takes a process start
    // and an election more), with most of the client's 10 s of retries left: the root's
    // partition comes back and elects a leader.
    tokio::time::sleep(Duration::from_millis(5_200)).await;
    c.start_server(x);
    c.start_server(y);
    let r = link.await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.err(), Some(Error::TIMEDOUT), "link after {took:?}");
    // Undone by the client: nothing left for the scan (whose grace is not up yet).
    let item = (root, b"linked".as_slice(), f.ino);
    assert_eq!(unsettled(&fs, partition_of(f.ino), item).await, Ok(false));
    assert!(
        took < Duration::from_secs(10),
        "the scan may have undone it: {took:?}"
    );
    assert_eq!(fs.getattr(f.ino).await.unwrap().nlink, 1);
    assert_eq!(fs.lookup(root, b"linked").await.err(), Some(Error::NOENT));
    // The file links again.
    fs.link(f.ino, root, b"linked").await.unwrap();
    assert_eq!(fs.getattr(f.ino).await.unwrap().nlink, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_paths_are_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 4, 8);
    let fs = connect(&c).await;
    let root = fs.root();
    let long = vec![b'a'; 256];
    for (name, want) in [
        (&b"a/b"[..], Error::INVAL),
        (b"a\0b", Error::INVAL),
        (b"", Error::INVAL),
        (b".", Error::INVAL),
        (b"..", Error::INVAL),
        (&long[..], Error::NAMETOOLONG),
    ] {
        let r = fs.create(root, name, &NewFile::file(0o644)).await;
        assert_eq!(r.err(), Some(want), "create {name:?}");
        assert_eq!(fs.mkdir(root, name, 0o755, 0, 0).await.err(), Some(want));
        // Straight to the partition, past the client's checks: refused there too.
        let op = Op::Create {
            parent: root,
            name: name.to_vec(),
            kind: FileKind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: vec![],
            exclusive: true,
            now: 0,
        };
        let r = fs.meta().write(partition_of(root), &op).await.unwrap();
        assert_eq!(r, Reply::Error(want));
    }
    let ok = vec![b'a'; 255];
    fs.create(root, &ok, &NewFile::file(0o644))
        .await
        .expect("255 bytes is allowed");
    let path = "/x".repeat(2049);
    assert_eq!(fs.resolve(&path).await.err(), Some(Error::NAMETOOLONG));
    let (code, _, err) = c.cli(&["mkdir", &path]);
    assert_eq!(code, Some(2));
    assert!(err.contains("too long"), "{err}");
    let (code, _, err) = c.cli(&["ls", "/../etc"]);
    assert_eq!(code, Some(2), "{err}");
    // A mkdir its folder refuses (the name taken, a file for a folder, no such folder) leaves
    // no directory inode behind: the client does not ask first, it undoes the inode it made.
    let inodes = fs.usage().await.unwrap().1;
    let file = fs.lookup(root, &ok).await.unwrap().0;
    let missing = (3u64 << 40) | 999_999;
    for (parent, name, want) in [
        (root, &ok[..], Error::EXIST),
        (file, b"d", Error::NOTDIR),
        (missing, b"d", Error::NOENT),
    ] {
        let r = fs.mkdir(parent, name, 0o755, 0, 0).await;
        assert_eq!(r.err(), Some(want), "mkdir in {parent:#x}");
    }
    assert_eq!(fs.usage().await.unwrap().1, inodes);
    // Only the one good name is there.
    let names = fs.readdir_all(root).await.unwrap();
    assert_eq!(names.len(), 1);
    // A malformed request to the metadata service is refused; the server goes on.
    let client = sealfs_rpc::Client::new(c.server_addrs[0].clone(), c.key(), Default::default());
    let r = client
        .call(
            sealfs_rpc::Request {
                op: sealfs_meta::OP_META_WRITE,
                epoch: 1,
                meta: bytes::Bytes::from_static(&[0xff; 7]),
                data: bytes::Bytes::new(),
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(r.status, sealfs_rpc::Status::BadRequest as u16);
    assert_eq!(fs.readdir_all(root).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_have_their_own_root_quota_and_statfs() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 4, 8);
    let default = connect(&c).await;
    let (code, out, err) = c.cli(&["volume", "create", "small", "--quota", "1M", "--ec", "4+2"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("volume small created"), "{out}");
    let (code, _, err) = c.cli(&["volume", "create", "small"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("exists"), "{err}");
    let (code, _, err) = c.cli(&["volume", "create", "bad/name"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = c.cli(&["volume", "create", "x", "--ec", "0+3"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, out, _) = c.cli(&["volume", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("small") && out.contains("default"), "{out}");

    let small = Sealfs::connect(&c.manager_addr, c.key(), "small", Duration::from_secs(30))
        .await
        .unwrap();
    assert_ne!(small.root(), default.root());
    put(&small, "a", &contents(1, 600 << 10)).await.unwrap();
    assert!(get(&small, "a").await.unwrap() == contents(1, 600 << 10));
    // Its own namespace: the default volume does not see it.
    assert_eq!(
        default.lookup(default.root(), b"a").await.err(),
        Some(Error::NOENT)
    );
    // Past the quota: EDQUOT, and nothing recorded.
    let b = small
        .create(small.root(), b"b", &NewFile::file(0o644))
        .await
        .unwrap();
    assert_eq!(
        small.write(b.ino, 0, &contents(2, 600 << 10)).await.err(),
        Some(Error::DQUOT)
    );
    assert_eq!(small.getattr(b.ino).await.unwrap().size, 0);
    let st = small.statfs().await.unwrap();
    assert_eq!(st.capacity, 1 << 20);
    assert_eq!(st.used, 600 << 10);
    assert_eq!(st.free, (1 << 20) - (600 << 10));
    // Freed space can be used again.
    small.unlink(small.root(), b"a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    small
        .write(b.ino, 0, &contents(2, 600 << 10))
        .await
        .unwrap();
    // The CLI reaches a volume by name.
    let (code, out, err) = c.cli(&["ls", "--volume", "small", "/"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(" b\n") && !out.contains(" a\n"), "{out}");
    let (code, _, err) = c.cli(&["ls", "--volume", "nope", "/"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no volume"), "{err}");
    let (code, _, err) = c.cli(&["volume", "delete", "small"]);
    assert_eq!(code, Some(0), "{err}");
    let st = default.statfs().await.unwrap();
    assert!(st.capacity > 0 && st.free <= st.capacity);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_are_stored_read_and_updated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 4, 8);
    let local = dir.path().join("blob");
    std::fs::write(&local, contents(7, 100_000)).unwrap();
    let (code, out, err) = c.cli(&["blob", "put", local.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let r = out.trim().to_string();
    let back = dir.path().join("back");
    let (code, _, err) = c.cli(&["blob", "get", &r, back.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read(&back).unwrap() == contents(7, 100_000));
    // In place: same address, a new sequence.
    std::fs::write(&local, contents(8, 100_000)).unwrap();
    let (code, out, err) = c.cli(&["blob", "update", &r, local.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let r2 = out.trim().to_string();
    assert_eq!(r2.split(':').next(), r.split(':').next(), "same address");
    assert_ne!(r2, r);
    let (code, _, err) = c.cli(&["blob", "get", &r2, back.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read(&back).unwrap() == contents(8, 100_000));
    // The older reference names the same blob: it reads the current bytes (cells must be at
    // least as new as the reference, never older).
    let (code, _, _) = c.cli(&["blob", "get", &r, back.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert!(std::fs::read(&back).unwrap() == contents(8, 100_000));
    // Bad input: a wrong length, a malformed reference.
    std::fs::write(&local, b"short").unwrap();
    let (code, _, err) = c.cli(&["blob", "update", &r2, local.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("keeps the length"), "{err}");
    let (code, _, err) = c.cli(&["blob", "get", "not-a-reference", "-"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("ADDRESS:LEN:SEQ"), "{err}");
}

/// The raft log segments under `dir` (a server's state folder).
fn log_segments(dir: &Path) -> usize {
    files_under(dir, "wal").len()
}

/// The folder a server keeps its Raft log and partition stores in fills up: its replicas stop
/// when their log finds no room, the partitions go on with the other two replicas (files are
/// written and read throughout), nothing acknowledged is lost; once the folder has room the
/// stopped replicas start again by themselves and catch up, and so they do after a restart. Mounts a tmpfs as that folder, so it needs root (as
/// CI has); elsewhere it says so and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_state_disk_fills_stops_its_replicas_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s1/state");
    let Some(disk) = sealfs_raft::testing::Tmpfs::mount(&state, "48m") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let mut c = Cluster::start(dir.path(), 4, 8);
    let fs = connect(&c).await;
    healthy(&c, Duration::from_secs(60)).await;
    // Fill what is left of the folder; the log's first segment (16 MiB) is made already.
    let filler = state.join("filler");
    let chunk = vec![0u8; 1 << 20];
    let mut f = std::fs::File::create(&filler).unwrap();
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    drop(f);
    assert_eq!(log_segments(&state), 1);
    // Files of 60 KiB (kept inline, in the Raft log) in 8 folders, so that they go to every
    // partition: about 3/4 of them, 26 MiB, pass through the full server's log.
    let mut dirs = Vec::new();
    for d in 0..8 {
        let name = format!("full{d}");
        dirs.push(
            fs.mkdir(fs.root(), name.as_bytes(), 0o755, 0, 0)
                .await
                .unwrap()
                .ino,
        );
    }
    let mut acked = Vec::new();
    let mut failures = 0;
    for i in 0..1000u64 {
        let d = dirs[i as usize % dirs.len()];
        let name = format!("f{i}");
        let r = async {
            let a = fs.create(d, name.as_bytes(), &NewFile::file(0o644)).await?;
            fs.write(a.ino, 0, &contents(i, 60 << 10)).await?;
            Ok::<u64, Error>(a.ino)
        }
        .await;
        match r {
            Ok(ino) => acked.push((i, ino)),
            Err(e) => {
                failures += 1;
                eprintln!("f{i}: {e:?}");
            }
        }
    }
    // `sealfs status` names the replicas that stopped, and why.
    let (_, st, _) = c.cli(&["status"]);
    assert!(
        st.contains("STOPPED (started again every 10 s)") && st.contains("No space left on device"),
        "{st}"
    );
    // The full server's log could not start a second segment; the others did.
    assert_eq!(log_segments(&state), 1, "the full log took a new segment");
    let others = log_segments(&dir.path().join("s0/state"));
    assert!(others > 1, "server 0's log has {others} segments");
    assert!(
        acked.len() >= 990,
        "writes go on with one server's log full: {} of 1000 ({failures} failed)",
        acked.len()
    );
    let check = |fs: Sealfs, acked: Vec<(u64, u64)>| async move {
        for (i, ino) in acked {
            let got = fs.read(ino, 0, 60 << 10).await.unwrap();
            assert!(got == contents(i, 60 << 10), "f{i} changed");
        }
    };
    check(fs.clone(), acked.clone()).await;
    // Room again: the stopped replicas start again by themselves (no restart of the server)
    // and catch up from their leaders.
    std::fs::remove_file(&filler).unwrap();
    disk.resize("256m");
    let freed = Instant::now();
    healthy(&c, Duration::from_secs(60)).await;
    eprintln!(
        "healthy {:.1} s after the disk had room",
        freed.elapsed().as_secs_f64()
    );
    check(fs.clone(), acked.clone()).await;
    // And after a restart of the server.
    c.kill_server(1);
    c.start_server(1);
    healthy(&c, Duration::from_secs(60)).await;
    check(fs.clone(), acked).await;
    // Each partition answers with the server's replica among its majority: kill another.
    c.kill_server(2);
    for i in 1000..1016u64 {
        let d = dirs[i as usize % dirs.len()];
        let a = fs
            .create(d, format!("f{i}").as_bytes(), &NewFile::file(0o644))
            .await
            .unwrap_or_else(|e| panic!("f{i} with server 2 down: {e:?}"));
        fs.write(a.ino, 0, &contents(i, 100)).await.unwrap();
        assert!(fs.read(a.ino, 0, 100).await.unwrap() == contents(i, 100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_disks_that_fill_refuse_writes_with_enospc_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Every data disk of every server is a small tmpfs: 12 x 12 MiB and, on server 3, 4 x 4 MiB
    // of cells. A 2 MiB file puts 256 KiB on each of the 16 disks (8+8).
    let mut disks = Vec::new();
    for s in 0..4 {
        for d in 0..4 {
            let at = dir.path().join(format!("s{s}/disk{d}"));
            let size = if s == 3 { "4m" } else { "12m" };
            let Some(t) = sealfs_raft::testing::Tmpfs::mount(&at, size) else {
                eprintln!("skipped: mounting a tmpfs needs root");
                return;
            };
            disks.push(t);
        }
    }
    let c = Cluster::start(dir.path(), 4, 8);
    let fs = connect(&c).await;
    healthy(&c, Duration::from_secs(60)).await;
    const LEN: usize = 2 << 20;
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..200u64 {
        let t = Instant::now();
        match put(&fs, &format!("b{i:04}"), &contents(i, LEN)).await {
            Ok(_) => acked.push((format!("b{i:04}"), LEN)),
            Err(e) => {
                refused = Some((i, e, t.elapsed()));
                break;
            }
        }
    }
    let (at, e, took) = refused.expect("200 files of 2 MiB fit on 16 disks of 12 MiB");
    eprintln!(
        "{} files went in; b{at:04} was refused after {took:?}: {e:?}",
        acked.len()
    );
    assert_eq!(e, Error::NOSPC, "a write with no room left");
    assert!(
        took < Duration::from_secs(30),
        "refused only after {took:?}"
    );
    // Server 3's disks filled first: writes went on with 12 of the 16 cells of each stipe
    // (k + w), the other 4 waiting for repair.
    assert!(
        acked.len() >= 24,
        "only {} files before the disks filled",
        acked.len()
    );
    let (_, st, _) = c.cli(&["status"]);
    assert!(!st.contains("degraded stipes: 0"), "{st}");
    // Metadata goes on (its own disk has room); small files are kept inline.
    put(&fs, "small", &contents(999, 1000)).await.unwrap();
    check_all(&fs, &acked).await;
    // Room again (disks replaced by larger ones): writes go on, nothing acknowledged changed.
    for t in &disks {
        t.resize("64m");
    }
    let t = Instant::now();
    let mut more = Vec::new();
    for i in 200..210u64 {
        let name = format!("b{i:04}");
        loop {
            match put(&fs, &name, &contents(i, LEN)).await {
                Ok(_) => break,
                Err(e) if t.elapsed() < Duration::from_secs(60) => {
                    eprintln!("{name}: {e:?}, again");
                    // The file was made before the write failed: a new name for the next try.
                    let _ = fs.unlink(fs.root(), name.as_bytes()).await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("{name}: {e:?} 60 s after the disks had room"),
            }
        }
        more.push((name, LEN));
    }
    eprintln!(
        "writes went on {:.1} s after the disks had room",
        t.elapsed().as_secs_f64()
    );
    // Repair writes the cells the full disks missed.
    healthy(&c, Duration::from_secs(60)).await;
    eprintln!(
        "healthy {:.1} s after the disks had room",
        t.elapsed().as_secs_f64()
    );
    check_all(&fs, &acked).await;
    check_all(&fs, &more).await;
    drop(c);
}

/// A healthy cluster under `dir` whose servers keep their state on a 64 MiB tmpfs each, with
/// a 24 MiB reserve; `None` (the test is skipped) where mounting a tmpfs is not allowed.
async fn short_state_cluster(
    dir: &Path,
) -> Option<(Vec<sealfs_raft::testing::Tmpfs>, Cluster, Sealfs)> {
    let mut states = Vec::new();
    for s in 0..4 {
        let at = dir.join(format!("s{s}/state"));
        let Some(t) = sealfs_raft::testing::Tmpfs::mount(&at, "64m") else {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        };
        states.push(t);
    }
    let c = Cluster::start_with(dir, 4, 8, &["--meta-reserve-mb", "24"]);
    let fs = connect(&c).await;
    healthy(&c, Duration::from_secs(60)).await;
    Some((states, c, fs))
}

/// Fills the file system holding `dir` with a file `dir/filler` until `left` bytes are free.
fn fill_to(dir: &Path, left: u64) {
    let st = rustix::fs::statvfs(dir).expect("statvfs");
    let free = st.f_bavail * st.f_frsize;
    let f = std::fs::File::create(dir.join("filler")).expect("filler");
    f.set_len(0).unwrap();
    use std::io::Write;
    let mut w = std::io::BufWriter::new(f);
    let chunk = vec![0xa5u8; 1 << 20];
    let mut want = free.saturating_sub(left);
    while want > 0 {
        let n = want.min(chunk.len() as u64) as usize;
        w.write_all(&chunk[..n]).expect("fill");
        want -= n as u64;
    }
    w.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_metadata_disk_refuses_new_entries_with_enospc_and_still_frees() {
    let dir = tempfile::tempdir().unwrap();
    // Each server's state folder (its Raft log and partition stores) is a 64 MiB tmpfs.
    let Some((_states, c, fs)) = short_state_cluster(dir.path()).await else {
        return;
    };
    let mut acked = Vec::new();
    for i in 0..20u64 {
        // Small files are kept in the metadata; every fourth has fronds on the data disks.
        let len = if i % 4 == 0 { 300 << 10 } else { 1000 };
        put(&fs, &format!("m{i:04}"), &contents(i, len))
            .await
            .unwrap();
        acked.push((format!("m{i:04}"), len));
    }
    // 12 MiB left on every state disk: under the reserve. (A leader keeps its members'
    // answers for a second.)
    for s in 0..4 {
        fill_to(&dir.path().join(format!("s{s}/state")), 12 << 20);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t = Instant::now();
    let root = fs.root();
    let made = fs.create(root, b"new", &NewFile::file(0o644)).await;
    assert_eq!(made.err(), Some(Error::NOSPC), "a create");
    let took = t.elapsed();
    assert_eq!(
        fs.mkdir(root, b"dir", 0o755, 0, 0).await.err(),
        Some(Error::NOSPC)
    );
    let (ino1, _) = fs.lookup(root, b"m0001").await.unwrap();
    assert_eq!(
        fs.link(ino1, root, b"l0001").await.err(),
        Some(Error::NOSPC)
    );
    assert_eq!(
        fs.setxattr(ino1, b"user.a", b"b", 0).await.err(),
        Some(Error::NOSPC)
    );
    let (ino4, _) = fs.lookup(root, b"m0004").await.unwrap();
    assert_eq!(
        fs.write(ino4, 0, &contents(99, 300 << 10)).await.err(),
        Some(Error::NOSPC),
        "an overwrite"
    );
    eprintln!("a create refused in {took:?}");
    assert!(took < Duration::from_secs(5), "refused only after {took:?}");
    // What frees space, or needs none, still works; nothing acknowledged changed.
    fs.unlink(root, b"m0002").await.unwrap();
    acked.retain(|(n, _)| n != "m0002");
    fs.rename(root, b"m0003", root, b"m0003-renamed", 0)
        .await
        .unwrap();
    let set = SetAttr {
        perm: Some(0o600),
        ..Default::default()
    };
    assert_eq!(fs.setattr(ino1, set).await.unwrap().perm, 0o600);
    let set = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    assert_eq!(fs.setattr(ino4, set).await.unwrap().size, 0);
    acked.retain(|(n, _)| n != "m0003" && n != "m0004");
    check_all(&fs, &acked).await;
    let got = get(&fs, "m0003-renamed").await.unwrap();
    assert!(got == contents(3, 1000), "the renamed file changed");
    // Room again: new entries go in once the leaders' answers from their members (kept a
    // second) are new.
    for s in 0..4 {
        std::fs::remove_file(dir.path().join(format!("s{s}/state/filler"))).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 20..25u64 {
        put(&fs, &format!("m{i:04}"), &contents(i, 1000))
            .await
            .unwrap();
        acked.push((format!("m{i:04}"), 1000));
    }
    fs.mkdir(root, b"dir", 0o755, 0, 0).await.unwrap();
    check_all(&fs, &acked).await;
    drop(c);
}

/// The server id of each server of `c` (by its address) and the replica set of each partition,
/// as `sealfs status` shows them.
fn ids_and_replicas(c: &Cluster) -> (Vec<u64>, Vec<Vec<u64>>) {
    let (_, st, _) = c.cli(&["status"]);
    let id_of = |addr: &str| -> u64 {
        st.lines()
            .find_map(|l| {
                let l = l.trim().strip_prefix("server ")?;
                let (id, rest) = l.split_once(' ')?;
                rest.starts_with(&format!("{addr} "))
                    .then(|| id.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no server at {addr}: {st}"))
    };
    let ids = c.server_addrs.iter().map(|a| id_of(a)).collect();
    let sets = st
        .lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("partition ")?;
            let set = l.split_once("replicas [")?.1.split_once(']')?.0;
            Some(set.split(", ").map(|x| x.parse().unwrap()).collect())
        })
        .collect();
    (ids, sets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_majority_is_short_of_room_refuses_new_entries_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_states, c, fs)) = short_state_cluster(dir.path()).await else {
        return;
    };
    let (ids, sets) = ids_and_replicas(&c);
    assert_eq!(sets.len(), 8, "{sets:?}");
    // A folder in every partition.
    let mut dirs = BTreeMap::new();
    for i in 0..200 {
        let d = fs
            .mkdir(fs.root(), format!("d{i}").as_bytes(), 0o755, 0, 0)
            .await
            .unwrap();
        dirs.entry(partition_of(d.ino))
            .or_insert((d.ino, format!("d{i}")));
        if dirs.len() == 8 {
            break;
        }
    }
    assert_eq!(dirs.len(), 8, "folders in {} partitions", dirs.len());
    // Two servers short of room: pick a pair that some replica sets hold both of, and
    // some not.
    let both = |a: usize, b: usize, set: &Vec<u64>| set.contains(&ids[a]) && set.contains(&ids[b]);
    let pair = (0..4)
        .flat_map(|a| (a + 1..4).map(move |b| (a, b)))
        .find(|(a, b)| {
            let n = sets.iter().filter(|set| both(*a, *b, set)).count();
            n > 0 && n < sets.len()
        });
    let Some((a, b)) = pair else {
        eprintln!("skipped: every pair of servers is in all partitions or none: {sets:?}");
        return;
    };
    fill_to(&dir.path().join(format!("s{a}/state")), 12 << 20);
    fill_to(&dir.path().join(format!("s{b}/state")), 12 << 20);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (mut refused, mut taken) = (0, 0);
    for (p, (d, _)) in &dirs {
        let short = both(a, b, &sets[*p as usize]);
        let r = fs.create(*d, b"f", &NewFile::file(0o644)).await;
        if short {
            assert_eq!(
                r.err(),
                Some(Error::NOSPC),
                "partition {p} {:?}",
                sets[*p as usize]
            );
            refused += 1;
        } else {
            let ino = r
                .unwrap_or_else(|e| panic!("partition {p} {:?}: {e:?}", sets[*p as usize]))
                .ino;
            fs.write(ino, 0, &contents(*p as u64, 1000)).await.unwrap();
            taken += 1;
        }
    }
    eprintln!("servers {a} and {b} short: {refused} partitions refused creates, {taken} took them");
    // What was taken reads back, and removals go through everywhere.
    for (p, (d, name)) in &dirs {
        if !both(a, b, &sets[*p as usize]) {
            let (ino, _) = fs.lookup(*d, b"f").await.unwrap();
            assert!(fs.read(ino, 0, 1000).await.unwrap() == contents(*p as u64, 1000));
            fs.unlink(*d, b"f").await.unwrap();
        }
        fs.rmdir(fs.root(), name.as_bytes()).await.unwrap();
    }
}

/// Server flags for blades sealed at `seal_mb` MiB or after `idle_s` seconds without an
/// append, reclaimed 1 s after, a pass and a count every second.
fn reclaiming<'a>(seal_mb: &'a str, idle_s: &'a str) -> [&'a str; 10] {
    [
        "--seal-mb",
        seal_mb,
        "--seal-idle-s",
        idle_s,
        "--reclaim-grace-s",
        "1",
        "--reclaim-every-s",
        "1",
        "--reclaim-recount-s",
        "1",
    ]
}

/// The blades `sealfs status` lists, with their state (`Open`, `Sealed`, `Deleting`).
fn blades_in_map(c: &Cluster) -> BTreeMap<u32, String> {
    let (_, out, _) = c.cli(&["status"]);
    out.lines()
        .filter_map(|l| {
            let mut w = l.trim().strip_prefix("blade ")?.split_whitespace();
            let id = u32::from_str_radix(w.next()?, 16).ok()?;
            let _profile = w.next()?;
            Some((id, w.next()?.to_string()))
        })
        .collect()
}

/// The blade of every shard file under `dir`, with its bytes.
fn blade_files(dir: &Path) -> Vec<(u32, u64)> {
    files_under(dir, "kelp")
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let blade = u32::from_str_radix(name.split('.').next()?, 16).ok()?;
            Some((blade, std::fs::metadata(&p).ok()?.len()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_blades_no_file_uses_are_deleted_and_the_others_stay() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start_with(dir.path(), 4, 8, &reclaiming("4", "3"));
    let fs = connect(&c).await;
    healthy(&c, Duration::from_secs(60)).await;
    // A blob: nothing in the namespace refers to it, so its blade is never reclaimed.
    let blob_data = contents(7777, 100_000);
    let blob = fs.blob_put(&blob_data).await.unwrap();
    // 48 files of 1 MiB through blades sealed at 4 MiB of payload.
    const LEN: usize = 1 << 20;
    let root = fs.root();
    let mut blades_of = BTreeMap::new();
    for i in 0..48u64 {
        let name = format!("r{i:04}");
        let ino = put(&fs, &name, &contents(i, LEN)).await.unwrap();
        let (extents, _) = fs.extents(ino).await.unwrap();
        let used: BTreeSet<u32> = extents.iter().map(|e| e.blade).collect();
        blades_of.insert(name, used);
    }
    let t = Instant::now();
    let sealed = loop {
        let map = blades_in_map(&c);
        let sealed = map.values().filter(|s| *s == "Sealed").count();
        if sealed >= 8 || t.elapsed() > Duration::from_secs(30) {
            break sealed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        sealed >= 8,
        "{sealed} blades sealed: {:?}",
        blades_in_map(&c)
    );
    let bytes = |dir: &Path| blade_files(dir).iter().map(|f| f.1).sum::<u64>();
    let before = bytes(dir.path());
    // The first 40 files go; the blades only they used go with them.
    for i in 0..40u64 {
        fs.unlink(root, format!("r{i:04}").as_bytes())
            .await
            .unwrap();
    }
    let kept: BTreeSet<u32> = (40..48u64)
        .flat_map(|i| blades_of[&format!("r{i:04}")].clone())
        .chain([blob.address.blade()])
        .collect();
    // (A blade that never filled stays open, and is not reclaimed.)
    let map = blades_in_map(&c);
    let dead: BTreeSet<u32> = (0..40u64)
        .flat_map(|i| blades_of[&format!("r{i:04}")].clone())
        .filter(|b| !kept.contains(b) && map.get(b).is_some_and(|s| s == "Sealed"))
        .collect();
    assert!(dead.len() >= 4, "blades only deleted files used: {dead:?}");
    let t = Instant::now();
    loop {
        let map = blades_in_map(&c);
        let on_disk: BTreeSet<u32> = blade_files(dir.path()).iter().map(|f| f.0).collect();
        if dead
            .iter()
            .all(|b| !map.contains_key(b) && !on_disk.contains(b))
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not reclaimed in 60 s: {dead:?}; map {map:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = bytes(dir.path());
    eprintln!(
        "{} blades reclaimed {:.1} s after the unlinks: shard files {} -> {} MiB",
        dead.len(),
        t.elapsed().as_secs_f64(),
        before >> 20,
        after >> 20
    );
    assert!(after < before, "{before} -> {after} bytes");
    // The blades still used stay, and what they hold reads back.
    let map = blades_in_map(&c);
    for b in &kept {
        assert!(map.contains_key(b), "blade {b:08x} was reclaimed: {map:?}");
    }
    let live: Vec<(String, usize)> = (40..48u64).map(|i| (format!("r{i:04}"), LEN)).collect();
    check_all(&fs, &live).await;
    assert!(
        fs.blob_get(blob).await.unwrap() == blob_data,
        "the blob changed"
    );
    // A server down while the rest go: their deletion waits for it.
    c.kill_server(3);
    for i in 40..48u64 {
        fs.unlink(root, format!("r{i:04}").as_bytes())
            .await
            .unwrap();
    }
    // Every blade holding data but the blob's is sealed (full, or idle for 3 s) and
    // reclaimed; those with shards on server 3 wait for it: only the blob's blade is left
    // on the disks.
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    c.start_server(3);
    loop {
        let left: BTreeSet<u32> = blade_files(dir.path()).iter().map(|f| f.0).collect();
        if left.iter().all(|b| *b == blob.address.blade()) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "shard files of blades {left:?} left; map {:?}",
            blades_in_map(&c)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "every blade but the blob's reclaimed {:.1} s after the last unlinks, server 3 \
         restarted",
        t.elapsed().as_secs_f64()
    );
    // Status counts them: in the map once they are dropped (a pass after their files went),
    // and by the servers that dropped them (since each one's start: server 3's restarted).
    let st = loop {
        let (_, st, _) = c.cli(&["status"]);
        if st.contains(" 0 being reclaimed") {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(90), "{st}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let in_map: usize = st
        .split_once(" reclaimed so far")
        .and_then(|(before, _)| before.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    let by_servers: u64 = scrub_figures(&st, " blades reclaimed").iter().sum();
    assert!(in_map > dead.len() && by_servers > 0, "{st}");
    assert!(
        fs.blob_get(blob).await.unwrap() == blob_data,
        "the blob changed"
    );
    // New files go to open blades and read back.
    put(&fs, "after", &contents(5000, LEN)).await.unwrap();
    assert!(get(&fs, "after").await.unwrap() == contents(5000, LEN));
    healthy(&c, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frond_whose_blade_was_reclaimed_before_it_was_recorded_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Blades sealed at 1 MiB: the frond below fills its blade.
    let c = Cluster::start_with(dir.path(), 4, 8, &reclaiming("1", "3600"));
    let fs = connect(&c).await;
    healthy(&c, Duration::from_secs(60)).await;
    const LEN: usize = 1 << 20;
    let root = fs.root();
    // A write appended and not recorded (a client that stalls between the two halves).
    let a = fs
        .create(root, b"late", &NewFile::file(0o644))
        .await
        .unwrap();
    let late = contents(1, LEN);
    let staged = fs.stage_ranges(a.ino, &[(0, &late[..])]).await.unwrap();
    let x = *staged.blades().first().unwrap();
    // Its blade is sealed, and since no file refers to it, reclaimed.
    let t = Instant::now();
    while blades_in_map(&c).contains_key(&x) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "blade {x:08x} not reclaimed: {:?}",
            blades_in_map(&c)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "blade {x:08x} reclaimed {:.1} s after the append",
        t.elapsed().as_secs_f64()
    );
    // Its frond is gone with it: recording it now is refused, and the file stays as it was.
    assert_eq!(
        fs.commit_staged(a.ino, staged, None).await.err(),
        Some(Error::STALE)
    );
    assert_eq!(fs.getattr(a.ino).await.unwrap().size, 0);
    // A whole write (the bytes still in hand) goes to an open blade.
    fs.write(a.ino, 0, &late).await.unwrap();
    assert!(get(&fs, "late").await.unwrap() == late);
    // That blade fills (1 MiB) and is sealed, then retired while the file still uses it: a
    // copy cannot share its extents any more, and copies the bytes instead.
    let (extents, _) = fs.extents(a.ino).await.unwrap();
    let y = extents[0].blade;
    let t = Instant::now();
    while blades_in_map(&c).get(&y).is_none_or(|s| s != "Sealed") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "blade {y:08x} not sealed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its grace (1 s) and a pass (1 s) later, it is retired.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = fs
        .create(root, b"copy", &NewFile::file(0o644))
        .await
        .unwrap();
    assert_eq!(
        fs.copy_range(a.ino, 0, b.ino, 0, LEN as u64).await,
        Ok(LEN as u64)
    );
    assert!(get(&fs, "copy").await.unwrap() == late, "the copy differs");
    let (copied, _) = fs.extents(b.ino).await.unwrap();
    assert!(
        copied.iter().all(|e| e.blade != y),
        "the copy shares blade {y:08x}"
    );
    assert!(
        blades_in_map(&c).contains_key(&y),
        "a blade in use was reclaimed"
    );
}

/// The shard files (`.kelp`) under server `s`'s disks, in a stable order.
fn kelp_files(dir: &Path, s: usize) -> Vec<std::path::PathBuf> {
    files_under(&dir.join(format!("s{s}")), "kelp")
}

/// What [`damage`] does to a shard file.
enum Harm {
    Delete,
    Flip,
}

/// Deletes or damages (100 bytes in the middle flipped) the shard files of server `s` that
/// `pick` chooses (by their place in [`kelp_files`] and name); returns each with its bytes
/// before.
fn damage(
    dir: &Path,
    s: usize,
    mut pick: impl FnMut(usize, &str) -> Option<Harm>,
) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for (n, path) in kelp_files(dir, s).into_iter().enumerate() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(harm) = pick(n, &name) else {
            continue;
        };
        let before = std::fs::read(&path).unwrap();
        match harm {
            Harm::Delete => std::fs::remove_file(&path).unwrap(),
            Harm::Flip => {
                let mut bad = before.clone();
                let (at, end) = (bad.len() / 2, (bad.len() / 2 + 100).min(bad.len()));
                for b in &mut bad[at..end] {
                    *b ^= 0x5a;
                }
                std::fs::write(&path, &bad).unwrap();
            }
        }
        out.push((path, before));
    }
    out
}

/// Waits up to `within` until every file in `damaged` has its bytes from before again;
/// returns how many do not.
async fn rebuilt(damaged: &[(std::path::PathBuf, Vec<u8>)], within: Duration) -> usize {
    let t = Instant::now();
    loop {
        let left = damaged
            .iter()
            .filter(|(path, before)| std::fs::read(path).ok().as_ref() != Some(before))
            .count();
        if left == 0 || t.elapsed() >= within {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Files of 1 to 4 MiB put under the root, and the cluster healthy.
async fn some_files(c: &Cluster, fs: &Sealfs) -> Vec<(String, usize)> {
    let mut files = Vec::new();
    for i in 0..12u64 {
        let len = ((i * 7919) as usize % (3 << 20)) + (1 << 20);
        let name = format!("w{i:04}");
        put(fs, &name, &contents(i, len)).await.unwrap();
        files.push((name, len));
    }
    healthy(c, Duration::from_secs(60)).await;
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_files_deleted_or_damaged_on_disk_are_read_around_and_scrubbed_back() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_with(dir.path(), 4, 8, &["--scrub-every-s", "2"]);
    let fs = connect(&c).await;
    let files = some_files(&c, &fs).await;
    // On server 2 every other shard file is deleted and the rest get a damaged cell; on
    // server 1 one file per disk gets one. A stipe loses at most 8 of its 16 cells.
    let mut damaged = damage(dir.path(), 2, |n, _| match n % 2 {
        0 => Some(Harm::Delete),
        _ => Some(Harm::Flip),
    });
    damaged.extend(damage(dir.path(), 1, |n, _| {
        (n % 4 == 0).then_some(Harm::Flip)
    }));
    assert!(damaged.len() >= 8, "{} shard files damaged", damaged.len());
    // Reads go around the damage at once: CRCs reject bad cells, missing files are other
    // cells' to make up for.
    check_all(&fs, &files).await;
    // The scrub finds every one and rebuilds it as it was.
    let t = Instant::now();
    let left = rebuilt(&damaged, Duration::from_secs(90)).await;
    assert_eq!(
        left,
        0,
        "of {} shard files, after {:?}",
        damaged.len(),
        t.elapsed()
    );
    eprintln!(
        "{} shard files rebuilt {:.1} s after the damage",
        damaged.len(),
        t.elapsed().as_secs_f64()
    );
    healthy(&c, Duration::from_secs(60)).await;
    check_all(&fs, &files).await;
    // Status tells what was done: every server scrubbed, and cells were rebuilt (by the
    // scrubs, or by the repairs of the stipes they found degraded), at least one per file.
    let (_, st, _) = c.cli(&["status"]);
    let scrubbed = st
        .lines()
        .filter(|l| l.contains("last scrub ended"))
        .count();
    let fixed: u64 = scrub_figures(&st, " stipes fixed by scrubs")
        .iter()
        .sum::<u64>()
        + scrub_figures(&st, " cells repaired").iter().sum::<u64>();
    assert!(scrubbed == 4 && fixed >= damaged.len() as u64, "{st}");
}

/// The figures before `what` in the holdfast lines of `sealfs status` (one per server).
fn scrub_figures(status: &str, what: &str) -> Vec<u64> {
    status
        .lines()
        .filter(|l| l.contains("last scrub ended") || l.contains("no scrub yet"))
        .filter_map(|l| {
            let before = &l[..l.find(what)?];
            before.rsplit(' ').next()?.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_finds_a_bad_cell_has_it_repaired_before_the_scrub() {
    let dir = tempfile::tempdir().unwrap();
    // No scrub within the test.
    let c = Cluster::start_with(dir.path(), 4, 8, &["--scrub-every-s", "100000"]);
    let fs = connect(&c).await;
    let files = some_files(&c, &fs).await;
    // Data cells (shards 0 to 7, the ones a healthy read asks for) damaged on server 2, and
    // one shard file of data deleted on server 1.
    let data = |name: &str| name.split('.').nth(1).is_some_and(|j| j < "08");
    let mut damaged = damage(dir.path(), 2, |_, name| data(name).then_some(Harm::Flip));
    let mut deleted = false;
    damaged.extend(damage(dir.path(), 1, |_, name| {
        (data(name) && !std::mem::replace(&mut deleted, true)).then_some(Harm::Delete)
    }));
    assert!(damaged.len() >= 2, "{} shard files damaged", damaged.len());
    // The reads go around the bad cells and tell the holdfasts, which repair them. A read
    // that has its stipes from other cells before a bad one answers never sees it: the
    // files are read again until every bad cell was met.
    let t = Instant::now();
    let mut reads = 0;
    loop {
        check_all(&fs, &files).await;
        reads += 1;
        let left = rebuilt(&damaged, Duration::from_secs(3)).await;
        if left == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{left} of {} shard files not rebuilt after {reads} reads of every file",
            damaged.len()
        );
    }
    eprintln!(
        "{} shard files rebuilt {:.1} s after the damage, {reads} read(s) of every file",
        damaged.len(),
        t.elapsed().as_secs_f64()
    );
    // A holdfast refuses a list of stipes past the bound, and takes none past its blade's end.
    let map = fs.map();
    let (blade, b) = map.blades.iter().next().unwrap();
    let holdfast = &map.servers[&b.shards[0].server].addr;
    let client = sealfs_rpc::Client::new(holdfast.clone(), c.key(), Default::default());
    for (stipes, want) in [
        (vec![7u32; 4097], sealfs_rpc::Status::BadRequest as u16),
        (vec![u32::MAX - 1], sealfs_rpc::Status::Ok as u16),
    ] {
        let req = sealfs_client::blades::SuspectReq {
            blade: *blade,
            stipes,
        };
        let r = client
            .call(
                sealfs_rpc::Request {
                    op: sealfs_client::blades::OP_BLADE_SUSPECT,
                    epoch: map.epoch,
                    meta: postcard::to_stdvec(&req).unwrap().into(),
                    data: bytes::Bytes::new(),
                },
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(r.status, want);
    }
    healthy(&c, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_manager_killed_files_go_on_and_it_comes_back_with_its_map() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 4, 8);
    let fs = connect(&c).await;
    let before = workload(fs.clone(), 0, 10).await;
    assert_eq!(before.len(), 10);
    // The servers follow the map every second: past that, they know every blade the
    // client may write to without asking the manager.
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.manager = None; // SIGKILL: files are put and read with the map the client and the
                      // servers hold.
    let t = Instant::now();
    let during = workload(fs.clone(), 100, 10).await;
    assert_eq!(during.len(), 10, "puts with the manager down");
    check_all(&fs, &before).await;
    check_all(&fs, &during).await;
    eprintln!(
        "10 files put and 20 read back in {:.1} s with the manager down",
        t.elapsed().as_secs_f64()
    );
    // Status says the manager does not answer, within seconds.
    let t = Instant::now();
    let (code, _, err) = c.cli(&["status"]);
    assert_ne!(code, Some(0));
    assert!(err.contains(&c.manager_addr), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    eprintln!(
        "status failed in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        err.trim()
    );
    // Started again on its folder, it has the map: all four servers, healthy.
    c.start_manager();
    healthy(&c, Duration::from_secs(60)).await;
    let after = workload(fs.clone(), 200, 5).await;
    assert_eq!(after.len(), 5);
    check_all(&fs, &before).await;
    check_all(&fs, &during).await;
    check_all(&fs, &after).await;
}
