//! `sealfs bench`: IO500-style phases against any directory, a sealfs mount or any other file
//! system, so that the same command measures both sides of a comparison.
//!
//! - bandwidth: sequential write then read by N streams, 1 MiB and 47,008-byte transfers, a
//!   file per stream and one shared file; every written file is fsynced before the clock stops,
//!   and the caches are dropped (as root) before it is read;
//! - IOPS: 4 KiB writes at random offsets of one file by N streams (fsync at the end), then
//!   4 KiB reads at random offsets after the caches are dropped;
//! - metadata: create, stat, readdir and unlink of empty files by N streams, each in a folder
//!   of its own, then all in one shared folder;
//! - small files: 16 KiB files written and fsynced one by one by N streams.
//!
//! It prints a table and can write the same figures as JSON. Given a PID it samples that
//! process's resident memory all along and reports the peak (and fails past a bound).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::parse_size;

/// Transfer sizes of the bandwidth phases: 1 MiB, and IO500's unaligned 47,008 bytes.
const TRANSFERS: [u64; 2] = [1 << 20, 47_008];
/// The IOPS phases' block.
const BLOCK_BYTES: u64 = 4096;
/// The small-file phase's file size.
const SMALL_BYTES: usize = 16 << 10;
/// Streams at most (threads of one phase).
const STREAMS_MAX: usize = 256;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The directory to measure in: a folder `sealfs-bench` is made in it and removed after.
    pub dir: PathBuf,
    /// Parallel streams (threads) in every phase.
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Bytes written, then read, by each bandwidth phase over all streams (K, M, G suffixes).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Bytes of the file the IOPS phases work in.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub iops_size: u64,
    /// Seconds each IOPS phase runs.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Empty files per stream in each metadata phase.
    #[arg(long, default_value_t = 2000)]
    pub files: usize,
    /// 16 KiB files per stream in the small-file phase.
    #[arg(long, default_value_t = 200)]
    pub small_files: usize,
    /// The phases to run, comma separated: bandwidth, iops, metadata, small.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "bandwidth,iops,metadata,small"
    )]
    pub phases: Vec<String>,
    /// Only the 1 MiB, file-per-stream bandwidth workloads (the quick form).
    #[arg(long)]
    pub easy: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A name for the file system measured, carried into the JSON.
    #[arg(long, default_value = "")]
    pub label: String,
    /// A process whose resident memory is sampled while the bench runs (a server's PID).
    #[arg(long)]
    pub watch_pid: Option<u32>,
    /// Fail if the watched process's resident memory passes this (K, M, G suffixes).
    #[arg(long, value_parser = parse_size)]
    pub rss_max: Option<u64>,
}

/// One measured workload.
#[derive(serde::Serialize)]
struct Figure {
    phase: &'static str,
    workload: String,
    value: f64,
    unit: &'static str,
    seconds: f64,
}

type R<T> = Result<T, String>;

fn ctx<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// Runs the bench; prints the table (and writes the JSON) when done.
pub fn run(a: BenchArgs) -> R<()> {
    if a.streams == 0 || a.streams > STREAMS_MAX {
        return Err(format!("--streams must be 1 to {STREAMS_MAX}"));
    }
    let known = ["bandwidth", "iops", "metadata", "small"];
    if let Some(p) = a.phases.iter().find(|p| !known.contains(&p.as_str())) {
        return Err(format!(
            "unknown phase {p:?} (phases: {})",
            known.join(", ")
        ));
    }
    if !a.dir.is_dir() {
        return Err(format!("{} is not a folder", a.dir.display()));
    }
    let root = a.dir.join("sealfs-bench");
    if root.exists() {
        fs::remove_dir_all(&root).map_err(ctx(format!("remove {}", root.display())))?;
    }
    fs::create_dir(&root).map_err(ctx(format!("create {}", root.display())))?;
    let watch = a.watch_pid.map(RssWatch::start);
    let mut figures = Vec::new();
    let has = |p: &str| a.phases.iter().any(|x| x == p);
    let result = (|| {
        if has("bandwidth") {
            bandwidth(&a, &root, &mut figures)?;
        }
        if has("iops") {
            iops(&a, &root, &mut figures)?;
        }
        if has("metadata") {
            metadata(&a, &root, &mut figures)?;
        }
        if has("small") {
            small(&a, &root, &mut figures)?;
        }
        Ok::<(), String>(())
    })();
    let _ = fs::remove_dir_all(&root);
    result?;
    let peak = watch.map(RssWatch::stop);
    print_table(&a, &figures, peak);
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "label": a.label,
            "dir": a.dir.display().to_string(),
            "streams": a.streams,
            "figures": figures,
            "watched_rss_peak_bytes": peak,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        fs::write(path, text + "\n").map_err(ctx(format!("write {}", path.display())))?;
    }
    if let (Some(peak), Some(max)) = (peak, a.rss_max) {
        if peak > max {
            return Err(format!(
                "the watched process reached {} MiB resident, over the bound of {} MiB",
                peak >> 20,
                max >> 20
            ));
        }
    }
    Ok(())
}

