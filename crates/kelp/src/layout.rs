//! The on-disk layout of shard files (DESIGN 3.3):
//!
//! ```text
//! <disk>/kelp/blades/README.md
//! <disk>/kelp/blades/<xx>/<blade>.<shard>.kelp      xx = low byte of the blade id
//! <disk>/kelp/blades/<xx>/<yy>/<blade>.<shard>.kelp  after <xx> split by the next byte
//! <disk>/kelp/scratch/scratch.<n>.log               scratch copies of cells under update
//! ```
//!
//! A fan-out folder that passes `fanout_files_max` files splits by the next byte of the blade id
//! (an adaptive radix tree); a `.split` file marks a folder that has split. Shard files name
//! themselves and their cells do too, so start-up finds them wherever an operator moved them.

use std::fs;
use std::path::{Path, PathBuf};

use crate::cell::{check_cell, CellCheck, CellId, CELL_BYTES};
use crate::error::{KelpError, Result};
use crate::store::ShardKey;

/// Name of the marker file of a fan-out folder that has split.
const SPLIT_MARKER: &str = ".split";
/// Fan-out depth at most: the four bytes of a blade id.
const FANOUT_DEPTH_MAX: usize = 4;

/// The README written into every blades folder.
pub const BLADES_README: &str = "# kelp shard files\n\n\
This folder holds shard files of sealfs's storage layer (kelp), cell format version 1.\n\n\
- `<xx>/<blade>.<shard>.kelp`: shard `<shard>` (decimal) of blade `<blade>` (8 hex digits); `<xx>` is\n  \
the low byte of the blade id; a folder with a `.split` file has split by the next byte.\n\
- The file is a sequence of 4096-byte cells; cell `i` is stipe `i` (offset `i * 4096`); never-written\n  \
cells are holes and read as zeros.\n\
- Cell header, little-endian: blade id (u32), stipe index (u24), shard (u8), format version (u8),\n  \
sequence (u24), CRC-32C of bytes 0..12 and 16..4096 (u32); then 4080 bytes of payload.\n\
- Stipe `s` holds bytes `[s*k*4080, (s+1)*k*4080)` of the blade's payload stream: shard `j < k` holds\n  \
the `j`-th 4080-byte slice, shards `k..k+m` hold Reed-Solomon parity of the k data payloads.\n\
- Cells name themselves, so shard files may be moved between folders and disks of one server; the\n  \
server finds them again when it starts. Do not edit them: a changed cell fails its CRC and is\n  \
rebuilt from the other shards.\n";

/// The blades folder of a disk.
pub fn blades_dir(disk: &Path) -> PathBuf {
    disk.join("kelp").join("blades")
}

/// The scratch folder of a disk.
pub fn scratch_dir(disk: &Path) -> PathBuf {
    disk.join("kelp").join("scratch")
}

/// Creates the folders and README of a disk if they are missing.
pub fn prepare_disk(disk: &Path) -> Result<()> {
    let blades = blades_dir(disk);
    fs::create_dir_all(&blades)
        .map_err(|e| KelpError::io(format!("create {}", blades.display()), e))?;
    let scratch = scratch_dir(disk);
    fs::create_dir_all(&scratch)
        .map_err(|e| KelpError::io(format!("create {}", scratch.display()), e))?;
    let readme = blades.join("README.md");
    if !readme.exists() {
        fs::write(&readme, BLADES_README)
            .map_err(|e| KelpError::io(format!("write {}", readme.display()), e))?;
    }
    Ok(())
}

/// The file name of a shard file.
pub fn file_name(key: ShardKey) -> String {
    key.to_string()
}

/// Parses a shard file name (`0000002a.05.kelp`).
pub fn parse_file_name(name: &str) -> Option<ShardKey> {
    let stem = name.strip_suffix(".kelp")?;
    let (blade, shard) = stem.split_once('.')?;
    if blade.len() != 8 || shard.len() != 2 || !shard.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(ShardKey {
        blade: u32::from_str_radix(blade, 16).ok()?,
        shard: shard.parse().ok()?,
    })
}

fn byte_dir(blade: u32, depth: usize) -> String {
    format!("{:02x}", (blade >> (8 * depth)) & 0xff)
}

fn count_files(dir: &Path) -> Result<usize> {
    let rd = fs::read_dir(dir).map_err(|e| KelpError::io(format!("list {}", dir.display()), e))?;
    Ok(rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().and_then(parse_file_name).is_some())
        .count())
}

