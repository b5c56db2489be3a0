//! Log-normal latency tracking: the mean and deviation of log(latency), updated with an
//! exponentially weighted moving average. A request slower than mean + a*deviation is late.

use std::sync::Mutex;
use std::time::Duration;

/// Weight of a new sample.
const ALPHA: f64 = 0.1;

#[derive(Clone, Copy, Debug)]
struct Stats {
    mean: f64,
    var: f64,
    samples: u64,
}

/// Latency distribution of one store or disk.
#[derive(Debug)]
pub struct LatencyTracker {
    stats: Mutex<Stats>,
}

impl Default for LatencyTracker {
    fn default() -> Self {
        LatencyTracker {
            stats: Mutex::new(Stats {
                mean: 0.0,
                var: 0.0,
                samples: 0,
            }),
        }
    }
}

impl LatencyTracker {
    /// Adds one observed latency.
    pub fn record(&self, d: Duration) {
        let x = (d.as_secs_f64().max(1e-6)).ln();
        let mut s = self.stats.lock().expect("latency lock");
        if s.samples == 0 {
            s.mean = x;
            s.var = 0.0;
        } else {
            let diff = x - s.mean;
            s.mean += ALPHA * diff;
            s.var = (1.0 - ALPHA) * (s.var + ALPHA * diff * diff);
        }
        s.samples += 1;
    }

    /// The latency past which a request counts as late: exp(mean + a*deviation), or `default`
    /// before any sample; clamped to `[floor, ceiling]`.
    pub fn late_after(
        &self,
        a: f64,
        default: Duration,
        floor: Duration,
        ceiling: Duration,
    ) -> Duration {
        let s = *self.stats.lock().expect("latency lock");
        let d = if s.samples == 0 {
            default
        } else {
            Duration::from_secs_f64((s.mean + a * s.var.sqrt()).exp())
        };
        d.clamp(floor, ceiling)
    }

    /// Mean and deviation of log(seconds), and the sample count.
    pub fn snapshot(&self) -> (f64, f64, u64) {
        let s = *self.stats.lock().expect("latency lock");
        (s.mean, s.var.sqrt(), s.samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_a_slow_store() {
        let t = LatencyTracker::default();
        let floor = Duration::from_micros(1);
        let ceil = Duration::from_secs(10);
        assert_eq!(
            t.late_after(3.0, Duration::from_millis(50), floor, ceil),
            Duration::from_millis(50)
        );
        for i in 0..200 {
            t.record(Duration::from_micros(100 + (i % 7) * 10));
        }
        let fast = t.late_after(3.0, Duration::from_millis(50), floor, ceil);
        assert!(fast < Duration::from_millis(1), "{fast:?}");
        for _ in 0..200 {
            t.record(Duration::from_millis(20));
        }
        let slow = t.late_after(3.0, Duration::from_millis(50), floor, ceil);
        assert!(slow > Duration::from_millis(15), "{slow:?}");
    }
}
