//! The writing half of a connection: a task that drains a bounded queue of frames and writes
//! them with vectored writes, several frames per system call when they queue up.

use std::io::IoSlice;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::frame::Header;

/// Frames queued for one connection's writer at most.
pub const WRITE_QUEUE_MAX: usize = 1024;
/// Frames written by one vectored write at most.
const FRAMES_PER_WRITE_MAX: usize = 64;

/// A frame waiting to be written.
pub struct Outgoing {
    pub header: Header,
    pub meta: Bytes,
    pub data: Bytes,
}

/// Writes frames from `rx` until it closes or the socket fails.
pub async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(FRAMES_PER_WRITE_MAX);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < FRAMES_PER_WRITE_MAX {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let heads: Vec<[u8; crate::frame::HEADER_BYTES]> =
            batch.iter().map(|f| f.header.encode()).collect();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(batch.len() * 3);
        for (f, h) in batch.iter().zip(&heads) {
            parts.push(h);
            if !f.meta.is_empty() {
                parts.push(&f.meta);
            }
            if !f.data.is_empty() {
                parts.push(&f.data);
            }
        }
        write_all_vectored(&mut w, &mut parts).await?;
        batch.clear();
    }
    w.shutdown().await
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: &mut [&[u8]],
) -> std::io::Result<()> {
    let mut first = 0;
    while first < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[first..].iter().map(|p| IoSlice::new(p)).collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while first < parts.len() && n >= parts[first].len() {
            n -= parts[first].len();
            first += 1;
        }
        if n > 0 {
            parts[first] = &parts[first][n..];
        }
    }
    Ok(())
}
