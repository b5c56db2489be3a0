//! `LocalStore`: the shard store of one server over its local disks (directories).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::cell::{
    aligned_buffer, cell_aligned, check_cell, seq_cmp, CellCheck, CellId, CELL_BYTES,
    STIPE_INDEX_MAX,
};
use crate::error::{KelpError, Result};
use crate::layout::{self, ScanReport};
use crate::scratch::{Scratch, FILE_IDS};
use crate::store::{ShardInfo, ShardKey, ShardStore, WriteMode};
use crate::sync::DiskSyncer;

/// Writes up to this size run on the calling task instead of the blocking pool.
pub const INLINE_WRITE_BYTES_MAX: usize = 64 * 1024;

/// Reads up to this size are first tried on the calling task, from the page cache only.
pub const INLINE_READ_BYTES_MAX: usize = 64 * 1024;

/// Runs of cells at least this long are written by direct IO, past the page cache: a long
/// sequential write then goes at the disk's pace instead of copying every byte into the page
/// cache and flushing it later (which, past the kernel's dirty limit, throttled writes to a
/// fraction of the disk). Shorter runs (updates, the tail of an append) stay buffered.
pub const DIRECT_WRITE_BYTES_MIN: usize = 64 * 1024;

/// Cells one read or write may carry (16 MiB).
pub const CELLS_PER_CALL_MAX: u32 = 4096;

/// Settings of a local store.
#[derive(Clone, Debug)]
pub struct LocalStoreConfig {
    /// Shard files in a fan-out folder before it splits by the next byte.
    pub fanout_files_max: usize,
    /// Size of a scratch log before a new one is started.
    pub scratch_log_bytes_max: u64,
}

impl Default for LocalStoreConfig {
    fn default() -> Self {
        LocalStoreConfig {
            fanout_files_max: 4096,
            scratch_log_bytes_max: 64 << 20,
        }
    }
}

struct Disk {
    root: PathBuf,
    syncer: DiskSyncer,
    scratch: Mutex<Scratch>,
    /// Bytes of cells written to this disk by direct IO.
    direct_bytes: AtomicU64,
}

struct ShardFile {
    disk: usize,
    path: Mutex<PathBuf>,
    file: Arc<File>,
    sync_id: u64,
    /// Cells in the file (rounded up), kept so that writes past the end skip the sequence check.
    cells: AtomicU32,
    /// Serialises the check-then-write of `IfNewer` writes.
    io: Mutex<()>,
    /// The file opened for direct IO (taken only under `io`).
    direct: Mutex<Direct>,
}

/// How a shard file takes long runs of cells.
enum Direct {
    /// Not opened for direct IO yet (at the first long run).
    Untried,
    Open(File),
    /// The file system takes no direct IO with cell alignment: every run goes through the page
    /// cache.
    Refused,
}

impl ShardFile {
    fn path(&self) -> String {
        self.path.lock().expect("path lock").display().to_string()
    }
}

/// The shard files on the local disks of one server. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

impl std::ops::Deref for LocalStore {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// The state behind a `LocalStore`.
pub struct Inner {
    name: String,
    cfg: LocalStoreConfig,
    disks: Vec<Arc<Disk>>,
    shards: Mutex<HashMap<ShardKey, Arc<ShardFile>>>,
    report: ScanReport,
}

fn open_shard_file(path: &Path, create: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(|e| KelpError::io(format!("open {}", path.display()), e))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| KelpError::Stopped(format!("disk task: {e}")))?
}

