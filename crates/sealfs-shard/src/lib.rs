//! kelp over the wire (DESIGN 4, 6): [`ShardService`] serves a server's shard store to its peers,
//! and [`RemoteStore`] is the `ShardStore` a holdfast or reader uses for shards on another
//! server. Cells travel as raw frame data; only the small request descriptions are serialized.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use kelp::cell::CELL_BYTES;
use kelp::{KelpError, ShardInfo, ShardKey, ShardStore, WriteMode};
use sealfs_rpc::{decode_meta, encode_meta, Client, Handler, Request, Response, RpcError, Status};
use serde::{Deserialize, Serialize};

/// Operation numbers of the shard service.
pub mod op {
    /// Write a run of cells.
    pub const WRITE_CELLS: u16 = 0x0101;
    /// Read a run of cells.
    pub const READ_CELLS: u16 = 0x0102;
    /// Copy a cell to scratch.
    pub const PREPARE: u16 = 0x0103;
    /// Drop a scratch copy.
    pub const RELEASE: u16 = 0x0104;
    /// Put a scratch copy back.
    pub const ABORT: u16 = 0x0105;
    /// List scratch copies of a shard.
    pub const SCRATCH: u16 = 0x0106;
    /// Sync a shard's disk.
    pub const SYNC: u16 = 0x0107;
    /// List shard files.
    pub const LIST: u16 = 0x0108;
    /// Cells in a shard file.
    pub const STIPES: u16 = 0x0109;
    /// Delete a shard file.
    pub const DELETE: u16 = 0x010a;
}

/// Application status: the shard file does not exist.
pub const STATUS_SHARD_MISSING: u16 = 256;
/// Application status: the disk (or, from a holdfast, enough of the blade's disks) has no
/// space left.
pub const STATUS_NO_SPACE: u16 = 257;

#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
struct Shard {
    blade: u32,
    shard: u8,
}

impl From<ShardKey> for Shard {
    fn from(k: ShardKey) -> Self {
        Shard {
            blade: k.blade,
            shard: k.shard,
        }
    }
}

impl From<Shard> for ShardKey {
    fn from(s: Shard) -> Self {
        ShardKey {
            blade: s.blade,
            shard: s.shard,
        }
    }
}

#[derive(Serialize, Deserialize, Debug)]
enum Mode {
    IfNewer,
    Force,
    Update { durable: bool },
}

#[derive(Serialize, Deserialize, Debug)]
struct WriteCells {
    shard: Shard,
    disk: u32,
    first: u32,
    mode: Mode,
}

#[derive(Serialize, Deserialize, Debug)]
struct ReadCells {
    shard: Shard,
    first: u32,
    count: u32,
}

#[derive(Serialize, Deserialize, Debug)]
struct StipeOp {
    shard: Shard,
    stipe: u32,
    /// durable (prepare), upto (release), disk (abort)
    arg: u32,
}

#[derive(Serialize, Deserialize, Debug)]
struct Listed {
    blade: u32,
    shard: u8,
    disk: u32,
    stipes: u32,
}

/// Serves a store's shards to peers.
pub struct ShardService {
    store: Arc<dyn ShardStore>,
}

impl ShardService {
    /// A service over `store` (normally the server's `LocalStore`).
    pub fn new(store: Arc<dyn ShardStore>) -> Self {
        ShardService { store }
    }

