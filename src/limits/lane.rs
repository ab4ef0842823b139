//! Per-process limits of one provider lane: requests per minute (governor),
//! tokens per minute (our own bucket, because reservations of `max_tokens`
//! must be refunded once the real usage is known, which governor cannot do),
//! a concurrency cap, and a pause the provider can impose ("exhausted until T").
//! Uses tokio's clock so tests can drive time.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::limits::fleet::{Correction, Limits, Need, ScopeLimits, SharedLimiter};
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

pub struct LaneLimiter {
    rpm: DefaultDirectRateLimiter,
    tpm: TokenBucket,
    input_tpm: Option<TokenBucket>,
    output_tpm: Option<TokenBucket>,
    concurrency: Arc<Semaphore>,
    paused_until: Mutex<Option<Instant>>,
    /// Budgets shared with every process (fleet) or held in memory, per
    /// provider and per model, with what the provider taught us.
    shared: SharedLimiter,
    /// Tokens claimed by calls that have not taken them from `tpm` yet, so
    /// the wait a new call would face counts the calls queued before it.
    pending: Mutex<u64>,
    /// Calls claimed and not yet admitted, and how many may wait before the
    /// lane stops taking messages.
    waiting: AtomicUsize,
    queue_cap: usize,
    freed: Notify,
    claim_turn: tokio::sync::Mutex<()>,
    counts_max_tokens: bool,
}

/// A message taken by a lane and not yet admitted (see [`LaneLimiter::ready`]).
pub struct Ticket(Option<Arc<LaneLimiter>>);

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(l) = self.0.take() {
            let _ = l
                .waiting
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| w.checked_sub(1));
            l.freed.notify_waiters();
        }
    }
}

