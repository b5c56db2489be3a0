//! Reading a blade (DESIGN 4.4): data cells straight from their shard stores, accepted only when
//! their CRC is good and their sequence is at least what the reference recorded; a late, failed
//! or invalid cell makes the reader hedge: it asks the other shards and decodes from the first k
//! valid cells that agree on a sequence.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};

use crate::address::{check_range, stipe_spans, Reference};
use crate::cell::{
    check_cell, newest_agreed, seq_cmp, CellCheck, CellId, CELL_BYTES, CELL_HEADER_BYTES,
    CELL_PAYLOAD_BYTES,
};
use crate::error::{KelpError, Result};
use crate::frond;
use crate::latency::LatencyTracker;
use crate::profile::Profile;
use crate::stipe::StipeCodec;
use crate::store::{ShardKey, ShardStore};

/// Stipes one store call reads at most.
pub const READ_STIPES_PER_CALL_MAX: u32 = 256;

/// Where one shard of a blade lives: a store and the disk within it.
#[derive(Clone)]
pub struct ShardPlacement {
    /// The store (local or remote) holding the shard file.
    pub store: Arc<dyn ShardStore>,
    /// Disk index within that store.
    pub disk: u32,
}

/// A blade's id, profile and the placement of its n shards.
#[derive(Clone)]
pub struct BladeLayout {
    /// Blade id.
    pub blade: u32,
    /// Erasure profile.
    pub profile: Profile,
    /// Placement of shard 0..n (shard 0's server is the holdfast).
    pub shards: Vec<ShardPlacement>,
}

impl BladeLayout {
    /// A layout; `shards` must have exactly k + m entries.
    pub fn new(blade: u32, profile: Profile, shards: Vec<ShardPlacement>) -> Result<Self> {
        if shards.len() != profile.n() {
            return Err(KelpError::invalid(format!(
                "blade {blade:08x}: profile {profile} needs {} shards, layout has {}",
                profile.n(),
                shards.len()
            )));
        }
        Ok(BladeLayout {
            blade,
            profile,
            shards,
        })
    }

    /// The shard file key of shard `shard`.
    pub fn key(&self, shard: usize) -> ShardKey {
        ShardKey {
            blade: self.blade,
            shard: shard as u8,
        }
    }
}

/// When to hedge and when to give up.
#[derive(Clone, Debug)]
pub struct HedgeConfig {
    /// A read is late past exp(mean + a*deviation) of the store's log latency.
    pub a: f64,
    /// Late threshold before a store has any samples.
    pub default_late: Duration,
    /// Smallest late threshold.
    pub floor: Duration,
    /// Largest late threshold.
    pub ceiling: Duration,
    /// Deadline of one store call.
    pub deadline: Duration,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        HedgeConfig {
            a: 3.0,
            default_late: Duration::from_millis(50),
            floor: Duration::from_millis(2),
            ceiling: Duration::from_secs(2),
            deadline: Duration::from_secs(30),
        }
    }
}

/// What one shard gave for one stipe.
#[derive(Clone, Debug)]
pub enum Got {
    /// The store failed, timed out or has no shard file.
    Failed,
    /// The cell (4096 bytes) and what it checked as.
    Cell(CellCheck, Bytes),
}

impl Got {
    /// The sequence of a usable cell (0 for empty).
    pub fn seq(&self) -> Option<u32> {
        match self {
            Got::Cell(c, _) => c.seq(),
            Got::Failed => None,
        }
    }
}

/// Told the stipes of a blade in which a read found a cell damaged, empty or in a missing
/// shard file: (blade, stipes). Its holdfast may repair them before the next scrub.
pub type SuspectHook = Arc<dyn Fn(u32, Vec<u32>) + Send + Sync>;

/// Reads fronds and byte ranges of one blade, hedging around slow or bad shards.
#[derive(Clone)]
pub struct BladeReader {
    layout: BladeLayout,
    hedge: HedgeConfig,
    latency: Arc<Vec<LatencyTracker>>,
    suspect: Option<SuspectHook>,
}

type ShardRead = (usize, u32, Result<Bytes>);

impl BladeReader {
    /// A reader of `layout`.
    pub fn new(layout: BladeLayout, hedge: HedgeConfig) -> Self {
        let n = layout.profile.n();
        BladeReader {
            layout,
            hedge,
            latency: Arc::new((0..n).map(|_| LatencyTracker::default()).collect()),
            suspect: None,
        }
    }

    /// The same reader, telling `hook` of the stipes where a read found a bad cell.
    pub fn with_suspect(mut self, hook: SuspectHook) -> Self {
        self.suspect = Some(hook);
        self
    }

