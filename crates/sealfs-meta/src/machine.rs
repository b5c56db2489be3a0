//! The state machine of one metadata partition: a redb file holding inodes, entries, extents,
//! intents and usage. Commands share one redb transaction, which stores the applied log position
//! with them and is committed (not synced: the Raft log is, and Raft re-applies after a crash)
//! at the end of the first batch after [`COMMIT_AFTER`], or of the [`COMMIT_BATCHES`]th; a
//! snapshot syncs it first. Queries read through the open transaction, so they see every
//! applied command without committing it. A quiet partition keeps its last batches open until
//! the next batch; a crash loses them from this file only, and Raft applies them again from
//! the position committed with the rest. One commit per batch cost each replica more than the
//! commands it held, and one per read a leader as much as the command before the read.
//!
//! Every command checks all it needs before it writes anything, so a refused command leaves no
//! trace in the shared transaction.

use redb::{
    Database, Durability, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, TableHandle, WriteTransaction,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{
    check_name, partition_of, Attr, DirEntry, Errno, Extent, FollowUp, Intent, Kind, Nanos, Op,
    Query, Reply, SetAttr, Unsettled, FIRST_LOCAL, PARTITION_SHIFT, RENAME_EXCHANGE,
    RENAME_NOREPLACE, XATTRS_BYTES_MAX, XATTR_CREATE, XATTR_NAMES_MAX, XATTR_REPLACE,
    XATTR_VALUE_MAX,
};

type Table = TableDefinition<'static, &'static [u8], &'static [u8]>;

/// ino (8, big-endian) -> Inode.
const INODES: Table = TableDefinition::new("inodes");
/// parent (8) ++ name -> EntryRec.
const ENTRIES: Table = TableDefinition::new("entries");
/// dir (8) ++ cookie (8) -> name.
const COOKIES: Table = TableDefinition::new("cookies");
/// ino (8) ++ file offset (8) -> Extent.
const EXTENTS: Table = TableDefinition::new("extents");
/// ino (8) ++ parent (8) ++ name -> time: links counted whose entry is not confirmed.
const LINKS: Table = TableDefinition::new("links");
/// id (8) -> Intent.
const INTENTS: Table = TableDefinition::new("intents");
/// from (4) ++ id (8) -> time: follow-ups applied.
const DONE: Table = TableDefinition::new("done");
/// volume (4) -> (bytes, inodes).
const USAGE: Table = TableDefinition::new("usage");
/// name -> value: counters and the applied position.
const META: Table = TableDefinition::new("meta");

/// The key in [`META`] that marks `blade` retired ([`Op::Retire`]).
fn k_retired(blade: u32) -> Vec<u8> {
    let mut k = b"retired:".to_vec();
    k.extend_from_slice(&blade.to_be_bytes());
    k
}
/// ino -> when a mount asked to keep it past its last link (open files that were unlinked).
const KEPT: Table = TableDefinition::new("kept");
/// request id (16) -> time (8) ++ reply: the answers of `Op::Once` commands.
const ONCE: Table = TableDefinition::new("once");
/// time (8) ++ request id (16) -> nothing: the same, in the order they are forgotten.
const ONCE_AT: Table = TableDefinition::new("once_at");

/// The key in `META` of the latest `Op::Decide`'s time.
const DECIDED_AT: &[u8] = b"decided_at";

const TABLES: [Table; 12] = [
    INODES, ENTRIES, COOKIES, EXTENTS, LINKS, INTENTS, DONE, USAGE, META, KEPT, ONCE, ONCE_AT,
];
/// Answers of `Op::Once` past `ONCE_KEEP_NS` forgotten by one command at most: a bounded
/// cost per command, ahead of the rate they come in.
const ONCE_FORGET_MAX: usize = 8;

/// Follow-ups remembered this long (they are driven again only while their intent lives).
const DONE_KEEP: Nanos = 3_600_000_000_000;
/// Follow-ups applied are swept for old ones once per this many applied here.
const DONE_SWEEP_EVERY: u64 = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum DirState {
    Normal,
    Pending {
        parent: u64,
        name: Vec<u8>,
        since: Nanos,
    },
    Dying {
        parent: u64,
        name: Vec<u8>,
        since: Nanos,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Inode {
    attr: Attr,
    /// A directory's `..`.
    parent: u64,
    /// A symlink's target.
    target: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// A directory's next readdir cookie.
    next_cookie: u64,
    state: DirState,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct RenameLock {
    dst_parent: u64,
    dst_name: Vec<u8>,
    since: Nanos,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct EntryRec {
    ino: u64,
    kind: Kind,
    cookie: u64,
    lock: Option<RenameLock>,
}

/// Why a command failed: a POSIX error for the caller, or storage trouble that stops the group.
enum Fail {
    Errno(Errno),
    Storage(String),
}

impl Fail {
    /// The message Raft is given when the machine fails.
    fn into_message(self) -> String {
        match self {
            Fail::Storage(s) => s,
            Fail::Errno(e) => e.to_string(),
        }
    }
}

impl From<Errno> for Fail {
    fn from(e: Errno) -> Self {
        Fail::Errno(e)
    }
}

macro_rules! storage_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for Fail {
            fn from(e: $t) -> Self {
                Fail::Storage(e.to_string())
            }
        }
    )*};
}
storage_errors!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
    postcard::Error
);

type R<T> = Result<T, Fail>;

fn enc<T: Serialize>(v: &T) -> R<Vec<u8>> {
    Ok(postcard::to_stdvec(v)?)
}

fn dec<T: DeserializeOwned>(b: &[u8]) -> R<T> {
    Ok(postcard::from_bytes(b)?)
}

fn k_ino(ino: u64) -> [u8; 8] {
    ino.to_be_bytes()
}

fn k_entry(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = parent.to_be_bytes().to_vec();
    k.extend_from_slice(name);
    k
}

fn k_pair(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

fn k_link(ino: u64, parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = k_pair(ino, parent).to_vec();
    k.extend_from_slice(name);
    k
}

fn k_done(from: u32, id: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&from.to_be_bytes());
    k[4..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The big-endian number at `at` in a key; a key too short for it (a damaged store or
/// snapshot) is an error.
fn u64_at(b: &[u8], at: usize) -> R<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Fail::Storage(format!("a key of {} bytes", b.len())))
}

/// How long applied commands may wait in the open transaction.
const COMMIT_AFTER: std::time::Duration = std::time::Duration::from_millis(20);
/// How many Raft batches may wait in the open transaction.
const COMMIT_BATCHES: u32 = 64;

/// The open write transaction and what it holds.
struct Open {
    tx: WriteTransaction,
    since: std::time::Instant,
    /// Raft batches ended in it (their applied position stored, not committed).
    batches: u32,
}

/// A transaction a query reads through: a read transaction, or the open write transaction
/// (which sees the commands applied and not yet committed).
trait Source {
    type T<'s>: ReadableTable<&'static [u8], &'static [u8]>
    where
        Self: 's;
    fn table(&self, t: Table) -> R<Self::T<'_>>;
}

impl Source for ReadTransaction {
    type T<'s> = ReadOnlyTable<&'static [u8], &'static [u8]>;
    fn table(&self, t: Table) -> R<Self::T<'_>> {
        Ok(self.open_table(t)?)
    }
}

impl Source for WriteTransaction {
    type T<'s> = redb::Table<'s, &'static [u8], &'static [u8]>;
    fn table(&self, t: Table) -> R<Self::T<'_>> {
        Ok(self.open_table(t)?)
    }
}

/// The state machine of partition `partition`.
pub struct PartitionMachine {
    partition: u32,
    db: Database,
    /// The open transaction: commands applied and not yet committed. Queries (which hold only
    /// `&self`) read through it while it is open.
    tx: std::sync::Mutex<Option<Open>>,
    /// A storage failure inside a batch; the batch's commit reports it and the group stops.
    poisoned: Option<String>,
}

