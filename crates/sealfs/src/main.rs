//! The sealfs binary. `sealfs server` runs a server: it owns the disks it is given and serves
//! their shard files to its peers over the wire protocol.

use std::path::PathBuf;
use std::process::ExitCode;

mod bench;
mod cli;
mod dirs;
mod dirty;
mod mount;
mod node;
mod open;
mod reclaim;

use clap::{Args, Parser, Subcommand};
use sealfs_rpc::ClusterKey;

#[derive(Parser)]
#[command(name = "sealfs", version, about = "A distributed POSIX file system")]
struct Cli {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info", env = "SEALFS_LOG")]
    log: tracing::Level,
    /// The manager's address (or the addresses of its replicas, comma separated).
    #[arg(long, global = true, env = "SEALFS_MANAGER")]
    manager: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a server over the disks of this machine.
    Server(ServerArgs),
    /// Run the manager, which holds the cluster map.
    Manager(ManagerArgs),
    /// Show servers, disks and blades (needs --manager).
    Status(SecretArgs),
    /// Copy a local file (or - for standard input) into the cluster.
    Put(cli::PutArgs),
    /// Copy a file of the cluster to a local file (or - for standard output).
    Get(cli::GetArgs),
    /// List a directory.
    Ls(cli::PathArgs),
    /// Show a file's attributes.
    Stat(cli::PathArgs),
    /// Remove files or empty directories.
    Rm(cli::RmArgs),
    /// Make directories.
    Mkdir(cli::MkdirArgs),
    /// Rename or move.
    Mv(cli::MvArgs),
    /// Create, list or delete volumes.
    #[command(subcommand)]
    Volume(cli::VolumeCmd),
    /// A whole local cluster in one process, mounted: a manager, servers with disks under the
    /// data folder, the volume "default" at MOUNTPOINT. Ctrl-C unmounts and stops it; run
    /// again, it finds its data.
    Up(UpArgs),
    /// Mount a volume with FUSE until Ctrl-C or SIGTERM (then it unmounts).
    Mount(MountArgs),
    /// Unmount a sealfs mount point (also one left stale by a killed client).
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Store, read and update blobs: bytes at an address, without a file name.
    #[command(subcommand)]
    Blob(cli::BlobCmd),
    /// Measure a directory (a sealfs mount or any other file system): bandwidth, IOPS,
    /// metadata and small files, IO500-style; prints a table, writes JSON on request.
    Bench(bench::BenchArgs),
}

#[derive(Args, Clone)]
pub(crate) struct SecretArgs {
    /// File holding the cluster secret (else SEALFS_SECRET).
    #[arg(long, env = "SEALFS_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// The cluster secret itself (prefer --secret-file; command lines are visible to all users).
    #[arg(long, env = "SEALFS_SECRET", hide_env_values = true)]
    secret: Option<String>,
}

#[derive(Args)]
struct UpArgs {
    /// Where to mount the file system (made if missing).
    #[arg(default_value = "./sealfs")]
    mountpoint: PathBuf,
    /// Where the cluster keeps everything (disks, metadata, its secret).
    #[arg(long, default_value = "./sealfs-data")]
    data_dir: PathBuf,
    /// Servers to run.
    #[arg(long, default_value_t = 4)]
    servers: usize,
    /// Disks (folders) per server.
    #[arg(long, default_value_t = 4)]
    disks: usize,
    /// Metadata partitions.
    #[arg(long, default_value_t = 16)]
    partitions: u32,
}

#[derive(Args)]
struct MountArgs {
    /// The volume.
    #[arg(long, default_value = "default", env = "SEALFS_VOLUME")]
    volume: String,
    /// Where to mount it (an existing folder).
    mountpoint: PathBuf,
    #[command(flatten)]
    secret: SecretArgs,
}