    /// The layout read.
    pub fn layout(&self) -> &BladeLayout {
        &self.layout
    }

    /// The latency tracker of each shard's store.
    pub fn latency(&self) -> &[LatencyTracker] {
        &self.latency
    }

    fn late_after(&self, shard: usize) -> Duration {
        let h = &self.hedge;
        self.latency[shard].late_after(h.a, h.default_late, h.floor, h.ceiling)
    }

    fn start_read(
        &self,
        shard: usize,
        first: u32,
        count: u32,
    ) -> futures::future::BoxFuture<'static, ShardRead> {
        let store = self.layout.shards[shard].store.clone();
        let key = self.layout.key(shard);
        let latency = self.latency.clone();
        let deadline = self.hedge.deadline;
        Box::pin(async move {
            let t = Instant::now();
            let r = match tokio::time::timeout(deadline, store.read_cells(key, first, count)).await
            {
                Ok(r) => r,
                Err(_) => Err(KelpError::Timeout {
                    what: format!("read of {key} on {}", store.name()),
                    ms: deadline.as_millis() as u64,
                }),
            };
            latency[shard].record(t.elapsed());
            (shard, first, r)
        })
    }

    /// Reads and verifies a whole frond.
    pub async fn read_frond(&self, r: Reference) -> Result<Bytes> {
        if r.address.blade() != self.layout.blade {
            return Err(KelpError::invalid(format!(
                "reference to blade {:08x} given to the reader of blade {:08x}",
                r.address.blade(),
                self.layout.blade
            )));
        }
        if r.len as usize > frond::FROND_DATA_BYTES_MAX {
            return Err(KelpError::invalid(format!(
                "reference length {} is over the frond limit",
                r.len
            )));
        }
        let total = frond::frond_bytes(r.len as usize);
        let bytes = self
            .read_range(r.address.byte_offset(), total, r.seq)
            .await?;
        if frond::header_len(&bytes) != Some(r.len as usize) {
            return Err(KelpError::Frond {
                address: r.address.0,
                what: format!(
                    "no frond of {} bytes here (the reference is wrong or stale)",
                    r.len
                ),
            });
        }
        let data = frond::verify(&bytes, r.address.0)?;
        Ok(bytes.slice(data))
    }

    /// Reads `len` bytes of the stream at `start`; cells of the first stipe must have at least
    /// sequence `first_seq`, cells of later stipes at least 1.
    pub async fn read_range(&self, start: u64, len: usize, first_seq: u32) -> Result<Bytes> {
        let mut suspect = BTreeSet::new();
        let r = self
            .read_range_noting(start, len, first_seq, &mut suspect)
            .await;
        if let (Some(hook), false) = (&self.suspect, suspect.is_empty()) {
            hook(self.layout.blade, suspect.into_iter().collect());
        }
        r
    }

    #[allow(clippy::needless_range_loop)] // cells are addressed by (stipe, shard) throughout
    /// [`BladeReader::read_range`], noting in `suspect` the stipes where a cell was damaged,
    /// empty or in a missing shard file.
    async fn read_range_noting(
        &self,
        start: u64,
        len: usize,
        first_seq: u32,
        suspect: &mut BTreeSet<u32>,
    ) -> Result<Bytes> {
        let p = self.layout.profile;
        check_range(self.layout.blade, start, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let spans = stipe_spans(p, start, start + len as u64);
        let s0 = spans[0].stipe;
        let count = spans.len() as u32;
        if count > READ_STIPES_PER_CALL_MAX * 64 {
            return Err(KelpError::invalid(format!(
                "read of {len} bytes is too large"
            )));
        }
        let n = p.n();
        let k = p.data();
        let mut got: Vec<Vec<Option<Got>>> = vec![vec![None; n]; count as usize];
        let mut done = vec![false; count as usize];
        let mut out = BytesMut::zeroed(len);
        // Which (stipe, shard) cells have been asked for.
        let mut asked = vec![vec![false; n]; count as usize];
        let mut inflight = FuturesUnordered::new();
        let mut late = Duration::ZERO;
        for j in 0..k {
            let need: Vec<u32> = spans
                .iter()
                .filter(|s| s.data_shards().contains(&j))
                .map(|s| s.stipe)
                .collect();
            if let (Some(&a), Some(&b)) = (need.first(), need.last()) {
                for s in a..=b {
                    asked[(s - s0) as usize][j] = true;
                }
                for (f, c) in chunks(a, b - a + 1) {
                    inflight.push(self.start_read(j, f, c));
                }
                late = late.max(self.late_after(j));
            }
        }
        let timer = tokio::time::sleep(late);
        tokio::pin!(timer);
        let mut timer_fired = false;
        let mut codec: Option<StipeCodec> = None;
        loop {
            let mut hedge_now = false;
            if inflight.is_empty() {
                hedge_now = true;
            } else {
                tokio::select! {
                    next = inflight.next() => {
                        if let Some((shard, first, result)) = next {
                            if !self.take(&mut got, s0, shard, first, result, suspect) {
                                hedge_now = true;
                            }
                        }
                    }
                    _ = &mut timer, if !timer_fired => {
                        timer_fired = true;
                        hedge_now = true;
                    }
                }
            }
            let mut out_at = 0usize;
            for (i, span) in spans.iter().enumerate() {
                let span_len = span.end - span.start;
                if !done[i] {
                    let min_seq = if i == 0 { first_seq.max(1) } else { 1 };
                    if let Some(bytes) = self.resolve_span(&got[i], span, min_seq, &mut codec)? {
                        out[out_at..out_at + span_len].copy_from_slice(&bytes);
                        done[i] = true;
                    } else if span.data_shards().all(|j| got[i][j].is_some()) {
                        // Every data cell it needs has answered and they do not suffice.
                        hedge_now = true;
                    }
                }
                out_at += span_len;
            }
            if done.iter().all(|&d| d) {
                return Ok(out.freeze());
            }
            if hedge_now {
                // Ask every shard for the open stipes it has not been asked for yet.
                let mut any = false;
                for shard in 0..n {
                    let open: Vec<u32> = (0..count)
                        .filter(|&i| !done[i as usize] && !asked[i as usize][shard])
                        .collect();
                    for (f, c) in runs_of(&open) {
                        for i in f..f + c {
                            asked[i as usize][shard] = true;
                        }
                        for (f2, c2) in chunks(s0 + f, c) {
                            inflight.push(self.start_read(shard, f2, c2));
                        }
                        any = true;
                    }
                }
                if !any && inflight.is_empty() {
                    break;
                }
            }
        }
        let i = done.iter().position(|d| !d).expect("some stipe open");
        Err(self.unreadable(s0 + i as u32, &got[i]))
    }

    /// Files the cells of one store reply into `got`; false if anything was missing or invalid.
    /// The stipes of damaged or empty cells, and of a missing shard file, go to `suspect`.
    fn take(
        &self,
        got: &mut [Vec<Option<Got>>],
        s0: u32,
        shard: usize,
        first: u32,
        result: Result<Bytes>,
        suspect: &mut BTreeSet<u32>,
    ) -> bool {
        let count = got.len() as u32;
        match result {
            Err(e) => {
                tracing::debug!("blade {:08x} shard {shard}: {e}", self.layout.blade);
                let missing = matches!(e, KelpError::ShardMissing(..));
                for s in first..first.saturating_add(READ_STIPES_PER_CALL_MAX) {
                    if s >= s0 && s - s0 < count {
                        got[(s - s0) as usize][shard] = Some(Got::Failed);
                        if missing {
                            suspect.insert(s);
                        }
                    }
                }
                false
            }
            Ok(bytes) => {
                let mut all_good = true;
                for (i, cell) in bytes.chunks_exact(CELL_BYTES).enumerate() {
                    let stipe = first + i as u32;
                    if stipe < s0 || stipe - s0 >= count {
                        continue;
                    }
                    let id = CellId {
                        blade: self.layout.blade,
                        stipe,
                        shard: shard as u8,
                    };
                    let check = check_cell(cell, id);
                    if !matches!(check, CellCheck::Valid { .. }) {
                        all_good = false;
                        suspect.insert(stipe);
                    }
                    let at = i * CELL_BYTES;
                    got[(stipe - s0) as usize][shard] =
                        Some(Got::Cell(check, bytes.slice(at..at + CELL_BYTES)));
                }
                all_good
            }
        }
    }

    /// The bytes of `span` if the cells at hand suffice.
    fn resolve_span(
        &self,
        cells: &[Option<Got>],
        span: &crate::address::StipeSpan,
        min_seq: u32,
        codec: &mut Option<StipeCodec>,
    ) -> Result<Option<Vec<u8>>> {
        let fresh = |g: &Option<Got>| match g {
            Some(Got::Cell(CellCheck::Valid { seq }, _)) => {
                seq_cmp(*seq, min_seq) != Ordering::Less
            }
            _ => false,
        };
        if span.data_shards().all(|j| fresh(&cells[j])) {
            let mut v = Vec::with_capacity(span.end - span.start);
            for j in span.data_shards() {
                let Some(Got::Cell(_, cell)) = &cells[j] else {
                    unreachable!("checked fresh")
                };
                let lo = span.start.max(j * CELL_PAYLOAD_BYTES) - j * CELL_PAYLOAD_BYTES;
                let hi = span.end.min((j + 1) * CELL_PAYLOAD_BYTES) - j * CELL_PAYLOAD_BYTES;
                v.extend_from_slice(&cell[CELL_HEADER_BYTES + lo..CELL_HEADER_BYTES + hi]);
            }
            return Ok(Some(v));
        }
        let p = self.layout.profile;
        let Some(seq) = agreed_seq(cells, p.data()) else {
            return Ok(None);
        };
        if seq_cmp(seq, min_seq) == Ordering::Less {
            return Ok(None);
        }
        let mut data = vec![0u8; p.stipe_payload_bytes()];
        decode_at(cells, seq, p, codec, &mut data)?;
        Ok(Some(data[span.start..span.end].to_vec()))
    }

    fn unreadable(&self, stipe: u32, cells: &[Option<Got>]) -> KelpError {
        let detail = cells
            .iter()
            .enumerate()
            .map(|(j, g)| match g {
                None => format!("{j}:not asked"),
                Some(Got::Failed) => format!("{j}:failed"),
                Some(Got::Cell(CellCheck::Empty, _)) => format!("{j}:empty"),
                Some(Got::Cell(CellCheck::Valid { seq }, _)) => format!("{j}:seq {seq}"),
                Some(Got::Cell(CellCheck::Invalid(f), _)) => format!("{j}:{f}"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        KelpError::Unreadable {
            blade: self.layout.blade,
            stipe,
            k: self.layout.profile.data(),
            detail,
        }
    }

    /// Reads all n cells of stipes `[first, first + count)` from every shard (for repair, scrub and
    /// updates). Failed stores give `Got::Failed`.
    pub async fn read_all(&self, first: u32, count: u32) -> Vec<Vec<Got>> {
        let n = self.layout.profile.n();
        let mut got: Vec<Vec<Option<Got>>> = vec![vec![None; n]; count as usize];
        let mut inflight = FuturesUnordered::new();
        for shard in 0..n {
            for (f, c) in chunks(first, count) {
                inflight.push(self.start_read(shard, f, c));
            }
        }
        while let Some((shard, f, r)) = inflight.next().await {
            self.take(&mut got, first, shard, f, r, &mut BTreeSet::new());
        }
        got.into_iter()
            .map(|row| row.into_iter().map(|g| g.unwrap_or(Got::Failed)).collect())
            .collect()
    }
}

/// Runs of consecutive values in a sorted list, as (first, count).
pub(crate) fn runs_of(sorted: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &s in sorted {
        match out.last_mut() {
            Some((a, c)) if *a + *c == s => *c += 1,
            _ => out.push((s, 1)),
        }
    }
    out
}

/// Splits `[first, first + count)` into store calls of at most READ_STIPES_PER_CALL_MAX.
fn chunks(first: u32, count: u32) -> impl Iterator<Item = (u32, u32)> {
    (0..count)
        .step_by(READ_STIPES_PER_CALL_MAX as usize)
        .map(move |o| (first + o, (count - o).min(READ_STIPES_PER_CALL_MAX)))
}

/// The newest sequence (at least 1) carried by at least `k` valid cells.
pub fn agreed_seq(cells: &[Option<Got>], k: usize) -> Option<u32> {
    let valid = |g: &Option<Got>| match g {
        Some(Got::Cell(CellCheck::Valid { seq }, _)) => Some(*seq),
        _ => None,
    };
    newest_agreed(cells.iter().filter_map(valid), k, |s| {
        cells.iter().filter(|g| valid(g) == Some(s)).count()
    })
}

/// Decodes the data payloads of the version `seq` from the valid cells at that sequence.
pub fn decode_at(
    cells: &[Option<Got>],
    seq: u32,
    p: Profile,
    codec: &mut Option<StipeCodec>,
    out: &mut [u8],
) -> Result<()> {
    let picked: Vec<(usize, &[u8])> = cells
        .iter()
        .enumerate()
        .filter_map(|(j, g)| match g {
            Some(Got::Cell(CellCheck::Valid { seq: s }, b)) if *s == seq => {
                Some((j, &b[CELL_HEADER_BYTES..]))
            }
            _ => None,
        })
        .take(p.data())
        .collect();
    codec
        .get_or_insert_with(|| StipeCodec::new(p))
        .decode(&picked, out)
}
