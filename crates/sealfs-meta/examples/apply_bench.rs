//! What applying creates costs one partition's state machine (a redb file in a temporary
//! folder): N creates in one directory, each a Raft batch of its own, then N more with a
//! lookup of a missing name between each (as the kernel asks before every `open(O_CREAT)`).
//! Prints the time per create, in all and in the apply and commit alone.
//!
//! `cargo run --release -p sealfs-meta --example apply_bench -- [N]`

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

fn main() {
    let n: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 20_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("apply_bench: the count must be a number above 0");
            std::process::exit(2);
        }
    };
    let dir = tempfile::tempdir().expect("a temporary folder");
    let mut m = PartitionMachine::open(0, &dir.path().join("p.redb")).expect("the store");
    let root = Op::EnsureRoot {
        ino: 1,
        volume: 1,
        perm: 0o755,
        uid: 0,
        gid: 0,
        now: 1,
    };
    m.apply(&postcard::to_stdvec(&root).expect("encoded"));
    m.commit(b"0", false).expect("committed");
    for (round, lookups) in [(0, false), (1, true)] {
        let (start, mut applying) = (Instant::now(), Duration::ZERO);
        for i in round * n..(round + 1) * n {
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
            "{n} creates{}: {:.1} us each in all, {:.1} us applying and committing",
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