/// Held while a call is in flight: the concurrency slot and the token
/// reservation. Give it back with [`LaneLimiter::settle`].
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    model: String,
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
        shared: SharedLimiter,
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
            shared,
            pending: Mutex::new(0),
            waiting: AtomicUsize::new(0),
            // About a second of requests may wait here; more stay in NATS.
            queue_cap: (rpm.get() as usize / 60).clamp(2, 4096),
            freed: Notify::new(),
            claim_turn: tokio::sync::Mutex::new(()),
            counts_max_tokens: false,
        }
    }

    /// A limiter with only this process's limits (tests, single workers).
    pub fn local(rpm: u32, tpm: u32, max_concurrency: usize) -> Self {
        let mut ceiling = std::collections::BTreeMap::new();
        ceiling.insert(crate::limits::fleet::REQUESTS, rpm);
        ceiling.insert(crate::limits::fleet::TOKENS, tpm);
        let lims = ScopeLimits::new(Limits::default(), Default::default(), ceiling);
        Self::new(
            rpm,
            tpm,
            None,
            None,
            max_concurrency,
            SharedLimiter::local("local", lims),
        )
    }

    /// Stop sending until `now + d` in this process (a provider said its
    /// budget is exhausted); [`finish`](Self::finish) also shares it.
    pub fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut p = self.paused_until.lock().expect("pause lock");
        if p.is_none_or(|cur| cur < until) {
            *p = Some(until);
        }
    }

    /// Wait until the lane can use another message: not paused, and fewer
    /// than about a second's worth of calls taken and not yet admitted.
    /// Until then the lane takes nothing from NATS (backpressure, not naks).
    /// The ticket counts the message as waiting until it is dropped (at
    /// admission, or when its handling ends otherwise).
    pub async fn ready(self: &Arc<Self>) -> Ticket {
        loop {
            if let Some(t) = self.paused_until() {
                tokio::time::sleep_until(t).await;
                continue;
            }
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let w = self.waiting.load(Ordering::SeqCst);
            if w < self.queue_cap
                && self
                    .waiting
                    .compare_exchange(w, w + 1, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                return Ticket(Some(self.clone()));
            }
            if w < self.queue_cap {
                continue; // raced another taker
            }
            freed.await;
        }
    }

    /// How many calls may wait for admission before the lane stops taking
    /// messages (about a second's worth of requests).
    pub fn queue_cap(&self) -> usize {
        self.queue_cap
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

    /// Claim a place in the queue for a call to `model`, unless it would
    /// wait longer than `max` (then the wait) for this lane's budgets or the
    /// shared ones, behind the calls claimed before it. Check and claim are
    /// one step (claims with a `max` take turns), so calls arriving together cannot all
    /// see an empty queue. If the shared budgets cannot be read, the wait is
    /// unknown and counts as too long. Every claim must be followed by
    /// [`admit`](Self::admit), which releases it.
    pub async fn claim(
        &self,
        model: &str,
        input: u64,
        output: u64,
        max: Option<Duration>,
    ) -> Result<(), Duration> {
        // Only calls that may skip take turns; the others just join the queue.
        let _turn = match max {
            Some(_) => Some(self.claim_turn.lock().await),
            None => None,
        };
        if let Some(max) = max {
            let pending = *self.pending.lock().expect("pending lock");
            let w = self.wait_behind(pending, input, output);
            if w > max {
                return Err(w);
            }
            // Taken and not yet admitted, this call included.
            let queued = self.waiting.load(Ordering::SeqCst).saturating_sub(1);
            let ahead = Need {
                input: pending,
                output: 0,
            };
            let this = Need { input, output };
            let shared = self
                .shared
                .expected_wait(model, queued, ahead, this)
                .await
                .unwrap_or(Duration::MAX);
            if shared > max {
                return Err(shared);
            }
        }
        *self.pending.lock().expect("pending lock") += input + output;
        Ok(())
    }

    /// Wait for a concurrency slot, the pause to end, a request token, the
    /// tokens (`input` estimated + `output` reserved), then the shared
    /// budgets of the provider and of `model`, in that order. Follows a
    /// [`claim`](Self::claim).
    pub async fn admit(&self, model: &str, input: u64, output: u64) -> Admission {
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
        self.shared.admit(model, Need { input, output }).await;
        // A pause may have started while we waited for tokens.
        while let Some(t) = self.paused_until() {
            tokio::time::sleep_until(t).await;
        }
        Admission {
            _permit: permit,
            model: model.to_string(),
            reserved_input: input,
            reserved_output: output,
        }
    }

    /// Settle a reservation: `used` is the (input, output) usage the
    /// provider reported, `None` if the call failed. Locally, what was not
    /// used comes back. In the shared budgets, the reservation is corrected
    /// to what the provider counts: the real input (more or less than
    /// estimated); the real output, or `max_tokens` where the provider
    /// counts that ([`counts_max_tokens`](Self::counts_max_tokens)); and for
    /// a failed call, all of it (it may have been counted).
    pub async fn settle(&self, admission: Admission, used: Option<(u64, u64)>) {
        self.finish(admission, used, crate::limits::fleet::Seen::default())
            .await;
    }

    /// [`settle`](Self::settle) and learn from the response in one step:
    /// `seen` is what the provider said about its limits (see
    /// [`Seen::from_rate`](crate::limits::fleet::Seen::from_rate)). A pause it asked
    /// for holds here at once.
    pub async fn finish(
        &self,
        admission: Admission,
        used: Option<(u64, u64)>,
        seen: crate::limits::fleet::Seen,
    ) {
        if let Some(d) = seen.pause {
            self.pause_for(d);
        }
        let (used_input, used_output) = used.unwrap_or((0, 0));
        let unused = Need {
            input: admission.reserved_input.saturating_sub(used_input),
            output: admission.reserved_output.saturating_sub(used_output),
        };
        self.tpm.refund(unused.input + unused.output);
        if let Some(b) = &self.input_tpm {
            b.refund(unused.input);
        }
        if let Some(b) = &self.output_tpm {
            b.refund(unused.output);
        }
        let signed = |reserved: u64, used: u64| reserved as i64 - used as i64;
        let back = match used {
            None => Correction::default(),
            Some((i, o)) => Correction {
                input: signed(admission.reserved_input, i),
                output: if self.counts_max_tokens {
                    0
                } else {
                    signed(admission.reserved_output, o)
                },
            },
        };
        self.shared.finish(&admission.model, Some(back), seen).await;
    }

    /// Set whether the provider counts a request's `max_tokens` toward its
    /// token limits when the request arrives (OpenAI) rather than the output
    /// really produced (Anthropic).
    pub fn counting_max_tokens(mut self, yes: bool) -> Self {
        self.counts_max_tokens = yes;
        self
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
        let l = LaneLimiter::local(6000, 1_000_000, 4);
        l.pause_for(Duration::from_secs(3));
        let start = Instant::now();
        let a = l.admit("m", 10, 10).await;
        assert!(start.elapsed() >= Duration::from_secs(3));
        l.settle(a, Some((5, 5))).await;
    }

    #[tokio::test(start_paused = true)]
    async fn expected_wait_reports_pause_and_budgets() {
        let l = LaneLimiter::local(6000, 600, 4);
        assert_eq!(l.expected_wait(10, 10), Duration::ZERO);
        let a = l.admit("m", 500, 100).await; // the bucket is empty now
        l.settle(a, Some((500, 100))).await;
        let w = l.expected_wait(100, 0);
        assert!((w.as_secs_f64() - 10.0).abs() < 0.01, "{w:?}");
        l.pause_for(Duration::from_secs(30));
        assert!(l.expected_wait(1, 0) >= Duration::from_secs(29));
    }

    #[tokio::test(start_paused = true)]
    async fn claims_count_the_calls_queued_before() {
        // 600 tokens a minute; each call needs 200: three fit now, the
        // fourth would wait 20 s behind the three claimed before it.
        let l = LaneLimiter::local(6000, 600, 8);
        let max = Some(Duration::from_secs(5));
        for _ in 0..3 {
            l.claim("m", 100, 100, max).await.unwrap();
        }
        let w = l.claim("m", 100, 100, max).await.unwrap_err();
        assert!((w.as_secs_f64() - 20.0).abs() < 0.1, "{w:?}");
        for _ in 0..3 {
            let a = l.admit("m", 100, 100).await;
            l.settle(a, Some((100, 100))).await;
        }
        assert!(
            l.claim("m", 100, 100, max).await.is_err(),
            "the bucket is empty now"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_capped() {
        let l = Arc::new(LaneLimiter::local(60_000, 10_000_000, 2));
        let a = l.admit("m", 1, 0).await;
        let _b = l.admit("m", 1, 0).await;
        let l2 = l.clone();
        let tasks = crate::tasks::Tasks::new();
        let third = tasks.spawn(async move { l2.admit("m", 1, 0).await.reserved_input });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished());
        drop(a);
        assert_eq!(third.await.unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn output_budget_is_separate_and_refunded() {
        // 600 output tokens a minute; each call reserves 300 and uses 50.
        let l = LaneLimiter::new(
            60_000,
            10_000_000,
            None,
            Some(600),
            8,
            SharedLimiter::local("t", ScopeLimits::default()),
        );
        let start = Instant::now();
        for _ in 0..4 {
            let a = l.admit("m", 10, 300).await;
            l.settle(a, Some((10, 50))).await;
        }
        // Refunds left room: 4 × 50 used of 600, no waiting.
        assert!(start.elapsed() < Duration::from_millis(10));
        let _a = l.admit("m", 10, 300).await;
        let _b = l.admit("m", 10, 300).await;
        // Now the output bucket is short: the next reservation waits.
        let waited = Instant::now();
        let _c = l.admit("m", 10, 300).await;
        assert!(
            waited.elapsed() >= Duration::from_secs(10),
            "{:?}",
            waited.elapsed()
        );
    }
}
