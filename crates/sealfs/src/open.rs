//! The mount's open files: what has been written to each and not yet sent, the one send in
//! flight per file, and the error a background send left for the next write, flush or fsync
//! to report (as a kernel reports a writeback error).
//!
//! `write()` returns once the bytes are held here (DESIGN 5.5: it may return before they are
//! durable). They are sent as one burst of fronds, synced on k + w disks and recorded by a
//! Raft majority, when the file is closed or fsynced, when its size or times are set, and in
//! the background once [`SEND_BYTES`] are held. Reads through the mount see them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sealfs_client::{Error, Sealfs};
use sealfs_meta::{Attr, Extent, SetAttr};

use crate::dirty::Ranges;

/// Held bytes of one file that start a send in the background.
pub const SEND_BYTES: usize = sealfs_client::FROND_BYTES;
/// Held bytes of one file past which a write waits for the send (bounds the memory a
/// writer faster than the cluster can take).
pub const HELD_BYTES_MAX: usize = 8 * sealfs_client::FROND_BYTES;
/// Separate ranges of one file past which a write waits for a send (bounds the work of a
/// send and of the reads that look through them).
pub const RANGES_MAX: usize = 4096;

/// Bytes of a file with more extents than one reply carries whose extents are read and kept
/// together: 4,096 extents of 4 KiB, a quarter of what a reply carries.
const WINDOW: u64 = 16 << 20;

/// Extents of one window kept at most (about 300 KiB): a window in smaller pieces is not
/// kept, and reads there ask for their own range.
const WINDOW_EXTENTS_MAX: usize = 4096;

/// Windows of one file kept at most (about 19 MiB at most); past that they are all dropped
/// and read again as reads need them.
const WINDOWS_MAX: usize = 64;

/// Windows read per open of a file at most: past that (a file larger than the windows kept,
/// read at random, or rewritten between reads) reads ask for their own range, which costs
/// less than reading a whole window for each.
const WINDOW_READS_MAX: u32 = 2 * WINDOWS_MAX as u32;

/// Extents of a file (all, or those of a window) and its size, as read from its partition.
type Kept = Arc<(Vec<Extent>, u64)>;

#[derive(Default)]
struct File {
    /// Written and not yet sent.
    dirty: Ranges,
    /// Taken by the sends in flight and not yet recorded, oldest first (a background send
    /// appends the next burst while the last one syncs and records): reads still see these.
    sending: Vec<Arc<Ranges>>,
    /// A background send is running or about to.
    background: bool,
    /// What the last background send failed with.
    error: Option<Error>,
    /// The time of the last write held here, in ns (what the file's mtime will become).
    mtime: Option<i64>,
    /// Attributes set (no size) while bytes were held: they go with the bytes, in the same
    /// command, and this mount shows them meanwhile. An mtime here is newer than any held
    /// write (a write after it clears it).
    attrs: Option<SetAttr>,
    /// When `attrs` last changed (the file's ctime meanwhile), in ns.
    attrs_at: i64,
    /// Made by this mount and given no xattr since: every xattr is absent.
    bare: bool,
    /// Xattr names found absent since the file was opened here (the kernel asks for
    /// `security.capability` before every write).
    absent: std::collections::HashSet<Vec<u8>>,
    /// Open handles.
    opens: u32,
    /// Unlinked while open: the cluster keeps the inode until the last handle goes.
    kept: bool,
    /// The file's extents and size as last read from its partition, kept while it is open
    /// (close-to-open: an open reads them again), dropped when this mount changes the file.
    extents: Option<Kept>,
    /// The file has more extents than one reply carries: reads use the extents of the
    /// [`WINDOW`] they fall in (until the file is opened again).
    fragmented: bool,
    /// For a fragmented file, the extents and size read for each [`WINDOW`]-aligned range a
    /// read fell in (None: more than one reply carries; reads there ask for their range only),
    /// dropped with `extents`.
    windows: HashMap<u64, Option<Kept>>,
    /// Windows read since the file was opened here.
    window_reads: u32,
    /// The attributes the cluster last gave for the file while open here, until this mount
    /// changes it: a setattr held with bytes is answered from them (with what is held laid
    /// over them) without asking the partition.
    base: Option<Attr>,
    /// When the cluster gave `base`.
    base_at: Option<std::time::Instant>,
    /// Counts the changes that drop `extents`, so that a read started before one does not
    /// keep what it fetched.
    changes: u64,
    /// Held by whoever sends this file's bytes or changes its size or times, one at a time
    /// so that newer bytes are never recorded before older ones.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl File {
    /// This mount changed the file: what it knew of the extents is stale.
    fn changed(&mut self) {
        self.extents = None;
        self.windows.clear();
        self.base = None;
        self.changes += 1;
    }