#[derive(Args)]
struct ManagerArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7000", env = "SEALFS_LISTEN")]
    listen: String,
    /// Folder for the manager's Raft log and snapshots.
    #[arg(long, env = "SEALFS_DATA_DIR")]
    data_dir: PathBuf,
    /// A server silent this long is declared down.
    #[arg(long, default_value_t = 10_000)]
    down_after_ms: u64,
    /// Metadata partitions (a power of two), fixed when the cluster is made.
    #[arg(long, default_value_t = 64)]
    partitions: u32,
    /// Replicas of each partition; the partitions are laid out once this many servers are up.
    #[arg(long, default_value_t = 3)]
    replicas: u8,
    /// The listening addresses of all manager replicas (this one's among them), comma
    /// separated, the same list and order on each; without it the manager is one replica.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    #[command(flatten)]
    secret: SecretArgs,
}

#[derive(Args)]
struct ServerArgs {
    /// Address to listen on for peers and clients (port 0 picks a free one) [default: 127.0.0.1:7070].
    #[arg(long, env = "SEALFS_LISTEN")]
    listen: Option<String>,
    /// Folder for the server's own state (not data).
    #[arg(long, env = "SEALFS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A disk (a folder, normally a drive's mount point); repeat for every disk.
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// Failure domain of this server (rack, data centre).
    #[arg(long, default_value = "", env = "SEALFS_ZONE")]
    zone: String,
    #[command(flatten)]
    secret: SecretArgs,
    /// Half-done metadata operations older than this are settled by the orphan scan.
    #[arg(long, default_value_t = 60_000, hide = true)]
    orphan_grace_ms: u64,
    /// Seconds between scrubs: each reads every cell of the blades this server is the
    /// holdfast of and rebuilds those missing, stale or corrupt.
    #[arg(long, default_value_t = node::Scrub::default().every.as_secs())]
    scrub_every_s: u64,
    /// How fast a scrub reads, in MB of cells a second (0: as fast as the disks go).
    #[arg(long, default_value_t = node::Scrub::default().pace / 1_000_000)]
    scrub_mb_s: u64,
    /// MiB of payload after which a blade is sealed (takes no more appends); sealed blades
    /// that no file refers to any more are deleted.
    #[arg(long, default_value_t = reclaim::Reclaim::default().seal_at >> 20)]
    seal_mb: u64,
    /// Seconds without an append after which a blade holding data is sealed too.
    #[arg(long, default_value_t = reclaim::Reclaim::default().idle.as_secs())]
    seal_idle_s: u64,
    /// Seconds a blade stays sealed before it may be reclaimed.
    #[arg(long, default_value_t = reclaim::Reclaim::default().grace.as_secs())]
    reclaim_grace_s: u64,
    /// Seconds between counts of the files' references to sealed blades still in use.
    #[arg(long, default_value_t = reclaim::Reclaim::default().recount.as_secs())]
    reclaim_recount_s: u64,
    /// Seconds between reclaim passes.
    #[arg(long, default_value_t = reclaim::Reclaim::default().every.as_secs())]
    reclaim_every_s: u64,
    /// MiB kept free on the disk of --data-dir: with less, creates, mkdirs, links, writes
    /// and xattrs are refused (ENOSPC) and removals still work.
    #[arg(long, default_value_t = sealfs_meta::RESERVE_DEFAULT >> 20)]
    meta_reserve_mb: u64,
    /// A TOML file with any of: listen, data_dir, disks, secret_file. Flags and environment
    /// variables take precedence over it.
    #[arg(long, env = "SEALFS_CONFIG")]
    config: Option<PathBuf>,
}

/// The server settings a TOML file may hold.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    disks: Vec<PathBuf>,
    secret_file: Option<PathBuf>,
}

/// Server settings after flags, environment, the config file and defaults, in that order.
struct ServerSettings {
    orphan_grace_ms: u64,
    reclaim: reclaim::Reclaim,
    meta_reserve: u64,
    scrub: node::Scrub,
    zone: String,
    listen: String,
    data_dir: PathBuf,
    disks: Vec<PathBuf>,
    secret: Vec<u8>,
}

