//! The partition state machine alone, on a real redb file: namespace semantics, extents under
//! overlapping writes (against a model), snapshots, and commands that must leave no trace.

use proptest::prelude::*;
use sealfs_meta::{
    root_ino, Attr, Errno, Extent, Kind, Op, PartitionMachine, Query, Reply, SetAttr,
    EXTENTS_REPLY_MAX, INLINE_FILE_BYTES, REFS_BLADES_MAX, RENAME_EXCHANGE, RENAME_NOREPLACE,
    XATTR_CREATE, XATTR_NAMES_MAX, XATTR_REPLACE, XATTR_VALUE_MAX,
};
use sealfs_raft::Machine;

struct M {
    m: PartitionMachine,
    _dir: tempfile::TempDir,
}

const ROOT: u64 = 1;

/// Makes volume 1's root.
fn root_op() -> Op {
    Op::EnsureRoot {
        ino: ROOT,
        volume: 1,
        perm: 0o755,
        uid: 0,
        gid: 0,
        now: 1,
    }
}

impl M {
    /// Partition 0, with volume 1's root.
    fn new() -> M {
        let mut m = M::partition(0);
        assert_eq!(root_ino(1, 64), ROOT);
        m.op(root_op());
        m
    }
    /// Partition `p`, empty.
    fn partition(p: u32) -> M {
        let dir = tempfile::tempdir().unwrap();
        M {
            m: PartitionMachine::open(p, &dir.path().join("p.redb")).unwrap(),
            _dir: dir,
        }
    }
    fn op(&mut self, op: Op) -> Reply {
        self.op_at(op, b"pos", false)
    }
    /// Applies `op` as one Raft batch ending at log position `pos`.
    fn op_at(&mut self, op: Op, pos: &[u8], durable: bool) -> Reply {
        let r = self.m.apply(&postcard::to_stdvec(&op).unwrap());
        self.m.commit(pos, durable).unwrap();
        postcard::from_bytes(&r).unwrap()
    }
    /// The machine as a restart after a crash finds it: the file only, no transaction left open.
    fn reopen(self) -> M {
        let M { m, _dir } = self;
        drop(m);
        M {
            m: PartitionMachine::open(0, &_dir.path().join("p.redb")).unwrap(),
            _dir,
        }
    }
    fn q(&self, q: Query) -> Reply {
        postcard::from_bytes(&self.m.query(&postcard::to_stdvec(&q).unwrap())).unwrap()
    }
    fn create(&mut self, parent: u64, name: &str, kind: Kind) -> Result<Attr, Errno> {
        match self.op(create_op(parent, name, kind)) {
            Reply::Made { attr, parent: p } => {
                assert_eq!(p.ino, parent);
                assert_eq!(p.mtime, 2, "the parent as the create left it");
                Ok(attr)
            }
            Reply::Error(e) => Err(e),
            r => panic!("{r:?}"),
        }
    }
    fn mkdir(&mut self, parent: u64, name: &str) -> u64 {
        let Reply::Attr(a) = self.op(mkdir_alloc(parent, name)) else {
            panic!()
        };
        let before = self.attr(parent).unwrap();
        let r = self.op(Op::MkdirLink {
            parent,
            name: name.into(),
            ino: a.ino,
            now: 2,
        });
        // The reply shows the folder as the new entry left it.
        assert!(
            matches!(r, Reply::Changed { ref intents, parent: ref p }
                if intents.is_empty() && *p == self.attr(parent).unwrap()
                    && p.nlink == before.nlink + 1 && p.mtime == 2),
            "{r:?}"
        );
        a.ino
    }
    fn attr(&self, ino: u64) -> Result<Attr, Errno> {
        match self.q(Query::GetAttr { ino }) {
            Reply::Attr(a) => Ok(a),
            Reply::Error(e) => Err(e),
            r => panic!("{r:?}"),
        }
    }
    fn lookup(&self, parent: u64, name: &str) -> Result<u64, Errno> {
        match self.q(Query::Lookup {
            parent,
            name: name.into(),
        }) {
            Reply::Entry { ino, .. } => Ok(ino),
            Reply::Error(e) => Err(e),
            r => panic!("{r:?}"),
        }
    }
    fn names(&self, dir: u64) -> Vec<String> {
        let Reply::Entries(e) = self.q(Query::ReadDir {
            ino: dir,
            after: 0,
            max: 1000,
        }) else {
            panic!()
        };
        e.into_iter()
            .map(|e| String::from_utf8(e.name).unwrap())
            .collect()
    }
    fn rename(&mut self, sp: u64, sn: &str, dp: u64, dn: &str, flags: u32) -> Result<(), Errno> {
        match self.op(Op::Rename {
            src_parent: sp,
            src_name: sn.into(),
            dst_parent: dp,
            dst_name: dn.into(),
            flags,
            now: 3,
        }) {
            Reply::Intents(i) => {
                assert!(i.is_empty());
                Ok(())
            }
            Reply::Error(e) => Err(e),
            r => panic!("{r:?}"),
        }
    }
}