    /// `taken` is no longer in flight.
    fn unsend(&mut self, taken: &Arc<Ranges>) {
        self.sending.retain(|s| !Arc::ptr_eq(s, taken));
    }

    /// Holds again bytes that failed to go, under any written since.
    fn give_back(&mut self, taken: &Ranges) {
        for (at, bytes) in taken.iter() {
            self.dirty.insert_under(at, bytes);
        }
    }

    /// Holds again attributes that failed to go, under any set since.
    fn give_back_attrs(&mut self, attrs: Option<SetAttr>) {
        if let Some(mut older) = attrs {
            if let Some(newer) = self.attrs.take() {
                overlay(&mut older, newer);
            }
            self.attrs = Some(older);
        }
    }

    fn idle(&self) -> bool {
        self.opens == 0
            && self.dirty.is_empty()
            && self.attrs.is_none()
            && self.sending.is_empty()
            && !self.background
    }
}

/// What a write asks of its caller after the bytes are held.
pub enum Held {
    /// Nothing: answer the write.
    Done,
    /// Start a background send, then answer.
    Background,
    /// Send now and answer when it is done (too much is held).
    Wait,
}

/// The open files of one mount.
#[derive(Clone)]
pub struct OpenFiles {
    fs: Sealfs,
    files: Arc<Mutex<HashMap<u64, File>>>,
    /// Told when a background send takes bytes or ends: a writer waiting for room looks again.
    room: Arc<tokio::sync::Notify>,
}

