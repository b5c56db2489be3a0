//! The frame decoder on arbitrary bytes, as a peer could send them: it never panics, never
//! allocates past the frame limits, and what it accepts is exactly what was sent.
//!
//! `scripts/fuzz [SECONDS]` runs it (cargo-fuzz, nightly).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sealfs_rpc::frame::{
    read_frame, Header, DATA_BYTES_MAX, HEADER_BYTES, MAGIC, META_BYTES_MAX, PROTOCOL_VERSION,
};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|input: &[u8]| {
    // The first byte picks whether the stream starts with a valid magic and version, so that
    // most inputs reach the rest of the header and the body.
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let mut stream = rest.to_vec();
    if mode & 1 == 1 && stream.len() >= 5 {
        stream[..4].copy_from_slice(&MAGIC);
        stream[4] = PROTOCOL_VERSION;
    }

    // A header is accepted only whole and within the limits, and it encodes back to the
    // bytes it came from (no byte of it is ignored).
    if let Some(b) = stream.first_chunk::<HEADER_BYTES>() {
        if let Ok(h) = Header::decode(b) {
            assert!(h.meta_len <= META_BYTES_MAX && h.data_len <= DATA_BYTES_MAX);
            assert_eq!(&h.encode(), b);
        }
    }

    // A stream of frames: each frame read holds the lengths its header gave, and together
    // they never claim more bytes than the stream had.
    runtime().block_on(async {
        let mut r = &stream[..];
        let mut used = 0usize;
        while let Ok(f) = read_frame(&mut r).await {
            assert_eq!(f.meta.len(), f.header.meta_len as usize);
            assert_eq!(f.data.len(), f.header.data_len as usize);
            used += HEADER_BYTES + f.meta.len() + f.data.len();
            assert!(used <= stream.len());
        }
    });
});
