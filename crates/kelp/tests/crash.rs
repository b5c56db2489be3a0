//! Crash injection at every step of an append and of the two-phase update: the stores stop at
//! mutating operation N (before or after it reaches the disk), everything is reopened from disk,
//! and recovery must leave every acknowledged frond readable, nothing unacknowledged half-visible
//! and no stipe unreadable.

mod common;

use common::{check_all, test_config, Forest, Rng};
use kelp::fault::FaultPlan;
use kelp::{frond, Holdfast, Profile, Reference};

const BLADE: u32 = 0x77;

struct Outcome {
    acked: Vec<(Reference, Vec<u8>)>,
    /// (old reference, old data, new data, new reference if the update was acknowledged)
    update: (Reference, Vec<u8>, Vec<u8>, Option<Reference>),
}

/// Appends into the tail stipe (two-phase), appends across fresh stipes, updates a frond in
/// place, syncs, and appends again.
async fn workload(h: &Holdfast, rng: &mut Rng, target: &(Reference, Vec<u8>)) -> Outcome {
    let mut acked = Vec::new();
    let small = rng.bytes(900);
    if let Ok(r) = h.append_data(&small).await {
        acked.push((r, small));
    }
    let big = rng.bytes(100_000);
    if let Ok(r) = h.append_data(&big).await {
        acked.push((r, big));
    }
    let new = rng.bytes(target.1.len());
    let updated = h.update(target.0, frond::encode(&new).unwrap()).await.ok();
    let _ = h.sync().await;
    let last = rng.bytes(3000);
    if let Ok(r) = h.append_data(&last).await {
        acked.push((r, last));
    }
    h.quiesce().await;
    Outcome {
        acked,
        update: (target.0, target.1.clone(), new, updated),
    }
}

async fn setup(forest: &Forest, rng: &mut Rng) -> Vec<(Reference, Vec<u8>)> {
    let h = forest.holdfast(BLADE).await;
    let mut fronds = Vec::new();
    for len in [5000, 40_000, 7000, 1234] {
        let d = rng.bytes(len);
        fronds.push((h.append_data(&d).await.unwrap(), d));
    }
    h.sync().await.unwrap();
    h.quiesce().await;
    fronds
}

async fn crash_run(n: Option<u64>, applied: bool) -> (u64, u64, u64) {
    let mut forest = Forest::new(4, 4);
    let mut rng = Rng::new(42);
    let initial = setup(&forest, &mut rng).await;
    forest.reopen();
    let plan = match n {
        Some(n) => FaultPlan::crash_at(n, applied),
        None => std::sync::Arc::new(FaultPlan::default()),
    };
    let h = Holdfast::open(
        forest.layout_with(BLADE, Profile::default(), Some(plan.clone())),
        test_config(),
    )
    .await
    .unwrap();
    let out = workload(&h, &mut rng, &initial[1]).await;
    drop(h);
    // Restart every store from disk and let the holdfast recover.
    forest.reopen();
    let h = forest.holdfast(BLADE).await;
    let ctx = format!("crash at op {n:?} (applied: {applied})");
    let rec = h.recovery_report();
    assert!(rec.unrecoverable.is_empty(), "{ctx}: {rec:?}");
    let mut expect: Vec<(Reference, Vec<u8>)> = initial
        .iter()
        .filter(|(r, _)| *r != out.update.0)
        .cloned()
        .collect();
    expect.extend(out.acked.iter().cloned());
    check_all(&h, &expect).await;
    let (old_ref, old, new, new_ref) = &out.update;
    match new_ref {
        Some(r) => assert_eq!(
            &h.read(*r).await.unwrap()[..],
            &new[..],
            "{ctx}: acknowledged update"
        ),
        None => {
            let got = h
                .read(*old_ref)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: frond under update: {e}"));
            assert!(
                got == old[..] || got == new[..],
                "{ctx}: half an update is visible"
            );
        }
    }
    let scrub = h.scrub(None).await.unwrap();
    assert!(scrub.unrecoverable.is_empty(), "{ctx}: {scrub:?}");
    assert_eq!(h.scrub(None).await.unwrap().stipes_fixed, 0, "{ctx}");
    // The blade takes appends again after recovery.
    let d = rng.bytes(20_000);
    let r = h.append_data(&d).await.unwrap();
    assert_eq!(h.read(r).await.unwrap(), d);
    (plan.mutations(), rec.rolled_back, rec.stipes_fixed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_step_of_append_and_update() {
    let (total, _, _) = crash_run(None, false).await;
    assert!(total > 100, "the workload has {total} mutating steps");
    let (mut rolled_back, mut fixed) = (0, 0);
    for n in 0..total {
        for applied in [false, true] {
            let (_, r, f) = crash_run(Some(n), applied).await;
            rolled_back += r;
            fixed += f;
        }
    }
    println!(
        "{total} crash points x 2: recovery rolled back {rolled_back} stipes and fixed {fixed}"
    );
    // The crashes left real work for recovery: interrupted updates rolled back, stipes repaired.
    assert!(
        rolled_back > 0 && fixed > rolled_back,
        "rolled back {rolled_back}, fixed {fixed}"
    );
}
