//! The stipe codec: Reed-Solomon RS(k, m) over the 4080-byte payloads of a stipe's cells, and
//! the building of runs of whole cells from a slice of the blade's payload stream.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use bytes::{Bytes, BytesMut};
use erasure_isa_l::erasure::{DecodeTable, ErasureCode};

use crate::cell::{
    aligned_buffer, seal_cell, CellId, CELL_BYTES, CELL_HEADER_BYTES, CELL_PAYLOAD_BYTES,
};
use crate::error::{KelpError, Result};
use crate::profile::Profile;

/// Decode tables kept per codec (one per erasure pattern seen) before the cache is cleared.
const DECODE_TABLES_MAX: usize = 256;

/// Reed-Solomon coder for one profile: ISA-L's erasure code with a Cauchy matrix (any k of the n
/// cells decode), through erasure-isa-l; docs/kelp.md says why this library. Decode tables are
/// cached per erasure pattern.
pub struct StipeCodec {
    profile: Profile,
    ec: ErasureCode,
    tables: HashMap<u64, DecodeTable>,
    /// Scratch for decoding: m parity payloads.
    work: Vec<u8>,
}

impl StipeCodec {
    /// A coder for `profile`.
    pub fn new(profile: Profile) -> Self {
        let nz = |v: u8| NonZeroUsize::new(v as usize).expect("profile checked: k, m >= 1");
        let ec = ErasureCode::with_cauchy(nz(profile.k), nz(profile.m))
            .expect("profile checked: k + m <= 64");
        StipeCodec {
            profile,
            ec,
            tables: HashMap::new(),
            work: Vec::new(),
        }
    }

    /// The profile.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Computes the m parity payloads of the k data payloads in `data` (k * 4080 bytes) into
    /// `parity` (m slices of 4080 bytes).
    pub fn encode(&self, data: &[u8], parity: &mut [&mut [u8]]) {
        assert_eq!(data.len(), self.profile.stipe_payload_bytes());
        let shards: Vec<&[u8]> = data.chunks_exact(CELL_PAYLOAD_BYTES).collect();
        self.ec
            .encode(&shards, parity)
            .expect("k data and m parity payloads of 4080 bytes");
    }

    /// Reconstructs the k data payloads into `out` (k * 4080 bytes) from `cells`, a list of
    /// (shard, payload) with at least k entries; shards below k are data, the rest parity.
    pub fn decode(&mut self, cells: &[(usize, &[u8])], out: &mut [u8]) -> Result<()> {
        let p = self.profile;
        let (k, n) = (p.data(), p.n());
        assert_eq!(out.len(), p.stipe_payload_bytes());
        self.work.resize((n - k) * CELL_PAYLOAD_BYTES, 0);
        let mut have = vec![false; n];
        for &(shard, payload) in cells {
            if shard < n && payload.len() == CELL_PAYLOAD_BYTES && !have[shard] {
                have[shard] = true;
                let dst = if shard < k {
                    &mut out[shard * CELL_PAYLOAD_BYTES..(shard + 1) * CELL_PAYLOAD_BYTES]
                } else {
                    &mut self.work
                        [(shard - k) * CELL_PAYLOAD_BYTES..(shard - k + 1) * CELL_PAYLOAD_BYTES]
                };
                dst.copy_from_slice(payload);
            }
        }
        if have[..k].iter().all(|&h| h) {
            return Ok(());
        }
        let present = have.iter().filter(|&&h| h).count();
        if present < k {
            return Err(KelpError::invalid(format!(
                "decode needs {k} cells, got {present}"
            )));
        }
        // Every missing cell is an erasure (so that none is read as a source); at most m.
        let erasures: Vec<usize> = (0..n).filter(|&j| !have[j]).collect();
        let pattern = erasures.iter().fold(0u64, |acc, &j| acc | 1 << j);
        if !self.tables.contains_key(&pattern) {
            if self.tables.len() >= DECODE_TABLES_MAX {
                self.tables.clear();
            }
            let table = self
                .ec
                .make_decode_table(erasures.clone())
                .map_err(|e| KelpError::invalid(format!("decode: {e}")))?;
            self.tables.insert(pattern, table);
        }
        let table = &self.tables[&pattern];
        let data: Vec<&mut [u8]> = out.chunks_exact_mut(CELL_PAYLOAD_BYTES).collect();
        let code: Vec<&mut [u8]> = self.work.chunks_exact_mut(CELL_PAYLOAD_BYTES).collect();
        self.ec
            .decode_with_table(data, code, table, erasures)
            .map_err(|e| KelpError::invalid(format!("decode: {e}")))
    }

