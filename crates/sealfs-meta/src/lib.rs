//! The namespace of sealfs (DESIGN 5.1, 5.2): inodes and directory entries split over P
//! partitions, each a Raft group whose state machine is a redb store ([`PartitionMachine`]).
//!
//! - `ino = partition << 40 | local counter`; the roots of volumes are inodes below
//!   [`FIRST_LOCAL`] (volume 1's root is inode 1 in partition 0).
//! - An entry `(parent, name) -> (ino, kind)` lives in the parent's partition; a file, symlink or
//!   special file is created there too; a directory's inode goes to the partition that
//!   `(parent, name)` hashes to.
//! - Operations on two partitions follow the intent protocol of [`intent`](crate::Op): the
//!   coordinating partition records, in the same transaction as its own change, the follow-up
//!   the other partition must apply; follow-ups are idempotent (their id is remembered), and a
//!   leader re-drives every intent left behind by a client that stopped. The orphan scan settles
//!   inodes and entries whose client stopped between steps. docs/metadata.md lists the invariants.

pub mod host;
pub mod machine;
pub mod route;

use serde::{Deserialize, Serialize};

pub use host::{HostConfig, MetaHost, RESERVE_DEFAULT};
pub use machine::PartitionMachine;
pub use route::MetaClient;

/// A command for a partition: `(partition, Op)`.
pub const OP_META_WRITE: u16 = 0x0401;
/// A query of a partition: `(partition, Query)`.
pub const OP_META_READ: u16 = 0x0402;
/// The replicas a server runs: [`ReplicaReport`]s (meta empty).
pub const OP_META_REPLICAS: u16 = 0x0403;
/// Whether the server's partition disk has more than its reserve free: one byte, 1 if so
/// (meta empty).
pub const OP_META_ROOM: u16 = 0x0404;
/// A replica that stopped on its own is started again at most this often.
pub const RESTART_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// One partition replica of a server, for `sealfs status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub partition: u32,
    /// Why it stopped on its own (its log or store failed: a full disk, a failed sync). Its
    /// server starts it again every [`RESTART_AFTER`]: after a full disk it comes back once there is room;
    /// after a failed sync (the log then refuses every write) only once the server restarts.
    pub stopped: Option<String>,
}

/// The Raft group id of partition `p` (group 0 is the manager's).
pub fn group_of(p: u32) -> u64 {
    p as u64 + 1
}

/// Bits of the local counter in an inode number.
pub const PARTITION_SHIFT: u32 = 40;
/// Local counters start here; the inodes below are the roots of volumes.
pub const FIRST_LOCAL: u64 = 1 << 20;
/// Longest name of an entry, in bytes.
pub const NAME_MAX: usize = 255;
/// Longest path, in bytes.
pub const PATH_MAX: usize = 4096;
/// Largest extended attribute value.
pub const XATTR_VALUE_MAX: usize = 64 * 1024;
/// Bytes of one inode's extended attributes at most, names and values (a setxattr past it
/// fails with ENOSPC, as on a local file system whose inode has no room left): they live in
/// the inode's record, read whole by every getattr.
pub const XATTRS_BYTES_MAX: usize = 256 * 1024;
/// Bytes of one inode's extended attribute names at most, each with its NUL: what one
/// listxattr can return (the kernel's XATTR_LIST_MAX).
pub const XATTR_NAMES_MAX: usize = 64 * 1024;
/// Entries one readdir call returns at most.
pub const READDIR_MAX: usize = 1024;
/// Extents one reply carries at most (a reply stays well under the frame's metadata bound);
/// a query for a range with more fails with [`Errno::FBIG`], and the caller asks for less.
pub const EXTENTS_REPLY_MAX: usize = 16_384;

/// The partition an inode lives in.
pub fn partition_of(ino: u64) -> u32 {
    (ino >> PARTITION_SHIFT) as u32
}

/// The root inode of volume `volume` (1 and up) with `partitions` partitions.
pub fn root_ino(volume: u32, partitions: u32) -> u64 {
    let p = (volume.saturating_sub(1) % partitions.max(1)) as u64;
    p << PARTITION_SHIFT | volume as u64
}

