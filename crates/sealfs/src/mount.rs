//! The FUSE mount over the client library: the namespace operations, reads, and writes held
//! per file (`open.rs`) and sent as fronds, made durable on fsync, flush (close) and release.
//!
//! Each request runs on the tokio runtime and answers when it is done, so that slow
//! operations do not hold up the others.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno as FErr, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use sealfs_client::{Error, FileKind, NewFile, Sealfs};
use sealfs_meta::{Attr, SetAttr};

use crate::dirs::{Change, Dirs};
use crate::open::{Held, OpenFiles};

/// How long the kernel may cache attributes and entries.
const TTL: Duration = Duration::from_secs(1);

/// The file system as the kernel sees it.
pub struct SealFuse {
    fs: Sealfs,
    rt: tokio::runtime::Handle,
    open: OpenFiles,
    dirs: Arc<Dirs>,
    next_fh: AtomicU64,
    told: Arc<Told>,
}

/// Files whose size and times this mount gives the kernel at most: past it, what was told is
/// forgotten, and the next open of each file makes the kernel ask again.
const TOLD_MAX: usize = 1 << 16;

/// The size, mtime and ctime this mount last gave the kernel for each regular file, and the
/// way to make the kernel drop them.
///
/// Close-to-open: an open reads a file's attributes again from its partition, but the kernel
/// keeps what it was told for the attribute TTL and reads no further than the size it holds,
/// so a file another mount grew and closed a moment ago would read short here. When the
/// attributes found at open differ from what the kernel was told, its copy is invalidated
/// (the attributes only, which never waits on a page), and it asks again before it reads past
/// its old end or shows them.
#[derive(Default)]
struct Told {
    files: Mutex<HashMap<u64, (u64, i64, i64)>>,
    notifier: OnceLock<fuser::Notifier>,
}

impl Told {
    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (u64, i64, i64)>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes the attributes of a reply to the kernel.
    fn record(&self, a: &Attr) {
        if a.kind != FileKind::File {
            return;
        }
        let mut files = self.files();
        if files.len() >= TOLD_MAX && !files.contains_key(&a.ino) {
            files.clear();
        }
        files.insert(a.ino, (a.size, a.mtime, a.ctime));
    }

    /// Whether the kernel may hold other attributes for file `a` than `a`'s; if so, what was
    /// told is forgotten here, as the kernel is about to forget it.
    fn stale(&self, a: &Attr) -> bool {
        let mut files = self.files();
        if files.get(&a.ino) == Some(&(a.size, a.mtime, a.ctime)) {
            return false;
        }
        files.remove(&a.ino);
        true
    }

    /// Makes the kernel forget the attributes it holds for file `a` unless they are `a`'s (a
    /// file's inode has the same number for the kernel and for the cluster).
    fn revalidate(&self, a: &Attr) {
        if !self.stale(a) {
            return;
        }
        if let Some(n) = self.notifier.get() {
            // ENOENT: the kernel holds nothing for it.
            let _ = n.inval_inode(INodeNo(a.ino), -1, 0);
        }
    }
}

/// What readdirplus does with an entry, given its attributes as asked for and the entries
/// already in the reply.
#[derive(Debug, PartialEq)]
enum Listing {
    /// List it with these.
    Add(Attr),
    /// Removed meanwhile: not listed.
    Skip,
    /// The first entry failed: the call answers the error.
    Fail(Error),
    /// A later one failed: the reply ends before it, and the next call (which starts at it)
    /// answers the error if it fails again.
    Stop,
}

fn listing(got: Result<Attr, Error>, added: usize) -> Listing {
    match got {
        Ok(a) => Listing::Add(a),
        Err(Error::NOENT) => Listing::Skip,
        Err(e) if added == 0 => Listing::Fail(e),
        Err(_) => Listing::Stop,
    }
}

