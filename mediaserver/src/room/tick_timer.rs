//! The room task's wake-up for its mixing tick, to the tens of microseconds.
//!
//! Tokio's timer wheel has millisecond granularity and rounds a deadline up to its next
//! millisecond, so a tick slept for with `tokio::time::sleep_until` fires 0.5–1.5 ms after it was
//! due (measured: 0.7–1.5 ms on average under the delay bench). Every frame of every talker waits
//! that long on top of the tick's margin, so it is server-added delay that buys nothing. A Linux
//! `timerfd` registered with Tokio's reactor wakes the task when the kernel's high-resolution
//! timer fires, so the margin the tick keeps can shrink by the same amount (see
//! `room::task::tick_limits`).
//!
//! Built on `nix`'s safe `timerfd` wrapper and Tokio's `AsyncFd`; where no timerfd can be made
//! (not Linux, or out of descriptors) it falls back to Tokio's sleep, and [`TickTimer::precise`]
//! says which one runs.
//!
//! Invariant: [`TickTimer::wait`] returns no earlier than the deadline last [`TickTimer::reset`]
//! set; a deadline in the past returns at once.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;

/// A one-shot timer for the room's next tick.
#[derive(Debug)]
pub(super) struct TickTimer {
    deadline: Instant,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Fd(AsyncFd<Fd>),
    Sleep,
}

/// `AsyncFd` needs `AsRawFd`, which nix's `TimerFd` provides only through `AsFd`.
#[derive(Debug)]
struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl TickTimer {
    /// A timer due at `deadline`. Must be called inside a Tokio runtime with IO enabled.
    pub(super) fn new(deadline: Instant) -> Self {
        let kind = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .ok()
        // `AsyncFd::new` is deprecated for types whose `AsRawFd` might hand out a descriptor they
        // do not own (tokio#8587); `Fd` owns its timerfd for as long as the `AsyncFd` holds it,
        // which is the condition the unsafe `register` asks for, and this crate forbids unsafe.
        .and_then(|fd| {
            #[allow(deprecated)]
            AsyncFd::new(Fd(fd)).ok()
        })
        .map_or(Kind::Sleep, Kind::Fd);
        let mut timer = Self { deadline, kind };
        timer.reset(deadline);
        timer
    }

    /// Whether the kernel's high-resolution timer drives this one (not Tokio's wheel).
    pub(super) fn precise(&self) -> bool {
        matches!(self.kind, Kind::Fd(_))
    }

    /// Due at `deadline` from now on (instead of the deadline before).
    pub(super) fn reset(&mut self, deadline: Instant) {
        self.deadline = deadline;
        if let Kind::Fd(fd) = &self.kind {
            // A zero one-shot would disarm the timer, so a deadline now or past is 1 ns away.
            let after = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_nanos(1));
            if fd
                .get_ref()
                .0
                .set(
                    Expiration::OneShot(TimeSpec::from_duration(after)),
                    TimerSetTimeFlags::empty(),
                )
                .is_err()
            {
                // Cannot happen for a valid timerfd and a positive time; if it does, the wheel
                // still ticks the room.
                self.kind = Kind::Sleep;
            }
        }
    }

    /// Waits until the deadline. Cancel-safe: dropped before it returns, the timer stays armed.
    pub(super) async fn wait(&mut self) {
        if let Kind::Fd(fd) = &self.kind {
            loop {
                let Ok(mut guard) = fd.readable().await else {
                    break;
                };
                // The expiry count is read and discarded: one tick at a time, as with sleep.
                match guard.try_io(|inner| {
                    match nix::unistd::read(&inner.get_ref().0, &mut [0u8; 8]) {
                        Ok(_) => Ok(()),
                        Err(Errno::EAGAIN) => Err(std::io::ErrorKind::WouldBlock.into()),
                        Err(e) => Err(std::io::Error::from(e)),
                    }
                }) {
                    Ok(Ok(())) => return,
                    Ok(Err(_)) => break,
                    Err(_would_block) => {}
                }
            }
            // The descriptor failed: fall back to the wheel for good.
            self.kind = Kind::Sleep;
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(self.deadline)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_after_the_deadline_and_again_when_reset() {
        let start = Instant::now();
        let mut timer = TickTimer::new(start + Duration::from_millis(3));
        timer.wait().await;
        assert!(start.elapsed() >= Duration::from_millis(3));
        let again = Instant::now() + Duration::from_micros(2500);
        timer.reset(again);
        timer.wait().await;
        assert!(Instant::now() >= again);
        // A deadline in the past is due at once.
        timer.reset(start);
        tokio::time::timeout(Duration::from_secs(1), timer.wait())
            .await
            .expect("a past deadline is due at once");
    }

    #[tokio::test]
    async fn a_wait_cancelled_by_a_reset_keeps_the_new_deadline() {
        let mut timer = TickTimer::new(Instant::now() + Duration::from_secs(60));
        assert!(
            tokio::time::timeout(Duration::from_millis(5), timer.wait())
                .await
                .is_err()
        );
        let soon = Instant::now() + Duration::from_millis(2);
        timer.reset(soon);
        timer.wait().await;
        assert!(Instant::now() >= soon);
    }
}
