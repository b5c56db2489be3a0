//! The cluster map (DESIGN 5.4) and the commands that change it. Applying is deterministic: time
//! comes in the commands (the leader's clock), never from the replica applying them.

use std::collections::BTreeMap;

use kelp::Profile;
use serde::{Deserialize, Serialize};

/// Whether a server is taking part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerState {
    /// Heartbeating.
    Up,
    /// Silent past the timeout.
    Down,
}

/// A disk of a server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Bytes in all.
    pub capacity: u64,
    /// Bytes free at the last heartbeat.
    pub free: u64,
}

/// A server in the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// Where peers and clients reach it.
    pub addr: String,
    /// Failure domain (rack, data centre); empty when not configured.
    pub zone: String,
    /// Its disks, by index.
    pub disks: Vec<Disk>,
    /// Up or down.
    pub state: ServerState,
    /// Leader's clock (ms) at its last heartbeat.
    pub last_seen_ms: u64,
}

/// Where one shard of a blade lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardHome {
    /// Server id.
    pub server: u64,
    /// Disk index on that server.
    pub disk: u32,
}

/// A blade in the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BladeEntry {
    /// k, m, w.
    pub k: u8,
    /// Parity cells.
    pub m: u8,
    /// Extra acknowledgements.
    pub w: u8,
    /// Shard 0..n (shard 0's server is the holdfast).
    pub shards: Vec<ShardHome>,
    /// Where it is in its life (DESIGN 4.6).
    pub state: BladeState,
    /// Whether blobs were appended to it: nothing in the namespace refers to them, so it is
    /// never reclaimed.
    pub blobs: bool,
}

/// Where a blade is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BladeState {
    /// Taking appends.
    Open,
    /// Full: its holdfast takes no more appends, so clients write elsewhere.
    Sealed,
    /// Sealed, nothing in the namespace refers to it and none can again: its shard files are
    /// being deleted. Never opened again.
    Deleting,
}

/// A step in a blade's life, asked for by its holdfast.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BladeChange {
    /// It took its last append.
    Seal,
    /// A blob is about to be appended to it.
    Blobs,
    /// Its shard files are about to be deleted (only from Sealed, and never with blobs).
    Delete,
    /// Its shard files are gone: out of the map (only from Deleting).
    Drop,
}

/// A volume: a namespace with its own root, a quota and an erasure profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// 1 and up; the root inode derives from it.
    pub id: u32,
    /// Bytes allowed (0: no limit).
    pub quota: u64,
    /// k, m, w of its blades.
    pub k: u8,
    /// Parity cells.
    pub m: u8,
    /// Extra acknowledgements.
    pub w: u8,
}

/// The cluster map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Bumped by every change that moves work (not by heartbeats).
    pub epoch: u64,
    /// Servers by id.
    pub servers: BTreeMap<u64, ServerEntry>,
    /// Blades by id.
    pub blades: BTreeMap<u32, BladeEntry>,
    /// The replica set (server ids) of each metadata partition; empty until enough servers
    /// are up. The first member starts the group.
    pub partitions: Vec<Vec<u64>>,
    /// Volumes by name.
    pub volumes: BTreeMap<String, Volume>,
    next_server: u64,
    next_blade: u32,
    next_volume: u32,
    /// The first blade that may be reclaimed: blades allocated by a version before
    /// reclamation may hold blobs that were not marked. Set once, by [`Command::Reclaimable`];
    /// none is reclaimed before.
    pub reclaim_from: Option<u32>,
}

/// Picks the `r` servers of `ids` with the highest hash of (partition, server): rendezvous
/// hashing, so that adding or removing a server moves only the partitions it wins or held.
pub fn replica_set(partition: u32, ids: &[u64], r: usize) -> Vec<u64> {
    let mut scored: Vec<(u64, u64)> = ids
        .iter()
        .map(|&id| {
            let mut h = blake3::Hasher::new();
            h.update(&partition.to_le_bytes());
            h.update(&id.to_le_bytes());
            let d = h.finalize();
            let score = u64::from_le_bytes(d.as_bytes()[..8].try_into().expect("8 bytes"));
            (score, id)
        })
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().take(r).map(|(_, id)| id).collect()
}