#[test]
fn namespace_operations_on_one_partition() {
    let mut m = M::new();
    let f = m.create(ROOT, "a", Kind::File).unwrap();
    assert_eq!(m.create(ROOT, "a", Kind::File), Err(Errno::EXIST));
    let d = m.mkdir(ROOT, "d");
    assert_eq!(m.attr(ROOT).unwrap().nlink, 3);
    assert_eq!(m.names(ROOT), ["a", "d"]);
    // readdir continues after a cookie, stable under removal of earlier entries.
    let Reply::Entries(first) = m.q(Query::ReadDir {
        ino: ROOT,
        after: 0,
        max: 1,
    }) else {
        panic!()
    };
    let Reply::Entries(rest) = m.q(Query::ReadDir {
        ino: ROOT,
        after: first[0].cookie,
        max: 10,
    }) else {
        panic!()
    };
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].name, b"d");
    // Hard link, rename over it, link counts.
    let Reply::Attr(l) = m.op(Op::Link {
        ino: f.ino,
        parent: d,
        name: b"b".to_vec(),
        now: 3,
    }) else {
        panic!()
    };
    assert_eq!(l.nlink, 2);
    assert_eq!(
        m.rename(ROOT, "a", d, "b", 0),
        Ok(()),
        "same inode: nothing"
    );
    assert_eq!(m.names(ROOT), ["a", "d"]);
    let g = m.create(ROOT, "g", Kind::File).unwrap();
    assert_eq!(
        m.rename(ROOT, "g", d, "b", RENAME_NOREPLACE),
        Err(Errno::EXIST)
    );
    m.rename(ROOT, "g", d, "b", 0).unwrap();
    assert_eq!(m.attr(f.ino).unwrap().nlink, 1, "the replaced link is gone");
    assert_eq!(m.lookup(d, "b"), Ok(g.ino));
    // Exchange swaps.
    m.rename(ROOT, "a", d, "b", RENAME_EXCHANGE).unwrap();
    assert_eq!(m.lookup(ROOT, "a"), Ok(g.ino));
    assert_eq!(m.lookup(d, "b"), Ok(f.ino));
    // A directory over a file, a file over a directory, a non-empty directory.
    let e = m.mkdir(ROOT, "e");
    assert_eq!(m.rename(ROOT, "e", d, "b", 0), Err(Errno::NOTDIR));
    assert_eq!(m.rename(d, "b", ROOT, "e", 0), Err(Errno::ISDIR));
    m.create(e, "x", Kind::File).unwrap();
    assert_eq!(
        m.op(Op::Unlink {
            parent: ROOT,
            name: b"e".to_vec(),
            dir: true,
            now: 4
        }),
        Reply::Error(Errno::NOTEMPTY)
    );
    // Moving a directory moves its link from one parent to the other.
    let before = m.attr(d).unwrap().nlink;
    m.rename(ROOT, "e", d, "e2", 0).unwrap();
    assert_eq!(m.attr(d).unwrap().nlink, before + 1);
    assert_eq!(m.attr(ROOT).unwrap().nlink, 3);
    let Reply::Parent(p) = m.q(Query::Parent { ino: e }) else {
        panic!()
    };
    assert_eq!(p, d);
    // Unlink and rmdir.
    m.op(Op::Unlink {
        parent: e,
        name: b"x".to_vec(),
        dir: false,
        now: 5,
    });
    let r = m.op(Op::Unlink {
        parent: d,
        name: b"e2".to_vec(),
        dir: true,
        now: 5,
    });
    assert!(
        matches!(r, Reply::Changed { ref parent, .. } if parent.ino == d && parent.mtime == 5),
        "{r:?}"
    );
    assert_eq!(m.attr(e), Err(Errno::NOENT));
    assert_eq!(m.attr(d).unwrap().nlink, before);
    // Symlinks, xattrs.
    let s = m.create(ROOT, "s", Kind::Symlink).unwrap();
    assert_eq!(
        m.q(Query::ReadLink { ino: s.ino }),
        Reply::Target(b"t".to_vec())
    );
    let x = |m: &mut M, name: &str, v: &str, flags| {
        m.op(Op::SetXattr {
            ino: s.ino,
            name: name.into(),
            value: v.into(),
            flags,
            now: 6,
        })
    };
    assert_eq!(
        x(&mut m, "user.a", "1", XATTR_REPLACE),
        Reply::Error(Errno::NODATA)
    );
    assert_eq!(x(&mut m, "user.a", "1", XATTR_CREATE), Reply::Done);
    assert_eq!(
        x(&mut m, "user.a", "2", XATTR_CREATE),
        Reply::Error(Errno::EXIST)
    );
    assert_eq!(x(&mut m, "user.a", "2", 0), Reply::Done);
    assert_eq!(
        m.q(Query::GetXattr {
            ino: s.ino,
            name: b"user.a".to_vec()
        }),
        Reply::Value(b"2".to_vec())
    );
    // An inode's attributes are bounded in all (they are read whole with the inode) and in
    // names (what one listxattr returns); past either, ENOSPC and nothing changed.
    let set = |m: &mut M, ino: u64, name: String, value: Vec<u8>| {
        m.op(Op::SetXattr {
            ino,
            name: name.into_bytes(),
            value,
            flags: 0,
            now: 7,
        })
    };
    let big = vec![7u8; XATTR_VALUE_MAX];
    let mut n = 0;
    while set(&mut m, s.ino, format!("user.big{n}"), big.clone()) == Reply::Done {
        n += 1;
        assert!(n < 10, "unbounded");
    }
    assert_eq!(n, 3);
    assert_eq!(
        set(&mut m, s.ino, "user.big3".into(), big.clone()),
        Reply::Error(Errno::NOSPC)
    );
    let get = |m: &mut M, name: &str| {
        m.q(Query::GetXattr {
            ino: s.ino,
            name: name.into(),
        })
    };
    assert_eq!(get(&mut m, "user.big3"), Reply::Error(Errno::NODATA));
    assert_eq!(set(&mut m, s.ino, "user.big0".into(), vec![1]), Reply::Done);
    assert_eq!(
        set(&mut m, s.ino, "user.big3".into(), big.clone()),
        Reply::Done
    );
    assert_eq!(get(&mut m, "user.big3"), Reply::Value(big));
    let many = m.create(ROOT, "many", Kind::File).unwrap();
    // 255-byte names, 256 bytes each with its NUL.
    let long = |i: usize| format!("user.{i:0>250}");
    let mut n = 0;
    while set(&mut m, many.ino, long(n), Vec::new()) == Reply::Done {
        n += 1;
        assert!(n < 1000, "unbounded");
    }
    assert_eq!(n, XATTR_NAMES_MAX / 256);
    assert_eq!(
        set(&mut m, many.ino, long(n), Vec::new()),
        Reply::Error(Errno::NOSPC)
    );
    // Refused commands leave nothing behind.
    let before = m.names(ROOT);
    let bad = [
        (
            Op::Create {
                parent: f.ino,
                name: b"under-a-file".to_vec(),
                kind: Kind::File,
                perm: 0,
                uid: 0,
                gid: 0,
                rdev: 0,
                target: vec![],
                exclusive: true,
                now: 7,
            },
            Errno::NOTDIR,
        ),
        (
            Op::Link {
                ino: d,
                parent: ROOT,
                name: b"dirlink".to_vec(),
                now: 7,
            },
            Errno::PERM,
        ),
        (
            Op::Rename {
                src_parent: ROOT,
                src_name: b"missing".to_vec(),
                dst_parent: ROOT,
                dst_name: b"z".to_vec(),
                flags: 0,
                now: 7,
            },
            Errno::NOENT,
        ),
        (
            Op::Rename {
                src_parent: ROOT,
                src_name: b"a".to_vec(),
                dst_parent: ROOT,
                dst_name: b"z".to_vec(),
                flags: RENAME_EXCHANGE | RENAME_NOREPLACE,
                now: 7,
            },
            Errno::INVAL,
        ),
    ];
    for (op, want) in bad {
        assert_eq!(m.op(op), Reply::Error(want));
    }
    assert_eq!(m.names(ROOT), before);
    // Malformed commands are refused, not applied.
    let r = m.m.apply(&[0xff, 0xff, 0xff]);
    assert_eq!(
        postcard::from_bytes::<Reply>(&r).unwrap(),
        Reply::Error(Errno::INVAL)
    );
}