impl LocalStore {
    /// Opens (creating the layout where missing) the disks and scans them for shard files.
    pub fn open(name: impl Into<String>, disks: &[PathBuf], cfg: LocalStoreConfig) -> Result<Self> {
        if disks.is_empty() {
            return Err(KelpError::invalid("a store needs at least one disk"));
        }
        let mut report = ScanReport::default();
        let mut opened = Vec::new();
        let mut shards: HashMap<ShardKey, Arc<ShardFile>> = HashMap::new();
        for (i, root) in disks.iter().enumerate() {
            layout::prepare_disk(root)?;
            let scratch = Scratch::open(layout::scratch_dir(root), cfg.scratch_log_bytes_max)?;
            opened.push(Arc::new(Disk {
                root: root.clone(),
                syncer: DiskSyncer::default(),
                scratch: Mutex::new(scratch),
                direct_bytes: AtomicU64::new(0),
            }));
            for found in layout::scan_disk(root, &mut report)? {
                if let Some(have) = shards.get(&found.key) {
                    tracing::warn!(
                        "shard file {} found twice: using {}, ignoring {}",
                        found.key,
                        have.path(),
                        found.path.display()
                    );
                    report.duplicates.push(found.path);
                    continue;
                }
                let file = open_shard_file(&found.path, false)?;
                shards.insert(
                    found.key,
                    Arc::new(ShardFile {
                        disk: i,
                        path: Mutex::new(found.path),
                        file: Arc::new(file),
                        sync_id: FILE_IDS.fetch_add(1, Ordering::Relaxed),
                        cells: AtomicU32::new(
                            found.len.div_ceil(CELL_BYTES as u64).min(u32::MAX as u64) as u32,
                        ),
                        io: Mutex::new(()),
                        direct: Mutex::new(Direct::Untried),
                    }),
                );
            }
        }
        Ok(LocalStore {
            inner: Arc::new(Inner {
                name: name.into(),
                cfg,
                disks: opened,
                shards: Mutex::new(shards),
                report,
            }),
        })
    }
}

impl Inner {
    /// What the start-up scan found.
    pub fn scan_report(&self) -> &ScanReport {
        &self.report
    }

    /// The disk directories, by index.
    pub fn disk_paths(&self) -> Vec<PathBuf> {
        self.disks.iter().map(|d| d.root.clone()).collect()
    }

    /// Pending scratch copies over all disks.
    pub fn scratch_pending(&self) -> usize {
        self.disks
            .iter()
            .map(|d| d.scratch.lock().expect("scratch lock").pending())
            .sum()
    }

    /// Bytes of cells this store has written by direct IO, past the page cache.
    pub fn direct_write_bytes(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| d.direct_bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// Where the shard file of `key` is, if the store has it.
    pub fn shard_path(&self, key: ShardKey) -> Option<PathBuf> {
        self.shards
            .lock()
            .expect("shards lock")
            .get(&key)
            .map(|f| f.path.lock().expect("path lock").clone())
    }

    fn get(&self, key: ShardKey) -> Option<Arc<ShardFile>> {
        self.shards.lock().expect("shards lock").get(&key).cloned()
    }

    fn missing(&self, key: ShardKey) -> KelpError {
        KelpError::ShardMissing(key.to_string(), self.name.clone())
    }

    fn get_or_create(&self, key: ShardKey, disk: u32) -> Result<Arc<ShardFile>> {
        let mut shards = self.shards.lock().expect("shards lock");
        if let Some(f) = shards.get(&key) {
            return Ok(f.clone());
        }
        let d = disk as usize;
        if d >= self.disks.len() {
            return Err(KelpError::invalid(format!(
                "store {}: no disk {disk} (it has {})",
                self.name,
                self.disks.len()
            )));
        }
        let mut moved = Vec::new();
        let dir = layout::folder_for_new(
            &self.disks[d].root,
            key.blade,
            self.cfg.fanout_files_max,
            &mut moved,
        )?;
        for (from, to) in moved {
            for f in shards.values() {
                let mut p = f.path.lock().expect("path lock");
                if *p == from {
                    *p = to.clone();
                }
            }
        }
        let path = dir.join(layout::file_name(key));
        let file = open_shard_file(&path, true)?;
        let f = Arc::new(ShardFile {
            disk: d,
            path: Mutex::new(path),
            file: Arc::new(file),
            sync_id: FILE_IDS.fetch_add(1, Ordering::Relaxed),
            cells: AtomicU32::new(0),
            io: Mutex::new(()),
            direct: Mutex::new(Direct::Untried),
        });
        shards.insert(key, f.clone());
        Ok(f)
    }

    /// Fails with `ShardMissing` (and forgets the file) if the shard file was deleted or replaced
    /// while open: writes to it would vanish at the next restart.
    fn check_linked(&self, key: ShardKey, f: &Arc<ShardFile>) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let meta = f
            .file
            .metadata()
            .map_err(|e| KelpError::io(format!("stat {}", f.path()), e))?;
        if meta.nlink() > 0 {
            return Ok(());
        }
        tracing::error!(
            "shard file {} was deleted while in use; it will be rebuilt",
            f.path()
        );
        let mut shards = self.shards.lock().expect("shards lock");
        if shards.get(&key).is_some_and(|cur| Arc::ptr_eq(cur, f)) {
            shards.remove(&key);
        }
        Err(self.missing(key))
    }