/// A change to the map.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// A server starts: same address, same id.
    Register {
        /// Its address.
        addr: String,
        /// Its zone.
        zone: String,
        /// Its disks.
        disks: Vec<Disk>,
        /// Leader's clock.
        now_ms: u64,
    },
    /// A server is alive; its disks' free bytes.
    Heartbeat {
        /// Server id.
        server: u64,
        /// Free bytes per disk.
        free: Vec<u64>,
        /// Leader's clock.
        now_ms: u64,
    },
    /// Servers silent since before `before_ms` are down.
    MarkDown {
        /// Leader's clock minus the timeout.
        before_ms: u64,
    },
    /// Lays out `count` metadata partitions of `replicas` replicas over the servers that are
    /// up (once; later calls change nothing), and makes the volume "default".
    InitPartitions {
        /// P, a power of two.
        count: u32,
        /// R.
        replicas: u8,
    },
    /// A new volume.
    CreateVolume {
        /// Its name.
        name: String,
        /// Bytes allowed (0: no limit).
        quota: u64,
        /// k.
        k: u8,
        /// m.
        m: u8,
        /// w.
        w: u8,
    },
    /// Deletes a volume (its files become unreachable).
    DeleteVolume {
        /// Its name.
        name: String,
    },
    /// A new blade with this profile, placed over distinct disks.
    AllocateBlade {
        /// k, m, w.
        k: u8,
        /// Parity.
        m: u8,
        /// Extra acknowledgements.
        w: u8,
    },
    /// A blade takes a step in its life (last, so that logs written before it still read).
    ChangeBlade {
        /// Which.
        id: u32,
        /// What.
        change: BladeChange,
    },
    /// Blades allocated from now on may be reclaimed (once; later calls change nothing).
    Reclaimable,
    /// A new blade, as [`Command::AllocateBlade`], by a manager that knows blades are
    /// reclaimed: [`Command::Reclaimable`] first if it was not yet. (AllocateBlade stays for
    /// the logs of managers before.)
    Allocate {
        /// k, m, w.
        k: u8,
        /// Parity.
        m: u8,
        /// Extra acknowledgements.
        w: u8,
    },
}

/// What applying a command returned.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Outcome {
    /// The server's id.
    Registered(u64),
    /// Done.
    Done,
    /// No such server (a heartbeat from one the map does not know: it must register).
    UnknownServer,
    /// The new blade.
    Blade(u32, BladeEntry),
    /// The volume's id.
    Volume(u32),
    /// The command could not be applied.
    Refused(String),
}

/// The map as it was stored before blades had a state (snapshots written then).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct ClusterMapV1 {
    epoch: u64,
    servers: BTreeMap<u64, ServerEntry>,
    blades: BTreeMap<u32, BladeEntryV1>,
    partitions: Vec<Vec<u64>>,
    volumes: BTreeMap<String, Volume>,
    next_server: u64,
    next_blade: u32,
    next_volume: u32,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct BladeEntryV1 {
    k: u8,
    m: u8,
    w: u8,
    shards: Vec<ShardHome>,
}

