//! Group commit of `fdatasync` per disk: concurrent syncs on one disk share one round.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{KelpError, Result};

#[derive(Default)]
struct State {
    dirty: HashMap<u64, (Arc<File>, String)>,
    /// Bumped after every completed write; a sync covers the writes counted when it began.
    written: u64,
    synced: u64,
    /// Rounds of fdatasync run so far.
    rounds: u64,
    running: bool,
    /// The error of the last failed round and the write count it covered.
    failed: Option<(u64, String)>,
}

/// The sync state of one disk.
#[derive(Default)]
pub struct DiskSyncer {
    state: Mutex<State>,
    done: Condvar,
}

impl DiskSyncer {
    /// Records that `file` (named `what` in errors) has writes that the next sync must cover.
    pub fn mark_dirty(&self, id: u64, file: &Arc<File>, what: impl FnOnce() -> String) {
        let mut s = self.state.lock().expect("syncer lock");
        s.dirty.entry(id).or_insert_with(|| (file.clone(), what()));
        s.written += 1;
    }

    /// Rounds of `fdatasync` run so far.
    pub fn rounds(&self) -> u64 {
        self.state.lock().expect("syncer lock").rounds
    }

    /// Returns once every write marked before the call is on stable storage. Blocks the thread.
    pub fn sync(&self) -> Result<()> {
        let mut s = self.state.lock().expect("syncer lock");
        let target = s.written;
        loop {
            if s.synced >= target {
                return Ok(());
            }
            if let Some((covered, err)) = &s.failed {
                if *covered >= target {
                    return Err(KelpError::io(
                        err.clone(),
                        std::io::Error::other("fdatasync failed"),
                    ));
                }
            }
            if !s.running {
                s.running = true;
                s.rounds += 1;
                let round = s.written;
                let files: Vec<(u64, (Arc<File>, String))> = s.dirty.drain().collect();
                drop(s);
                let mut error = None;
                for (_, (file, what)) in &files {
                    if let Err(e) = file.sync_data() {
                        error = Some(format!("fdatasync {what}: {e}"));
                    }
                }
                s = self.state.lock().expect("syncer lock");
                s.running = false;
                match error {
                    None => s.synced = s.synced.max(round),
                    Some(err) => {
                        // Keep the files dirty so that a later sync tries again.
                        for (id, entry) in files {
                            s.dirty.entry(id).or_insert(entry);
                        }
                        s.failed = Some((round, err));
                    }
                }
                self.done.notify_all();
            } else {
                s = self.done.wait(s).expect("syncer lock");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn concurrent_syncs_share_one_round() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Arc::new(DiskSyncer::default());
        let mut files = Vec::new();
        for i in 0..4u64 {
            let mut f = File::create(dir.path().join(format!("f{i}"))).unwrap();
            f.write_all(&[1u8; 4096]).unwrap();
            let f = Arc::new(f);
            syncer.mark_dirty(i, &f, || format!("f{i}"));
            files.push(f);
        }
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (s, b) = (syncer.clone(), barrier.clone());
                std::thread::spawn(move || {
                    b.wait();
                    s.sync().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Eight syncs of the same writes: one round of fdatasync covered them all.
        assert_eq!(syncer.rounds(), 1);
        syncer.sync().unwrap();
        assert_eq!(syncer.rounds(), 1, "nothing new to sync");
        syncer.mark_dirty(0, &files[0], || "f0".into());
        syncer.sync().unwrap();
        assert_eq!(syncer.rounds(), 2);
    }
}
