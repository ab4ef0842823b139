//! Per-process limits of one provider lane: requests per minute (governor),
//! tokens per minute (our own bucket, because reservations of `max_tokens`
//! must be refunded once the real usage is known, which governor cannot do),
//! a concurrency cap, and a pause the provider can impose ("exhausted until T").
//! Uses tokio's clock so tests can drive time.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// A token bucket that allows refunds. `capacity` tokens, refilled
/// continuously at `capacity` per minute.
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn per_minute(capacity: u32) -> Self {
        let capacity = f64::from(capacity.max(1));
        Self {
            capacity,
            per_sec: capacity / 60.0,
            state: Mutex::new((capacity, Instant::now())),
        }
    }

    /// Take `n` tokens now, or say how long until they are there. Requests
    /// larger than the capacity are clamped to it, so they can still run.
    pub fn try_take(&self, n: u64) -> Result<(), Duration> {
        let n = (n as f64).min(self.capacity);
        let mut s = self.state.lock().expect("bucket lock");
        let now = Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.per_sec).min(self.capacity);
        s.1 = now;
        if s.0 >= n {
            s.0 -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n - s.0) / self.per_sec))
        }
    }

    /// Wait until `n` tokens are available and take them.
    pub async fn take(&self, n: u64) {
        while let Err(wait) = self.try_take(n) {
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }

    /// How long until `n` tokens would be available (without taking them).
    /// `n` may exceed the capacity (tokens queued ahead count too).
    pub fn wait_for(&self, n: u64) -> Duration {
        let n = n as f64;
        let have = self.available();
        if have >= n {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((n - have) / self.per_sec)
        }
    }

    /// Give back tokens reserved but not used.
    pub fn refund(&self, n: u64) {
        let mut s = self.state.lock().expect("bucket lock");
        s.0 = (s.0 + n as f64).min(self.capacity);
    }

    pub fn available(&self) -> f64 {
        let s = self.state.lock().expect("bucket lock");
        (s.0 + Instant::now().duration_since(s.1).as_secs_f64() * self.per_sec).min(self.capacity)
    }
}

/// All limits of one lane.
/// The lane's share of fleet-wide budgets (KV buckets every process shares).
pub struct FleetLimits {
    pub rpm: crate::fleet::FleetBucket,
    pub tpm: crate::fleet::FleetBucket,
    pub pause: crate::fleet::FleetPause,
}

impl FleetLimits {
    /// Buckets for `provider` holding half a second's worth of requests and
    /// of tokens (so a provider that allows a second's worth absorbs the
    /// jitter between our grant and its arrival), refilled at the per-minute
    /// limits. Steady-state throughput is the full limit; only bursts are cut.
    pub fn new(
        store: async_nats::jetstream::kv::Store,
        provider: &str,
        rpm: u32,
        tpm: u32,
    ) -> Self {
        use crate::fleet::{FleetBucket, Shape};
        let shape = |limit: u32, secs: f64| Shape {
            capacity: (f64::from(limit) / 60.0 * secs).max(1.0),
            per_ms: f64::from(limit.max(1)) / 60_000.0,
        };
        Self {
            pause: crate::fleet::FleetPause::new(store.clone(), &format!("{provider}.pause")),
            rpm: FleetBucket::new(store.clone(), &format!("{provider}.rpm"), shape(rpm, 0.5)),
            tpm: FleetBucket::new(store, &format!("{provider}.tpm"), shape(tpm, 0.5)),
        }
    }
}

/// Take from a fleet bucket, waiting (fail closed) while the KV is unreachable.
async fn take_fleet(b: &crate::fleet::FleetBucket, n: f64) {
    loop {
        match b.take(n).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "fleet limiter unreachable; not sending until it is back");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

pub struct LaneLimiter {
    rpm: DefaultDirectRateLimiter,
    tpm: TokenBucket,
    input_tpm: Option<TokenBucket>,
    output_tpm: Option<TokenBucket>,
    concurrency: Arc<Semaphore>,
    paused_until: Mutex<Option<Instant>>,
    fleet: Option<FleetLimits>,
    /// Tokens claimed by calls that have not taken them from `tpm` yet, so
    /// the wait a new call would face counts the calls queued before it.
    pending: Mutex<u64>,
}

/// Held while a call is in flight: the concurrency slot and the token reservation.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    /// Input tokens reserved (the estimate).
    pub reserved_input: u64,
    /// Output tokens reserved (`max_tokens`).
    pub reserved_output: u64,
}