/// Step 1 of a mkdir: the pending inode of `name` in `parent`.
fn mkdir_alloc(parent: u64, name: &str) -> Op {
    Op::MkdirAlloc {
        parent,
        name: name.into(),
        perm: 0o755,
        uid: 0,
        gid: 0,
        volume: 1,
        now: 2,
    }
}

fn create_op(parent: u64, name: &str, kind: Kind) -> Op {
    Op::Create {
        parent,
        name: name.into(),
        kind,
        perm: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: b"t".to_vec(),
        exclusive: true,
        now: 2,
    }
}

/// Applied batches share one open transaction, committed at the latest after 64 batches (or
/// 20 ms); a read sees every command applied before it, through that transaction. Whatever a
/// crash finds, the position Raft applies again from and the commands in the file agree: a
/// command is committed with its position or not at all.
#[test]
fn applied_commands_are_committed_with_their_position_or_not_at_all() {
    let mut m = M::new();
    m.op_at(create_op(ROOT, "a", Kind::File), b"p1", true);
    m.op_at(create_op(ROOT, "b", Kind::File), b"p2", false);
    assert!(m.lookup(ROOT, "b").is_ok(), "a read sees what was applied");
    m.op_at(create_op(ROOT, "c", Kind::File), b"p3", false);
    assert!(
        m.lookup(ROOT, "c").is_ok(),
        "and what was applied after a read"
    );
    let m = m.reopen();
    assert!(m.lookup(ROOT, "a").is_ok(), "a durable commit is kept");
    let (b, c) = (m.lookup(ROOT, "b").is_ok(), m.lookup(ROOT, "c").is_ok());
    match m.m.applied().unwrap().unwrap().as_slice() {
        b"p1" => assert!(!b && !c),
        b"p2" => assert!(b && !c),
        b"p3" => assert!(b && c),
        p => panic!("position {p:?}"),
    }
    // 65 batches and no read: at least one commit happens on the way, and the file holds
    // exactly the commands up to the position it holds.
    let mut m = m;
    for i in 0..65 {
        let op = create_op(ROOT, &format!("n{i}"), Kind::File);
        m.op_at(op, format!("q{i}").as_bytes(), false);
    }
    let m = m.reopen();
    let pos = m.m.applied().unwrap().unwrap();
    assert_eq!(pos[0], b'q', "one of the 65 batches was committed: {pos:?}");
    let last: usize = std::str::from_utf8(&pos[1..]).unwrap().parse().unwrap();
    for i in 0..65 {
        let found = m.lookup(ROOT, &format!("n{i}")).is_ok();
        assert_eq!(found, i <= last, "n{i} against position {last}");
    }
}

/// A storage failure half-way through a command (here a damaged usage record, met after the
/// create wrote its entry): queries answer EIO instead of showing the half-made change, the
/// batch's commit fails, and the file never holds it.
#[test]
fn a_batch_with_a_failed_command_is_never_read() {
    let mut a = M::new();
    a.create(ROOT, "f", Kind::File).unwrap();
    let mut all: Vec<Vec<(Vec<u8>, Vec<u8>)>> = postcard::from_bytes(&a.m.snapshot()).unwrap();
    let usage = &mut all[7];
    assert!(!usage.is_empty(), "the volume's usage is in the snapshot");
    for (_, v) in usage.iter_mut() {
        *v = vec![0xff];
    }
    let mut b = M::partition(0);
    b.m.restore(&postcard::to_stdvec(&all).unwrap()).unwrap();
    b.m.commit(b"p1", true).unwrap();
    assert!(b.lookup(ROOT, "f").is_ok());
    let cmd = postcard::to_stdvec(&create_op(ROOT, "g", Kind::File)).unwrap();
    let r: Reply = postcard::from_bytes(&b.m.apply(&cmd)).unwrap();
    assert!(matches!(r, Reply::Error(Errno::IO)), "{r:?}");
    assert_eq!(
        b.lookup(ROOT, "g"),
        Err(Errno::IO),
        "the half-made entry is not shown"
    );
    assert_eq!(b.lookup(ROOT, "f"), Err(Errno::IO));
    assert!(b.m.commit(b"p2", false).is_err(), "the batch fails");
    let b = b.reopen();
    assert_eq!(b.m.applied().unwrap().unwrap(), b"p1");
    assert_eq!(b.lookup(ROOT, "g"), Err(Errno::NOENT));
}