impl PartitionMachine {
    /// Opens (creating) the partition's redb file.
    pub fn open(partition: u32, path: &std::path::Path) -> Result<Self, String> {
        let db = Database::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        for t in TABLES {
            tx.open_table(t).map_err(|e| e.to_string())?;
        }
        tx.commit().map_err(|e| e.to_string())?;
        Ok(PartitionMachine {
            partition,
            db,
            tx: std::sync::Mutex::new(None),
            poisoned: None,
        })
    }

    fn tx(&mut self) -> R<&mut WriteTransaction> {
        let open = self.tx.get_mut().unwrap_or_else(|p| p.into_inner());
        if open.is_none() {
            *open = Some(Open {
                tx: self.db.begin_write()?,
                since: std::time::Instant::now(),
                batches: 0,
            });
        }
        Ok(&mut open.as_mut().expect("just made").tx)
    }

    /// Commits the open transaction, if any (unsynced: see the module's note), so that a read
    /// transaction sees every applied command (a snapshot's, and the applied position's).
    fn settle(&self) -> R<()> {
        let mut open = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut o) = open.take() {
            o.tx.set_durability(Durability::None)
                .map_err(|e| Fail::Storage(e.to_string()))?;
            o.tx.commit()?;
        }
        Ok(())
    }

    fn run(&mut self, op: Op) -> R<Reply> {
        let partition = self.partition;
        let tx = self.tx()?;
        let mut w = W {
            tx,
            partition,
            open: Default::default(),
        };
        w.apply(op)
    }

    /// Answers `q` from the applied state: through the open transaction when commands wait in
    /// it (not committing them), else through a read transaction.
    fn ask(&self, q: Query) -> R<Reply> {
        let open = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = open.as_ref() {
            if let Some(e) = &self.poisoned {
                // The batch holds a failed command's half-made change: never shown.
                return Err(Fail::Storage(e.clone()));
            }
            return self.ask_in(&o.tx, q);
        }
        drop(open);
        self.ask_in(&self.db.begin_read()?, q)
    }

    fn ask_in<S: Source>(&self, tx: &S, q: Query) -> R<Reply> {
        let get = |t: Table, k: &[u8]| -> R<Option<Vec<u8>>> {
            Ok(tx.table(t)?.get(k)?.map(|g| g.value().to_vec()))
        };
        let inode = |ino: u64| -> R<Inode> {
            match get(INODES, &k_ino(ino))? {
                Some(b) => dec(&b),
                None => Err(Errno::NOENT.into()),
            }
        };
        Ok(match q {
            Query::BladeRefs { blades } => {
                if blades.len() > crate::REFS_BLADES_MAX {
                    return Err(Errno::INVAL.into());
                }
                // Only the head of each extent is read (an inline one's bytes are not copied):
                // its blade is 0, never a blade's id.
                #[derive(serde::Deserialize)]
                struct Head {
                    _offset: u64,
                    _len: u64,
                    blade: u32,
                }
                let mut n: std::collections::HashMap<u32, u64> = blades
                    .iter()
                    .filter(|b| **b != 0)
                    .map(|b| (*b, 0))
                    .collect();
                for item in tx.table(EXTENTS)?.iter()? {
                    let item = item?;
                    let (h, _) = postcard::take_from_bytes::<Head>(item.1.value())
                        .map_err(|e| Fail::Storage(format!("an extent that does not read: {e}")))?;
                    if let Some(c) = n.get_mut(&h.blade) {
                        *c += 1;
                    }
                }
                Reply::Refs(
                    blades
                        .iter()
                        .map(|b| n.get(b).copied().unwrap_or(0))
                        .collect(),
                )
            }
            Query::Lookup { parent, name } => {
                let p = inode(parent)?;
                if p.attr.kind != Kind::Dir {
                    return Err(Errno::NOTDIR.into());
                }
                match get(ENTRIES, &k_entry(parent, &name))? {
                    Some(b) => {
                        let e: EntryRec = dec(&b)?;
                        Reply::Entry {
                            ino: e.ino,
                            kind: e.kind,
                            intents: vec![],
                        }
                    }
                    None => return Err(Errno::NOENT.into()),
                }
            }
            Query::LookupAttr { parent, name } => {
                let r = self.ask_in(tx, Query::Lookup { parent, name })?;
                match r {
                    Reply::Entry { ino, .. } if partition_of(ino) == self.partition => {
                        match self.ask_in(tx, Query::GetAttr { ino }) {
                            Ok(a) => a,
                            // Let the caller ask for the attributes on their own.
                            Err(_) => r,
                        }
                    }
                    r => r,
                }
            }
            Query::GetAttr { ino } => Reply::Attr(inode(ino)?.attr),
            Query::Parent { ino } => Reply::Parent(inode(ino)?.parent),
            Query::ReadLink { ino } => {
                let i = inode(ino)?;
                if i.attr.kind != Kind::Symlink {
                    return Err(Errno::INVAL.into());
                }
                Reply::Target(i.target)
            }
            Query::ReadDir { ino, after, max } => {
                if inode(ino)?.attr.kind != Kind::Dir {
                    return Err(Errno::NOTDIR.into());
                }
                let cookies = tx.table(COOKIES)?;
                let entries = tx.table(ENTRIES)?;
                let from = k_pair(ino, after.saturating_add(1));
                let to = k_pair(ino, u64::MAX);
                let mut out = Vec::new();
                for item in cookies.range::<&[u8]>(&from[..]..=&to[..])? {
                    if out.len() >= (max as usize).min(crate::READDIR_MAX) {
                        break;
                    }
                    let (k, v) = item?;
                    let name = v.value().to_vec();
                    let cookie = u64_at(k.value(), 8)?;
                    if let Some(b) = entries.get(k_entry(ino, &name).as_slice())? {
                        let e: EntryRec = dec(b.value())?;
                        out.push(DirEntry {
                            name,
                            ino: e.ino,
                            kind: e.kind,
                            cookie,
                        });
                    }
                }
                Reply::Entries(out)
            }
            Query::ReadDirPlus { ino, after, max } => {
                let Reply::Entries(list) = self.ask_in(tx, Query::ReadDir { ino, after, max })?
                else {
                    return Err(Errno::IO.into());
                };
                let mut out = Vec::with_capacity(list.len());
                for e in list {
                    let a = if partition_of(e.ino) == self.partition {
                        inode(e.ino).ok().map(|i| i.attr)
                    } else {
                        None
                    };
                    out.push((e, a));
                }
                Reply::EntriesPlus(out)
            }
            Query::Extents { ino, offset, len } => {
                let i = inode(ino)?;
                let t = tx.table(EXTENTS)?;
                let end = offset.saturating_add(len).min(i.attr.size);
                let mut out = Vec::new();
                out.extend(extent_across(&t, ino, offset)?);
                if end > offset {
                    for item in t.range::<&[u8]>(&k_pair(ino, offset)[..]..&k_pair(ino, end)[..])? {
                        if out.len() >= crate::EXTENTS_REPLY_MAX {
                            return Err(Errno::FBIG.into());
                        }
                        out.push(dec(item?.1.value())?);
                    }
                }
                Reply::Extents(out, i.attr.size)
            }
            Query::GetXattr { ino, name } => {
                match inode(ino)?.xattrs.into_iter().find(|x| x.0 == name) {
                    Some((_, v)) => Reply::Value(v),
                    None => return Err(Errno::NODATA.into()),
                }
            }
            Query::ListXattr { ino } => {
                Reply::Names(inode(ino)?.xattrs.into_iter().map(|x| x.0).collect())
            }
            Query::Usage => {
                let mut out = Vec::new();
                for item in tx.table(USAGE)?.iter()? {
                    let (k, v) = item?;
                    let vol: [u8; 4] = k.value().try_into().map_err(|_| {
                        Fail::Storage(format!("a usage key of {} bytes", k.value().len()))
                    })?;
                    let (bytes, inodes): (u64, u64) = dec(v.value())?;
                    out.push((u32::from_be_bytes(vol), bytes, inodes));
                }
                Reply::Usage(out)
            }
            Query::Intents { before } => {
                let mut out = Vec::new();
                for item in tx.table(INTENTS)?.iter()? {
                    let i: Intent = dec(item?.1.value())?;
                    if i.created < before {
                        out.push(i);
                    }
                }
                Reply::Intents(out)
            }
            Query::Unsettled { before } => {
                let mut out = Vec::new();
                for item in tx.table(INODES)?.iter()? {
                    let (_, v) = item?;
                    let i: Inode = dec(v.value())?;
                    match i.state {
                        DirState::Pending {
                            parent,
                            name,
                            since,
                        } if since < before => out.push(Unsettled::PendingDir {
                            ino: i.attr.ino,
                            parent,
                            name,
                        }),
                        DirState::Dying {
                            parent,
                            name,
                            since,
                        } if since < before => out.push(Unsettled::DyingDir {
                            ino: i.attr.ino,
                            parent,
                            name,
                        }),
                        _ => {}
                    }
                }
                for item in tx.table(LINKS)?.iter()? {
                    let (k, v) = item?;
                    let since: Nanos = dec(v.value())?;
                    let k = k.value();
                    if since < before && k.len() >= 16 {
                        out.push(Unsettled::Link {
                            ino: u64_at(k, 0)?,
                            parent: u64_at(k, 8)?,
                            name: k[16..].to_vec(),
                        });
                    }
                }
                for item in tx.table(ENTRIES)?.iter()? {
                    let (k, v) = item?;
                    let e: EntryRec = dec(v.value())?;
                    if let Some(l) = e.lock {
                        let k = k.value();
                        if l.since < before && k.len() >= 8 {
                            out.push(Unsettled::Rename {
                                src_parent: u64_at(k, 0)?,
                                src_name: k[8..].to_vec(),
                                ino: e.ino,
                                dst_parent: l.dst_parent,
                                dst_name: l.dst_name,
                            });
                        }
                    }
                }
                Reply::Unsettled(out)
            }
        })
    }
}