impl ServerArgs {
    fn settle(self) -> Result<ServerSettings, String> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
                toml::from_str::<ServerFile>(&text)
                    .map_err(|e| format!("config file {}: {e}", path.display()))?
            }
            None => ServerFile::default(),
        };
        let disks = if self.disks.is_empty() {
            file.disks
        } else {
            self.disks
        };
        if disks.is_empty() {
            return Err(
                "no disks: pass --disk DIR (once per disk) or list disks in the config file".into(),
            );
        }
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .ok_or("no data folder: pass --data-dir DIR or set data_dir in the config file")?;
        if self.scrub_every_s == 0 {
            return Err("--scrub-every-s must be at least 1".into());
        }
        if self.seal_mb == 0 || self.seal_idle_s == 0 || self.reclaim_every_s == 0 {
            return Err("--seal-mb, --seal-idle-s and --reclaim-every-s must be at least 1".into());
        }
        Ok(ServerSettings {
            orphan_grace_ms: self.orphan_grace_ms,
            reclaim: reclaim::Reclaim {
                seal_at: self.seal_mb.saturating_mul(1 << 20),
                idle: std::time::Duration::from_secs(self.seal_idle_s),
                grace: std::time::Duration::from_secs(self.reclaim_grace_s),
                every: std::time::Duration::from_secs(self.reclaim_every_s),
                recount: std::time::Duration::from_secs(self.reclaim_recount_s),
            },
            meta_reserve: self.meta_reserve_mb.saturating_mul(1 << 20),
            scrub: node::Scrub {
                every: std::time::Duration::from_secs(self.scrub_every_s),
                pace: self.scrub_mb_s.saturating_mul(1_000_000),
            },
            zone: self.zone,
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:7070".into()),
            data_dir,
            disks,
            secret: secret(
                &self.secret.secret_file.or(file.secret_file),
                &self.secret.secret,
            )?,
        })
    }
}

pub(crate) fn secret(file: &Option<PathBuf>, value: &Option<String>) -> Result<Vec<u8>, String> {
    let s = match (file, value) {
        (Some(f), _) => std::fs::read(f)
            .map_err(|e| format!("cannot read the secret file {}: {e}", f.display()))?,
        (None, Some(v)) => v.clone().into_bytes(),
        (None, None) => {
            return Err("no cluster secret: pass --secret-file FILE or set SEALFS_SECRET".into())
        }
    };
    let trimmed: Vec<u8> = s.trim_ascii().to_vec();
    if trimmed.len() < 16 {
        return Err("the cluster secret must be at least 16 bytes".into());
    }
    Ok(trimmed)
}

async fn manager(a: ManagerArgs) -> Result<(), String> {
    let key = ClusterKey::from_secret(&secret(&a.secret.secret_file, &a.secret.secret)?);
    let down = std::time::Duration::from_millis(a.down_after_ms);
    let layout = sealfs_manager::Layout {
        partitions: a.partitions,
        replicas: a.replicas,
    };
    let m =
        sealfs_manager::Manager::start(&a.listen, &a.data_dir, key, down, layout, &a.peers).await?;
    announce(&format!("sealfs manager listening on {}", m.addr()));
    wait_for_signal().await?;
    tracing::info!("stopping");
    m.shutdown().await;
    Ok(())
}

/// Asks server `s` a question with an empty request (`op`); its answer decoded, or `None` when
/// it does not answer within 3 s or answers what does not decode.
async fn ask<T: serde::de::DeserializeOwned>(
    s: &sealfs_manager::map::ServerEntry,
    key: &ClusterKey,
    op: u16,
) -> Option<T> {
    let c = sealfs_rpc::Client::new(s.addr.clone(), key.clone(), Default::default());
    let req = sealfs_rpc::Request {
        op,
        ..Default::default()
    };
    let r = c
        .call(req, std::time::Duration::from_secs(3))
        .await
        .and_then(|r| r.into_result())
        .ok()?;
    postcard::from_bytes(&r.meta).ok()
}

