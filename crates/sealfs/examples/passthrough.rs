//! The FUSE floor for the benchmarks: a minimal pass-through file system that serves a local
//! folder through FUSE with the same `fuser` settings as the sealfs mount (4 kernel threads,
//! default_permissions, 1 s caches), so that `bench/compare` can show what FUSE alone costs.
//!
//! `passthrough SOURCE MOUNTPOINT` runs until SIGTERM or Ctrl-C, then unmounts. Not a
//! product: it serves what the benchmarks do (files, folders, reads, writes, fsync, stat,
//! readdir, rename, unlink) and answers ENOSYS to the rest.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const TTL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Tables {
    /// Our inode -> its path under the source; the source's inode -> ours.
    paths: HashMap<u64, PathBuf>,
    by_source: HashMap<u64, u64>,
    next: u64,
}

struct Passthrough {
    tables: Mutex<Tables>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    next_fh: AtomicU64,
}

fn err(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(5))
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    };
    FileAttr {
        ino: INodeNo(ino),
        size: m.len(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: time(m.ctime(), m.ctime_nsec()),
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

impl Passthrough {
    fn new(source: PathBuf) -> Self {
        let mut t = Tables {
            next: 2,
            ..Default::default()
        };
        t.paths.insert(1, source);
        Passthrough {
            tables: Mutex::new(t),
            files: Mutex::default(),
            next_fh: AtomicU64::new(1),
        }
    }

    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        let t = self.tables.lock().expect("tables");
        t.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    /// Our inode for `path` (whose metadata is `m`), made on first sight.
    fn remember(&self, path: PathBuf, m: &std::fs::Metadata) -> u64 {
        let mut t = self.tables.lock().expect("tables");
        if let Some(&i) = t.by_source.get(&m.ino()) {
            t.paths.insert(i, path);
            return i;
        }
        let i = t.next;
        t.next += 1;
        t.by_source.insert(m.ino(), i);
        t.paths.insert(i, path);
        i
    }

    fn entry(&self, path: PathBuf) -> Result<FileAttr, Errno> {
        let m = std::fs::symlink_metadata(&path).map_err(err)?;
        let i = self.remember(path, &m);
        Ok(attr(i, &m))
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        let f = self.files.lock().expect("files");
        f.get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn add_file(&self, f: File) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().expect("files").insert(fh, Arc::new(f));
        FileHandle(fh)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }
}

impl Filesystem for Passthrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|p| self.entry(p)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self
            .path(ino)
            .and_then(|p| std::fs::symlink_metadata(p).map_err(err));
        match r {
            Ok(m) => reply.attr(&TTL, &attr(ino.0, &m)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| {
            let p = self.path(ino)?;
            if let Some(m) = mode {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m & 0o7777))
                    .map_err(err)?;
            }
            if let Some(s) = size {
                OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|f| f.set_len(s))
                    .map_err(err)?;
            }
            if atime.is_some() || mtime.is_some() {
                let t = |x: Option<TimeOrNow>| match x {
                    Some(TimeOrNow::SpecificTime(t)) => Some(t),
                    Some(TimeOrNow::Now) => Some(SystemTime::now()),
                    None => None,
                };
                let f = File::open(&p).map_err(err)?;
                let mut times = std::fs::FileTimes::new();
                if let Some(a) = t(atime) {
                    times = times.set_accessed(a);
                }
                if let Some(m) = t(mtime) {
                    times = times.set_modified(m);
                }
                f.set_times(times).map_err(err)?;
            }
            std::fs::symlink_metadata(&p).map_err(err)
        })();
        match r {
            Ok(m) => reply.attr(&TTL, &attr(ino.0, &m)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.child(parent, name).and_then(|p| {
            std::fs::create_dir(&p).map_err(err)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & !umask & 0o7777))
                .map_err(err)?;
            self.entry(p)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .child(parent, name)
            .and_then(|p| std::fs::remove_file(p).map_err(err))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .child(parent, name)
            .and_then(|p| std::fs::remove_dir(p).map_err(err))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.child(parent, link_name).and_then(|p| {
            std::os::unix::fs::symlink(target, &p).map_err(err)?;
            self.entry(p)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        use std::os::unix::ffi::OsStrExt;
        match self
            .path(ino)
            .and_then(|p| std::fs::read_link(p).map_err(err))
        {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
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
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let r = (|| {
            let (from, to) = (self.child(parent, name)?, self.child(newparent, newname)?);
            std::fs::rename(&from, &to).map_err(err)?;
            self.entry(to).map(|_| ())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let acc = flags.0 & libc_o::ACCMODE;
        let r = self.path(ino).and_then(|p| {
            OpenOptions::new()
                .read(acc != libc_o::WRONLY)
                .write(acc != libc_o::RDONLY)
                .custom_flags(flags.0 & libc_o::TRUNC)
                .open(p)
                .map_err(err)
        });
        match r {
            Ok(f) => reply.opened(self.add_file(f), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.child(parent, name).and_then(|p| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(flags & libc_o::TRUNC != 0)
                .custom_flags(flags & libc_o::EXCL)
                .mode(mode & !umask & 0o7777)
                .open(&p)
                .map_err(err)?;
            Ok((self.entry(p)?, f))
        });
        match r {
            Ok((a, f)) => reply.created(
                &TTL,
                &a,
                Generation(0),
                self.add_file(f),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.file(fh).and_then(|f| {
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match f.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) => return Err(err(e)),
                }
            }
            buf.truncate(got);
            Ok(buf)
        });
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self
            .file(fh)
            .and_then(|f| f.write_all_at(data, offset).map_err(err))
        {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.file(fh).and_then(|f| {
            if datasync {
                f.sync_data().map_err(err)
            } else {
                f.sync_all().map_err(err)
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.lock().expect("files").remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.path(ino).and_then(|p| {
            let mut v: Vec<(PathBuf, std::fs::Metadata)> = Vec::new();
            for e in std::fs::read_dir(&p).map_err(err)? {
                let e = e.map_err(err)?;
                let m = e.metadata().map_err(err)?;
                v.push((e.path(), m));
            }
            v.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(v)
        });
        let list = match r {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (i, (path, m)) in list.into_iter().enumerate().skip(offset as usize) {
            let name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
            let child = self.remember(path, &m);
            let kind = attr(child, &m).kind;
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self
            .path(INodeNo(1))
            .and_then(|p| rustix::fs::statvfs(&p).map_err(|e| Errno::from_i32(e.raw_os_error())))
        {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }
}

/// The open(2) flags used here (Linux values).
mod libc_o {
    pub const ACCMODE: i32 = 0o3;
    pub const RDONLY: i32 = 0o0;
    pub const WRONLY: i32 = 0o1;
    pub const TRUNC: i32 = 0o1000;
    pub const EXCL: i32 = 0o200;
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let [_, source, mountpoint] = args.as_slice() else {
        return Err("usage: passthrough SOURCE MOUNTPOINT".into());
    };
    let source = std::fs::canonicalize(source).map_err(|e| format!("{source}: {e}"))?;
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName("passthrough".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(4);
    let session = fuser::spawn_mount(Passthrough::new(source), mountpoint, &cfg)
        .map_err(|e| format!("mount {mountpoint}: {e}"))?;
    println!("passthrough mounted at {mountpoint}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<(), String>(())
    })?;
    session
        .umount_and_join()
        .map_err(|e| format!("unmount: {e}"))
}
