//! The cell: 4096 bytes on disk, a 16-byte self-naming header and 4080 bytes of payload
//! (DESIGN 3.1). Every cell verifies itself with CRC-32C; the all-zero cell is the empty cell.

use std::cmp::Ordering;

use bytes::{Buf, BufMut, BytesMut};

/// Bytes in a cell.
pub const CELL_BYTES: usize = 4096;
/// Bytes in a cell header.
pub const CELL_HEADER_BYTES: usize = 16;
/// Payload bytes in a cell.
pub const CELL_PAYLOAD_BYTES: usize = CELL_BYTES - CELL_HEADER_BYTES;
/// The cell format version written by this code.
pub const CELL_FORMAT_VERSION: u8 = 1;
/// The largest sequence (24 bits); after it comes 1 again (0 means never written).
pub const SEQ_MAX: u32 = 0x00FF_FFFF;
/// The largest stipe index (24 bits).
pub const STIPE_INDEX_MAX: u32 = 0x00FF_FFFF;

const _: () = assert!(CELL_BYTES == 4096);
const _: () = assert!(CELL_PAYLOAD_BYTES == 4080);
const _: () = assert!(CELL_PAYLOAD_BYTES.is_multiple_of(8));

/// Where a cell belongs: blade, stipe and shard. A valid cell carries these in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellId {
    /// Blade id.
    pub blade: u32,
    /// Stipe index within the blade (24 bits).
    pub stipe: u32,
    /// Shard position within the stipe.
    pub shard: u8,
}

impl std::fmt::Display for CellId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "blade {:08x} stipe {} shard {}",
            self.blade, self.stipe, self.shard
        )
    }
}

/// What a cell read from disk turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellCheck {
    /// All 4096 bytes are zero: never written (sequence 0).
    Empty,
    /// CRC and identity match; the cell holds this sequence.
    Valid {
        /// The cell's sequence (1..=SEQ_MAX).
        seq: u32,
    },
    /// The cell must not be used.
    Invalid(CellFault),
}

impl CellCheck {
    /// The sequence if the cell is usable: 0 for empty, its sequence for valid cells.
    pub fn seq(self) -> Option<u32> {
        match self {
            CellCheck::Empty => Some(0),
            CellCheck::Valid { seq } => Some(seq),
            CellCheck::Invalid(_) => None,
        }
    }
}

/// Why a cell is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellFault {
    /// The buffer is not 4096 bytes.
    Size,
    /// The CRC-32C does not match the contents.
    Crc,
    /// The header names another blade, stipe or shard than where the cell was read from.
    WrongPlace(CellId),
    /// The format version is not one this code reads.
    Version(u8),
    /// The header says sequence 0 but the cell is not all zero.
    ZeroSequence,
}

impl std::fmt::Display for CellFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CellFault::Size => write!(f, "cell is not {CELL_BYTES} bytes"),
            CellFault::Crc => write!(f, "CRC mismatch"),
            CellFault::WrongPlace(id) => write!(f, "cell belongs to {id}"),
            CellFault::Version(v) => write!(f, "unknown cell format version {v}"),
            CellFault::ZeroSequence => write!(f, "non-empty cell with sequence 0"),
        }
    }
}

/// CRC-32C of a cell: bytes 0..12 and 16..4096 (the CRC field itself excluded).
pub fn cell_crc(cell: &[u8]) -> u32 {
    debug_assert_eq!(cell.len(), CELL_BYTES);
    let head = crc32c::crc32c(&cell[..12]);
    crc32c::crc32c_append(head, &cell[CELL_HEADER_BYTES..])
}