async fn status(manager: Option<String>, s: SecretArgs) -> Result<(), String> {
    use sealfs_manager::map::ServerState;
    let manager =
        manager.ok_or("status needs the manager: pass --manager ADDR or set SEALFS_MANAGER")?;
    let key = ClusterKey::from_secret(&secret(&s.secret_file, &s.secret)?);
    let key_of_status = key.clone();
    let map = sealfs_manager::ManagerClient::new(&manager, key.clone())
        .map()
        .await
        .map_err(|e| e.to_string())?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    // The servers up, by id, for the questions asked of each below.
    let up_servers: Vec<(u64, &sealfs_manager::map::ServerEntry)> = map
        .servers
        .iter()
        .filter(|(_, s)| s.state == ServerState::Up)
        .map(|(id, s)| (*id, s))
        .collect();
    println!("epoch {}", map.epoch);
    println!("servers: {} ({} up)", map.servers.len(), up_servers.len());
    for (id, s) in &map.servers {
        let cap: u64 = s.disks.iter().map(|d| d.capacity).sum();
        let free: u64 = s.disks.iter().map(|d| d.free).sum();
        let state = if s.state == ServerState::Up {
            "up"
        } else {
            "DOWN"
        };
        println!(
            "  server {id} {} {state} zone {:?} disks {} free {:.1} of {:.1} GiB",
            s.addr,
            s.zone,
            s.disks.len(),
            gib(free),
            gib(cap)
        );
    }
    println!("volumes: {}", map.volumes.len());
    for (name, v) in &map.volumes {
        println!(
            "  {name} id {} ec {}+{}+{} quota {}",
            v.id, v.k, v.m, v.w, v.quota
        );
    }
    let parts = map.partitions.len() as u32;
    println!("partitions: {parts}");
    if parts > 0 {
        let peers = sealfs_raft::Peers::new(key.clone());
        let maps = sealfs_manager::MapCache::new(&manager, key);
        maps.refresh().await.map_err(|e| e.to_string())?;
        let mut meta = sealfs_meta::MetaClient::new(maps, peers);
        meta.deadline = std::time::Duration::from_secs(3);
        let mut down = Vec::new();
        let mut led: std::collections::BTreeMap<u64, usize> = Default::default();
        for p in 0..parts {
            match meta.read(p, &sealfs_meta::Query::Usage).await {
                Ok(_) => *led.entry(meta.leader(p).unwrap_or(0)).or_default() += 1,
                Err(e) => down.push(format!("{p} ({e})")),
            }
        }
        for (p, set) in map.partitions.iter().enumerate().take(8) {
            println!(
                "  partition {p} replicas {set:?} leader {:?}",
                meta.leader(p as u32)
            );
        }
        if parts > 8 {
            println!("  ... ({} more)", parts - 8);
        }
        println!("  leaders per server: {led:?}");
        if down.is_empty() {
            println!("  all {parts} partitions answer");
        } else {
            println!("  UNAVAILABLE: {}", down.join(", "));
        }
        // Each server's own view of its replicas: one that stopped on its own (its log or
        // store failed) is down, its partition running on the others, until its server starts
        // it again (every RESTART_AFTER while the failure lasts).
        let (mut running, mut stopped) = (0usize, Vec::new());
        for (id, s) in &up_servers {
            let Some(list) = ask::<Vec<sealfs_meta::ReplicaReport>>(
                s,
                &key_of_status,
                sealfs_meta::OP_META_REPLICAS,
            )
            .await
            else {
                continue; // said below, with the holdfasts' view
            };
            for rep in list {
                match rep.stopped {
                    None => running += 1,
                    Some(why) => {
                        stopped.push(format!("partition {} on server {id}: {why}", rep.partition))
                    }
                }
            }
        }
        if stopped.is_empty() {
            println!("  replicas: all {running} running");
        } else {
            println!(
                "  replicas: {running} running, {} STOPPED (started again every {} s):",
                stopped.len(),
                sealfs_meta::RESTART_AFTER.as_secs()
            );
            for s in stopped {
                println!("    {s}");
            }
        }
    }
    // The holdfasts' view: open blades and stipes waiting for repair.
    let (mut open, mut degraded, mut silent) = (0usize, 0u64, Vec::new());
    for (id, s) in &up_servers {
        let blades = sealfs_client::blades::OP_BLADE_REPORT;
        match ask::<Vec<sealfs_client::blades::BladeReport>>(s, &key_of_status, blades).await {
            Some(list) => {
                open += list.len();
                degraded += list.iter().map(|b| b.degraded).sum::<u64>();
            }
            None => silent.push(*id),
        }
    }
    println!("open blades: {open}, degraded stipes: {degraded}");
    if !silent.is_empty() {
        println!("  servers that did not answer: {silent:?}");
    }
    // What each server's holdfasts did since it started: scrubs, repairs, reclaims.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for (id, s) in &up_servers {
        let op = sealfs_client::blades::OP_HOLDFAST_REPORT;
        let Some(r) = ask::<sealfs_client::blades::HoldfastReport>(s, &key_of_status, op).await
        else {
            continue;
        };
        let scrub = if r.scrubs == 0 {
            "no scrub yet".to_string()
        } else {
            format!(
                "last scrub ended {} s ago ({:.1} s: {} stipes read, {} fixed, {} beyond repair)",
                now.saturating_sub(r.last_scrub_end),
                r.last_scrub_secs,
                r.last_scrub_stipes,
                r.last_scrub_fixed,
                r.last_scrub_unrecoverable
            )
        };
        println!(
            "  server {id}: {scrub}; since its start {} stipes fixed by scrubs, {} cells \
             repaired, {} blades reclaimed",
            r.scrub_fixed, r.repaired_cells, r.reclaimed
        );
    }
    let count = |st| map.blades.values().filter(|b| b.state == st).count();
    use sealfs_manager::map::BladeState;
    println!(
        "blades: {} ({} open, {} sealed, {} being reclaimed; {} reclaimed so far)",
        map.blades.len(),
        count(BladeState::Open),
        count(BladeState::Sealed),
        count(BladeState::Deleting),
        (map.last_blade() as usize).saturating_sub(map.blades.len())
    );
    for (id, b) in &map.blades {
        let servers: std::collections::BTreeSet<u64> = b.shards.iter().map(|h| h.server).collect();
        println!(
            "  blade {id:08x} {}+{}+{} {:?}{} holdfast server {} disk {} over {} servers",
            b.k,
            b.m,
            b.w,
            b.state,
            if b.blobs { " (blobs)" } else { "" },
            b.shards[0].server,
            b.shards[0].disk,
            servers.len()
        );
    }
    Ok(())
}

