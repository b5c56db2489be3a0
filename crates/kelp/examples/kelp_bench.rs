//! kelp benchmarks: Reed-Solomon coding of 4080-byte cells against memcpy, two coders side by
//! side, and holdfast appends into 16 local shard stores against a plain sequential write.
//!
//! cargo run --release -p kelp --example kelp_bench -- [--dir DIR] [--mib N] [--only coding|large|small]
//!     [--write docs/kelp-bench.md]

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kelp::cell::CELL_PAYLOAD_BYTES;
use kelp::stipe::StipeCodec;
use kelp::{
    frond, BladeLayout, Holdfast, HoldfastConfig, LocalStore, LocalStoreConfig, Profile,
    ShardPlacement, ShardStore,
};

const K: usize = 8;
const M: usize = 8;

struct Args {
    dir: PathBuf,
    mib: usize,
    write: Option<PathBuf>,
    only: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        dir: PathBuf::from("target/kelp-bench"),
        mib: 512,
        write: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--dir" => a.dir = it.next().expect("--dir DIR").into(),
            "--mib" => a.mib = it.next().expect("--mib N").parse().expect("a number"),
            "--write" => a.write = Some(it.next().expect("--write FILE").into()),
            "--only" => a.only = Some(it.next().expect("--only coding|large|small")),
            other => panic!("unknown argument {other}; see the file's header"),
        }
    }
    a
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Runs `f` for at least `min` time; returns the time per call.
fn time_per_call(min: Duration, mut f: impl FnMut()) -> Duration {
    f();
    let mut calls = 0u32;
    let t = Instant::now();
    while t.elapsed() < min {
        f();
        calls += 1;
    }
    t.elapsed() / calls
}