#[test]
fn snapshot_restores_everything() {
    let mut a = M::new();
    for i in 0..50 {
        a.create(ROOT, &format!("f{i}"), Kind::File).unwrap();
    }
    let snap = a.m.snapshot();
    let mut b = M::new();
    b.m.restore(&snap).unwrap();
    b.m.commit(b"pos", true).unwrap();
    assert_eq!(b.names(ROOT), a.names(ROOT));
    assert_eq!(b.m.applied().unwrap().unwrap(), b"pos");
    // The counter came too: a new inode does not reuse a number.
    let n = b.create(ROOT, "new", Kind::File).unwrap();
    for i in 0..50 {
        assert_ne!(a.lookup(ROOT, &format!("f{i}")).unwrap(), n.ino);
    }
    assert!(b.m.restore(b"garbage").is_err());
}

/// A snapshot comes from a peer. Keys too short for what the tables hold (a readdir cookie's
/// key, a volume's usage key) are errors when read, not a panic of the server.
#[test]
fn short_keys_from_a_snapshot_are_errors() {
    let mut a = M::new();
    a.create(ROOT, "f", Kind::File).unwrap();
    let mut tables: Vec<Vec<(Vec<u8>, Vec<u8>)>> = postcard::from_bytes(&a.m.snapshot()).unwrap();
    // Tables 2 and 7: cookies (directory and cookie, 16 bytes) and usage (volume, 4 bytes).
    let dir_key = ROOT.to_be_bytes().to_vec();
    tables[2].push(([dir_key, vec![5]].concat(), b"g".to_vec()));
    tables[7].push((vec![1, 2], postcard::to_stdvec(&(1u64, 1u64)).unwrap()));
    let mut b = M::new();
    b.m.restore(&postcard::to_stdvec(&tables).unwrap()).unwrap();
    b.m.commit(b"pos", true).unwrap();
    let read = b.q(Query::ReadDir {
        ino: ROOT,
        after: 0,
        max: 100,
    });
    assert_eq!(read, Reply::Error(Errno::IO));
    assert_eq!(b.q(Query::Usage), Reply::Error(Errno::IO));
    // The rest of the partition answers.
    assert!(b.lookup(ROOT, "f").is_ok());
}

/// An open file unlinked on one replica is kept (nlink 0) for its mount. A replica that got
/// the partition by snapshot knows it is kept: it forgets it when its mount is gone too long,
/// like the others, instead of keeping the inode for ever.
#[test]
fn a_snapshot_carries_the_files_kept_for_their_mounts() {
    let mut a = M::new();
    let f = a.create(ROOT, "open", Kind::File).unwrap().ino;
    let g = a.create(ROOT, "other", Kind::File).unwrap().ino;
    assert_eq!(a.op(Op::Keep { ino: f, now: 10 }), Reply::Done);
    a.op(Op::Unlink {
        parent: ROOT,
        name: b"open".to_vec(),
        dir: false,
        now: 11,
    });
    assert_eq!(a.attr(f).unwrap().nlink, 0, "kept after its last link");
    let mut b = M::new();
    b.m.restore(&a.m.snapshot()).unwrap();
    b.m.commit(b"pos", true).unwrap();
    assert_eq!(b.attr(f).unwrap().nlink, 0);
    // Long after, another file is kept: the one whose mount never closed it goes.
    let later = 10 + sealfs_meta::KEEP_MAX_NS + 1;
    assert_eq!(b.op(Op::Keep { ino: g, now: later }), Reply::Done);
    assert_eq!(b.attr(f), Err(Errno::NOENT));

    // A snapshot made before the once tables (10 tables) or the kept table (9) were in it
    // still restores; one with fewer tables or 11 is damaged.
    let tables: Vec<Vec<(Vec<u8>, Vec<u8>)>> = postcard::from_bytes(&a.m.snapshot()).unwrap();
    assert_eq!(tables.len(), 12);
    for n in [10, 9] {
        let mut c = M::new();
        c.m.restore(&postcard::to_stdvec(&tables[..n]).unwrap())
            .unwrap();
        c.m.commit(b"pos", true).unwrap();
        assert_eq!(c.lookup(ROOT, "other"), Ok(g));
    }
    for n in [11, 8] {
        let mut c = M::new();
        assert!(c
            .m
            .restore(&postcard::to_stdvec(&tables[..n]).unwrap())
            .is_err());
    }
}

/// A command sent again (its answer lost with a leader that stepped down, or late past a
/// timeout) gets the answer of the first time, and is not applied twice: an exclusive create
/// does not answer EEXIST to the client that made the file, an unlink not ENOENT to the one
/// that removed it. The answers go with a snapshot, and are forgotten after `ONCE_KEEP_NS`.
#[test]
fn a_command_sent_again_gets_its_first_answer_and_is_applied_once() {
    let once = |id: u128, now: i64, op: Op| Op::Once {
        id,
        now,
        op: Box::new(op),
    };
    let unlink = |name: &str| Op::Unlink {
        parent: ROOT,
        name: name.into(),
        dir: false,
        now: 3,
    };
    let mut m = M::new();
    let made = m.op(once(1, 2, create_op(ROOT, "f", Kind::File)));
    let Reply::Made { attr, .. } = made.clone() else {
        panic!("{made:?}")
    };
    assert_eq!(m.op(once(1, 2, create_op(ROOT, "f", Kind::File))), made);
    assert_eq!(m.names(ROOT), vec!["f".to_string()], "made once");
    assert_eq!(
        m.create(ROOT, "f", Kind::File),
        Err(Errno::EXIST),
        "another client's create of the name is still refused"
    );

    let gone = m.op(once(2, 3, unlink("f")));
    assert!(!matches!(gone, Reply::Error(_)), "{gone:?}");
    assert_eq!(m.op(once(2, 3, unlink("f"))), gone);
    assert_eq!(m.op(once(3, 3, unlink("f"))), Reply::Error(Errno::NOENT));
    assert_eq!(m.attr(attr.ino), Err(Errno::NOENT));

    // An error is the first answer too.
    m.create(ROOT, "g", Kind::File).unwrap();
    let refused = once(4, 4, create_op(ROOT, "g", Kind::File));
    assert_eq!(m.op(refused.clone()), Reply::Error(Errno::EXIST));
    m.op(unlink("g"));
    assert_eq!(m.op(refused), Reply::Error(Errno::EXIST), "not applied now");
    assert!(m.names(ROOT).is_empty());

    // A replica that got the partition by snapshot answers the same.
    let mut b = M::new();
    b.m.restore(&m.m.snapshot()).unwrap();
    b.m.commit(b"pos", true).unwrap();
    assert_eq!(b.op(once(1, 2, create_op(ROOT, "f", Kind::File))), made);
    assert!(b.names(ROOT).is_empty());

    // Long after, a command forgets the old answers: the same id is then a new command.
    let later = 10 + sealfs_meta::ONCE_KEEP_NS;
    b.op(once(5, later, create_op(ROOT, "h", Kind::File)));
    let again = b.op(once(1, later, create_op(ROOT, "f", Kind::File)));
    let Reply::Made { attr: new, .. } = again else {
        panic!("{again:?}")
    };
    assert_ne!(new.ino, attr.ino, "forgotten, so made anew");
}

