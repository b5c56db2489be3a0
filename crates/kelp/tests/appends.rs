//! Appends from many tasks at once, the frond index, and the memory a holdfast uses.

mod common;

use common::{check_all, Forest, Rng};
use kelp::{frond, Holdfast, HoldfastConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_never_overlap() {
    let mut forest = Forest::new(4, 4);
    let h = forest.holdfast(1).await;
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(100 + t);
            let mut mine = Vec::new();
            for _ in 0..60 {
                let len = rng.below(20_000) as usize;
                let data = rng.bytes(len);
                let r = h.append_data(&data).await.unwrap();
                mine.push((r, data));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let mut ranges: Vec<(u64, u64)> = all
        .iter()
        .map(|(r, d)| {
            (
                r.address.byte_offset(),
                r.address.byte_offset() + frond::frond_bytes(d.len()) as u64,
            )
        })
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "fronds overlap: {w:?}");
    }
    check_all(&h, &all).await;
    // The index knows every frond, in order.
    for (i, (start, _)) in ranges.iter().enumerate() {
        assert_eq!(h.nth_frond(i).await, Some(*start));
    }
    let (count, at) = h.index_lookup(ranges[100].0 + 5).await;
    assert_eq!((count, at), (ranges.len(), Some(ranges[100].0)));
    // Reopened from disk, the holdfast rebuilds the same index from the cells.
    h.sync().await.unwrap();
    h.quiesce().await;
    drop(h);
    forest.reopen();
    let h = forest.holdfast(1).await;
    for (i, (start, _)) in ranges.iter().enumerate() {
        assert_eq!(h.nth_frond(i).await, Some(*start), "frond {i} after reopen");
    }
    check_all(&h, &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_open_blade_stays_under_its_bound() {
    let forest = Forest::new(4, 4);
    let cfg = common::test_config();
    let layout = forest.layout(9, kelp::Profile::default());
    let h = Holdfast::open(layout.clone(), cfg.clone()).await.unwrap();
    let mut rng = Rng::new(9);
    let mut fronds = 0;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(t);
            for _ in 0..250 {
                let len = rng.below(8000) as usize;
                h.append_data(&rng.bytes(len)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
        fronds += 250;
    }
    h.append_data(&rng.bytes(3_000_000)).await.unwrap();
    let used = h.memory_bytes();
    // The state part (without queued and in-flight frond bytes): the tail stipe, the index,
    // cached sequences, degraded stipes and locks. Beyond the fixed part, about 3 bytes a frond.
    let fixed = Holdfast::state_bound(&cfg, &layout, 0);
    let state_bound = Holdfast::state_bound(&cfg, &layout, fronds + 1);
    assert!(
        used <= state_bound,
        "holdfast state {used} bytes > {state_bound}"
    );
    assert!(state_bound - fixed == 3 * (fronds + 1));
    assert!(
        used < 64 * 1024 + 3 * (fronds + 1),
        "in practice far under the bound: {used}"
    );
    let bound = Holdfast::memory_bound(&cfg, &layout, fronds + 1);
    assert!(
        bound < 2 * HoldfastConfig::default().queue_bytes_max + 1_000_000_000,
        "bound {bound}"
    );
    assert!(used <= bound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_of_large_and_small_fronds_is_rebuilt_on_reopen() {
    // Past a large frond the rebuild reads only the next header; past small ones a window of
    // stipes. Both kinds, interleaved, come back in order.
    let mut forest = Forest::new(4, 4);
    let h = forest.holdfast(2).await;
    let mut rng = Rng::new(77);
    let mut all = Vec::new();
    for i in 0..24 {
        let len = match i % 4 {
            0 => 600_000 + rng.below(3_000_000) as usize,
            1 | 2 => rng.below(5_000) as usize,
            _ => 2 << 20,
        };
        let data = rng.bytes(len);
        let r = h.append_data(&data).await.unwrap();
        all.push((r, data));
    }
    let starts: Vec<u64> = all.iter().map(|(r, _)| r.address.byte_offset()).collect();
    h.sync().await.unwrap();
    h.quiesce().await;
    drop(h);
    forest.reopen();
    let h = forest.holdfast(2).await;
    assert_eq!(h.index_lookup(0).await.0, starts.len());
    for (i, start) in starts.iter().enumerate() {
        assert_eq!(h.nth_frond(i).await, Some(*start), "frond {i} after reopen");
    }
    check_all(&h, &all).await;
}
