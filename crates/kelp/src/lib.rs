//! kelp: the erasure-coded storage layer of sealfs.
//!
//! File contents are cut into fronds (checksummed records) appended into blades (32 GiB address
//! spaces), which are striped as stipes of 4 KiB self-verifying cells over many disks with
//! Reed-Solomon coding. The holdfast of a blade (the server holding shard 0) coordinates appends,
//! sequence numbers, two-phase updates and repair. This crate has no sockets and no FUSE: shard
//! stores are reached through the [`ShardStore`] interface.

pub mod address;
pub mod cell;
pub mod error;
pub mod fault;
pub mod frond;
pub mod holdfast;
pub mod index;
pub mod latency;
pub mod layout;
pub mod local;
pub mod lock;
pub mod profile;
pub mod read;
pub mod scratch;
pub mod stipe;
pub mod store;
pub mod sync;

pub use address::{Address, Reference, BLADE_PAYLOAD_BYTES_MAX};
pub use error::{KelpError, Result};
pub use holdfast::{Holdfast, HoldfastConfig, RepairReport};
pub use local::{LocalStore, LocalStoreConfig, DIRECT_WRITE_BYTES_MIN};
pub use profile::Profile;
pub use read::{BladeLayout, BladeReader, HedgeConfig, ShardPlacement, SuspectHook};
pub use store::{ShardInfo, ShardKey, ShardStore, WriteMode};