/// A two-partition operation's second step (here a mkdir's link of a directory another
/// partition holds) is applied only until its deadline, and never after the orphan scan's
/// decision about its first step: a link that came after the scan removed the pending
/// directory would name nothing.
#[test]
fn a_second_step_is_refused_past_its_deadline_and_after_the_scan_decided() {
    let far = |n: u64| (5u64 << 40) | n;
    let link = |name: &str, ino: u64, now: i64| Op::Within {
        started: 0,
        deadline: 10,
        now,
        op: Box::new(Op::MkdirLink {
            parent: ROOT,
            name: name.into(),
            ino,
            now,
        }),
    };
    let decide = |name: &str, ino: u64, now: i64| Op::Decide {
        parent: ROOT,
        name: name.into(),
        ino,
        now,
    };
    let mut m = M::new();
    assert_eq!(
        m.op(link("late", far(1), 11)),
        Reply::Error(Errno::TIMEDOUT)
    );
    assert!(m.names(ROOT).is_empty(), "nothing stored");
    let r = m.op(link("a", far(2), 10));
    assert!(matches!(r, Reply::Changed { .. }), "{r:?}");
    assert_eq!(m.names(ROOT), vec!["a".to_string()]);

    // The scan asks about "b" at 9: no entry. A link of it in time by its own clock but
    // ordered after the question is refused; so is any later one.
    assert_eq!(m.op(decide("b", far(3), 9)), Reply::Error(Errno::NOENT));
    assert!(matches!(m.op(link("c", far(4), 8)), Reply::Changed { .. }));
    assert_eq!(m.op(decide("b", far(3), 12)), Reply::Error(Errno::NOENT));
    assert_eq!(m.op(link("b", far(3), 8)), Reply::Error(Errno::TIMEDOUT));
    // An earlier question does not move the partition's decision time back.
    m.op(decide("b", far(3), 5));
    assert_eq!(m.op(link("b", far(3), 8)), Reply::Error(Errno::TIMEDOUT));
    assert_eq!(m.names(ROOT), vec!["a".to_string(), "c".to_string()]);
    // The answer for an entry that names the inode, and for one that names another.
    assert!(matches!(
        m.op(decide("a", far(2), 13)),
        Reply::Entry { ino, kind: Kind::Dir, .. } if ino == far(2)
    ));
    assert_eq!(m.op(decide("a", far(9), 13)), Reply::Error(Errno::NOENT));
    // A second step whose deadline is past the decisions is applied; and the decision time
    // survives a snapshot.
    let mut b = M::new();
    b.m.restore(&m.m.snapshot()).unwrap();
    b.m.commit(b"pos", true).unwrap();
    for r in [&mut m, &mut b] {
        assert_eq!(r.op(link("b", far(3), 10)), Reply::Error(Errno::TIMEDOUT));
        let later = Op::Within {
            started: 0,
            deadline: 20,
            now: 14,
            op: Box::new(Op::MkdirLink {
                parent: ROOT,
                name: b"d".to_vec(),
                ino: far(5),
                now: 14,
            }),
        };
        assert!(matches!(r.op(later), Reply::Changed { .. }));
    }
}

/// A follow-up is applied once however often it comes, for an hour: the partition remembers
/// it that long, then forgets it (in a sweep once per 64 follow-ups applied).
#[test]
fn follow_ups_are_applied_once_and_forgotten_after_an_hour() {
    use sealfs_meta::{FollowUp, Intent};
    let mut m = M::new();
    let f = m.create(ROOT, "f", Kind::File).unwrap().ino;
    let hour = 3_600_000_000_000;
    let touch = |id: u64, created: i64| Op::Apply {
        intent: Intent {
            id,
            from: 1,
            to: 0,
            op: FollowUp::Touch { ino: f },
            created,
        },
    };
    assert_eq!(m.op(touch(1, 10)), Reply::Done);
    assert_eq!(m.attr(f).unwrap().ctime, 10);
    assert_eq!(m.op(touch(2, 20)), Reply::Done);
    assert_eq!(m.op(touch(1, 10)), Reply::Done);
    assert_eq!(m.attr(f).unwrap().ctime, 20, "applied once");
    // 64 more follow-ups, an hour later: one of them sweeps the first two away.
    for id in 3..67 {
        m.op(touch(id, hour + 30));
    }
    assert_eq!(m.op(touch(1, 10)), Reply::Done);
    assert_eq!(m.attr(f).unwrap().ctime, 10, "forgotten after an hour");
}

/// A directory renamed before its mkdir's `Confirm` was applied (the `Confirm` lost with its
/// partition) is confirmed by the rename, so the orphan scan, which looks for the name it was
/// made under, keeps it: a rename in its folder, and an exchange with a file.
#[test]
fn a_pending_directory_renamed_is_kept_by_the_orphan_scan() {
    pending_directory_renamed(&[("made", "moved", 0)]);
    pending_directory_renamed(&[("made", "file", RENAME_EXCHANGE)]);
}

