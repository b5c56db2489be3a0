//! Folders' attributes as this mount's own creates and unlinks left them: the kernel drops a
//! folder's attributes after every entry made or removed in it and asks for them again before
//! the next path walk through it; the create's or unlink's reply carries them, so the mount
//! answers that GETATTR itself.
//!
//! A folder's attributes are shown from here only while no other change of it by this mount
//! is in flight or has ended since the change that gave them, and for less than the attribute
//! TTL (the staleness the kernel's own attribute cache allows for changes by other mounts).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sealfs_meta::Attr;

/// Folders whose attributes are past the TTL are dropped once there are more than this many.
const KEPT_MAX: usize = 4096;

#[derive(Default)]
struct Dir {
    /// Changes of the folder by this mount in flight.
    busy: u32,
    /// Counts the starts and ends of changes: a change's attributes are shown only if nothing
    /// started or ended since it started.
    turn: u64,
    /// The attributes a create left, and when they came.
    shown: Option<(Attr, Instant)>,
}

/// The folders this mount changes.
pub struct Dirs {
    dirs: Mutex<HashMap<u64, Dir>>,
    /// How long attributes are shown after they came (the attribute TTL).
    fresh: Duration,
}

/// A change of a folder in flight: [`Dirs::end`] it.
pub struct Change {
    ino: u64,
    turn: u64,
}

impl Dirs {
    /// Shows attributes for `fresh` after they came.
    pub fn new(fresh: Duration) -> Self {
        Dirs {
            dirs: Mutex::default(),
            fresh,
        }
    }