    async fn serve(&self, req: Request) -> Result<Response, KelpError> {
        let st = &self.store;
        let none = || Response::ok(Bytes::new(), Bytes::new());
        let bad = |e: RpcError| KelpError::invalid(format!("request metadata: {e}"));
        Ok(match req.op {
            op::WRITE_CELLS => {
                let m: WriteCells = decode_meta(&req.meta).map_err(bad)?;
                let mode = match m.mode {
                    Mode::IfNewer => WriteMode::IfNewer,
                    Mode::Force => WriteMode::Force,
                    Mode::Update { durable } => WriteMode::Update { durable },
                };
                st.write_cells(m.shard.into(), m.disk, m.first, req.data, mode)
                    .await?;
                none()
            }
            op::READ_CELLS => {
                let m: ReadCells = decode_meta(&req.meta).map_err(bad)?;
                let cells = st.read_cells(m.shard.into(), m.first, m.count).await?;
                Response::ok(Bytes::new(), cells)
            }
            op::PREPARE => {
                let m: StipeOp = decode_meta(&req.meta).map_err(bad)?;
                st.prepare(m.shard.into(), m.stipe, m.arg != 0).await?;
                none()
            }
            op::RELEASE => {
                let m: StipeOp = decode_meta(&req.meta).map_err(bad)?;
                st.release(m.shard.into(), m.stipe, m.arg).await?;
                none()
            }
            op::ABORT => {
                let m: StipeOp = decode_meta(&req.meta).map_err(bad)?;
                st.abort(m.shard.into(), m.arg, m.stipe).await?;
                none()
            }
            op::SCRATCH => {
                let m: Shard = decode_meta(&req.meta).map_err(bad)?;
                let cells = st.scratch(m.into()).await?;
                let mut all = BytesMut::with_capacity(cells.len() * CELL_BYTES);
                for c in cells {
                    all.extend_from_slice(&c);
                }
                Response::ok(Bytes::new(), all.freeze())
            }
            op::SYNC => {
                let m: Shard = decode_meta(&req.meta).map_err(bad)?;
                st.sync(m.into()).await?;
                none()
            }
            op::LIST => {
                let list: Vec<Listed> = st
                    .list()
                    .await?
                    .into_iter()
                    .map(|i| Listed {
                        blade: i.key.blade,
                        shard: i.key.shard,
                        disk: i.disk,
                        stipes: i.stipes,
                    })
                    .collect();
                Response::ok(encode_meta(&list).map_err(bad)?, Bytes::new())
            }
            op::STIPES => {
                let m: Shard = decode_meta(&req.meta).map_err(bad)?;
                let n = st.stipes(m.into()).await?;
                Response::ok(encode_meta(&n).map_err(bad)?, Bytes::new())
            }
            op::DELETE => {
                let m: Shard = decode_meta(&req.meta).map_err(bad)?;
                st.delete(m.into()).await?;
                none()
            }
            other => Response::error(
                Status::UnknownOp as u16,
                format!("shard service: unknown operation {other:#x}"),
            ),
        })
    }
}

#[async_trait]
impl Handler for ShardService {
    async fn handle(&self, req: Request) -> Response {
        match self.serve(req).await {
            Ok(r) => r,
            Err(KelpError::ShardMissing(file, store)) => Response::error(
                STATUS_SHARD_MISSING,
                format!("shard file {file} is missing on store {store}"),
            ),
            Err(e @ KelpError::Invalid(_)) => {
                Response::error(Status::BadRequest as u16, e.to_string())
            }
            Err(e) if e.is_no_space() => Response::error(STATUS_NO_SPACE, e.to_string()),
            Err(e) => Response::error(Status::Internal as u16, e.to_string()),
        }
    }
}

/// A blade layout whose shards live on other servers: shard `j` on the server reached by
/// `servers[j % servers.len()]`, disk `j / servers.len()` (modulo `disks`), one connection per
/// server shared by its shards. Every store call has `deadline`.
pub fn spread_layout(
    blade: u32,
    profile: kelp::Profile,
    servers: &[Arc<Client>],
    disks: u32,
    deadline: Duration,
) -> kelp::Result<kelp::BladeLayout> {
    if servers.is_empty() || disks == 0 {
        return Err(KelpError::invalid(
            "a layout needs at least one server with one disk",
        ));
    }
    let shards = (0..profile.n())
        .map(|j| kelp::ShardPlacement {
            store: Arc::new(RemoteStore::new(
                servers[j % servers.len()].clone(),
                deadline,
            )) as Arc<dyn ShardStore>,
            disk: (j / servers.len()) as u32 % disks,
        })
        .collect();
    kelp::BladeLayout::new(blade, profile, shards)
}

/// The shard store of another server, reached over its connection.
pub struct RemoteStore {
    client: Arc<Client>,
    name: String,
    deadline: Duration,
}

impl RemoteStore {
    /// A store behind `client`; each call has `deadline`.
    pub fn new(client: Arc<Client>, deadline: Duration) -> Self {
        RemoteStore {
            name: client.peer().to_string(),
            client,
            deadline,
        }
    }

    async fn call(&self, op: u16, meta: Bytes, data: Bytes) -> Result<Response, KelpError> {
        let req = Request {
            op,
            epoch: 0,
            meta,
            data,
        };
        let r = self
            .client
            .call(req, self.deadline)
            .await
            .map_err(|e| KelpError::Stopped(format!("store {}: {e}", self.name)))?;
        match r.status {
            0 => Ok(r),
            STATUS_SHARD_MISSING => {
                let msg = String::from_utf8_lossy(&r.meta).into_owned();
                Err(KelpError::ShardMissing(msg, self.name.clone()))
            }
            STATUS_NO_SPACE => Err(KelpError::NoSpace(format!(
                "store {}: {}",
                self.name,
                String::from_utf8_lossy(&r.meta)
            ))),
            s if s == Status::BadRequest as u16 => Err(KelpError::invalid(format!(
                "store {}: {}",
                self.name,
                String::from_utf8_lossy(&r.meta)
            ))),
            s => Err(KelpError::Stopped(format!(
                "store {}: status {s}: {}",
                self.name,
                String::from_utf8_lossy(&r.meta)
            ))),
        }
    }

