//! Bytes written to a file through the mount and not yet sent to the cluster: ranges of the
//! file, kept apart, merged where they touch, the newest bytes winning where they overlap.
//!
//! The mount reads through them (a read sees the writes before it) and sends them in one
//! burst (`Sealfs::write_ranges`) on close, fsync, or when they pass a bound.

use std::collections::BTreeMap;

/// Dirty ranges of one file: start offset -> bytes. Ranges neither overlap nor touch.
#[derive(Default, Debug)]
pub struct Ranges {
    map: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
}

impl Ranges {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of separate ranges.
    pub fn count(&self) -> usize {
        self.map.len()
    }

    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The end of the last range (0 when empty): the file is at least this long.
    pub fn end(&self) -> u64 {
        self.map
            .iter()
            .next_back()
            .map_or(0, |(s, v)| s + v.len() as u64)
    }

    /// The ranges, in order of offset.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.map.iter().map(|(s, v)| (*s, v.as_slice()))
    }

    /// Records `data` at `at`, over whatever was there.
    pub fn insert(&mut self, at: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = at + data.len() as u64;
        // The ranges that overlap or touch [at, end].
        let lo = self
            .map
            .range(..=at)
            .next_back()
            .filter(|(s, v)| **s + v.len() as u64 >= at)
            .map_or(at, |(s, _)| *s);
        let keys: Vec<u64> = self.map.range(lo..=end).map(|(k, _)| *k).collect();
        let start = lo.min(at);
        let mut merged: Vec<u8> = Vec::new();
        for k in keys {
            let v = self.map.remove(&k).unwrap_or_default();
            self.bytes -= v.len();
            if merged.is_empty() && k == start {
                // The usual case, a write that continues a range: keep its buffer.
                merged = v;
                continue;
            }
            let to = (k - start) as usize + v.len();
            if merged.len() < to {
                merged.resize(to, 0);
            }
            merged[(k - start) as usize..to].copy_from_slice(&v);
        }
        let (a, b) = ((at - start) as usize, (end - start) as usize);
        if merged.len() < b {
            merged.resize(b, 0);
        }
        merged[a..b].copy_from_slice(data);
        self.bytes += merged.len();
        self.map.insert(start, merged);
    }

    /// Records the parts of `data` at `at` that no range holds yet (bytes put back after a
    /// failed send, under anything written since).
    pub fn insert_under(&mut self, at: u64, data: &[u8]) {
        let end = at + data.len() as u64;
        let mut gaps = Vec::new();
        let mut pos = at;
        let first = self.map.range(..at).next_back().map_or(at, |(s, _)| *s);
        for (s, v) in self.map.range(first..end) {
            let e = s + v.len() as u64;
            if e <= pos {
                continue;
            }
            if *s > pos {
                gaps.push((pos, *s));
            }
            pos = pos.max(e);
        }
        if pos < end {
            gaps.push((pos, end));
        }
        for (a, b) in gaps {
            self.insert(a, &data[(a - at) as usize..(b - at) as usize]);
        }
    }

    /// Drops what lies at or past `size` (the file was cut there).
    pub fn truncate(&mut self, size: u64) {
        let past: Vec<u64> = self.map.range(size..).map(|(k, _)| *k).collect();
        for k in past {
            if let Some(v) = self.map.remove(&k) {
                self.bytes -= v.len();
            }
        }
        if let Some((s, v)) = self.map.range_mut(..size).next_back() {
            let keep = (size - s) as usize;
            if v.len() > keep {
                self.bytes -= v.len() - keep;
                v.truncate(keep);
            }
        }
    }

    /// Copies of what the ranges hold of `[at, at + len)`: (offset, bytes), in order.
    pub fn pieces(&self, at: u64, len: u64) -> Vec<(u64, Vec<u8>)> {
        let end = at.saturating_add(len);
        let first = self.map.range(..=at).next_back().map_or(at, |(s, _)| *s);
        self.map
            .range(first..end)
            .filter_map(|(s, v)| {
                let (a, b) = ((*s).max(at), (s + v.len() as u64).min(end));
                (a < b).then(|| (a, v[(a - s) as usize..(b - s) as usize].to_vec()))
            })
            .collect()
    }

    /// True if one range holds all of `[at, at + len)`.
    pub fn covers(&self, at: u64, len: u64) -> bool {
        self.map
            .range(..=at)
            .next_back()
            .is_some_and(|(s, v)| s + v.len() as u64 >= at + len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn overlay(r: &Ranges, at: u64, buf: &mut [u8]) {
        for (a, bytes) in r.pieces(at, buf.len() as u64) {
            let from = (a - at) as usize;
            buf[from..from + bytes.len()].copy_from_slice(&bytes);
        }
    }

    /// A plain model: the file as bytes, with a mask of what was written.
    fn model(ops: &[(u64, Vec<u8>, bool)], size: usize) -> (Vec<u8>, Vec<bool>) {
        let mut bytes = vec![0u8; size];
        let mut set = vec![false; size];
        for (at, data, under) in ops {
            for (i, b) in data.iter().enumerate() {
                let p = *at as usize + i;
                if !*under || !set[p] {
                    bytes[p] = *b;
                    set[p] = true;
                }
            }
        }
        (bytes, set)
    }

    proptest! {
        #[test]
        fn ranges_read_back_as_a_file_would(
            ops in proptest::collection::vec(
                (0u64..200, proptest::collection::vec(any::<u8>(), 0..40), any::<bool>()),
                0..30,
            ),
            cut in proptest::option::of(0u64..240),
        ) {
            let mut r = Ranges::default();
            for (at, data, under) in &ops {
                if *under { r.insert_under(*at, data) } else { r.insert(*at, data) }
            }
            let (mut bytes, mut set) = model(&ops, 240);
            if let Some(cut) = cut {
                r.truncate(cut);
                for p in cut as usize..240 {
                    bytes[p] = 0;
                    set[p] = false;
                }
            }
            let mut got = vec![0u8; 240];
            overlay(&r, 0, &mut got);
            prop_assert_eq!(&got, &bytes);
            prop_assert_eq!(r.bytes(), set.iter().filter(|s| **s).count());
            let end = set.iter().rposition(|s| *s).map_or(0, |p| p + 1);
            prop_assert_eq!(r.end(), end as u64);
            // Ranges are apart: none overlaps or touches the next.
            let v: Vec<(u64, usize)> = r.iter().map(|(s, d)| (s, d.len())).collect();
            for w in v.windows(2) {
                prop_assert!(w[0].0 + (w[0].1 as u64) < w[1].0);
            }
            // A window read in the middle sees the same bytes.
            let mut mid = vec![0u8; 50];
            overlay(&r, 60, &mut mid);
            prop_assert_eq!(&mid[..], &bytes[60..110]);
        }
    }

    #[test]
    fn a_stream_of_writes_is_one_range() {
        let mut r = Ranges::default();
        for i in 0..100u64 {
            r.insert(i * 10, &[i as u8; 10]);
        }
        assert_eq!(r.count(), 1);
        assert_eq!(r.bytes(), 1000);
        assert!(r.covers(0, 1000));
        assert!(!r.covers(0, 1001));
        assert!(r.covers(995, 5));
    }
}
