//! Space reclamation, whole blades at a time (DESIGN 4.6).
//!
//! A holdfast seals a blade once it holds `seal_at` bytes of payload, or holds some and took
//! no append for `idle`: appends to it are refused and clients write to other blades. After `grace` (time for the last fronds appended
//! to it to be recorded in their files, or given up), the holdfast retires it on every
//! metadata partition: from then on no partition takes a new extent in it. Then it counts the
//! extents that still refer to it; when none do, none can again, so it marks the blade
//! Deleting in the map, deletes its shard files and drops it. A blade with blobs (which no
//! file refers to) is never reclaimed, and neither is a blade some file still uses: moving
//! live extents out of mostly empty blades (evacuation) is not done yet.
//!
//! Each server also deletes the shard files on its disks of blades the map no longer has
//! (their deletion missed this server while it was down).

use std::sync::Arc;
use std::time::Duration;

use kelp::ShardStore;
use sealfs_client::blades::BladeHost;
use sealfs_manager::map::BladeChange;
use sealfs_manager::MapCache;
use sealfs_meta::{Errno, MetaClient, Op, Query, Reply, REFS_BLADES_MAX};

/// When blades are sealed and reclaimed.
#[derive(Clone, Copy, Debug)]
pub struct Reclaim {
    /// Payload bytes after which a blade is sealed.
    pub seal_at: u64,
    /// A blade holding data and taking no append for this long is sealed too.
    pub idle: Duration,
    /// How long a blade stays sealed before it may be reclaimed.
    pub grace: Duration,
    /// Time between passes.
    pub every: Duration,
}

impl Default for Reclaim {
    /// Blades of 1 GiB (or idle for an hour), reclaimed 10 minutes after sealing at the
    /// earliest, a pass every 10 s.
    fn default() -> Self {
        Reclaim {
            seal_at: sealfs_client::blades::SEAL_DEFAULT,
            idle: Duration::from_secs(3600),
            grace: Duration::from_secs(600),
            every: Duration::from_secs(10),
        }
    }
}

/// Runs a pass every `r.every`, for ever.
pub async fn run(
    r: Reclaim,
    blades: Arc<BladeHost>,
    meta: MetaClient,
    maps: MapCache,
    store: Arc<dyn ShardStore>,
) {
    blades.set_seal_at(r.seal_at);
    loop {
        tokio::time::sleep(r.every).await;
        pass(&r, &blades, &meta, &maps).await;
        orphans(&maps, &store).await;
    }
}

async fn pass(r: &Reclaim, blades: &BladeHost, meta: &MetaClient, maps: &MapCache) {
    blades.seal_full(r.idle).await;
    let mut candidates = blades.sealed_since(r.grace);
    candidates.truncate(REFS_BLADES_MAX);
    if !candidates.is_empty() {
        match unreferenced(meta, maps, &candidates).await {
            Ok(dead) => {
                for b in dead {
                    if let Err(e) = maps.manager().change_blade(b, BladeChange::Delete).await {
                        tracing::warn!("reclaiming blade {b:08x}: {e}");
                    }
                }
            }
            Err(e) => tracing::debug!("reclaim: the partitions did not all answer: {e}"),
        }
        // The map has the Deleting marks at its next refresh.
        let _ = maps.refresh().await;
    }
    for b in blades.deleting() {
        if let Err(e) = blades.delete(b).await {
            tracing::warn!("deleting blade {b:08x}: {e}");
        }
    }
}

/// Of `candidates`, the blades no extent of any partition refers to, once every partition has
/// retired them all (so that none can take a new extent in them).
async fn unreferenced(
    meta: &MetaClient,
    maps: &MapCache,
    candidates: &[u32],
) -> Result<Vec<u32>, Errno> {
    let parts = maps.get().partitions.len() as u32;
    if parts == 0 {
        return Err(Errno::UNAVAILABLE);
    }
    let retire = Op::Retire {
        blades: candidates.to_vec(),
    };
    for p in 0..parts {
        meta.write(p, &retire).await?.err()?;
    }
    let ask = Query::BladeRefs {
        blades: candidates.to_vec(),
    };
    let mut refs = vec![0u64; candidates.len()];
    for p in 0..parts {
        match meta.read(p, &ask).await?.err()? {
            Reply::Refs(n) if n.len() == refs.len() => {
                for (total, n) in refs.iter_mut().zip(n) {
                    *total += n;
                }
            }
            _ => return Err(Errno::IO),
        }
    }
    Ok(candidates
        .iter()
        .zip(refs)
        .filter(|(_, n)| *n == 0)
        .map(|(b, _)| *b)
        .collect())
}

/// Deletes the shard files on this server's disks of blades the map no longer has.
async fn orphans(maps: &MapCache, store: &Arc<dyn ShardStore>) {
    let map = maps.get();
    if map.epoch == 0 {
        return;
    }
    let Ok(shards) = store.list().await else {
        return;
    };
    for s in shards {
        let b = s.key.blade;
        if b <= map.last_blade() && !map.blades.contains_key(&b) {
            match store.delete(s.key).await {
                Ok(()) => tracing::info!("deleted shard file {} of a reclaimed blade", s.key),
                Err(e) => tracing::warn!("shard file {} of a reclaimed blade: {e}", s.key),
            }
        }
    }
}