    fn read_run(f: &ShardFile, first: u32, count: u32) -> Result<BytesMut> {
        let mut buf = BytesMut::zeroed(count as usize * CELL_BYTES);
        Self::read_rest(f, first, &mut buf, 0)?;
        Ok(buf)
    }

    /// Fills `buf` (cells from stipe `first` on) from byte `done` on; bytes past the end of the
    /// file stay zero (absent cells).
    fn read_rest(f: &ShardFile, first: u32, buf: &mut [u8], mut done: usize) -> Result<()> {
        let base = first as u64 * CELL_BYTES as u64;
        while done < buf.len() {
            match f.file.read_at(&mut buf[done..], base + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(KelpError::io(format!("read {}", f.path()), e)),
            }
        }
        Ok(())
    }

    /// Reads into `buf` (cells from stipe `first` on) what the page cache holds, without
    /// waiting for the disk (`RWF_NOWAIT`), and returns the bytes read: all of them when every
    /// cell is cached. Any error counts as nothing read; the caller reads the rest on the
    /// blocking pool, where an error is reported.
    fn read_cached(f: &ShardFile, first: u32, buf: &mut [u8]) -> usize {
        rustix::io::preadv2(
            &*f.file,
            &mut [std::io::IoSliceMut::new(buf)],
            first as u64 * CELL_BYTES as u64,
            rustix::io::ReadWriteFlags::NOWAIT,
        )
        .unwrap_or(0)
    }

    /// Writes whole cells at `off` (a cell boundary): a long run by direct IO where the file
    /// system takes it, from the buffer itself when it is aligned in memory (as the runs the
    /// holdfast builds are), else from an aligned copy; anything else through the page cache.
    /// Called under the file's `io` lock.
    fn write_run(f: &ShardFile, run: &[u8], off: u64, disk: &Disk) -> std::io::Result<()> {
        if run.len() >= DIRECT_WRITE_BYTES_MIN {
            let mut direct = f.direct.lock().expect("direct lock");
            if let Direct::Untried = *direct {
                *direct = Self::open_direct(f);
            }
            if let Direct::Open(file) = &*direct {
                if cell_aligned(run) {
                    file.write_all_at(run, off)?;
                } else {
                    let mut copy = aligned_buffer(run.len());
                    copy.extend_from_slice(run);
                    file.write_all_at(&copy, off)?;
                }
                disk.direct_bytes
                    .fetch_add(run.len() as u64, Ordering::Relaxed);
                return Ok(());
            }
        }
        f.file.write_all_at(run, off)
    }

    /// Opens the file for direct IO if its file system takes it with buffers, offsets and
    /// lengths aligned to a cell (what it says with `statx`, where it says).
    fn open_direct(f: &ShardFile) -> Direct {
        use std::os::unix::fs::OpenOptionsExt;
        let path = f.path.lock().expect("path lock").clone();
        let opened = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&path);
        let file = match opened {
            Ok(file) => file,
            Err(e) => {
                tracing::info!(
                    "{}: no direct IO ({e}); writing through the page cache",
                    path.display()
                );
                return Direct::Refused;
            }
        };
        // The same file still, not one put in its place since it was opened.
        if !same_file(&file, &f.file) {
            return Direct::Refused;
        }
        use rustix::fs::{statx, AtFlags, StatxFlags};
        if let Ok(st) = statx(&file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
            let fits = |align: u32| align != 0 && CELL_BYTES.is_multiple_of(align as usize);
            if StatxFlags::from_bits_truncate(st.stx_mask).contains(StatxFlags::DIOALIGN)
                && !(fits(st.stx_dio_mem_align) && fits(st.stx_dio_offset_align))
            {
                tracing::info!(
                    "{}: direct IO wants {}-byte buffers and {}-byte offsets; writing through \
                     the page cache",
                    path.display(),
                    st.stx_dio_mem_align,
                    st.stx_dio_offset_align
                );
                return Direct::Refused;
            }
        }
        Direct::Open(file)
    }

    fn write_blocking(
        f: &ShardFile,
        key: ShardKey,
        first: u32,
        cells: &[u8],
        mode: WriteMode,
        disk: &Disk,
    ) -> Result<()> {
        let syncer = &disk.syncer;
        let count = (cells.len() / CELL_BYTES) as u32;
        let _io = f.io.lock().expect("io lock");
        let existing = f.cells.load(Ordering::Acquire);
        let mut keep = vec![true; count as usize];
        if mode != WriteMode::Force && first < existing {
            let overlap = (existing - first).min(count);
            let old = Self::read_run(f, first, overlap)?;
            for (i, (old, new)) in old
                .chunks_exact(CELL_BYTES)
                .zip(cells.chunks_exact(CELL_BYTES))
                .enumerate()
            {
                let id = CellId {
                    blade: key.blade,
                    stipe: first + i as u32,
                    shard: key.shard,
                };
                if let (CellCheck::Valid { seq: old_seq }, Some(new_seq)) =
                    (check_cell(old, id), check_cell(new, id).seq())
                {
                    match seq_cmp(old_seq, new_seq) {
                        std::cmp::Ordering::Greater => keep[i] = false,
                        std::cmp::Ordering::Less if matches!(mode, WriteMode::Update { .. }) => {
                            // The cell about to be overwritten goes to scratch first.
                            disk.scratch
                                .lock()
                                .expect("scratch lock")
                                .save(key, id.stipe, old, syncer)?;
                        }
                        _ => {}
                    }
                }
            }
            if matches!(mode, WriteMode::Update { durable: true }) {
                syncer.sync()?;
            }
        }
        let mut i = 0;
        while i < count as usize {
            if !keep[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < count as usize && keep[i] {
                i += 1;
            }
            let off = (first as u64 + start as u64) * CELL_BYTES as u64;
            Self::write_run(f, &cells[start * CELL_BYTES..i * CELL_BYTES], off, disk)
                .map_err(|e| KelpError::io(format!("write {}", f.path()), e))?;
        }
        f.cells.fetch_max(first + count, Ordering::AcqRel);
        syncer.mark_dirty(f.sync_id, &f.file, || f.path());
        Ok(())
    }
}

