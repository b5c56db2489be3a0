//! Raft messages on the sealfs wire: each group's append-entries, vote and snapshot messages go
//! over the one connection between two servers, tagged with the group id; a [`RaftRouter`] on
//! the receiving server hands them to the group's Raft.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode};
use sealfs_rpc::{Client, ClientConfig, ClusterKey, Handler, InProcess, Request, Response, Status};
use serde::{de::DeserializeOwned, Serialize};

use crate::unsynced::{Unsynced, STALL};
use crate::{LogDb, NodeId, TypeConfig};

/// Append entries.
pub const OP_APPEND: u16 = 0x0201;
/// Request a vote.
pub const OP_VOTE: u16 = 0x0202;
/// A chunk of a snapshot.
pub const OP_SNAPSHOT: u16 = 0x0203;

/// One client (one connection) per peer address, shared by every group.
#[derive(Clone)]
pub struct Peers {
    key: ClusterKey,
    clients: Arc<Mutex<HashMap<String, Arc<Client>>>>,
    near: InProcess,
}

impl Peers {
    /// Peers reached with the cluster key.
    pub fn new(key: ClusterKey) -> Self {
        Peers::with_in_process(key, InProcess::default())
    }

    /// Peers reached with the cluster key; those running in this process (`near`) are
    /// called directly.
    pub fn with_in_process(key: ClusterKey, near: InProcess) -> Self {
        Peers {
            key,
            clients: Arc::default(),
            near,
        }
    }

    /// The client of the peer at `addr`.
    pub fn client(&self, addr: &str) -> Arc<Client> {
        let mut c = self.clients.lock().expect("peers");
        c.entry(addr.to_string())
            .or_insert_with(|| {
                let cfg = ClientConfig {
                    backoff_max: Duration::from_millis(500),
                    ..Default::default()
                };
                Arc::new(
                    Client::new(addr.to_string(), self.key.clone(), cfg)
                        .with_in_process(self.near.clone()),
                )
            })
            .clone()
    }
}

/// Makes the network of one group.
#[derive(Clone)]
pub struct NetFactory {
    pub(crate) group: u64,
    pub(crate) peers: Peers,
    pub(crate) log: LogDb,
    pub(crate) unsynced: Arc<Unsynced>,
}

/// The network from one group member to another.
pub struct PeerNet {
    group: u64,
    target: NodeId,
    client: Arc<Client>,
    log: LogDb,
    unsynced: Arc<Unsynced>,
}

impl RaftNetworkFactory<TypeConfig> for NetFactory {
    type Network = PeerNet;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerNet {
        PeerNet {
            group: self.group,
            target,
            client: self.peers.client(&node.addr),
            log: self.log.clone(),
            unsynced: self.unsynced.clone(),
        }
    }
}

impl PeerNet {
    async fn send<Req: Serialize, Resp: DeserializeOwned, E>(
        &self,
        op: u16,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        E: std::error::Error + DeserializeOwned + 'static,
    {
        let body = postcard::to_stdvec(req).map_err(|e| NetworkError::new(&e))?;
        let meta = postcard::to_stdvec(&self.group).map_err(|e| NetworkError::new(&e))?;
        let request = Request {
            op,
            epoch: 0,
            meta: Bytes::from(meta),
            data: Bytes::from(body),
        };
        let resp = self
            .client
            .call(request, option.hard_ttl())
            .await
            .map_err(|e| Unreachable::from(AnyError::error(e.to_string())))?;
        if resp.status != 0 {
            let msg = String::from_utf8_lossy(&resp.meta).into_owned();
            return Err(Unreachable::from(AnyError::error(format!(
                "status {}: {msg}",
                resp.status
            )))
            .into());
        }
        let res: Result<Resp, RaftError<NodeId, E>> =
            postcard::from_bytes(&resp.data).map_err(|e| NetworkError::new(&e))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerNet {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        if self.unsynced.stalled(STALL) {
            // A leader whose disk does not sync can apply nothing: silent, it lets the
            // followers elect another.
            return Err(Unreachable::from(AnyError::error(format!(
                "this leader's log has not synced for {} ms: it stops sending",
                STALL.as_millis()
            )))
            .into());
        }
        // Followers apply only what this leader's disk has synced.
        rpc.leader_commit = self
            .unsynced
            .clamp(rpc.leader_commit, self.log.wal(), self.group);
        self.send(OP_APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(OP_SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(OP_VOTE, &rpc, &option).await
    }
}

/// Hands Raft messages arriving at a server to the groups it hosts.
#[derive(Default)]
pub struct RaftRouter {
    groups: RwLock<HashMap<u64, openraft::Raft<TypeConfig>>>,
}

impl RaftRouter {
    /// Routes messages of `group` to `raft`.
    pub fn add(&self, group: u64, raft: openraft::Raft<TypeConfig>) {
        self.groups.write().expect("router").insert(group, raft);
    }

    /// Stops routing to `group`.
    pub fn remove(&self, group: u64) {
        self.groups.write().expect("router").remove(&group);
    }

    async fn route(&self, req: Request) -> Result<Vec<u8>, Response> {
        let bad = |e: postcard::Error| {
            Response::error(Status::BadRequest as u16, format!("raft message: {e}"))
        };
        let group: u64 = postcard::from_bytes(&req.meta).map_err(bad)?;
        let raft = self
            .groups
            .read()
            .expect("router")
            .get(&group)
            .cloned()
            .ok_or_else(|| {
                Response::error(
                    Status::Unavailable as u16,
                    format!("no raft group {group} here"),
                )
            })?;
        let enc = |r: Result<Vec<u8>, postcard::Error>| {
            r.map_err(|e| Response::error(Status::Internal as u16, e.to_string()))
        };
        match req.op {
            OP_APPEND => enc(postcard::to_stdvec(
                &raft
                    .append_entries(postcard::from_bytes(&req.data).map_err(bad)?)
                    .await,
            )),
            OP_VOTE => enc(postcard::to_stdvec(
                &raft
                    .vote(postcard::from_bytes(&req.data).map_err(bad)?)
                    .await,
            )),
            OP_SNAPSHOT => enc(postcard::to_stdvec(
                &raft
                    .install_snapshot(postcard::from_bytes(&req.data).map_err(bad)?)
                    .await,
            )),
            op => Err(Response::error(
                Status::UnknownOp as u16,
                format!("raft: unknown operation {op:#x}"),
            )),
        }
    }
}

#[async_trait]
impl Handler for RaftRouter {
    async fn handle(&self, req: Request) -> Response {
        match self.route(req).await {
            Ok(body) => Response::ok(Bytes::new(), Bytes::from(body)),
            Err(resp) => resp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::error::Fatal;

    #[test]
    fn raft_errors_cross_the_wire() {
        let e: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
            Err(RaftError::Fatal(Fatal::Stopped));
        let back: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
            postcard::from_bytes(&postcard::to_stdvec(&e).unwrap()).unwrap();
        assert!(matches!(back, Err(RaftError::Fatal(Fatal::Stopped))));
        let ok: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
            Ok(AppendEntriesResponse::Success);
        let back: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
            postcard::from_bytes(&postcard::to_stdvec(&ok).unwrap()).unwrap();
        assert!(matches!(back, Ok(AppendEntriesResponse::Success)));
    }
}
