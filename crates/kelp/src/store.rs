//! The shard store interface: what a holdfast and a reader need from the server that holds a
//! shard file. `LocalStore` implements it over local disks; the cluster adds one over the network.
//! Nothing above this interface cares which it has.

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;

/// One shard file: shard `shard` of blade `blade`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardKey {
    /// Blade id.
    pub blade: u32,
    /// Shard position.
    pub shard: u8,
}

impl std::fmt::Display for ShardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}.{:02}.kelp", self.blade, self.shard)
    }
}

/// How a write treats a cell already on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Keep the cell on disk if it is valid and has a newer sequence (a late write of an old
    /// version never overwrites a newer one).
    IfNewer,
    /// Write whatever is given (recovery rolling a stipe back, repair).
    Force,
    /// An update of existing stipes in one request: like `IfNewer`, but each valid cell about to
    /// be overwritten is first copied to the scratch area (synced first when `durable`). This is
    /// prepare and commit fused per shard (docs/kelp.md explains why that is as safe).
    Update {
        /// The replaced version was promised durable: sync the scratch copy before overwriting.
        durable: bool,
    },
}

/// A shard file a store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    /// Which shard.
    pub key: ShardKey,
    /// Index of the disk (within the store) holding it.
    pub disk: u32,
    /// Cells in the file (the highest written stipe + 1).
    pub stipes: u32,
}

/// Cells of shard files on some server's disks.
#[async_trait]
pub trait ShardStore: Send + Sync + 'static {
    /// A short name for errors, logs and metrics (e.g. the server's address).
    fn name(&self) -> &str;

    /// Writes `cells` (a multiple of 4096 bytes: consecutive cells from stipe `first_stipe`) into
    /// the shard file, creating it on disk `disk` if it does not exist. Every cell is checked
    /// before it is written; a write with any invalid cell writes nothing.
    async fn write_cells(
        &self,
        key: ShardKey,
        disk: u32,
        first_stipe: u32,
        cells: Bytes,
        mode: WriteMode,
    ) -> Result<()>;

    /// Reads `count` cells from stipe `first_stipe`; unwritten cells read as zeros (empty).
    /// Fails with `ShardMissing` if the shard file does not exist.
    async fn read_cells(&self, key: ShardKey, first_stipe: u32, count: u32) -> Result<Bytes>;

    /// Phase one of an update: copy the current cell of `stipe` to the scratch area, synced to
    /// disk first when `durable` (the version being replaced was promised durable).
    async fn prepare(&self, key: ShardKey, stipe: u32, durable: bool) -> Result<()>;

    /// Phase two of an update: write the new cell (an `IfNewer` write of one cell).
    async fn commit(&self, key: ShardKey, disk: u32, stipe: u32, cell: Bytes) -> Result<()> {
        self.write_cells(key, disk, stipe, cell, WriteMode::IfNewer)
            .await
    }

    /// Drops the scratch copy of `stipe` once the update is complete (or resolved by recovery),
    /// if the copy's sequence is not newer than `upto` (a late release never drops the copy a
    /// later update took).
    async fn release(&self, key: ShardKey, stipe: u32, upto: u32) -> Result<()>;

    /// Puts the scratch copy of `stipe` back into the shard file and drops it.
    async fn abort(&self, key: ShardKey, disk: u32, stipe: u32) -> Result<()>;

    /// The scratch copies held for `key` (whole cells; they name their stipe).
    async fn scratch(&self, key: ShardKey) -> Result<Vec<Bytes>>;

    /// Makes every write to `key`'s disk so far durable. Concurrent syncs on a disk share one
    /// round of `fdatasync`.
    async fn sync(&self, key: ShardKey) -> Result<()>;

    /// The shard files this store holds.
    async fn list(&self) -> Result<Vec<ShardInfo>>;

    /// Cells in `key`'s shard file, or None if the store has no such file.
    async fn stipes(&self, key: ShardKey) -> Result<Option<u32>>;

    /// Deletes a shard file (its blade was evacuated).
    async fn delete(&self, key: ShardKey) -> Result<()>;
}
