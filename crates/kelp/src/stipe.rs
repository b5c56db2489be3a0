//! The stipe codec: Reed-Solomon RS(k, m) over the 4080-byte payloads of a stipe's cells, and
//! the building of runs of whole cells from a slice of the blade's payload stream.

use bytes::{Bytes, BytesMut};
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

use crate::cell::{seal_cell, CellId, CELL_BYTES, CELL_HEADER_BYTES, CELL_PAYLOAD_BYTES};
use crate::error::{KelpError, Result};
use crate::profile::Profile;

/// Reed-Solomon coder for one profile; keeps its work buffers between stipes.
pub struct StipeCodec {
    profile: Profile,
    encoder: ReedSolomonEncoder,
    decoder: ReedSolomonDecoder,
}

impl StipeCodec {
    /// A coder for `profile`.
    pub fn new(profile: Profile) -> Self {
        let (k, m) = (profile.k as usize, profile.m as usize);
        let encoder = ReedSolomonEncoder::new(k, m, CELL_PAYLOAD_BYTES)
            .expect("profile checked: k + m within the coder's range");
        let decoder = ReedSolomonDecoder::new(k, m, CELL_PAYLOAD_BYTES)
            .expect("profile checked: k + m within the coder's range");
        StipeCodec {
            profile,
            encoder,
            decoder,
        }
    }

    /// The profile.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Computes the m parity payloads of the k data payloads in `data` (k * 4080 bytes) and hands
    /// each to `out(parity_index, payload)`.
    pub fn encode(&mut self, data: &[u8], mut out: impl FnMut(usize, &[u8])) {
        let p = self.profile;
        assert_eq!(data.len(), p.stipe_payload_bytes());
        self.encoder
            .reset(p.k as usize, p.m as usize, CELL_PAYLOAD_BYTES)
            .expect("valid profile");
        for chunk in data.chunks_exact(CELL_PAYLOAD_BYTES) {
            self.encoder
                .add_original_shard(chunk)
                .expect("k shards of the right size");
        }
        let result = self.encoder.encode().expect("all originals added");
        for (i, parity) in result.recovery_iter().enumerate() {
            out(i, parity);
        }
    }

    /// Reconstructs the k data payloads into `out` (k * 4080 bytes) from `cells`, a list of
    /// (shard, payload) with at least k entries; shards below k are data, the rest parity.
    pub fn decode(&mut self, cells: &[(usize, &[u8])], out: &mut [u8]) -> Result<()> {
        let p = self.profile;
        let k = p.k as usize;
        assert_eq!(out.len(), p.stipe_payload_bytes());
        let mut have = vec![false; k];
        for &(shard, payload) in cells {
            if shard < k && payload.len() == CELL_PAYLOAD_BYTES {
                out[shard * CELL_PAYLOAD_BYTES..(shard + 1) * CELL_PAYLOAD_BYTES]
                    .copy_from_slice(payload);
                have[shard] = true;
            }
        }
        if have.iter().all(|&h| h) {
            return Ok(());
        }
        if cells.len() < k {
            return Err(KelpError::invalid(format!(
                "decode needs {k} cells, got {}",
                cells.len()
            )));
        }
        self.decoder
            .reset(k, p.m as usize, CELL_PAYLOAD_BYTES)
            .expect("valid profile");
        let mut used = 0;
        for &(shard, payload) in cells {
            if used == k {
                break;
            }
            let added = if shard < k {
                self.decoder.add_original_shard(shard, payload)
            } else {
                self.decoder.add_recovery_shard(shard - k, payload)
            };
            added.map_err(|e| KelpError::invalid(format!("decode: shard {shard}: {e}")))?;
            used += 1;
        }
        let result = self
            .decoder
            .decode()
            .map_err(|e| KelpError::invalid(format!("decode: {e}")))?;
        for (shard, payload) in result.restored_original_iter() {
            out[shard * CELL_PAYLOAD_BYTES..(shard + 1) * CELL_PAYLOAD_BYTES]
                .copy_from_slice(payload);
        }
        Ok(())
    }

    /// Builds the cells of `count` consecutive stipes starting at `first` from `data`
    /// (count * k * 4080 bytes of the stream), with the sequence of each stipe in `seqs`.
    /// Returns one buffer per shard holding that shard's `count` cells back to back.
    pub fn build_run(&mut self, blade: u32, first: u32, seqs: &[u32], data: &[u8]) -> Vec<Bytes> {
        let p = self.profile;
        let (k, n) = (p.k as usize, p.n());
        let count = seqs.len();
        assert_eq!(data.len(), count * p.stipe_payload_bytes());
        let mut shards: Vec<BytesMut> = (0..n)
            .map(|_| BytesMut::zeroed(count * CELL_BYTES))
            .collect();
        for (i, stipe_data) in data.chunks_exact(p.stipe_payload_bytes()).enumerate() {
            let at = i * CELL_BYTES + CELL_HEADER_BYTES;
            for (j, chunk) in stipe_data.chunks_exact(CELL_PAYLOAD_BYTES).enumerate() {
                shards[j][at..at + CELL_PAYLOAD_BYTES].copy_from_slice(chunk);
            }
            self.encode(stipe_data, |pi, parity| {
                shards[k + pi][at..at + CELL_PAYLOAD_BYTES].copy_from_slice(parity);
            });
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
