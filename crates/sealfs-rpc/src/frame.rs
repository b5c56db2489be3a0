//! Frames (DESIGN 6): a fixed 40-byte little-endian header, then `meta_len` bytes of small
//! serialized metadata, then `data_len` bytes of bulk data, raw.
//!
//! ```text
//! 0..4   magic "SEAL"        16..24 request id (u64)
//! 4      protocol version    24..32 epoch the request was routed with (u64)
//! 5      kind (1 req, 2 resp) 32..36 metadata length (u32)
//! 6..8   operation (u16)     36..40 data length (u32)
//! 8..10  flags (zero)
//! 10..12 status (u16, responses)
//! 12..16 deadline in ms (u32, requests; 0 = none)
//! ```
//! Every length is checked against its limit before anything is allocated.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 40;
/// The magic number, "SEAL".
pub const MAGIC: [u8; 4] = *b"SEAL";
/// The protocol version this code speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Largest metadata part of a frame.
pub const META_BYTES_MAX: u32 = 1 << 20;
/// Largest data part of a frame (a 64 MiB frond and change).
pub const DATA_BYTES_MAX: u32 = 80 << 20;
/// The read buffer of a connection: small frames (most of them) are taken from the socket
/// several at a time instead of three reads each (header, metadata, data); a large body skips
/// the buffer and is read straight into its own.
pub const READ_BUFFER: usize = 64 << 10;

/// Request or response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A request, answered by a response with the same id.
    Request = 1,
    /// A response.
    Response = 2,
}

/// A frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Request or response.
    pub kind: Kind,
    /// The operation.
    pub op: u16,
    /// Status of a response (0 = ok); see [`crate::Status`].
    pub status: u16,
    /// Time the sender still allows for the request, in ms (0 = no deadline).
    pub deadline_ms: u32,
    /// Request id, unique among a connection's requests in flight.
    pub id: u64,
    /// Cluster map epoch the request was routed with.
    pub epoch: u64,
    /// Bytes of metadata that follow.
    pub meta_len: u32,
    /// Bytes of data that follow the metadata.
    pub data_len: u32,
}

/// Why a frame was refused. The connection it came on is closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Not a sealfs frame.
    #[error("bad magic {0:02x?}: not a sealfs peer")]
    Magic([u8; 4]),
    /// A version this code does not speak.
    #[error("protocol version {0}, this side speaks {PROTOCOL_VERSION}")]
    Version(u8),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// Reserved flags set.
    #[error("reserved flags {0:#x} set")]
    Flags(u16),
    /// A length over its limit.
    #[error("{what} of {len} bytes is over the limit of {max}")]
    TooLong {
        /// Which part.
        what: &'static str,
        /// Its length.
        len: u32,
        /// The limit.
        max: u32,
    },
}

impl Header {
    /// The 40 bytes of the header.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = PROTOCOL_VERSION;
        b[5] = self.kind as u8;
        b[6..8].copy_from_slice(&self.op.to_le_bytes());
        b[10..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.deadline_ms.to_le_bytes());
        b[16..24].copy_from_slice(&self.id.to_le_bytes());
        b[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        b[32..36].copy_from_slice(&self.meta_len.to_le_bytes());
        b[36..40].copy_from_slice(&self.data_len.to_le_bytes());
        b
    }

    /// Parses and checks a header: magic, version, kind, flags and length limits.
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header, FrameError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        if b[4] != PROTOCOL_VERSION {
            return Err(FrameError::Version(b[4]));
        }
        let kind = match b[5] {
            1 => Kind::Request,
            2 => Kind::Response,
            k => return Err(FrameError::Kind(k)),
        };
        let flags = u16_at(8);
        if flags != 0 {
            return Err(FrameError::Flags(flags));
        }
        let h = Header {
            kind,
            op: u16_at(6),
            status: u16_at(10),
            deadline_ms: u32_at(12),
            id: u64_at(16),
            epoch: u64_at(24),
            meta_len: u32_at(32),
            data_len: u32_at(36),
        };
        if h.meta_len > META_BYTES_MAX {
            return Err(FrameError::TooLong {
                what: "metadata",
                len: h.meta_len,
                max: META_BYTES_MAX,
            });
        }
        if h.data_len > DATA_BYTES_MAX {
            return Err(FrameError::TooLong {
                what: "data",
                len: h.data_len,
                max: DATA_BYTES_MAX,
            });
        }
        Ok(h)
    }
}