/// The partition a new directory named `name` in `parent` goes to.
pub fn dir_partition(parent: u64, name: &[u8], partitions: u32) -> u32 {
    let mut h = blake3::Hasher::new();
    h.update(&parent.to_le_bytes());
    h.update(name);
    let d = h.finalize();
    let v = u64::from_le_bytes(d.as_bytes()[..8].try_into().expect("8 bytes"));
    (v % partitions.max(1) as u64) as u32
}

/// Checks an entry name: not empty, not `.` or `..`, no `/` or NUL, at most 255 bytes.
pub fn check_name(name: &[u8]) -> Result<(), Errno> {
    if name.len() > NAME_MAX {
        return Err(Errno::NAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Errno::INVAL);
    }
    Ok(())
}

/// A POSIX error number (Linux values), as replies carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errno(pub i32);

impl Errno {
    pub const PERM: Errno = Errno(1);
    pub const NOENT: Errno = Errno(2);
    pub const IO: Errno = Errno(5);
    pub const NXIO: Errno = Errno(6);
    pub const AGAIN: Errno = Errno(11);
    pub const ACCES: Errno = Errno(13);
    pub const BUSY: Errno = Errno(16);
    pub const EXIST: Errno = Errno(17);
    pub const XDEV: Errno = Errno(18);
    pub const NOTDIR: Errno = Errno(20);
    pub const ISDIR: Errno = Errno(21);
    pub const INVAL: Errno = Errno(22);
    pub const FBIG: Errno = Errno(27);
    pub const NOSPC: Errno = Errno(28);
    pub const MLINK: Errno = Errno(31);
    pub const RANGE: Errno = Errno(34);
    pub const NAMETOOLONG: Errno = Errno(36);
    pub const NOTEMPTY: Errno = Errno(39);
    pub const NODATA: Errno = Errno(61);
    pub const OPNOTSUPP: Errno = Errno(95);
    pub const DQUOT: Errno = Errno(122);
    /// A second step that came too late (see [`Op::Within`]).
    pub const TIMEDOUT: Errno = Errno(110);
    /// A write named a blade being reclaimed: its data must be appended again elsewhere.
    pub const STALE: Errno = Errno(116);
    /// Not the leader of the partition (the client asks another replica).
    pub const NOTLEADER: Errno = Errno(-1);
    /// The partition has no quorum (or stopped) within the deadline.
    pub const UNAVAILABLE: Errno = Errno(-2);
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match *self {
            Errno::PERM => "operation not permitted",
            Errno::NOENT => "no such file or directory",
            Errno::IO => "input/output error",
            Errno::AGAIN => "try again",
            Errno::ACCES => "permission denied",
            Errno::BUSY => "busy: another operation holds the entry",
            Errno::EXIST => "file exists",
            Errno::XDEV => "cross-device link",
            Errno::NOTDIR => "not a directory",
            Errno::ISDIR => "is a directory",
            Errno::INVAL => "invalid argument",
            Errno::FBIG => "file too large",
            Errno::NOSPC => "no space left on device",
            Errno::MLINK => "too many links",
            Errno::RANGE => "result too large",
            Errno::NAMETOOLONG => "file name too long",
            Errno::NOTEMPTY => "directory not empty",
            Errno::NODATA => "no such attribute",
            Errno::DQUOT => "disk quota exceeded",
            Errno::TIMEDOUT => "timed out: the operation's second step came too late",
            Errno::NOTLEADER => "not the partition's leader",
            Errno::UNAVAILABLE => "metadata partition unavailable (no quorum)",
            Errno(n) => return write!(f, "error {n}"),
        };
        f.write_str(s)
    }
}

impl std::error::Error for Errno {}

/// The type of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// Nanoseconds since the Unix epoch (negative before it).
pub type Nanos = i64;