fn reply_bytes(r: R<Reply>, poisoned: &mut Option<String>) -> Vec<u8> {
    let reply = match r {
        Ok(r) => r,
        Err(Fail::Errno(e)) => Reply::Error(e),
        Err(Fail::Storage(s)) => {
            tracing::error!("metadata store: {s}");
            poisoned.get_or_insert(s);
            Reply::Error(Errno::IO)
        }
    };
    postcard::to_stdvec(&reply).unwrap_or_default()
}

impl sealfs_raft::Machine for PartitionMachine {
    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        let r = match postcard::from_bytes::<Op>(command) {
            Ok(op) => self.run(op),
            Err(_) => Err(Fail::Errno(Errno::INVAL)),
        };
        reply_bytes(r, &mut self.poisoned)
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let r = match postcard::from_bytes::<Query>(query) {
            Ok(q) => self.ask(q),
            Err(_) => Err(Fail::Errno(Errno::INVAL)),
        };
        let mut ignored = None;
        reply_bytes(r, &mut ignored)
    }

    fn snapshot(&self) -> Vec<u8> {
        let dump = || -> R<Vec<u8>> {
            self.settle()?;
            let tx = self.db.begin_read()?;
            let mut all: Vec<Vec<(Vec<u8>, Vec<u8>)>> = Vec::new();
            for t in TABLES {
                let mut rows = Vec::new();
                for item in tx.open_table(t)?.iter()? {
                    let (k, v) = item?;
                    rows.push((k.value().to_vec(), v.value().to_vec()));
                }
                all.push(rows);
            }
            enc(&all)
        };
        dump().unwrap_or_else(|_| {
            tracing::error!(
                "partition {}: cannot read the store for a snapshot",
                self.partition
            );
            Vec::new()
        })
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let all: Vec<Vec<(Vec<u8>, Vec<u8>)>> =
            postcard::from_bytes(snapshot).map_err(|e| format!("snapshot: {e}"))?;
        // A snapshot from before the kept table was in it has the first 9 tables, one from
        // before the once tables the first 10; the tables it lacks are empty.
        if ![9, 10, TABLES.len()].contains(&all.len()) {
            return Err(format!(
                "snapshot has {} tables, want {}",
                all.len(),
                TABLES.len()
            ));
        }
        let run = |m: &mut Self| -> R<()> {
            let tx = m.tx()?;
            for (i, t) in TABLES.iter().enumerate() {
                tx.delete_table(*t)?;
                let mut table = tx.open_table(*t)?;
                for (k, v) in all.get(i).into_iter().flatten() {
                    table.insert(k.as_slice(), v.as_slice())?;
                }
            }
            Ok(())
        };
        run(self).map_err(Fail::into_message)
    }

    fn applied(&self) -> Result<Option<Vec<u8>>, String> {
        self.settle().map_err(Fail::into_message)?;
        let tx = self.db.begin_read().map_err(|e| e.to_string())?;
        let t = tx.open_table(META).map_err(|e| e.to_string())?;
        Ok(t.get(&b"applied"[..])
            .map_err(|e| e.to_string())?
            .map(|g| g.value().to_vec()))
    }

    fn commit(&mut self, applied: &[u8], durable: bool) -> Result<(), String> {
        let open = self.tx.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = self.poisoned.take() {
            *open = None;
            return Err(e);
        }
        let run = |m: &mut Self| -> R<()> {
            m.tx()?.open_table(META)?.insert(&b"applied"[..], applied)?;
            let open = m.tx.get_mut().unwrap_or_else(|p| p.into_inner());
            let o = open.as_mut().expect("opened above");
            o.batches += 1;
            if !durable && o.batches < COMMIT_BATCHES && o.since.elapsed() < COMMIT_AFTER {
                return Ok(());
            }
            let mut tx = open.take().expect("opened above").tx;
            if !durable {
                tx.set_durability(Durability::None)
                    .map_err(|e| Fail::Storage(e.to_string()))?;
            }
            tx.commit()?;
            Ok(())
        };
        run(self).map_err(Fail::into_message)
    }
}

/// The extent of file `ino` that starts before `at` and reaches past it, if one does.
fn extent_across<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    ino: u64,
    at: u64,
) -> R<Option<Extent>> {
    let Some(item) = t
        .range::<&[u8]>(&k_pair(ino, 0)[..]..&k_pair(ino, at)[..])?
        .next_back()
    else {
        return Ok(None);
    };
    let e: Extent = dec(item?.1.value())?;
    Ok((e.offset + e.len > at).then_some(e))
}

/// The error for an inline extent whose bytes no longer match their CRC.
fn damaged(ino: u64, e: &Extent) -> Fail {
    tracing::error!(
        "inode {ino:#x}: the inline bytes at offset {} do not match their CRC-32C",
        e.offset
    );
    Errno::IO.into()
}

/// A directory a rename moved had its entry (the rename's source): if it is still pending
/// (its mkdir's `Confirm` not applied yet), it is confirmed now. The pending state remembers
/// the name the directory was made under, and the orphan scan destroys a pending directory
/// whose entry of that name is gone, which a rename makes so.
fn confirm_moved(i: &mut Inode) {
    if matches!(i.state, DirState::Pending { .. }) {
        i.state = DirState::Normal;
    }
}

/// The attributes of a new inode.
fn new_attr(ino: u64, kind: Kind, perm: u16, uid: u32, gid: u32, volume: u32, now: Nanos) -> Attr {
    Attr {
        ino,
        kind,
        perm: perm & 0o7777,
        uid,
        gid,
        size: 0,
        nlink: if kind == Kind::Dir { 2 } else { 1 },
        rdev: 0,
        flags: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        generation: 0,
        volume,
    }
}

/// A table open in the batch's transaction.
type TableIn<'a> = redb::Table<'a, &'static [u8], &'static [u8]>;

/// One command applied inside the batch's transaction.
struct W<'a> {
    tx: &'a WriteTransaction,
    partition: u32,
    /// The tables this command has opened, by their place in [`TABLES`]: each is opened once
    /// per command, not at every read and write (an open and its close cost redb about as
    /// much as the read).
    open: [std::cell::RefCell<Option<TableIn<'a>>>; TABLES.len()],
}