/// A whole frame.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Its header.
    pub header: Header,
    /// Serialized metadata.
    pub meta: Bytes,
    /// Bulk data.
    pub data: Bytes,
}

/// What reading a frame can run into.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The socket failed (or closed inside a frame).
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame; the header is checked before the body is allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ReadError> {
    let header = read_header(r).await?;
    read_body(r, header).await
}

/// Reads and checks one frame's header (the body's lengths are within the bounds).
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, ReadError> {
    let mut head = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                ReadError::Closed
            } else {
                ReadError::Io(std::io::ErrorKind::UnexpectedEof.into())
            });
        }
        got += n;
    }
    Ok(Header::decode(&head)?)
}

/// Reads the body that `header` announces.
pub async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    header: Header,
) -> Result<Frame, ReadError> {
    let meta = read_exact_bytes(r, header.meta_len as usize).await?;
    let data = read_exact_bytes(r, header.data_len as usize).await?;
    Ok(Frame { header, meta, data })
}

async fn read_exact_bytes<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> std::io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let mut buf = BytesMut::zeroed(len);
    r.read_exact(&mut buf).await?;
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> impl Strategy<Value = Header> {
        (
            any::<bool>(),
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            0..=META_BYTES_MAX,
            0..=DATA_BYTES_MAX,
        )
            .prop_map(
                |(req, op, status, deadline_ms, id, epoch, meta_len, data_len)| Header {
                    kind: if req { Kind::Request } else { Kind::Response },
                    op,
                    status,
                    deadline_ms,
                    id,
                    epoch,
                    meta_len,
                    data_len,
                },
            )
    }

    proptest! {
        #[test]
        fn header_round_trip(h in header()) {
            prop_assert_eq!(Header::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn arbitrary_headers_never_panic(b in proptest::array::uniform32(any::<u8>()), tail in proptest::array::uniform8(any::<u8>())) {
            let mut h = [0u8; HEADER_BYTES];
            h[..32].copy_from_slice(&b);
            h[32..].copy_from_slice(&tail);
            let _ = Header::decode(&h);
        }

        #[test]
        fn arbitrary_streams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), valid_head: bool) {
            // Half the cases start with a valid magic and version, so the fuzzing gets past them.
            let mut stream = bytes;
            if valid_head && stream.len() >= 6 {
                stream[..4].copy_from_slice(&MAGIC);
                stream[4] = PROTOCOL_VERSION;
            }
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut r = &stream[..];
                while read_frame(&mut r).await.is_ok() {}
            });
        }
    }

    #[test]
    fn limits_are_checked_before_allocation() {
        let mut h = Header {
            kind: Kind::Request,
            op: 1,
            status: 0,
            deadline_ms: 0,
            id: 1,
            epoch: 0,
            meta_len: 0,
            data_len: 0,
        }
        .encode();
        h[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Header::decode(&h),
            Err(FrameError::TooLong { what: "data", .. })
        ));
        h[36..40].copy_from_slice(&0u32.to_le_bytes());
        h[32..36].copy_from_slice(&(META_BYTES_MAX + 1).to_le_bytes());
        assert!(matches!(
            Header::decode(&h),
            Err(FrameError::TooLong {
                what: "metadata",
                ..
            })
        ));
        h[0] = b'X';
        assert!(matches!(Header::decode(&h), Err(FrameError::Magic(_))));
    }
}
