//! The disk layout: README, fan-out folders that split, shard files moved by an operator.

mod common;

use bytes::Bytes;
use common::{check_all, fill, Forest, Rng};
use kelp::cell::{make_cell, CellId};
use kelp::{LocalStore, LocalStoreConfig, ShardKey, ShardStore, WriteMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_shard_files_are_found_at_start() {
    let mut forest = Forest::new(4, 4);
    let mut rng = Rng::new(4);
    let h = forest.holdfast(0x1234).await;
    let fronds = fill(&h, &mut rng, 10, 100_000).await;
    h.sync().await.unwrap();
    h.quiesce().await;
    drop(h);
    // Shard 0 lives on server 0 disk 0: move it to disk 3, in an odd folder; shard 4 (server 0,
    // disk 1) to the top of its blades folder.
    let p0 = forest.shard_path(0x1234, 0);
    let to0 = forest.disks[0][3].join("kelp/blades/zz/0000.1234/00001234.00.kelp");
    std::fs::create_dir_all(to0.parent().unwrap()).unwrap();
    std::fs::rename(&p0, &to0).unwrap();
    let p4 = forest.shard_path(0x1234, 4);
    let to4 = forest.disks[0][1].join("kelp/blades/00001234.04.kelp");
    std::fs::rename(&p4, &to4).unwrap();
    forest.reopen();
    let list = forest.stores[0].list().await.unwrap();
    let info0 = list
        .iter()
        .find(|i| {
            i.key
                == ShardKey {
                    blade: 0x1234,
                    shard: 0,
                }
        })
        .unwrap();
    assert_eq!(info0.disk, 3, "found on the disk it was moved to");
    assert_eq!(forest.stores[0].shard_path(info0.key).unwrap(), to0);
    let h = forest.holdfast(0x1234).await;
    assert_eq!(h.recovery_report().stipes_fixed, 0);
    check_all(&h, &fronds).await;
    assert!(forest.disks[0][0].join("kelp/blades/README.md").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_fanout_folders_split_and_files_stay_findable() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk0");
    let cfg = LocalStoreConfig {
        fanout_files_max: 4,
        ..Default::default()
    };
    let store = LocalStore::open("s", std::slice::from_ref(&disk), cfg.clone()).unwrap();
    // 40 blades with the same low byte, so that they share folder 07 and force splits.
    let keys: Vec<ShardKey> = (0..40u32)
        .map(|i| ShardKey {
            blade: (i << 8) | 0x07,
            shard: 1,
        })
        .collect();
    for k in &keys {
        let cell = make_cell(
            CellId {
                blade: k.blade,
                stipe: 0,
                shard: 1,
            },
            1,
            &k.blade.to_le_bytes(),
        );
        store
            .write_cells(*k, 0, 0, Bytes::copy_from_slice(&cell), WriteMode::IfNewer)
            .await
            .unwrap();
    }
    assert!(
        disk.join("kelp/blades/07/.split").exists(),
        "folder 07 split"
    );
    for k in &keys {
        let p = store.shard_path(*k).unwrap();
        assert!(p.exists(), "{} at {}", k, p.display());
    }
    drop(store);
    let store = LocalStore::open("s", &[disk], cfg).unwrap();
    assert_eq!(store.scan_report().found, 40);
    for k in &keys {
        let got = store.read_cells(*k, 0, 1).await.unwrap();
        assert_eq!(&got[16..20], &k.blade.to_le_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_with_foreign_cells_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d");
    let store = LocalStore::open(
        "s",
        std::slice::from_ref(&disk),
        LocalStoreConfig::default(),
    )
    .unwrap();
    let k = ShardKey {
        blade: 0x10,
        shard: 2,
    };
    let cell = make_cell(
        CellId {
            blade: 0x10,
            stipe: 0,
            shard: 2,
        },
        1,
        b"x",
    );
    store
        .write_cells(k, 0, 0, Bytes::copy_from_slice(&cell), WriteMode::IfNewer)
        .await
        .unwrap();
    let real = store.shard_path(k).unwrap();
    drop(store);
    // An operator renames the file to another blade's name: its cells say otherwise.
    let fake = real.with_file_name("00000011.02.kelp");
    std::fs::rename(&real, &fake).unwrap();
    let store = LocalStore::open("s", &[disk], LocalStoreConfig::default()).unwrap();
    assert_eq!(store.scan_report().mismatched, vec![fake]);
    assert!(store.list().await.unwrap().is_empty());
}

/// Small reads are first served from the page cache without waiting for the disk, and from the
/// disk for what is not cached: all cached, none cached or half of each, they give the bytes
/// written, and cells past the end of the file read as zeros (absent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_read_back_alike_from_the_page_cache_and_from_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(
        "s",
        &[dir.path().to_path_buf()],
        LocalStoreConfig::default(),
    )
    .unwrap();
    let key = ShardKey { blade: 9, shard: 3 };
    let cells: Vec<u8> = (0..8u32)
        .flat_map(|stipe| {
            let id = CellId {
                blade: 9,
                stipe,
                shard: 3,
            };
            make_cell(id, 1, format!("cell {stipe}").as_bytes())
        })
        .collect();
    store
        .write_cells(key, 0, 0, Bytes::from(cells.clone()), WriteMode::Force)
        .await
        .unwrap();
    let cell = |i: usize| &cells[i * 4096..(i + 1) * 4096];
    assert_eq!(&store.read_cells(key, 0, 8).await.unwrap()[..], &cells[..]);
    // Out of the page cache: synced, then dropped.
    let path = store.shard_path(key).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    f.sync_all().unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    for (first, count) in [(0u32, 8u32), (3, 1), (5, 2)] {
        let got = store.read_cells(key, first, count).await.unwrap();
        let want = &cells[first as usize * 4096..(first + count) as usize * 4096];
        assert_eq!(&got[..], want, "cells {first}..+{count}");
    }
    // Half cached: the first four come from the page cache, the rest from the disk.
    store.read_cells(key, 0, 8).await.unwrap();
    let half = std::num::NonZeroU64::new(4 * 4096);
    rustix::fs::fadvise(&f, 4 * 4096, half, rustix::fs::Advice::DontNeed).unwrap();
    assert_eq!(&store.read_cells(key, 0, 8).await.unwrap()[..], &cells[..]);
    // Two cells past the end: the two before them as written, then zeros.
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    for _ in 0..2 {
        let got = store.read_cells(key, 6, 4).await.unwrap();
        assert_eq!(&got[..4096], cell(6));
        assert_eq!(&got[4096..8192], cell(7));
        assert!(got[8192..].iter().all(|&b| b == 0), "past the end");
    }
}

/// A shard file that cannot be removed stays known to its store: the delete says so, and the
/// next one tries again (a blade being reclaimed is dropped only once every delete succeeded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_file_that_cannot_be_removed_is_deleted_again_later() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d");
    let store = LocalStore::open(
        "s",
        std::slice::from_ref(&disk),
        LocalStoreConfig::default(),
    )
    .unwrap();
    let k = ShardKey {
        blade: 0x20,
        shard: 1,
    };
    let id = CellId {
        blade: 0x20,
        stipe: 0,
        shard: 1,
    };
    let cell = make_cell(id, 1, b"x");
    store
        .write_cells(k, 0, 0, Bytes::copy_from_slice(&cell), WriteMode::IfNewer)
        .await
        .unwrap();
    let path = store.shard_path(k).unwrap();
    // Where the file was, a folder with something in it: removing it fails.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("x"), b"x").unwrap();
    assert!(store.delete(k).await.is_err());
    assert_eq!(store.stipes(k).await.unwrap(), Some(1), "forgotten");
    assert!(store.delete(k).await.is_err(), "not tried again");
    // Once it can go, it goes, and the store forgets it.
    std::fs::remove_dir_all(&path).unwrap();
    std::fs::write(&path, b"").unwrap();
    store.delete(k).await.unwrap();
    assert!(!path.exists());
    assert_eq!(store.stipes(k).await.unwrap(), None);
    store.delete(k).await.unwrap();
}