fn same_file(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn check_run(key: ShardKey, first: u32, cells: &[u8]) -> Result<u32> {
    if cells.is_empty() || !cells.len().is_multiple_of(CELL_BYTES) {
        return Err(KelpError::invalid(format!(
            "{key}: write of {} bytes is not a whole number of cells",
            cells.len()
        )));
    }
    let count = (cells.len() / CELL_BYTES) as u32;
    if count > CELLS_PER_CALL_MAX || first as u64 + count as u64 > STIPE_INDEX_MAX as u64 + 1 {
        return Err(KelpError::invalid(format!(
            "{key}: write of {count} cells at stipe {first} is out of range"
        )));
    }
    for (i, cell) in cells.chunks_exact(CELL_BYTES).enumerate() {
        let id = CellId {
            blade: key.blade,
            stipe: first + i as u32,
            shard: key.shard,
        };
        if let CellCheck::Invalid(fault) = check_cell(cell, id) {
            return Err(KelpError::invalid(format!(
                "{key}: refusing to write {id}: {fault}"
            )));
        }
    }
    Ok(count)
}

#[async_trait]
impl ShardStore for LocalStore {
    fn name(&self) -> &str {
        &self.name
    }

    async fn write_cells(
        &self,
        key: ShardKey,
        disk: u32,
        first_stipe: u32,
        cells: Bytes,
        mode: WriteMode,
    ) -> Result<()> {
        check_run(key, first_stipe, &cells)?;
        let cells_len = cells.len();
        let this = self.inner.clone();
        let write = move || {
            let f = this.get_or_create(key, disk)?;
            let d = this.disks[f.disk].clone();
            Inner::write_blocking(&f, key, first_stipe, &cells, mode, &d)
        };
        // A small write lands in the page cache in microseconds: a hand-off to the blocking pool
        // would cost more than the write. Larger writes and those that sync go to the pool.
        if cells_len <= INLINE_WRITE_BYTES_MAX
            && !matches!(mode, WriteMode::Update { durable: true })
        {
            write()
        } else {
            blocking(write).await
        }
    }

    async fn read_cells(&self, key: ShardKey, first_stipe: u32, count: u32) -> Result<Bytes> {
        if count == 0 || count > CELLS_PER_CALL_MAX {
            return Err(KelpError::invalid(format!("{key}: read of {count} cells")));
        }
        let f = self.get(key).ok_or_else(|| self.missing(key))?;
        let len = count as usize * CELL_BYTES;
        if len <= INLINE_READ_BYTES_MAX {
            // What the page cache holds is read here; the rest (from where that stopped) on
            // the blocking pool.
            self.inner.check_linked(key, &f)?;
            let mut buf = BytesMut::zeroed(len);
            let done = Inner::read_cached(&f, first_stipe, &mut buf);
            if done == len {
                return Ok(buf.freeze());
            }
            return blocking(move || {
                Inner::read_rest(&f, first_stipe, &mut buf, done)?;
                Ok(buf.freeze())
            })
            .await;
        }
        let this = self.inner.clone();
        blocking(move || {
            this.check_linked(key, &f)?;
            Ok(Inner::read_run(&f, first_stipe, count)?.freeze())
        })
        .await
    }

    async fn prepare(&self, key: ShardKey, stipe: u32, durable: bool) -> Result<()> {
        let Some(f) = self.get(key) else {
            return Ok(()); // nothing on this shard to keep
        };
        let d = self.disks[f.disk].clone();
        blocking(move || {
            let cell = {
                let _io = f.io.lock().expect("io lock");
                Inner::read_run(&f, stipe, 1)?
            };
            let id = CellId {
                blade: key.blade,
                stipe,
                shard: key.shard,
            };
            if let CellCheck::Valid { .. } = check_cell(&cell, id) {
                d.scratch
                    .lock()
                    .expect("scratch lock")
                    .save(key, stipe, &cell, &d.syncer)?;
                if durable {
                    d.syncer.sync()?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn release(&self, key: ShardKey, stipe: u32, upto: u32) -> Result<()> {
        // In memory, but for the rare truncation or removal of a drained scratch log.
        for d in &self.disks {
            d.scratch
                .lock()
                .expect("scratch lock")
                .release(key, stipe, upto)?;
        }
        Ok(())
    }

    async fn abort(&self, key: ShardKey, disk: u32, stipe: u32) -> Result<()> {
        let saved = self.scratch_cell(key, stipe).await?;
        if let Some(cell) = saved {
            let (_, _, seq) = crate::cell::read_header(&cell);
            self.write_cells(key, disk, stipe, cell, WriteMode::Force)
                .await?;
            self.release(key, stipe, seq).await?;
        }
        Ok(())
    }

    async fn scratch(&self, key: ShardKey) -> Result<Vec<Bytes>> {
        let disks = self.disks.clone();
        blocking(move || {
            let mut out = Vec::new();
            for d in &disks {
                let s = d.scratch.lock().expect("scratch lock");
                for stipe in s.stipes_of(key) {
                    out.extend(s.get(key, stipe)?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn sync(&self, key: ShardKey) -> Result<()> {
        let file = self.get(key);
        let disks: Vec<Arc<Disk>> = match &file {
            Some(f) => vec![self.disks[f.disk].clone()],
            None => self.disks.clone(),
        };
        let this = self.inner.clone();
        blocking(move || {
            for d in &disks {
                d.syncer.sync()?;
            }
            // A sync must not report durable what went into a file that is no longer there.
            if let Some(f) = &file {
                this.check_linked(key, f)?;
            }
            Ok(())
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ShardInfo>> {
        let shards = self.shards.lock().expect("shards lock");
        let mut v: Vec<ShardInfo> = shards
            .iter()
            .map(|(key, f)| ShardInfo {
                key: *key,
                disk: f.disk as u32,
                stipes: f.cells.load(Ordering::Acquire),
            })
            .collect();
        v.sort_by_key(|i| i.key);
        Ok(v)
    }

    async fn stipes(&self, key: ShardKey) -> Result<Option<u32>> {
        Ok(self.get(key).map(|f| f.cells.load(Ordering::Acquire)))
    }

    async fn delete(&self, key: ShardKey) -> Result<()> {
        let Some(f) = self.shards.lock().expect("shards lock").remove(&key) else {
            return Ok(());
        };
        let path = f.path.lock().expect("path lock").clone();
        let r = blocking(move || match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(KelpError::io(format!("remove {}", path.display()), e))
            }
            _ => Ok(()),
        })
        .await;
        if r.is_err() {
            // Still on the disk: known again, so that the next delete tries again (and a
            // caller that counts on it being gone hears it is not).
            self.shards.lock().expect("shards lock").insert(key, f);
        }
        r
    }
}

impl LocalStore {
    async fn scratch_cell(&self, key: ShardKey, stipe: u32) -> Result<Option<Bytes>> {
        let disks = self.disks.clone();
        blocking(move || {
            for d in &disks {
                if let Some(c) = d.scratch.lock().expect("scratch lock").get(key, stipe)? {
                    return Ok(Some(c));
                }
            }
            Ok(None)
        })
        .await
    }
}