    fn meta<T: Serialize>(v: &T) -> Result<Bytes, KelpError> {
        encode_meta(v).map_err(|e| KelpError::invalid(e.to_string()))
    }

    async fn stipe_op(
        &self,
        op: u16,
        key: ShardKey,
        stipe: u32,
        arg: u32,
    ) -> Result<(), KelpError> {
        let m = Self::meta(&StipeOp {
            shard: key.into(),
            stipe,
            arg,
        })?;
        self.call(op, m, Bytes::new()).await.map(|_| ())
    }
}

fn reply<T: serde::de::DeserializeOwned>(r: &Response, store: &str) -> Result<T, KelpError> {
    decode_meta(&r.meta).map_err(|e| KelpError::invalid(format!("store {store}: reply: {e}")))
}

#[async_trait]
impl ShardStore for RemoteStore {
    fn name(&self) -> &str {
        &self.name
    }

    async fn write_cells(
        &self,
        key: ShardKey,
        disk: u32,
        first: u32,
        cells: Bytes,
        mode: WriteMode,
    ) -> kelp::Result<()> {
        let mode = match mode {
            WriteMode::IfNewer => Mode::IfNewer,
            WriteMode::Force => Mode::Force,
            WriteMode::Update { durable } => Mode::Update { durable },
        };
        let m = Self::meta(&WriteCells {
            shard: key.into(),
            disk,
            first,
            mode,
        })?;
        self.call(op::WRITE_CELLS, m, cells).await.map(|_| ())
    }

    async fn read_cells(&self, key: ShardKey, first: u32, count: u32) -> kelp::Result<Bytes> {
        let m = Self::meta(&ReadCells {
            shard: key.into(),
            first,
            count,
        })?;
        let r = self.call(op::READ_CELLS, m, Bytes::new()).await?;
        if r.data.len() != count as usize * CELL_BYTES {
            return Err(KelpError::invalid(format!(
                "store {}: {} bytes for {count} cells",
                self.name,
                r.data.len()
            )));
        }
        Ok(r.data)
    }

    async fn prepare(&self, key: ShardKey, stipe: u32, durable: bool) -> kelp::Result<()> {
        self.stipe_op(op::PREPARE, key, stipe, durable as u32).await
    }

    async fn release(&self, key: ShardKey, stipe: u32, upto: u32) -> kelp::Result<()> {
        self.stipe_op(op::RELEASE, key, stipe, upto).await
    }

    async fn abort(&self, key: ShardKey, disk: u32, stipe: u32) -> kelp::Result<()> {
        self.stipe_op(op::ABORT, key, stipe, disk).await
    }

    async fn scratch(&self, key: ShardKey) -> kelp::Result<Vec<Bytes>> {
        let r = self
            .call(op::SCRATCH, Self::meta(&Shard::from(key))?, Bytes::new())
            .await?;
        if !r.data.len().is_multiple_of(CELL_BYTES) {
            return Err(KelpError::invalid(format!(
                "store {}: scratch reply is not whole cells",
                self.name
            )));
        }
        Ok((0..r.data.len() / CELL_BYTES)
            .map(|i| r.data.slice(i * CELL_BYTES..(i + 1) * CELL_BYTES))
            .collect())
    }

    async fn sync(&self, key: ShardKey) -> kelp::Result<()> {
        self.call(op::SYNC, Self::meta(&Shard::from(key))?, Bytes::new())
            .await
            .map(|_| ())
    }

    async fn list(&self) -> kelp::Result<Vec<ShardInfo>> {
        let r = self.call(op::LIST, Bytes::new(), Bytes::new()).await?;
        let list: Vec<Listed> = reply(&r, &self.name)?;
        Ok(list
            .into_iter()
            .map(|l| ShardInfo {
                key: ShardKey {
                    blade: l.blade,
                    shard: l.shard,
                },
                disk: l.disk,
                stipes: l.stipes,
            })
            .collect())
    }

    async fn stipes(&self, key: ShardKey) -> kelp::Result<Option<u32>> {
        let r = self
            .call(op::STIPES, Self::meta(&Shard::from(key))?, Bytes::new())
            .await?;
        reply(&r, &self.name)
    }

    async fn delete(&self, key: ShardKey) -> kelp::Result<()> {
        self.call(op::DELETE, Self::meta(&Shard::from(key))?, Bytes::new())
            .await
            .map(|_| ())
    }
}
