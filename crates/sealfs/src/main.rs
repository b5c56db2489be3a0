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
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a server over the disks of this machine.
    Server(ServerArgs),
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
    /// File holding the cluster secret (else SEALFS_SECRET).
    #[arg(long, env = "SEALFS_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// The cluster secret itself (prefer --secret-file; command lines are visible to all users).
    #[arg(long, env = "SEALFS_SECRET", hide_env_values = true)]
    secret: Option<String>,
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
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:7070".into()),
            data_dir,
            disks,
            secret: secret(&self.secret_file.or(file.secret_file), &self.secret)?,
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

async fn server(a: ServerArgs) -> Result<(), String> {
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
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
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
            Cmd::Server(a) => server(a).await,
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
