//! The handshake that opens every connection: both sides prove they know the cluster secret
//! without sending it (BLAKE3 keyed hashes over fresh nonces from both sides).
//!
//! ```text
//! client -> server  "SEALHELO" | version | 7 zero bytes | client nonce (32)
//! server -> client  server nonce (32) | keyed_hash(K, "server" | cn | sn) (32)
//! client -> server  keyed_hash(K, "client" | cn | sn) (32)
//! server -> client  1 (accepted) or 0 (refused, then close)
//! ```
//! K is derived from the secret with `blake3::derive_key`.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::PROTOCOL_VERSION;
use crate::RpcError;

const HELLO: &[u8; 8] = b"SEALHELO";
/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The key both sides derive from the cluster secret.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl ClusterKey {
    /// Derives the key from the cluster secret.
    pub fn from_secret(secret: &[u8]) -> Self {
        let mut h = blake3::Hasher::new_derive_key("sealfs cluster secret v1");
        h.update(secret);
        ClusterKey(*h.finalize().as_bytes())
    }

    fn mac(&self, side: &[u8], cn: &[u8; 32], sn: &[u8; 32]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(side);
        h.update(cn);
        h.update(sn);
        h.finalize()
    }
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

fn nonce() -> Result<[u8; 32], RpcError> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n)
        .map_err(|e| RpcError::Auth(format!("no randomness for a nonce: {e}")))?;
    Ok(n)
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, RpcError>>,
) -> Result<T, RpcError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .map_err(|_| RpcError::Auth("handshake timed out".into()))?
}

/// The client side of the handshake.
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &ClusterKey,
) -> Result<(), RpcError> {
    timed(async {
        let cn = nonce()?;
        let mut hello = [0u8; 48];
        hello[..8].copy_from_slice(HELLO);
        hello[8] = PROTOCOL_VERSION;
        hello[16..].copy_from_slice(&cn);
        s.write_all(&hello).await?;
        let mut reply = [0u8; 64];
        s.read_exact(&mut reply).await?;
        let sn: [u8; 32] = reply[..32].try_into().expect("32 bytes");
        if key.mac(b"server", &cn, &sn) != reply[32..] {
            return Err(RpcError::Auth(
                "the server does not know the cluster secret".into(),
            ));
        }
        s.write_all(key.mac(b"client", &cn, &sn).as_bytes()).await?;
        let mut verdict = [0u8; 1];
        s.read_exact(&mut verdict).await?;
        if verdict[0] != 1 {
            return Err(RpcError::Auth(
                "the server refused the cluster secret".into(),
            ));
        }
        Ok(())
    })
    .await
}

/// The server side of the handshake.
pub async fn server<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &ClusterKey,
) -> Result<(), RpcError> {
    timed(async {
        let mut hello = [0u8; 48];
        s.read_exact(&mut hello).await?;
        if &hello[..8] != HELLO {
            return Err(RpcError::Auth("not a sealfs peer (bad hello)".into()));
        }
        if hello[8] != PROTOCOL_VERSION {
            return Err(RpcError::Auth(format!(
                "peer speaks protocol version {}, this side {PROTOCOL_VERSION}",
                hello[8]
            )));
        }
        let cn: [u8; 32] = hello[16..].try_into().expect("32 bytes");
        let sn = nonce()?;
        let mut reply = [0u8; 64];
        reply[..32].copy_from_slice(&sn);
        reply[32..].copy_from_slice(key.mac(b"server", &cn, &sn).as_bytes());
        s.write_all(&reply).await?;
        let mut proof = [0u8; 32];
        s.read_exact(&mut proof).await?;
        if key.mac(b"client", &cn, &sn) != proof {
            let _ = s.write_all(&[0]).await;
            return Err(RpcError::Auth(
                "the peer does not know the cluster secret".into(),
            ));
        }
        s.write_all(&[1]).await?;
        Ok(())
    })
    .await
}