impl<'a> W<'a> {
    /// Runs `f` on table `t`, opened at its first use in this command. `f` must not use `t`
    /// again through `self` (the table is lent to it).
    fn with<T>(&self, t: Table, f: impl FnOnce(&mut TableIn<'a>) -> R<T>) -> R<T> {
        let slot = TABLES
            .iter()
            .position(|d| d.name() == t.name())
            .and_then(|i| self.open.get(i))
            .ok_or_else(|| Fail::Storage(format!("no table {}", t.name())))?;
        let mut slot = slot
            .try_borrow_mut()
            .map_err(|_| Fail::Storage(format!("table {} used while lent", t.name())))?;
        let table = match &mut *slot {
            Some(table) => table,
            empty => empty.insert(self.tx.open_table(t)?),
        };
        f(table)
    }

    fn get(&self, t: Table, k: &[u8]) -> R<Option<Vec<u8>>> {
        self.with(t, |t| Ok(t.get(k)?.map(|g| g.value().to_vec())))
    }

    fn put(&self, t: Table, k: &[u8], v: &[u8]) -> R<()> {
        self.with(t, |t| {
            t.insert(k, v)?;
            Ok(())
        })
    }

    fn del(&self, t: Table, k: &[u8]) -> R<()> {
        self.with(t, |t| {
            t.remove(k)?;
            Ok(())
        })
    }

    /// Forgets the oldest answers of `Op::Once` kept since before `before`, a few at a time.
    fn forget_once(&self, before: Nanos) -> R<()> {
        if before <= 0 {
            return Ok(());
        }
        let before = (before as u64).to_be_bytes();
        let old: Vec<Vec<u8>> = self.with(ONCE_AT, |t| {
            let mut old = Vec::new();
            for item in t.range(..&before[..])?.take(ONCE_FORGET_MAX) {
                old.push(item?.0.value().to_vec());
            }
            Ok(old)
        })?;
        for at in old {
            self.del(ONCE_AT, &at)?;
            self.del(ONCE, at.get(8..).unwrap_or_default())?;
        }
        Ok(())
    }

    fn inode(&self, ino: u64) -> R<Inode> {
        match self.get(INODES, &k_ino(ino))? {
            Some(b) => dec(&b),
            None => Err(Errno::NOENT.into()),
        }
    }

    fn save(&self, i: &Inode) -> R<()> {
        self.put(INODES, &k_ino(i.attr.ino), &enc(i)?)
    }

    /// A directory here that may receive entries.
    fn live_dir(&self, ino: u64) -> R<Inode> {
        let d = self.inode(ino)?;
        if d.attr.kind != Kind::Dir {
            return Err(Errno::NOTDIR.into());
        }
        if matches!(d.state, DirState::Dying { .. }) {
            return Err(Errno::NOENT.into());
        }
        Ok(d)
    }

    fn entry(&self, parent: u64, name: &[u8]) -> R<Option<EntryRec>> {
        match self.get(ENTRIES, &k_entry(parent, name))? {
            Some(b) => Ok(Some(dec(&b)?)),
            None => Ok(None),
        }
    }

    /// The time of the latest [`Op::Decide`] applied here (0 before any).
    fn decided_at(&self) -> R<Nanos> {
        match self.get(META, DECIDED_AT)? {
            Some(b) => dec(&b),
            None => Ok(0),
        }
    }

    fn counter(&self, name: &str, first: u64) -> R<u64> {
        let v = match self.get(META, name.as_bytes())? {
            Some(b) => dec::<u64>(&b)?,
            None => first,
        };
        self.put(META, name.as_bytes(), &enc(&(v + 1))?)?;
        Ok(v)
    }

    fn new_ino(&self) -> R<u64> {
        let local = self.counter("next_ino", FIRST_LOCAL)?;
        if local >= 1 << PARTITION_SHIFT {
            return Err(Errno::NOSPC.into());
        }
        Ok((self.partition as u64) << PARTITION_SHIFT | local)
    }

    fn usage(&self, volume: u32, bytes: i128, inodes: i64) -> R<()> {
        let k = volume.to_be_bytes();
        let (b, i): (u64, u64) = match self.get(USAGE, &k)? {
            Some(v) => dec(&v)?,
            None => (0, 0),
        };
        let b = (b as i128 + bytes).clamp(0, u64::MAX as i128) as u64;
        let i = (i as i64 + inodes).max(0) as u64;
        self.put(USAGE, &k, &enc(&(b, i))?)
    }

    /// Adds the entry `(parent, name)`; the parent is updated and saved by the caller.
    fn add_entry(
        &self,
        parent: &mut Inode,
        name: &[u8],
        ino: u64,
        kind: Kind,
        now: Nanos,
    ) -> R<()> {
        let cookie = parent.next_cookie.max(1);
        parent.next_cookie = cookie + 1;
        parent.attr.mtime = now;
        parent.attr.ctime = now;
        let e = EntryRec {
            ino,
            kind,
            cookie,
            lock: None,
        };
        self.put(ENTRIES, &k_entry(parent.attr.ino, name), &enc(&e)?)?;
        self.put(COOKIES, &k_pair(parent.attr.ino, cookie), name)
    }

    fn remove_entry(&self, parent: &mut Inode, name: &[u8], e: &EntryRec, now: Nanos) -> R<()> {
        self.del(ENTRIES, &k_entry(parent.attr.ino, name))?;
        self.del(COOKIES, &k_pair(parent.attr.ino, e.cookie))?;
        parent.attr.mtime = now;
        parent.attr.ctime = now;
        Ok(())
    }

    /// An inode here that may take one more link named `name`.
    fn linkable(&self, ino: u64, name: &[u8]) -> R<Inode> {
        check_name(name)?;
        let i = self.inode(ino)?;
        if i.attr.kind == Kind::Dir {
            return Err(Errno::PERM.into());
        }
        if i.attr.nlink >= 65_000 {
            return Err(Errno::MLINK.into());
        }
        Ok(i)
    }

    fn dir_is_empty(&self, ino: u64) -> R<bool> {
        let from = k_ino(ino);
        let to = k_ino(ino.saturating_add(1));
        self.with(ENTRIES, |t| {
            Ok(t.range::<&[u8]>(&from[..]..&to[..])?.next().is_none())
        })
    }

    fn intent(&self, to: u32, op: FollowUp, now: Nanos) -> R<Intent> {
        let id = self.counter("next_intent", 1)?;
        let i = Intent {
            id,
            from: self.partition,
            to,
            op,
            created: now,
        };
        self.put(INTENTS, &k_ino(id), &enc(&i)?)?;
        Ok(i)
    }

    /// Applies `op` to `ino` here if it lives here, else records the intent for its partition.
    fn here_or_intent(&self, ino: u64, op: FollowUp, now: Nanos, out: &mut Vec<Intent>) -> R<()> {
        if partition_of(ino) == self.partition {
            self.follow_up(op, now)
        } else {
            out.push(self.intent(partition_of(ino), op, now)?);
            Ok(())
        }
    }

    /// A moved directory's `..` is now `parent` (here, or by intent).
    fn reparent(&self, ino: u64, parent: u64, now: Nanos, out: &mut Vec<Intent>) -> R<()> {
        self.here_or_intent(ino, FollowUp::SetParent { ino, parent }, now, out)
    }

    fn drop_extents_from(&self, ino: u64, size: u64) -> R<()> {
        self.with(EXTENTS, |t| {
            // Trim the extent that crosses `size`.
            if let Some(mut e) = extent_across(&*t, ino, size)? {
                e.len = size - e.offset;
                if !e.trim_inline() {
                    return Err(damaged(ino, &e));
                }
                t.insert(&k_pair(ino, e.offset)[..], enc(&e)?.as_slice())?;
            }
            let from = k_pair(ino, size);
            let to = k_pair(ino, u64::MAX);
            t.retain_in::<&[u8], _>(&from[..]..=&to[..], |_, _| false)?;
            Ok(())
        })
    }

    fn delete_inode(&self, i: &Inode) -> R<()> {
        self.del(INODES, &k_ino(i.attr.ino))?;
        let bytes = if i.attr.kind == Kind::File {
            i.attr.size
        } else {
            0
        };
        if i.attr.kind == Kind::File {
            self.drop_extents_from(i.attr.ino, 0)?;
        }
        self.usage(i.attr.volume, -(bytes as i128), -1)
    }

    fn dec_link(&self, ino: u64, now: Nanos) -> R<()> {
        let Ok(mut i) = self.inode(ino) else {
            return Ok(());
        };
        i.attr.nlink = i.attr.nlink.saturating_sub(1);
        i.attr.ctime = now;
        if i.attr.nlink == 0 && self.get(KEPT, &k_ino(ino))?.is_none() {
            self.delete_inode(&i)
        } else {
            self.save(&i)
        }
    }

    /// No mount keeps `ino` any more: it goes if no link is left.
    fn unkeep(&self, ino: u64) -> R<()> {
        self.del(KEPT, &k_ino(ino))?;
        match self.inode(ino) {
            Ok(i) if i.attr.nlink == 0 => self.delete_inode(&i),
            _ => Ok(()),
        }
    }

    /// Inodes kept since before `before`: their mount never closed them (it was killed).
    fn forget_kept(&self, before: Nanos) -> R<()> {
        let old = self.with(KEPT, |t| {
            let mut old = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                let since: Nanos = dec(v.value())?;
                if since < before {
                    old.push(k.value().to_vec());
                }
            }
            Ok(old)
        })?;
        for k in old {
            let ino = u64::from_be_bytes(k.as_slice().try_into().map_err(|_| Errno::IO)?);
            self.unkeep(ino)?;
        }
        Ok(())
    }