    fn dirs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Dir>> {
        // A panic elsewhere while holding this lock leaves plain data behind: go on with it.
        self.dirs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change of folder `ino` (an entry added or removed, its attributes or xattrs set)
    /// starts: nothing is shown for it until the change ends.
    pub fn begin(&self, ino: u64) -> Change {
        let mut dirs = self.dirs();
        let d = dirs.entry(ino).or_default();
        d.busy += 1;
        d.turn += 1;
        d.shown = None;
        Change { ino, turn: d.turn }
    }

    /// The change ended; `after` is the folder's attributes just after it, if it gave them.
    pub fn end(&self, c: Change, after: Option<Attr>) {
        let mut dirs = self.dirs();
        let Some(d) = dirs.get_mut(&c.ino) else {
            return;
        };
        d.busy = d.busy.saturating_sub(1);
        d.shown = match after {
            Some(a) if d.busy == 0 && d.turn == c.turn && a.ino == c.ino => {
                Some((a, Instant::now()))
            }
            _ => None,
        };
        d.turn += 1;
        if d.busy == 0 && d.shown.is_none() {
            // Nothing in flight and nothing shown: nothing to remember.
            dirs.remove(&c.ino);
        } else if dirs.len() > KEPT_MAX {
            let fresh = self.fresh;
            dirs.retain(|_, d| {
                d.busy > 0 || d.shown.as_ref().is_some_and(|s| s.1.elapsed() < fresh)
            });
        }
    }

    /// Forgets folder `ino`'s attributes (it was removed).
    pub fn forget(&self, ino: u64) {
        let mut dirs = self.dirs();
        if let Some(d) = dirs.get_mut(&ino) {
            d.shown = None;
            d.turn += 1;
            if d.busy == 0 {
                dirs.remove(&ino);
            }
        }
    }

    /// Forgets every folder's attributes (a rename may have changed a folder this mount does
    /// not know it touched: a moved folder's ctime and `..`).
    pub fn forget_all(&self) {
        let mut dirs = self.dirs();
        dirs.retain(|_, d| d.busy > 0);
        for d in dirs.values_mut() {
            d.shown = None;
            d.turn += 1;
        }
    }

    /// Whether a change of folder `ino` by this mount is in flight.
    pub fn changing(&self, ino: u64) -> bool {
        self.dirs().get(&ino).is_some_and(|d| d.busy > 0)
    }

    /// The attributes of folder `ino` as this mount's last create or unlink in it left them,
    /// if nothing else changed it here since and they came less than the TTL ago, with what is
    /// left of the TTL (the kernel keeps them that long, so that they are never shown older).
    pub fn shown(&self, ino: u64) -> Option<(Attr, Duration)> {
        let dirs = self.dirs();
        let d = dirs.get(&ino)?;
        match &d.shown {
            Some((a, at)) if d.busy == 0 => {
                let left = self.fresh.checked_sub(at.elapsed())?;
                (!left.is_zero()).then(|| (a.clone(), left))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The attributes of a folder, for tests.
    pub(crate) fn dir(ino: u64, mtime: i64) -> Attr {
        Attr {
            ino,
            kind: sealfs_meta::Kind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            nlink: 2,
            rdev: 0,
            flags: 0,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            generation: 0,
            volume: 1,
        }
    }

    const FRESH: Duration = Duration::from_secs(60);

    fn shown(d: &Dirs, ino: u64) -> Option<Attr> {
        d.shown(ino).map(|(a, _)| a)
    }

    #[test]
    fn a_create_alone_is_shown_until_the_next_change_starts() {
        let d = Dirs::new(FRESH);
        let c = d.begin(7);
        assert_eq!(shown(&d, 7), None);
        d.end(c, Some(dir(7, 1)));
        assert_eq!(shown(&d, 7).map(|a| a.mtime), Some(1));
        let (_, left) = d.shown(7).unwrap();
        assert!(
            left <= FRESH && left > FRESH / 2,
            "{left:?} of the TTL left"
        );
        let stale = Dirs::new(Duration::from_millis(1));
        let c = stale.begin(7);
        stale.end(c, Some(dir(7, 1)));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(shown(&stale, 7), None, "older than the TTL");
        let c = d.begin(7);
        assert_eq!(shown(&d, 7), None, "a change in flight");
        d.end(c, None);
        assert_eq!(shown(&d, 7), None, "a change that gave nothing");
        assert!(d.dirs().is_empty(), "nothing is kept for an idle folder");
    }

    #[test]
    fn folders_past_the_ttl_are_dropped_once_there_are_many() {
        // A TTL long enough that the last folder is still fresh when the others are swept,
        // however slowly a loaded machine runs the sweep (with 1 ms it was not, once in CI).
        let ttl = Duration::from_millis(300);
        let d = Dirs::new(ttl);
        for ino in 0..KEPT_MAX as u64 {
            let c = d.begin(ino);
            d.end(c, Some(dir(ino, 1)));
        }
        assert_eq!(d.dirs().len(), KEPT_MAX);
        std::thread::sleep(ttl + Duration::from_millis(50));
        let c = d.begin(u64::MAX);
        d.end(c, Some(dir(u64::MAX, 1)));
        assert_eq!(d.dirs().len(), 1, "only the fresh one is left");
    }

    #[test]
    fn overlapping_changes_show_nothing() {
        let d = Dirs::new(FRESH);
        // An unlink starts, a create starts, the unlink ends, the create ends: the create's
        // answer may predate the unlink (the partition's order is not the replies').
        let unlink = d.begin(7);
        let create = d.begin(7);
        d.end(unlink, None);
        d.end(create, Some(dir(7, 2)));
        assert_eq!(shown(&d, 7), None);
        // Two creates: the first to end sees the other in flight, the last started before the
        // first ended.
        let a = d.begin(7);
        let b = d.begin(7);
        d.end(a, Some(dir(7, 3)));
        d.end(b, Some(dir(7, 4)));
        assert_eq!(shown(&d, 7), None);
        // Alone again, it is shown.
        let c = d.begin(7);
        d.end(c, Some(dir(7, 5)));
        assert_eq!(shown(&d, 7).map(|a| a.mtime), Some(5));
        d.forget_all();
        assert_eq!(shown(&d, 7), None);
        // A folder removed is forgotten, and only it; one with a change in flight shows
        // nothing from a change that started before it was forgotten.
        for ino in [7, 8] {
            let c = d.begin(ino);
            d.end(c, Some(dir(ino, 6)));
        }
        let c = d.begin(9);
        assert!(d.changing(9) && !d.changing(8));
        d.forget(7);
        d.forget(9);
        d.end(c, Some(dir(9, 6)));
        assert_eq!(shown(&d, 7), None);
        assert_eq!(shown(&d, 8).map(|a| a.mtime), Some(6));
        assert_eq!(shown(&d, 9), None);
    }

    #[test]
    fn attributes_of_another_inode_are_not_shown_for_this_one() {
        let d = Dirs::new(FRESH);
        let c = d.begin(7);
        d.end(c, Some(dir(8, 1)));
        assert_eq!(shown(&d, 7), None);
    }
}