fn pending_directory_renamed(renames: &[(&str, &str, u32)]) {
    use sealfs_meta::{FollowUp, Unsettled};
    let mut parent = M::new();
    let mut other = M::partition(1);
    let Reply::Attr(d) = other.op(mkdir_alloc(ROOT, "made")) else {
        panic!()
    };
    let Reply::Changed { intents, .. } = parent.op(Op::MkdirLink {
        parent: ROOT,
        name: b"made".to_vec(),
        ino: d.ino,
        now: 2,
    }) else {
        panic!()
    };
    assert!(matches!(intents[..], [ref i] if i.op == FollowUp::Confirm { ino: d.ino }));
    // The Confirm is lost; the directory is renamed.
    parent.create(ROOT, "file", Kind::File).unwrap();
    let mut told = vec![];
    for &(from, to, flags) in renames {
        let Reply::Intents(i) = parent.op(Op::Rename {
            src_parent: ROOT,
            src_name: from.into(),
            dst_parent: ROOT,
            dst_name: to.into(),
            flags,
            now: 3,
        }) else {
            panic!()
        };
        told.extend(i);
    }
    for intent in told.into_iter().filter(|i| i.to == 1) {
        assert_eq!(other.op(Op::Apply { intent }), Reply::Done);
    }
    // The scan finds no entry "made" naming it: the directory is kept all the same.
    other.op(Op::Settle {
        item: Unsettled::PendingDir {
            ino: d.ino,
            parent: ROOT,
            name: b"made".to_vec(),
        },
        entry_exists: false,
        now: 4,
    });
    assert!(other.attr(d.ino).is_ok(), "{renames:?}");
}

fn ext(offset: u64, len: u64, tag: u32) -> Extent {
    Extent {
        offset,
        len,
        blade: tag,
        address: (tag as u64) << 32,
        frond_len: len as u32,
        seq: 1,
        skip: 0,
        inline: Vec::new(),
        inline_crc: 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Overlapping writes and truncates, in fronds and inline: the extents always describe
    /// exactly the bytes a model file holds (each byte tagged by the write that put it there,
    /// or, inline, its value).
    #[test]
    fn extents_follow_overlapping_writes(ops in prop::collection::vec((0u64..200, 1u64..80, any::<bool>()), 1..40)) {
        let mut m = M::new();
        let f = m.create(ROOT, "f", Kind::File).unwrap().ino;
        let mut model: Vec<Option<(u32, u64)>> = Vec::new();
        for (i, (off, len, truncate)) in ops.into_iter().enumerate() {
            let tag = i as u32 + 1;
            if truncate && i % 3 == 0 {
                m.op(Op::SetAttr { ino: f, set: SetAttr { size: Some(off), ..Default::default() }, now: 1 });
                model.resize(off as usize, None);
                continue;
            }
            let inline = i % 2 == 1;
            let byte = |k: u64| (tag as u64 * 7 + k) as u8;
            let e = if inline {
                Extent::inline(off, &(0..len).map(byte).collect::<Vec<u8>>())
            } else {
                ext(off, len, tag)
            };
            m.op(Op::Write {
                ino: f,
                extents: vec![e],
                now: 1,
                then: None,
            });
            if model.len() < (off + len) as usize {
                model.resize((off + len) as usize, None);
            }
            for b in off..off + len {
                model[b as usize] = Some(if inline { (0, byte(b - off) as u64) } else { (tag, b - off) });
            }
        }
        let Reply::Extents(es, size) = m.q(Query::Extents { ino: f, offset: 0, len: u64::MAX }) else { panic!() };
        prop_assert_eq!(size, model.len() as u64);
        let mut got: Vec<Option<(u32, u64)>> = vec![None; model.len()];
        let mut last_end = 0;
        for e in &es {
            prop_assert!(e.offset >= last_end, "extents overlap: {:?}", es);
            last_end = e.offset + e.len;
            prop_assert!(e.skip as u64 + e.len <= e.frond_len as u64);
            if e.is_inline() {
                // A cut inline extent keeps only the bytes it still names.
                prop_assert_eq!(e.inline.len() as u64, e.len);
                prop_assert_eq!(e.skip, 0);
            }
            for k in 0..e.len {
                let at = e.skip as u64 + k;
                got[(e.offset + k) as usize] = Some(if e.is_inline() {
                    (0, e.inline[at as usize] as u64)
                } else {
                    (e.blade, at)
                });
            }
        }
        prop_assert_eq!(got, model);
        let Reply::Attr(a) = m.q(Query::GetAttr { ino: f }) else { panic!() };
        prop_assert_eq!(a.size, size);
    }

    /// Arbitrary bytes as a command or a query: an error reply, never a panic.
    #[test]
    fn arbitrary_bytes_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut m = M::new();
        let _ = m.m.apply(&bytes);
        m.m.commit(b"pos", false).unwrap();
        let r: Reply = postcard::from_bytes(&m.m.query(&bytes)).unwrap();
        let _ = r;
        // The store is still whole.
        let whole = matches!(m.q(Query::GetAttr { ino: ROOT }), Reply::Attr(_));
        prop_assert!(whole, "the root is gone");
    }
}