    /// A directory here whose entry is gone: delete it with anything left in it.
    fn destroy_dir(&self, i: &Inode) -> R<()> {
        let from = k_ino(i.attr.ino);
        let to = k_ino(i.attr.ino.saturating_add(1));
        for t in [ENTRIES, COOKIES] {
            self.with(t, |t| {
                t.retain_in::<&[u8], _>(&from[..]..&to[..], |_, _| false)?;
                Ok(())
            })?;
        }
        self.delete_inode(i)
    }

    fn follow_up(&self, op: FollowUp, now: Nanos) -> R<()> {
        match op {
            FollowUp::Confirm { ino } => {
                if let Ok(mut i) = self.inode(ino) {
                    if matches!(i.state, DirState::Pending { .. }) {
                        i.state = DirState::Normal;
                        self.save(&i)?;
                    }
                }
            }
            FollowUp::ConfirmLink { ino, parent, name } => {
                self.del(LINKS, &k_link(ino, parent, &name))?;
            }
            FollowUp::DecLink { ino } => self.dec_link(ino, now)?,
            FollowUp::Destroy { ino } => {
                if let Ok(i) = self.inode(ino) {
                    if matches!(i.state, DirState::Dying { .. }) {
                        self.destroy_dir(&i)?;
                    }
                }
            }
            FollowUp::SetParent { ino, parent } => {
                if let Ok(mut i) = self.inode(ino) {
                    i.parent = parent;
                    i.attr.ctime = now;
                    confirm_moved(&mut i);
                    self.save(&i)?;
                }
            }
            FollowUp::Touch { ino } => {
                if let Ok(mut i) = self.inode(ino) {
                    i.attr.ctime = now;
                    confirm_moved(&mut i);
                    self.save(&i)?;
                }
            }
        }
        Ok(())
    }

    /// Replaces `victim` (the entry at the destination of a rename) by an entry of `kind`:
    /// checks the kinds, and removes the victim's link (here or by intent). A directory victim
    /// must be empty (checked here when it lives here; made dying by the client otherwise).
    fn replace_victim(
        &self,
        victim: &EntryRec,
        kind: Kind,
        now: Nanos,
        out: &mut Vec<Intent>,
    ) -> R<()> {
        match (kind == Kind::Dir, victim.kind == Kind::Dir) {
            (true, false) => return Err(Errno::NOTDIR.into()),
            (false, true) => return Err(Errno::ISDIR.into()),
            _ => {}
        }
        if victim.kind == Kind::Dir {
            if partition_of(victim.ino) == self.partition {
                let v = self.inode(victim.ino)?;
                if !self.dir_is_empty(victim.ino)? {
                    return Err(Errno::NOTEMPTY.into());
                }
                self.destroy_dir(&v)
            } else {
                out.push(self.intent(
                    partition_of(victim.ino),
                    FollowUp::Destroy { ino: victim.ino },
                    now,
                )?);
                Ok(())
            }
        } else {
            self.here_or_intent(victim.ino, FollowUp::DecLink { ino: victim.ino }, now, out)
        }
    }