/// The attributes of an inode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits, with setuid, setgid and sticky (07777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub rdev: u32,
    pub flags: u32,
    pub atime: Nanos,
    pub mtime: Nanos,
    pub ctime: Nanos,
    pub crtime: Nanos,
    /// Bumped when an inode number is reused (never, today: counters only grow).
    pub generation: u64,
    /// The volume the inode belongs to.
    pub volume: u32,
}

/// Bytes of a file's first [`INLINE_FILE_BYTES`] written in one burst of at most that many
/// that are kept in the extent itself (DESIGN 5.2, small files inline in the inode) rather
/// than in a frond: closing a small file then costs one Raft command and no append.
pub const INLINE_FILE_BYTES: u64 = 64 << 10;

/// A stretch of a file stored in a frond: file bytes `[offset, offset + len)` are the frond's
/// data bytes `[skip, skip + len)`. An inline extent (`inline` not empty, `blade` 0) holds
/// its frond's data itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub blade: u32,
    /// The frond's address (blade and byte offset, as kelp encodes it).
    pub address: u64,
    /// The frond's data length.
    pub frond_len: u32,
    /// The sequence of the frond's first stipe when written.
    pub seq: u32,
    /// Bytes of the frond's data before this extent's first byte.
    pub skip: u32,
    /// The data of an inline extent (`frond_len` bytes); empty for one in a frond.
    pub inline: Vec<u8>,
    /// The CRC-32C of `inline`, computed by the writer and checked by the partition and by
    /// readers (what a frond's BLAKE3 is to the bytes in fronds).
    pub inline_crc: u32,
}

impl Extent {
    /// An extent whose bytes are `data` itself, at file offset `offset`.
    pub fn inline(offset: u64, data: &[u8]) -> Extent {
        Extent {
            offset,
            len: data.len() as u64,
            blade: 0,
            address: 0,
            frond_len: data.len() as u32,
            seq: 0,
            skip: 0,
            inline: data.to_vec(),
            inline_crc: crc32c::crc32c(data),
        }
    }

    /// True if an inline extent's bytes still match the CRC its writer gave them.
    pub fn inline_intact(&self) -> bool {
        crc32c::crc32c(&self.inline) == self.inline_crc
    }

    /// True if the extent holds its bytes itself.
    pub fn is_inline(&self) -> bool {
        !self.inline.is_empty()
    }

    /// Keeps only the bytes an inline extent still names (after it was cut), with their
    /// CRC; false if the bytes it held no longer matched theirs, or its skip and length
    /// pass them (nothing is changed then).
    pub(crate) fn trim_inline(&mut self) -> bool {
        if !self.is_inline() {
            return true;
        }
        if !self.inline_intact() {
            return false;
        }
        // The record came from disk: a skip or length past its bytes is damage, not a panic.
        let a = self.skip as usize;
        let Some(kept) = usize::try_from(self.len)
            .ok()
            .and_then(|len| a.checked_add(len))
            .and_then(|b| self.inline.get(a..b))
        else {
            return false;
        };
        self.inline = kept.to_vec();
        self.inline_crc = crc32c::crc32c(&self.inline);
        self.skip = 0;
        self.frond_len = self.len as u32;
        true
    }
}

/// An entry of a directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: Kind,
    /// Where a readdir continues after this entry.
    pub cookie: u64,
}

/// Attributes to change; `None` leaves one as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Nanos>,
    pub mtime: Option<Nanos>,
    pub flags: Option<u32>,
}

/// Flags of rename (Linux values).
pub const RENAME_NOREPLACE: u32 = 1;
/// Swap the two entries.
pub const RENAME_EXCHANGE: u32 = 2;
/// setxattr: fail if it exists.
pub const XATTR_CREATE: u32 = 1;
/// setxattr: fail unless it exists.
pub const XATTR_REPLACE: u32 = 2;

/// A follow-up that one partition must apply for an operation another partition coordinated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// Unique within the coordinating partition.
    pub id: u64,
    /// The coordinating partition.
    pub from: u32,
    /// The partition that applies it.
    pub to: u32,
    /// What it applies.
    pub op: FollowUp,
    /// When the coordinator recorded it (the leader's clock).
    pub created: Nanos,
}