fn stipe_data(stipes: usize) -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def1u64;
    (0..stipes * K * CELL_PAYLOAD_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn coding(out: &mut Vec<String>) {
    let stipes = 256; // 8 MiB of data, beyond the L2 cache
    let data = stipe_data(stipes);
    let bytes = data.len();
    let s = K * CELL_PAYLOAD_BYTES;
    let min = Duration::from_millis(1500);

    let mut dst = vec![0u8; bytes];
    let memcpy = time_per_call(min, || {
        for (d, c) in dst.chunks_exact_mut(s).zip(data.chunks_exact(s)) {
            d.copy_from_slice(c);
        }
        std::hint::black_box(&dst);
    });

    // kelp's stipe codec: ISA-L (Cauchy), parity written straight into place.
    let p = Profile::new(K as u8, M as u8, 4).unwrap();
    let mut codec = StipeCodec::new(p);
    let mut parity = vec![vec![0u8; CELL_PAYLOAD_BYTES]; M];
    let kelp_enc = time_per_call(min, || {
        for chunk in data.chunks_exact(s) {
            let mut ps: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[..]).collect();
            codec.encode(chunk, &mut ps);
        }
    });
    let mut kelp_parity: Vec<Vec<Vec<u8>>> = Vec::new();
    for chunk in data.chunks_exact(s) {
        let mut ps = vec![vec![0u8; CELL_PAYLOAD_BYTES]; M];
        let mut refs: Vec<&mut [u8]> = ps.iter_mut().map(|v| &mut v[..]).collect();
        codec.encode(chunk, &mut refs);
        kelp_parity.push(ps);
    }
    let mut restored = vec![0u8; s];
    let kelp_dec = time_per_call(min, || {
        for (i, ps) in kelp_parity.iter().enumerate() {
            let cells: Vec<(usize, &[u8])> = ps
                .iter()
                .enumerate()
                .map(|(j, b)| (K + j, &b[..]))
                .collect();
            codec.decode(&cells, &mut restored).unwrap();
            if i == 0 {
                assert!(restored[..] == data[..s], "kelp decode");
            }
        }
    });

    // reed-solomon-simd, the other candidate (O(n log n) over GF(2^16)).
    let mut enc = reed_solomon_simd::ReedSolomonEncoder::new(K, M, CELL_PAYLOAD_BYTES).unwrap();
    let simd_enc = time_per_call(min, || {
        for chunk in data.chunks_exact(s) {
            enc.reset(K, M, CELL_PAYLOAD_BYTES).unwrap();
            for c in chunk.chunks_exact(CELL_PAYLOAD_BYTES) {
                enc.add_original_shard(c).unwrap();
            }
            let r = enc.encode().unwrap();
            for (i, b) in r.recovery_iter().enumerate() {
                parity[i].copy_from_slice(b);
            }
        }
    });
    let mut simd_parity: Vec<Vec<Vec<u8>>> = Vec::new();
    for chunk in data.chunks_exact(s) {
        let originals: Vec<&[u8]> = chunk.chunks_exact(CELL_PAYLOAD_BYTES).collect();
        simd_parity.push(reed_solomon_simd::encode(K, M, originals).unwrap());
    }
    let mut dec = reed_solomon_simd::ReedSolomonDecoder::new(K, M, CELL_PAYLOAD_BYTES).unwrap();
    let simd_dec = time_per_call(min, || {
        for (i, ps) in simd_parity.iter().enumerate() {
            dec.reset(K, M, CELL_PAYLOAD_BYTES).unwrap();
            for (j, b) in ps.iter().enumerate() {
                dec.add_recovery_shard(j, b).unwrap();
            }
            let r = dec.decode().unwrap();
            for (j, b) in r.restored_original_iter() {
                restored[j * CELL_PAYLOAD_BYTES..(j + 1) * CELL_PAYLOAD_BYTES].copy_from_slice(b);
            }
            if i == 0 {
                assert!(restored[..] == data[..s], "reed-solomon-simd decode");
            }
        }
    });

    // reed-solomon-erasure (GF(2^8), its SIMD C kernels), with its own parity.
    let rse = reed_solomon_erasure::galois_8::ReedSolomon::new(K, M).unwrap();
    let rse_enc = time_per_call(min, || {
        for chunk in data.chunks_exact(s) {
            let shards: Vec<&[u8]> = chunk.chunks_exact(CELL_PAYLOAD_BYTES).collect();
            let mut ps: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[..]).collect();
            rse.encode_sep(&shards, &mut ps).unwrap();
        }
    });
    let mut rse_parity: Vec<Vec<Vec<u8>>> = Vec::new();
    for chunk in data.chunks_exact(s) {
        let shards: Vec<&[u8]> = chunk.chunks_exact(CELL_PAYLOAD_BYTES).collect();
        let mut ps = vec![vec![0u8; CELL_PAYLOAD_BYTES]; M];
        let mut refs: Vec<&mut [u8]> = ps.iter_mut().map(|v| &mut v[..]).collect();
        rse.encode_sep(&shards, &mut refs).unwrap();
        rse_parity.push(ps);
    }
    let mut work = vec![0u8; M * CELL_PAYLOAD_BYTES];
    let rse_dec = time_per_call(min, || {
        for (i, ps) in rse_parity.iter().enumerate() {
            for (j, b) in ps.iter().enumerate() {
                work[j * CELL_PAYLOAD_BYTES..(j + 1) * CELL_PAYLOAD_BYTES].copy_from_slice(b);
            }
            let mut slots: Vec<(&mut [u8], bool)> = restored
                .chunks_exact_mut(CELL_PAYLOAD_BYTES)
                .map(|c| (c, false))
                .chain(work.chunks_exact_mut(CELL_PAYLOAD_BYTES).map(|c| (c, true)))
                .collect();
            rse.reconstruct_data(&mut slots).unwrap();
            if i == 0 {
                assert!(restored[..] == data[..s], "reed-solomon-erasure decode");
            }
        }
    });

    let mc = gbps(bytes, memcpy);
    out.push("### Reed-Solomon RS(8,8) over 4080-byte cells, one core\n".into());
    out.push(format!("Data bytes per run: {} (256 stipes). Decode rebuilds the 8 data cells from the 8 parity cells (8 shards lost).\n", bytes));
    out.push("| what | GB/s of data | ratio to memcpy | target |".into());
    out.push("| --- | ---: | ---: | --- |".into());
    out.push(format!("| memcpy of the same bytes | {mc:.2} | 1 | |"));
    for (name, d, target) in [
        (
            "kelp codec (ISA-L via erasure-isa-l) encode",
            kelp_enc,
            "≥ 1/5",
        ),
        (
            "kelp codec (ISA-L via erasure-isa-l) decode, 8 lost",
            kelp_dec,
            "≥ 1/20",
        ),
        ("reed-solomon-erasure encode", rse_enc, ""),
        ("reed-solomon-erasure decode, 8 lost", rse_dec, ""),
        ("reed-solomon-simd encode", simd_enc, ""),
        ("reed-solomon-simd decode, 8 lost", simd_dec, ""),
    ] {
        let g = gbps(bytes, d);
        out.push(format!("| {name} | {g:.2} | 1/{:.1} | {target} |", mc / g));
    }
    out.push(String::new());
}

fn plain_write(path: &std::path::Path, bytes: usize) -> Duration {
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(path).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    f.sync_data().unwrap();
    let d = t.elapsed();
    std::fs::remove_file(path).unwrap();
    d
}

fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn forest(dir: &std::path::Path, blade: u32) -> BladeLayout {
    let stores: Vec<LocalStore> = (0..4)
        .map(|s| {
            let disks: Vec<PathBuf> = (0..4)
                .map(|d| dir.join(format!("server{s}/disk{d}")))
                .collect();
            LocalStore::open(format!("server{s}"), &disks, LocalStoreConfig::default()).unwrap()
        })
        .collect();
    let shards = (0..K + M)
        .map(|j| ShardPlacement {
            store: Arc::new(stores[j % 4].clone()) as Arc<dyn ShardStore>,
            disk: (j / 4) as u32,
        })
        .collect();
    BladeLayout::new(blade, Profile::default(), shards).unwrap()
}

async fn appends(a: &Args, out: &mut Vec<String>) {
    let total = a.mib << 20;
    let run = a.dir.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run).unwrap();
    let raw = total * (K + M) / K;
    drop_caches();
    let plain = plain_write(&run.join("plain"), raw);
    let plain_mbps = raw as f64 / plain.as_secs_f64() / 1e6;

    let mut rows = Vec::new();
    let large = a.only.as_deref().is_none_or(|o| o == "large");
    let small = a.only.as_deref().is_none_or(|o| o == "small");
    for (blade, appenders) in [(1u32, 1usize), (2, 4)].into_iter().filter(|_| large) {
        drop_caches();
        let h = Holdfast::open(forest(&run, blade), HoldfastConfig::default())
            .await
            .unwrap();
        let frond_len = 2 << 20;
        let per = total / frond_len / appenders;
        let data = Arc::new(frond::encode(&stipe_data(65)[..frond_len]).unwrap());
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..appenders {
            let h = h.clone();
            let data = data.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..per {
                    h.append((*data).clone()).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        h.sync().await.unwrap();
        let d = t.elapsed();
        h.quiesce().await;
        let bytes = per * appenders * frond_len;
        rows.push((
            appenders,
            bytes as f64 / d.as_secs_f64() / 1e6,
            plain.as_secs_f64() * bytes as f64 / total as f64 / d.as_secs_f64(),
        ));
    }

    // 4 KiB fronds, 16 appenders, before sync.
    if !small {
        std::fs::remove_dir_all(&run).unwrap();
        return;
    }
    let h = Holdfast::open(forest(&run, 3), HoldfastConfig::default())
        .await
        .unwrap();
    let count_per = 4000;
    let small = frond::encode(&stipe_data(1)[..4096]).unwrap();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let h = h.clone();
        let small = small.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..count_per {
                h.append(small.clone()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let d = t.elapsed();
    let small_rate = (16 * count_per) as f64 / d.as_secs_f64();
    h.quiesce().await;
    let t = Instant::now();
    h.sync().await.unwrap();
    let sync_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(h);
    std::fs::remove_dir_all(&run).unwrap();

    out.push(
        "### Holdfast appends into 16 local shard stores (4 servers x 4 disks, one file system)\n"
            .into(),
    );
    out.push(format!(
        "Baseline: a plain sequential write of {} MiB ({} MiB of data x (k+m)/k) in 1 MiB writes and one fdatasync: {plain_mbps:.0} MB/s ({:.2} s).\n",
        raw >> 20,
        a.mib,
        plain.as_secs_f64()
    ));
    out.push("| workload | result | ratio to the plain write | target |".into());
    out.push("| --- | ---: | ---: | --- |".into());
    for (appenders, mbps, ratio) in rows {
        out.push(format!(
            "| 2 MiB fronds, {appenders} appender(s), {} MiB then sync | {mbps:.0} MB/s of data | {ratio:.2} | ≥ 0.5 |",
            a.mib
        ));
    }
    out.push(format!(
        "| 4 KiB fronds, 16 appenders, {} fronds, before sync | {small_rate:.0} fronds/s | | ≥ 20,000/s |",
        16 * count_per
    ));
    out.push(format!("| the sync after them | {sync_ms:.1} ms | | |"));
    out.push(String::new());
}

fn main() {
    let a = args();
    let mut out = Vec::new();
    if a.only.as_deref().is_none_or(|o| o == "coding") {
        coding(&mut out);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(appends(&a, &mut out));
    let text = out.join("\n");
    println!("{text}");
    if let Some(path) = &a.write {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_default();
        let header = format!(
            "# kelp benchmarks\n\nMachine: {} cores ({cpu}), {} GiB of memory. Command: `cargo run --release -p kelp --example kelp_bench -- --mib {} --write {}`.\n\n",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok()))
                .map_or(0, |k| k >> 20),
            a.mib,
            path.display()
        );
        std::fs::write(path, header + &text + "\n").unwrap();
    }
}
