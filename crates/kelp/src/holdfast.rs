//! The holdfast of a blade (DESIGN 4.2, 4.3, 4.5): the single coordinator of its appends,
//! sequence numbers, stipe locks, two-phase updates, recovery and repair.
//!
//! Appends queue up (bounded in count and bytes) and a batcher lays them out back to back in the
//! blade's stream, so that a stream of small appends mostly fills whole stipes. The open tail
//! stipe is kept in memory; an append that lands in it updates that stipe through the two-phase
//! path (prepare: each shard keeps a scratch copy of its cell; commit: each shard writes the new
//! cell). Fresh stipes are written directly with sequence 1. An append is acknowledged once
//! k + w shards have written it; the rest finish in the background (or fail, and the stipes are
//! marked for repair). All state is recoverable from the cells: `open` rolls interrupted updates
//! forward or back and finds the append pointer again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::address::{check_range, Address, Reference, BLADE_PAYLOAD_BYTES_MAX};
use crate::cell::{
    check_cell, read_header, seq_cmp, seq_next, seq_prev, CellCheck, CellId, CELL_BYTES,
    CELL_PAYLOAD_BYTES,
};
use crate::error::{KelpError, Result};
use crate::frond;
use crate::index::FrondIndex;
use crate::lock::{RangeGuard, RangeLocks};
use crate::read::{decode_at, BladeLayout, BladeReader, Got, HedgeConfig};
use crate::stipe::StipeCodec;
use crate::store::WriteMode;

/// Settings of a holdfast. Every queue has a bound.
#[derive(Clone, Debug)]
pub struct HoldfastConfig {
    /// Bytes of fronds one batch gathers at most (a batch may pass it by its last frond).
    pub batch_bytes_max: usize,
    /// Bytes of fronds waiting in the append queue at most; appenders wait beyond it.
    pub queue_bytes_max: usize,
    /// Fronds waiting in the append queue at most.
    pub queue_len_max: usize,
    /// Batches being written at once at most.
    pub batches_inflight_max: usize,
    /// Reads: when to hedge, store call deadlines.
    pub hedge: HedgeConfig,
    /// Deadline of one store write, prepare, release or sync.
    pub op_timeout: Duration,
    /// Stipes remembered as needing repair at most (past it, a full scrub is asked for).
    pub degraded_max: usize,
    /// How long the shards beyond the first k + w may take to write before the stipes are
    /// released and marked for repair (their writes still finish in the background).
    pub straggler_grace: Duration,
    /// Stipes at the end of a blade that recovery checks (appends in flight at a crash are there).
    pub recovery_tail_stipes: u32,
    /// Rebuild the frond index at open by walking the blade.
    pub rebuild_index: bool,
}

impl Default for HoldfastConfig {
    fn default() -> Self {
        HoldfastConfig {
            batch_bytes_max: 8 << 20,
            queue_bytes_max: 64 << 20,
            queue_len_max: 4096,
            batches_inflight_max: 4,
            hedge: HedgeConfig::default(),
            op_timeout: Duration::from_secs(30),
            degraded_max: 1 << 16,
            straggler_grace: Duration::from_millis(500),
            recovery_tail_stipes: 2048,
            rebuild_index: true,
        }
    }
}

/// What a recovery, repair or scrub pass found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Stipes examined.
    pub stipes_checked: u64,
    /// Stipes whose cells did not all agree.
    pub stipes_fixed: u64,
    /// Cells written to bring a stipe back to its current version.
    pub cells_rewritten: u64,
    /// Stipes rolled back to an older version (an interrupted update that did not reach k cells).
    pub rolled_back: u64,
    /// Cells that could not be rewritten (their store failed); still to repair.
    pub cells_failed: u64,
    /// The stipes of those cells: they stay on the holdfast's list of degraded stipes.
    pub stipes_failed: Vec<u32>,
    /// Stipes with fewer than k valid cells of any version: data lost beyond the code's reach.
    pub unrecoverable: Vec<u32>,
}

impl RepairReport {
    /// Adds what another pass found (of another range or blade) to this one.
    pub fn add(&mut self, o: RepairReport) {
        self.stipes_checked += o.stipes_checked;
        self.stipes_fixed += o.stipes_fixed;
        self.cells_rewritten += o.cells_rewritten;
        self.rolled_back += o.rolled_back;
        self.cells_failed += o.cells_failed;
        self.stipes_failed.extend(o.stipes_failed);
        self.unrecoverable.extend(o.unrecoverable);
    }
}

/// How the existing stipes at the start of a run are updated.
#[derive(Clone, Copy, Debug)]
enum Prepare {
    /// All stipes are new.
    None,
    /// The first N stipes exist; each shard copies its cell to scratch in the same request that
    /// overwrites it (appends into the tail stipe).
    Fused(u32),
    /// The first N stipes exist; every shard prepares before any commits (in-place updates).
    TwoPhase(u32),
}

struct AppendReq {
    frond: Bytes,
    reply: oneshot::Sender<Result<Reference>>,
    _queued: OwnedSemaphorePermit,
}

/// The open tail stipe: its newest version, kept in memory for the next append.
struct Tail {
    stipe: u32,
    seq: u32,
    data: Vec<u8>,
    /// `syncs_started` when the stipe got its first bytes; a later sync may have promised them.
    born_sync: u64,
}

struct State {
    /// Next free byte of the stream.
    append: u64,
    tail: Option<Tail>,
    /// Sequences above 1 of recently written stipes: a bounded cache (the cells hold the truth).
    seqs: BTreeMap<u32, u32>,
    index: FrondIndex,
    degraded: BTreeSet<u32>,
    /// Degraded stipes a repair pass has taken and not yet finished (still degraded to a
    /// reader of [`Holdfast::degraded`]).
    repairing: BTreeSet<u32>,
    degraded_overflow: bool,
    syncs_started: u64,
    recovery: RepairReport,
    /// Scratch copies of tail updates to drop: stipe -> (sequence it protected, durable).
    releases: BTreeMap<u32, (u32, bool)>,
}

/// Sequences kept in the holdfast's cache at most.
const SEQS_CACHED_MAX: usize = 1 << 16;

impl State {
    fn remember_seq(&mut self, stipe: u32, seq: u32) {
        self.seqs.insert(stipe, seq);
        if self.seqs.len() > SEQS_CACHED_MAX {
            // The oldest stipes are the least likely to be written again.
            self.seqs.pop_first();
        }
    }
}

/// Stipes whose scratch copies wait for release before they are flushed without a sync.
const RELEASES_PENDING_MAX: usize = 64;

