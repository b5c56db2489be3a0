//! A disk that fills up: writes go on with the other shards, nothing acknowledged is lost, and
//! once the disk is replaced repair rebuilds its shard file. Mounts a 1 MiB tmpfs as one disk,
//! so it needs root (as CI has); elsewhere it says so and passes.

mod common;

use common::{check_all, fill, Forest, Mount, Rng};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_nothing_and_is_rebuilt_when_replaced() {
    let mut forest = Forest::new(4, 4);
    // Shard 9 lives on server 1, disk 2.
    assert_eq!(forest.placement(9), (1, 2));
    let disk = forest.disks[1][2].clone();
    let Some(mount) = Mount::new("tmpfs", &disk, "size=1m") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    forest.reopen();
    let h = forest.holdfast(0x99).await;
    let mut rng = Rng::new(12);
    // About 16 MiB of data: 2 MiB per shard file, twice what the small disk holds.
    let fronds = fill(&h, &mut rng, 80, 400_000).await;
    h.sync().await.unwrap();
    h.quiesce().await;
    assert!(
        !h.degraded().is_empty(),
        "the stipes shard 9 could not take are marked for repair"
    );
    check_all(&h, &fronds).await;
    // The full disk is replaced by an empty one.
    drop(h);
    drop(mount);
    forest.reopen();
    let h = forest.holdfast(0x99).await;
    check_all(&h, &fronds).await;
    let report = h.scrub(None).await.unwrap();
    assert!(
        report.unrecoverable.is_empty() && report.cells_failed == 0,
        "{report:?}"
    );
    assert!(forest.shard_path(0x99, 9).starts_with(&disk));
    assert_eq!(h.scrub(None).await.unwrap().stipes_fixed, 0);
    check_all(&h, &fronds).await;
}