impl ClusterMap {
    /// Reads a stored map: this version's, or one stored before blades had a state (every
    /// blade then open; none reclaimed, as `reclaim_from` is set after them). A reading must
    /// take every byte and pass [`ClusterMap::check`].
    pub fn decode(bytes: &[u8]) -> Result<ClusterMap, String> {
        let whole = |r: postcard::Result<(ClusterMap, &[u8])>| match r {
            Ok((m, [])) if m.check().is_ok() => Some(m),
            _ => None,
        };
        if let Some(m) = whole(postcard::take_from_bytes::<ClusterMap>(bytes)) {
            return Ok(m);
        }
        let (v1, rest) = postcard::take_from_bytes::<ClusterMapV1>(bytes)
            .map_err(|e| format!("a stored map that does not read: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("a stored map with {} bytes too many", rest.len()));
        }
        let m = ClusterMap {
            epoch: v1.epoch,
            servers: v1.servers,
            blades: v1
                .blades
                .into_iter()
                .map(|(id, b)| {
                    let e = BladeEntry {
                        k: b.k,
                        m: b.m,
                        w: b.w,
                        shards: b.shards,
                        state: BladeState::Open,
                        // They may hold blobs (and are below `reclaim_from` once it is
                        // set): new blobs may join them, new files' data goes elsewhere.
                        blobs: true,
                    };
                    (id, e)
                })
                .collect(),
            partitions: v1.partitions,
            volumes: v1.volumes,
            next_server: v1.next_server,
            next_blade: v1.next_blade,
            next_volume: v1.next_volume,
            reclaim_from: None,
        };
        m.check()?;
        Ok(m)
    }

    /// Checks what the rest of the system takes for granted of a map that came over the wire:
    /// every blade has a valid profile and one shard per cell of a stipe (shard 0, the
    /// holdfast, included), and every shard and partition member is a server of the map.
    pub fn check(&self) -> Result<(), String> {
        for (id, b) in &self.blades {
            let p = Profile::new(b.k, b.m, b.w).map_err(|e| format!("blade {id:08x}: {e}"))?;
            if b.shards.len() != p.n() {
                return Err(format!(
                    "blade {id:08x}: {} shards for {}+{}",
                    b.shards.len(),
                    b.k,
                    b.m
                ));
            }
            if let Some(h) = b
                .shards
                .iter()
                .find(|h| !self.servers.contains_key(&h.server))
            {
                return Err(format!("blade {id:08x}: no server {}", h.server));
            }
        }
        for (i, members) in self.partitions.iter().enumerate() {
            if let Some(s) = members.iter().find(|s| !self.servers.contains_key(s)) {
                return Err(format!("partition {i}: no server {s}"));
            }
        }
        Ok(())
    }

    /// The highest blade id allocated so far: a blade at or under it that the map lacks was
    /// reclaimed, and never comes back.
    pub fn last_blade(&self) -> u32 {
        self.next_blade
    }

    /// Applies one command.
    pub fn apply(&mut self, c: Command) -> Outcome {
        match c {
            Command::Register {
                addr,
                zone,
                disks,
                now_ms,
            } => {
                let id = match self.servers.iter().find(|(_, s)| s.addr == addr) {
                    Some((id, _)) => *id,
                    None => {
                        self.next_server += 1;
                        self.next_server
                    }
                };
                self.servers.insert(
                    id,
                    ServerEntry {
                        addr,
                        zone,
                        disks,
                        state: ServerState::Up,
                        last_seen_ms: now_ms,
                    },
                );
                self.epoch += 1;
                Outcome::Registered(id)
            }
            Command::Heartbeat {
                server,
                free,
                now_ms,
            } => {
                let Some(s) = self.servers.get_mut(&server) else {
                    return Outcome::UnknownServer;
                };
                s.last_seen_ms = s.last_seen_ms.max(now_ms);
                for (d, f) in s.disks.iter_mut().zip(free) {
                    d.free = f.min(d.capacity);
                }
                if s.state == ServerState::Down {
                    s.state = ServerState::Up;
                    self.epoch += 1;
                }
                Outcome::Done
            }
            Command::MarkDown { before_ms } => {
                let mut changed = false;
                for s in self.servers.values_mut() {
                    if s.state == ServerState::Up && s.last_seen_ms < before_ms {
                        s.state = ServerState::Down;
                        changed = true;
                    }
                }
                if changed {
                    self.epoch += 1;
                }
                Outcome::Done
            }
            Command::InitPartitions { count, replicas } => {
                if !self.partitions.is_empty() {
                    return Outcome::Done;
                }
                if count == 0 || !count.is_power_of_two() || count > 4096 || replicas == 0 {
                    return Outcome::Refused(format!(
                        "partitions must be a power of two up to 4096 (got {count}), replicas at least 1"
                    ));
                }
                let up: Vec<u64> = self
                    .servers
                    .iter()
                    .filter(|(_, s)| s.state == ServerState::Up)
                    .map(|(id, _)| *id)
                    .collect();
                if up.len() < replicas as usize {
                    return Outcome::Refused(format!(
                        "{replicas} replicas need {replicas} servers up; {} are",
                        up.len()
                    ));
                }
                self.partitions = (0..count)
                    .map(|p| replica_set(p, &up, replicas as usize))
                    .collect();
                if !self.volumes.contains_key("default") {
                    self.next_volume += 1;
                    let v = Volume {
                        id: self.next_volume,
                        quota: 0,
                        k: 8,
                        m: 8,
                        w: 4,
                    };
                    self.volumes.insert("default".into(), v);
                }
                self.epoch += 1;
                Outcome::Done
            }
            Command::CreateVolume {
                name,
                quota,
                k,
                m,
                w,
            } => {
                if let Err(e) = Profile::new(k, m, w) {
                    return Outcome::Refused(e.to_string());
                }
                if name.is_empty()
                    || name.len() > 64
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                {
                    return Outcome::Refused(format!(
                        "volume name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
                    ));
                }
                if self.volumes.contains_key(&name) {
                    return Outcome::Refused(format!("volume {name} exists"));
                }
                self.next_volume += 1;
                let id = self.next_volume;
                self.volumes.insert(name, Volume { id, quota, k, m, w });
                self.epoch += 1;
                Outcome::Volume(id)
            }
            Command::DeleteVolume { name } => {
                if self.volumes.remove(&name).is_none() {
                    return Outcome::Refused(format!("no volume {name}"));
                }
                self.epoch += 1;
                Outcome::Done
            }
            Command::ChangeBlade { id, change } => {
                let Some(b) = self.blades.get_mut(&id) else {
                    return Outcome::Refused(format!("no blade {id:08x}"));
                };
                match (change, b.state) {
                    (BladeChange::Seal, BladeState::Open) => b.state = BladeState::Sealed,
                    (BladeChange::Seal, _) => return Outcome::Done,
                    (BladeChange::Blobs, BladeState::Deleting) => {
                        return Outcome::Refused(format!("blade {id:08x} is being deleted"))
                    }
                    (BladeChange::Blobs, _) if b.blobs => return Outcome::Done,
                    (BladeChange::Blobs, _) => b.blobs = true,
                    (BladeChange::Delete, BladeState::Sealed)
                        if !b.blobs && self.reclaim_from.is_some_and(|f| id >= f) =>
                    {
                        b.state = BladeState::Deleting
                    }
                    (BladeChange::Delete, BladeState::Deleting) => return Outcome::Done,
                    (BladeChange::Delete, _) => {
                        return Outcome::Refused(format!(
                            "blade {id:08x} is {:?}{}{}: not deleted",
                            b.state,
                            if b.blobs { " with blobs" } else { "" },
                            if self.reclaim_from.is_some_and(|f| id >= f) {
                                ""
                            } else {
                                ", from before reclamation"
                            }
                        ))
                    }
                    (BladeChange::Drop, BladeState::Deleting) => {
                        self.blades.remove(&id);
                    }
                    (BladeChange::Drop, _) => {
                        return Outcome::Refused(format!("blade {id:08x} is not being deleted"))
                    }
                }
                self.epoch += 1;
                Outcome::Done
            }
            Command::Reclaimable => {
                if self.reclaim_from.is_none() {
                    self.reclaim_from = Some(self.next_blade + 1);
                }
                Outcome::Done
            }
            Command::Allocate { k, m, w } => {
                self.apply(Command::Reclaimable);
                self.apply(Command::AllocateBlade { k, m, w })
            }
            Command::AllocateBlade { k, m, w } => match Profile::new(k, m, w) {
                Err(e) => Outcome::Refused(e.to_string()),
                Ok(p) => match self.place(p) {
                    Err(e) => Outcome::Refused(e),
                    Ok(shards) => {
                        self.next_blade += 1;
                        let id = self.next_blade;
                        let b = BladeEntry {
                            k,
                            m,
                            w,
                            shards,
                            state: BladeState::Open,
                            blobs: false,
                        };
                        self.blades.insert(id, b.clone());
                        self.epoch += 1;
                        Outcome::Blade(id, b)
                    }
                },
            },
        }
    }

    /// Picks n distinct disks of servers that are up: spread over zones and servers as evenly
    /// as possible, then the disk with the most free bytes; the first server turns with the blade
    /// count so that every disk is the holdfast of some blades.
    fn place(&self, p: Profile) -> Result<Vec<ShardHome>, String> {
        let n = p.n();
        let up: Vec<(u64, &ServerEntry)> = self
            .servers
            .iter()
            .filter(|(_, s)| s.state == ServerState::Up)
            .map(|(id, s)| (*id, s))
            .collect();
        let disks: usize = up.iter().map(|(_, s)| s.disks.len()).sum();
        if disks < n {
            return Err(format!(
                "a {p} blade needs {n} disks; the servers that are up have {disks}"
            ));
        }
        let turn = self.next_blade as usize;
        let mut per_server: BTreeMap<u64, usize> = BTreeMap::new();
        let mut per_zone: BTreeMap<&str, usize> = BTreeMap::new();
        let mut used: Vec<(u64, u32)> = Vec::new();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let holdfast = out.is_empty();
            let best = up
                .iter()
                .enumerate()
                .flat_map(|(rank, (id, s))| {
                    s.disks
                        .iter()
                        .enumerate()
                        .map(move |(d, disk)| (rank, *id, *s, d as u32, disk))
                })
                .filter(|(_, id, _, d, _)| !used.contains(&(*id, *d)))
                .min_by_key(|(rank, id, s, d, disk)| {
                    let zone = per_zone.get(s.zone.as_str()).copied().unwrap_or(0) as u64;
                    let server = per_server.get(id).copied().unwrap_or(0) as u64;
                    let emptiest = u64::MAX - disk.free;
                    // Blade after blade, the holdfast turns over the servers, and over the
                    // disks of each server, whatever their free bytes: a server's loss then
                    // leaves the blades the others lead writable.
                    let turn_server = ((rank + up.len() - turn % up.len()) % up.len()) as u64;
                    let turn_disk = ((*d as usize + turn / up.len()) % s.disks.len().max(1)) as u64;
                    if holdfast {
                        (zone, server, turn_server, turn_disk, emptiest)
                    } else {
                        (zone, server, emptiest, turn_server, turn_disk)
                    }
                })
                .expect("enough disks checked");
            let (_, id, s, d, _) = best;
            *per_server.entry(id).or_default() += 1;
            *per_zone.entry(s.zone.as_str()).or_default() += 1;
            used.push((id, d));
            out.push(ShardHome {
                server: id,
                disk: d,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn map(servers: usize, disks: usize) -> ClusterMap {
        let mut m = ClusterMap::default();
        for s in 0..servers {
            let disks = (0..disks)
                .map(|_| Disk {
                    capacity: 1 << 40,
                    free: 1 << 40,
                })
                .collect();
            m.apply(Command::Register {
                addr: format!("10.0.0.{s}:7070"),
                zone: String::new(),
                disks,
                now_ms: 0,
            });
        }
        m
    }

    /// A map from the wire that the client and servers would index past its end is refused.
    #[test]
    fn a_map_whose_blades_or_partitions_name_what_it_lacks_is_refused() {
        let mut m = map(4, 4);
        let Outcome::Blade(id, _) = m.apply(Command::AllocateBlade { k: 8, m: 8, w: 4 }) else {
            panic!()
        };
        m.partitions = vec![vec![1, 2, 3]];
        assert_eq!(m.check(), Ok(()));
        let broken = |change: &dyn Fn(&mut ClusterMap)| {
            let mut b = m.clone();
            change(&mut b);
            b.check().unwrap_err()
        };
        let e = broken(&|b| b.blades.get_mut(&id).unwrap().shards.clear());
        assert!(e.contains("0 shards for 8+8"), "{e}");
        let e = broken(&|b| {
            b.blades.get_mut(&id).unwrap().shards.pop();
        });
        assert!(e.contains("15 shards"), "{e}");
        let e = broken(&|b| b.blades.get_mut(&id).unwrap().k = 0);
        assert!(e.contains("blade"), "{e}");
        let e = broken(&|b| b.blades.get_mut(&id).unwrap().shards[3].server = 99);
        assert!(e.contains("no server 99"), "{e}");
        let e = broken(&|b| b.partitions[0][1] = 42);
        assert!(e.contains("partition 0: no server 42"), "{e}");
    }

    #[test]
    fn blades_use_distinct_disks_and_servers_evenly_and_rotate_holdfasts() {
        let mut m = map(4, 4);
        // Unequal free space (server 2's disks the emptiest, as happens): the holdfasts
        // still turn over every server and disk.
        for s in 1..=4u64 {
            let free = (0..4).map(|d| (1u64 << 39) + s * 1000 + d).collect();
            m.apply(Command::Heartbeat {
                server: s,
                free,
                now_ms: 1,
            });
        }
        let mut holdfasts = BTreeMap::new();
        let mut leaders = Vec::new();
        for _ in 0..16 {
            let Outcome::Blade(_, b) = m.apply(Command::AllocateBlade { k: 8, m: 8, w: 4 }) else {
                panic!()
            };
            let mut seen: Vec<(u64, u32)> = b.shards.iter().map(|h| (h.server, h.disk)).collect();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), 16, "16 distinct disks");
            for s in 1..=4 {
                assert_eq!(
                    b.shards.iter().filter(|h| h.server == s).count(),
                    4,
                    "4 shards per server"
                );
            }
            *holdfasts
                .entry((b.shards[0].server, b.shards[0].disk))
                .or_insert(0) += 1;
            leaders.push(b.shards[0].server);
        }
        assert_eq!(
            holdfasts.len(),
            16,
            "every disk leads a blade: {holdfasts:?}"
        );
        for four in leaders.chunks(4) {
            let servers: BTreeSet<u64> = four.iter().copied().collect();
            assert_eq!(
                servers.len(),
                4,
                "4 blades in a row, 4 holdfast servers: {leaders:?}"
            );
        }
    }

    #[test]
    fn a_blade_is_sealed_deleted_and_dropped_in_order_and_never_with_blobs() {
        let mut m = map(4, 4);
        let alloc = |m: &mut ClusterMap| match m.apply(Command::AllocateBlade { k: 8, m: 8, w: 4 })
        {
            Outcome::Blade(id, b) => {
                assert_eq!((b.state, b.blobs), (BladeState::Open, false));
                id
            }
            o => panic!("{o:?}"),
        };
        // Allocated by a manager from before (a command of its log, replayed).
        let legacy = alloc(&mut m);
        assert_eq!(m.reclaim_from, None);
        // This version's allocation makes blades reclaimable from itself on.
        let Outcome::Blade(a, _) = m.apply(Command::Allocate { k: 8, m: 8, w: 4 }) else {
            panic!()
        };
        assert_eq!(m.reclaim_from, Some(a));
        let b = alloc(&mut m);
        // Set once: later calls change nothing.
        assert_eq!(m.apply(Command::Reclaimable), Outcome::Done);
        assert_eq!(m.reclaim_from, Some(legacy + 1));
        let change = |m: &mut ClusterMap, id, change| m.apply(Command::ChangeBlade { id, change });
        // A blade from before reclamation may hold blobs nobody marked: never deleted.
        assert_eq!(change(&mut m, legacy, BladeChange::Seal), Outcome::Done);
        assert!(
            matches!(change(&mut m, legacy, BladeChange::Delete), Outcome::Refused(e) if e.contains("before reclamation"))
        );
        // Not before it is sealed.
        assert!(matches!(
            change(&mut m, a, BladeChange::Delete),
            Outcome::Refused(_)
        ));
        assert!(matches!(
            change(&mut m, a, BladeChange::Drop),
            Outcome::Refused(_)
        ));
        let epoch = m.epoch;
        assert_eq!(change(&mut m, a, BladeChange::Seal), Outcome::Done);
        assert_eq!(m.blades[&a].state, BladeState::Sealed);
        assert!(m.epoch > epoch, "clients must see it sealed");
        // Asked again: nothing changes.
        let epoch = m.epoch;
        assert_eq!(change(&mut m, a, BladeChange::Seal), Outcome::Done);
        assert_eq!(m.epoch, epoch);
        // A blade with blobs is never deleted.
        assert_eq!(change(&mut m, b, BladeChange::Blobs), Outcome::Done);
        assert_eq!(change(&mut m, b, BladeChange::Seal), Outcome::Done);
        assert!(
            matches!(change(&mut m, b, BladeChange::Delete), Outcome::Refused(e) if e.contains("blobs"))
        );
        // Deleting, then dropped; the ids are never given again.
        assert_eq!(change(&mut m, a, BladeChange::Delete), Outcome::Done);
        assert!(matches!(
            change(&mut m, a, BladeChange::Blobs),
            Outcome::Refused(_)
        ));
        assert_eq!(change(&mut m, a, BladeChange::Seal), Outcome::Done);
        assert_eq!(m.blades[&a].state, BladeState::Deleting);
        assert_eq!(change(&mut m, a, BladeChange::Drop), Outcome::Done);
        assert!(!m.blades.contains_key(&a));
        assert!(a <= m.last_blade());
        assert!(matches!(
            change(&mut m, a, BladeChange::Seal),
            Outcome::Refused(_)
        ));
        let c = alloc(&mut m);
        assert!(c > b && c > a);
    }

    #[test]
    fn a_map_stored_before_blades_had_a_state_still_reads() {
        let mut m = map(4, 4);
        for _ in 0..3 {
            m.apply(Command::AllocateBlade { k: 8, m: 8, w: 4 });
        }
        m.partitions = vec![vec![1, 2, 3]];
        let old = ClusterMapV1 {
            epoch: m.epoch,
            servers: m.servers.clone(),
            blades: m
                .blades
                .iter()
                .map(|(id, b)| {
                    let v1 = BladeEntryV1 {
                        k: b.k,
                        m: b.m,
                        w: b.w,
                        shards: b.shards.clone(),
                    };
                    (*id, v1)
                })
                .collect(),
            partitions: m.partitions.clone(),
            volumes: m.volumes.clone(),
            next_server: m.next_server,
            next_blade: m.next_blade,
            next_volume: m.next_volume,
        };
        let read = ClusterMap::decode(&postcard::to_stdvec(&old).unwrap()).unwrap();
        assert_eq!(read.blades.len(), 3);
        for (id, b) in &read.blades {
            assert_eq!(b.shards, m.blades[id].shards);
            // Open, and kept for good: they may hold blobs.
            assert_eq!((b.state, b.blobs), (BladeState::Open, true));
        }
        assert_eq!(read.last_blade(), m.last_blade());
        // Reclamation starts after them.
        let mut read = read;
        assert_eq!(read.reclaim_from, None);
        read.apply(Command::Reclaimable);
        assert_eq!(read.reclaim_from, Some(m.last_blade() + 1));
        // This version's map reads as itself; bytes that are neither are refused.
        let now = postcard::to_stdvec(&m).unwrap();
        assert_eq!(ClusterMap::decode(&now).unwrap(), m);
        assert!(ClusterMap::decode(&now[..now.len() - 3]).is_err());
        let mut longer = now.clone();
        longer.push(0);
        assert!(ClusterMap::decode(&longer).is_err());
    }

    #[test]
    fn too_few_disks_and_bad_profiles_are_refused() {
        let mut m = map(2, 4);
        assert!(
            matches!(m.apply(Command::AllocateBlade { k: 8, m: 8, w: 4 }), Outcome::Refused(e) if e.contains("needs 16 disks"))
        );
        assert!(matches!(
            m.apply(Command::AllocateBlade { k: 0, m: 8, w: 4 }),
            Outcome::Refused(_)
        ));
        let Outcome::Blade(_, b) = m.apply(Command::AllocateBlade { k: 4, m: 2, w: 1 }) else {
            panic!()
        };
        assert_eq!(b.shards.iter().filter(|h| h.server == 1).count(), 3);
    }

    #[test]
    fn silent_servers_go_down_and_come_back() {
        let mut m = map(3, 1);
        let e = m.epoch;
        m.apply(Command::Heartbeat {
            server: 1,
            free: vec![5],
            now_ms: 10_000,
        });
        m.apply(Command::Heartbeat {
            server: 2,
            free: vec![5],
            now_ms: 10_000,
        });
        assert_eq!(m.epoch, e, "heartbeats do not move work");
        m.apply(Command::MarkDown { before_ms: 5_000 });
        assert_eq!(m.servers[&3].state, ServerState::Down);
        assert_eq!(m.servers[&1].state, ServerState::Up);
        assert!(m.epoch > e);
        m.apply(Command::Heartbeat {
            server: 3,
            free: vec![5],
            now_ms: 11_000,
        });
        assert_eq!(m.servers[&3].state, ServerState::Up);
        assert_eq!(
            m.apply(Command::Heartbeat {
                server: 9,
                free: vec![],
                now_ms: 1
            }),
            Outcome::UnknownServer
        );
        // Registering again from the same address keeps the id.
        let again = m.apply(Command::Register {
            addr: "10.0.0.0:7070".into(),
            zone: String::new(),
            disks: vec![],
            now_ms: 1,
        });
        assert_eq!(again, Outcome::Registered(1));
    }
}
