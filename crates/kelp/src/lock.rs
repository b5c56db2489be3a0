//! Stipe-range locks, granted in arrival order among overlapping ranges.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug)]
struct Entry {
    ticket: u64,
    start: u32,
    end: u32,
    held: bool,
}

#[derive(Default, Debug)]
struct Table {
    next: u64,
    entries: Vec<Entry>,
}

/// A table of locked stipe ranges `[start, end]` of one blade.
#[derive(Default, Debug)]
pub struct RangeLocks {
    table: Mutex<Table>,
    changed: Notify,
}

/// A place in line for a range; `acquire` waits for it.
pub struct Ticket {
    locks: Arc<RangeLocks>,
    ticket: u64,
    /// Still owns its table entry (not yet turned into a guard).
    armed: bool,
}

/// A held range; released on drop.
pub struct RangeGuard {
    locks: Arc<RangeLocks>,
    ticket: u64,
}

impl RangeLocks {
    /// Takes a place in line for stipes `[start, end]` (inclusive). Overlapping ranges are
    /// granted in the order their tickets were taken.
    pub fn enqueue(self: &Arc<Self>, start: u32, end: u32) -> Ticket {
        assert!(start <= end);
        let mut t = self.table.lock().expect("lock table");
        let ticket = t.next;
        t.next += 1;
        t.entries.push(Entry {
            ticket,
            start,
            end,
            held: false,
        });
        Ticket {
            locks: self.clone(),
            ticket,
            armed: true,
        }
    }

    /// Locks `[start, end]`, waiting behind earlier overlapping requests.
    pub async fn lock(self: &Arc<Self>, start: u32, end: u32) -> RangeGuard {
        self.enqueue(start, end).acquire().await
    }

    /// Waits until no range overlapping `[start, end]` is held or waiting.
    pub async fn wait_free(&self, start: u32, end: u32) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let busy = {
                let t = self.table.lock().expect("lock table");
                t.entries.iter().any(|o| o.start <= end && start <= o.end)
            };
            if !busy {
                return;
            }
            notified.await;
        }
    }

    /// Ranges held or waiting.
    pub fn len(&self) -> usize {
        self.table.lock().expect("lock table").entries.len()
    }

    /// No range is held or waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn try_take(&self, ticket: u64) -> bool {
        let mut t = self.table.lock().expect("lock table");
        let pos = t
            .entries
            .iter()
            .position(|e| e.ticket == ticket)
            .expect("ticket in table");
        let (s, e) = (t.entries[pos].start, t.entries[pos].end);
        let blocked = t.entries[..pos].iter().any(|o| o.start <= e && s <= o.end);
        if !blocked {
            t.entries[pos].held = true;
        }
        !blocked
    }

    fn remove(&self, ticket: u64) {
        let mut t = self.table.lock().expect("lock table");
        t.entries.retain(|e| e.ticket != ticket);
        drop(t);
        self.changed.notify_waiters();
    }
}

impl Ticket {
    /// Waits until the range is granted.
    pub async fn acquire(mut self) -> RangeGuard {
        self.armed = false;
        let locks = self.locks.clone();
        let guard = RangeGuard {
            locks: locks.clone(),
            ticket: self.ticket,
        };
        drop(self);
        loop {
            let notified = locks.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if guard.locks.try_take(guard.ticket) {
                return guard;
            }
            notified.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.armed {
            self.locks.remove(self.ticket);
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.locks.remove(self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_in_order() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.lock(0, 10).await;
        let t_b = locks.enqueue(5, 6);
        let t_c = locks.enqueue(20, 30);
        let c = tokio::time::timeout(Duration::from_secs(1), t_c.acquire())
            .await
            .expect("disjoint range granted");
        let b = tokio::spawn(t_b.acquire());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!b.is_finished(), "overlapping range must wait");
        drop(a);
        let b = tokio::time::timeout(Duration::from_secs(1), b)
            .await
            .expect("granted after release")
            .unwrap();
        drop((b, c));
        assert!(locks.is_empty());
    }
}