/// The part of a two-partition operation applied by the second partition. Each is idempotent
/// with its intent's id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FollowUp {
    /// A directory's entry is in place: it is no longer pending.
    Confirm { ino: u64 },
    /// A link's entry is in place.
    ConfirmLink {
        ino: u64,
        parent: u64,
        name: Vec<u8>,
    },
    /// One link to `ino` is gone; the inode goes when none is left.
    DecLink { ino: u64 },
    /// The directory's entry is gone: delete it (it was made dying and is empty).
    Destroy { ino: u64 },
    /// A directory moved: its `..` is now `parent`.
    SetParent { ino: u64, parent: u64 },
    /// An inode was renamed where its entry lives: its ctime changes.
    Touch { ino: u64 },
}

/// A command a partition applies (through Raft). `now` is the leader's clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Op {
    /// Makes the root of a volume if it does not exist.
    EnsureRoot {
        ino: u64,
        volume: u32,
        perm: u16,
        uid: u32,
        gid: u32,
        now: Nanos,
    },
    /// Makes a file, symlink or special file and its entry in `parent` (both here). With
    /// `exclusive` unset an existing file is returned instead of EEXIST.
    Create {
        parent: u64,
        name: Vec<u8>,
        kind: Kind,
        perm: u16,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Vec<u8>,
        exclusive: bool,
        now: Nanos,
    },
    /// Step 1 of mkdir, on the new directory's partition: a pending directory inode.
    MkdirAlloc {
        parent: u64,
        name: Vec<u8>,
        perm: u16,
        uid: u32,
        gid: u32,
        volume: u32,
        now: Nanos,
    },
    /// Step 2 of mkdir, on the parent's partition: the entry, with the intent to confirm.
    MkdirLink {
        parent: u64,
        name: Vec<u8>,
        ino: u64,
        now: Nanos,
    },
    /// Step 1 of rmdir (and of replacing a directory by rename), on the directory's
    /// partition: refuses unless empty, then marks it dying (no new entries).
    RmdirPrepare {
        ino: u64,
        parent: u64,
        name: Vec<u8>,
        now: Nanos,
    },
    /// Undoes RmdirPrepare (the entry changed meanwhile).
    RmdirAbort {
        ino: u64,
    },
    /// Removes the entry `(parent, name)`: a file's link (here, or by intent) or, with `dir`,
    /// a directory made dying by RmdirPrepare (deleted by intent).
    Unlink {
        parent: u64,
        name: Vec<u8>,
        dir: bool,
        now: Nanos,
    },
    /// A hard link to `ino` named `(parent, name)`; `ino` must be in this partition.
    Link {
        ino: u64,
        parent: u64,
        name: Vec<u8>,
        now: Nanos,
    },
    /// Step 1 of a link across partitions, on the inode's partition: one more link, with the
    /// intent-free promise that the entry follows (the orphan scan undoes it otherwise).
    LinkPrepare {
        ino: u64,
        parent: u64,
        name: Vec<u8>,
        now: Nanos,
    },
    /// Step 2: the entry in the parent's partition, with the intent to confirm the link.
    LinkEntry {
        ino: u64,
        kind: Kind,
        parent: u64,
        name: Vec<u8>,
        now: Nanos,
    },
    /// Rename within one partition (both parents here). `victim_ready` names a directory in
    /// another partition already made dying, that the new entry replaces.
    Rename {
        src_parent: u64,
        src_name: Vec<u8>,
        dst_parent: u64,
        dst_name: Vec<u8>,
        flags: u32,
        now: Nanos,
    },
    /// Step 1 of a rename across partitions, on the source's: lock the source entry.
    RenameLock {
        src_parent: u64,
        src_name: Vec<u8>,
        dst_parent: u64,
        dst_name: Vec<u8>,
        now: Nanos,
    },
    /// Step 2, on the destination's: the new entry (replacing a file, or a directory made
    /// dying), with intents for the moved directory's `..` and the replaced inode.
    RenameIn {
        ino: u64,
        kind: Kind,
        src_parent: u64,
        dst_parent: u64,
        dst_name: Vec<u8>,
        noreplace: bool,
        now: Nanos,
    },
    /// Step 3, on the source's: remove the locked entry.
    RenameFinish {
        src_parent: u64,
        src_name: Vec<u8>,
        now: Nanos,
    },
    /// Undoes RenameLock.
    RenameUnlock {
        src_parent: u64,
        src_name: Vec<u8>,
    },
    /// Changes attributes; a smaller size drops the extents past it.
    SetAttr {
        ino: u64,
        set: SetAttr,
        now: Nanos,
    },
    /// Records written extents (already durable in kelp) and the size they reach, then sets
    /// `then` (no size) if given: a flush and the change of times that waited for it are one
    /// command.
    Write {
        ino: u64,
        extents: Vec<Extent>,
        now: Nanos,
        then: Option<SetAttr>,
    },
    SetXattr {
        ino: u64,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: u32,
        now: Nanos,
    },
    RemoveXattr {
        ino: u64,
        name: Vec<u8>,
        now: Nanos,
    },
    /// Applies another partition's follow-up (idempotent by `(from, id)`).
    Apply {
        intent: Intent,
    },
    /// The follow-up of one of this partition's intents is applied: forget it.
    ClearIntent {
        id: u64,
    },
    /// Orphan scan: settles an operation whose client stopped between steps, given whether
    /// the entry that decides it exists (pointing at the inode).
    Settle {
        item: Unsettled,
        entry_exists: bool,
        now: Nanos,
    },
    /// A mount has `ino` open: when its last link goes, keep the inode (nlink 0) until
    /// [`Op::Unkeep`], so that the open file can still be read and written. Also forgets
    /// inodes kept longer than [`KEEP_MAX_NS`] (their mount is gone).
    Keep {
        ino: u64,
        now: Nanos,
    },
    /// The mount closed `ino`: an inode with no link left goes now.
    Unkeep {
        ino: u64,
    },
    /// `op`, applied once however often it is sent: a client that sends a command again
    /// after losing its answer (a leader that stepped down, a timeout) gets the first answer
    /// back, not the answer of a second try (an exclusive create's EEXIST, an unlink's
    /// ENOENT). `id` is the client's, random; answers are kept [`ONCE_KEEP_NS`].
    Once {
        id: u128,
        now: Nanos,
        #[serde(deserialize_with = "nested")]
        op: Box<Op>,
    },
    /// The second step `op` of a two-partition operation (a mkdir's link, a link's entry, a
    /// rename's destination, the removal of an entry whose directory was made dying), refused
    /// with [`Errno::TIMEDOUT`] once its time is past. The orphan scan settles a first step
    /// left alone once it is older than the grace; a second step applied after that would
    /// undo the scan's decision (a dangling entry, a link too few, a file under two names).
    /// `started` is when the caller began the first step (its clock); the leader that takes
    /// the command sets `deadline` to `started` (or its own clock, if earlier) plus half the
    /// grace ([`Op::set_deadline`]), whatever the caller sent. A partition applies it only while both its `now` and the
    /// latest [`Op::Decide`] it applied are at or before `deadline`.
    Within {
        started: Nanos,
        deadline: Nanos,
        now: Nanos,
        #[serde(deserialize_with = "nested")]
        op: Box<Op>,
    },
    /// The orphan scan's question to the partition of the entry that decides an unsettled
    /// first step: whether `(parent, name)` names `ino`. It is a command, not a read, so that
    /// every second step ordered after it in the partition's log is refused (its `now` is
    /// past their deadline): the answer stays true. Answers the entry, or NOENT.
    Decide {
        parent: u64,
        name: Vec<u8>,
        ino: u64,
        now: Nanos,
    },
    /// From now on, no new extent in any of `blades` (at most [`REFS_BLADES_MAX`]) is taken
    /// (a write naming one is refused with [`Errno::STALE`]): once every partition has
    /// applied this, the extents referring to a blade can only go, and when none is left it
    /// can be deleted (DESIGN 4.6).
    Retire {
        blades: Vec<u32>,
    },
}