    fn apply(&mut self, op: Op) -> R<Reply> {
        match op {
            Op::Retire { blades } => {
                if blades.len() > crate::REFS_BLADES_MAX {
                    return Err(Errno::INVAL.into());
                }
                self.with(META, |t| {
                    for blade in blades {
                        t.insert(&k_retired(blade)[..], &[][..])?;
                    }
                    Ok(())
                })?;
                Ok(Reply::Done)
            }
            Op::EnsureRoot {
                ino,
                volume,
                perm,
                uid,
                gid,
                now,
            } => {
                if partition_of(ino) != self.partition
                    || ino >= FIRST_LOCAL && partition_of(ino) == 0
                {
                    return Err(Errno::INVAL.into());
                }
                if let Ok(i) = self.inode(ino) {
                    return Ok(Reply::Attr(i.attr));
                }
                let i = Inode {
                    attr: new_attr(ino, Kind::Dir, perm, uid, gid, volume, now),
                    parent: ino,
                    target: vec![],
                    xattrs: vec![],
                    next_cookie: 1,
                    state: DirState::Normal,
                };
                self.save(&i)?;
                self.usage(volume, 0, 1)?;
                Ok(Reply::Attr(i.attr))
            }
            Op::Create {
                parent,
                name,
                kind,
                perm,
                uid,
                gid,
                rdev,
                target,
                exclusive,
                now,
            } => {
                check_name(&name)?;
                if kind == Kind::Dir {
                    return Err(Errno::INVAL.into());
                }
                if kind == Kind::Symlink && (target.is_empty() || target.len() > crate::PATH_MAX) {
                    return Err(if target.is_empty() {
                        Errno::NOENT
                    } else {
                        Errno::NAMETOOLONG
                    }
                    .into());
                }
                let mut p = self.live_dir(parent)?;
                if let Some(e) = self.entry(parent, &name)? {
                    if exclusive || kind != Kind::File || e.kind != Kind::File {
                        return Err(Errno::EXIST.into());
                    }
                    return Ok(Reply::Entry {
                        ino: e.ino,
                        kind: e.kind,
                        intents: vec![],
                    });
                }
                let ino = self.new_ino()?;
                let mut attr = new_attr(ino, kind, perm, uid, gid, p.attr.volume, now);
                attr.rdev = rdev;
                if kind == Kind::Symlink {
                    attr.size = target.len() as u64;
                }
                let i = Inode {
                    attr,
                    parent,
                    target,
                    xattrs: vec![],
                    next_cookie: 1,
                    state: DirState::Normal,
                };
                self.add_entry(&mut p, &name, ino, kind, now)?;
                self.save(&p)?;
                self.save(&i)?;
                self.usage(i.attr.volume, 0, 1)?;
                Ok(Reply::Made {
                    attr: i.attr,
                    parent: p.attr,
                })
            }
            Op::MkdirAlloc {
                parent,
                name,
                perm,
                uid,
                gid,
                volume,
                now,
            } => {
                check_name(&name)?;
                let ino = self.new_ino()?;
                let i = Inode {
                    attr: new_attr(ino, Kind::Dir, perm, uid, gid, volume, now),
                    parent,
                    target: vec![],
                    xattrs: vec![],
                    next_cookie: 1,
                    state: DirState::Pending {
                        parent,
                        name,
                        since: now,
                    },
                };
                self.save(&i)?;
                self.usage(volume, 0, 1)?;
                Ok(Reply::Attr(i.attr))
            }
            Op::MkdirLink {
                parent,
                name,
                ino,
                now,
            } => {
                check_name(&name)?;
                let mut p = self.live_dir(parent)?;
                if self.entry(parent, &name)?.is_some() {
                    return Err(Errno::EXIST.into());
                }
                self.add_entry(&mut p, &name, ino, Kind::Dir, now)?;
                p.attr.nlink += 1;
                self.save(&p)?;
                let mut intents = vec![];
                self.here_or_intent(ino, FollowUp::Confirm { ino }, now, &mut intents)?;
                Ok(Reply::Changed {
                    intents,
                    parent: p.attr,
                })
            }
            Op::RmdirPrepare {
                ino,
                parent,
                name,
                now,
            } => {
                let mut i = self.inode(ino)?;
                if i.attr.kind != Kind::Dir {
                    return Err(Errno::NOTDIR.into());
                }
                if !self.dir_is_empty(ino)? {
                    return Err(Errno::NOTEMPTY.into());
                }
                if !matches!(i.state, DirState::Dying { .. }) {
                    i.state = DirState::Dying {
                        parent,
                        name,
                        since: now,
                    };
                    self.save(&i)?;
                }
                Ok(Reply::Done)
            }
            Op::RmdirAbort { ino } => {
                if let Ok(mut i) = self.inode(ino) {
                    if matches!(i.state, DirState::Dying { .. }) {
                        i.state = DirState::Normal;
                        self.save(&i)?;
                    }
                }
                Ok(Reply::Done)
            }
            Op::Unlink {
                parent,
                name,
                dir,
                now,
            } => {
                check_name(&name)?;
                let mut p = self.inode(parent)?;
                if p.attr.kind != Kind::Dir {
                    return Err(Errno::NOTDIR.into());
                }
                let Some(e) = self.entry(parent, &name)? else {
                    return Err(Errno::NOENT.into());
                };
                if e.lock.is_some() {
                    return Err(Errno::BUSY.into());
                }
                let mut intents = vec![];
                if dir {
                    if e.kind != Kind::Dir {
                        return Err(Errno::NOTDIR.into());
                    }
                    if partition_of(e.ino) == self.partition {
                        let c = self.inode(e.ino)?;
                        if !self.dir_is_empty(e.ino)? {
                            return Err(Errno::NOTEMPTY.into());
                        }
                        self.destroy_dir(&c)?;
                    } else {
                        intents.push(self.intent(
                            partition_of(e.ino),
                            FollowUp::Destroy { ino: e.ino },
                            now,
                        )?);
                    }
                    // Re-read: destroying may have touched the parent's usage, never the parent.
                    p.attr.nlink = p.attr.nlink.saturating_sub(1);
                } else {
                    if e.kind == Kind::Dir {
                        return Err(Errno::ISDIR.into());
                    }
                    self.here_or_intent(
                        e.ino,
                        FollowUp::DecLink { ino: e.ino },
                        now,
                        &mut intents,
                    )?;
                }
                self.remove_entry(&mut p, &name, &e, now)?;
                self.save(&p)?;
                Ok(Reply::Changed {
                    intents,
                    parent: p.attr,
                })
            }
            Op::Link {
                ino,
                parent,
                name,
                now,
            } => {
                let mut i = self.linkable(ino, &name)?;
                let mut p = self.live_dir(parent)?;
                if self.entry(parent, &name)?.is_some() {
                    return Err(Errno::EXIST.into());
                }
                self.add_entry(&mut p, &name, ino, i.attr.kind, now)?;
                self.save(&p)?;
                i.attr.nlink += 1;
                i.attr.ctime = now;
                self.save(&i)?;
                Ok(Reply::Attr(i.attr))
            }
            Op::LinkPrepare {
                ino,
                parent,
                name,
                now,
            } => {
                let mut i = self.linkable(ino, &name)?;
                i.attr.nlink += 1;
                i.attr.ctime = now;
                self.save(&i)?;
                self.put(LINKS, &k_link(ino, parent, &name), &enc(&now)?)?;
                Ok(Reply::Attr(i.attr))
            }
            Op::LinkEntry {
                ino,
                kind,
                parent,
                name,
                now,
            } => {
                check_name(&name)?;
                let mut p = self.live_dir(parent)?;
                if self.entry(parent, &name)?.is_some() {
                    return Err(Errno::EXIST.into());
                }
                self.add_entry(&mut p, &name, ino, kind, now)?;
                self.save(&p)?;
                let mut intents = vec![];
                self.here_or_intent(
                    ino,
                    FollowUp::ConfirmLink { ino, parent, name },
                    now,
                    &mut intents,
                )?;
                Ok(Reply::Entry { ino, kind, intents })
            }
            Op::Rename {
                src_parent,
                src_name,
                dst_parent,
                dst_name,
                flags,
                now,
            } => self.rename(src_parent, src_name, dst_parent, dst_name, flags, now),
            Op::RenameLock {
                src_parent,
                src_name,
                dst_parent,
                dst_name,
                now,
            } => {
                check_name(&src_name)?;
                check_name(&dst_name)?;
                self.inode(src_parent)?;
                let Some(mut e) = self.entry(src_parent, &src_name)? else {
                    return Err(Errno::NOENT.into());
                };
                if e.lock.is_some() {
                    return Err(Errno::BUSY.into());
                }
                e.lock = Some(RenameLock {
                    dst_parent,
                    dst_name,
                    since: now,
                });
                self.put(ENTRIES, &k_entry(src_parent, &src_name), &enc(&e)?)?;
                Ok(Reply::Entry {
                    ino: e.ino,
                    kind: e.kind,
                    intents: vec![],
                })
            }
            Op::RenameIn {
                ino,
                kind,
                src_parent,
                dst_parent,
                dst_name,
                noreplace,
                now,
            } => {
                check_name(&dst_name)?;
                let mut p = self.live_dir(dst_parent)?;
                let mut intents = vec![];
                let mut replaced_dir = false;
                if let Some(v) = self.entry(dst_parent, &dst_name)? {
                    if v.lock.is_some() {
                        return Err(Errno::BUSY.into());
                    }
                    if noreplace {
                        return Err(Errno::EXIST.into());
                    }
                    if v.ino == ino {
                        return Err(Errno::EXIST.into());
                    }
                    self.replace_victim(&v, kind, now, &mut intents)?;
                    replaced_dir = v.kind == Kind::Dir;
                    self.remove_entry(&mut p, &dst_name, &v, now)?;
                }
                self.add_entry(&mut p, &dst_name, ino, kind, now)?;
                if kind == Kind::Dir && !replaced_dir {
                    p.attr.nlink += 1;
                }
                self.save(&p)?;
                if kind == Kind::Dir && src_parent != dst_parent {
                    self.reparent(ino, dst_parent, now, &mut intents)?;
                }
                Ok(Reply::Entry { ino, kind, intents })
            }
            Op::RenameFinish {
                src_parent,
                src_name,
                now,
            } => {
                let Some(e) = self.entry(src_parent, &src_name)? else {
                    return Ok(Reply::Done);
                };
                if e.lock.is_none() {
                    return Ok(Reply::Done);
                }
                let mut p = self.inode(src_parent)?;
                self.remove_entry(&mut p, &src_name, &e, now)?;
                if e.kind == Kind::Dir {
                    p.attr.nlink = p.attr.nlink.saturating_sub(1);
                }
                self.save(&p)?;
                Ok(Reply::Done)
            }
            Op::RenameUnlock {
                src_parent,
                src_name,
            } => {
                if let Some(mut e) = self.entry(src_parent, &src_name)? {
                    if e.lock.take().is_some() {
                        self.put(ENTRIES, &k_entry(src_parent, &src_name), &enc(&e)?)?;
                    }
                }
                Ok(Reply::Done)
            }
            Op::SetAttr { ino, set, now } => self.setattr(ino, set, now),
            Op::Write {
                ino,
                extents,
                now,
                then,
            } => {
                if then.as_ref().is_some_and(|t| t.size.is_some()) {
                    // A size is a truncate, with its own order against the bytes.
                    return Err(Errno::INVAL.into());
                }
                let written = self.write(ino, extents, now)?;
                match then {
                    Some(set) => self.setattr(ino, set, now),
                    None => Ok(written),
                }
            }
            Op::SetXattr {
                ino,
                name,
                value,
                flags,
                now,
            } => {
                if name.is_empty() || name.len() > crate::NAME_MAX {
                    return Err(Errno::RANGE.into());
                }
                if value.len() > XATTR_VALUE_MAX {
                    return Err(Errno::RANGE.into());
                }
                let mut i = self.inode(ino)?;
                let at = i.xattrs.iter().position(|x| x.0 == name);
                match (at, flags & (XATTR_CREATE | XATTR_REPLACE)) {
                    (Some(_), XATTR_CREATE) => return Err(Errno::EXIST.into()),
                    (None, XATTR_REPLACE) => return Err(Errno::NODATA.into()),
                    (Some(a), _) => i.xattrs[a].1 = value,
                    (None, _) => i.xattrs.push((name, value)),
                }
                let names: usize = i.xattrs.iter().map(|(n, _)| n.len() + 1).sum();
                let values: usize = i.xattrs.iter().map(|(_, v)| v.len()).sum();
                if names > XATTR_NAMES_MAX || names + values > XATTRS_BYTES_MAX {
                    return Err(Errno::NOSPC.into());
                }
                i.attr.ctime = now;
                self.save(&i)?;
                Ok(Reply::Done)
            }
            Op::RemoveXattr { ino, name, now } => {
                let mut i = self.inode(ino)?;
                let Some(a) = i.xattrs.iter().position(|x| x.0 == name) else {
                    return Err(Errno::NODATA.into());
                };
                i.xattrs.remove(a);
                i.attr.ctime = now;
                self.save(&i)?;
                Ok(Reply::Done)
            }
            Op::Apply { intent } => {
                if intent.to != self.partition {
                    return Err(Errno::INVAL.into());
                }
                let k = k_done(intent.from, intent.id);
                if self.get(DONE, &k)?.is_none() {
                    self.follow_up(intent.op, intent.created)?;
                    self.put(DONE, &k, &enc(&intent.created)?)?;
                    // Forget follow-ups applied long ago (their intents are cleared by now):
                    // a walk of the whole table, so once per DONE_SWEEP_EVERY follow-ups
                    // applied here, not at each.
                    if self.counter("done_applied", 0)? % DONE_SWEEP_EVERY == 0 {
                        let old = intent.created - DONE_KEEP;
                        self.with(DONE, |t| {
                            t.retain(|_, v| {
                                postcard::from_bytes::<Nanos>(v)
                                    .map(|t| t >= old)
                                    .unwrap_or(true)
                            })?;
                            Ok(())
                        })?;
                    }
                }
                Ok(Reply::Done)
            }
            Op::Once { id, now, op } => {
                let k = id.to_be_bytes();
                if let Some(v) = self.get(ONCE, &k)? {
                    // Sent again after its answer was lost: the first answer.
                    return match dec::<Reply>(v.get(8..).unwrap_or_default())? {
                        Reply::Error(e) => Err(e.into()),
                        r => Ok(r),
                    };
                }
                let r = self.apply(*op);
                let reply = match &r {
                    Ok(reply) => reply.clone(),
                    Err(Fail::Errno(e)) => Reply::Error(*e),
                    Err(Fail::Storage(_)) => return r,
                };
                // Times as unsigned big-endian keys sort in time order.
                let t = (now.max(0) as u64).to_be_bytes();
                let mut v = t.to_vec();
                v.extend_from_slice(&enc(&reply)?);
                self.put(ONCE, &k, &v)?;
                let mut at = t.to_vec();
                at.extend_from_slice(&k);
                self.put(ONCE_AT, &at, &[])?;
                self.forget_once(now.saturating_sub(crate::ONCE_KEEP_NS))?;
                r
            }
            Op::ClearIntent { id } => {
                self.del(INTENTS, &k_ino(id))?;
                Ok(Reply::Done)
            }
            Op::Within {
                deadline, now, op, ..
            } => {
                if now > deadline || self.decided_at()? > deadline {
                    return Err(Errno::TIMEDOUT.into());
                }
                self.apply(*op)
            }
            Op::Decide {
                parent,
                name,
                ino,
                now,
            } => {
                if now > self.decided_at()? {
                    self.put(META, DECIDED_AT, &enc(&now)?)?;
                }
                match self.entry(parent, &name)? {
                    Some(e) if e.ino == ino => Ok(Reply::Entry {
                        ino,
                        kind: e.kind,
                        intents: vec![],
                    }),
                    _ => Err(Errno::NOENT.into()),
                }
            }
            Op::Keep { ino, now } => {
                self.forget_kept(now - crate::KEEP_MAX_NS)?;
                self.inode(ino)?;
                self.put(KEPT, &k_ino(ino), &enc(&now)?)?;
                Ok(Reply::Done)
            }
            Op::Unkeep { ino } => {
                self.unkeep(ino)?;
                Ok(Reply::Done)
            }
            Op::Settle {
                item,
                entry_exists,
                now,
            } => self.settle(item, entry_exists, now),
        }
    }