/// Runs `f` on the calling thread (a FUSE thread) as far as it goes without waiting, and hands
/// it to the runtime `rt` only if it must wait: a read of cells in the page cache is answered
/// there, without waking another thread and being woken back. A future moved to the runtime
/// after a first poll is polled again at once there, with the runtime's waker, so nothing it
/// waits for is missed.
fn run_or_spawn<F>(rt: &tokio::runtime::Handle, f: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let _runtime = rt.enter();
    let mut f = Box::pin(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if f.as_mut().poll(&mut cx).is_pending() {
        rt.spawn(f);
    }
}

fn errno(e: Error) -> FErr {
    if e.0 > 0 {
        FErr::from_i32(e.0)
    } else {
        // Not the leader, no quorum: the caller sees an I/O error.
        FErr::from_i32(5)
    }
}

fn time(n: i64) -> SystemTime {
    if n >= 0 {
        UNIX_EPOCH + Duration::from_nanos(n as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(n.unsigned_abs())
    }
}

fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

impl SealFuse {
    /// The mount of `fs`, its requests run on `rt`.
    pub fn new(fs: Sealfs, rt: tokio::runtime::Handle) -> Self {
        SealFuse {
            open: OpenFiles::new(fs.clone()),
            dirs: Arc::new(Dirs::new(TTL)),
            fs,
            rt,
            next_fh: AtomicU64::new(1),
            told: Arc::default(),
        }
    }

    /// The cluster's inode for the kernel's (the kernel calls the root 1).
    fn ino(&self, i: INodeNo) -> u64 {
        if i.0 == 1 {
            self.fs.root()
        } else {
            i.0
        }
    }

    fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(f);
    }

    /// [`run_or_spawn`] on the mount's runtime.
    fn run_or_spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        run_or_spawn(&self.rt, f)
    }
}