/// How long a partition keeps the answer of an [`Op::Once`] for a client that sends it again:
/// far longer than a client tries one command (its deadline, 10 s by default).
pub const ONCE_KEEP_NS: Nanos = 600 * 1_000_000_000;

/// How long an unlinked inode stays for a mount that has it open and never says it closed
/// it (a mount that was killed): a day.
pub const KEEP_MAX_NS: Nanos = 24 * 3600 * 1_000_000_000;

/// Blades a [`Query::BladeRefs`] may ask about at once.
pub const REFS_BLADES_MAX: usize = 1024;

/// A read-only query of a partition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Query {
    Lookup {
        parent: u64,
        name: Vec<u8>,
    },
    GetAttr {
        ino: u64,
    },
    ReadDir {
        ino: u64,
        after: u64,
        max: u32,
    },
    ReadLink {
        ino: u64,
    },
    Extents {
        ino: u64,
        offset: u64,
        len: u64,
    },
    GetXattr {
        ino: u64,
        name: Vec<u8>,
    },
    ListXattr {
        ino: u64,
    },
    /// Bytes and inodes used per volume in this partition.
    Usage,
    /// Intents recorded before `before`.
    Intents {
        before: Nanos,
    },
    /// Pending directories, dying directories, unconfirmed links and locked rename sources
    /// older than `before` (for the orphan scan).
    Unsettled {
        before: Nanos,
    },
    /// The parent of a directory.
    Parent {
        ino: u64,
    },
    /// A lookup answered with the child's attributes when its inode is in this partition
    /// (every file's is: one round trip instead of two), else as [`Query::Lookup`].
    LookupAttr {
        parent: u64,
        name: Vec<u8>,
    },
    /// As [`Query::ReadDir`], with each entry's attributes when its inode is in this
    /// partition (a file's, unless a rename or link brought it from another).
    ReadDirPlus {
        ino: u64,
        after: u64,
        max: u32,
    },
    /// How many extents refer to each of `blades` (at most [`REFS_BLADES_MAX`]):
    /// [`Reply::Refs`], in the same order.
    BladeRefs {
        blades: Vec<u32>,
    },
}