async fn wait_for_signal() -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

async fn server(a: ServerArgs, manager: Option<String>) -> Result<(), String> {
    let a = a.settle()?;
    let node = node::Node::start(node::NodeSettings {
        listen: a.listen.clone(),
        data_dir: a.data_dir.clone(),
        disks: a.disks.clone(),
        zone: a.zone.clone(),
        key: ClusterKey::from_secret(&a.secret),
        manager,
        host: sealfs_meta::HostConfig {
            orphan_grace: std::time::Duration::from_millis(a.orphan_grace_ms),
            reserve: a.meta_reserve,
            ..Default::default()
        },
        scrub: a.scrub,
        reclaim: a.reclaim,
        near: Default::default(),
    })
    .await?;
    // Scripts and tests read this line to learn the address (useful with port 0).
    announce(&format!(
        "sealfs server listening on {} with {} disks and {} shard files",
        node.addr(),
        a.disks.len(),
        node.found
    ));
    wait_for_signal().await?;
    tracing::info!("stopping");
    node.shutdown().await;
    Ok(())
}

/// The addresses `sealfs up` listens on: chosen free the first time, kept in the data folder
/// so that servers come back on theirs (the manager knows them by address).
fn up_addresses(dir: &std::path::Path, n: usize) -> Result<Vec<String>, String> {
    let file = dir.join("addresses");
    if let Ok(text) = std::fs::read_to_string(&file) {
        let v: Vec<String> = text.lines().map(str::to_string).collect();
        if v.len() == n {
            return Ok(v);
        }
        return Err(format!(
            "{} lists {} addresses; this data folder was made with --servers {}",
            file.display(),
            v.len(),
            v.len().saturating_sub(1)
        ));
    }
    // Held until all are chosen, so that they differ; below the ephemeral range when there is
    // room, so that no outgoing connection takes one before its server binds it.
    let held = sealfs_rpc::ports::quiet_listeners("127.0.0.1", n).map_err(|e| e.to_string())?;
    let v = held
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    std::fs::write(&file, v.join("\n")).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(v)
}