impl OpenFiles {
    /// No file open yet.
    pub fn new(fs: Sealfs) -> Self {
        OpenFiles {
            fs,
            files: Arc::default(),
            room: Arc::default(),
        }
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<u64, File>> {
        // A panic elsewhere while holding this lock leaves plain data behind: go on with it.
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle of `ino` was opened.
    pub fn opened(&self, ino: u64) {
        let mut files = self.files();
        let f = files.entry(ino).or_default();
        f.opens += 1;
        f.fragmented = false;
        f.window_reads = 0;
        f.changed();
        f.bare = false;
        f.absent.clear();
    }

    /// The cluster gave `a` for a file open here (at its open or create).
    pub fn known(&self, a: &Attr) {
        // Only for the file's one handle: another may have changed it since `a` was read.
        if let Some(f) = self.files().get_mut(&a.ino).filter(|f| f.opens == 1) {
            f.base = Some(a.clone());
            f.base_at = Some(std::time::Instant::now());
        }
    }

    /// The attributes of `ino` as this mount shows them, without asking its partition: when
    /// the file is open here and the cluster gave them (at its create) less than `fresh` ago,
    /// and this mount has not changed the file since but by what it holds (laid over them).
    /// Within `fresh` the kernel's own attribute cache would show them unasked as well; past
    /// it, or after any other change, `None`: ask the partition. With them, what is left of
    /// `fresh` (the kernel keeps them that long, so that they are never shown older).
    pub fn shown(
        &self,
        ino: u64,
        fresh: std::time::Duration,
    ) -> Option<(Attr, std::time::Duration)> {
        let (base, left) = {
            let files = self.files();
            let f = files.get(&ino)?;
            if f.opens == 0 {
                return None;
            }
            let left = fresh.checked_sub(f.base_at?.elapsed())?;
            (f.base.clone()?, left)
        };
        (!left.is_zero()).then(|| (self.attr(base), left))
    }

    /// A link, unlink or rename changed the link count or ctime of some inode, maybe one
    /// open here: no open file's attributes are shown from what its create gave any more.
    pub fn links_changed(&self) {
        for f in self.files().values_mut() {
            f.base = None;
        }
    }

    /// `ino` was just made by this mount (and opened): it has no xattr yet.
    pub fn made(&self, ino: u64) {
        if let Some(f) = self.files().get_mut(&ino) {
            f.bare = true;
        }
    }

    /// True if xattr `name` of `ino` is known absent: the file is open here and this mount
    /// made it or found the name absent since it was opened (close-to-open, as for bytes).
    pub fn xattr_absent(&self, ino: u64, name: &[u8]) -> bool {
        self.files()
            .get(&ino)
            .is_some_and(|f| f.opens > 0 && (f.bare || f.absent.contains(name)))
    }

    /// Xattr `name` of open file `ino` was found absent.
    pub fn found_absent(&self, ino: u64, name: &[u8]) {
        if let Some(f) = self.files().get_mut(&ino) {
            if f.opens > 0 {
                f.absent.insert(name.to_vec());
            }
        }
    }

    /// This mount sets or removes an xattr of `ino`: what it knew of them is stale.
    pub fn xattrs_changed(&self, ino: u64) {
        if let Some(f) = self.files().get_mut(&ino) {
            f.bare = false;
            f.absent.clear();
            // Its ctime changes.
            f.base = None;
        }
    }

    /// True if this mount has any file open.
    pub fn any_open(&self) -> bool {
        self.files().values().any(|f| f.opens > 0)
    }

    /// True if this mount has `ino` open.
    pub fn is_open(&self, ino: u64) -> bool {
        self.files().get(&ino).is_some_and(|f| f.opens > 0)
    }

    /// `ino` is open and about to lose a link: the cluster is asked to keep it (nlink 0)
    /// until its last handle here is released.
    pub async fn keep(&self, ino: u64) -> Result<(), Error> {
        if self.files().get(&ino).is_some_and(|f| f.kept) {
            return Ok(());
        }
        self.fs.keep(ino).await?;
        if let Some(f) = self.files().get_mut(&ino) {
            f.kept = true;
        }
        Ok(())
    }

    /// A handle of `ino` was released (after its bytes were sent). The last handle of a
    /// kept inode lets the cluster delete it if it has no link left.
    pub async fn released(&self, ino: u64) {
        let unkeep = {
            let mut files = self.files();
            let Some(f) = files.get_mut(&ino) else {
                return;
            };
            f.opens = f.opens.saturating_sub(1);
            let unkeep = f.opens == 0 && std::mem::take(&mut f.kept);
            if f.idle() {
                files.remove(&ino);
            }
            unkeep
        };
        if unkeep {
            if let Err(e) = self.fs.unkeep(ino).await {
                // The partition forgets it after KEEP_MAX_NS at the latest.
                tracing::warn!("inode {ino:#x}: closed after unlink, not yet deleted: {e:?}");
            }
        }
    }

    /// Holds `data` written at `offset` of `ino`.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<Held, Error> {
        if offset.checked_add(data.len() as u64).is_none() {
            return Err(Error::FBIG);
        }
        let mut files = self.files();
        let f = files.entry(ino).or_default();
        if let Some(e) = f.error.take() {
            return Err(e);
        }
        f.dirty.insert(offset, data);
        f.mtime = Some(sealfs_meta::now_nanos());
        if let Some(a) = &mut f.attrs {
            a.mtime = None;
        }
        if f.dirty.bytes() >= HELD_BYTES_MAX || f.dirty.count() >= RANGES_MAX {
            return Ok(Held::Wait);
        }
        if f.dirty.bytes() >= SEND_BYTES && !f.background {
            f.background = true;
            return Ok(Held::Background);
        }
        Ok(Held::Done)
    }

    /// `a` as it is with what this mount holds for the file: its size, mtime and the
    /// attributes set since.
    pub fn attr(&self, mut a: Attr) -> Attr {
        if let Some(f) = self.files().get(&a.ino) {
            let end = f.sending.iter().fold(f.dirty.end(), |e, s| e.max(s.end()));
            a.size = a.size.max(end);
            let held = f.attrs.clone().unwrap_or_default();
            match (held.mtime, f.mtime) {
                (Some(m), _) => a.mtime = m,
                (None, Some(t)) => a.mtime = a.mtime.max(t),
                (None, None) => {}
            }
            if f.attrs.is_some() {
                a.ctime = a.ctime.max(f.attrs_at);
            }
            a.perm = held.perm.unwrap_or(a.perm);
            a.uid = held.uid.unwrap_or(a.uid);
            a.gid = held.gid.unwrap_or(a.gid);
            a.atime = held.atime.unwrap_or(a.atime);
        }
        a
    }

    /// Reads `[offset, offset + len)` of `ino`: the cluster's bytes under what is held here.
    pub async fn read(&self, ino: u64, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
        // What is held is looked at before the cluster is read: a send that lands in between
        // is then in both, and nothing is missed.
        let (end, mut pieces, covered) = {
            let files = self.files();
            match files.get(&ino) {
                None => (0, Vec::new(), false),
                Some(f) => {
                    let mut pieces = Vec::new();
                    let mut end = f.dirty.end();
                    for s in &f.sending {
                        end = end.max(s.end());
                        pieces.extend(s.pieces(offset, len));
                    }
                    pieces.extend(f.dirty.pieces(offset, len));
                    (end, pieces, f.dirty.covers(offset, len))
                }
            }
        };
        if covered {
            return Ok(pieces.pop().map(|p| p.1).unwrap_or_default());
        }
        let (mut out, size) = match self.extents(ino, offset, len).await? {
            Some(e) => (self.fs.read_extents(&e.0, e.1, offset, len).await?, e.1),
            None => self.fs.read_sized(ino, offset, len).await?,
        };
        let want = size.max(end).saturating_sub(offset).min(len) as usize;
        out.resize(want, 0);
        for (at, bytes) in pieces {
            let from = (at - offset) as usize;
            out[from..from + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(out)
    }

    /// Extents of open file `ino` that cover `len` bytes at `offset`: all of them, kept or
    /// read once and kept; for a file with more than one reply carries, those of the
    /// [`WINDOW`] the range falls in, kept likewise (None: not open here, a range across two
    /// windows, or a window with more than one reply carries).
    async fn extents(&self, ino: u64, offset: u64, len: u64) -> Result<Option<Kept>, Error> {
        let window = offset - offset % WINDOW;
        let (changes, fragmented) = match self.files().get(&ino) {
            None => return Ok(None),
            Some(f) if f.fragmented => {
                if offset.saturating_add(len) > window + WINDOW {
                    return Ok(None);
                }
                if let Some(w) = f.windows.get(&window) {
                    return Ok(w.clone());
                }
                if f.window_reads >= WINDOW_READS_MAX {
                    return Ok(None);
                }
                (f.changes, true)
            }
            Some(f) if f.extents.is_some() => return Ok(f.extents.clone()),
            Some(f) => (f.changes, false),
        };
        let (at, span) = if fragmented {
            (window, WINDOW)
        } else {
            (0, u64::MAX)
        };
        let got = match self.fs.extents_in(ino, at, span).await {
            Ok(r) if fragmented && r.0.len() > WINDOW_EXTENTS_MAX => None,
            Ok(r) => Some(Arc::new(r)),
            Err(Error::FBIG) => None,
            Err(e) => return Err(e),
        };
        let mut files = self.files();
        let Some(f) = files.get_mut(&ino) else {
            return Ok(got);
        };
        if fragmented {
            f.window_reads += 1;
        }
        if f.changes != changes {
            return Ok(got);
        }
        match (fragmented, &got) {
            (false, Some(e)) => f.extents = Some(e.clone()),
            // Too many for one reply: the window a read falls in, from the next read on.
            (false, None) => f.fragmented = true,
            (true, _) => {
                if f.windows.len() >= WINDOWS_MAX {
                    f.windows.clear();
                }
                f.windows.insert(window, got.clone());
            }
        }
        Ok(got)
    }

    /// Waits until `ino` holds less than the bounds (a write past them waits for this): while a
    /// background send runs, until it takes the bytes; with none running, by sending them.
    pub async fn room(&self, ino: u64) -> Result<(), Error> {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let files = self.files();
                let Some(f) = files.get(&ino) else {
                    return Ok(());
                };
                if f.dirty.bytes() < HELD_BYTES_MAX && f.dirty.count() < RANGES_MAX {
                    return Ok(());
                }
                if !f.background {
                    break;
                }
            }
            notified.await;
        }
        self.flush(ino).await
    }

    /// Sends what is held for `ino` and reports any error a background send left: what
    /// close and fsync wait for.
    pub async fn flush(&self, ino: u64) -> Result<(), Error> {
        let Some(turn) = self.files().get(&ino).map(|f| f.turn.clone()) else {
            return Ok(());
        };
        let _turn = turn.lock().await;
        self.send(ino, 0).await?;
        match self.files().get_mut(&ino).and_then(|f| f.error.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends what is held for `ino` with `set` (times, owner, mode) in the same command, before
    /// any later send can start: a change of times comes after the bytes written before it,
    /// and costs no command of its own. With nothing held, sets it alone.
    pub async fn flush_setting(&self, ino: u64, set: SetAttr) -> Result<Attr, Error> {
        let turn = self.files().get(&ino).map(|f| f.turn.clone());
        let _turn = match &turn {
            Some(t) => Some(t.lock().await),
            None => None,
        };
        if self.hold_attrs(ino, &set) {
            // Shown here at once (this mount's replies overlay them), sent with the bytes.
            let base = self.files().get(&ino).and_then(|f| f.base.clone());
            return Ok(self.attr(match base {
                Some(a) => a,
                None => self.fs.getattr(ino).await?,
            }));
        }
        let sent = match turn {
            Some(_) => self.send_then(ino, 0, Some(set.clone())).await?,
            None => None,
        };
        let r = match sent {
            Some(a) => Ok(a),
            None => self.fs.setattr(ino, set).await,
        };
        if let Some(f) = self.files().get_mut(&ino) {
            f.changed();
        }
        r
    }

    /// Copies `len` bytes of `from` at `from_off` to `to` at `to_off` by sharing their
    /// fronds (see `Sealfs::copy_range`), after what is held for either file is sent.
    pub async fn copy(
        &self,
        from: u64,
        from_off: u64,
        to: u64,
        to_off: u64,
        len: u64,
    ) -> Result<u64, Error> {
        self.flush(from).await?;
        let turn = self.files().get(&to).map(|f| f.turn.clone());
        let _turn = match &turn {
            Some(t) => Some(t.lock().await),
            None => None,
        };
        if turn.is_some() {
            self.send(to, 0).await?;
        }
        let r = self.fs.copy_range(from, from_off, to, to_off, len).await;
        if let Some(f) = self.files().get_mut(&to) {
            f.changed();
        }
        r
    }

    /// Where the next data (`hole` false) or hole at or after `offset` of `ino` is, after
    /// what is held is sent (SEEK_DATA and SEEK_HOLE). NXIO at or past the end, or with no
    /// data after `offset`.
    pub async fn seek(&self, ino: u64, offset: u64, hole: bool) -> Result<u64, Error> {
        self.flush(ino).await?;
        let (mut extents, size) = match self.fs.extents(ino).await {
            Ok(r) => r,
            Err(Error::FBIG) => {
                // More extents than a reply carries: answer as a file without holes does
                // (what lseek promises at the least: data here, the hole at the end).
                let size = self.fs.getattr(ino).await?.size;
                return match offset < size {
                    true if hole => Ok(size),
                    true => Ok(offset),
                    false => Err(Error::NXIO),
                };
            }
            Err(e) => return Err(e),
        };
        if offset >= size {
            return Err(Error::NXIO);
        }
        extents.sort_by_key(|e| e.offset);
        let mut at = offset;
        for e in extents
            .iter()
            .filter(|e| e.offset.saturating_add(e.len) > offset)
        {
            if hole {
                if e.offset > at {
                    break;
                }
                at = at.max(e.offset.saturating_add(e.len));
            } else {
                return Ok(e.offset.max(offset));
            }
        }
        if hole {
            Ok(at.min(size))
        } else {
            Err(Error::NXIO)
        }
    }

    /// Holds `set` (no size) with the bytes held for `ino`, if there are any; false if not.
    fn hold_attrs(&self, ino: u64, set: &SetAttr) -> bool {
        let mut files = self.files();
        let Some(f) = files.get_mut(&ino) else {
            return false;
        };
        if set.size.is_some() || f.dirty.is_empty() {
            return false;
        }
        let held = f.attrs.get_or_insert_with(SetAttr::default);
        overlay(held, set.clone());
        f.attrs_at = sealfs_meta::now_nanos();
        true
    }

    /// Cuts what is held for `ino` at `size`, then runs `then` (the new size, recorded)
    /// before any later send can start. Bytes held below `size` stay held.
    pub async fn truncate_then<T, F>(&self, ino: u64, size: u64, then: F) -> Result<T, Error>
    where
        F: std::future::Future<Output = Result<T, Error>>,
    {
        let turn = self.files().get(&ino).map(|f| f.turn.clone());
        let _turn = match &turn {
            Some(t) => Some(t.lock().await),
            None => None,
        };
        if let Some(f) = self.files().get_mut(&ino) {
            f.dirty.truncate(size);
        }
        let r = then.await;
        if let Some(f) = self.files().get_mut(&ino) {
            f.changed();
        }
        r
    }

    /// The background send of `ino`: sends while at least [`SEND_BYTES`] are held.
    pub async fn background(&self, ino: u64) {
        let Some(turn) = self.files().get(&ino).map(|f| f.turn.clone()) else {
            return;
        };
        let turn = turn.lock().await;
        let r = self.send_pipelined(ino).await;
        drop(turn);
        {
            let mut files = self.files();
            if let Some(f) = files.get_mut(&ino) {
                f.background = false;
                match r {
                    // A blade the burst went to was reclaimed before it was recorded: the
                    // bytes are held again, and the next send appends them anew.
                    Err(e) if e == Error::STALE => {}
                    Err(e) => f.error = Some(e),
                    Ok(()) => {}
                }
                if f.idle() {
                    files.remove(&ino);
                }
            }
        }
        // After `background` is false: a writer waiting for room sends itself.
        self.room.notify_waiters();
    }

    /// Sends what is held for `ino` while at least [`SEND_BYTES`] are (the caller holds the
    /// file's turn), in bursts whose appends overlap the sync and record of the burst before:
    /// the disks write the next fronds while the last ones sync. Bursts are recorded in the
    /// order they were taken. When one fails, it and the burst after it are held again, the
    /// newer over the older, under any written since.
    async fn send_pipelined(&self, ino: u64) -> Result<(), Error> {
        type Burst = (Arc<Ranges>, Option<SetAttr>);
        let mut committing: Option<(Burst, sealfs_client::Staged)> = None;
        loop {
            let next: Option<Burst> = {
                let mut files = self.files();
                let Some(f) = files.get_mut(&ino) else {
                    return Ok(());
                };
                (f.dirty.bytes() >= SEND_BYTES).then(|| {
                    let taken = Arc::new(std::mem::take(&mut f.dirty));
                    f.sending.push(taken.clone());
                    (taken, f.attrs.take())
                })
            };
            if next.is_some() {
                self.room.notify_waiters();
            }
            if next.is_none() && committing.is_none() {
                return Ok(());
            }
            let stage = async {
                match &next {
                    Some((taken, _)) => {
                        let ranges: Vec<(u64, &[u8])> = taken.iter().collect();
                        Some(self.fs.stage_ranges(ino, &ranges).await)
                    }
                    None => None,
                }
            };
            // Each half is timed: `--log debug` shows where a send's time goes.
            let started = std::time::Instant::now();
            let stage = async {
                let s = stage.await;
                (s, started.elapsed())
            };
            let (done, (staged, staging)) = match committing.take() {
                Some(((taken, attrs), st)) => {
                    let commit = async {
                        let c = self.fs.commit_staged(ino, st, attrs.clone()).await;
                        (c, started.elapsed())
                    };
                    let ((c, committing_took), s) = tokio::join!(commit, stage);
                    tracing::debug!(
                        "inode {ino:#x}: background send: the burst before synced and recorded \
                         in {committing_took:?}"
                    );
                    (Some((taken, attrs, c)), s)
                }
                None => (None, stage.await),
            };
            if let Some((taken, _)) = &next {
                tracing::debug!(
                    "inode {ino:#x}: background send: {} bytes appended in {staging:?}",
                    taken.bytes()
                );
            }
            let mut files = self.files();
            let Some(f) = files.get_mut(&ino) else {
                return Ok(());
            };
            if let Some((taken, attrs, c)) = done {
                f.unsend(&taken);
                f.changed();
                if let Err(e) = c {
                    // The newer burst first, so that the older goes under it.
                    if let Some((newer, newer_attrs)) = &next {
                        f.unsend(newer);
                        f.give_back(newer);
                        f.give_back_attrs(newer_attrs.clone());
                    }
                    f.give_back(&taken);
                    f.give_back_attrs(attrs);
                    return Err(e);
                }
            }
            match (next, staged) {
                (Some(burst), Some(Ok(st))) => committing = Some((burst, st)),
                (Some((taken, attrs)), Some(Err(e))) => {
                    f.unsend(&taken);
                    f.give_back(&taken);
                    f.give_back_attrs(attrs);
                    return Err(e);
                }
                _ => {}
            }
            if f.dirty.is_empty() && f.sending.is_empty() {
                f.mtime = None;
            }
        }
    }

    /// Sends what is held for `ino` while at least `min` bytes are (the caller holds the
    /// file's turn). Bytes that fail to go are held again, under any written since.
    async fn send(&self, ino: u64, min: usize) -> Result<(), Error> {
        self.send_then(ino, min, None).await.map(|_| ())
    }

    /// [`Self::send`], with `then` set by the first send's command; returns the attributes
    /// that command left (None if nothing was sent, and `then` not set).
    async fn send_then(
        &self,
        ino: u64,
        min: usize,
        mut then: Option<SetAttr>,
    ) -> Result<Option<Attr>, Error> {
        let mut set = None;
        loop {
            let (taken, attrs) = {
                let mut files = self.files();
                let Some(f) = files.get_mut(&ino) else {
                    return Ok(set);
                };
                let alone = min == 0 && (f.attrs.is_some() || then.is_some());
                if (f.dirty.is_empty() && !alone) || f.dirty.bytes() < min {
                    return Ok(set);
                }
                let taken = Arc::new(std::mem::take(&mut f.dirty));
                f.sending.push(taken.clone());
                // Attributes held go with these bytes (or alone, at a flush), `then` over them.
                let mut attrs = f.attrs.take();
                if let Some(t) = then.take() {
                    overlay(attrs.get_or_insert_with(SetAttr::default), t);
                }
                (taken, attrs)
            };
            let ranges: Vec<(u64, &[u8])> = taken.iter().collect();
            let setting = attrs.is_some();
            let r = self.fs.write_ranges_then(ino, &ranges, attrs.clone()).await;
            let mut files = self.files();
            let Some(f) = files.get_mut(&ino) else {
                return r.map(|a| setting.then_some(a));
            };
            f.unsend(&taken);
            f.changed();
            match r {
                Ok(a) => {
                    if setting {
                        set = Some(a);
                    }
                    if f.dirty.is_empty() {
                        f.mtime = None;
                    }
                }
                Err(e) => {
                    f.give_back(&taken);
                    f.give_back_attrs(attrs);
                    return Err(e);
                }
            }
        }
    }

    /// Drops what is held for `ino` (after its last handle failed to send it).
    pub fn discard(&self, ino: u64) {
        if let Some(f) = self.files().get_mut(&ino) {
            f.dirty = Ranges::default();
            f.mtime = None;
            f.attrs = None;
        }
    }
}

/// Sets in `to` every attribute `from` sets.
fn overlay(to: &mut SetAttr, from: SetAttr) {
    let SetAttr {
        perm,
        uid,
        gid,
        size,
        atime,
        mtime,
        flags,
    } = from;
    to.perm = perm.or(to.perm);
    to.uid = uid.or(to.uid);
    to.gid = gid.or(to.gid);
    to.size = size.or(to.size);
    to.atime = atime.or(to.atime);
    to.mtime = mtime.or(to.mtime);
    to.flags = flags.or(to.flags);
}
