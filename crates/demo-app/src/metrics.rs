//! The sliding window behind `/health`'s metrics: error rate and p95 latency over the work items
//! (frames and `/work` requests) that finished in the last 30 seconds, plus running totals of
//! items and failed items since start.
//!
//! Design: the totals are what a reader that looks every few seconds needs. Two readings'
//! differences give the error rate of exactly the items finished between them; the window's
//! rate cannot, because consecutive windows overlap (a failure stays in 30 s of readings) and,
//! while the process is younger than the window, it is the rate since start.
//!
//! Time is passed in, never read here, so the tests drive it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How far back error rate and p95 look. Long enough for a stable p95 from the worker alone
/// (600 frames at the default 50 ms interval), short enough that a fault shows within a soak.
pub const WINDOW: Duration = Duration::from_secs(30);

/// Bounds memory when `/work` is hammered: beyond this, the oldest samples are dropped early,
/// so the window is "the last 30 s, or the last 4096 items if that is shorter".
pub const MAX_SAMPLES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Sample {
    finished: Instant,
    took: Duration,
    ok: bool,
}

#[derive(Debug, Default)]
pub struct Window {
    samples: VecDeque<Sample>,
    /// Every item since start, including those that have left the window.
    total: u64,
    /// Every failed item since start.
    failed: u64,
}

/// What `/health` reports, computed over the window at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Failed items / items in the window, 0..=1; 0 when the window is empty.
    pub error_rate: f64,
    /// 95th percentile of wall time (nearest rank) in milliseconds; 0 when the window is empty.
    pub p95_ms: f64,
    /// Items since start.
    pub requests: u64,
    /// Failed items since start: `failed / requests` between two readings is the error rate of
    /// the items finished between them.
    pub failed: u64,
    /// Items in the window: how much evidence `error_rate` and `p95_ms` rest on.
    pub in_window: usize,
}

impl Window {
    pub fn record(&mut self, finished: Instant, took: Duration, ok: bool) {
        self.total += 1;
        self.failed += u64::from(!ok);
        self.samples.push_back(Sample { finished, took, ok });
        while self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
        }
    }

    pub fn snapshot(&mut self, now: Instant) -> Snapshot {
        // Samples arrive in finishing order, so the expired ones are at the front.
        while self
            .samples
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.finished) > WINDOW)
        {
            self.samples.pop_front();
        }
        let n = self.samples.len();
        if n == 0 {
            return Snapshot {
                error_rate: 0.0,
                p95_ms: 0.0,
                requests: self.total,
                failed: self.failed,
                in_window: 0,
            };
        }
        let failed = self.samples.iter().filter(|s| !s.ok).count();
        let mut took: Vec<Duration> = self.samples.iter().map(|s| s.took).collect();
        took.sort_unstable();
        // Nearest rank: the smallest value with at least 95 % of the samples at or below it.
        let rank = (n * 95).div_ceil(100);
        let p95 = took[rank.saturating_sub(1)];
        Snapshot {
            error_rate: failed as f64 / n as f64,
            p95_ms: p95.as_secs_f64() * 1000.0,
            requests: self.total,
            failed: self.failed,
            in_window: n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Records `(finished_at_ms, took_ms, ok)` samples and snapshots at `now_ms`.
    fn check(samples: &[(u64, u64, bool)], now_ms: u64) -> Snapshot {
        let t0 = Instant::now();
        let mut w = Window::default();
        for &(at, took, ok) in samples {
            w.record(t0 + ms(at), ms(took), ok);
        }
        w.snapshot(t0 + ms(now_ms))
    }

    fn snap(
        error_rate: f64,
        p95_ms: f64,
        (requests, failed): (u64, u64),
        in_window: usize,
    ) -> Snapshot {
        Snapshot {
            error_rate,
            p95_ms,
            requests,
            failed,
            in_window,
        }
    }

    #[test]
    fn snapshots() {
        type Samples = Vec<(u64, u64, bool)>;
        let twenty_ok: Samples = (1..=20).map(|i| (i, i, true)).collect();
        // (what, samples as (finished at ms, took ms, ok), now ms, expected)
        #[rustfmt::skip]
        let cases: Vec<(&str, Samples, u64, Snapshot)> = vec![
            ("empty window reports zeros", vec![], 0, snap(0.0, 0.0, (0, 0), 0)),
            ("one sample is its own p95", vec![(0, 7, true)], 10, snap(0.0, 7.0, (1, 0), 1)),
            ("p95 of 1..=20 ms is 19 (nearest rank 19 of 20)", twenty_ok, 100, snap(0.0, 19.0, (20, 0), 20)),
            (
                "error rate is the failed fraction",
                vec![(0, 1, false), (1, 1, true), (2, 1, true), (3, 1, false)], 10,
                snap(0.5, 1.0, (4, 2), 4),
            ),
            (
                "samples older than the window leave it but stay counted",
                vec![(0, 500, false), (40_000, 3, true)], 45_000,
                snap(0.0, 3.0, (2, 1), 1),
            ),
            ("a sample one window old is still in", vec![(0, 2, false)], 30_000, snap(1.0, 2.0, (1, 1), 1)),
        ];
        for (name, samples, now, want) in cases {
            assert_eq!(check(&samples, now), want, "{name}");
        }
    }

    #[test]
    fn window_is_bounded_by_count() {
        let t0 = Instant::now();
        let mut w = Window::default();
        // The first 100 samples fail, the rest succeed; only the newest MAX_SAMPLES stay.
        for i in 0..(MAX_SAMPLES + 100) {
            w.record(t0, ms(1), i >= 100);
        }
        let s = w.snapshot(t0);
        assert_eq!(s.in_window, MAX_SAMPLES);
        assert_eq!(s.requests, (MAX_SAMPLES + 100) as u64);
        assert_eq!(s.failed, 100, "the totals outlive the bound");
        assert_eq!(s.error_rate, 0.0);
    }

    /// Readings every 0.5 s of a process younger than the window, one failure in its 10th
    /// second: the window's rate is the rate since start (it spreads the failure over every
    /// later reading), the totals' differences put it in the one interval it happened in.
    #[test]
    fn totals_give_the_error_rate_between_two_readings() {
        let t0 = Instant::now();
        let mut w = Window::default();
        let mut readings = Vec::new();
        for i in 0..400u64 {
            // A frame every 50 ms; the 200th fails.
            w.record(t0 + ms(i * 50), ms(2), i != 199);
            if i % 10 == 9 {
                readings.push(w.snapshot(t0 + ms(i * 50)));
            }
        }
        let between: Vec<f64> = readings
            .windows(2)
            .map(|p| (p[1].failed - p[0].failed) as f64 / (p[1].requests - p[0].requests) as f64)
            .collect();
        assert_eq!(between.iter().filter(|&&e| e > 0.0).count(), 1);
        assert_eq!(between[18], 0.1, "the interval of frames 190..=199");
        let spread = readings.iter().filter(|s| s.error_rate > 0.0).count();
        assert_eq!(spread, 21, "the window keeps it in every later reading");
        let last = readings.last().unwrap();
        assert_eq!((last.requests, last.failed, last.in_window), (400, 1, 400));
    }
}