fn print_table(a: &BenchArgs, figures: &[Figure], peak: Option<u64>) {
    println!(
        "sealfs bench on {} ({} streams)",
        a.dir.display(),
        a.streams
    );
    println!(
        "{:<10} {:<44} {:>14} {:<8}",
        "phase", "workload", "result", "unit"
    );
    for f in figures {
        println!(
            "{:<10} {:<44} {:>14.1} {:<8}",
            f.phase, f.workload, f.value, f.unit
        );
    }
    if let Some(p) = peak {
        println!("watched process: peak resident memory {} MiB", p >> 20);
    }
}

fn progress(what: &str) {
    eprintln!("bench: {what}");
}

/// Writes back and drops the page, dentry and inode caches when this process may (root);
/// says so either way.
fn drop_caches() -> bool {
    rustix::fs::sync();
    match fs::write("/proc/sys/vm/drop_caches", "3") {
        Ok(()) => true,
        Err(_) => {
            progress("cannot drop the caches (not root): reads may come from memory");
            false
        }
    }
}

/// Runs `f(stream)` on `n` threads at once; returns the wall time from the common start to the
/// last finish.
fn parallel<F>(n: usize, f: F) -> R<Duration>
where
    F: Fn(usize) -> R<()> + Sync,
{
    let start = std::sync::Barrier::new(n + 1);
    let t = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (f, start) = (&f, &start);
                s.spawn(move || {
                    start.wait();
                    f(i)
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        let mut first_err = None;
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err("a bench thread panicked".into()));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(t.elapsed()),
        }
    })?;
    Ok(t)
}

/// Bytes that differ per block, so that nothing can dedup or compress them away.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    out
}

fn mbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64().max(1e-9)
}

fn bandwidth(a: &BenchArgs, root: &Path, figures: &mut Vec<Figure>) -> R<()> {
    let dir = root.join("bandwidth");
    fs::create_dir(&dir).map_err(ctx(dir.display()))?;
    let n = a.streams as u64;
    let transfers: &[u64] = if a.easy { &TRANSFERS[..1] } else { &TRANSFERS };
    for &xfer in transfers {
        // Each stream's share, a whole number of transfers.
        let per = (a.size / n / xfer).max(1) * xfer;
        let total = per * n;
        for shared in [false, true] {
            if shared && a.easy {
                continue;
            }
            let layout = if shared {
                "shared file"
            } else {
                "file per stream"
            };
            let name = format!("{} transfers, {layout}", human(xfer));
            let path = |i: usize| {
                if shared {
                    dir.join("shared")
                } else {
                    dir.join(format!("stream{i}"))
                }
            };
            if shared {
                File::create(path(0)).map_err(ctx(path(0).display()))?;
            }
            progress(&format!("write, {name}, {} MiB", total >> 20));
            let buf = pattern(xfer as usize, xfer);
            let t = parallel(a.streams, |i| {
                let p = path(i);
                let f = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(!shared)
                    .open(&p)
                    .map_err(ctx(p.display()))?;
                let base = if shared { i as u64 * per } else { 0 };
                let mut at = 0;
                while at < per {
                    f.write_all_at(&buf, base + at).map_err(ctx(p.display()))?;
                    at += xfer;
                }
                f.sync_all().map_err(ctx(format!("fsync {}", p.display())))
            })?;
            figures.push(Figure {
                phase: "bandwidth",
                workload: format!("write, {name}"),
                value: mbps(total, t),
                unit: "MB/s",
                seconds: t.as_secs_f64(),
            });
            drop_caches();
            progress(&format!("read, {name}"));
            let t = parallel(a.streams, |i| {
                let p = path(i);
                let f = File::open(&p).map_err(ctx(p.display()))?;
                let mut b = vec![0u8; xfer as usize];
                let base = if shared { i as u64 * per } else { 0 };
                let mut at = 0;
                while at < per {
                    f.read_exact_at(&mut b, base + at).map_err(ctx(format!(
                        "read {} at {}",
                        p.display(),
                        base + at
                    )))?;
                    if b != buf {
                        return Err(format!(
                            "{}: the bytes read at {} are not those written",
                            p.display(),
                            base + at
                        ));
                    }
                    at += xfer;
                }
                Ok(())
            })?;
            figures.push(Figure {
                phase: "bandwidth",
                workload: format!("read, {name}"),
                value: mbps(total, t),
                unit: "MB/s",
                seconds: t.as_secs_f64(),
            });
            for i in 0..a.streams {
                let _ = fs::remove_file(path(i));
            }
        }
    }
    Ok(())
}

