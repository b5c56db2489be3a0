//! The promises of the storage layer on real shard files: lost shard files, corrupt cells and
//! stale shards never give wrong data, and repair and scrub bring every cell back.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::{check_all, fill, Forest, Rng};
use kelp::{frond, Profile};

const BLADE: u32 = 0x2a;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_eight_lost_shard_files_are_survived_and_rebuilt() {
    for seed in 1..=3u64 {
        let mut forest = Forest::new(4, 4);
        let mut rng = Rng::new(seed);
        let h = forest.holdfast(BLADE).await;
        let mut fronds = fill(&h, &mut rng, 40, 300_000).await;
        fronds.extend(fill(&h, &mut rng, 40, 3_000).await);
        h.sync().await.unwrap();
        drop(h);
        let lost = rng.pick(16, 8);
        for &j in &lost {
            std::fs::remove_file(forest.shard_path(BLADE, j)).unwrap();
        }
        forest.reopen();
        let h = forest.holdfast(BLADE).await;
        check_all(&h, &fronds).await;
        // Recovery at open checks the end of the blade; the scrub does the rest.
        let recovered = h.recovery_report();
        let report = h.scrub(None).await.unwrap();
        assert!(
            report.unrecoverable.is_empty() && recovered.unrecoverable.is_empty(),
            "{report:?}"
        );
        let stipes = h
            .append_pointer()
            .div_ceil(Profile::default().stipe_payload_bytes() as u64);
        assert_eq!(
            report.cells_rewritten + recovered.cells_rewritten,
            stipes * 8,
            "every cell of the 8 lost files rebuilt: {recovered:?} {report:?}"
        );
        for j in 0..16 {
            assert!(forest.shard_path(BLADE, j).exists(), "shard {j} rebuilt");
        }
        let again = h.scrub(None).await.unwrap();
        assert_eq!(again.stipes_fixed, 0, "nothing left to fix: {again:?}");
        // The rebuilt files alone are enough: lose the 8 that survived.
        drop(h);
        for j in (0..16).filter(|j| !lost.contains(j)) {
            std::fs::remove_file(forest.shard_path(BLADE, j)).unwrap();
        }
        forest.reopen();
        let h = forest.holdfast(BLADE).await;
        check_all(&h, &fronds).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_cells_are_never_returned_and_scrub_repairs_them() {
    let forest = Forest::new(4, 4);
    let mut rng = Rng::new(7);
    let h = forest.holdfast(BLADE).await;
    let fronds = fill(&h, &mut rng, 60, 200_000).await;
    h.sync().await.unwrap();
    let stipes = h
        .append_pointer()
        .div_ceil(Profile::default().stipe_payload_bytes() as u64);
    let mut corrupted = 0u64;
    for s in 0..stipes {
        let count = rng.below(9) as usize; // up to m = 8 cells of this stipe
        for j in rng.pick(16, count) {
            let f = OpenOptions::new()
                .write(true)
                .open(forest.shard_path(BLADE, j))
                .unwrap();
            let flips = 1 + rng.below(4);
            for _ in 0..flips {
                let at = s * 4096 + rng.below(4096);
                f.write_all_at(&[rng.next() as u8 | 1], at).unwrap();
            }
            corrupted += 1;
        }
    }
    assert!(corrupted > stipes, "the test corrupts many cells");
    check_all(&h, &fronds).await;
    let report = h.scrub(None).await.unwrap();
    assert!(report.unrecoverable.is_empty());
    // A written byte may by chance equal the old one; nearly every corrupted cell is rewritten.
    assert!(
        report.cells_rewritten <= corrupted && report.cells_rewritten * 100 >= corrupted * 95,
        "{report:?} of {corrupted}"
    );
    assert_eq!(h.scrub(None).await.unwrap().stipes_fixed, 0);
    check_all(&h, &fronds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_missed_an_update_is_never_current() {
    let forest = Forest::new(4, 4);
    let (h, plans) = forest.holdfast_with_plans(BLADE).await;
    let mut rng = Rng::new(3);
    let old = rng.bytes(30_000); // spans data shards 0..8 of stipe 0
    let r1 = h.append_data(&old).await.unwrap();
    h.append_data(&rng.bytes(100)).await.unwrap();
    h.sync().await.unwrap();
    // Shard 3 (a data cell of the frond) is down during the update and misses it.
    plans[3].set_down(true);
    let new = rng.bytes(30_000);
    let r2 = h.update(r1, frond::encode(&new).unwrap()).await.unwrap();
    assert!(r2.seq > r1.seq);
    h.quiesce().await;
    plans[3].set_down(false);
    // Shard 3 now answers with its stale cell; the reader must not use it.
    assert_eq!(h.read(r2).await.unwrap(), new);
    // A stale copy of a whole shard file put back by hand is not used either.
    let path = forest.shard_path(BLADE, 5);
    let before = std::fs::read(&path).unwrap();
    let r3 = h.update(r2, frond::encode(&old).unwrap()).await.unwrap();
    h.quiesce().await;
    std::fs::write(&path, &before).unwrap();
    assert_eq!(h.read(r3).await.unwrap(), old);
    let report = h.scrub(None).await.unwrap();
    // Shard 3 got the second update; shard 5's file is the stale one now.
    assert_eq!(
        report.cells_rewritten, 1,
        "the stale cell is rewritten: {report:?}"
    );
    assert_eq!(h.read(r3).await.unwrap(), old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_k_plus_w_shards_and_repair_completes_the_rest() {
    let forest = Forest::new(4, 4);
    let (h, plans) = forest.holdfast_with_plans(BLADE).await;
    let mut rng = Rng::new(11);
    let mut fronds = fill(&h, &mut rng, 5, 100_000).await;
    // 4 shards down: 12 of 16 still acknowledge.
    for p in &plans[10..14] {
        p.set_down(true);
    }
    fronds.extend(fill(&h, &mut rng, 5, 100_000).await);
    h.sync().await.unwrap();
    h.quiesce().await;
    let degraded = h.degraded();
    assert!(
        !degraded.is_empty(),
        "stipes written without 4 shards are marked for repair"
    );
    // A repair pass while those shards are still down cannot finish them: they stay listed,
    // so that the pass after the shards come back rebuilds them.
    let report = h.repair().await.unwrap();
    assert!(report.cells_failed > 0, "{report:?}");
    assert_eq!(h.degraded(), degraded, "{report:?}");
    // A fifth shard down: 11 < 12, appends fail with a clear error and nothing is acknowledged.
    plans[14].set_down(true);
    let err = h.append_data(&rng.bytes(5000)).await.unwrap_err();
    assert!(err.to_string().contains("reached 11 of the 12"), "{err}");
    assert!(h.sync().await.is_err());
    for p in &plans {
        p.set_down(false);
    }
    check_all(&h, &fronds).await;
    let report = h.repair().await.unwrap();
    assert!(
        report.cells_rewritten > 0 && report.unrecoverable.is_empty(),
        "{report:?}"
    );
    assert_eq!(h.scrub(None).await.unwrap().stipes_fixed, 0);
    fronds.extend(fill(&h, &mut rng, 3, 10_000).await);
    check_all(&h, &fronds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_hedge_around_a_store_that_hangs() {
    let forest = Forest::new(4, 4);
    let (h, plans) = forest.holdfast_with_plans(BLADE).await;
    let mut rng = Rng::new(5);
    let fronds = fill(&h, &mut rng, 10, 100_000).await;
    h.quiesce().await;
    // A data shard that answers after an hour: every read must be served from the others.
    plans[2].set_delay(Duration::from_secs(3600));
    tokio::time::timeout(Duration::from_secs(60), check_all(&h, &fronds))
        .await
        .expect("reads finish without the hung store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_wrap_through_the_update_path() {
    use kelp::cell::{check_cell, read_header, seal_cell, CellCheck, SEQ_MAX};
    use kelp::{Reference, ShardKey};
    let mut forest = Forest::new(4, 4);
    let h = forest.holdfast(BLADE).await;
    let mut rng = Rng::new(21);
    let first = rng.bytes(20_000);
    let r = h.append_data(&first).await.unwrap();
    h.append_data(&rng.bytes(50_000)).await.unwrap();
    h.sync().await.unwrap();
    h.quiesce().await;
    drop(h);
    // Age stipe 0 to two below the largest sequence, as if it had been updated 16 million times.
    let aged = SEQ_MAX - 1;
    for j in 0..16 {
        let path = forest.shard_path(BLADE, j);
        let mut bytes = std::fs::read(&path).unwrap();
        let cell = &mut bytes[..4096];
        let (id, _, _) = read_header(cell);
        assert!(matches!(check_cell(cell, id), CellCheck::Valid { .. }));
        seal_cell(cell, id, aged);
        std::fs::write(&path, &bytes).unwrap();
    }
    forest.reopen();
    let h = forest.holdfast(BLADE).await;
    let r = Reference { seq: aged, ..r };
    assert_eq!(h.read(r).await.unwrap(), first);
    let a = rng.bytes(first.len());
    let ra = h.update(r, frond::encode(&a).unwrap()).await.unwrap();
    assert_eq!(ra.seq, SEQ_MAX);
    let b = rng.bytes(first.len());
    let rb = h.update(ra, frond::encode(&b).unwrap()).await.unwrap();
    assert_eq!(rb.seq, 1, "the sequence wrapped");
    h.quiesce().await;
    assert_eq!(h.read(rb).await.unwrap(), b);
    // A shard still holding the version before the wrap is stale, not newer.
    let key = ShardKey {
        blade: BLADE,
        shard: 2,
    };
    let stale = {
        let mut c = h.reader().layout().shards[2]
            .store
            .read_cells(key, 0, 1)
            .await
            .unwrap()
            .to_vec();
        let (id, _, _) = read_header(&c);
        seal_cell(&mut c, id, SEQ_MAX);
        c
    };
    let store = h.reader().layout().shards[2].store.clone();
    let disk = h.reader().layout().shards[2].disk;
    store
        .write_cells(key, disk, 0, stale.into(), kelp::WriteMode::Force)
        .await
        .unwrap();
    assert_eq!(h.read(rb).await.unwrap(), b);
    let report = h.scrub(None).await.unwrap();
    assert_eq!(report.cells_rewritten, 1, "{report:?}");
    assert_eq!(h.read(rb).await.unwrap(), b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_store_does_not_stall_appends() {
    let forest = Forest::new(4, 4);
    let (h, plans) = forest.holdfast_with_plans(BLADE).await;
    let mut rng = Rng::new(31);
    let mut fronds = fill(&h, &mut rng, 3, 10_000).await;
    // Shard 5's store stops answering (a hung disk): every write to it would wait an hour.
    plans[5].set_delay(Duration::from_secs(3600));
    let more = tokio::time::timeout(Duration::from_secs(60), fill(&h, &mut rng, 20, 10_000))
        .await
        .expect("appends go on at the pace of the other 15 shards");
    fronds.extend(more);
    // Syncs wait for k + w shards, not for the hung one; those it has not answered stay
    // bounded, however many syncs come.
    for _ in 0..3 * kelp::holdfast::SYNCS_BEHIND_MAX {
        tokio::time::timeout(Duration::from_secs(10), h.sync())
            .await
            .expect("a sync waits for k + w shards, not for the hung one")
            .unwrap();
    }
    // The other shards' last syncs end at once; the hung one's stay, up to the bound.
    let mut behind = h.syncs_behind();
    for _ in 0..100 {
        if behind == kelp::holdfast::SYNCS_BEHIND_MAX {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        behind = h.syncs_behind();
    }
    assert_eq!(behind, kelp::holdfast::SYNCS_BEHIND_MAX);
    assert!(
        !h.degraded().is_empty(),
        "the stipes the hung shard missed are marked for repair"
    );
    tokio::time::timeout(Duration::from_secs(60), check_all(&h, &fronds))
        .await
        .expect("reads hedge around it");
    // Once it answers again, repair completes its cells.
    plans[5].set_delay(Duration::ZERO);
    let report = h.repair().await.unwrap();
    assert!(
        report.cells_rewritten > 0 && report.unrecoverable.is_empty(),
        "{report:?}"
    );
    check_all(&h, &fronds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_update_of_the_tail_stipe_leaves_no_trace() {
    let forest = Forest::new(4, 4);
    let (h, plans) = forest.holdfast_with_plans(BLADE).await;
    let mut rng = Rng::new(32);
    let a = rng.bytes(3000);
    let ra = h.append_data(&a).await.unwrap(); // stipe 0 is the open tail
                                               // Nine shards down: the update cannot read the stipe and fails.
    for p in &plans[..9] {
        p.set_down(true);
    }
    let new = rng.bytes(3000);
    assert!(h.update(ra, frond::encode(&new).unwrap()).await.is_err());
    for p in &plans[..9] {
        p.set_down(false);
    }
    // Appends after it must not carry the failed update's bytes into the stipe.
    let b = rng.bytes(5000);
    let rb = h.append_data(&b).await.unwrap();
    h.quiesce().await;
    assert_eq!(h.read(ra).await.unwrap(), a);
    assert_eq!(h.read(rb).await.unwrap(), b);
    // And an update that succeeds on a tail frond is read back whole.
    let flipped: Vec<u8> = b.iter().map(|x| x ^ 0x55).collect();
    let rb2 = h
        .update(rb, frond::encode(&flipped).unwrap())
        .await
        .unwrap();
    assert_eq!(h.read(rb2).await.unwrap(), flipped);
    let c = rng.bytes(100);
    let rc = h.append_data(&c).await.unwrap();
    assert_eq!(h.read(rc).await.unwrap(), c);
    assert_eq!(h.read(ra).await.unwrap(), a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_files_deleted_while_in_use_are_noticed_and_rebuilt() {
    let mut forest = Forest::new(4, 4);
    let h = forest.holdfast(BLADE).await;
    let mut rng = Rng::new(41);
    let mut fronds = fill(&h, &mut rng, 20, 100_000).await;
    h.sync().await.unwrap();
    h.quiesce().await;
    // An operator deletes three shard files while the server runs with them open.
    let gone = [1usize, 6, 11];
    for &j in &gone {
        std::fs::remove_file(forest.shard_path(BLADE, j)).unwrap();
    }
    // Writes that land in the deleted files are not counted as synced; reads skip them.
    fronds.extend(fill(&h, &mut rng, 10, 50_000).await);
    h.sync().await.unwrap();
    check_all(&h, &fronds).await;
    let report = h.scrub(None).await.unwrap();
    assert!(
        report.unrecoverable.is_empty() && report.cells_failed == 0,
        "{report:?}"
    );
    for &j in &gone {
        assert!(forest.shard_path(BLADE, j).exists(), "shard {j} rebuilt");
    }
    assert_eq!(h.scrub(None).await.unwrap().stipes_fixed, 0);
    // After a restart the rebuilt files are the real ones.
    drop(h);
    forest.reopen();
    let h = forest.holdfast(BLADE).await;
    check_all(&h, &fronds).await;
    assert_eq!(h.scrub(None).await.unwrap().stipes_fixed, 0);
}