    /// Builds the cells of `count` consecutive stipes starting at `first` from `data`
    /// (count * k * 4080 bytes of the stream), with the sequence of each stipe in `seqs`.
    /// Returns one buffer per shard holding that shard's `count` cells back to back.
    pub fn build_run(&self, blade: u32, first: u32, seqs: &[u32], data: &[u8]) -> Vec<Bytes> {
        let p = self.profile;
        let (k, n) = (p.k as usize, p.n());
        let count = seqs.len();
        assert_eq!(data.len(), count * p.stipe_payload_bytes());
        // Aligned, so that a local disk takes them by direct IO as they are.
        let mut shards: Vec<BytesMut> = (0..n)
            .map(|_| {
                let mut b = aligned_buffer(count * CELL_BYTES);
                b.resize(count * CELL_BYTES, 0);
                b
            })
            .collect();
        for (i, stipe_data) in data.chunks_exact(p.stipe_payload_bytes()).enumerate() {
            let at = i * CELL_BYTES + CELL_HEADER_BYTES;
            for (j, chunk) in stipe_data.chunks_exact(CELL_PAYLOAD_BYTES).enumerate() {
                shards[j][at..at + CELL_PAYLOAD_BYTES].copy_from_slice(chunk);
            }
            let (_, parity_shards) = shards.split_at_mut(k);
            let mut parity: Vec<&mut [u8]> = parity_shards
                .iter_mut()
                .map(|b| &mut b[at..at + CELL_PAYLOAD_BYTES])
                .collect();
            self.encode(stipe_data, &mut parity);
            for (shard, buf) in shards.iter_mut().enumerate() {
                let id = CellId {
                    blade,
                    stipe: first + i as u32,
                    shard: shard as u8,
                };
                seal_cell(&mut buf[i * CELL_BYTES..(i + 1) * CELL_BYTES], id, seqs[i]);
            }
        }
        shards.into_iter().map(BytesMut::freeze).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cell::{check_cell, payload, CellCheck};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn decode_from_any_k_cells(k in 1u8..12, m in 1u8..10, seed: u64, lose_seed: u64) {
            let m = m.min(64 - k);
            let p = Profile::new(k, m, m.div_ceil(2)).unwrap();
            let mut data = vec![0u8; p.stipe_payload_bytes()];
            let mut x = seed | 1;
            for b in data.iter_mut() { x ^= x << 13; x ^= x >> 7; x ^= x << 17; *b = x as u8; }
            let mut codec = StipeCodec::new(p);
            let run = codec.build_run(9, 3, &[2], &data);
            for (shard, cell) in run.iter().enumerate() {
                let id = CellId { blade: 9, stipe: 3, shard: shard as u8 };
                prop_assert_eq!(check_cell(cell, id), CellCheck::Valid { seq: 2 });
            }
            // Keep a random k of the n cells.
            let n = p.n();
            let mut order: Vec<usize> = (0..n).collect();
            let mut y = lose_seed | 1;
            for i in (1..n).rev() { y ^= y << 13; y ^= y >> 7; y ^= y << 17; order.swap(i, (y % (i as u64 + 1)) as usize); }
            let kept: Vec<(usize, &[u8])> = order[..k as usize].iter().map(|&s| (s, payload(&run[s]))).collect();
            let mut out = vec![0u8; p.stipe_payload_bytes()];
            codec.decode(&kept, &mut out).unwrap();
            prop_assert!(out == data);
        }
    }

    proptest! {
        #[test]
        fn decode_of_arbitrary_bytes_never_panics(shards in proptest::collection::vec((0usize..20, proptest::collection::vec(any::<u8>(), 0..4100)), 0..20)) {
            let mut codec = StipeCodec::new(Profile::new(8, 8, 4).unwrap());
            let cells: Vec<(usize, &[u8])> = shards.iter().map(|(j, b)| (*j, &b[..])).collect();
            let mut out = vec![0u8; codec.profile().stipe_payload_bytes()];
            let _ = codec.decode(&cells, &mut out);
        }
    }

    #[test]
    fn widest_profile_round_trips() {
        let p = Profile::new(32, 32, 16).unwrap();
        let data: Vec<u8> = (0..p.stipe_payload_bytes())
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut codec = StipeCodec::new(p);
        let run = codec.build_run(1, 0, &[1], &data);
        let kept: Vec<(usize, &[u8])> = (32..64).map(|s| (s, payload(&run[s]))).collect();
        let mut out = vec![0u8; p.stipe_payload_bytes()];
        codec.decode(&kept, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(codec.decode(&kept[..31], &mut out).is_err());
    }
}