/// A small, fast random sequence (xorshift) per stream: offsets to visit.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn iops(a: &BenchArgs, root: &Path, figures: &mut Vec<Figure>) -> R<()> {
    let p = root.join("iops");
    let blocks = (a.iops_size / BLOCK_BYTES).max(1);
    progress(&format!(
        "IOPS: laying out a {} MiB file",
        (blocks * BLOCK_BYTES) >> 20
    ));
    {
        let mut f = File::create(&p).map_err(ctx(p.display()))?;
        let chunk = pattern(1 << 20, 7);
        let mut left = blocks * BLOCK_BYTES;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n]).map_err(ctx(p.display()))?;
            left -= n as u64;
        }
        f.sync_all().map_err(ctx(p.display()))?;
    }
    let secs = Duration::from_secs(a.seconds.max(1));
    for write in [true, false] {
        if !write {
            drop_caches();
        }
        // Reads bypass the page cache where the file system allows (O_DIRECT), so that they
        // measure it and not memory; writes are buffered and fsynced at the end.
        let direct = !write && open_direct(&p).is_ok();
        let what = match (write, direct) {
            (true, _) => "4 KiB random write",
            (false, true) => "4 KiB random read (O_DIRECT)",
            (false, false) => "4 KiB random read (buffered)",
        };
        progress(what);
        let ops = AtomicU64::new(0);
        let t = parallel(a.streams, |i| {
            let f = if direct {
                open_direct(&p)
            } else {
                OpenOptions::new().read(true).write(write).open(&p)
            }
            .map_err(ctx(p.display()))?;
            let mut rng = Rng(0x5EA1 + i as u64 * 7919);
            // O_DIRECT wants a buffer aligned to the block.
            let mut space = pattern(2 * BLOCK_BYTES as usize, i as u64 + 3);
            let pad = space.as_ptr().align_offset(BLOCK_BYTES as usize);
            let buf = &mut space[pad..pad + BLOCK_BYTES as usize];
            let start = Instant::now();
            let mut done = 0u64;
            while start.elapsed() < secs {
                let at = rng.below(blocks) * BLOCK_BYTES;
                if write {
                    f.write_all_at(buf, at).map_err(ctx(p.display()))?;
                } else {
                    f.read_exact_at(buf, at).map_err(ctx(p.display()))?;
                }
                done += 1;
            }
            if write {
                f.sync_all().map_err(ctx(p.display()))?;
            }
            ops.fetch_add(done, Ordering::Relaxed);
            Ok(())
        })?;
        let n = ops.load(Ordering::Relaxed);
        figures.push(Figure {
            phase: "iops",
            workload: what.to_string(),
            value: n as f64 / t.as_secs_f64().max(1e-9),
            unit: "IOPS",
            seconds: t.as_secs_f64(),
        });
    }
    let _ = fs::remove_file(&p);
    Ok(())
}

/// Opens `p` to read around the page cache.
fn open_direct(p: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    const O_DIRECT: i32 = 0o40000;
    OpenOptions::new().read(true).custom_flags(O_DIRECT).open(p)
}