    fn settle(&mut self, item: Unsettled, exists: bool, now: Nanos) -> R<Reply> {
        match item {
            Unsettled::PendingDir { ino, .. } | Unsettled::DyingDir { ino, .. } => {
                let dying = matches!(item, Unsettled::DyingDir { .. });
                if let Ok(mut i) = self.inode(ino) {
                    let still = match i.state {
                        DirState::Pending { .. } => !dying,
                        DirState::Dying { .. } => dying,
                        DirState::Normal => false,
                    };
                    if still {
                        // Its entry decides: there, it lives on; gone, so does it.
                        if exists {
                            i.state = DirState::Normal;
                            self.save(&i)?;
                        } else {
                            self.destroy_dir(&i)?;
                        }
                    }
                }
            }
            Unsettled::Link { ino, parent, name } => {
                let k = k_link(ino, parent, &name);
                if self.get(LINKS, &k)?.is_some() {
                    self.del(LINKS, &k)?;
                    if !exists {
                        self.dec_link(ino, now)?;
                    }
                }
            }
            Unsettled::Rename {
                src_parent,
                src_name,
                ino,
                ..
            } => {
                if let Some(e) = self.entry(src_parent, &src_name)? {
                    if e.lock.is_some() && e.ino == ino {
                        if exists {
                            return self.apply(Op::RenameFinish {
                                src_parent,
                                src_name,
                                now,
                            });
                        }
                        return self.apply(Op::RenameUnlock {
                            src_parent,
                            src_name,
                        });
                    }
                }
            }
        }
        Ok(Reply::Done)
    }

