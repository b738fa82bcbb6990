//! How busy the port's task is: the share of wall time it spends working (handling datagrams,
//! commands and timers, and sending) rather than waiting, over the last fraction of a second.
//!
//! The port refuses new participants while this is above its limit
//! ([`super::PortConfig::overload_busy`]): a task that cannot keep up answers consent checks
//! late, and a listener whose checks go unanswered for 30 s is let go. Refusing the newcomer
//! with a clear error is better than losing participants who are already in.
//!
//! Pure: time is a parameter, so the meter is tested in virtual time.

use std::time::{Duration, Instant};

/// Each window's busy share is folded into the estimate when the window ends.
const WINDOW: Duration = Duration::from_millis(250);

/// Busy time per window, smoothed over windows.
#[derive(Debug, Clone)]
pub(crate) struct LoadMeter {
    window_start: Instant,
    busy_in_window: Duration,
    /// Smoothed busy share of the windows that ended, 0..=1.
    estimate: f64,
}

impl LoadMeter {
    /// A meter that starts idle at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        LoadMeter {
            window_start: now,
            busy_in_window: Duration::ZERO,
            estimate: 0.0,
        }
    }

    /// The task worked for `busy`, ending at `now`. Returns the new estimate when a window
    /// ended (to be published), `None` otherwise.
    pub(crate) fn record(&mut self, busy: Duration, now: Instant) -> Option<f64> {
        self.busy_in_window += busy;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < WINDOW {
            return None;
        }
        // The work since the window began, over the time since it began: one long piece of work
        // may span several windows, and counts once.
        let share = (self.busy_in_window.as_secs_f64() / elapsed.as_secs_f64()).min(1.0);
        self.estimate = 0.5 * self.estimate + 0.5 * share;
        self.window_start = now;
        self.busy_in_window = Duration::ZERO;
        Some(self.estimate)
    }

    /// The estimate as of `now`, counting windows that passed with no work as idle: what
    /// `MediaPort::busy` reads from the published value.
    #[cfg(test)]
    pub(crate) fn estimate_at(&self, now: Instant) -> f64 {
        decay(
            self.estimate,
            now.saturating_duration_since(self.window_start),
        )
    }
}

/// `estimate` after `idle` without work: each whole [`WINDOW`] of it halves the estimate.
pub(crate) fn decay(estimate: f64, idle: Duration) -> f64 {
    let idle_windows = idle.as_secs_f64() / WINDOW.as_secs_f64();
    if idle_windows < 1.0 {
        estimate
    } else {
        estimate * 0.5f64.powf(idle_windows.floor())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a meter with `busy` out of every `period` for `total`; returns the last estimate.
    fn drive(
        meter: &mut LoadMeter,
        start: Instant,
        busy: Duration,
        period: Duration,
        total: Duration,
    ) -> Instant {
        let mut now = start;
        while now < start + total {
            now += period;
            meter.record(busy, now);
        }
        now
    }

    #[test]
    fn a_steady_share_of_work_is_what_it_reads() {
        let t0 = Instant::now();
        let mut meter = LoadMeter::new(t0);
        let now = drive(
            &mut meter,
            t0,
            Duration::from_millis(6),
            Duration::from_millis(20),
            Duration::from_secs(3),
        );
        let e = meter.estimate_at(now);
        assert!((e - 0.3).abs() < 0.02, "{e}");
    }

    #[test]
    fn saturation_reads_full_and_an_idle_task_decays() {
        let t0 = Instant::now();
        let mut meter = LoadMeter::new(t0);
        let now = drive(
            &mut meter,
            t0,
            Duration::from_millis(20),
            Duration::from_millis(20),
            Duration::from_secs(2),
        );
        assert!(meter.estimate_at(now) > 0.99);
        // No wake-up for a second: four windows idle halve it four times.
        let later = now + Duration::from_secs(1);
        assert!(
            meter.estimate_at(later) < 0.07,
            "{}",
            meter.estimate_at(later)
        );
        // Work resumes lightly: the estimate follows within a few windows.
        let after = drive(
            &mut meter,
            later,
            Duration::from_millis(1),
            Duration::from_millis(20),
            Duration::from_secs(2),
        );
        assert!(meter.estimate_at(after) < 0.1);
    }

    #[test]
    fn one_long_piece_of_work_counts_once() {
        let t0 = Instant::now();
        let mut meter = LoadMeter::new(t0);
        // 600 ms of work reported at once, after 600 ms: the task was busy all that time.
        let e = meter.record(Duration::from_millis(600), t0 + Duration::from_millis(600));
        assert_eq!(e, Some(0.5));
        // Busy time never reads above the time that passed.
        let e = meter.record(Duration::from_secs(5), t0 + Duration::from_millis(900));
        assert_eq!(e, Some(0.75));
    }
}
