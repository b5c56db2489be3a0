//! Addresses and the blade payload stream (DESIGN 3.2): an address is the blade id in the high 32
//! bits and an offset in 8-byte units in the low 32, so a blade addresses 32 GiB of payload.

use crate::cell::{CELL_PAYLOAD_BYTES, STIPE_INDEX_MAX};
use crate::error::{KelpError, Result};
use crate::profile::Profile;

/// Payload bytes one blade can address (2^32 units of 8 bytes).
pub const BLADE_PAYLOAD_BYTES_MAX: u64 = 1 << 35;

const _: () =
    assert!(BLADE_PAYLOAD_BYTES_MAX / CELL_PAYLOAD_BYTES as u64 <= STIPE_INDEX_MAX as u64);

/// A 64-bit address of a frond: blade id and 8-byte-aligned offset within the blade's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(pub u64);

impl Address {
    /// The address of byte `byte_offset` of blade `blade`; the offset must be 8-byte aligned and
    /// inside the blade.
    pub fn new(blade: u32, byte_offset: u64) -> Result<Self> {
        if !byte_offset.is_multiple_of(8) {
            return Err(KelpError::invalid(format!(
                "offset {byte_offset} in blade {blade:08x} is not 8-byte aligned"
            )));
        }
        if byte_offset >= BLADE_PAYLOAD_BYTES_MAX {
            return Err(KelpError::invalid(format!(
                "offset {byte_offset} is past the end of blade {blade:08x} ({BLADE_PAYLOAD_BYTES_MAX} bytes)"
            )));
        }
        Ok(Address(((blade as u64) << 32) | (byte_offset / 8)))
    }

    /// The blade id.
    pub fn blade(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The offset within the blade's payload stream, in bytes.
    pub fn byte_offset(self) -> u64 {
        (self.0 & 0xFFFF_FFFF) * 8
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}:{:x}", self.blade(), self.byte_offset())
    }
}

/// Where a frond lives and which version of its first stipe wrote it: what metadata stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// The frond's address.
    pub address: Address,
    /// Length of the frond's data in bytes.
    pub len: u32,
    /// Sequence of the first stipe when the frond was written; reads reject older cells.
    pub seq: u32,
}

/// The cells of one stipe that a byte range of the stream touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StipeSpan {
    /// Stipe index.
    pub stipe: u32,
    /// First byte of the range within the stipe's payload (0..k*4080).
    pub start: usize,
    /// End (exclusive) within the stipe's payload.
    pub end: usize,
}

impl StipeSpan {
    /// The data shards (cells) this span touches.
    pub fn data_shards(&self) -> std::ops::Range<usize> {
        self.start / CELL_PAYLOAD_BYTES..self.end.div_ceil(CELL_PAYLOAD_BYTES)
    }
}

/// Splits the stream range `[start, end)` into per-stipe spans for `profile`.
pub fn stipe_spans(profile: Profile, start: u64, end: u64) -> Vec<StipeSpan> {
    assert!(start <= end && end <= BLADE_PAYLOAD_BYTES_MAX);
    let stipe_bytes = profile.stipe_payload_bytes() as u64;
    let mut spans = Vec::new();
    let mut at = start;
    while at < end {
        let stipe = at / stipe_bytes;
        let base = stipe * stipe_bytes;
        let stop = end.min(base + stipe_bytes);
        spans.push(StipeSpan {
            stipe: stipe as u32,
            start: (at - base) as usize,
            end: (stop - base) as usize,
        });
        at = stop;
    }
    spans
}

/// Checks that `len` bytes starting at `start` fit in a blade.
pub fn check_range(blade: u32, start: u64, len: u64) -> Result<()> {
    match start.checked_add(len) {
        Some(end) if end <= BLADE_PAYLOAD_BYTES_MAX => Ok(()),
        _ => Err(KelpError::invalid(format!(
            "range of {len} bytes at offset {start} runs past the end of blade {blade:08x}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn limits_are_checked() {
        assert!(Address::new(1, 3).is_err());
        assert!(Address::new(1, BLADE_PAYLOAD_BYTES_MAX).is_err());
        let a = Address::new(7, BLADE_PAYLOAD_BYTES_MAX - 8).unwrap();
        assert_eq!(a.blade(), 7);
        assert_eq!(a.byte_offset(), BLADE_PAYLOAD_BYTES_MAX - 8);
        assert!(check_range(1, BLADE_PAYLOAD_BYTES_MAX - 8, 16).is_err());
        assert!(check_range(1, u64::MAX, 16).is_err());
    }

    proptest! {
        #[test]
        fn address_round_trip(blade: u32, units in 0u64..(1 << 32)) {
            let a = Address::new(blade, units * 8).unwrap();
            prop_assert_eq!((a.blade(), a.byte_offset()), (blade, units * 8));
        }

        #[test]
        fn spans_cover_the_range(start in 0u64..2_000_000, len in 0u64..500_000, k in 1u8..12) {
            let p = Profile::new(k, 2, 1).unwrap();
            let spans = stipe_spans(p, start, start + len);
            let total: u64 = spans.iter().map(|s| (s.end - s.start) as u64).sum();
            prop_assert_eq!(total, len);
            for w in spans.windows(2) {
                prop_assert_eq!(w[0].stipe + 1, w[1].stipe);
            }
        }
    }
}