async fn up(a: UpArgs) -> Result<(), String> {
    if a.servers == 0 || a.disks == 0 || a.servers * a.disks < 16 {
        return Err(format!(
            "--servers {} x --disks {} is {} disks; the default 8+8 code needs 16",
            a.servers,
            a.disks,
            a.servers * a.disks
        ));
    }
    let data = &a.data_dir;
    std::fs::create_dir_all(data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
    let data = data
        .canonicalize()
        .map_err(|e| format!("{}: {e}", data.display()))?;
    let secret_file = data.join("secret");
    if !secret_file.exists() {
        let mut s = [0u8; 24];
        getrandom_fill(&mut s)?;
        let hex: String = s.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&secret_file, hex).map_err(|e| e.to_string())?;
    }
    let key = ClusterKey::from_secret(&secret(&Some(secret_file.clone()), &None)?);
    let addrs = up_addresses(&data, a.servers + 1)?;
    let manager = sealfs_manager::Manager::start(
        &addrs[0],
        &data.join("manager"),
        key.clone(),
        std::time::Duration::from_secs(10),
        sealfs_manager::Layout {
            partitions: a.partitions,
            replicas: 3.min(a.servers as u8),
        },
        &[],
    )
    .await?;
    // The mount and the servers reach one another's disks and handlers directly.
    let near = sealfs_client::blades::InProcess::default();
    let mut nodes = Vec::new();
    for s in 0..a.servers {
        let disks: Vec<PathBuf> = (0..a.disks)
            .map(|d| data.join(format!("s{s}/disk{d}")))
            .collect();
        for d in &disks {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        nodes.push(
            node::Node::start(node::NodeSettings {
                listen: addrs[s + 1].clone(),
                data_dir: data.join(format!("s{s}/state")),
                disks,
                zone: String::new(),
                key: key.clone(),
                manager: Some(addrs[0].clone()),
                host: Default::default(),
                scrub: Default::default(),
                reclaim: Default::default(),
                near: near.clone(),
            })
            .await?,
        );
    }
    let fs = sealfs_client::Sealfs::connect_beside(
        &addrs[0],
        key,
        "default",
        std::time::Duration::from_secs(60),
        near,
    )
    .await?;
    let mp = &a.mountpoint;
    if let Err(e) = std::fs::metadata(mp) {
        if e.raw_os_error() == Some(107) {
            umount(mp)?;
        }
    }
    std::fs::create_dir_all(mp).map_err(|e| format!("cannot create {}: {e}", mp.display()))?;
    let session = mount::mount(fs, tokio::runtime::Handle::current(), mp).map_err(|e| {
        format!(
            "cannot mount at {}: {e} (is fuse3 installed?)",
            mp.display()
        )
    })?;
    // Tests and scripts read this first line.
    announce(&format!(
        "sealfs up: mounted at {}\n  data: {} ({} servers x {} disks)\n  manager: {} (for other shells: SEALFS_MANAGER={} SEALFS_SECRET_FILE={})\n  Ctrl-C unmounts and stops",
        mp.display(),
        data.display(),
        a.servers,
        a.disks,
        addrs[0],
        addrs[0],
        secret_file.display()
    ));
    wait_for_signal().await?;
    tracing::info!("unmounting and stopping");
    unmount_session(session, mp).await?;
    for n in nodes {
        n.shutdown().await;
    }
    manager.shutdown().await;
    Ok(())
}

/// Prints what a long-running command tells whoever started it. Nobody may be reading any
/// more (a script that took the first line and closed the pipe): that must not stop a server
/// or a mount, so write errors are ignored (println! would panic on them).
fn announce(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

fn getrandom_fill(b: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(b))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))
}

/// Unmounts `mountpoint` (lazily, so that a mount left by a killed client goes too).
fn umount(mountpoint: &std::path::Path) -> Result<(), String> {
    rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH)
        .map_err(|e| format!("cannot unmount {}: {e}", mountpoint.display()))
}