/// What a partition answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Done,
    Attr(Attr),
    /// The entry's inode and kind, and the intents to drive.
    Entry {
        ino: u64,
        kind: Kind,
        intents: Vec<Intent>,
    },
    /// Intents the caller should drive now (their follow-ups), then clear.
    Intents(Vec<Intent>),
    Entries(Vec<DirEntry>),
    Target(Vec<u8>),
    Extents(Vec<Extent>, u64),
    Value(Vec<u8>),
    Names(Vec<Vec<u8>>),
    /// (volume, bytes, inodes).
    Usage(Vec<(u32, u64, u64)>),
    Unsettled(Vec<Unsettled>),
    Parent(u64),
    /// Not the leader; the leader's server id if known.
    Redirect(Option<u64>),
    Error(Errno),
    /// A new inode's attributes, and its parent's just after the entry was added (a create:
    /// the caller can show the folder without asking again).
    Made {
        attr: Attr,
        parent: Attr,
    },
    /// An entry removed (an unlink or rmdir) or a new directory's entry added (a mkdir's
    /// link): the intents to drive, and the parent's attributes just after.
    Changed {
        intents: Vec<Intent>,
        parent: Attr,
    },
    /// Entries, each with its attributes when its inode is in the partition that answered.
    EntriesPlus(Vec<(DirEntry, Option<Attr>)>),
    /// Counts of extents.
    Refs(Vec<u64>),
}