struct Shared {
    layout: BladeLayout,
    /// Encoder (its matrices are built once per blade).
    codec: StipeCodec,
    reader: BladeReader,
    cfg: HoldfastConfig,
    locks: Arc<RangeLocks>,
    state: Mutex<State>,
    queued_bytes: Arc<Semaphore>,
    inflight: Arc<Semaphore>,
    tasks: AtomicUsize,
    idle: Notify,
    /// Per shard, its syncs still running after the sync that started them returned.
    syncs_behind: Vec<AtomicUsize>,
    /// True while scratch copies are being dropped in the background.
    releasing: std::sync::atomic::AtomicBool,
    /// True once the frond index covers the blade (it is rebuilt after an open).
    index_built: watch::Sender<bool>,
}

/// The coordinator of one blade. Cheap to clone; the batcher stops when the last clone is dropped.
#[derive(Clone)]
pub struct Holdfast {
    sh: Arc<Shared>,
    queue: mpsc::Sender<AppendReq>,
}

type Shards = Vec<(usize, Result<()>)>;

/// Syncs of one shard that may still run after the syncs that started them returned (a slow or
/// hung shard): past that, a sync does not ask that shard again until one of them ends. Syncs
/// that are awaited are not counted: callers bound those.
pub const SYNCS_BEHIND_MAX: usize = 8;

/// `fut` (a call to shard `j`) bounded by `t`: past it, a timeout error.
async fn within<F: std::future::Future<Output = Result<()>>>(
    j: usize,
    t: Duration,
    fut: F,
) -> Result<()> {
    match tokio::time::timeout(t, fut).await {
        Ok(r) => r,
        Err(_) => Err(KelpError::Timeout {
            what: format!("shard {j}"),
            ms: t.as_millis() as u64,
        }),
    }
}

impl Holdfast {
    /// Opens the holdfast of `layout`: recovers the blade from its cells (interrupted updates
    /// rolled forward or back, the append pointer found again) and starts the batcher.
    pub async fn open(layout: BladeLayout, cfg: HoldfastConfig) -> Result<Holdfast> {
        let reader = BladeReader::new(layout.clone(), cfg.hedge.clone());
        let sh = Arc::new(Shared {
            reader,
            locks: Arc::new(RangeLocks::default()),
            state: Mutex::new(State {
                append: 0,
                tail: None,
                seqs: BTreeMap::new(),
                index: FrondIndex::default(),
                degraded: BTreeSet::new(),
                repairing: BTreeSet::new(),
                degraded_overflow: false,
                syncs_started: 0,
                recovery: RepairReport::default(),
                releases: BTreeMap::new(),
            }),
            queued_bytes: Arc::new(Semaphore::new(cfg.queue_bytes_max)),
            codec: StipeCodec::new(layout.profile),
            inflight: Arc::new(Semaphore::new(cfg.batches_inflight_max)),
            tasks: AtomicUsize::new(0),
            idle: Notify::new(),
            syncs_behind: (0..layout.profile.n())
                .map(|_| AtomicUsize::new(0))
                .collect(),
            releasing: std::sync::atomic::AtomicBool::new(false),
            index_built: watch::Sender::new(false),
            layout,
            cfg,
        });
        let end = sh.recover().await?;
        if sh.cfg.rebuild_index {
            // The walk reads a header per frond: appends need only the append pointer, so it
            // runs beside them.
            let sh = sh.clone();
            tokio::spawn(async move {
                sh.rebuild_index(end).await;
                sh.index_built.send_replace(true);
            });
        } else {
            sh.index_built.send_replace(true);
        }
        let (tx, rx) = mpsc::channel(sh.cfg.queue_len_max);
        tokio::spawn(batcher(sh.clone(), rx));
        Ok(Holdfast { sh, queue: tx })
    }

    /// The blade's layout.
    pub fn layout(&self) -> &BladeLayout {
        &self.sh.layout
    }

    /// A reader of this blade (shares the latency tracking).
    pub fn reader(&self) -> &BladeReader {
        &self.sh.reader
    }

