//! The sealfs binary. `sealfs server` runs a server: it owns the disks it is given and serves
//! their shard files to its peers over the wire protocol.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use kelp::{LocalStore, LocalStoreConfig};
use sealfs_rpc::{ClusterKey, Server, ServerConfig};
use sealfs_shard::ShardService;

#[derive(Parser)]
#[command(name = "sealfs", version, about = "A distributed POSIX file system")]
struct Cli {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info", env = "SEALFS_LOG")]
    log: tracing::Level,
    /// The manager's address.
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
}

#[derive(Args)]
struct SecretArgs {
    /// File holding the cluster secret (else SEALFS_SECRET).
    #[arg(long, env = "SEALFS_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// The cluster secret itself (prefer --secret-file; command lines are visible to all users).
    #[arg(long, env = "SEALFS_SECRET", hide_env_values = true)]
    secret: Option<String>,
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
        Ok(ServerSettings {
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

fn secret(file: &Option<PathBuf>, value: &Option<String>) -> Result<Vec<u8>, String> {
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

/// Capacity and free bytes of the file system holding `dir`.
fn disk_space(dir: &std::path::Path) -> (u64, u64) {
    match rustix::fs::statvfs(dir) {
        Ok(s) => (
            s.f_blocks.saturating_mul(s.f_frsize),
            s.f_bavail.saturating_mul(s.f_frsize),
        ),
        Err(_) => (0, 0),
    }
}

/// Registers with the manager and heartbeats every second, registering again when the manager
/// no longer knows this server (a new manager, or one restored from an older state).
async fn report_to(
    manager: String,
    key: ClusterKey,
    addr: String,
    zone: String,
    disks: Vec<PathBuf>,
) {
    let m = sealfs_manager::ManagerClient::new(&manager, key);
    let mut id = None;
    loop {
        let space: Vec<(u64, u64)> = disks.iter().map(|d| disk_space(d)).collect();
        match id {
            None => {
                let ds = space
                    .iter()
                    .map(|&(capacity, free)| sealfs_manager::map::Disk { capacity, free })
                    .collect();
                match m.register(&addr, &zone, ds).await {
                    Ok(i) => {
                        tracing::info!("registered with the manager at {manager} as server {i}");
                        id = Some(i);
                    }
                    Err(e) => tracing::warn!("cannot register with the manager: {e}"),
                }
            }
            Some(i) => match m.heartbeat(i, space.iter().map(|s| s.1).collect()).await {
                Ok(sealfs_manager::map::Outcome::UnknownServer) => id = None,
                Ok(_) => {}
                Err(e) => tracing::warn!("heartbeat: {e}"),
            },
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn manager(a: ManagerArgs) -> Result<(), String> {
    let key = ClusterKey::from_secret(&secret(&a.secret.secret_file, &a.secret.secret)?);
    let down = std::time::Duration::from_millis(a.down_after_ms);
    let m = sealfs_manager::Manager::start(&a.listen, &a.data_dir, key, down).await?;
    println!("sealfs manager listening on {}", m.addr());
    wait_for_signal().await?;
    tracing::info!("stopping");
    m.shutdown().await;
    Ok(())
}

async fn status(manager: Option<String>, s: SecretArgs) -> Result<(), String> {
    use sealfs_manager::map::ServerState;
    let manager =
        manager.ok_or("status needs the manager: pass --manager ADDR or set SEALFS_MANAGER")?;
    let key = ClusterKey::from_secret(&secret(&s.secret_file, &s.secret)?);
    let map = sealfs_manager::ManagerClient::new(&manager, key)
        .map()
        .await
        .map_err(|e| e.to_string())?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let up = map
        .servers
        .values()
        .filter(|s| s.state == ServerState::Up)
        .count();
    println!("epoch {}", map.epoch);
    println!("servers: {} ({up} up)", map.servers.len());
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
    println!("blades: {}", map.blades.len());
    for (id, b) in &map.blades {
        let servers: std::collections::BTreeSet<u64> = b.shards.iter().map(|h| h.server).collect();
        println!(
            "  blade {id:08x} {}+{}+{} holdfast server {} disk {} over {} servers",
            b.k,
            b.m,
            b.w,
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
    let key = ClusterKey::from_secret(&a.secret);
    for d in &a.disks {
        if !d.is_dir() {
            return Err(format!(
                "disk {} is not a folder (create it or mount the drive there)",
                d.display()
            ));
        }
    }
    std::fs::create_dir_all(&a.data_dir).map_err(|e| {
        format!(
            "cannot create the data folder {}: {e}",
            a.data_dir.display()
        )
    })?;
    let store = LocalStore::open(a.listen.clone(), &a.disks, LocalStoreConfig::default())
        .map_err(|e| e.to_string())?;
    let report = store.scan_report();
    for bad in &report.mismatched {
        tracing::warn!(
            "left out {}: its cells belong to another shard file",
            bad.display()
        );
    }
    let found = report.found;
    let service = Arc::new(ShardService::new(Arc::new(store)));
    let handle = Server::bind(&a.listen, key, ServerConfig::default(), service)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", a.listen))?;
    // Scripts and tests read this line to learn the address (useful with port 0).
    println!(
        "sealfs server listening on {} with {} disks and {found} shard files",
        handle.addr(),
        a.disks.len()
    );
    let reporter = manager.map(|m| {
        let key = ClusterKey::from_secret(&a.secret);
        tokio::spawn(report_to(
            m,
            key,
            handle.addr().to_string(),
            a.zone.clone(),
            a.disks.clone(),
        ))
    });
    wait_for_signal().await?;
    tracing::info!("stopping");
    if let Some(r) = reporter {
        r.abort();
    }
    handle.shutdown().await;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(cli.log)
        .with_writer(std::io::stderr)
        .init();
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
