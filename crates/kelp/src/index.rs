//! The compact frond index of a blade (DESIGN 4.7): the start offsets of its fronds, a monotonic
//! sequence kept as Elias-Fano (sucds) plus a short uncompressed tail of recent appends that is
//! folded in when it grows past a fraction of the compressed part (amortised O(1) per append: each offset is copied about 32 times).

use sucds::mii_sequences::{EliasFano, EliasFanoBuilder};
use sucds::Serializable;

/// Recent offsets kept uncompressed at least this long before folding.
const TAIL_LEN_MIN: usize = 1024;

/// Start offsets (bytes) of the fronds of one blade, in increasing order.
#[derive(Default)]
pub struct FrondIndex {
    sealed: Option<EliasFano>,
    tail: Vec<u64>,
}

impl FrondIndex {
    /// Adds the start of a frond; offsets must increase.
    pub fn push(&mut self, offset: u64) {
        if let Some(&last) = self.tail.last().or(self.last_sealed().as_ref()) {
            assert!(
                offset > last,
                "frond offsets must increase: {offset} after {last}"
            );
        }
        self.tail.push(offset);
        let sealed = self.sealed.as_ref().map_or(0, |e| e.len());
        if self.tail.len() >= TAIL_LEN_MIN.max(sealed / 32) {
            self.fold();
        }
    }

    fn last_sealed(&self) -> Option<u64> {
        let e = self.sealed.as_ref()?;
        e.select(e.len().checked_sub(1)?)
    }

    fn fold(&mut self) {
        let old = self.sealed.take();
        let old_len = old.as_ref().map_or(0, |e| e.len());
        let universe = self.tail.last().copied().unwrap_or(0) + 1;
        let mut b =
            EliasFanoBuilder::new(universe, old_len + self.tail.len()).expect("universe > 0");
        if let Some(e) = &old {
            for v in e.iter(0) {
                b.push(v).expect("monotonic");
            }
        }
        for &v in &self.tail {
            b.push(v).expect("monotonic");
        }
        self.sealed = Some(b.build().enable_rank());
        self.tail = Vec::new();
    }

    /// Fronds indexed.
    pub fn len(&self) -> usize {
        self.sealed.as_ref().map_or(0, |e| e.len()) + self.tail.len()
    }

    /// No fronds indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The start of the i-th frond.
    pub fn nth(&self, i: usize) -> Option<u64> {
        let sealed = self.sealed.as_ref().map_or(0, |e| e.len());
        if i < sealed {
            self.sealed.as_ref()?.select(i)
        } else {
            self.tail.get(i - sealed).copied()
        }
    }

    /// The start of the frond that contains (or starts at) byte `x`: the greatest start <= x.
    pub fn containing(&self, x: u64) -> Option<u64> {
        let pos = self.tail.partition_point(|&v| v <= x);
        if pos > 0 {
            return Some(self.tail[pos - 1]);
        }
        let e = self.sealed.as_ref()?;
        if x >= e.universe() {
            return self.last_sealed();
        }
        e.predecessor(x)
    }

    /// Heap bytes used.
    pub fn memory_bytes(&self) -> usize {
        self.sealed.as_ref().map_or(0, |e| e.size_in_bytes()) + self.tail.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn matches_a_plain_list(gaps in proptest::collection::vec(1u64..5000, 0..5000), probes in proptest::collection::vec(0u64..30_000_000, 50)) {
            let mut idx = FrondIndex::default();
            let mut starts = Vec::new();
            let mut at = 0;
            for g in gaps { idx.push(at); starts.push(at); at += g * 8; }
            prop_assert_eq!(idx.len(), starts.len());
            for (i, &s) in starts.iter().enumerate().step_by(37) {
                prop_assert_eq!(idx.nth(i), Some(s));
            }
            for x in probes {
                let want = starts.iter().rev().find(|&&s| s <= x).copied();
                prop_assert_eq!(idx.containing(x), want);
            }
        }
    }

    #[test]
    fn stays_compact() {
        let mut idx = FrondIndex::default();
        for i in 0..200_000u64 {
            idx.push(i * 4160);
        }
        // Elias-Fano: about 2 + log2(4160) bits per entry plus the uncompressed tail.
        eprintln!("{} bytes for 200000 fronds", idx.memory_bytes());
        assert!(
            idx.memory_bytes() < 200_000 * 5 / 2,
            "{} bytes",
            idx.memory_bytes()
        );
    }
}
