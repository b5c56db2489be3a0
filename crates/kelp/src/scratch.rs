//! The scratch area of a disk: an append-only log of cell copies taken by `prepare` before an
//! update overwrites a cell. A record is just the old cell (it names its blade, stipe and shard).
//! Records are dropped in memory on `release`; a log whose records are all dropped is truncated
//! (the current one, once large) or deleted (an older one). After a crash every valid record is
//! taken as pending; recovery resolves the stipe and releases it.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::cell::{check_cell, read_header, seq_cmp, CellCheck, CELL_BYTES};
use crate::error::{KelpError, Result};
use crate::store::ShardKey;
use crate::sync::DiskSyncer;

/// Source of ids for files the syncer tracks.
pub(crate) static FILE_IDS: AtomicU64 = AtomicU64::new(1);

struct Log {
    file: Arc<File>,
    path: PathBuf,
    id: u64,
    len: u64,
    pending: usize,
}

/// The scratch log of one disk.
pub struct Scratch {
    dir: PathBuf,
    logs: BTreeMap<u64, Log>,
    current: u64,
    pending: HashMap<(ShardKey, u32), (u64, u64, u32)>,
    log_bytes_max: u64,
}

fn open_log(dir: &std::path::Path, n: u64) -> Result<Log> {
    let path = dir.join(format!("scratch.{n}.log"));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| KelpError::io(format!("open {}", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| KelpError::io(format!("stat {}", path.display()), e))?
        .len();
    Ok(Log {
        file: Arc::new(file),
        path,
        id: FILE_IDS.fetch_add(1, Ordering::Relaxed),
        len,
        pending: 0,
    })
}

impl Scratch {
    /// Opens the scratch folder, loading the records a crash left pending.
    pub fn open(dir: PathBuf, log_bytes_max: u64) -> Result<Self> {
        let mut numbers = Vec::new();
        let rd =
            fs::read_dir(&dir).map_err(|e| KelpError::io(format!("list {}", dir.display()), e))?;
        for entry in rd.filter_map(|e| e.ok()) {
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_prefix("scratch."))
                .and_then(|s| s.strip_suffix(".log"))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            numbers.push(n);
        }
        numbers.sort_unstable();
        let mut s = Scratch {
            dir,
            logs: BTreeMap::new(),
            current: numbers.last().map_or(0, |n| n + 1),
            pending: HashMap::new(),
            log_bytes_max,
        };
        for n in numbers {
            let log = open_log(&s.dir, n)?;
            let records = log.len / CELL_BYTES as u64;
            let mut buf = vec![0u8; CELL_BYTES];
            for r in 0..records {
                let off = r * CELL_BYTES as u64;
                log.file
                    .read_exact_at(&mut buf, off)
                    .map_err(|e| KelpError::io(format!("read {}", log.path.display()), e))?;
                let (id, _, _) = read_header(&buf);
                if let CellCheck::Valid { seq } = check_cell(&buf, id) {
                    let key = ShardKey {
                        blade: id.blade,
                        shard: id.shard,
                    };
                    s.pending.insert((key, id.stipe), (n, off, seq));
                }
            }
            s.logs.insert(n, log);
        }
        for &(n, _, _) in s.pending.values() {
            if let Some(log) = s.logs.get_mut(&n) {
                log.pending += 1;
            }
        }
        let empty: Vec<u64> = s
            .logs
            .iter()
            .filter(|(_, l)| l.pending == 0)
            .map(|(n, _)| *n)
            .collect();
        for n in empty {
            if let Some(log) = s.logs.remove(&n) {
                let _ = fs::remove_file(&log.path);
            }
        }
        let current = s.current;
        s.logs.insert(current, open_log(&s.dir, current)?);
        Ok(s)
    }

    /// Appends a copy of `cell` (valid, of `key` at `stipe`); returns the log file to sync when
    /// the copy must be durable.
    pub fn save(
        &mut self,
        key: ShardKey,
        stipe: u32,
        cell: &[u8],
        syncer: &DiskSyncer,
    ) -> Result<()> {
        assert_eq!(cell.len(), CELL_BYTES);
        if self.logs[&self.current].len >= self.log_bytes_max {
            self.current += 1;
            let log = open_log(&self.dir, self.current)?;
            self.logs.insert(self.current, log);
        }
        let n = self.current;
        let log = self.logs.get_mut(&n).expect("current log is open");
        let off = log.len;
        log.file
            .write_all_at(cell, off)
            .map_err(|e| KelpError::io(format!("write {}", log.path.display()), e))?;
        log.len += CELL_BYTES as u64;
        log.pending += 1;
        syncer.mark_dirty(log.id, &log.file, || log.path.display().to_string());
        let (_, _, seq) = read_header(cell);
        if let Some(old) = self.pending.insert((key, stipe), (n, off, seq)) {
            self.forget(old.0)?;
        }
        Ok(())
    }

    /// The scratch copy of (`key`, `stipe`), if one is pending.
    pub fn get(&self, key: ShardKey, stipe: u32) -> Result<Option<Bytes>> {
        let Some(&(n, off, _)) = self.pending.get(&(key, stipe)) else {
            return Ok(None);
        };
        let log = &self.logs[&n];
        let mut buf = BytesMut::zeroed(CELL_BYTES);
        log.file
            .read_exact_at(&mut buf, off)
            .map_err(|e| KelpError::io(format!("read {}", log.path.display()), e))?;
        Ok(Some(buf.freeze()))
    }

    /// The stipes of `key` with a pending scratch copy.
    pub fn stipes_of(&self, key: ShardKey) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .pending
            .keys()
            .filter(|(k, _)| *k == key)
            .map(|(_, s)| *s)
            .collect();
        v.sort_unstable();
        v
    }

    /// Drops the scratch copy of (`key`, `stipe`) if its sequence is not newer than `upto`.
    pub fn release(&mut self, key: ShardKey, stipe: u32, upto: u32) -> Result<()> {
        match self.pending.get(&(key, stipe)) {
            Some(&(n, _, seq)) if seq_cmp(seq, upto) != std::cmp::Ordering::Greater => {
                self.pending.remove(&(key, stipe));
                self.forget(n)
            }
            _ => Ok(()),
        }
    }

    /// Pending records in all logs (for tests and status).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn forget(&mut self, n: u64) -> Result<()> {
        let current = self.current;
        let log = self.logs.get_mut(&n).expect("pending record's log is open");
        log.pending -= 1;
        if log.pending > 0 {
            return Ok(());
        }
        if n != current {
            let log = self.logs.remove(&n).expect("log present");
            fs::remove_file(&log.path)
                .map_err(|e| KelpError::io(format!("remove {}", log.path.display()), e))?;
        } else if log.len >= (1 << 20) {
            log.file
                .set_len(0)
                .map_err(|e| KelpError::io(format!("truncate {}", log.path.display()), e))?;
            log.len = 0;
        }
        Ok(())
    }
}
