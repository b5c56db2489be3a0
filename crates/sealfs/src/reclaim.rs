//! Space reclamation, whole blades at a time (DESIGN 4.6).
//!
//! A holdfast seals a blade once it holds `seal_at` bytes of payload, or holds some and took
//! no append for `idle`: appends to it are refused and clients write to other blades. After
//! `grace` (time for the last fronds appended to it to be recorded in their files, or given
//! up), the holdfast retires it on every metadata partition: from then on no partition takes
//! a new extent in it. Then it counts the extents that still refer to it; when none do, none
//! can again, so it marks the blade Deleting in the map, deletes its shard files (again at
//! each pass while a shard's server does not answer) and, once two passes found them all
//! deleted, drops it. A blade with blobs (which no file refers to) is never reclaimed, and
//! neither is a blade some file still uses: moving live extents out of mostly empty blades
//! (evacuation) is not done yet.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Time between counts of the references to sealed blades still in use (a count reads
    /// every partition's extents); newly retired blades are counted at once.
    pub recount: Duration,
}

impl Default for Reclaim {
    /// Blades of 1 GiB (or idle for an hour), reclaimed 10 minutes after sealing at the
    /// earliest, a pass every 10 s, the blades still in use counted again every 10 minutes.
    fn default() -> Self {
        Reclaim {
            seal_at: sealfs_client::blades::SEAL_DEFAULT,
            idle: Duration::from_secs(3600),
            grace: Duration::from_secs(600),
            every: Duration::from_secs(10),
            recount: Duration::from_secs(600),
        }
    }
}

/// Runs a pass every `r.every`, for ever.
pub async fn run(r: Reclaim, blades: Arc<BladeHost>, meta: MetaClient, maps: MapCache) {
    blades.set_seal_at(r.seal_at);
    let mut state = Passes::default();
    loop {
        tokio::time::sleep(r.every).await;
        state.pass(&r, &blades, &meta, &maps).await;
    }
}

/// What the passes of one server remember.
#[derive(Default)]
struct Passes {
    /// Blades retired on every partition by this server (since its start).
    retired: HashSet<u32>,
    /// When the sealed blades were last counted.
    counted: Option<Instant>,
}

impl Passes {
    /// Seals, retires new candidates, counts the references to all of them when some are new
    /// or `r.recount` has passed (a count scans every partition's extents), and deletes the
    /// blades none refers to.
    async fn pass(&mut self, r: &Reclaim, blades: &BladeHost, meta: &MetaClient, maps: &MapCache) {
        blades.seal_full(r.idle).await;
        let candidates = blades.sealed_since(r.grace);
        let sealed: HashSet<u32> = candidates.iter().copied().collect();
        self.retired.retain(|b| sealed.contains(b));
        let fresh: Vec<u32> = candidates
            .iter()
            .copied()
            .filter(|b| !self.retired.contains(b))
            .collect();
        let due = self.counted.is_none_or(|t| t.elapsed() >= r.recount);
        if candidates.is_empty() || (fresh.is_empty() && !due) {
            return self.finish(blades).await;
        }
        for chunk in fresh.chunks(REFS_BLADES_MAX) {
            match retire(meta, maps, chunk).await {
                Ok(()) => self.retired.extend(chunk),
                Err(e) => tracing::warn!("reclaim: the partitions did not all retire: {e}"),
            }
        }
        let retired: Vec<u32> = candidates
            .into_iter()
            .filter(|b| self.retired.contains(b))
            .collect();
        let mut all_counted = true;
        for chunk in retired.chunks(REFS_BLADES_MAX) {
            match unreferenced(meta, maps, chunk).await {
                Ok(dead) => {
                    for b in dead {
                        let change = maps.manager().change_blade(b, BladeChange::Delete).await;
                        if let Err(e) = change {
                            tracing::warn!("reclaiming blade {b:08x}: {e}");
                        }
                    }
                }
                Err(e) => {
                    all_counted = false;
                    tracing::warn!("reclaim: the partitions did not all answer: {e}");
                }
            }
        }
        if all_counted {
            self.counted = Some(Instant::now());
        }
        // The map has the Deleting marks at its next refresh.
        let _ = maps.refresh().await;
        self.finish(blades).await
    }

    /// Deletes the shard files of the blades marked Deleting.
    async fn finish(&self, blades: &BladeHost) {
        for b in blades.deleting() {
            if let Err(e) = blades.delete(b).await {
                tracing::warn!("deleting blade {b:08x}: {e}");
            }
        }
    }
}

/// Retires `blades` on every partition: none takes a new extent in them.
async fn retire(meta: &MetaClient, maps: &MapCache, blades: &[u32]) -> Result<(), Errno> {
    let parts = maps.get().partitions.len() as u32;
    if parts == 0 {
        return Err(Errno::UNAVAILABLE);
    }
    let op = Op::Retire {
        blades: blades.to_vec(),
    };
    for p in 0..parts {
        meta.write(p, &op).await?.err()?;
    }
    Ok(())
}

/// Of `candidates` (retired on every partition, so that none can take a new extent in them),
/// the blades no extent of any partition refers to.
async fn unreferenced(
    meta: &MetaClient,
    maps: &MapCache,
    candidates: &[u32],
) -> Result<Vec<u32>, Errno> {
    let parts = maps.get().partitions.len() as u32;
    if parts == 0 {
        return Err(Errno::UNAVAILABLE);
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
