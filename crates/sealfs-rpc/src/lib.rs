//! The wire protocol of sealfs (DESIGN 6): one long-lived, authenticated TCP connection per pair
//! of peers carries all their requests, multiplexed by request id. Frames have a fixed header,
//! small serialized metadata and raw bulk data written with vectored writes. Requests have
//! deadlines; late responses are dropped; clients reconnect with backoff; every length is bounded
//! before it is allocated, and a malformed frame closes its connection, never the process.

pub mod auth;
pub mod client;
pub mod frame;
pub mod ports;
pub mod server;
mod wire;

use bytes::Bytes;

pub use auth::ClusterKey;
pub use client::{Client, ClientConfig, InProcess, Registry};
pub use frame::{Frame, FrameError, Header, Kind};
pub use server::{Handler, Server, ServerConfig, ServerHandle};

/// Status of a response. Values from 256 up are the application's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// The server does not know the operation.
    UnknownOp = 1,
    /// The request's metadata or data was malformed or out of range.
    BadRequest = 2,
    /// The request was routed with an old cluster map; the response carries the new epoch.
    StaleEpoch = 3,
    /// The server cannot serve it now (shutting down, overloaded, lost its quorum).
    Unavailable = 4,
    /// The request's deadline passed on the server.
    Timeout = 5,
    /// The handler failed.
    Internal = 6,
    /// A frame on the connection was malformed (sent with id 0 before the server closes it).
    BadFrame = 7,
}

/// A request as a handler sees it, or as a client sends it.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// The operation.
    pub op: u16,
    /// Cluster map epoch the sender routed with.
    pub epoch: u64,
    /// Serialized metadata (see [`encode_meta`]).
    pub meta: Bytes,
    /// Bulk data.
    pub data: Bytes,
}

/// A response.
#[derive(Clone, Debug, Default)]
pub struct Response {
    /// 0 for success; see [`Status`].
    pub status: u16,
    /// The responder's epoch.
    pub epoch: u64,
    /// Serialized metadata; for an error, the message as UTF-8.
    pub meta: Bytes,
    /// Bulk data.
    pub data: Bytes,
}

impl Response {
    /// A success with metadata and data.
    pub fn ok(meta: Bytes, data: Bytes) -> Self {
        Response {
            status: Status::Ok as u16,
            epoch: 0,
            meta,
            data,
        }
    }

    /// An error with a message.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Response {
            status,
            epoch: 0,
            meta: Bytes::from(message.into().into_bytes()),
            data: Bytes::new(),
        }
    }

    /// The response if it succeeded, else its status and message as an error.
    pub fn into_result(self) -> Result<Response, RpcError> {
        if self.status == Status::Ok as u16 {
            Ok(self)
        } else {
            Err(RpcError::Remote {
                status: self.status,
                message: String::from_utf8_lossy(&self.meta).into_owned(),
            })
        }
    }
}

/// Errors of the RPC layer.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// A socket operation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The handshake failed (wrong cluster secret, not a sealfs peer, timeout).
    #[error("authentication: {0}")]
    Auth(String),
    /// The peer sent a malformed frame.
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    /// The request's deadline passed before its response came.
    #[error("{op} to {peer}: no response within {ms} ms")]
    Timeout {
        /// The peer.
        peer: String,
        /// The operation.
        op: u16,
        /// The deadline.
        ms: u64,
    },
    /// The connection closed while the request was in flight.
    #[error("connection to {0} lost")]
    ConnectionLost(String),
    /// The peer cannot be reached now.
    #[error("{peer} unreachable: {reason}")]
    Unreachable {
        /// The peer.
        peer: String,
        /// The last connection error.
        reason: String,
    },
    /// The peer answered with an error status.
    #[error("remote error {status}: {message}")]
    Remote {
        /// The status.
        status: u16,
        /// The message.
        message: String,
    },
    /// Metadata did not serialize or deserialize.
    #[error("metadata: {0}")]
    Meta(String),
}

/// Serializes request or response metadata (postcard).
pub fn encode_meta<T: serde::Serialize>(value: &T) -> Result<Bytes, RpcError> {
    postcard::to_stdvec(value)
        .map(Bytes::from)
        .map_err(|e| RpcError::Meta(e.to_string()))
}

/// Deserializes metadata; malformed input is an error, never a panic.
pub fn decode_meta<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, RpcError> {
    postcard::from_bytes(bytes).map_err(|e| RpcError::Meta(e.to_string()))
}