#[test]
fn inline_bytes_that_do_not_match_their_crc_are_refused() {
    let mut m = M::new();
    let f = m.create(ROOT, "f", Kind::File).unwrap().ino;
    let mut bad = Extent::inline(0, b"hello, world");
    bad.inline[0] ^= 1;
    assert_eq!(
        m.op(Op::Write {
            ino: f,
            extents: vec![bad],
            now: 1,
            then: None,
        }),
        Reply::Error(Errno::INVAL)
    );
    // Nor may an inline extent pass the inline bound, or claim a blade.
    let big = Extent::inline(0, &vec![7u8; INLINE_FILE_BYTES as usize + 1]);
    let mut in_blade = Extent::inline(0, b"x");
    in_blade.blade = 3;
    for e in [big, in_blade] {
        assert_eq!(
            m.op(Op::Write {
                ino: f,
                extents: vec![e],
                now: 1,
                then: None,
            }),
            Reply::Error(Errno::INVAL)
        );
    }
    let Reply::Extents(es, size) = m.q(Query::Extents {
        ino: f,
        offset: 0,
        len: u64::MAX,
    }) else {
        panic!()
    };
    assert!(es.is_empty() && size == 0, "nothing stored: {es:?}");
    // A good one goes in, and a write over its middle leaves two intact halves.
    m.op(Op::Write {
        ino: f,
        extents: vec![Extent::inline(0, b"hello, world")],
        now: 1,
        then: None,
    });
    m.op(Op::Write {
        ino: f,
        extents: vec![Extent::inline(5, b"__")],
        now: 1,
        then: None,
    });
    let Reply::Extents(es, _) = m.q(Query::Extents {
        ino: f,
        offset: 0,
        len: u64::MAX,
    }) else {
        panic!()
    };
    let bytes: Vec<u8> = es.iter().flat_map(|e| e.inline.clone()).collect();
    assert_eq!(bytes, b"hello__world");
    assert!(es.iter().all(|e| e.inline_intact()));
}

#[test]
fn a_query_for_more_extents_than_a_reply_carries_is_refused() {
    let mut m = M::new();
    let f = m.create(ROOT, "f", Kind::File).unwrap().ino;
    let n = EXTENTS_REPLY_MAX as u64 + 1;
    let extents: Vec<Extent> = (0..n).map(|i| ext(i * 2, 1, 1)).collect();
    assert!(matches!(
        m.op(Op::Write {
            ino: f,
            extents,
            now: 1,
            then: None,
        }),
        Reply::Attr(_)
    ));
    let whole = Query::Extents {
        ino: f,
        offset: 0,
        len: u64::MAX,
    };
    assert_eq!(m.q(whole), Reply::Error(Errno::FBIG));
    // A range of the file still reads.
    let Reply::Extents(es, size) = m.q(Query::Extents {
        ino: f,
        offset: 100,
        len: 10,
    }) else {
        panic!()
    };
    assert_eq!((es.len(), size), (5, n * 2 - 1));
}

#[test]
fn truncating_into_an_inline_extent_keeps_its_head() {
    let mut m = M::new();
    let f = m.create(ROOT, "f", Kind::File).unwrap().ino;
    m.op(Op::Write {
        ino: f,
        extents: vec![Extent::inline(0, b"0123456789")],
        now: 1,
        then: None,
    });
    let cut = |m: &mut M, size| {
        m.op(Op::SetAttr {
            ino: f,
            set: SetAttr {
                size: Some(size),
                ..Default::default()
            },
            now: 2,
        })
    };
    assert!(matches!(cut(&mut m, 8), Reply::Attr(_)));
    let Reply::Extents(es, _) = m.q(Query::Extents {
        ino: f,
        offset: 0,
        len: u64::MAX,
    }) else {
        panic!()
    };
    assert_eq!(es[0].inline, b"01234567");
}

#[test]
fn a_write_then_sets_times_in_the_same_command_and_refuses_a_size() {
    let mut m = M::new();
    let f = m.create(ROOT, "f", Kind::File).unwrap().ino;
    let set = SetAttr {
        mtime: Some(1_153_704_088_000_000_000),
        perm: Some(0o600),
        ..Default::default()
    };
    let Reply::Attr(a) = m.op(Op::Write {
        ino: f,
        extents: vec![Extent::inline(0, b"hello")],
        now: 5,
        then: Some(set),
    }) else {
        panic!("the write was refused")
    };
    assert_eq!(
        (a.size, a.mtime, a.perm),
        (5, 1_153_704_088_000_000_000, 0o600)
    );
    // A size rides on its own command (it cuts what was written before it): nothing applied.
    let r = m.op(Op::Write {
        ino: f,
        extents: vec![Extent::inline(5, b" world")],
        now: 6,
        then: Some(SetAttr {
            size: Some(1),
            ..Default::default()
        }),
    });
    assert_eq!(r, Reply::Error(Errno::INVAL));
    let Reply::Attr(a) = m.q(Query::GetAttr { ino: f }) else {
        panic!()
    };
    assert_eq!(a.size, 5);
}

#[test]
fn a_lookup_with_attributes_answers_in_one_query_when_the_inode_is_here() {
    let mut m = M::new();
    let f = m.create(ROOT, "f", Kind::File).unwrap();
    let d = m.mkdir(ROOT, "d");
    let la = |m: &M, name: &str| {
        m.q(Query::LookupAttr {
            parent: ROOT,
            name: name.into(),
        })
    };
    assert_eq!(la(&m, "f"), Reply::Attr(f.clone()));
    assert_eq!(la(&m, "d"), Reply::Attr(m.attr(d).unwrap()));
    assert_eq!(la(&m, "missing"), Reply::Error(Errno::NOENT));
    // A directory whose inode another partition holds: the entry, for the caller to ask there.
    let far = (5u64 << 40) | 7;
    let r = m.op(Op::MkdirLink {
        parent: ROOT,
        name: b"far".to_vec(),
        ino: far,
        now: 2,
    });
    assert!(matches!(r, Reply::Changed { .. }), "{r:?}");
    assert!(
        matches!(la(&m, "far"), Reply::Entry { ino, kind: Kind::Dir, .. } if ino == far),
        "{:?}",
        la(&m, "far")
    );
    // Under a file: not a folder.
    let r = m.q(Query::LookupAttr {
        parent: f.ino,
        name: b"x".to_vec(),
    });
    assert_eq!(r, Reply::Error(Errno::NOTDIR));
}

