//! A group's snapshot in memory, as openraft reads it to send and writes it as chunks arrive.
//!
//! A chunk names its own offset, and the bytes come from a peer: a cursor over a vector would
//! fill the gap before an offset far past the end with zeros and abort the process when that
//! allocation fails. Here a chunk must start within what has arrived, and a snapshot stops
//! growing at [`SNAPSHOT_BYTES_MAX`].

use std::io::{self, Cursor, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// Bytes of one snapshot at most. A group's whole state is one snapshot held in memory, so
/// this also bounds the state a group can hold and send to a new replica.
pub const SNAPSHOT_BYTES_MAX: u64 = 4 << 30;

/// A snapshot's bytes, read and written in place.
#[derive(Debug, Default)]
pub struct SnapshotBytes {
    inner: Cursor<Vec<u8>>,
}

impl SnapshotBytes {
    /// A snapshot holding `data`, positioned at its start.
    pub fn new(data: Vec<u8>) -> Self {
        SnapshotBytes {
            inner: Cursor::new(data),
        }
    }

    /// The bytes.
    pub fn into_inner(self) -> Vec<u8> {
        self.inner.into_inner()
    }

    fn len(&self) -> u64 {
        self.inner.get_ref().len() as u64
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl AsyncRead for SnapshotBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotBytes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let end = self.inner.position().saturating_add(buf.len() as u64);
        if end > SNAPSHOT_BYTES_MAX {
            return Poll::Ready(Err(invalid(format!(
                "a snapshot of more than {SNAPSHOT_BYTES_MAX} bytes (a write ending at {end})"
            ))));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotBytes {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let len = self.len();
        let target = match position {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => len.checked_add_signed(d),
            SeekFrom::Current(d) => self.inner.position().checked_add_signed(d),
        };
        match target {
            Some(n) if n <= len => Pin::new(&mut self.inner).start_seek(SeekFrom::Start(n)),
            _ => Err(invalid(format!(
                "a seek to {position:?} in a snapshot of {len} bytes (past its end)"
            ))),
        }
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.inner).poll_complete(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    #[tokio::test]
    async fn chunks_are_written_in_place_and_read_back() {
        let mut s = SnapshotBytes::default();
        s.write_all(b"hello ").await.unwrap();
        s.write_all(b"world").await.unwrap();
        // A chunk sent again from an earlier offset overwrites.
        s.seek(SeekFrom::Start(6)).await.unwrap();
        s.write_all(b"W").await.unwrap();
        assert_eq!(s.seek(SeekFrom::End(0)).await.unwrap(), 11);
        s.seek(SeekFrom::Start(0)).await.unwrap();
        let mut back = String::new();
        s.read_to_string(&mut back).await.unwrap();
        assert_eq!(back, "hello World");
        assert_eq!(s.into_inner(), b"hello World");
    }

    #[tokio::test]
    async fn a_seek_past_the_end_is_refused_and_nothing_grows() {
        let mut s = SnapshotBytes::new(vec![7; 10]);
        assert_eq!(s.seek(SeekFrom::Start(10)).await.unwrap(), 10);
        for far in [
            SeekFrom::Start(11),
            SeekFrom::Start(1 << 40),
            SeekFrom::Start(u64::MAX),
            SeekFrom::End(1),
            SeekFrom::End(-11),
            SeekFrom::Current(i64::MAX),
        ] {
            let e = s.seek(far).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{far:?}");
        }
        // The position is where the last good seek left it.
        s.write_all(b"x").await.unwrap();
        assert_eq!(s.into_inner().len(), 11);
    }

    #[tokio::test]
    async fn a_write_past_the_bound_is_refused() {
        let mut s = SnapshotBytes::default();
        // A cursor placed near the bound by hand (a peer cannot: its seeks stop at the end).
        s.inner.set_position(SNAPSHOT_BYTES_MAX - 1);
        let e = s.write(b"ab").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(s.into_inner().is_empty());
    }
}
