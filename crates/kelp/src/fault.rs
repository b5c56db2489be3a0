//! Fault injection around a real shard store, for tests: stop every operation after the N-th
//! mutating one (a crash at that step, optionally after the step reached the disk), take the store
//! down, or slow it down. It wraps a real store; it never stands in for one.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{KelpError, Result};
use crate::store::{ShardInfo, ShardKey, ShardStore, WriteMode};

/// When and how stores fail. One plan may be shared by many stores, so that a crash stops them
/// all at the same step.
#[derive(Debug)]
pub struct FaultPlan {
    /// Mutating operations left before the crash; negative means never.
    left: AtomicI64,
    /// Whether the operation at which the crash happens is applied before it fails.
    apply_crashing_op: AtomicBool,
    crashed: AtomicBool,
    down: AtomicBool,
    delay_ms: AtomicU64,
    /// Mutating operations seen (to size crash-injection loops).
    mutations: AtomicU64,
}

impl Default for FaultPlan {
    fn default() -> Self {
        FaultPlan {
            left: AtomicI64::new(-1),
            apply_crashing_op: AtomicBool::new(false),
            crashed: AtomicBool::new(false),
            down: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            mutations: AtomicU64::new(0),
        }
    }
}

impl FaultPlan {
    /// A plan that crashes at mutating operation `n` (0-based), applying it first if `applied`.
    pub fn crash_at(n: u64, applied: bool) -> Arc<Self> {
        let p = FaultPlan::default();
        p.left.store(n as i64, Ordering::SeqCst);
        p.apply_crashing_op.store(applied, Ordering::SeqCst);
        Arc::new(p)
    }

    /// Whether the crash has happened.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// Mutating operations attempted so far.
    pub fn mutations(&self) -> u64 {
        self.mutations.load(Ordering::SeqCst)
    }

    /// Takes the stores down (every call fails) or brings them back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Delays every call by `d`.
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

/// A real store behind a fault plan.
pub struct FaultyStore {
    inner: Arc<dyn ShardStore>,
    plan: Arc<FaultPlan>,
    name: String,
}

impl FaultyStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ShardStore>, plan: Arc<FaultPlan>) -> Self {
        let name = format!("faulty({})", inner.name());
        FaultyStore { inner, plan, name }
    }

    async fn gate(&self) -> Result<()> {
        let d = self.plan.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if self.plan.down.load(Ordering::SeqCst) {
            return Err(KelpError::Stopped(format!("store {} is down", self.name)));
        }
        if self.plan.crashed() {
            return Err(KelpError::Stopped(format!("store {} crashed", self.name)));
        }
        Ok(())
    }

    /// Runs a mutating operation under the plan.
    async fn mutate<T, F: std::future::Future<Output = Result<T>>>(&self, op: F) -> Result<T> {
        self.gate().await?;
        self.plan.mutations.fetch_add(1, Ordering::SeqCst);
        let left = self.plan.left.fetch_sub(1, Ordering::SeqCst);
        if left == 0 {
            self.plan.crashed.store(true, Ordering::SeqCst);
            if self.plan.apply_crashing_op.load(Ordering::SeqCst) {
                let _ = op.await;
            }
            return Err(KelpError::Stopped(format!("store {} crashed", self.name)));
        }
        if left < 0 {
            self.plan.left.store(-1, Ordering::SeqCst);
        }
        op.await
    }
}

#[async_trait]
impl ShardStore for FaultyStore {
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
    ) -> Result<()> {
        self.mutate(self.inner.write_cells(key, disk, first, cells, mode))
            .await
    }
    async fn read_cells(&self, key: ShardKey, first: u32, count: u32) -> Result<Bytes> {
        self.gate().await?;
        self.inner.read_cells(key, first, count).await
    }
    async fn prepare(&self, key: ShardKey, stipe: u32, durable: bool) -> Result<()> {
        self.mutate(self.inner.prepare(key, stipe, durable)).await
    }
    async fn release(&self, key: ShardKey, stipe: u32, upto: u32) -> Result<()> {
        self.mutate(self.inner.release(key, stipe, upto)).await
    }
    async fn abort(&self, key: ShardKey, disk: u32, stipe: u32) -> Result<()> {
        self.mutate(self.inner.abort(key, disk, stipe)).await
    }
    async fn scratch(&self, key: ShardKey) -> Result<Vec<Bytes>> {
        self.gate().await?;
        self.inner.scratch(key).await
    }
    async fn sync(&self, key: ShardKey) -> Result<()> {
        self.mutate(self.inner.sync(key)).await
    }
    async fn list(&self) -> Result<Vec<ShardInfo>> {
        self.gate().await?;
        self.inner.list().await
    }
    async fn stipes(&self, key: ShardKey) -> Result<Option<u32>> {
        self.gate().await?;
        self.inner.stipes(key).await
    }
    async fn delete(&self, key: ShardKey) -> Result<()> {
        self.mutate(self.inner.delete(key)).await
    }
}