impl Filesystem for SealFuse {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Lookups and readdirs in one folder run side by side (the kernel otherwise takes the
        // folder's lock for each): each is a query of its own here. A kernel without it
        // serializes them, which is slower but right.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS) {
            tracing::debug!("the kernel lacks {missing:?}: lookups in a folder one at a time");
        }
        // Entries with their attributes where the kernel finds it pays (a folder listed and
        // then looked through: `ls -l`, `rm -r`), so that it need not look up each name.
        let plus = fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO;
        if let Err(missing) = config.add_capabilities(plus) {
            tracing::debug!("the kernel lacks {missing:?}: plain readdir only");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (fs, parent, name) = (self.fs.clone(), self.ino(parent), name.as_bytes().to_vec());
        let me = self.clone_view();
        self.spawn(async move {
            match fs.lookup_attr(parent, &name).await {
                Ok(a) => reply.entry(&TTL, &me.attr(&me.open.attr(a)), Generation(0)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (fs, ino) = (self.fs.clone(), self.ino(ino));
        // A file this mount made and holds open (the kernel asks again before a chown, and
        // after every write).
        if let Some((a, left)) = self.open.shown(ino, TTL) {
            return reply.attr(&left, &self.clone_view().attr(&a));
        }
        // A folder this mount just made or removed an entry in (the kernel asks after each).
        if let Some((a, left)) = self.dirs.shown(ino) {
            return reply.attr(&left, &self.clone_view().attr(&a));
        }
        let me = self.clone_view();
        self.spawn(async move {
            match fs.getattr(ino).await {
                Ok(a) => reply.attr(&TTL, &me.attr(&me.open.attr(a))),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (fs, ino) = (self.fs.clone(), self.ino(ino));
        let me = self.clone_view();
        let t = |x: TimeOrNow| match x {
            TimeOrNow::SpecificTime(s) => nanos(s),
            TimeOrNow::Now => sealfs_meta::now_nanos(),
        };
        let set = SetAttr {
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            size,
            atime: atime.map(t),
            mtime: mtime.map(t),
            flags: None,
        };
        self.spawn(async move {
            let change = me.dirs.begin(ino);
            // A new size cuts what is held (what is held below it is sent later). Other
            // attributes of a file with bytes held go with them (an mtime must come after
            // the bytes written before it), in the same command.
            let r = if let Some(size) = set.size {
                me.open.truncate_then(ino, size, fs.setattr(ino, set)).await
            } else {
                me.open.flush_setting(ino, set).await
            };
            me.dirs.end(change, None);
            match r {
                Ok(a) => reply.attr(&TTL, &me.attr(&me.open.attr(a))),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let (fs, ino) = (self.fs.clone(), self.ino(ino));
        self.spawn(async move {
            match fs.readlink(ino).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let k = match mode & 0o170000 {
            0o100000 | 0 => FileKind::File,
            0o010000 => FileKind::Fifo,
            0o140000 => FileKind::Socket,
            0o020000 => FileKind::CharDev,
            0o060000 => FileKind::BlockDev,
            _ => return reply.error(FErr::from_i32(22)),
        };
        self.make(req, parent, name, k, mode & !umask, rdev, b"", reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (fs, parent, name) = (self.fs.clone(), self.ino(parent), name.as_bytes().to_vec());
        let (uid, gid) = (req.uid(), req.gid());
        let me = self.clone_view();
        let perm = ((mode & !umask) & 0o7777) as u16;
        self.spawn(async move {
            let change = me.dirs.begin(parent);
            let r = fs.mkdir_in(parent, &name, perm, uid, gid).await;
            let r = me.ended(change, r.map(|(a, folder)| (a, Some(folder))));
            match r {
                Ok(a) => reply.entry(&TTL, &me.attr(&a), Generation(0)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, parent, name) = (self.fs.clone(), self.ino(parent), name.as_bytes().to_vec());
        let me = self.clone_view();
        self.spawn(async move {
            let r = async {
                me.keep_if_open(&fs, parent, &name).await?;
                fs.unlink_in(parent, &name).await
            };
            let change = me.dirs.begin(parent);
            let r = me.ended(change, r.await.map(|folder| ((), folder)));
            me.open.links_changed();
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, parent, name) = (self.fs.clone(), self.ino(parent), name.as_bytes().to_vec());
        let me = self.clone_view();
        self.spawn(async move {
            let change = me.dirs.begin(parent);
            let r = fs.rmdir_in(parent, &name).await.map(|(gone, folder)| {
                // The folder removed may be one shown here.
                me.dirs.forget(gone);
                ((), folder)
            });
            let r = me.ended(change, r);
            me.open.links_changed();
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let t = target.as_os_str().as_bytes().to_vec();
        self.make(
            req,
            parent,
            link_name,
            FileKind::Symlink,
            0o777,
            0,
            &t,
            reply,
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        let (sp, dp) = (self.ino(parent), self.ino(newparent));
        let (sn, dn) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        let flags = flags.bits();
        let me = self.clone_view();
        self.spawn(async move {
            let r = async {
                // A file replaced by the rename may be open here.
                if flags & sealfs_meta::RENAME_EXCHANGE == 0 {
                    me.keep_if_open(&fs, dp, &dn).await?;
                }
                fs.rename(sp, &sn, dp, &dn, flags).await
            };
            let (from, to) = (me.dirs.begin(sp), me.dirs.begin(dp));
            let r = r.await;
            me.dirs.end(from, None);
            me.dirs.end(to, None);
            me.dirs.forget_all();
            me.open.links_changed();
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (fs, ino, parent) = (self.fs.clone(), self.ino(ino), self.ino(newparent));
        let name = newname.as_bytes().to_vec();
        let me = self.clone_view();
        self.spawn(async move {
            let change = me.dirs.begin(parent);
            let r = fs.link(ino, parent, &name).await;
            me.dirs.end(change, None);
            me.open.links_changed();
            match r {
                Ok(a) => reply.entry(&TTL, &me.attr(&a), Generation(0)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (fs, ino) = (self.fs.clone(), self.ino(ino));
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let me = self.clone_view();
        let trunc = flags.0 & 0o1000 != 0;
        self.spawn(async move {
            // Close-to-open: the attributes are read again at open, and the kernel's copy
            // dropped if it differs.
            let r = async {
                let a = me.open.attr(fs.getattr(ino).await?);
                if a.kind == FileKind::File {
                    me.told.revalidate(&a);
                }
                if trunc && a.size > 0 && a.kind == FileKind::File {
                    let zero = SetAttr {
                        size: Some(0),
                        ..Default::default()
                    };
                    me.open.truncate_then(ino, 0, fs.setattr(ino, zero)).await?;
                }
                Ok::<(), Error>(())
            }
            .await;
            match r {
                Ok(()) => {
                    me.open.opened(ino);
                    reply.opened(FileHandle(fh), FopenFlags::empty())
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let ino = self.ino(ino);
        let me = self.clone_view();
        self.run_or_spawn(async move {
            match me.open.read(ino, offset, size as u64).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let ino = self.ino(ino);
        let n = data.len() as u32;
        match self.open.write(ino, offset, data) {
            Err(e) => reply.error(errno(e)),
            Ok(Held::Done) => reply.written(n),
            Ok(Held::Background) => {
                let open = self.open.clone();
                self.spawn(async move { open.background(ino).await });
                reply.written(n)
            }
            Ok(Held::Wait) => {
                let open = self.open.clone();
                self.spawn(async move {
                    match open.room(ino).await {
                        Ok(()) => reply.written(n),
                        Err(e) => reply.error(errno(e)),
                    }
                });
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let (ino, open) = (self.ino(ino), self.open.clone());
        // Most flushes have nothing held to send (a file only read, or sent already): answered
        // here, without the wake-up of a worker thread (a close of a new empty file took 62-86
        // us handed to the runtime, 36-43 us answered here).
        self.run_or_spawn(async move {
            match open.flush(ino).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let (ino, open) = (self.ino(ino), self.open.clone());
        self.run_or_spawn(async move {
            let r = open.flush(ino).await;
            if let Err(e) = r {
                // close() already reported it (flush comes first); what is held cannot go.
                tracing::warn!("inode {ino:#x}: bytes written and never sent: {e:?}");
                open.discard(ino);
            }
            open.released(ino).await;
            reply.ok()
        });
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Every send syncs its fronds and metadata before it returns: flushing is syncing.
        self.flush(req, ino, fh, LockOwner(0), reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const KEEP_SIZE: i32 = 0x01;
        const PUNCH_HOLE: i32 = 0x02;
        const ZERO_RANGE: i32 = 0x10;
        let (fs, ino) = (self.fs.clone(), self.ino(ino));
        let me = self.clone_view();
        let Some(end) = offset.checked_add(length) else {
            return reply.error(FErr::from_i32(27));
        };
        if mode & !(KEEP_SIZE | PUNCH_HOLE | ZERO_RANGE) != 0
            || (mode & PUNCH_HOLE != 0 && mode & KEEP_SIZE == 0)
        {
            // Collapse and insert range, unshare: not offered.
            return reply.error(FErr::from_i32(95));
        }
        self.spawn(async move {
            let r = async {
                let size = me.open.attr(fs.getattr(ino).await?).size;
                if mode & (PUNCH_HOLE | ZERO_RANGE) != 0 {
                    // Zeros over the range (within the file for a punched hole).
                    let stop = if mode & KEEP_SIZE != 0 {
                        end.min(size)
                    } else {
                        end
                    };
                    let mut at = offset;
                    while at < stop {
                        let n = (stop - at).min(sealfs_client::FROND_BYTES as u64);
                        let zeros = vec![0u8; n as usize];
                        match me.open.write(ino, at, &zeros)? {
                            Held::Done => {}
                            // Marked as running: it must run, or writers waiting for room
                            // would wait for ever.
                            Held::Background => {
                                let open = me.open.clone();
                                tokio::spawn(async move { open.background(ino).await });
                            }
                            Held::Wait => me.open.flush(ino).await?,
                        }
                        at += n;
                    }
                } else if mode & KEEP_SIZE == 0 && end > size {
                    // Space is not reserved ahead (fronds are appended when written): the
                    // file grows, and reads of the new part give zeros.
                    let grow = SetAttr {
                        size: Some(end),
                        ..Default::default()
                    };
                    me.open
                        .truncate_then(ino, end, fs.setattr(ino, grow))
                        .await?;
                }
                Ok::<(), Error>(())
            }
            .await;
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        const SEEK_DATA: i32 = 3;
        const SEEK_HOLE: i32 = 4;
        let (ino, open) = (self.ino(ino), self.open.clone());
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(errno(Error::NXIO));
        };
        if whence != SEEK_DATA && whence != SEEK_HOLE {
            // The kernel answers the others itself.
            return reply.error(errno(Error::INVAL));
        }
        self.spawn(async move {
            match open.seek(ino, offset, whence == SEEK_HOLE).await {
                Ok(at) => reply.offset(at as i64),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let (from, to, open) = (self.ino(ino_in), self.ino(ino_out), self.open.clone());
        // The reply counts in 32 bits: at most 1 GiB per call (the caller asks again).
        let len = len.min(1 << 30);
        self.spawn(async move {
            match open.copy(from, offset_in, to, offset_out, len).await {
                Ok(n) => reply.written(n as u32),
                // Too many extents or zeros to share: the kernel copies the bytes itself.
                Err(Error::FBIG) => reply.error(errno(Error::OPNOTSUPP)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (fs, dir) = (self.fs.clone(), self.ino(ino));
        let root = self.fs.root();
        self.spawn(async move {
            // Offsets 1 and 2 are `.` and `..`; entries continue from their cookies + 2.
            if offset == 0 && reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            if offset <= 1 && reply.add(ino, 2, FileType::Directory, "..") {
                return reply.ok();
            }
            let after = offset.saturating_sub(2);
            match fs.readdir(dir, after, 256).await {
                Ok(list) => {
                    for e in list {
                        let i = if e.ino == root { 1 } else { e.ino };
                        if reply.add(
                            INodeNo(i),
                            e.cookie + 2,
                            kind(e.kind),
                            OsStr::from_bytes(&e.name),
                        ) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (fs, dir) = (self.fs.clone(), self.ino(ino));
        let me = self.clone_view();
        self.spawn(async move {
            // As readdir. The kernel takes no attributes from `.` and `..`: theirs are a
            // placeholder.
            let here = FileAttr {
                ino,
                size: 0,
                blocks: 0,
                atime: UNIX_EPOCH,
                mtime: UNIX_EPOCH,
                ctime: UNIX_EPOCH,
                crtime: UNIX_EPOCH,
                kind: FileType::Directory,
                perm: 0o755,
                nlink: 2,
                uid: 0,
                gid: 0,
                rdev: 0,
                blksize: 1 << 20,
                flags: 0,
            };
            if offset == 0 && reply.add(ino, 1, ".", &TTL, &here, Generation(0)) {
                return reply.ok();
            }
            if offset <= 1 && reply.add(ino, 2, "..", &TTL, &here, Generation(0)) {
                return reply.ok();
            }
            let after = offset.saturating_sub(2);
            let list = match fs.readdir_plus(dir, after, 256).await {
                Ok(list) => list,
                Err(e) => return reply.error(errno(e)),
            };
            // Entries in this reply: `.` and `..` above.
            let mut added = 2 - offset.min(2) as usize;
            // The attributes the partition did not give (folders') are asked for 16 at a
            // time, and only as long as the kernel's buffer takes entries.
            for chunk in list.chunks(16) {
                let got = futures::future::join_all(chunk.iter().map(|(e, a)| {
                    let fs = fs.clone();
                    async move {
                        match a {
                            Some(a) => Ok(a.clone()),
                            None => fs.getattr(e.ino).await,
                        }
                    }
                }))
                .await;
                for ((e, _), a) in chunk.iter().zip(got) {
                    let (a, ttl) = match listing(a, added) {
                        Listing::Add(a) => me.listed(a),
                        Listing::Skip => continue,
                        Listing::Fail(err) => return reply.error(errno(err)),
                        Listing::Stop => return reply.ok(),
                    };
                    let attr = me.attr(&a);
                    if reply.add(
                        attr.ino,
                        e.cookie + 2,
                        OsStr::from_bytes(&e.name),
                        &ttl,
                        &attr,
                        Generation(0),
                    ) {
                        return reply.ok();
                    }
                    added += 1;
                }
            }
            reply.ok()
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.statfs().await {
                Ok(s) => {
                    let b = 4096u64;
                    reply.statfs(
                        s.capacity / b,
                        s.free / b,
                        s.free / b,
                        s.inodes + (1 << 32),
                        1 << 32,
                        b as u32,
                        255,
                        b as u32,
                    )
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let (fs, ino) = (self.fs.clone(), self.ino(ino));
        let (name, value) = (name.as_bytes().to_vec(), value.to_vec());
        self.open.xattrs_changed(ino);
        let change = self.dirs.begin(ino);
        let dirs = self.dirs.clone();
        self.spawn(async move {
            let r = fs.setxattr(ino, &name, &value, flags as u32).await;
            dirs.end(change, None);
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let (fs, ino, name) = (self.fs.clone(), self.ino(ino), name.as_bytes().to_vec());
        if self.open.xattr_absent(ino, &name) {
            return reply.error(errno(Error::NODATA));
        }
        let open = self.open.clone();
        self.spawn(async move {
            match fs.getxattr(ino, &name).await {
                Ok(v) if size == 0 => reply.size(v.len() as u32),
                Ok(v) if v.len() > size as usize => reply.error(FErr::from_i32(34)),
                Ok(v) => reply.data(&v),
                Err(e) => {
                    if e == Error::NODATA {
                        open.found_absent(ino, &name);
                    }
                    reply.error(errno(e))
                }
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let (fs, ino) = (self.fs.clone(), self.ino(ino));
        self.spawn(async move {
            match fs.listxattr(ino).await {
                Ok(names) => {
                    let mut v = Vec::new();
                    for n in names {
                        v.extend_from_slice(&n);
                        v.push(0);
                    }
                    if size == 0 {
                        reply.size(v.len() as u32)
                    } else if v.len() > size as usize {
                        reply.error(FErr::from_i32(34))
                    } else {
                        reply.data(&v)
                    }
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, ino, name) = (self.fs.clone(), self.ino(ino), name.as_bytes().to_vec());
        self.open.xattrs_changed(ino);
        let change = self.dirs.begin(ino);
        let dirs = self.dirs.clone();
        self.spawn(async move {
            let r = fs.removexattr(ino, &name).await;
            dirs.end(change, None);
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (fs, parent, name) = (self.fs.clone(), self.ino(parent), name.as_bytes().to_vec());
        let (uid, gid) = (req.uid(), req.gid());
        let perm = ((mode & !umask) & 0o7777) as u16;
        let exclusive = flags & 0o200 != 0;
        let trunc = flags & 0o1000 != 0;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let me = self.clone_view();
        self.spawn(async move {
            let change = me.dirs.begin(parent);
            let made = fs
                .create_in(
                    parent,
                    &name,
                    &NewFile {
                        perm,
                        uid,
                        gid,
                        exclusive,
                        ..NewFile::file(0)
                    },
                )
                .await;
            let made = me.ended(change, made);
            let r = async {
                let mut a = made?;
                if trunc && me.open.attr(a.clone()).size > 0 {
                    let zero = SetAttr {
                        size: Some(0),
                        ..Default::default()
                    };
                    a = me
                        .open
                        .truncate_then(a.ino, 0, fs.setattr(a.ino, zero))
                        .await?;
                }
                Ok::<Attr, Error>(a)
            }
            .await;
            match r {
                Ok(a) => {
                    me.open.opened(a.ino);
                    me.open.known(&a);
                    if exclusive {
                        // O_EXCL: the file is new, so it has no xattr (another create may
                        // have returned a file that was there).
                        me.open.made(a.ino);
                    }
                    reply.created(
                        &TTL,
                        &me.attr(&a),
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    )
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }
}

impl SealFuse {
    /// A handle on the same state for a request's task.
    fn clone_view(&self) -> View {
        View {
            root: self.fs.root(),
            open: self.open.clone(),
            dirs: self.dirs.clone(),
            told: self.told.clone(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        k: FileKind,
        mode: u32,
        rdev: u32,
        target: &[u8],
        reply: ReplyEntry,
    ) {
        let (fs, parent, name) = (self.fs.clone(), self.ino(parent), name.as_bytes().to_vec());
        let (uid, gid) = (req.uid(), req.gid());
        let target = target.to_vec();
        let me = self.clone_view();
        self.spawn(async move {
            let change = me.dirs.begin(parent);
            let r = fs
                .create_in(
                    parent,
                    &name,
                    &NewFile {
                        kind: k,
                        perm: (mode & 0o7777) as u16,
                        uid,
                        gid,
                        rdev,
                        target: &target,
                        exclusive: true,
                    },
                )
                .await;
            match me.ended(change, r) {
                Ok(a) => reply.entry(&TTL, &me.attr(&a), Generation(0)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }
}

/// What a request's task needs of the mount.
struct View {
    root: u64,
    open: OpenFiles,
    dirs: Arc<Dirs>,
    told: Arc<Told>,
}

impl View {
    /// The attributes and TTL a listing gives for an entry: what this mount holds for an open
    /// file laid over (as a lookup shows it); for a folder this mount is changing, a TTL of
    /// zero (the partition's answer may predate the change), or the attributes the change
    /// left.
    fn listed(&self, a: Attr) -> (Attr, Duration) {
        if a.kind != FileKind::Dir {
            return (self.open.attr(a), TTL);
        }
        if let Some(shown) = self.dirs.shown(a.ino) {
            return shown;
        }
        let ttl = if self.dirs.changing(a.ino) {
            Duration::ZERO
        } else {
            TTL
        };
        (a, ttl)
    }

    /// Ends a change of a folder with the folder's attributes its reply gave, if any, and
    /// gives the rest of the reply.
    fn ended<T>(&self, change: Change, r: Result<(T, Option<Attr>), Error>) -> Result<T, Error> {
        match r {
            Ok((t, folder)) => {
                self.dirs.end(change, folder);
                Ok(t)
            }
            Err(e) => {
                self.dirs.end(change, None);
                Err(e)
            }
        }
    }

    /// Asks the cluster to keep the file `name` in `parent` past its last link if this mount
    /// has it open (POSIX: an unlinked file lives on until it is closed).
    async fn keep_if_open(&self, fs: &Sealfs, parent: u64, name: &[u8]) -> Result<(), Error> {
        if !self.open.any_open() {
            return Ok(());
        }
        match fs.lookup(parent, name).await {
            Ok((ino, FileKind::File)) if self.open.is_open(ino) => self.open.keep(ino).await,
            Ok(_) | Err(Error::NOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        self.told.record(a);
        let ino = if a.ino == self.root { 1 } else { a.ino };
        FileAttr {
            ino: INodeNo(ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: time(a.atime),
            mtime: time(a.mtime),
            ctime: time(a.ctime),
            crtime: time(a.crtime),
            kind: kind(a.kind),
            perm: a.perm,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: 1 << 20,
            flags: a.flags,
        }
    }
}

/// Mounts volume `fs` at `mountpoint` until it is unmounted or the returned session dropped.
pub fn mount(
    fs: Sealfs,
    rt: tokio::runtime::Handle,
    mountpoint: &Path,
) -> std::io::Result<fuser::BackgroundSession> {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName("sealfs".into()),
        fuser::MountOption::Subtype("sealfs".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(4);
    let fuse = SealFuse::new(fs, rt);
    let told = fuse.told.clone();
    let session = fuser::Session::new(fuse, mountpoint, &cfg)?;
    // Set before the session runs: no request is answered before it is there.
    let _ = told.notifier.set(session.notifier());
    session.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder() -> Attr {
        crate::dirs::tests::dir(42, 0)
    }

    /// A future that needs no wait ends on the calling thread; one that waits (on another
    /// task, a timer, the blocking pool) ends on the runtime, woken as usual.
    #[test]
    fn futures_run_here_until_they_must_wait_and_then_on_the_runtime() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let here = std::thread::current().id();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = tx.clone();
        run_or_spawn(rt.handle(), async move {
            t.send(("ready", std::thread::current().id()))
                .expect("send");
        });
        assert_eq!(rx.try_recv().expect("done at once"), ("ready", here));

        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let t = tx.clone();
        run_or_spawn(rt.handle(), async move {
            wait.await.expect("signal");
            tokio::time::sleep(Duration::from_millis(20)).await;
            let v = tokio::task::spawn_blocking(|| 7).await.expect("blocking");
            assert_eq!(v, 7);
            t.send(("waited", std::thread::current().id()))
                .expect("send");
        });
        assert!(rx.try_recv().is_err(), "it waits for the signal");
        rt.spawn(async move { go.send(()).expect("waiting") });
        let (what, on) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("woken on the runtime");
        assert_eq!(what, "waited");
        assert_ne!(on, here);
    }

    /// What the kernel was told of a file is kept until an open finds it changed, and for at
    /// most TOLD_MAX files: past that it starts over (an open then finds nothing told, and
    /// the kernel is made to ask again).
    #[test]
    fn what_the_kernel_was_told_is_compared_at_open_and_bounded() {
        let told = Told::default();
        let mut a = crate::dirs::tests::dir(7, 0);
        a.kind = FileKind::File;
        a.size = 4;
        assert!(told.stale(&a), "nothing told yet");
        told.record(&a);
        assert!(!told.stale(&a), "the same attributes");
        let mut grown = a.clone();
        grown.size = 10;
        assert!(told.stale(&grown), "grown elsewhere");
        assert!(told.stale(&a), "forgotten once found stale");
        // Folders are not kept: an open of one is an opendir.
        told.record(&crate::dirs::tests::dir(8, 0));
        assert!(told.files().is_empty());
        for ino in 0..TOLD_MAX as u64 + 10 {
            let mut f = a.clone();
            f.ino = 100 + ino;
            told.record(&f);
        }
        assert!(told.files().len() <= TOLD_MAX);
        // Without a notifier (no mount), revalidating a file found changed only forgets it.
        told.record(&grown);
        told.revalidate(&a);
        assert!(told.stale(&grown));
    }

    /// A folder whose attributes cannot be had: in the reply's first place the call fails
    /// with the error, later the reply ends before it (the next call starts there); a folder
    /// removed meanwhile is left out, wherever it is.
    #[test]
    fn readdirplus_lists_what_it_can_and_fails_only_on_its_first_entry() {
        assert_eq!(listing(Ok(folder()), 0), Listing::Add(folder()));
        assert_eq!(listing(Ok(folder()), 7), Listing::Add(folder()));
        assert_eq!(listing(Err(Error::NOENT), 0), Listing::Skip);
        assert_eq!(listing(Err(Error::NOENT), 3), Listing::Skip);
        assert_eq!(listing(Err(Error::IO), 0), Listing::Fail(Error::IO));
        assert_eq!(listing(Err(Error::IO), 1), Listing::Stop);
        assert_eq!(listing(Err(Error::ACCES), 5), Listing::Stop);
    }
}