/// Something the orphan scan must settle, and the entry that decides it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unsettled {
    /// A directory made by MkdirAlloc whose entry was not confirmed.
    PendingDir {
        ino: u64,
        parent: u64,
        name: Vec<u8>,
    },
    /// A directory made dying by RmdirPrepare and not destroyed.
    DyingDir {
        ino: u64,
        parent: u64,
        name: Vec<u8>,
    },
    /// A link counted by LinkPrepare whose entry was not confirmed.
    Link {
        ino: u64,
        parent: u64,
        name: Vec<u8>,
    },
    /// A rename source locked by RenameLock; the destination decides.
    Rename {
        src_parent: u64,
        src_name: Vec<u8>,
        ino: u64,
        dst_parent: u64,
        dst_name: Vec<u8>,
    },
}

impl Unsettled {
    /// The entry `(parent, name, ino)` whose existence decides it.
    pub fn decider(&self) -> (u64, &[u8], u64) {
        match self {
            Unsettled::PendingDir { ino, parent, name }
            | Unsettled::DyingDir { ino, parent, name }
            | Unsettled::Link { ino, parent, name } => (*parent, name, *ino),
            Unsettled::Rename {
                ino,
                dst_parent,
                dst_name,
                ..
            } => (*dst_parent, dst_name, *ino),
        }
    }
}

/// At most this many commands in one chain of wrappers, read from a socket or a log (a
/// client's `Once` around a `Within` around a command is a chain of 3).
const NESTED_MAX: u32 = 4;