async fn mount_cmd(manager: Option<String>, a: MountArgs) -> Result<(), String> {
    let manager =
        manager.ok_or("mount needs the manager: pass --manager ADDR or set SEALFS_MANAGER")?;
    let key = ClusterKey::from_secret(&secret(&a.secret.secret_file, &a.secret.secret)?);
    // A mount point left by a killed client answers ENOTCONN: unmount it first.
    if let Err(e) = std::fs::metadata(&a.mountpoint) {
        if e.raw_os_error() == Some(107) {
            tracing::warn!(
                "{} was left mounted by a stopped client; unmounting it",
                a.mountpoint.display()
            );
            umount(&a.mountpoint)?;
        } else {
            return Err(format!("mount point {}: {e}", a.mountpoint.display()));
        }
    }
    if !a.mountpoint.is_dir() {
        return Err(format!(
            "mount point {} is not a folder",
            a.mountpoint.display()
        ));
    }
    let fs = sealfs_client::Sealfs::connect(
        &manager,
        key,
        &a.volume,
        std::time::Duration::from_secs(30),
    )
    .await?;
    let session =
        mount::mount(fs, tokio::runtime::Handle::current(), &a.mountpoint).map_err(|e| {
            format!(
                "cannot mount at {}: {e} (is fuse3 installed?)",
                a.mountpoint.display()
            )
        })?;
    announce(&format!(
        "sealfs volume {} mounted at {}",
        a.volume,
        a.mountpoint.display()
    ));
    wait_for_signal().await?;
    tracing::info!("unmounting");
    unmount_session(session, &a.mountpoint).await
}

/// Unmounts a mount this process serves. One still in use (a shell inside it, an open file)
/// is detached instead, as `umount -l` does: the mount point is free at once, and what still
/// uses the old mount gets errors once this process has stopped.
async fn unmount_session(
    session: fuser::BackgroundSession,
    mountpoint: &std::path::Path,
) -> Result<(), String> {
    let r = tokio::task::spawn_blocking(move || session.umount_and_join())
        .await
        .map_err(|e| e.to_string())?;
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(16) => {
            tracing::warn!("{} is in use: detaching it", mountpoint.display());
            umount(mountpoint)
        }
        Err(e) => Err(format!("unmount {}: {e}", mountpoint.display())),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    {
        use tracing_subscriber::prelude::*;
        // openraft reports every election at info; keep its warnings only.
        // openraft reports every election at info and every unreachable peer (a server
        // starting or stopping) at error; sealfs reports what matters of those itself. Its
        // own messages show from --log debug on.
        let raft = if cli.log >= tracing::Level::DEBUG {
            tracing::level_filters::LevelFilter::from_level(tracing::Level::WARN)
        } else {
            tracing::level_filters::LevelFilter::OFF
        };
        let filter = tracing_subscriber::filter::Targets::new()
            .with_default(cli.log)
            .with_target("openraft", raft);
        tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .with(filter)
            .init();
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sealfs: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Server(a) => server(a, cli.manager).await,
            Cmd::Manager(a) => manager(a).await,
            Cmd::Status(s) => status(cli.manager, s).await,
            Cmd::Put(a) => cli::put(cli.manager, a).await,
            Cmd::Get(a) => cli::get(cli.manager, a).await,
            Cmd::Ls(a) => cli::ls(cli.manager, a).await,
            Cmd::Stat(a) => cli::stat(cli.manager, a).await,
            Cmd::Rm(a) => cli::rm(cli.manager, a).await,
            Cmd::Mkdir(a) => cli::mkdir(cli.manager, a).await,
            Cmd::Mv(a) => cli::mv(cli.manager, a).await,
            Cmd::Volume(v) => cli::volume(cli.manager, v).await,
            Cmd::Blob(b) => cli::blob(cli.manager, b).await,
            Cmd::Mount(a) => mount_cmd(cli.manager, a).await,
            Cmd::Up(a) => up(a).await,
            Cmd::Umount { mountpoint } => umount(&mountpoint),
            Cmd::Bench(a) => tokio::task::block_in_place(|| bench::run(a)),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sealfs: {e}");
            ExitCode::from(2)
        }
    }
}
