//! Bad input from disks and callers: truncated or garbage shard files, cells in the wrong place,
//! ranges past a blade's end, wrong references. Clear errors, no panic, nothing else damaged.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use common::{check_all, fill, Forest, Rng};
use kelp::cell::{make_cell, CellId};
use kelp::{
    frond, Address, KelpError, Reference, ShardKey, ShardStore, WriteMode, BLADE_PAYLOAD_BYTES_MAX,
};

const BLADE: u32 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_shard_files_never_give_wrong_data() {
    let mut forest = Forest::new(4, 4);
    let mut rng = Rng::new(1);
    let h = forest.holdfast(BLADE).await;
    let fronds = fill(&h, &mut rng, 30, 150_000).await;
    h.sync().await.unwrap();
    h.quiesce().await;
    // Shard 1: truncated in the middle of a cell. Shard 4: garbage throughout.
    let p1 = forest.shard_path(BLADE, 1);
    let len = std::fs::metadata(&p1).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&p1)
        .unwrap()
        .set_len(len / 2 + 1000)
        .unwrap();
    let p4 = forest.shard_path(BLADE, 4);
    let len4 = std::fs::metadata(&p4).unwrap().len() as usize;
    std::fs::write(&p4, rng.bytes(len4)).unwrap();
    // Shard 6: cells copied from shard 7 (right blade, wrong shard) and from another blade.
    let p6 = forest.shard_path(BLADE, 6);
    let p7 = forest.shard_path(BLADE, 7);
    let from7 = std::fs::read(&p7).unwrap();
    let f6 = OpenOptions::new().write(true).open(&p6).unwrap();
    f6.write_all_at(&from7[..4096 * 3], 0).unwrap();
    let alien = make_cell(
        CellId {
            blade: BLADE + 1,
            stipe: 5,
            shard: 6,
        },
        1,
        b"alien",
    );
    f6.write_all_at(&alien, 5 * 4096).unwrap();
    check_all(&h, &fronds).await;
    let report = h.scrub(None).await.unwrap();
    assert!(
        report.unrecoverable.is_empty() && report.cells_rewritten > 0,
        "{report:?}"
    );
    assert_eq!(h.scrub(None).await.unwrap().stipes_fixed, 0);
    // After a restart the repaired files are used again.
    drop(h);
    forest.reopen();
    check_all(&forest.holdfast(BLADE).await, &fronds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ranges_and_references_are_refused() {
    let forest = Forest::new(4, 4);
    let mut rng = Rng::new(2);
    let h = forest.holdfast(BLADE).await;
    let fronds = fill(&h, &mut rng, 5, 50_000).await;
    let (r, data) = fronds[2].clone();
    // Past the end of the blade.
    assert!(matches!(
        h.reader()
            .read_range(BLADE_PAYLOAD_BYTES_MAX - 8, 100, 1)
            .await,
        Err(KelpError::Invalid(_))
    ));
    assert!(Address::new(BLADE, BLADE_PAYLOAD_BYTES_MAX).is_err());
    // Past what was written: no valid cells there.
    assert!(h
        .reader()
        .read_range(h.append_pointer() + 1_000_000, 100, 1)
        .await
        .is_err());
    // A sequence newer than the stipe's: refused, not served from older cells.
    let newer = Reference {
        seq: r.seq + 5,
        ..r
    };
    assert!(matches!(
        h.read(newer).await,
        Err(KelpError::Unreadable { .. })
    ));
    // A wrong length or an address that is not a frond start: a frond error.
    assert!(matches!(
        h.read(Reference {
            len: r.len + 8,
            ..r
        })
        .await,
        Err(KelpError::Frond { .. })
    ));
    let inside = Reference {
        address: Address::new(BLADE, r.address.byte_offset() + 64).unwrap(),
        ..r
    };
    assert!(h.read(inside).await.is_err());
    // Another blade's reference, and an absurd length.
    let other = Reference {
        address: Address::new(BLADE + 1, 0).unwrap(),
        ..r
    };
    assert!(matches!(h.read(other).await, Err(KelpError::Invalid(_))));
    assert!(matches!(
        h.read(Reference { len: u32::MAX, ..r }).await,
        Err(KelpError::Invalid(_))
    ));
    // A frond whose checksum does not match is refused before anything is written.
    let mut bad = frond::encode(b"some bytes").unwrap().to_vec();
    bad[9] ^= 1;
    let before = h.append_pointer();
    assert!(matches!(
        h.append(Bytes::from(bad)).await,
        Err(KelpError::Frond { .. })
    ));
    assert!(h.append(Bytes::from_static(b"short")).await.is_err());
    assert_eq!(h.append_pointer(), before);
    // An update of another length is refused.
    assert!(h
        .update(r, frond::encode(&data[1..]).unwrap())
        .await
        .is_err());
    // Nothing else was damaged.
    check_all(&h, &fronds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_refuse_bad_cells_and_calls() {
    let forest = Forest::new(1, 2);
    let store: Arc<dyn ShardStore> = Arc::new(forest.stores[0].clone());
    let key = ShardKey { blade: 3, shard: 2 };
    let good = make_cell(
        CellId {
            blade: 3,
            stipe: 0,
            shard: 2,
        },
        1,
        b"payload",
    );
    store
        .write_cells(key, 0, 0, Bytes::copy_from_slice(&good), WriteMode::IfNewer)
        .await
        .unwrap();
    // A cell for another shard, a corrupt cell, a partial cell, an unknown disk: all refused.
    let wrong = make_cell(
        CellId {
            blade: 3,
            stipe: 1,
            shard: 3,
        },
        1,
        b"x",
    );
    let mut corrupt = make_cell(
        CellId {
            blade: 3,
            stipe: 1,
            shard: 2,
        },
        1,
        b"x",
    );
    corrupt[100] ^= 4;
    for (cells, what) in [
        (wrong.to_vec(), "wrong shard"),
        (corrupt.to_vec(), "corrupt"),
        (good[..1000].to_vec(), "partial"),
        (Vec::new(), "empty"),
    ] {
        let r = store
            .write_cells(key, 0, 1, Bytes::from(cells), WriteMode::Force)
            .await;
        assert!(matches!(r, Err(KelpError::Invalid(_))), "{what}: {r:?}");
    }
    let other = ShardKey { blade: 4, shard: 0 };
    let c = make_cell(
        CellId {
            blade: 4,
            stipe: 0,
            shard: 0,
        },
        1,
        b"x",
    );
    assert!(store
        .write_cells(other, 9, 0, Bytes::copy_from_slice(&c), WriteMode::Force)
        .await
        .is_err());
    assert!(store.read_cells(key, 0, 0).await.is_err());
    assert!(store.read_cells(key, 0, 1 << 20).await.is_err());
    assert!(matches!(
        store.read_cells(other, 0, 1).await,
        Err(KelpError::ShardMissing(..))
    ));
    // An older sequence never overwrites a newer cell unless forced.
    let newer = make_cell(
        CellId {
            blade: 3,
            stipe: 0,
            shard: 2,
        },
        7,
        b"newer",
    );
    store
        .write_cells(
            key,
            0,
            0,
            Bytes::copy_from_slice(&newer),
            WriteMode::IfNewer,
        )
        .await
        .unwrap();
    store
        .write_cells(key, 0, 0, Bytes::copy_from_slice(&good), WriteMode::IfNewer)
        .await
        .unwrap();
    assert_eq!(&store.read_cells(key, 0, 1).await.unwrap()[..], &newer[..]);
    // The file on disk still has only the good cell at stipe 0.
    assert_eq!(store.stipes(key).await.unwrap(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_scratch_logs_are_ignored() {
    let mut forest = Forest::new(4, 4);
    let mut rng = Rng::new(8);
    let h = forest.holdfast(BLADE).await;
    let fronds = fill(&h, &mut rng, 20, 20_000).await;
    h.sync().await.unwrap();
    h.quiesce().await;
    drop(h);
    // A scratch log of random bytes, a torn record, and a valid cell of a blade nobody has.
    let scratch = forest.disks[0][0].join("kelp/scratch");
    std::fs::write(scratch.join("scratch.7.log"), rng.bytes(3 * 4096 + 1000)).unwrap();
    let alien = make_cell(
        CellId {
            blade: 0xdead,
            stipe: 3,
            shard: 0,
        },
        9,
        b"x",
    );
    std::fs::write(scratch.join("scratch.8.log"), alien).unwrap();
    std::fs::write(scratch.join("scratch.x.log"), b"not a log").unwrap();
    forest.reopen();
    let h = forest.holdfast(BLADE).await;
    assert!(h.recovery_report().unrecoverable.is_empty());
    check_all(&h, &fronds).await;
    assert_eq!(h.scrub(None).await.unwrap().stipes_fixed, 0);
}

/// A shard file far longer than a blade can be (a sparse file grown by mistake, or a peer
/// that says so) does not move the blade's end: the blade opens in bounded time, its fronds
/// read back, and appends go on right after them.
#[test]
fn a_shard_longer_than_a_blade_does_not_move_its_end() {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    let mut forest = Forest::new(4, 4);
    let (fronds, end) = runtime().block_on(async {
        let mut rng = Rng::new(3);
        let h = forest.holdfast(BLADE).await;
        let fronds = fill(&h, &mut rng, 10, 100_000).await;
        h.sync().await.unwrap();
        h.quiesce().await;
        let end = h.append_data(b"the last before the restart").await.unwrap();
        h.sync().await.unwrap();
        (fronds, end)
    });
    // Shard 2 grown to 4 TiB, sparse: 2^30 cells where a blade has at most some 2^22 stipes.
    let p2 = forest.shard_path(BLADE, 2);
    OpenOptions::new()
        .write(true)
        .open(&p2)
        .unwrap()
        .set_len(1 << 42)
        .unwrap();
    forest.reopen();
    // The open, the reads and the append, bounded in time from a thread of their own: a walk
    // of a huge blade that never yields would stop a timer in the same runtime.
    let (done, finished) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        runtime().block_on(async {
            let h = forest.holdfast(BLADE).await;
            check_all(&h, &fronds).await;
            let after = h.append_data(b"after the restart").await.unwrap();
            assert!(
                after.address.byte_offset() > end.address.byte_offset()
                    && after.address.byte_offset() < end.address.byte_offset() + (1 << 20),
                "appended at {:?}, the last before at {:?}",
                after.address,
                end.address
            );
            assert_eq!(&h.read(after).await.unwrap()[..], b"after the restart");
        });
        let _ = done.send(());
    });
    match finished.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok(()) => runner.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(failed) = runner.join() {
                std::panic::resume_unwind(failed);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("the blade did not open and answer within 2 minutes")
        }
    }
}