    fn rename(
        &mut self,
        sp: u64,
        sn: Vec<u8>,
        dp: u64,
        dn: Vec<u8>,
        flags: u32,
        now: Nanos,
    ) -> R<Reply> {
        check_name(&sn)?;
        check_name(&dn)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags & RENAME_NOREPLACE != 0 && flags & RENAME_EXCHANGE != 0
        {
            return Err(Errno::INVAL.into());
        }
        let mut src_dir = self.inode(sp)?;
        if src_dir.attr.kind != Kind::Dir {
            return Err(Errno::NOTDIR.into());
        }
        let Some(s) = self.entry(sp, &sn)? else {
            return Err(Errno::NOENT.into());
        };
        let same_dir = sp == dp;
        let mut dst_dir = if same_dir {
            src_dir.clone()
        } else {
            self.live_dir(dp)?
        };
        let victim = self.entry(dp, &dn)?;
        if s.lock.is_some() || victim.as_ref().is_some_and(|v| v.lock.is_some()) {
            return Err(Errno::BUSY.into());
        }
        if same_dir && sn == dn {
            return Ok(Reply::Intents(vec![]));
        }
        let mut intents = vec![];
        if flags & RENAME_EXCHANGE != 0 {
            let Some(v) = victim else {
                return Err(Errno::NOENT.into());
            };
            // Swap what the two entries point at; cookies stay.
            let mut a = s.clone();
            let mut b = v.clone();
            std::mem::swap(&mut a.ino, &mut b.ino);
            std::mem::swap(&mut a.kind, &mut b.kind);
            self.put(ENTRIES, &k_entry(sp, &sn), &enc(&a)?)?;
            self.put(ENTRIES, &k_entry(dp, &dn), &enc(&b)?)?;
            if same_dir {
                // No `..` changes, but a pending directory renamed must be confirmed (see
                // `confirm_moved`).
                for e in [&s, &v] {
                    if e.kind == Kind::Dir {
                        self.here_or_intent(
                            e.ino,
                            FollowUp::Confirm { ino: e.ino },
                            now,
                            &mut intents,
                        )?;
                    }
                }
            } else {
                if s.kind == Kind::Dir {
                    self.reparent(s.ino, dp, now, &mut intents)?;
                }
                if v.kind == Kind::Dir {
                    self.reparent(v.ino, sp, now, &mut intents)?;
                }
                let d = (s.kind == Kind::Dir) as i64 - (v.kind == Kind::Dir) as i64;
                src_dir.attr.nlink = (src_dir.attr.nlink as i64 - d) as u32;
                dst_dir.attr.nlink = (dst_dir.attr.nlink as i64 + d) as u32;
            }
            for d in [&mut src_dir, &mut dst_dir] {
                d.attr.mtime = now;
                d.attr.ctime = now;
            }
            self.save(&src_dir)?;
            if !same_dir {
                self.save(&dst_dir)?;
            }
            return Ok(Reply::Intents(intents));
        }
        let mut replaced_dir = false;
        if let Some(v) = &victim {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(Errno::EXIST.into());
            }
            if v.ino == s.ino {
                // Two links to one inode: POSIX says do nothing.
                return Ok(Reply::Intents(vec![]));
            }
            self.replace_victim(v, s.kind, now, &mut intents)?;
            replaced_dir = v.kind == Kind::Dir;
        }
        if same_dir {
            if let Some(v) = &victim {
                self.remove_entry(&mut src_dir, &dn, v, now)?;
                if replaced_dir {
                    src_dir.attr.nlink = src_dir.attr.nlink.saturating_sub(1);
                }
            }
            self.remove_entry(&mut src_dir, &sn, &s, now)?;
            self.add_entry(&mut src_dir, &dn, s.ino, s.kind, now)?;
            self.save(&src_dir)?;
        } else {
            if let Some(v) = &victim {
                self.remove_entry(&mut dst_dir, &dn, v, now)?;
            }
            self.remove_entry(&mut src_dir, &sn, &s, now)?;
            self.add_entry(&mut dst_dir, &dn, s.ino, s.kind, now)?;
            if s.kind == Kind::Dir {
                src_dir.attr.nlink = src_dir.attr.nlink.saturating_sub(1);
                if !replaced_dir {
                    dst_dir.attr.nlink += 1;
                }
                self.reparent(s.ino, dp, now, &mut intents)?;
            }
            self.save(&src_dir)?;
            self.save(&dst_dir)?;
        }
        // The renamed inode's ctime changes; a directory moved to another parent had it
        // changed with its `..`.
        if same_dir || s.kind != Kind::Dir {
            self.here_or_intent(s.ino, FollowUp::Touch { ino: s.ino }, now, &mut intents)?;
        }
        Ok(Reply::Intents(intents))
    }

    fn setattr(&mut self, ino: u64, set: SetAttr, now: Nanos) -> R<Reply> {
        let mut i = self.inode(ino)?;
        if let Some(size) = set.size {
            match i.attr.kind {
                Kind::File => {}
                Kind::Dir => return Err(Errno::ISDIR.into()),
                _ => return Err(Errno::INVAL.into()),
            }
            if size < i.attr.size {
                self.drop_extents_from(ino, size)?;
            }
            self.usage(i.attr.volume, size as i128 - i.attr.size as i128, 0)?;
            i.attr.size = size;
            i.attr.mtime = now;
        }
        if let Some(p) = set.perm {
            i.attr.perm = p & 0o7777;
        }
        if let Some(u) = set.uid {
            i.attr.uid = u;
        }
        if let Some(g) = set.gid {
            i.attr.gid = g;
        }
        if let Some(a) = set.atime {
            i.attr.atime = a;
        }
        if let Some(m) = set.mtime {
            i.attr.mtime = m;
        }
        if let Some(f) = set.flags {
            i.attr.flags = f;
        }
        i.attr.ctime = now;
        self.save(&i)?;
        Ok(Reply::Attr(i.attr))
    }

    fn write(&mut self, ino: u64, extents: Vec<Extent>, now: Nanos) -> R<Reply> {
        let mut i = self.inode(ino)?;
        if i.attr.kind != Kind::File {
            return Err(Errno::INVAL.into());
        }
        let mut end = i.attr.size;
        for e in &extents {
            if e.len == 0 || e.skip as u64 + e.len > e.frond_len as u64 {
                return Err(Errno::INVAL.into());
            }
            if e.is_inline()
                && (e.inline.len() != e.frond_len as usize
                    || e.blade != 0
                    || e.inline.len() as u64 > crate::INLINE_FILE_BYTES
                    || !e.inline_intact())
            {
                return Err(Errno::INVAL.into());
            }
            let Some(stop) = e.offset.checked_add(e.len) else {
                return Err(Errno::FBIG.into());
            };
            end = end.max(stop);
            // A frond's blade is the high half of its address (kelp's encoding): both must
            // name the same blade, or the fence below could be passed by naming another.
            if !e.is_inline() && (e.blade == 0 || (e.address >> 32) as u32 != e.blade) {
                return Err(Errno::INVAL.into());
            }
            if !e.is_inline()
                && self.with(META, |t| Ok(t.get(&k_retired(e.blade)[..])?.is_some()))?
            {
                return Err(Errno::STALE.into());
            }
        }
        self.with(EXTENTS, |t| {
            for e in extents {
                let a = e.offset;
                let b = a + e.len;
                // Cut what the new extent covers out of the extents there.
                let mut cut: Vec<Extent> = extent_across(&*t, ino, a)?.into_iter().collect();
                for item in t.range::<&[u8]>(&k_pair(ino, a)[..]..&k_pair(ino, b)[..])? {
                    cut.push(dec(item?.1.value())?);
                }
                for old in cut {
                    t.remove(&k_pair(ino, old.offset)[..])?;
                    let old_end = old.offset + old.len;
                    if old.offset < a {
                        let mut left = old.clone();
                        left.len = a - old.offset;
                        if !left.trim_inline() {
                            return Err(damaged(ino, &left));
                        }
                        t.insert(&k_pair(ino, left.offset)[..], enc(&left)?.as_slice())?;
                    }
                    if old_end > b {
                        let mut right = old;
                        let d = b - right.offset;
                        right.offset = b;
                        right.len = old_end - b;
                        right.skip += d as u32;
                        if !right.trim_inline() {
                            return Err(damaged(ino, &right));
                        }
                        t.insert(&k_pair(ino, right.offset)[..], enc(&right)?.as_slice())?;
                    }
                }
                t.insert(&k_pair(ino, a)[..], enc(&e)?.as_slice())?;
            }
            Ok(())
        })?;
        self.usage(i.attr.volume, end as i128 - i.attr.size as i128, 0)?;
        i.attr.size = end;
        i.attr.mtime = now;
        i.attr.ctime = now;
        self.save(&i)?;
        Ok(Reply::Attr(i.attr))
    }
}
