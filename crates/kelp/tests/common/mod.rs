//! A test forest: several servers' local stores over real directories, a layout that spreads a
//! blade's shards over all of their disks, and a seeded random source.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kelp::fault::{FaultPlan, FaultyStore};
use kelp::{
    BladeLayout, Holdfast, HoldfastConfig, LocalStore, LocalStoreConfig, Profile, ShardPlacement,
    ShardStore,
};

/// Servers with disks in a temporary directory.
pub struct Forest {
    pub dir: tempfile::TempDir,
    pub disks: Vec<Vec<PathBuf>>,
    pub stores: Vec<LocalStore>,
    pub cfg: LocalStoreConfig,
}

impl Forest {
    pub fn new(servers: usize, disks: usize) -> Self {
        Self::with_config(servers, disks, LocalStoreConfig::default())
    }

    pub fn with_config(servers: usize, disks: usize, cfg: LocalStoreConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let disks: Vec<Vec<PathBuf>> = (0..servers)
            .map(|s| {
                (0..disks)
                    .map(|d| dir.path().join(format!("server{s}/disk{d}")))
                    .collect()
            })
            .collect();
        let mut f = Forest {
            dir,
            disks,
            stores: Vec::new(),
            cfg,
        };
        f.reopen();
        f
    }

    /// Starts every store again from what is on disk (a restart of every server).
    pub fn reopen(&mut self) {
        self.stores = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| LocalStore::open(format!("server{i}"), d, self.cfg.clone()).unwrap())
            .collect();
    }

    /// Shard j on server j % S, disk (j / S) % D: all shards on distinct disks while there are enough.
    pub fn placement(&self, shard: usize) -> (usize, u32) {
        let s = self.stores.len();
        (shard % s, ((shard / s) % self.disks[0].len()) as u32)
    }

    pub fn layout(&self, blade: u32, profile: Profile) -> BladeLayout {
        self.layout_with(blade, profile, None)
    }

    /// A layout whose stores all go through one fault plan.
    pub fn layout_with(
        &self,
        blade: u32,
        profile: Profile,
        plan: Option<Arc<FaultPlan>>,
    ) -> BladeLayout {
        let shards = (0..profile.n())
            .map(|j| {
                let (s, disk) = self.placement(j);
                let real: Arc<dyn ShardStore> = Arc::new(self.stores[s].clone());
                let store: Arc<dyn ShardStore> = match &plan {
                    Some(p) => Arc::new(FaultyStore::new(real, p.clone())),
                    None => real,
                };
                ShardPlacement { store, disk }
            })
            .collect();
        BladeLayout::new(blade, profile, shards).unwrap()
    }

    /// A layout where each shard has its own fault plan.
    pub fn layout_per_shard(
        &self,
        blade: u32,
        profile: Profile,
        plans: &[Arc<FaultPlan>],
    ) -> BladeLayout {
        let shards = (0..profile.n())
            .map(|j| {
                let (s, disk) = self.placement(j);
                let real: Arc<dyn ShardStore> = Arc::new(self.stores[s].clone());
                ShardPlacement {
                    store: Arc::new(FaultyStore::new(real, plans[j].clone())),
                    disk,
                }
            })
            .collect();
        BladeLayout::new(blade, profile, shards).unwrap()
    }

    pub fn shard_path(&self, blade: u32, shard: usize) -> PathBuf {
        let (s, _) = self.placement(shard);
        self.stores[s]
            .shard_path(kelp::ShardKey {
                blade,
                shard: shard as u8,
            })
            .expect("shard file exists")
    }

    /// A holdfast whose shard stores each go through their own fault plan.
    pub async fn holdfast_with_plans(&self, blade: u32) -> (Holdfast, Vec<Arc<FaultPlan>>) {
        let n = Profile::default().n();
        let plans: Vec<Arc<FaultPlan>> = (0..n).map(|_| Arc::new(FaultPlan::default())).collect();
        let layout = self.layout_per_shard(blade, Profile::default(), &plans);
        (Holdfast::open(layout, test_config()).await.unwrap(), plans)
    }

    pub async fn holdfast(&self, blade: u32) -> Holdfast {
        Holdfast::open(self.layout(blade, Profile::default()), test_config())
            .await
            .unwrap()
    }
}

pub fn test_config() -> HoldfastConfig {
    let hedge = kelp::HedgeConfig {
        deadline: std::time::Duration::from_secs(20),
        ..Default::default()
    };
    HoldfastConfig {
        op_timeout: std::time::Duration::from_secs(20),
        straggler_grace: std::time::Duration::from_millis(100),
        hedge,
        ..Default::default()
    }
}

/// xorshift64*: reproducible test data without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
    /// `count` distinct values below `n`.
    pub fn pick(&mut self, n: usize, count: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            all.swap(i, self.below(i as u64 + 1) as usize);
        }
        all.truncate(count);
        all
    }
}

/// Appends `count` fronds of random sizes up to `max_len`, returning (reference, data).
pub async fn fill(
    h: &Holdfast,
    rng: &mut Rng,
    count: usize,
    max_len: u64,
) -> Vec<(kelp::Reference, Vec<u8>)> {
    let mut out = Vec::new();
    for _ in 0..count {
        let len = rng.below(max_len + 1) as usize;
        let data = rng.bytes(len);
        let r = h.append_data(&data).await.unwrap();
        out.push((r, data));
    }
    out
}

/// Every frond reads back byte-identical.
pub async fn check_all(h: &Holdfast, fronds: &[(kelp::Reference, Vec<u8>)]) {
    for (r, data) in fronds {
        let got = h
            .read(*r)
            .await
            .unwrap_or_else(|e| panic!("read {:?}: {e}", r));
        assert!(got == data[..], "frond at {} differs", r.address);
    }
}

/// A file system mounted for a test (root only), unmounted when dropped.
pub struct Mount(PathBuf);

impl Mount {
    /// Mounts a `fstype` (tmpfs, ramfs) with `options` at `at`; `None` where that is not
    /// allowed (not root).
    pub fn new(fstype: &str, at: &Path, options: &str) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", fstype, "-o", options, fstype])
            .arg(at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Lazily: a store that still has the disk open keeps writing into the detached mount.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
