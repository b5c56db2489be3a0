//! What applying creates costs partitions' state machines (redb files in a temporary folder):
//! N creates, each a Raft batch of its own, then N more with a lookup of a missing name between
//! each (as the kernel asks before every `open(O_CREAT)`). With P partitions (default 1) the
//! creates go to each in turn, one directory in each, as a server holding P replicas sees them
//! when P callers create at once. Prints the time per create, in all and in the apply and
//! commit alone.
//!
//! `cargo run --release -p sealfs-meta --example apply_bench -- [N] [P]`

use std::time::{Duration, Instant};

use sealfs_meta::{Kind, Op, PartitionMachine, Query};
use sealfs_raft::Machine;

fn create(i: u64) -> Op {
    let now = 1_000_000 + i as i64;
    Op::Once {
        id: u128::from(i) + 1,
        now,
        op: Box::new(Op::Create {
            parent: 1,
            name: format!("file{i}").into_bytes(),
            kind: Kind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: vec![],
            exclusive: true,
            now,
        }),
    }
}

/// Argument `at` as a number above 0, else `default`.
fn arg(at: usize, what: &str, default: u64) -> u64 {
    match std::env::args().nth(at).map(|a| a.parse()) {
        None => default,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("apply_bench: the {what} must be a number above 0");
            std::process::exit(2);
        }
    }
}

fn main() {
    let n = arg(1, "count", 20_000);
    let partitions = arg(2, "partition count", 1);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let root = Op::EnsureRoot {
        ino: 1,
        volume: 1,
        perm: 0o755,
        uid: 0,
        gid: 0,
        now: 1,
    };
    let mut machines: Vec<PartitionMachine> = (0..partitions)
        .map(|p| {
            let path = dir.path().join(format!("p{p}.redb"));
            let mut m = PartitionMachine::open(p as u32, &path).expect("the store");
            m.apply(&postcard::to_stdvec(&root).expect("encoded"));
            m.commit(b"0", false).expect("committed");
            m
        })
        .collect();
    let count = machines.len() as u64;
    for (round, lookups) in [(0, false), (1, true)] {
        let (start, mut applying) = (Instant::now(), Duration::ZERO);
        for i in round * n..(round + 1) * n {
            let m = &mut machines[(i % count) as usize];
            let cmd = postcard::to_stdvec(&create(i)).expect("encoded");
            let t = Instant::now();
            m.apply(&cmd);
            m.commit(i.to_string().as_bytes(), false)
                .expect("committed");
            applying += t.elapsed();
            if lookups {
                let q = Query::Lookup {
                    parent: 1,
                    name: format!("missing{i}").into_bytes(),
                };
                m.query(&postcard::to_stdvec(&q).expect("encoded"));
            }
        }
        let each = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        println!(
            "{n} creates over {partitions} partition(s){}: {:.1} us each in all, {:.1} us \
             applying and committing",
            if lookups {
                ", a lookup between each"
            } else {
                ""
            },
            each(start.elapsed()),
            each(applying)
        );
    }
}
