//! The client commands: file access through the client library, without FUSE.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use sealfs_client::{Error, FileKind, NewFile, Sealfs};
use sealfs_meta::{Attr, SetAttr};
use sealfs_rpc::ClusterKey;

use crate::{secret, SecretArgs};

/// Bytes a put or get moves per call (a file larger is streamed in pieces of this size).
const PIECE: usize = 32 << 20;

#[derive(Args)]
pub struct Common {
    /// The volume.
    #[arg(long, default_value = "default", env = "SEALFS_VOLUME")]
    volume: String,
    #[command(flatten)]
    secret: SecretArgs,
}

#[derive(Args)]
pub struct PutArgs {
    /// Local file, or - for standard input.
    local: PathBuf,
    /// Path in the volume (an existing directory receives the file under its own name).
    path: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct GetArgs {
    /// Path in the volume.
    path: String,
    /// Local file, or - for standard output.
    local: PathBuf,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct PathArgs {
    /// Path in the volume.
    #[arg(default_value = "/")]
    path: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct RmArgs {
    /// Paths in the volume.
    #[arg(required = true)]
    paths: Vec<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct MkdirArgs {
    /// Paths in the volume.
    #[arg(required = true)]
    paths: Vec<String>,
    /// Make parents as needed; no error if it exists.
    #[arg(short, long)]
    parents: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct MvArgs {
    /// Source path.
    from: String,
    /// Destination path (an existing directory receives it under its own name).
    to: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Subcommand)]
pub enum BlobCmd {
    /// Store a local file (or - for standard input, up to 64 MiB) as a blob; prints its reference.
    Put {
        local: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Write the blob at REF to a local file (or - for standard output).
    Get {
        reference: String,
        #[arg(default_value = "-")]
        local: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Replace the blob at REF in place with a local file of the same length; prints the new
    /// reference.
    Update {
        reference: String,
        local: PathBuf,
        #[command(flatten)]
        common: Common,
    },
}

fn read_local(p: &PathBuf) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let max = kelp::frond::FROND_DATA_BYTES_MAX as u64;
    let r: Box<dyn Read> = if p.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?)
    };
    r.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("reading {}: {e}", p.display()))?;
    if buf.len() as u64 > max {
        return Err(format!("{}: a blob holds at most 64 MiB", p.display()));
    }
    Ok(buf)
}

pub async fn blob(manager: Option<String>, b: BlobCmd) -> Result<(), String> {
    match b {
        BlobCmd::Put { local, common } => {
            let fs = connect(manager, &common).await?;
            let data = read_local(&local)?;
            let r = fs
                .blob_put(&data)
                .await
                .map_err(|e| format!("blob put: {e}"))?;
            println!("{}", sealfs_client::format_ref(r));
        }
        BlobCmd::Get {
            reference,
            local,
            common,
        } => {
            let r = sealfs_client::parse_ref(&reference)?;
            let fs = connect(manager, &common).await?;
            let data = fs
                .blob_get(r)
                .await
                .map_err(|e| format!("blob {reference}: {e}"))?;
            if local.as_os_str() == "-" {
                std::io::stdout()
                    .lock()
                    .write_all(&data)
                    .map_err(|e| e.to_string())?;
            } else {
                std::fs::write(&local, &data)
                    .map_err(|e| format!("cannot write {}: {e}", local.display()))?;
            }
        }
        BlobCmd::Update {
            reference,
            local,
            common,
        } => {
            let r = sealfs_client::parse_ref(&reference)?;
            let data = read_local(&local)?;
            if data.len() != r.len as usize {
                return Err(format!(
                    "blob {reference} holds {} bytes; {} has {} (an update keeps the length)",
                    r.len,
                    local.display(),
                    data.len()
                ));
            }
            let fs = connect(manager, &common).await?;
            let n = fs
                .blob_update(r, &data)
                .await
                .map_err(|e| format!("blob {reference}: {e}"))?;
            println!("{}", sealfs_client::format_ref(n));
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume: `sealfs volume create NAME --quota 100G --ec 8+8`.
    Create {
        name: String,
        /// Bytes allowed (suffixes K, M, G, T; 0 for no limit).
        #[arg(long, default_value = "0")]
        quota: String,
        /// Erasure code k+m (w, the extra acknowledgements, is m/2).
        #[arg(long, default_value = "8+8")]
        ec: String,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Delete a volume (its files become unreachable).
    Delete {
        name: String,
        #[command(flatten)]
        secret: SecretArgs,
    },
}

fn manager_of(m: Option<String>) -> Result<String, String> {
    m.ok_or_else(|| {
        "this command needs the manager: pass --manager ADDR or set SEALFS_MANAGER".into()
    })
}

fn key_of(s: &SecretArgs) -> Result<ClusterKey, String> {
    Ok(ClusterKey::from_secret(&secret(&s.secret_file, &s.secret)?))
}

async fn connect(manager: Option<String>, c: &Common) -> Result<Sealfs, String> {
    let m = manager_of(manager)?;
    Sealfs::connect(&m, key_of(&c.secret)?, &c.volume, Duration::from_secs(10)).await
}

fn say(path: &str) -> impl Fn(Error) -> String + '_ {
    move |e| format!("{path}: {e}")
}

fn mode_string(a: &Attr) -> String {
    let t = match a.kind {
        FileKind::File => '-',
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        FileKind::Fifo => 'p',
        FileKind::Socket => 's',
        FileKind::CharDev => 'c',
        FileKind::BlockDev => 'b',
    };
    let mut s = String::from(t);
    for shift in [6, 3, 0] {
        let b = (a.perm >> shift) & 7;
        s.push(if b & 4 != 0 { 'r' } else { '-' });
        s.push(if b & 2 != 0 { 'w' } else { '-' });
        s.push(if b & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn secs(n: i64) -> String {
    format!(
        "{}.{:09}",
        n.div_euclid(1_000_000_000),
        n.rem_euclid(1_000_000_000)
    )
}

/// Where a put or mv lands: into `to` if it is a directory, else at `to`.
async fn target(fs: &Sealfs, to: &str, name: &str) -> Result<(u64, String), String> {
    if let Ok(ino) = fs.resolve(to).await {
        if fs.getattr(ino).await.map_err(say(to))?.kind == FileKind::Dir {
            return Ok((ino, name.to_string()));
        }
    }
    let (parent, last) = fs.resolve_parent(to).await.map_err(say(to))?;
    Ok((parent, last.to_string()))
}

pub async fn put(manager: Option<String>, a: PutArgs) -> Result<(), String> {
    let fs = connect(manager, &a.common).await?;
    let mut input: Box<dyn Read> = if a.local.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(&a.local)
                .map_err(|e| format!("cannot read {}: {e}", a.local.display()))?,
        )
    };
    let base = a
        .local
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "stdin".into());
    let (parent, name) = target(&fs, &a.path, &base).await?;
    let f = fs
        .create(
            parent,
            name.as_bytes(),
            &NewFile {
                exclusive: false,
                ..NewFile::file(0o644)
            },
        )
        .await
        .map_err(say(&a.path))?;
    if f.kind != FileKind::File {
        return Err(format!("{}: not a regular file", a.path));
    }
    if f.size > 0 {
        fs.setattr(
            f.ino,
            SetAttr {
                size: Some(0),
                ..Default::default()
            },
        )
        .await
        .map_err(say(&a.path))?;
    }
    let mut off = 0u64;
    let mut buf = vec![0u8; PIECE];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = input
                .read(&mut buf[filled..])
                .map_err(|e| format!("reading {}: {e}", a.local.display()))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        fs.write(f.ino, off, &buf[..filled])
            .await
            .map_err(say(&a.path))?;
        off += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    Ok(())
}

pub async fn get(manager: Option<String>, a: GetArgs) -> Result<(), String> {
    let fs = connect(manager, &a.common).await?;
    let ino = fs.resolve(&a.path).await.map_err(say(&a.path))?;
    let attr = fs.getattr(ino).await.map_err(say(&a.path))?;
    if attr.kind != FileKind::File {
        return Err(format!("{}: not a regular file", a.path));
    }
    let mut out: Box<dyn Write> = if a.local.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(&a.local)
                .map_err(|e| format!("cannot write {}: {e}", a.local.display()))?,
        )
    };
    let mut off = 0u64;
    while off < attr.size {
        let bytes = fs
            .read(ino, off, PIECE as u64)
            .await
            .map_err(say(&a.path))?;
        if bytes.is_empty() {
            break;
        }
        out.write_all(&bytes)
            .map_err(|e| format!("writing {}: {e}", a.local.display()))?;
        off += bytes.len() as u64;
    }
    out.flush()
        .map_err(|e| format!("writing {}: {e}", a.local.display()))?;
    Ok(())
}

pub async fn ls(manager: Option<String>, a: PathArgs) -> Result<(), String> {
    let fs = connect(manager, &a.common).await?;
    let ino = fs.resolve(&a.path).await.map_err(say(&a.path))?;
    let attr = fs.getattr(ino).await.map_err(say(&a.path))?;
    let mut out = std::io::stdout().lock();
    if attr.kind != FileKind::Dir {
        let _ = writeln!(out, "{} {:>12} {}", mode_string(&attr), attr.size, a.path);
        return Ok(());
    }
    for e in fs.readdir_all(ino).await.map_err(say(&a.path))? {
        let name = String::from_utf8_lossy(&e.name);
        match fs.getattr(e.ino).await {
            Ok(at) => {
                let _ = writeln!(out, "{} {:>12} {name}", mode_string(&at), at.size);
            }
            Err(err) => {
                let _ = writeln!(out, "?????????? {:>12} {name} ({err})", "?");
            }
        }
    }
    Ok(())
}

pub async fn stat(manager: Option<String>, a: PathArgs) -> Result<(), String> {
    let fs = connect(manager, &a.common).await?;
    let ino = fs.resolve(&a.path).await.map_err(say(&a.path))?;
    let t = fs.getattr(ino).await.map_err(say(&a.path))?;
    println!("path {}", a.path);
    println!(
        "inode {:#x} (partition {})",
        t.ino,
        sealfs_meta::partition_of(t.ino)
    );
    println!("kind {:?}", t.kind);
    println!("mode {} ({:o})", mode_string(&t), t.perm);
    println!("size {}", t.size);
    println!("links {}", t.nlink);
    println!("owner {}:{}", t.uid, t.gid);
    println!("mtime {}", secs(t.mtime));
    println!("ctime {}", secs(t.ctime));
    if t.kind == FileKind::Symlink {
        let target = fs.readlink(ino).await.map_err(say(&a.path))?;
        println!("target {}", String::from_utf8_lossy(&target));
    }
    Ok(())
}

pub async fn rm(manager: Option<String>, a: RmArgs) -> Result<(), String> {
    let fs = connect(manager, &a.common).await?;
    for path in &a.paths {
        let (parent, name) = fs.resolve_parent(path).await.map_err(say(path))?;
        let (_, kind) = fs
            .lookup(parent, name.as_bytes())
            .await
            .map_err(say(path))?;
        if kind == FileKind::Dir {
            fs.rmdir(parent, name.as_bytes()).await.map_err(say(path))?;
        } else {
            fs.unlink(parent, name.as_bytes())
                .await
                .map_err(say(path))?;
        }
    }
    Ok(())
}

pub async fn mkdir(manager: Option<String>, a: MkdirArgs) -> Result<(), String> {
    let fs = connect(manager, &a.common).await?;
    for path in &a.paths {
        if a.parents {
            let mut ino = fs.root();
            for name in sealfs_client::split(path).map_err(say(path))? {
                ino = match fs.lookup(ino, name.as_bytes()).await {
                    Ok((i, FileKind::Dir)) => i,
                    Ok(_) => return Err(format!("{path}: {name} is not a directory")),
                    Err(Error::NOENT) => match fs.mkdir(ino, name.as_bytes(), 0o755, 0, 0).await {
                        Ok(at) => at.ino,
                        // Made meanwhile by someone else.
                        Err(Error::EXIST) => {
                            fs.lookup(ino, name.as_bytes()).await.map_err(say(path))?.0
                        }
                        Err(e) => return Err(say(path)(e)),
                    },
                    Err(e) => return Err(say(path)(e)),
                };
            }
        } else {
            let (parent, name) = fs.resolve_parent(path).await.map_err(say(path))?;
            fs.mkdir(parent, name.as_bytes(), 0o755, 0, 0)
                .await
                .map_err(say(path))?;
        }
    }
    Ok(())
}

pub async fn mv(manager: Option<String>, a: MvArgs) -> Result<(), String> {
    let fs = connect(manager, &a.common).await?;
    let (sp, sn) = fs.resolve_parent(&a.from).await.map_err(say(&a.from))?;
    let (dp, dn) = target(&fs, &a.to, sn).await?;
    fs.rename(sp, sn.as_bytes(), dp, dn.as_bytes(), 0)
        .await
        .map_err(|e| format!("{} -> {}: {e}", a.from, a.to))
}

/// Parses a size with an optional K, M, G, T or P suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        Some('P') => (&t[..t.len() - 1], 1 << 50),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("size {s:?}: use a number with an optional K, M, G, T or P suffix"))
}

pub async fn volume(manager: Option<String>, v: VolumeCmd) -> Result<(), String> {
    let m = manager_of(manager)?;
    match v {
        VolumeCmd::Create {
            name,
            quota,
            ec,
            secret,
        } => {
            let quota = parse_size(&quota)?;
            let p = kelp::Profile::parse(&ec).map_err(|e| format!("--ec {ec}: {e}"))?;
            let c = sealfs_manager::ManagerClient::new(&m, key_of(&secret)?);
            let id = c
                .create_volume(&name, quota, p.k, p.m, p.w)
                .await
                .map_err(|e| e.to_string())?;
            println!("volume {name} created (id {id})");
        }
        VolumeCmd::List { secret } => {
            let c = sealfs_manager::ManagerClient::new(&m, key_of(&secret)?);
            let map = c.map().await.map_err(|e| e.to_string())?;
            for (name, v) in &map.volumes {
                let q = if v.quota == 0 {
                    "no quota".to_string()
                } else {
                    format!("quota {} bytes", v.quota)
                };
                println!("{name} id {} ec {}+{}+{} {q}", v.id, v.k, v.m, v.w);
            }
        }
        VolumeCmd::Delete { name, secret } => {
            let c = sealfs_manager::ManagerClient::new(&m, key_of(&secret)?);
            c.delete_volume(&name).await.map_err(|e| e.to_string())?;
            println!("volume {name} deleted");
        }
    }
    Ok(())
}