thread_local! {
    /// How deep the command being read is nested.
    static NESTING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Reads the command a `Once` or `Within` wraps, refusing commands nested deeper than
/// [`NESTED_MAX`]: a frame of nested wrappers would otherwise exhaust the reader's stack.
fn nested<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Box<Op>, D::Error> {
    struct Out;
    impl Drop for Out {
        fn drop(&mut self) {
            NESTING.with(|n| n.set(n.get().saturating_sub(1)));
        }
    }
    let depth = NESTING.with(|n| {
        n.set(n.get() + 1);
        n.get()
    });
    let _out = Out;
    if depth >= NESTED_MAX {
        return Err(serde::de::Error::custom("commands nested too deeply"));
    }
    Box::<Op>::deserialize(d)
}

/// A second step wrapped for `started`, the caller's clock when it began the first step (see
/// [`Op::Within`]).
pub fn second_step(started: Nanos, op: Op) -> Op {
    Op::Within {
        started,
        deadline: 0,
        now: 0,
        op: Box::new(op),
    }
}

impl Op {
    /// The command inside any [`Op::Once`] and [`Op::Within`] around it.
    pub fn inner(&self) -> &Op {
        match self {
            Op::Once { op, .. } | Op::Within { op, .. } => op.inner(),
            op => op,
        }
    }

    /// Sets the deadline of a second step ([`Op::Within`], also inside [`Op::Once`]) to
    /// `allowed` past when its caller began the first step, or past `now` (the leader's
    /// clock) if that is earlier: a caller whose clock is ahead gets no more time.
    pub fn set_deadline(&mut self, now: Nanos, allowed: Nanos) {
        match self {
            Op::Once { op, .. } => op.set_deadline(now, allowed),
            Op::Within {
                started, deadline, ..
            } => *deadline = (*started).min(now).saturating_add(allowed),
            _ => {}
        }
    }

    /// Sets the time of the command (the leader's clock, set by the server that proposes it).
    pub fn set_now(&mut self, t: Nanos) {
        match self {
            Op::EnsureRoot { now, .. }
            | Op::Create { now, .. }
            | Op::MkdirAlloc { now, .. }
            | Op::MkdirLink { now, .. }
            | Op::RmdirPrepare { now, .. }
            | Op::Unlink { now, .. }
            | Op::Link { now, .. }
            | Op::LinkPrepare { now, .. }
            | Op::LinkEntry { now, .. }
            | Op::Rename { now, .. }
            | Op::RenameLock { now, .. }
            | Op::RenameIn { now, .. }
            | Op::RenameFinish { now, .. }
            | Op::SetAttr { now, .. }
            | Op::Write { now, .. }
            | Op::SetXattr { now, .. }
            | Op::RemoveXattr { now, .. }
            | Op::Settle { now, .. }
            | Op::Keep { now, .. }
            | Op::Decide { now, .. } => *now = t,
            Op::Once { now, op, .. } | Op::Within { now, op, .. } => {
                *now = t;
                op.set_now(t);
            }
            Op::RmdirAbort { .. }
            | Op::RenameUnlock { .. }
            | Op::Apply { .. }
            | Op::ClearIntent { .. }
            | Op::Retire { .. }
            | Op::Unkeep { .. } => {}
        }
    }
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_nanos() -> Nanos {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

impl Reply {
    /// The error of an error reply.
    pub fn err(self) -> Result<Reply, Errno> {
        match self {
            Reply::Error(e) => Err(e),
            r => Ok(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Extent, Op};

    /// A frame of commands nested 100,000 deep is refused as it is read, not followed down
    /// until the stack runs out; what a client sends (`Once` around `Within`) is read.
    #[test]
    fn deeply_nested_commands_are_refused_as_they_are_read() {
        let plain = Op::Unkeep { ino: 7 };
        let inner = postcard::to_stdvec(&plain).unwrap();
        let once = |op| Op::Once {
            id: 0,
            now: 0,
            op: Box::new(op),
        };
        let one = postcard::to_stdvec(&once(plain.clone())).unwrap();
        let header = &one[..one.len() - inner.len()];
        let mut deep = header.repeat(100_000);
        deep.extend_from_slice(&inner);
        assert!(postcard::from_bytes::<Op>(&deep).is_err());

        let sent = once(super::second_step(5, plain));
        let back: Op = postcard::from_bytes(&postcard::to_stdvec(&sent).unwrap()).unwrap();
        assert!(matches!(back.inner(), Op::Unkeep { ino: 7 }));
        let mut four = header.repeat(3);
        four.extend_from_slice(&inner);
        assert!(
            postcard::from_bytes::<Op>(&four).is_ok(),
            "4 commands in a chain are read"
        );
        let mut five = header.repeat(4);
        five.extend_from_slice(&inner);
        assert!(postcard::from_bytes::<Op>(&five).is_err(), "5 are not");
    }

    #[test]
    fn a_second_steps_deadline_is_the_leaders_to_set() {
        // The leader's clock at 1,000, 30 allowed; `sent` is what the caller put there.
        let deadline = |started: i64, sent: i64| {
            let mut op = Op::Once {
                id: 1,
                now: 0,
                op: Box::new(Op::Within {
                    started,
                    deadline: sent,
                    now: 0,
                    op: Box::new(Op::RmdirAbort { ino: 2 }),
                }),
            };
            op.set_deadline(1_000, 30);
            let Op::Once { op, .. } = op else {
                panic!("not once")
            };
            let Op::Within { deadline, .. } = *op else {
                panic!("not a second step")
            };
            deadline
        };
        assert_eq!(
            deadline(900, i64::MAX),
            930,
            "what the caller sent is replaced"
        );
        assert_eq!(deadline(5_000, 0), 1_030, "a clock ahead gets no more time");
        assert_eq!(deadline(i64::MAX, 0), 1_030);
    }

    #[test]
    fn an_inline_extent_naming_bytes_it_does_not_hold_is_refused_when_cut() {
        for (skip, len) in [(4, 7), (11, 0), (0, u64::MAX), (u32::MAX, 1)] {
            let mut e = Extent::inline(0, b"0123456789");
            e.skip = skip;
            e.len = len;
            let before = e.clone();
            assert!(!e.trim_inline(), "skip {skip} len {len}");
            assert_eq!(e, before, "a refused cut changes nothing");
        }
        let mut e = Extent::inline(0, b"0123456789");
        (e.skip, e.len) = (2, 5);
        assert!(e.trim_inline());
        assert_eq!(
            (e.inline.as_slice(), e.skip, e.frond_len),
            (&b"23456"[..], 0, 5)
        );
        assert!(e.inline_intact());
    }
}
