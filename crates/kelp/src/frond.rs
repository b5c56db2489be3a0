//! The frond: one record at an address (DESIGN 3.4).
//!
//! `u32 length | u32 kind/flags (zero) | data | zero padding to 8 bytes | BLAKE3(header || data)`.
//! The writer computes the checksum, the holdfast verifies it before encoding, and a reader of a
//! whole frond verifies it after decoding.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{KelpError, Result};

/// Bytes of a frond header.
pub const FROND_HEADER_BYTES: usize = 8;
/// Bytes of a frond's BLAKE3 checksum.
pub const FROND_HASH_BYTES: usize = 32;
/// Largest frond data length accepted (bounded before anything is allocated).
pub const FROND_DATA_BYTES_MAX: usize = 64 << 20;

/// The data length rounded up to 8 bytes.
pub fn padded(len: usize) -> usize {
    (len + 7) & !7
}

/// Bytes a frond with `len` bytes of data takes in the stream.
pub fn frond_bytes(len: usize) -> usize {
    FROND_HEADER_BYTES + padded(len) + FROND_HASH_BYTES
}

fn checksum(header: &[u8], data: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(header);
    h.update(data);
    h.finalize()
}

/// Encodes `data` as a frond (what a writer sends to a holdfast).
pub fn encode(data: &[u8]) -> Result<Bytes> {
    if data.len() > FROND_DATA_BYTES_MAX {
        return Err(KelpError::invalid(format!(
            "frond of {} bytes is over the limit of {FROND_DATA_BYTES_MAX}",
            data.len()
        )));
    }
    let mut out = BytesMut::with_capacity(frond_bytes(data.len()));
    out.put_u32_le(data.len() as u32);
    out.put_u32_le(0);
    out.put_slice(data);
    out.put_bytes(0, padded(data.len()) - data.len());
    let hash = checksum(&out[..FROND_HEADER_BYTES], data);
    out.put_slice(hash.as_bytes());
    Ok(out.freeze())
}

/// Verifies an encoded frond and returns the range of its data within `frond`.
pub fn verify(frond: &[u8], address: u64) -> Result<std::ops::Range<usize>> {
    let bad = |what: String| KelpError::Frond { address, what };
    if frond.len() < FROND_HEADER_BYTES + FROND_HASH_BYTES {
        return Err(bad(format!(
            "{} bytes is shorter than any frond",
            frond.len()
        )));
    }
    let len = u32::from_le_bytes([frond[0], frond[1], frond[2], frond[3]]) as usize;
    let flags = u32::from_le_bytes([frond[4], frond[5], frond[6], frond[7]]);
    if len > FROND_DATA_BYTES_MAX {
        return Err(bad(format!("length {len} is over the limit")));
    }
    if flags != 0 {
        return Err(bad(format!(
            "reserved kind/flags field is {flags:#x}, expected 0"
        )));
    }
    if frond.len() != frond_bytes(len) {
        return Err(bad(format!(
            "header says {len} data bytes ({} in all) but {} bytes were given",
            frond_bytes(len),
            frond.len()
        )));
    }
    let data_end = FROND_HEADER_BYTES + len;
    let pad_end = FROND_HEADER_BYTES + padded(len);
    if frond[data_end..pad_end].iter().any(|&b| b != 0) {
        return Err(bad("padding is not zero".into()));
    }
    let want = checksum(
        &frond[..FROND_HEADER_BYTES],
        &frond[FROND_HEADER_BYTES..data_end],
    );
    if want.as_bytes() != &frond[pad_end..] {
        return Err(bad("BLAKE3 checksum mismatch".into()));
    }
    Ok(FROND_HEADER_BYTES..data_end)
}

/// The data length a frond header claims, if the header is well formed.
pub fn header_len(header: &[u8]) -> Option<usize> {
    if header.len() < FROND_HEADER_BYTES {
        return None;
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let flags = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    (flags == 0 && len <= FROND_DATA_BYTES_MAX).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn frond_round_trip(data in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            let f = encode(&data).unwrap();
            prop_assert_eq!(f.len(), frond_bytes(data.len()));
            prop_assert_eq!(f.len() % 8, 0);
            let r = verify(&f, 0).unwrap();
            prop_assert_eq!(&f[r], &data[..]);
        }

        #[test]
        fn any_flip_is_detected(data in proptest::collection::vec(any::<u8>(), 0..300), pos: usize, bit in 0u8..8) {
            let mut f = encode(&data).unwrap().to_vec();
            let pos = pos % f.len();
            f[pos] ^= 1 << bit;
            prop_assert!(verify(&f, 0).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = verify(&data, 0);
            let _ = header_len(&data);
        }
    }
}