/// Fills the header of `cell` (whose payload at 16..4096 is already in place) and its CRC.
pub fn seal_cell(cell: &mut [u8], id: CellId, seq: u32) {
    assert_eq!(cell.len(), CELL_BYTES, "cell buffer size");
    assert!(
        id.stipe <= STIPE_INDEX_MAX,
        "stipe index {} past 24 bits",
        id.stipe
    );
    assert!((1..=SEQ_MAX).contains(&seq), "sequence {seq} out of range");
    cell[0..4].copy_from_slice(&id.blade.to_le_bytes());
    cell[4..7].copy_from_slice(&id.stipe.to_le_bytes()[..3]);
    cell[7] = id.shard;
    cell[8] = CELL_FORMAT_VERSION;
    cell[9..12].copy_from_slice(&seq.to_le_bytes()[..3]);
    let crc = cell_crc(cell);
    cell[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Builds a whole cell from its identity, sequence and payload (shorter payloads are zero-padded).
pub fn make_cell(id: CellId, seq: u32, payload: &[u8]) -> [u8; CELL_BYTES] {
    assert!(payload.len() <= CELL_PAYLOAD_BYTES, "payload too long");
    let mut cell = [0u8; CELL_BYTES];
    cell[CELL_HEADER_BYTES..CELL_HEADER_BYTES + payload.len()].copy_from_slice(payload);
    seal_cell(&mut cell, id, seq);
    cell
}

/// Whether `bytes` starts on a cell boundary of memory (what direct IO needs of a buffer).
pub fn cell_aligned(bytes: &[u8]) -> bool {
    bytes.as_ptr().addr().is_multiple_of(CELL_BYTES)
}

/// An empty buffer with room for `capacity` bytes, starting on a cell boundary of memory, so
/// that cells built in it can go to the disk by direct IO without a copy. It stays aligned
/// while it grows within `capacity`.
pub fn aligned_buffer(capacity: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(capacity + CELL_BYTES);
    let pad = (CELL_BYTES - b.as_ptr().addr() % CELL_BYTES) % CELL_BYTES;
    b.put_bytes(0, pad);
    b.advance(pad);
    b
}

/// The identity and sequence a cell's header claims, without checking anything.
pub fn read_header(cell: &[u8]) -> (CellId, u8, u32) {
    let mut b = [0u8; 4];
    b[..3].copy_from_slice(&cell[4..7]);
    let stipe = u32::from_le_bytes(b);
    b[..3].copy_from_slice(&cell[9..12]);
    let seq = u32::from_le_bytes(b);
    let blade = u32::from_le_bytes([cell[0], cell[1], cell[2], cell[3]]);
    (
        CellId {
            blade,
            stipe,
            shard: cell[7],
        },
        cell[8],
        seq,
    )
}

/// Checks a cell read from the place `expect`: empty, valid with a sequence, or invalid.
pub fn check_cell(cell: &[u8], expect: CellId) -> CellCheck {
    if cell.len() != CELL_BYTES {
        return CellCheck::Invalid(CellFault::Size);
    }
    let stored = u32::from_le_bytes([cell[12], cell[13], cell[14], cell[15]]);
    if stored == 0 && cell.iter().all(|&b| b == 0) {
        return CellCheck::Empty;
    }
    if stored != cell_crc(cell) {
        return CellCheck::Invalid(CellFault::Crc);
    }
    let (id, version, seq) = read_header(cell);
    if version != CELL_FORMAT_VERSION {
        return CellCheck::Invalid(CellFault::Version(version));
    }
    if id != expect {
        return CellCheck::Invalid(CellFault::WrongPlace(id));
    }
    if seq == 0 {
        return CellCheck::Invalid(CellFault::ZeroSequence);
    }
    CellCheck::Valid { seq }
}

/// The payload of a cell.
pub fn payload(cell: &[u8]) -> &[u8] {
    &cell[CELL_HEADER_BYTES..CELL_BYTES]
}

/// The sequence after `seq`; wraps from SEQ_MAX to 1 (0 is never reused).
pub fn seq_next(seq: u32) -> u32 {
    if seq >= SEQ_MAX {
        1
    } else {
        seq + 1
    }
}

/// The sequence before `seq` (the inverse of `seq_next`).
pub fn seq_prev(seq: u32) -> u32 {
    if seq <= 1 {
        SEQ_MAX
    } else {
        seq - 1
    }
}

/// Orders sequences by serial-number arithmetic over 1..=SEQ_MAX, so that a sequence that wrapped
/// is still newer than the one before it; 0 (never written) is older than every other.
pub fn seq_cmp(a: u32, b: u32) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    if a == 0 {
        return Ordering::Less;
    }
    if b == 0 {
        return Ordering::Greater;
    }
    let span = SEQ_MAX; // values 1..=SEQ_MAX
    let d = (a + span - b) % span;
    if d <= span / 2 {
        Ordering::Greater
    } else {
        Ordering::Less
    }
}

/// The newest of `seqs` that `votes` counts at least `k` times. Sequences read from disks can
/// be spread around the ring so that [`seq_cmp`] orders them in a cycle (no total order, which
/// a sort may panic on): only those with `k` votes are compared, and the newest is found by one
/// pass (with k of n voting, at most n / k of them), without allocating.
pub fn newest_agreed(
    seqs: impl IntoIterator<Item = u32>,
    k: usize,
    votes: impl Fn(u32) -> usize,
) -> Option<u32> {
    let mut newest: Option<u32> = None;
    for s in seqs {
        // The cells of a stipe mostly carry one sequence: it is counted once.
        if newest == Some(s) {
            continue;
        }
        if newest.is_none_or(|n| seq_cmp(s, n) == Ordering::Greater) && votes(s) >= k {
            newest = Some(s);
        }
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_newest_agreed_sequence_ignores_those_without_k_votes() {
        let votes = |of: &'static [u32]| move |s: u32| of.iter().filter(|&&x| x == s).count();
        // Three sequences a third of the ring apart: each is newer than the next (a cycle).
        let third = SEQ_MAX / 3;
        let (a, b, c) = (1, 1 + third, 1 + 2 * third);
        assert_eq!(seq_cmp(b, a), Ordering::Greater);
        assert_eq!(seq_cmp(c, b), Ordering::Greater);
        assert_eq!(seq_cmp(a, c), Ordering::Greater);
        static CELLS: [u32; 7] = [1, 1, 1, 1 + SEQ_MAX / 3, 1 + 2 * (SEQ_MAX / 3), 9, 9];
        assert_eq!(newest_agreed(CELLS, 3, votes(&CELLS)), Some(a));
        assert_eq!(newest_agreed(CELLS, 2, votes(&CELLS)), Some(9));
        assert_eq!(newest_agreed(CELLS, 4, votes(&CELLS)), None);
        // Many cells in a cycle, one sequence with k votes: found, no panic.
        let many: Vec<u32> = (0..200)
            .map(|i| 1 + (i % 3) * third + i / 3)
            .chain([5; 8])
            .collect();
        let count = |s: u32| many.iter().filter(|&&x| x == s).count();
        assert_eq!(newest_agreed(many.clone(), 8, count), Some(5));
        // Sequences spread at random over the ring (from damaged disks): no panic.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let spread: Vec<u32> = (0..2000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                1 + (x % SEQ_MAX as u64) as u32
            })
            .collect();
        let count = |s: u32| spread.iter().filter(|&&x| x == s).count();
        assert!(newest_agreed(spread.clone(), 1, count).is_some());
        assert_eq!(newest_agreed(spread.clone(), 2, count), None);
    }

    fn id() -> CellId {
        CellId {
            blade: 0x2a,
            stipe: 17,
            shard: 5,
        }
    }

    #[test]
    fn empty_cell_is_sequence_zero() {
        assert_eq!(check_cell(&[0u8; CELL_BYTES], id()), CellCheck::Empty);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let cell = make_cell(id(), 3, b"hello cell");
        assert_eq!(check_cell(&cell, id()), CellCheck::Valid { seq: 3 });
        let mut c = cell;
        for bit in 0..CELL_BYTES * 8 {
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(
                matches!(check_cell(&c, id()), CellCheck::Invalid(_)),
                "flip of bit {bit} not detected"
            );
            c[bit / 8] ^= 1 << (bit % 8);
        }
        // Flips in an empty cell are detected as well.
        let mut z = [0u8; CELL_BYTES];
        for bit in (0..CELL_BYTES * 8).step_by(7) {
            z[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(check_cell(&z, id()), CellCheck::Invalid(_)));
            z[bit / 8] ^= 1 << (bit % 8);
        }
    }

    #[test]
    fn wrong_place_is_rejected() {
        let cell = make_cell(id(), 1, b"x");
        let other = CellId { shard: 6, ..id() };
        assert_eq!(
            check_cell(&cell, other),
            CellCheck::Invalid(CellFault::WrongPlace(id()))
        );
    }

    #[test]
    fn sequences_wrap() {
        assert_eq!(seq_next(SEQ_MAX), 1);
        assert_eq!(seq_cmp(1, SEQ_MAX), Ordering::Greater);
        assert_eq!(seq_cmp(SEQ_MAX, SEQ_MAX - 1), Ordering::Greater);
        assert_eq!(seq_cmp(2, 1), Ordering::Greater);
        assert_eq!(seq_cmp(0, 1), Ordering::Less);
        assert_eq!(seq_cmp(5, 5), Ordering::Equal);
    }

    proptest! {
        #[test]
        fn cell_round_trip(blade: u32, stipe in 0..=STIPE_INDEX_MAX, shard: u8, seq in 1..=SEQ_MAX,
                           data in proptest::collection::vec(any::<u8>(), 0..=CELL_PAYLOAD_BYTES)) {
            let cid = CellId { blade, stipe, shard };
            let cell = make_cell(cid, seq, &data);
            prop_assert_eq!(check_cell(&cell, cid), CellCheck::Valid { seq });
            prop_assert_eq!(&payload(&cell)[..data.len()], &data[..]);
            prop_assert_eq!(read_header(&cell), (cid, CELL_FORMAT_VERSION, seq));
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = check_cell(&data, id());
        }

        #[test]
        fn seq_order_is_antisymmetric(a in 0..=SEQ_MAX, b in 0..=SEQ_MAX) {
            prop_assert_eq!(seq_cmp(a, b), seq_cmp(b, a).reverse());
        }
    }
}