fn metadata(a: &BenchArgs, root: &Path, figures: &mut Vec<Figure>) -> R<()> {
    for shared in [false, true] {
        let base = root.join(if shared { "md-shared" } else { "md-own" });
        fs::create_dir(&base).map_err(ctx(base.display()))?;
        let dir = |i: usize| {
            if shared {
                base.clone()
            } else {
                base.join(format!("d{i}"))
            }
        };
        if !shared {
            for i in 0..a.streams {
                fs::create_dir(dir(i)).map_err(ctx(dir(i).display()))?;
            }
        }
        let where_ = if shared {
            "one shared folder"
        } else {
            "a folder per stream"
        };
        let file = |i: usize, j: usize| dir(i).join(format!("s{i}.f{j}"));
        let total = (a.files * a.streams) as f64;
        let mut record = |op: &str, t: Duration, count: f64| {
            figures.push(Figure {
                phase: "metadata",
                workload: format!("{op}, {where_}"),
                value: count / t.as_secs_f64().max(1e-9),
                unit: "ops/s",
                seconds: t.as_secs_f64(),
            });
        };
        progress(&format!("create, {where_}"));
        let t = parallel(a.streams, |i| {
            for j in 0..a.files {
                let p = file(i, j);
                File::create(&p).map_err(ctx(p.display()))?;
            }
            Ok(())
        })?;
        record("create", t, total);
        drop_caches();
        progress(&format!("stat, {where_}"));
        let t = parallel(a.streams, |i| {
            for j in 0..a.files {
                let p = file(i, j);
                let m = fs::metadata(&p).map_err(ctx(p.display()))?;
                if m.len() != 0 {
                    return Err(format!(
                        "{}: size {} after an empty create",
                        p.display(),
                        m.len()
                    ));
                }
            }
            Ok(())
        })?;
        record("stat", t, total);
        progress(&format!("readdir, {where_}"));
        let seen = AtomicU64::new(0);
        let t = parallel(if shared { 1 } else { a.streams }, |i| {
            let d = dir(i);
            let n = fs::read_dir(&d).map_err(ctx(d.display()))?.count();
            seen.fetch_add(n as u64, Ordering::Relaxed);
            Ok(())
        })?;
        let seen = seen.load(Ordering::Relaxed);
        if seen != total as u64 {
            return Err(format!("readdir found {seen} entries, {total} were made"));
        }
        record("readdir (entries)", t, total);
        progress(&format!("unlink, {where_}"));
        let t = parallel(a.streams, |i| {
            for j in 0..a.files {
                let p = file(i, j);
                fs::remove_file(&p).map_err(ctx(p.display()))?;
            }
            Ok(())
        })?;
        record("unlink", t, total);
        let _ = fs::remove_dir_all(&base);
    }
    Ok(())
}

fn small(a: &BenchArgs, root: &Path, figures: &mut Vec<Figure>) -> R<()> {
    let dir = root.join("small");
    fs::create_dir(&dir).map_err(ctx(dir.display()))?;
    progress("16 KiB files, each fsynced");
    let body = pattern(SMALL_BYTES, 16);
    let t = parallel(a.streams, |i| {
        for j in 0..a.small_files {
            let p = dir.join(format!("s{i}.f{j}"));
            let mut f = File::create(&p).map_err(ctx(p.display()))?;
            f.write_all(&body).map_err(ctx(p.display()))?;
            f.sync_all().map_err(ctx(p.display()))?;
        }
        Ok(())
    })?;
    let total = (a.small_files * a.streams) as f64;
    figures.push(Figure {
        phase: "small",
        workload: "16 KiB files written and fsynced".into(),
        value: total / t.as_secs_f64().max(1e-9),
        unit: "files/s",
        seconds: t.as_secs_f64(),
    });
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

fn human(b: u64) -> String {
    if b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else {
        format!("{b} B")
    }
}

/// Samples a process's resident memory every 100 ms on a thread of its own.
struct RssWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

/// The resident bytes of `pid` (VmRSS), if it is running.
fn rss_bytes(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_bytes(pid).unwrap_or(0)));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(b) = rss_bytes(pid) {
                    p.fetch_max(b, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssWatch { stop, peak, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak.load(Ordering::Relaxed)
    }
}