    /// Appends an encoded frond (see [`frond::encode`]); returns its reference once k + w shards
    /// hold it. The checksum is verified before anything is written.
    pub async fn append(&self, encoded: Bytes) -> Result<Reference> {
        frond::verify(&encoded, 0)?;
        let permits = encoded.len().min(self.sh.cfg.queue_bytes_max) as u32;
        let queued = self
            .sh
            .queued_bytes
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| KelpError::Stopped("holdfast closed".into()))?;
        let (reply, rx) = oneshot::channel();
        self.queue
            .send(AppendReq {
                frond: encoded,
                reply,
                _queued: queued,
            })
            .await
            .map_err(|_| KelpError::Stopped("holdfast batcher stopped".into()))?;
        rx.await
            .map_err(|_| KelpError::Stopped("append dropped by a stopping holdfast".into()))?
    }

    /// Encodes `data` as a frond and appends it.
    pub async fn append_data(&self, data: &[u8]) -> Result<Reference> {
        self.append(frond::encode(data)?).await
    }

    /// Reads and verifies the frond at `r`.
    pub async fn read(&self, r: Reference) -> Result<Bytes> {
        self.sh.reader.read_frond(r).await
    }

    /// Replaces the data of the frond at `r` with `encoded` of the same length, in place, through
    /// the two-phase update; returns the reference with the new sequence.
    pub async fn update(&self, r: Reference, encoded: Bytes) -> Result<Reference> {
        self.sh.clone().update(r, encoded).await
    }

    /// Makes every acknowledged append and update durable on k + w shards. Returns as soon as
    /// k + w shards have synced (or too many failed); the others' syncs go on in the
    /// background, so a slow or hung shard does not hold it up.
    pub async fn sync(&self) -> Result<()> {
        self.sh.state.lock().expect("state").syncs_started += 1;
        let sh = &self.sh;
        let (n, needed, t) = (
            sh.layout.profile.n(),
            sh.layout.profile.quorum(),
            sh.cfg.op_timeout,
        );
        // Each shard's sync runs in a task of its own, so that it can go on after this call
        // returns; `left` marks one this call left running (0 awaited, 1 left, 2 ended).
        let mut left: Vec<Option<Arc<AtomicU8>>> = Vec::with_capacity(n);
        let mut syncing: FuturesUnordered<_> = FuturesUnordered::new();
        for j in 0..n {
            if sh.syncs_behind[j].load(Ordering::Acquire) >= SYNCS_BEHIND_MAX {
                left.push(None);
                syncing.push(futures::future::Either::Left(futures::future::ready((
                    j,
                    Err(KelpError::Stopped(format!(
                        "shard {j}: {SYNCS_BEHIND_MAX} syncs still running"
                    ))),
                ))));
                continue;
            }
            let (store, key) = (sh.layout.shards[j].store.clone(), sh.layout.key(j));
            let state = Arc::new(AtomicU8::new(0));
            left.push(Some(state.clone()));
            let behind = sh.clone();
            let task = tokio::spawn(async move {
                let r = within(j, t, store.sync(key)).await;
                if state.swap(2, Ordering::AcqRel) == 1 {
                    behind.syncs_behind[j].fetch_sub(1, Ordering::AcqRel);
                }
                r
            });
            syncing.push(futures::future::Either::Right(async move {
                let r = task
                    .await
                    .unwrap_or_else(|e| Err(KelpError::Stopped(format!("shard {j} sync: {e}"))));
                (j, r)
            }));
        }
        let mut results: Shards = Vec::with_capacity(n);
        while let Some(done) = syncing.next().await {
            results.push(done);
            let synced = results.iter().filter(|(_, r)| r.is_ok()).count();
            if synced >= needed || n - (results.len() - synced) < needed {
                break;
            }
        }
        for (j, state) in left.iter().enumerate() {
            if let Some(state) = state {
                if state
                    .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    sh.syncs_behind[j].fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        sh.quorum("sync", &results)?;
        // The scratch copies the synced versions no longer need are dropped in the background
        // (each shard syncs before it drops its own), a slow shard's with them; one such drop
        // at a time, which takes what came while it ran before it ends.
        if !sh.releasing.swap(true, Ordering::AcqRel) {
            let sh = sh.clone();
            tokio::spawn(async move {
                loop {
                    sh.flush_releases().await;
                    sh.releasing.store(false, Ordering::Release);
                    let more = !sh.state.lock().expect("state").releases.is_empty();
                    if !more || sh.releasing.swap(true, Ordering::AcqRel) {
                        break;
                    }
                }
            });
        }
        Ok(())
    }

    /// Checks the stipes remembered as degraded and rebuilds their bad cells. A stipe whose
    /// cells cannot all be written (a shard server is down) stays degraded for the next pass.
    pub async fn repair(&self) -> Result<RepairReport> {
        let (overflow, stipes) = {
            let mut st = self.sh.state.lock().expect("state");
            let list = std::mem::take(&mut st.degraded);
            st.repairing.extend(list.iter().copied());
            (st.degraded_overflow, list)
        };
        if overflow {
            self.sh.state.lock().expect("state").repairing.clear();
            return self.scrub(None).await;
        }
        let mut report = RepairReport::default();
        for s in stipes {
            let r = {
                let _guard = self.sh.locks.lock(s, s).await;
                self.sh.resolve(s, 1, &HashMap::new()).await
            };
            self.sh.state.lock().expect("state").repairing.remove(&s);
            self.sh.mark_failed(&r);
            report.add(r);
        }
        Ok(report)
    }

    /// Reads every cell of every written stipe and rebuilds missing, stale or corrupt ones, at
    /// most `pace_bytes_per_s` bytes of cells a second when given.
    pub async fn scrub(&self, pace_bytes_per_s: Option<u64>) -> Result<RepairReport> {
        const RUN: u32 = 64;
        let sh = &self.sh;
        let end = {
            let mut st = sh.state.lock().expect("state");
            st.degraded.clear();
            st.degraded_overflow = false;
            st.append
                .div_ceil(sh.layout.profile.stipe_payload_bytes() as u64) as u32
        };
        let scratch = sh.scratch_copies().await;
        let mut report = RepairReport::default();
        let started = Instant::now();
        let mut bytes = 0u64;
        let mut first = 0;
        while first < end {
            let count = RUN.min(end - first);
            let r = {
                let _guard = sh.locks.lock(first, first + count - 1).await;
                sh.resolve(first, count, &scratch).await
            };
            sh.mark_failed(&r);
            report.add(r);
            bytes += count as u64 * sh.layout.profile.n() as u64 * CELL_BYTES as u64;
            if let Some(pace) = pace_bytes_per_s.filter(|&p| p > 0) {
                let due = Duration::from_secs_f64(bytes as f64 / pace as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            first += count;
        }
        Ok(report)
    }

    /// Waits until every batch and update in flight has finished all its shard writes.
    pub async fn quiesce(&self) {
        loop {
            let idle = self.sh.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.sh.tasks.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// The next free byte of the blade's stream.
    pub fn append_pointer(&self) -> u64 {
        self.sh.state.lock().expect("state").append
    }

    /// What recovery found and did when the holdfast opened.
    pub fn recovery_report(&self) -> RepairReport {
        self.sh.state.lock().expect("state").recovery.clone()
    }

    /// Shard syncs still running after the syncs that started them returned (at most
    /// [`SYNCS_BEHIND_MAX`] per shard).
    pub fn syncs_behind(&self) -> usize {
        self.sh
            .syncs_behind
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .sum()
    }

    /// Puts the written ones of `stipes` on the list of degraded stipes, for the next repair:
    /// a reader found a cell of theirs damaged or missing. Returns how many it took.
    pub fn suspect(&self, stipes: &[u32]) -> usize {
        let end = self
            .append_pointer()
            .div_ceil(self.sh.layout.profile.stipe_payload_bytes() as u64);
        let mut taken = 0;
        for &s in stipes.iter().filter(|&&s| u64::from(s) < end) {
            self.sh.mark_degraded(s, 1);
            taken += 1;
        }
        taken
    }

    /// Stipes waiting for repair.
    pub fn degraded(&self) -> Vec<u32> {
        let st = self.sh.state.lock().expect("state");
        st.degraded.union(&st.repairing).copied().collect()
    }

    /// The sequence of stipe `s` as the holdfast's cache knows it (1 if not cached; the cells hold
    /// the truth).
    pub fn stipe_seq(&self, s: u32) -> u32 {
        self.sh
            .state
            .lock()
            .expect("state")
            .seqs
            .get(&s)
            .copied()
            .unwrap_or(1)
    }

    /// Waits until the frond index covers the whole blade (an open rebuilds it beside appends).
    async fn index_built(&self) {
        let mut built = self.sh.index_built.subscribe();
        // The sender lives in `sh`, which `self` holds: the wait cannot fail.
        let _ = built.wait_for(|b| *b).await;
    }

    /// Fronds in the index, and the start of the frond containing byte `x`.
    pub async fn index_lookup(&self, x: u64) -> (usize, Option<u64>) {
        self.index_built().await;
        let st = self.sh.state.lock().expect("state");
        (st.index.len(), st.index.containing(x))
    }

    /// The start of the i-th frond of the blade.
    pub async fn nth_frond(&self, i: usize) -> Option<u64> {
        self.index_built().await;
        self.sh.state.lock().expect("state").index.nth(i)
    }

    /// Heap bytes the holdfast's own state uses now, without frond bytes queued or in flight
    /// (those are bounded by `queue_bytes_max` and `batches_inflight_max * batch_bytes_max`).
    pub fn memory_bytes(&self) -> usize {
        let st = self.sh.state.lock().expect("state");
        let tail = st.tail.as_ref().map_or(0, |t| t.data.capacity());
        tail + st.seqs.len() * 48
            + st.degraded.len() * 40
            + st.index.memory_bytes()
            + self.sh.locks.len() * 64
    }

    /// The memory bound of an open blade in bytes with `fronds` fronds in it (docs/kelp.md):
    /// the state (`state_bound`), the append queue, and the batches in flight, each holding its
    /// stream bytes (up to `batch_bytes_max` plus one frond and the tail stipe) and the n runs of
    /// cells built from them (n/k times as much, plus headers).
    pub fn memory_bound(cfg: &HoldfastConfig, layout: &BladeLayout, fronds: usize) -> usize {
        let p = layout.profile;
        let stream = cfg.batch_bytes_max + frond::FROND_DATA_BYTES_MAX + p.stipe_payload_bytes();
        let cells = stream.div_ceil(CELL_PAYLOAD_BYTES) * p.n() / p.data() * CELL_BYTES;
        Self::state_bound(cfg, layout, fronds)
            + cfg.queue_bytes_max
            + cfg.batches_inflight_max * (stream + cells)
    }

    /// The bound on `memory_bytes` (the state without frond bytes): the tail stipe, 3 bytes per
    /// frond for the index, 48 bytes per cached sequence, 40 per degraded stipe, and 64 KiB for
    /// locks and the scratch releases waiting.
    pub fn state_bound(cfg: &HoldfastConfig, layout: &BladeLayout, fronds: usize) -> usize {
        layout.profile.stipe_payload_bytes()
            + 3 * fronds
            + 48 * SEQS_CACHED_MAX
            + 40 * cfg.degraded_max
            + (64 << 10)
    }
}

async fn batcher(sh: Arc<Shared>, mut rx: mpsc::Receiver<AppendReq>) {
    while let Some(first) = rx.recv().await {
        // A batch that starts in the tail stipe waits for the batch still writing it; meanwhile
        // more appends queue up and go together, so that a batch fills more of the stipe.
        let tail = {
            let st = sh.state.lock().expect("state");
            let s = sh.stipe_bytes();
            (!st.append.is_multiple_of(s)).then(|| (st.append / s) as u32)
        };
        if let Some(stipe) = tail {
            sh.locks.wait_free(stipe, stipe).await;
        }
        let mut bytes = first.frond.len();
        let mut batch = vec![first];
        while bytes < sh.cfg.batch_bytes_max {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.frond.len();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        let Ok(permit) = sh.inflight.clone().acquire_owned().await else {
            return;
        };
        sh.clone().start_batch(batch, permit);
    }
}

impl Shared {
    fn stipe_bytes(&self) -> u64 {
        self.layout.profile.stipe_payload_bytes() as u64
    }

    /// Stipes a blade can hold. A shard that says it holds more (a sparse file grown by
    /// mistake, a peer's answer) is taken to hold this many.
    fn stipes_max(&self) -> u32 {
        (BLADE_PAYLOAD_BYTES_MAX / self.stipe_bytes()).min(crate::cell::STIPE_INDEX_MAX as u64 + 1)
            as u32
    }

    /// Lays a batch out at the append pointer (in order, under the state lock) and starts writing it.
    fn start_batch(self: Arc<Self>, batch: Vec<AppendReq>, permit: OwnedSemaphorePermit) {
        let s_bytes = self.stipe_bytes();
        let s = s_bytes as usize;
        let blade = self.layout.blade;
        let mut st = self.state.lock().expect("state");
        let start = st.append;
        let total: u64 = batch.iter().map(|r| r.frond.len() as u64).sum();
        if start + total > BLADE_PAYLOAD_BYTES_MAX {
            for r in batch {
                let _ = r.reply.send(Err(KelpError::BladeFull {
                    blade,
                    offset: start,
                    needed: r.frond.len() as u64,
                    limit: BLADE_PAYLOAD_BYTES_MAX,
                }));
            }
            return;
        }
        let end = start + total;
        let first = (start / s_bytes) as u32;
        let last = ((end - 1) / s_bytes) as u32;
        let count = (last - first + 1) as usize;
        let mut data = vec![0u8; count * s];
        let mut seqs = vec![1u32; count];
        let tail_update = !start.is_multiple_of(s_bytes);
        let mut durable = false;
        let mut born = st.syncs_started;
        if tail_update {
            let tail = st
                .tail
                .as_ref()
                .expect("a mid-stipe append pointer keeps its tail in memory");
            assert_eq!(
                tail.stipe, first,
                "tail stipe is where the append pointer is"
            );
            data[..s].copy_from_slice(&tail.data);
            seqs[0] = seq_next(tail.seq);
            durable = st.syncs_started > tail.born_sync;
            born = tail.born_sync;
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut at = start;
        for r in batch {
            let off = (at - first as u64 * s_bytes) as usize;
            data[off..off + r.frond.len()].copy_from_slice(&r.frond);
            let len = frond::header_len(&r.frond).expect("verified on append") as u32;
            let seq = seqs[off / s];
            let address = Address::new(blade, at).expect("range checked against the blade size");
            st.index.push(at);
            replies.push((r.reply, Reference { address, len, seq }));
            at += r.frond.len() as u64;
        }
        st.append = end;
        st.tail = (!end.is_multiple_of(s_bytes)).then(|| Tail {
            stipe: last,
            seq: seqs[count - 1],
            data: data[(count - 1) * s..].to_vec(),
            born_sync: if count == 1 { born } else { st.syncs_started },
        });
        if seqs[0] > 1 {
            st.remember_seq(first, seqs[0]);
        }
        let ticket = self.locks.enqueue(first, last);
        drop(st);
        self.tasks.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let guard = ticket.acquire().await;
            let prepare = if tail_update {
                Prepare::Fused(1)
            } else {
                Prepare::None
            };
            self.write_run(guard, first, seqs, data, prepare, durable, move |result| {
                for (reply, reference) in replies {
                    let _ = reply.send(
                        result
                            .as_ref()
                            .map(|_| reference)
                            .map_err(KelpError::duplicate),
                    );
                }
            })
            .await;
            drop(permit);
            self.task_done();
        });
    }

    fn task_done(&self) {
        if self.tasks.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Runs `f` on every shard's store at once, each under the operation deadline.
    async fn each_shard<F, Fut>(&self, f: F) -> Shards
    where
        F: Fn(Arc<dyn crate::store::ShardStore>, crate::store::ShardKey, u32) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let t = self.cfg.op_timeout;
        let futs = (0..self.layout.profile.n()).map(|j| {
            let pl = &self.layout.shards[j];
            let fut = f(pl.store.clone(), self.layout.key(j), pl.disk);
            async move { (j, within(j, t, fut).await) }
        });
        futures::future::join_all(futs).await
    }

    fn quorum(&self, op: &'static str, results: &Shards) -> Result<()> {
        let acked = results.iter().filter(|(_, r)| r.is_ok()).count();
        let needed = self.layout.profile.quorum();
        if acked >= needed {
            return Ok(());
        }
        Err(KelpError::Quorum {
            blade: self.layout.blade,
            op,
            acked,
            needed,
            full: results
                .iter()
                .filter(|(_, r)| r.as_ref().is_err_and(KelpError::is_no_space))
                .count(),
            errors: first_errors(
                results
                    .iter()
                    .filter_map(|(j, r)| r.as_ref().err().map(|e| (*j, e.to_string()))),
            ),
        })
    }

    /// Keeps the stipes a repair could not finish on the list of degraded stipes.
    fn mark_failed(&self, r: &RepairReport) {
        for &s in &r.stipes_failed {
            self.mark_degraded(s, 1);
        }
    }

    fn mark_degraded(&self, first: u32, count: u32) {
        let mut st = self.state.lock().expect("state");
        for s in first..first + count {
            if st.degraded.len() >= self.cfg.degraded_max {
                st.degraded_overflow = true;
                break;
            }
            st.degraded.insert(s);
        }
    }

    /// Writes stipes `[first, first + seqs.len())` built from `data`. The first `prepare` stipes
    /// already exist and go through the two-phase update. `on_quorum` is called as soon as k + w
    /// shards wrote (or too many failed); the call returns when every shard has answered.
    #[allow(clippy::too_many_arguments)]
    async fn write_run(
        self: &Arc<Self>,
        guard: RangeGuard,
        first: u32,
        seqs: Vec<u32>,
        data: Vec<u8>,
        prepare: Prepare,
        durable: bool,
        on_quorum: impl FnOnce(Result<()>) + Send,
    ) {
        let (two_phase, prepare) = match prepare {
            Prepare::None => (false, 0),
            Prepare::Fused(c) => (false, c),
            Prepare::TwoPhase(c) => (true, c),
        };
        let olds: Vec<u32> = seqs[..prepare as usize]
            .iter()
            .map(|&q| seq_prev(q))
            .collect();
        let p = self.layout.profile;
        let (n, quorum) = (p.n(), p.quorum());
        let count = seqs.len() as u32;
        let runs = self.codec.build_run(self.layout.blade, first, &seqs, &data);
        drop(data);
        let mut ok = vec![true; n];
        if two_phase {
            let results = self
                .each_shard(|st, key, _| async move {
                    for s in first..first + prepare {
                        st.prepare(key, s, durable).await?;
                    }
                    Ok(())
                })
                .await;
            for (j, r) in &results {
                ok[*j] = r.is_ok();
            }
            if let Err(e) = self.quorum("prepare", &results) {
                on_quorum(Err(e));
                drop(guard);
                self.finish_update(first, &olds, &ok, false).await;
                self.mark_degraded(first, count);
                return;
            }
        }
        let t = self.cfg.op_timeout;
        let mode = if prepare > 0 && !two_phase {
            WriteMode::Update { durable }
        } else {
            WriteMode::IfNewer
        };
        let mut writes: FuturesUnordered<_> = (0..n)
            .filter(|&j| ok[j])
            .map(|j| {
                let pl = self.layout.shards[j].clone();
                let key = self.layout.key(j);
                let cells = runs[j].clone();
                async move {
                    let r = tokio::time::timeout(
                        t,
                        pl.store.write_cells(key, pl.disk, first, cells, mode),
                    )
                    .await;
                    (
                        j,
                        r.unwrap_or_else(|_| {
                            Err(KelpError::Timeout {
                                what: format!("write of {key}"),
                                ms: t.as_millis() as u64,
                            })
                        }),
                    )
                }
            })
            .collect();
        drop(runs);
        let mut on_quorum = Some(on_quorum);
        let (mut acked, mut full) = (0, 0);
        let mut errors: Vec<(usize, String)> = (0..n)
            .filter(|&j| !ok[j])
            .map(|j| (j, "not prepared".to_string()))
            .collect();
        // Once k + w have written, the others get a grace period; a shard slower than that (a hung
        // disk) must not hold the stipe lock, and with it every later append, until its timeout.
        let mut grace_until: Option<tokio::time::Instant> = None;
        let mut stragglers = false;
        loop {
            let next = match grace_until {
                Some(at) => match tokio::time::timeout_at(at, writes.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        stragglers = true;
                        break;
                    }
                },
                None => writes.next().await,
            };
            let Some((j, r)) = next else { break };
            match r {
                Ok(()) => acked += 1,
                Err(e) => {
                    ok[j] = false;
                    full += usize::from(e.is_no_space());
                    errors.push((j, e.to_string()));
                }
            }
            if acked >= quorum {
                if let Some(f) = on_quorum.take() {
                    f(Ok(()));
                    grace_until = Some(tokio::time::Instant::now() + self.cfg.straggler_grace);
                }
            } else if acked + writes.len() < quorum {
                if let Some(f) = on_quorum.take() {
                    // Fail as soon as the quorum is out of reach; say how many could have answered.
                    f(Err(KelpError::Quorum {
                        blade: self.layout.blade,
                        op: "write",
                        acked: acked + writes.len(),
                        needed: quorum,
                        full,
                        errors: first_errors(errors.iter().cloned()),
                    }));
                }
            }
        }
        if stragglers {
            // Let the late writes land (or fail) in the background; a late write of this version
            // never overwrites a newer one (`IfNewer`), and the stipes are repaired either way.
            errors.extend(std::iter::repeat_n(
                (usize::MAX, "late".to_string()),
                writes.len(),
            ));
            let blade = self.layout.blade;
            tokio::spawn(async move {
                while let Some((j, r)) = writes.next().await {
                    if let Err(e) = r {
                        tracing::debug!("blade {blade:08x} shard {j}: late write failed: {e}");
                    }
                }
            });
        }
        // Every shard has answered (or is late): the next update of these stipes may start.
        // Scratch copies are dropped after, only if no newer copy replaced them.
        drop(guard);
        if two_phase {
            self.finish_update(first, &olds, &ok, durable).await;
        } else if prepare > 0 {
            // A later update of the stipe replaces the copy on each shard; the last one is dropped
            // at the next sync, or once enough stipes wait.
            let flush = {
                let mut st = self.state.lock().expect("state");
                for (i, &old) in olds.iter().enumerate() {
                    let e = st.releases.entry(first + i as u32).or_insert((old, false));
                    *e = (old, e.1 || durable);
                }
                st.releases.len() >= RELEASES_PENDING_MAX
            };
            if flush {
                self.flush_releases().await;
            }
        }
        if !errors.is_empty() {
            tracing::warn!(
                "blade {:08x} stipes {first}..{}: {} shard(s) failed, marked for repair: {}",
                self.layout.blade,
                first + count,
                errors.len(),
                first_errors(errors.into_iter())
            );
            self.mark_degraded(first, count);
        }
    }

    /// Drops the scratch copies that tail appends left (syncing first if any protected a durable
    /// version).
    async fn flush_releases(&self) {
        let releases = std::mem::take(&mut self.state.lock().expect("state").releases);
        if releases.is_empty() {
            return;
        }
        let durable = releases.values().any(|&(_, d)| d);
        let list: Vec<(u32, u32)> = releases.iter().map(|(s, (q, _))| (*s, *q)).collect();
        let list = &list;
        self.each_shard(|st, key, _| async move {
            if durable {
                st.sync(key).await?;
            }
            for &(stipe, upto) in list {
                st.release(key, stipe, upto).await?;
            }
            Ok(())
        })
        .await;
    }

    /// Drops the scratch copies of an update; when the replaced version was promised durable,
    /// the new cells are synced first so that a power loss finds one version or the other.
    async fn finish_update(&self, first: u32, olds: &[u32], prepared: &[bool], durable: bool) {
        let prepared = prepared.to_vec();
        self.each_shard(|st, key, _| {
            let mine = prepared[key.shard as usize];
            async move {
                if durable && mine {
                    st.sync(key).await?;
                }
                for (i, &old) in olds.iter().enumerate() {
                    st.release(key, first + i as u32, old).await?;
                }
                Ok(())
            }
        })
        .await;
    }

    async fn update(self: Arc<Self>, r: Reference, encoded: Bytes) -> Result<Reference> {
        let p = self.layout.profile;
        let s_bytes = self.stipe_bytes();
        let s = s_bytes as usize;
        let blade = self.layout.blade;
        let range = frond::verify(&encoded, r.address.0)?;
        if range.len() != r.len as usize || r.address.blade() != blade {
            return Err(KelpError::invalid(format!(
                "update of {:x}: a frond of {} bytes cannot replace one of {} in place",
                r.address.0,
                range.len(),
                r.len
            )));
        }
        let start = r.address.byte_offset();
        let end = start + encoded.len() as u64;
        check_range(blade, start, encoded.len() as u64)?;
        let first = (start / s_bytes) as u32;
        let last = ((end - 1) / s_bytes) as u32;
        let count = (last - first + 1) as usize;
        let off = (start - first as u64 * s_bytes) as usize;
        // Order this update after the appends already laid out. If it touches the open tail stipe,
        // close that stipe first (the append pointer moves to the next stipe; the rest of it stays
        // zeros, which the frond walk skips): later appends then never build on bytes of an update
        // that might still fail, and the update reads the stipe from its shards like any other.
        let ticket = {
            let mut st = self.state.lock().expect("state");
            if end > st.append {
                return Err(KelpError::invalid(format!(
                    "update of {:x}: bytes up to {end} are past the written end {} of blade {blade:08x}",
                    r.address.0, st.append
                )));
            }
            if st
                .tail
                .as_ref()
                .is_some_and(|t| (first..=last).contains(&t.stipe))
            {
                let t = st.tail.take().expect("checked");
                st.append = (t.stipe as u64 + 1) * s_bytes;
            }
            self.locks.enqueue(first, last)
        };
        let guard = ticket.acquire().await;
        let rows = self.reader.read_all(first, count as u32).await;
        let mut data = vec![0u8; count * s];
        let mut seqs = vec![0u32; count];
        let mut codec = None;
        for (i, row) in rows.iter().enumerate() {
            let stipe = first + i as u32;
            let chunk = &mut data[i * s..(i + 1) * s];
            let cells: Vec<Option<Got>> = row.iter().cloned().map(Some).collect();
            let Some(cur) = crate::read::agreed_seq(&cells, p.data()) else {
                return Err(self.reader_unreadable(stipe, row));
            };
            if i == 0 && seq_cmp(cur, r.seq) == std::cmp::Ordering::Less {
                return Err(KelpError::invalid(format!(
                    "update of {:x}: reference sequence {} is newer than the stipe's {cur}",
                    r.address.0, r.seq
                )));
            }
            decode_at(&cells, cur, p, &mut codec, chunk)?;
            seqs[i] = seq_next(cur);
        }
        if frond::header_len(&data[off..]) != Some(r.len as usize) {
            return Err(KelpError::Frond {
                address: r.address.0,
                what: format!("no frond of {} bytes here to update", r.len),
            });
        }
        data[off..off + encoded.len()].copy_from_slice(&encoded);
        {
            let mut st = self.state.lock().expect("state");
            for (i, &q) in seqs.iter().enumerate() {
                if q > 1 {
                    st.remember_seq(first + i as u32, q);
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        let new_ref = Reference { seq: seqs[0], ..r };
        self.tasks.fetch_add(1, Ordering::SeqCst);
        let sh = self.clone();
        tokio::spawn(async move {
            sh.write_run(
                guard,
                first,
                seqs,
                data,
                Prepare::TwoPhase(count as u32),
                true,
                move |res| {
                    let _ = tx.send(res);
                },
            )
            .await;
            sh.task_done();
        });
        rx.await
            .map_err(|_| KelpError::Stopped("update dropped by a stopping holdfast".into()))??;
        Ok(new_ref)
    }

    fn reader_unreadable(&self, stipe: u32, row: &[Got]) -> KelpError {
        KelpError::Unreadable {
            blade: self.layout.blade,
            stipe,
            k: self.layout.profile.data(),
            detail: describe(row),
        }
    }

    /// The scratch copies every shard holds for this blade, by stipe.
    async fn scratch_copies(&self) -> HashMap<u32, Vec<(usize, Bytes)>> {
        let mut out: HashMap<u32, Vec<(usize, Bytes)>> = HashMap::new();
        for j in 0..self.layout.profile.n() {
            let key = self.layout.key(j);
            let store = &self.layout.shards[j].store;
            let Ok(Ok(cells)) = tokio::time::timeout(self.cfg.op_timeout, store.scratch(key)).await
            else {
                continue;
            };
            for cell in cells {
                let (id, _, _) = read_header(&cell);
                if id.blade == key.blade && id.shard == key.shard {
                    if let CellCheck::Valid { .. } = check_cell(&cell, id) {
                        out.entry(id.stipe).or_default().push((j, cell));
                    }
                }
            }
        }
        out
    }

    /// Recovery at open: resolve interrupted updates and the stipes at the end of the blade,
    /// then find the append pointer and rebuild the frond index.
    /// Recovers the blade's state from its cells; returns the stipes in use.
    async fn recover(&self) -> Result<u32> {
        let p = self.layout.profile;
        let mut counts = Vec::new();
        let mut answered = Vec::new();
        for j in 0..p.n() {
            let pl = &self.layout.shards[j];
            match tokio::time::timeout(self.cfg.op_timeout, pl.store.stipes(self.layout.key(j)))
                .await
            {
                Ok(Ok(c)) => {
                    counts.push(c.unwrap_or(0).min(self.stipes_max()));
                    answered.push((j, Ok(())));
                }
                Ok(Err(e)) => answered.push((j, Err(e))),
                Err(_) => answered.push((j, Err(KelpError::Stopped("no answer".into())))),
            }
        }
        let ok = answered.iter().filter(|(_, r)| r.is_ok()).count();
        if ok < p.data() {
            return Err(KelpError::Quorum {
                blade: self.layout.blade,
                op: "open",
                acked: ok,
                needed: p.data(),
                full: answered
                    .iter()
                    .filter(|(_, r)| r.as_ref().is_err_and(KelpError::is_no_space))
                    .count(),
                errors: first_errors(
                    answered
                        .iter()
                        .filter_map(|(j, r)| r.as_ref().err().map(|e| (*j, e.to_string()))),
                ),
            });
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let mut stipes = counts.first().copied().unwrap_or(0);
        if ok == p.n() {
            // Every shard answered: a stipe past the k-th longest shard has fewer than k cells
            // anywhere, so it was never acknowledged and can never be read. Only the tail that
            // recovery checks is kept past it (appends in flight at a crash), so that one shard
            // far longer than the others (a sparse file grown by mistake) does not move the
            // blade's end.
            let kth = counts[p.data() - 1];
            stipes = stipes.min(kth.saturating_add(self.cfg.recovery_tail_stipes));
        }
        let scratch = self.scratch_copies().await;
        if let Some(&max) = scratch.keys().max() {
            stipes = stipes.max(max.saturating_add(1).min(self.stipes_max()));
        }
        let tail_from = stipes.saturating_sub(self.cfg.recovery_tail_stipes);
        let mut check: BTreeSet<u32> = scratch.keys().copied().filter(|&s| s < tail_from).collect();
        check.extend(tail_from..stipes);
        let mut report = RepairReport::default();
        let mut versions = BTreeMap::new();
        let list: Vec<u32> = check.into_iter().collect();
        for run in crate::read::runs_of(&list) {
            for (first, count) in run_chunks(run.0, run.1, 64) {
                let (r, v) = self.resolve_with_versions(first, count, &scratch).await;
                report.add(r);
                versions.extend(v);
            }
        }
        let mut end = stipes;
        while end > tail_from && versions.get(&(end - 1)) == Some(&Some(0)) {
            end -= 1;
        }
        {
            let mut st = self.state.lock().expect("state");
            st.append = end as u64 * self.stipe_bytes();
            for (s, v) in &versions {
                if let Some(q) = v.filter(|&q| q > 1) {
                    st.remember_seq(*s, q);
                }
            }
            if !report.unrecoverable.is_empty() {
                tracing::error!(
                    "blade {:08x}: {} stipe(s) have fewer than {} valid cells: {:?}",
                    self.layout.blade,
                    report.unrecoverable.len(),
                    p.data(),
                    report.unrecoverable
                );
            }
            st.recovery = report;
        }
        Ok(end)
    }

    /// Walks the fronds of stipes `[0, end)` and rebuilds the index. Gaps (zeros up to a stipe
    /// boundary, left by recovery) and unreadable stipes are skipped.
    async fn rebuild_index(&self, end: u32) {
        let s_bytes = self.stipe_bytes();
        let end_byte = end as u64 * s_bytes;
        let mut index = FrondIndex::default();
        let mut pos = 0u64;
        let mut buf = Bytes::new();
        let mut buf_at = 0u64;
        let window = 64 * s_bytes;
        let need = (frond::FROND_HEADER_BYTES + frond::FROND_HASH_BYTES) as u64;
        // Small fronds are read a window at a time; past a large one, only the next header is
        // read (reading whole windows would read the whole blade).
        let mut last_bytes = 0u64;
        while pos + 8 <= end_byte {
            if pos < buf_at || pos + need.min(end_byte - pos) > buf_at + buf.len() as u64 {
                let len = if last_bytes >= window / 4 {
                    need
                } else {
                    window
                }
                .min(end_byte - pos);
                let stipe_end = (pos / s_bytes + 1) * s_bytes;
                match self.reader.read_range(pos, len as usize, 1).await {
                    Ok(b) => buf = b,
                    Err(_) => match self
                        .reader
                        .read_range(pos, (stipe_end - pos) as usize, 1)
                        .await
                    {
                        Ok(b) => buf = b,
                        Err(_) => {
                            pos = stipe_end;
                            continue;
                        }
                    },
                }
                buf_at = pos;
            }
            let at = (pos - buf_at) as usize;
            let head = &buf[at..(at + need as usize).min(buf.len())];
            let gap = head.iter().all(|&b| b == 0);
            match frond::header_len(head) {
                Some(len) if !gap => {
                    index.push(pos);
                    last_bytes = frond::frond_bytes(len) as u64;
                    pos += last_bytes;
                }
                _ => {
                    last_bytes = 0;
                    pos = (pos / s_bytes + 1) * s_bytes;
                }
            }
        }
        // Fronds appended since the open follow the walked ones.
        let mut st = self.state.lock().expect("state");
        for i in 0..st.index.len() {
            if let Some(at) = st.index.nth(i) {
                index.push(at);
            }
        }
        st.index = index;
    }

    async fn resolve(
        &self,
        first: u32,
        count: u32,
        scratch: &HashMap<u32, Vec<(usize, Bytes)>>,
    ) -> RepairReport {
        self.resolve_with_versions(first, count, scratch).await.0
    }

    /// Brings stipes `[first, first + count)` to their current version: the newest sequence that
    /// at least k shards carry, counting scratch copies (so an update that reached fewer than k
    /// shards rolls back). Cells of other versions, corrupt or missing cells are rewritten.
    /// Returns the version chosen per stipe (None: unrecoverable). Callers hold the stipe lock.
    async fn resolve_with_versions(
        &self,
        first: u32,
        count: u32,
        scratch: &HashMap<u32, Vec<(usize, Bytes)>>,
    ) -> (RepairReport, Vec<(u32, Option<u32>)>) {
        let p = self.layout.profile;
        let (n, k) = (p.n(), p.data());
        let rows = self.reader.read_all(first, count).await;
        let mut report = RepairReport::default();
        let mut versions = Vec::new();
        let mut writes: Vec<Vec<(u32, Bytes)>> = vec![Vec::new(); n];
        let mut releases: Vec<(usize, u32, u32)> = Vec::new();
        let mut codec = StipeCodec::new(p);
        for (i, row) in rows.iter().enumerate() {
            let stipe = first + i as u32;
            report.stipes_checked += 1;
            let saved: Vec<(usize, Bytes)> = scratch.get(&stipe).cloned().unwrap_or_default();
            // Every version each shard can offer: its cell, and its scratch copy.
            let mut offers: Vec<Vec<(u32, Bytes)>> = vec![Vec::new(); n];
            for (j, g) in row.iter().enumerate() {
                if let Got::Cell(c, b) = g {
                    if let Some(q) = c.seq() {
                        offers[j].push((q, b.clone()));
                    }
                }
            }
            for (j, cell) in &saved {
                let id = CellId {
                    blade: self.layout.blade,
                    stipe,
                    shard: *j as u8,
                };
                // A copy matters only if its own cell was since overwritten by a newer version
                // (or is damaged); a copy left over from long ago (even one that a wrapped
                // sequence makes look newer) is ignored.
                let overwritten = match &row[*j] {
                    Got::Cell(CellCheck::Valid { seq: current }, _) => Some(*current),
                    _ => None,
                };
                if let CellCheck::Valid { seq } = check_cell(cell, id) {
                    if overwritten.is_none_or(|c| seq_cmp(c, seq) == std::cmp::Ordering::Greater) {
                        offers[*j].push((seq, cell.clone()));
                    }
                }
            }
            let offered = || offers.iter().flatten().map(|(q, _)| *q);
            let newest = crate::cell::newest_agreed(offered(), 1, |_| 1);
            let target = crate::cell::newest_agreed(offered(), k, |q| {
                offers
                    .iter()
                    .filter(|o| o.iter().any(|(s, _)| *s == q))
                    .count()
            });
            let Some(target) = target else {
                if newest.is_some()
                    || row
                        .iter()
                        .any(|g| matches!(g, Got::Cell(CellCheck::Invalid(_), _)))
                {
                    report.unrecoverable.push(stipe);
                }
                versions.push((stipe, None));
                continue;
            };
            versions.push((stipe, Some(target)));
            if newest.is_some_and(|q| q != target) {
                report.rolled_back += 1;
            }
            let current = |j: usize| matches!(row[j], Got::Cell(c, _) if c.seq() == Some(target));
            if (0..n).all(current) {
                releases.extend(
                    saved
                        .iter()
                        .map(|(j, _)| (*j, stipe, newest.unwrap_or(target))),
                );
                continue;
            }
            report.stipes_fixed += 1;
            let cells = if target == 0 {
                vec![Bytes::from(vec![0u8; CELL_BYTES]); n]
            } else {
                let picked: Vec<Option<Got>> = offers
                    .iter()
                    .map(|o| {
                        o.iter()
                            .find(|(q, _)| *q == target)
                            .map(|(q, b)| Got::Cell(CellCheck::Valid { seq: *q }, b.clone()))
                    })
                    .collect();
                let mut data = vec![0u8; p.stipe_payload_bytes()];
                let mut c = Some(codec);
                if let Err(e) = decode_at(&picked, target, p, &mut c, &mut data) {
                    tracing::error!(
                        "blade {:08x} stipe {stipe}: decode failed: {e}",
                        self.layout.blade
                    );
                    codec = c.expect("codec kept");
                    report.unrecoverable.push(stipe);
                    continue;
                }
                codec = c.expect("codec kept");
                codec.build_run(self.layout.blade, stipe, &[target], &data)
            };
            for j in 0..n {
                if !current(j) {
                    writes[j].push((stipe, cells[j].clone()));
                }
            }
            releases.extend(
                saved
                    .iter()
                    .map(|(j, _)| (*j, stipe, newest.unwrap_or(target))),
            );
        }
        // Rewrite the bad cells, one store call per run of consecutive stipes of a shard.
        for (j, cells) in writes.into_iter().enumerate() {
            let pl = &self.layout.shards[j];
            let key = self.layout.key(j);
            for (start, run) in group_runs(cells) {
                let c = (run.len() / CELL_BYTES) as u64;
                let r = tokio::time::timeout(
                    self.cfg.op_timeout,
                    pl.store
                        .write_cells(key, pl.disk, start, run, WriteMode::Force),
                )
                .await;
                let failed = match r {
                    Ok(Ok(())) => {
                        report.cells_rewritten += c;
                        false
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("repair of {key} stipes {start}..{}: {e}", start as u64 + c);
                        true
                    }
                    Err(_) => true,
                };
                if failed {
                    report.cells_failed += c;
                    report.stipes_failed.extend(start..start + c as u32);
                }
            }
        }
        for (j, stipe, upto) in releases {
            let pl = &self.layout.shards[j];
            let _ = tokio::time::timeout(
                self.cfg.op_timeout,
                pl.store.release(self.layout.key(j), stipe, upto),
            )
            .await;
        }
        (report, versions)
    }
}

/// Merges (stipe, cell) pairs into runs of consecutive stipes.
fn group_runs(cells: Vec<(u32, Bytes)>) -> Vec<(u32, Bytes)> {
    let mut out: Vec<(u32, BytesMut)> = Vec::new();
    for (s, c) in cells {
        match out.last_mut() {
            Some((start, buf)) if *start as usize + buf.len() / CELL_BYTES == s as usize => {
                buf.extend_from_slice(&c)
            }
            _ => out.push((s, BytesMut::from(&c[..]))),
        }
    }
    out.into_iter().map(|(s, b)| (s, b.freeze())).collect()
}

fn run_chunks(first: u32, count: u32, max: u32) -> Vec<(u32, u32)> {
    (0..count)
        .step_by(max as usize)
        .map(|o| (first + o, (count - o).min(max)))
        .collect()
}

fn describe(row: &[Got]) -> String {
    row.iter()
        .enumerate()
        .map(|(j, g)| match g {
            Got::Failed => format!("{j}:failed"),
            Got::Cell(CellCheck::Empty, _) => format!("{j}:empty"),
            Got::Cell(CellCheck::Valid { seq }, _) => format!("{j}:seq {seq}"),
            Got::Cell(CellCheck::Invalid(f), _) => format!("{j}:{f}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn first_errors(errors: impl Iterator<Item = (usize, String)>) -> String {
    let v: Vec<String> = errors
        .take(3)
        .map(|(j, e)| format!("shard {j}: {e}"))
        .collect();
    if v.is_empty() {
        "no errors reported".into()
    } else {
        v.join("; ")
    }
}