impl LaneLimiter {
    pub fn new(
        rpm: u32,
        tpm: u32,
        input_tpm: Option<u32>,
        output_tpm: Option<u32>,
        max_concurrency: usize,
    ) -> Self {
        let rpm = NonZeroU32::new(rpm.max(1)).expect("non-zero");
        // Allow a burst of a tenth of a minute's requests, at least one.
        let burst = NonZeroU32::new((rpm.get() / 10).max(1)).expect("non-zero");
        Self {
            rpm: RateLimiter::direct(Quota::per_minute(rpm).allow_burst(burst)),
            tpm: TokenBucket::per_minute(tpm),
            input_tpm: input_tpm.map(TokenBucket::per_minute),
            output_tpm: output_tpm.map(TokenBucket::per_minute),
            concurrency: Arc::new(Semaphore::new(max_concurrency.max(1))),
            paused_until: Mutex::new(None),
            fleet: None,
            pending: Mutex::new(0),
        }
    }

    /// Also hold the fleet-wide budgets.
    pub fn with_fleet(mut self, fleet: FleetLimits) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// Stop sending until `now + d` (a provider said its budget is exhausted).
    pub fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d;
        {
            let mut p = self.paused_until.lock().expect("pause lock");
            if p.is_none_or(|cur| cur < until) {
                *p = Some(until);
            }
        }
        if let Some(f) = &self.fleet {
            let pause = f.pause.clone();
            let until_ms = crate::bus::now_ms() + d.as_millis() as i64;
            tokio::spawn(async move {
                if let Err(e) = pause.extend(until_ms).await {
                    tracing::warn!(error = %format!("{e:#}"), "could not share a provider pause with the fleet");
                }
            });
        }
    }

    /// When the current pause ends, if any.
    pub fn paused_until(&self) -> Option<Instant> {
        let p = *self.paused_until.lock().expect("pause lock");
        p.filter(|t| *t > Instant::now())
    }

    /// How long a call reserving `input` + `output` tokens would wait now for
    /// the provider's pause and the token budgets, behind the calls already
    /// claimed (the request rate is not probed: governor cannot look without
    /// taking).
    pub fn expected_wait(&self, input: u64, output: u64) -> Duration {
        let pending = *self.pending.lock().expect("pending lock");
        self.wait_behind(pending, input, output)
    }

    fn wait_behind(&self, pending: u64, input: u64, output: u64) -> Duration {
        let pause = self.paused_until().map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        });
        let mut w = pause.max(self.tpm.wait_for(pending + input + output));
        if let Some(b) = &self.input_tpm {
            w = w.max(b.wait_for(input));
        }
        if let Some(b) = &self.output_tpm {
            w = w.max(b.wait_for(output));
        }
        w
    }

    /// Claim a place in the queue for a call, unless it would wait longer
    /// than `max` (then the wait). Check and claim are one step, so calls
    /// arriving together cannot all see an empty queue. Every claim must be
    /// followed by [`admit`](Self::admit), which releases it.
    pub fn claim(&self, input: u64, output: u64, max: Option<Duration>) -> Result<(), Duration> {
        let mut pending = self.pending.lock().expect("pending lock");
        if let Some(max) = max {
            let w = self.wait_behind(*pending, input, output);
            if w > max {
                return Err(w);
            }
        }
        *pending += input + output;
        Ok(())
    }

    /// Wait for a concurrency slot, the pause to end, a request token and
    /// the tokens (`input` estimated + `output` reserved), in that order.
    pub async fn admit(&self, input: u64, output: u64) -> Admission {
        let permit = self
            .concurrency
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        while let Some(t) = self.paused_until() {
            tokio::time::sleep_until(t).await;
        }
        self.rpm.until_ready().await;
        self.tpm.take(input + output).await;
        {
            let mut pending = self.pending.lock().expect("pending lock");
            *pending = pending.saturating_sub(input + output);
        }
        if let Some(b) = &self.input_tpm {
            b.take(input).await;
        }
        if let Some(b) = &self.output_tpm {
            b.take(output).await;
        }
        if let Some(f) = &self.fleet {
            // A pause another process learned of holds here too.
            loop {
                match f.pause.until_ms().await {
                    Ok(until) if until > crate::bus::now_ms() => {
                        let ms = (until - crate::bus::now_ms()).max(1) as u64;
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "fleet limiter unreachable; not sending until it is back");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            take_fleet(&f.rpm, 1.0).await;
            take_fleet(&f.tpm, (input + output) as f64).await;
        }
        // A pause may have started while we waited for tokens.
        while let Some(t) = self.paused_until() {
            tokio::time::sleep_until(t).await;
        }
        Admission {
            _permit: permit,
            reserved_input: input,
            reserved_output: output,
        }
    }

    /// Settle a reservation against the tokens the call really used
    /// (refunds only: an underestimate is not charged after the fact).
    pub fn settle(&self, admission: &Admission, used_input: u64, used_output: u64) {
        let reserved = admission.reserved_input + admission.reserved_output;
        self.tpm
            .refund(reserved.saturating_sub(used_input + used_output));
        if let Some(b) = &self.input_tpm {
            b.refund(admission.reserved_input.saturating_sub(used_input));
        }
        if let Some(b) = &self.output_tpm {
            b.refund(admission.reserved_output.saturating_sub(used_output));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_waits_and_refunds() {
        let b = TokenBucket::per_minute(600); // 10 per second
        assert!(b.try_take(600).is_ok());
        let wait = b.try_take(100).unwrap_err();
        assert!((wait.as_secs_f64() - 10.0).abs() < 0.01, "{wait:?}");
        b.refund(100);
        assert!(b.try_take(100).is_ok());
        let start = Instant::now();
        b.take(50).await;
        let waited = start.elapsed().as_secs_f64();
        assert!((4.9..=5.2).contains(&waited), "{waited}");
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_admission() {
        let l = LaneLimiter::new(6000, 1_000_000, None, None, 4);
        l.pause_for(Duration::from_secs(3));
        let start = Instant::now();
        let a = l.admit(10, 10).await;
        assert!(start.elapsed() >= Duration::from_secs(3));
        l.settle(&a, 5, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn expected_wait_reports_pause_and_budgets() {
        let l = LaneLimiter::new(6000, 600, None, None, 4);
        assert_eq!(l.expected_wait(10, 10), Duration::ZERO);
        let a = l.admit(500, 100).await; // the bucket is empty now
        l.settle(&a, 500, 100);
        let w = l.expected_wait(100, 0);
        assert!((w.as_secs_f64() - 10.0).abs() < 0.01, "{w:?}");
        l.pause_for(Duration::from_secs(30));
        assert!(l.expected_wait(1, 0) >= Duration::from_secs(29));
    }

    #[tokio::test(start_paused = true)]
    async fn claims_count_the_calls_queued_before() {
        // 600 tokens a minute; each call needs 200: three fit now, the
        // fourth would wait 20 s behind the three claimed before it.
        let l = LaneLimiter::new(6000, 600, None, None, 8);
        let max = Some(Duration::from_secs(5));
        for _ in 0..3 {
            l.claim(100, 100, max).unwrap();
        }
        let w = l.claim(100, 100, max).unwrap_err();
        assert!((w.as_secs_f64() - 20.0).abs() < 0.1, "{w:?}");
        for _ in 0..3 {
            let a = l.admit(100, 100).await;
            l.settle(&a, 100, 100);
        }
        assert!(l.claim(100, 100, max).is_err(), "the bucket is empty now");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_capped() {
        let l = Arc::new(LaneLimiter::new(60_000, 10_000_000, None, None, 2));
        let a = l.admit(1, 0).await;
        let _b = l.admit(1, 0).await;
        let l2 = l.clone();
        let third = tokio::spawn(async move { l2.admit(1, 0).await.reserved_input });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished());
        drop(a);
        assert_eq!(third.await.unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn output_budget_is_separate_and_refunded() {
        // 600 output tokens a minute; each call reserves 300 and uses 50.
        let l = LaneLimiter::new(60_000, 10_000_000, None, Some(600), 8);
        let start = Instant::now();
        for _ in 0..4 {
            let a = l.admit(10, 300).await;
            l.settle(&a, 10, 50);
        }
        // Refunds left room: 4 × 50 used of 600, no waiting.
        assert!(start.elapsed() < Duration::from_millis(10));
        let _a = l.admit(10, 300).await;
        let _b = l.admit(10, 300).await;
        // Now the output bucket is short: the next reservation waits.
        let waited = Instant::now();
        let _c = l.admit(10, 300).await;
        assert!(
            waited.elapsed() >= Duration::from_secs(10),
            "{:?}",
            waited.elapsed()
        );
    }
}
