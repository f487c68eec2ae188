//! Settings of the bus: retry policies, the unknown-event policy and the clock.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// How a subscription retries a failed delivery: exponential backoff with jitter.
///
/// The delay before attempt `n + 1` (after `n` failures) is `base * 2^(n-1)`, capped at
/// `cap`. With jitter (the default) the delay is drawn uniformly from its upper half, so
/// handlers failing together do not retry in lockstep; it is never below half the nominal
/// delay. After `max_attempts` attempts the event goes to the dead letters.
///
/// [`RetryPolicy::default()`], what a subscription uses unless told otherwise, is
/// `exponential(3, 100 ms, 10 s)` with jitter: 3 attempts in all, the second 50–100 ms
/// after the first fails, the third 100–200 ms after the second (nominal delays 100 ms
/// and 200 ms), then the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    base: Duration,
    cap: Duration,
    jitter: bool,
}

impl Default for RetryPolicy {
    /// `exponential(3, Duration::from_millis(100), Duration::from_secs(10))`, with jitter:
    /// three attempts in all, the retries 100 ms then 200 ms (nominal; with jitter 50–100 ms
    /// and 100–200 ms) after the failure before them; the 10 s cap is never reached with
    /// three attempts.
    fn default() -> Self {
        RetryPolicy::exponential(3, Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl RetryPolicy {
    /// `max_attempts` attempts in all (at least 1), the delays doubling from `base` up to
    /// `cap`.
    pub fn exponential(max_attempts: u32, base: Duration, cap: Duration) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            base,
            cap: cap.max(base),
            jitter: true,
        }
    }

    /// One attempt: a failure goes straight to the dead letters.
    pub fn never() -> Self {
        RetryPolicy::exponential(1, Duration::ZERO, Duration::ZERO)
    }

    /// The same policy with exact delays (no jitter), for tests and for handlers that
    /// benefit from a fixed schedule.
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// How many attempts in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The nominal delay after `failures` failed attempts (1 or more), before jitter.
    pub fn nominal_delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(32);
        self.base
            .checked_mul(1u32 << doublings.min(31))
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The delay after `failures` failed attempts; `random` picks the jitter.
    pub(crate) fn delay(&self, failures: u32, random: u64) -> Duration {
        let nominal = self.nominal_delay(failures);
        if !self.jitter || nominal.is_zero() {
            return nominal;
        }
        let half = nominal / 2;
        let spread = (nominal - half).as_nanos() as u64;
        half + Duration::from_nanos(random % (spread + 1))
    }
}

/// What a durable subscription does with a stored event of its aggregate type whose event
/// type no code in this program registers (written by a newer program, say).
///
/// A subscription "would receive" such an event when its aggregate type is the one of the
/// subscription's event type: it cannot be decoded, so it cannot be delivered, and it is
/// never skipped in silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnknownEventPolicy {
    /// Dead-letter it at once with the decoding error (the default): it stays visible in
    /// [`EventBus::dead_letters`](crate::EventBus::dead_letters), and a program that
    /// registers the type can replay it.
    #[default]
    DeadLetter,
    /// Pass over it; the subscription's checkpoint moves past it, and
    /// [`SubscriptionStatistics::skipped`](crate::SubscriptionStatistics::skipped)
    /// counts it.
    Skip,
}

/// Where the bus reads the time it stamps on dead letters and failure records. Backoff
/// itself waits on tokio's clock, which tests pause and advance.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A small xorshift generator for jitter: no dependency, and seedable for tests.
#[derive(Debug, Clone)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new(seed: u64) -> Self {
        Jitter(seed | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let policy =
            RetryPolicy::exponential(10, Duration::from_millis(100), Duration::from_secs(1))
                .without_jitter();
        let delays: Vec<_> = (1..=6).map(|n| policy.delay(n, 0).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.delay(1_000, 0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_the_upper_half_of_the_nominal_delay() {
        let policy =
            RetryPolicy::exponential(5, Duration::from_millis(100), Duration::from_secs(1));
        let mut rng = Jitter::new(42);
        for failures in 1..=4 {
            let nominal = policy.nominal_delay(failures);
            for _ in 0..1000 {
                let d = policy.delay(failures, rng.next());
                assert!(
                    d >= nominal / 2 && d <= nominal,
                    "{d:?} outside {nominal:?}"
                );
            }
        }
    }

    #[test]
    fn the_default_policy_is_what_its_documentation_says() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.max_attempts(), 3);
        assert_eq!(policy.nominal_delay(1), Duration::from_millis(100));
        assert_eq!(policy.nominal_delay(2), Duration::from_millis(200));
        assert_eq!(
            policy,
            RetryPolicy::exponential(3, Duration::from_millis(100), Duration::from_secs(10))
        );
        let mut rng = Jitter::new(7);
        for _ in 0..1000 {
            let d = policy.delay(1, rng.next());
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100));
        }
    }

    #[test]
    fn at_least_one_attempt() {
        assert_eq!(
            RetryPolicy::exponential(0, Duration::ZERO, Duration::ZERO).max_attempts(),
            1
        );
        assert_eq!(RetryPolicy::never().max_attempts(), 1);
    }
}
