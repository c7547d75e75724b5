//! The synthetic workload. Real edge apps (a camera detector, say) process work continuously, so
//! the health metrics must not depend on someone sending traffic: a worker thread processes one
//! "frame" every interval, and each `/work` request is processed the same way. Both feed one
//! metrics window.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::metrics::{Snapshot, Window};

/// What a healthy item costs. Non-zero so that p95 is never a meaningless 0 and latency knobs
/// add to something real.
pub const BASE_LATENCY: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Failed,
}

#[derive(Debug)]
pub struct Workload {
    /// `BASE_LATENCY` plus the `--latency-ms` knob.
    latency: Duration,
    /// The `--error-rate` knob, 0..=1.
    error_rate: f64,
    /// Pause between frames (`--work-interval-ms`).
    interval: Duration,
    /// One generator for frames and requests: with a fixed seed the sequence of draws, and so
    /// the worker's failures when nobody sends traffic, repeat from run to run.
    rng: Mutex<SplitMix64>,
    window: Mutex<Window>,
    /// When the worker last finished a frame; `/health` reports a stalled worker from it.
    last_frame: Mutex<Instant>,
}

impl Workload {
    pub fn new(
        extra_latency: Duration,
        error_rate: f64,
        seed: u64,
        interval: Duration,
        now: Instant,
    ) -> Self {
        Workload {
            latency: BASE_LATENCY + extra_latency,
            error_rate,
            interval,
            rng: Mutex::new(SplitMix64(seed)),
            window: Mutex::new(Window::default()),
            last_frame: Mutex::new(now),
        }
    }

    /// Processes one item: takes the configured latency, fails with the configured probability,
    /// and records its measured wall time and outcome.
    pub fn process(&self) -> Outcome {
        let start = Instant::now();
        // Design: the "work" is a sleep. It makes latency exact without burning the shared CPU
        // of a small device (or of a test machine running many instances).
        thread::sleep(self.latency);
        let failed = lock(&self.rng).next_f64() < self.error_rate;
        let end = Instant::now();
        lock(&self.window).record(end, end.saturating_duration_since(start), !failed);
        if failed {
            Outcome::Failed
        } else {
            Outcome::Done
        }
    }

    /// Starts the frame worker: one item, then a pause of `interval`, forever.
    pub fn spawn_worker(self: &Arc<Self>) -> io::Result<()> {
        let this = Arc::clone(self);
        thread::Builder::new()
            .name("worker".into())
            .spawn(move || {
                loop {
                    this.process();
                    *lock(&this.last_frame) = Instant::now();
                    thread::sleep(this.interval);
                }
            })
            .map(drop)
    }

    pub fn snapshot(&self, now: Instant) -> Snapshot {
        lock(&self.window).snapshot(now)
    }

    pub fn since_last_frame(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*lock(&self.last_frame))
    }

    /// How long without a finished frame means the worker is stuck: ten frame periods, and never
    /// under 5 s, so a slow-but-working worker (large `--latency-ms`) or a scheduler hiccup on a
    /// loaded device does not read as dead.
    pub fn stall_bound(&self) -> Duration {
        ((self.interval + self.latency) * 10).max(Duration::from_secs(5))
    }
}

/// Locks ignoring poison: every critical section here leaves its data consistent (a counter, a
/// queue push, a generator step), so a panic elsewhere must not take the health endpoint down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and fine with any seed including 0, which
/// xorshift is not.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1): the top 53 bits, the precision of an f64.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // First outputs of the reference implementation for seed 0.
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn failure_fraction_follows_the_rate() {
        for rate in [0.0, 0.05, 0.3, 0.9, 1.0] {
            let mut rng = SplitMix64(7);
            let n = 100_000;
            let failed = (0..n).filter(|_| rng.next_f64() < rate).count();
            let got = failed as f64 / n as f64;
            assert!((got - rate).abs() < 0.01, "rate {rate}: got {got}");
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn stall_bound_scales_with_the_frame_period() {
        let cases = [(ms(50), ms(0), ms(5000)), (ms(50), ms(998), ms(10_500))];
        for (interval, extra, want) in cases {
            let w = Workload::new(extra, 0.0, 1, interval, Instant::now());
            assert_eq!(
                w.stall_bound(),
                want,
                "interval {interval:?}, latency {extra:?}"
            );
        }
    }

    #[test]
    fn process_records_latency_and_outcome() {
        let always = Workload::new(ms(5), 1.0, 1, ms(50), Instant::now());
        assert_eq!(always.process(), Outcome::Failed);
        let s = always.snapshot(Instant::now());
        assert_eq!((s.requests, s.failed, s.error_rate), (1, 1, 1.0));
        assert!(
            s.p95_ms >= 7.0,
            "p95 {} below base + extra latency",
            s.p95_ms
        );

        let never = Workload::new(Duration::ZERO, 0.0, 1, ms(50), Instant::now());
        assert_eq!(never.process(), Outcome::Done);
        assert_eq!(never.snapshot(Instant::now()).error_rate, 0.0);
    }
}
