//! The one token bucket: the lanes' own budgets, the fleet document's and
//! the simulator's enforced limits all use it.
//!
//! A bucket is a value ([`Bucket`]: tokens at a time) and a [`Shape`]
//! (capacity, refill rate), kept apart so the state can be stored (the
//! fleet document) and the shape recomputed (a learned rate). Tokens refill
//! continuously up to the capacity; a take succeeds or says how long until
//! it would. Times are explicit milliseconds on whatever clock the caller
//! keeps, so the arithmetic is tested without one. A leaf: it uses nothing
//! of the crate.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A bucket's shape: `capacity` tokens, refilled at `per_ms` per millisecond.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub capacity: f64,
    pub per_ms: f64,
}

impl Shape {
    /// A bucket holding a full minute of `limit` per minute (at least one).
    pub fn per_minute(limit: u32) -> Self {
        let capacity = f64::from(limit.max(1));
        Self {
            capacity,
            per_ms: capacity / 60_000.0,
        }
    }

    /// A bucket refilled at `per_min` (at least one) holding `secs` of it
    /// (at least one token).
    pub fn holding(per_min: f64, secs: f64) -> Self {
        let per_min = per_min.max(1.0);
        Self {
            capacity: (per_min / 60.0 * secs).max(1.0),
            per_ms: per_min / 60_000.0,
        }
    }

    /// How long the bucket takes to refill `n` tokens.
    pub fn time_for(&self, n: f64) -> Duration {
        Duration::from_secs_f64((n / self.per_ms / 1000.0).max(0.0))
    }
}

/// A bucket's state: `tokens` available at `at_ms`. Negative tokens are a
/// debt (see [`take`](Self::take)).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    pub tokens: f64,
    pub at_ms: i64,
}

impl Bucket {
    /// A full bucket at `now_ms`.
    pub fn full(shape: Shape, now_ms: i64) -> Self {
        Self {
            tokens: shape.capacity,
            at_ms: now_ms,
        }
    }

    /// The state refilled up to `now_ms` (time never runs backwards here).
    pub fn refilled(self, shape: Shape, now_ms: i64) -> Self {
        let elapsed = (now_ms - self.at_ms).max(0) as f64;
        Self {
            tokens: (self.tokens + elapsed * shape.per_ms).min(shape.capacity),
            at_ms: now_ms.max(self.at_ms),
        }
    }

    /// Take `n` tokens at `now_ms`, or say how long until they are there
    /// (whole milliseconds, at least one). A request larger than the
    /// capacity runs once the bucket is full and leaves it in debt, so the
    /// rate still counts every token.
    pub fn take(self, shape: Shape, n: f64, now_ms: i64) -> Result<Self, Duration> {
        let need_now = n.min(shape.capacity);
        let s = self.refilled(shape, now_ms);
        if s.tokens >= need_now {
            Ok(Self {
                tokens: s.tokens - n,
                ..s
            })
        } else {
            let ms = ((need_now - s.tokens) / shape.per_ms).ceil().max(1.0);
            Err(Duration::from_millis(ms as u64))
        }
    }

    /// Give back `n` unused tokens (never beyond the capacity).
    pub fn refund(self, shape: Shape, n: f64, now_ms: i64) -> Self {
        let s = self.refilled(shape, now_ms);
        Self {
            tokens: (s.tokens + n).min(shape.capacity),
            ..s
        }
    }

    /// How long from `now_ms` until `n` tokens will have come, without
    /// taking them. `n` may exceed the capacity (a caller adding up the
    /// calls queued ahead of one).
    pub fn wait(self, shape: Shape, n: f64, now_ms: i64) -> Duration {
        let have = self.refilled(shape, now_ms).tokens;
        if n > have {
            shape.time_for(n - have)
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_refills_and_refunds_on_explicit_times() {
        let shape = Shape::per_minute(600); // 10 per second
        let s = Bucket::full(shape, 0);
        let s = s.take(shape, 600.0, 0).unwrap();
        assert_eq!(s.tokens, 0.0);
        assert_eq!(
            s.take(shape, 10.0, 0).unwrap_err(),
            Duration::from_millis(1000)
        );
        // Half a second later five tokens are back.
        let s2 = s.take(shape, 5.0, 500).unwrap();
        assert!(s2.tokens.abs() < 1e-9);
        // Refunds never exceed the capacity; time does not run backwards.
        let r = s2.refund(shape, 10_000.0, 400);
        assert_eq!((r.tokens, r.at_ms), (600.0, 500));
        // A refund is there at once.
        let r = s2.refund(shape, 100.0, 500);
        assert!(r.take(shape, 100.0, 500).is_ok());
    }

    #[test]
    fn a_request_larger_than_the_bucket_leaves_a_debt() {
        let burst = Shape::holding(6_000.0, 0.5); // 100 a second, holds 50
        assert_eq!(burst.capacity, 50.0);
        let debt = Bucket::full(burst, 0).take(burst, 150.0, 0).unwrap();
        assert_eq!(debt.tokens, -100.0);
        assert_eq!(
            debt.take(burst, 1.0, 0).unwrap_err(),
            Duration::from_millis(1010)
        );
    }

    #[test]
    fn the_wait_counts_tokens_beyond_the_capacity() {
        let shape = Shape::per_minute(600); // 10 per second
        let s = Bucket::full(shape, 0).take(shape, 600.0, 0).unwrap();
        assert_eq!(s.wait(shape, 100.0, 0), Duration::from_secs(10));
        assert_eq!(s.wait(shape, 100.0, 4_000), Duration::from_secs(6));
        // Twice the capacity: the whole of it, not a full bucket.
        assert_eq!(s.wait(shape, 1_200.0, 0), Duration::from_secs(120));
        assert_eq!(s.wait(shape, 50.0, 5_000), Duration::ZERO);
        assert_eq!(shape.time_for(600.0), Duration::from_secs(60));
        // The state itself is not changed by looking.
        assert_eq!(s.tokens, 0.0);
        let tiny = Shape::holding(0.0, 0.5);
        assert_eq!((tiny.capacity, tiny.per_ms), (1.0, 1.0 / 60_000.0));
    }
}