/// The folder where a new shard file of `blade` goes, creating it (and splitting a full fan-out
/// folder) as needed. `moved` receives (old path, new path) of files a split moved.
pub fn folder_for_new(
    disk: &Path,
    blade: u32,
    fanout_files_max: usize,
    moved: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<PathBuf> {
    let mut dir = blades_dir(disk);
    for depth in 0..FANOUT_DEPTH_MAX {
        dir = dir.join(byte_dir(blade, depth));
        fs::create_dir_all(&dir)
            .map_err(|e| KelpError::io(format!("create {}", dir.display()), e))?;
        if dir.join(SPLIT_MARKER).exists() {
            continue;
        }
        if depth + 1 == FANOUT_DEPTH_MAX || count_files(&dir)? < fanout_files_max {
            return Ok(dir);
        }
        split(&dir, depth + 1, moved)?;
    }
    Ok(dir)
}

/// Moves the shard files of `dir` into sub-folders by byte `depth` of their blade id and marks
/// `dir` as split. A crash half way leaves files in both places, which the scan finds anyway.
fn split(dir: &Path, depth: usize, moved: &mut Vec<(PathBuf, PathBuf)>) -> Result<()> {
    let rd = fs::read_dir(dir).map_err(|e| KelpError::io(format!("list {}", dir.display()), e))?;
    for entry in rd.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let Some(key) = name.to_str().and_then(parse_file_name) else {
            continue;
        };
        let sub = dir.join(byte_dir(key.blade, depth));
        fs::create_dir_all(&sub)
            .map_err(|e| KelpError::io(format!("create {}", sub.display()), e))?;
        let to = sub.join(&name);
        fs::rename(entry.path(), &to).map_err(|e| {
            KelpError::io(
                format!("move {} to {}", entry.path().display(), to.display()),
                e,
            )
        })?;
        moved.push((entry.path(), to));
    }
    let marker = dir.join(SPLIT_MARKER);
    fs::write(&marker, b"split by the next byte of the blade id\n")
        .map_err(|e| KelpError::io(format!("write {}", marker.display()), e))
}

/// A shard file found by a scan.
#[derive(Clone, Debug)]
pub struct Found {
    /// Which shard.
    pub key: ShardKey,
    /// Where it is.
    pub path: PathBuf,
    /// Its length in bytes.
    pub len: u64,
}

/// What a scan of the disks found besides usable shard files.
#[derive(Clone, Debug, Default)]
pub struct ScanReport {
    /// Shard files found.
    pub found: usize,
    /// Files whose cells name another blade or shard than their file name (left in place, unused).
    pub mismatched: Vec<PathBuf>,
    /// Second copies of a shard file already found on another disk or folder (left in place, unused).
    pub duplicates: Vec<PathBuf>,
}

/// Finds the shard files under a disk's blades folder, wherever they are in it.
pub fn scan_disk(disk: &Path, report: &mut ScanReport) -> Result<Vec<Found>> {
    let mut found = Vec::new();
    let mut stack = vec![(blades_dir(disk), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let rd =
            fs::read_dir(&dir).map_err(|e| KelpError::io(format!("list {}", dir.display()), e))?;
        for entry in rd {
            let entry = entry.map_err(|e| KelpError::io(format!("list {}", dir.display()), e))?;
            let path = entry.path();
            let ft = entry
                .file_type()
                .map_err(|e| KelpError::io(format!("stat {}", path.display()), e))?;
            if ft.is_dir() && depth < FANOUT_DEPTH_MAX + 2 {
                stack.push((path, depth + 1));
                continue;
            }
            let Some(key) = entry.file_name().to_str().and_then(parse_file_name) else {
                continue;
            };
            if !ft.is_file() {
                continue;
            }
            let len = entry
                .metadata()
                .map_err(|e| KelpError::io(format!("stat {}", path.display()), e))?
                .len();
            if !cells_match_name(&path, key, len)? {
                report.mismatched.push(path);
                continue;
            }
            found.push(Found { key, path, len });
        }
    }
    report.found += found.len();
    Ok(found)
}

/// Checks the first few non-empty cells of a shard file against its name.
fn cells_match_name(path: &Path, key: ShardKey, len: u64) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let file =
        fs::File::open(path).map_err(|e| KelpError::io(format!("open {}", path.display()), e))?;
    let cells = (len / CELL_BYTES as u64).min(64) as usize;
    let mut buf = vec![0u8; cells * CELL_BYTES];
    let n = file
        .read_at(&mut buf, 0)
        .map_err(|e| KelpError::io(format!("read {}", path.display()), e))?;
    let mut checked = 0;
    for (i, cell) in buf[..n - n % CELL_BYTES]
        .chunks_exact(CELL_BYTES)
        .enumerate()
    {
        let id = CellId {
            blade: key.blade,
            stipe: i as u32,
            shard: key.shard,
        };
        match check_cell(cell, id) {
            CellCheck::Valid { .. } => checked += 1,
            CellCheck::Invalid(crate::cell::CellFault::WrongPlace(_)) => return Ok(false),
            _ => {}
        }
        if checked >= 4 {
            break;
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let k = ShardKey {
            blade: 0x2a,
            shard: 5,
        };
        assert_eq!(file_name(k), "0000002a.05.kelp");
        assert_eq!(parse_file_name("0000002a.05.kelp"), Some(k));
        assert_eq!(parse_file_name("0000002a.5.kelp"), None);
        assert_eq!(parse_file_name("2a.05.kelp"), None);
        assert_eq!(parse_file_name("0000002g.05.kelp"), None);
        assert_eq!(parse_file_name("0000002a.05.kelpx"), None);
    }
}