/// A full disk under a partition's store: the batch that finds no room fails (the group then
/// stops and Raft applies its commands again later), nothing panics, and reopened with room the
/// store holds exactly the commands up to the position it last committed, and takes more.
/// Mounts a small tmpfs, so it needs root (as CI has); elsewhere it says so and passes.
#[test]
fn a_full_disk_fails_the_batch_and_the_store_reopens_whole() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("disk");
    let Some(disk) = sealfs_raft::testing::Tmpfs::mount(&at, "3m") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let path = at.join("p.redb");
    let mut m = PartitionMachine::open(0, &path).unwrap();
    m.apply(&postcard::to_stdvec(&root_op()).unwrap());
    m.commit(b"0", true).unwrap();
    let name = |i: usize| format!("{i:0>200}");
    let mut failed = None;
    for i in 1..100_000 {
        let cmd = postcard::to_stdvec(&create_op(ROOT, &name(i), Kind::File)).unwrap();
        let r: Reply = postcard::from_bytes(&m.apply(&cmd)).unwrap();
        // Every 50th batch is made durable, as a snapshot makes it.
        let c = m.commit(i.to_string().as_bytes(), i % 50 == 0);
        match (r, c) {
            (Reply::Made { .. }, Ok(())) => {}
            (r, c) => {
                failed = Some((i, format!("{r:?} / {c:?}")));
                break;
            }
        }
    }
    let (at_failure, what) = failed.expect("a 3 MiB disk fills");
    eprintln!("batch {at_failure} failed: {what}");
    drop(m);
    disk.resize("64m");
    let mut m = PartitionMachine::open(0, &path).unwrap();
    let pos: usize = std::str::from_utf8(&m.applied().unwrap().unwrap())
        .unwrap()
        .parse()
        .unwrap();
    assert!(pos < at_failure, "position {pos}, failed at {at_failure}");
    for i in 1..at_failure {
        let q = Query::Lookup {
            parent: ROOT,
            name: name(i).into_bytes(),
        };
        let r: Reply = postcard::from_bytes(&m.query(&postcard::to_stdvec(&q).unwrap())).unwrap();
        let found = !matches!(r, Reply::Error(_));
        assert_eq!(found, i <= pos, "{} against position {pos}: {r:?}", i);
    }
    let cmd = postcard::to_stdvec(&create_op(ROOT, "after", Kind::File)).unwrap();
    let r: Reply = postcard::from_bytes(&m.apply(&cmd)).unwrap();
    assert!(matches!(r, Reply::Made { .. }), "{r:?}");
    m.commit(b"after", true).unwrap();
}

#[test]
fn a_retired_blade_takes_no_new_extent_and_its_references_are_counted() {
    let mut m = M::new();
    let f = m.create(ROOT, "f", Kind::File).unwrap().ino;
    let g = m.create(ROOT, "g", Kind::File).unwrap().ino;
    let write = |ino, e| Op::Write {
        ino,
        extents: vec![e],
        now: 1,
        then: None,
    };
    m.op(write(f, ext(0, 100, 7)));
    m.op(write(f, ext(100, 50, 8)));
    m.op(write(g, ext(0, 10, 7)));
    m.op(write(g, Extent::inline(10, b"inline")));
    let refs = |m: &mut M| {
        m.q(Query::BladeRefs {
            blades: vec![7, 8, 9],
        })
    };
    assert_eq!(refs(&mut m), Reply::Refs(vec![2, 1, 0]));
    // Retired: extents in blade 7 are refused, others and inline ones are taken.
    assert_eq!(m.op(Op::Retire { blades: vec![7, 9] }), Reply::Done);
    assert_eq!(m.op(write(f, ext(200, 10, 7))), Reply::Error(Errno::STALE));
    assert!(matches!(m.op(write(f, ext(200, 10, 8))), Reply::Attr(_)));
    // A frond's blade and its address must agree: naming an open blade for a frond in a
    // retired one does not pass the fence.
    let mut disguised = ext(300, 10, 8);
    disguised.address = 7 << 32;
    assert_eq!(m.op(write(f, disguised)), Reply::Error(Errno::INVAL));
    assert!(matches!(
        m.op(write(f, Extent::inline(0, b"x"))),
        Reply::Attr(_)
    ));
    // Cutting an extent of a retired blade (an overwrite, a truncate) keeps counting what is
    // left of it; removing the file takes its references.
    assert_eq!(refs(&mut m), Reply::Refs(vec![2, 2, 0]));
    let cut = SetAttr {
        size: Some(5),
        ..Default::default()
    };
    assert!(matches!(
        m.op(Op::SetAttr {
            ino: g,
            set: cut,
            now: 2
        }),
        Reply::Attr(_)
    ));
    assert_eq!(refs(&mut m), Reply::Refs(vec![2, 2, 0]));
    let unlink = |name: &str| Op::Unlink {
        parent: ROOT,
        name: name.as_bytes().to_vec(),
        dir: false,
        now: 3,
    };
    assert!(matches!(m.op(unlink("f")), Reply::Changed { .. }));
    assert_eq!(refs(&mut m), Reply::Refs(vec![1, 0, 0]));
    assert!(matches!(m.op(unlink("g")), Reply::Changed { .. }));
    assert_eq!(refs(&mut m), Reply::Refs(vec![0, 0, 0]));
    // The marks are in snapshots.
    let snap = m.m.snapshot();
    let mut other = M::new();
    other.m.restore(&snap).unwrap();
    let h = other.create(ROOT, "h", Kind::File).unwrap().ino;
    assert_eq!(
        other.op(write(h, ext(0, 10, 9))),
        Reply::Error(Errno::STALE)
    );
    // Too many blades at once are refused.
    let many: Vec<u32> = (0..=REFS_BLADES_MAX as u32).collect();
    assert_eq!(
        m.q(Query::BladeRefs {
            blades: many.clone()
        }),
        Reply::Error(Errno::INVAL)
    );
    assert_eq!(
        m.op(Op::Retire { blades: many }),
        Reply::Error(Errno::INVAL)
    );
}
