//! Long runs of cells go to the disk by direct IO, past the page cache; short ones through it;
//! a disk whose file system refuses direct IO is written through the page cache instead. Either
//! way every cell reads back current, also after cells read into the page cache are rewritten
//! and after a reopen.

mod common;

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use bytes::{BufMut, Bytes};
use common::Mount;
use kelp::cell::{aligned_buffer, cell_aligned, make_cell, CellId};
use kelp::{LocalStore, LocalStoreConfig, ShardKey, ShardStore, WriteMode, DIRECT_WRITE_BYTES_MIN};

const KEY: ShardKey = ShardKey { blade: 5, shard: 2 };

/// `count` cells of `KEY` from stipe `first`, sequence `seq`, in a buffer that starts on a
/// cell boundary of memory or just past one.
fn run(first: u32, count: u32, seq: u32, aligned: bool) -> Bytes {
    let skip = usize::from(!aligned);
    let mut b = aligned_buffer(count as usize * 4096 + skip);
    b.put_bytes(0, skip);
    for stipe in first..first + count {
        let id = CellId {
            blade: KEY.blade,
            stipe,
            shard: KEY.shard,
        };
        b.put_slice(&make_cell(
            id,
            seq,
            format!("stipe {stipe} seq {seq}").as_bytes(),
        ));
    }
    let cells = b.freeze().slice(skip..);
    assert_eq!(cell_aligned(&cells), aligned);
    cells
}

/// How many bytes of `len` from `off` the page cache holds at the start of the range.
fn cached(path: &Path, off: u64, len: usize) -> usize {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0; len];
    rustix::io::preadv2(
        &f,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        off,
        rustix::io::ReadWriteFlags::NOWAIT,
    )
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_runs_go_past_the_page_cache_and_read_back_current() {
    // Under the target folder: on the disk the tests run from (a tmpfs /tmp would keep every
    // byte in memory whatever the writer asks).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = LocalStore::open(
        "s",
        &[dir.path().to_path_buf()],
        LocalStoreConfig::default(),
    )
    .unwrap();
    let long = (DIRECT_WRITE_BYTES_MIN / 4096) as u32;
    for (first, aligned) in [(0, true), (long, false)] {
        let cells = run(first, long, 1, aligned);
        let before = store.direct_write_bytes();
        store
            .write_cells(KEY, 0, first, cells.clone(), WriteMode::Force)
            .await
            .unwrap();
        assert_eq!(
            store.direct_write_bytes() - before,
            cells.len() as u64,
            "a long run (aligned: {aligned}) goes by direct IO"
        );
        let path = store.shard_path(KEY).unwrap();
        let off = first as u64 * 4096;
        let got = store.read_cells(KEY, first, long).await.unwrap();
        assert_eq!(got, cells, "read back (aligned: {aligned})");
        // Now in the page cache: a new version written past it must replace what it holds.
        assert_eq!(cached(&path, off, cells.len()), cells.len());
        let newer = run(first, long, 2, aligned);
        store
            .write_cells(KEY, 0, first, newer.clone(), WriteMode::IfNewer)
            .await
            .unwrap();
        assert_eq!(store.direct_write_bytes() - before, 2 * cells.len() as u64);
        let got = store.read_cells(KEY, first, long).await.unwrap();
        assert_eq!(got, newer, "the newer cells read back (aligned: {aligned})");
    }
    // A short run goes through the page cache.
    let short = run(2 * long, 2, 1, true);
    let before = store.direct_write_bytes();
    store
        .write_cells(KEY, 0, 2 * long, short.clone(), WriteMode::Force)
        .await
        .unwrap();
    assert_eq!(
        store.direct_write_bytes(),
        before,
        "a short run is buffered"
    );
    // Everything is there after a restart.
    drop(store);
    let store = LocalStore::open(
        "s",
        &[dir.path().to_path_buf()],
        LocalStoreConfig::default(),
    )
    .unwrap();
    let got = store.read_cells(KEY, 0, 2 * long + 2).await.unwrap();
    assert_eq!(&got[..long as usize * 4096], &run(0, long, 2, true)[..]);
    assert_eq!(&got[2 * long as usize * 4096..], &short[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_refuses_direct_io_is_written_through_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("ramfs");
    let Some(_mount) = Mount::new("ramfs", &disk, "mode=755") else {
        eprintln!("skipped: mounting a ramfs needs root");
        return;
    };
    let refused = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(disk.join("probe"));
    assert!(refused.is_err(), "ramfs takes no direct IO");
    let store = LocalStore::open(
        "s",
        std::slice::from_ref(&disk),
        LocalStoreConfig::default(),
    )
    .unwrap();
    let long = (DIRECT_WRITE_BYTES_MIN / 4096) as u32 * 2;
    let cells = run(0, long, 1, true);
    store
        .write_cells(KEY, 0, 0, cells.clone(), WriteMode::Force)
        .await
        .unwrap();
    let newer = run(0, long, 2, false);
    store
        .write_cells(KEY, 0, 0, newer.clone(), WriteMode::IfNewer)
        .await
        .unwrap();
    assert_eq!(store.direct_write_bytes(), 0, "nothing went by direct IO");
    store.sync(KEY).await.unwrap();
    drop(store);
    let store = LocalStore::open("s", &[disk], LocalStoreConfig::default()).unwrap();
    assert_eq!(store.read_cells(KEY, 0, long).await.unwrap(), newer);
}
