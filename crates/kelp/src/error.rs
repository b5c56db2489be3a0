//! Errors of the storage layer: what failed, on what, and what to do.

use std::io;

/// Result of kelp operations.
pub type Result<T, E = KelpError> = std::result::Result<T, E>;

/// An operating error of the storage layer. Programmer errors are assertions, not variants.
#[derive(Debug, thiserror::Error)]
pub enum KelpError {
    /// A file operation failed; `context` names the disk and file.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, on which path.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The shard file does not exist on this store (never written, deleted or lost with its disk).
    #[error("shard file {0} is missing on store {1}")]
    ShardMissing(String, String),
    /// Input from a caller, a disk or a peer was malformed or out of range.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A frond's BLAKE3 checksum or header did not match.
    #[error("frond at {address:#x}: {what}")]
    Frond {
        /// The frond's address.
        address: u64,
        /// What did not match.
        what: String,
    },
    /// Too few valid cells of a stipe could be read to reconstruct it.
    #[error(
        "blade {blade:08x} stipe {stipe}: unreadable ({detail}); repair needs {k} valid cells"
    )]
    Unreadable {
        /// Blade id.
        blade: u32,
        /// Stipe index.
        stipe: u32,
        /// Data cells needed.
        k: usize,
        /// What was seen per shard.
        detail: String,
    },
    /// Too few shard stores acknowledged a write, sync or prepare.
    #[error(
        "blade {blade:08x}: {op} reached {acked} of the {needed} shard stores it needs ({errors})"
    )]
    Quorum {
        /// Blade id.
        blade: u32,
        /// The operation.
        op: &'static str,
        /// How many acknowledged.
        acked: usize,
        /// How many were needed.
        needed: usize,
        /// How many of those that failed had no space left on their disk.
        full: usize,
        /// The first errors seen.
        errors: String,
    },
    /// A shard store's disk has no space left (what another server's store said of its own).
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The blade has no room left for the requested bytes.
    #[error(
        "blade {blade:08x} is full: {needed} bytes requested at offset {offset}, limit {limit}"
    )]
    BladeFull {
        /// Blade id.
        blade: u32,
        /// Current append pointer in bytes.
        offset: u64,
        /// Bytes requested.
        needed: u64,
        /// Blade payload limit in bytes.
        limit: u64,
    },
    /// A store or holdfast was stopped (crash injection, shutdown).
    #[error("stopped: {0}")]
    Stopped(String),
    /// An operation passed its deadline.
    #[error("timed out after {ms} ms: {what}")]
    Timeout {
        /// What timed out.
        what: String,
        /// The deadline in milliseconds.
        ms: u64,
    },
}

impl KelpError {
    /// Wraps an I/O error with a description of what was done on which path.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        KelpError::Io {
            context: context.into(),
            source,
        }
    }

    /// The same error again, for telling several waiters (the I/O source becomes text).
    pub fn duplicate(&self) -> Self {
        match self {
            KelpError::Quorum {
                blade,
                op,
                acked,
                needed,
                full,
                errors,
            } => KelpError::Quorum {
                blade: *blade,
                op,
                acked: *acked,
                needed: *needed,
                full: *full,
                errors: errors.clone(),
            },
            e if e.is_no_space() => KelpError::NoSpace(e.to_string()),
            KelpError::Invalid(m) => KelpError::Invalid(m.clone()),
            KelpError::Stopped(m) => KelpError::Stopped(m.clone()),
            other => KelpError::Stopped(other.to_string()),
        }
    }

    /// Whether it failed for want of space: a disk with none left (ENOSPC), or a quorum
    /// missed with some shards out of space (room elsewhere may take the write).
    pub fn is_no_space(&self) -> bool {
        match self {
            KelpError::NoSpace(_) => true,
            KelpError::Io { source, .. } => {
                source.kind() == io::ErrorKind::StorageFull || source.raw_os_error() == Some(28)
            }
            KelpError::Quorum { full, .. } => *full > 0,
            _ => false,
        }
    }

    /// An invalid-input error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        KelpError::Invalid(msg.into())
    }
}
