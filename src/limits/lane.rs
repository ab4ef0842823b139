//! Per-process limits of one provider lane: a concurrency cap, a pause the
//! provider can impose ("exhausted until T"), backpressure on taking
//! messages, then the [`SharedLimiter`]. With `fleet = false` the lane also
//! holds the provider's request and token budgets in its own
//! [`bucket`](crate::bucket)s (token reservations are refunded once
//! the real usage is known); with `fleet = true` only the shared document
//! holds them. Runs on tokio's clock so tests can drive time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::bucket::{Bucket, Shape};
use crate::limits::fleet::{Correction, Limits, Need, ScopeLimits, SharedLimiter};

/// A budget held by the lane, on the lane's millisecond clock.
struct Held {
    shape: Shape,
    state: Mutex<Bucket>,
}

impl Held {
    fn new(shape: Shape) -> Self {
        Self {
            shape,
            state: Mutex::new(Bucket::full(shape, 0)),
        }
    }

    /// Take `n` tokens at `now_ms`, or say how long until they are there. A
    /// call larger than the whole budget takes all of it, so it can still run.
    fn try_take(&self, n: u64, now_ms: i64) -> Result<(), Duration> {
        let n = (n as f64).min(self.shape.capacity);
        let mut s = self.state.lock().expect("bucket lock");
        *s = s.take(self.shape, n, now_ms)?;
        Ok(())
    }

    /// How long until `n` tokens would be there (tokens queued ahead count too).
    fn wait(&self, n: u64, now_ms: i64) -> Duration {
        let s = *self.state.lock().expect("bucket lock");
        s.wait(self.shape, n as f64, now_ms)
    }

    /// Give back tokens reserved but not used.
    fn refund(&self, n: u64, now_ms: i64) {
        let mut s = self.state.lock().expect("bucket lock");
        *s = s.refund(self.shape, n as f64, now_ms);
    }
}

/// The provider's budgets, when the lane holds them (`fleet = false`).
struct Own {
    /// Requests per minute, in bursts of up to a tenth of a minute's.
    rpm: Held,
    tpm: Held,
    input_tpm: Option<Held>,
    output_tpm: Option<Held>,
}

pub struct LaneLimiter {
    /// The provider's budgets, unless the shared document holds them.
    own: Option<Own>,
    /// The lane's clock: its buckets' times are milliseconds since this.
    started: Instant,
    concurrency: Arc<Semaphore>,
    paused_until: Mutex<Option<Instant>>,
    /// Budgets shared with every process (fleet) or held in memory, per
    /// provider and per model, with what the provider taught us.
    shared: SharedLimiter,
    /// Tokens claimed by calls that have not taken them from the provider's
    /// token budget yet (this lane's, or the shared one when it holds it),
    /// so the wait a new call would face counts the calls queued before it.
    pending: Mutex<u64>,
    /// Calls claimed and not yet admitted, and how many may wait before the
    /// lane stops taking messages.
    waiting: AtomicUsize,
    /// Of those, calls the dispatcher handed over directly.
    direct_waiting: AtomicUsize,
    queue_cap: usize,
    freed: Notify,
    claim_turn: tokio::sync::Mutex<()>,
    counts_max_tokens: bool,
}

/// A message taken by a lane and not yet admitted (see [`LaneLimiter::ready`]),
/// or a call the dispatcher handed over (`direct`, see [`LaneLimiter::try_ready`]).
pub struct Ticket {
    lane: Option<Arc<LaneLimiter>>,
    direct: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(l) = self.lane.take() {
            let less = |w: usize| w.checked_sub(1);
            if self.direct {
                let _ = l
                    .direct_waiting
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, less);
            }
            let _ = l
                .waiting
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, less);
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
        let rpm = rpm.max(1);
        let per_minute = |limit| Held::new(Shape::per_minute(limit));
        let own = Own {
            // Bursts of a tenth of a minute's requests, at least one.
            rpm: Held::new(Shape {
                capacity: f64::from((rpm / 10).max(1)),
                per_ms: f64::from(rpm) / 60_000.0,
            }),
            tpm: per_minute(tpm),
            input_tpm: input_tpm.map(per_minute),
            output_tpm: output_tpm.map(per_minute),
        };
        Self {
            own: Some(own),
            started: Instant::now(),
            concurrency: Arc::new(Semaphore::new(max_concurrency.max(1))),
            paused_until: Mutex::new(None),
            shared,
            pending: Mutex::new(0),
            waiting: AtomicUsize::new(0),
            direct_waiting: AtomicUsize::new(0),
            // About a second of requests may wait here, and no more than
            // keeps the concurrency cap busy while the next messages are
            // fetched (an eighth of it, plus 16): more stay in NATS, where a
            // more urgent message can still overtake them and they cost this
            // process nothing (a waiting call is a task holding its message;
            // issue 18's RSS target).
            queue_cap: (rpm as usize / 60)
                .min(max_concurrency / 8 + 16)
                .clamp(2, 4096),
            freed: Notify::new(),
            claim_turn: tokio::sync::Mutex::new(()),
            counts_max_tokens: false,
        }
    }

    /// Leave the provider's budgets to the shared document (`fleet = true`):
    /// the lane then keeps only its pause, backpressure and concurrency cap.
    pub fn budgets_shared(mut self, yes: bool) -> Self {
        if yes {
            self.own = None;
        }
        self
    }

    /// Milliseconds on the lane's clock.
    fn now_ms(&self) -> i64 {
        self.started.elapsed().as_millis() as i64
    }

    /// Wait until `n` tokens of `b` are there and take them.
    async fn take(&self, b: &Held, n: u64) {
        while let Err(wait) = b.try_take(n, self.now_ms()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Tokens claimed before are now taken from the provider's budget.
    fn unqueue(&self, n: u64) {
        let mut pending = self.pending.lock().expect("pending lock");
        *pending = pending.saturating_sub(n);
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
    /// than [`Self::queue_cap`] calls taken and not yet admitted.
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
                return Ticket {
                    lane: Some(self.clone()),
                    direct: false,
                };
            }
            if w < self.queue_cap {
                continue; // raced another taker
            }
            freed.await;
        }
    }

    /// A ticket at once if the lane can start a call now: not paused, a
    /// concurrency slot free for it, and at most half its backpressure queue
    /// taken by calls waiting for admission, whether pulled from the calls
    /// stream or handed over directly (a lane waiting for its request or
    /// token budget fills the queue; one whose calls flow holds a few
    /// between pull and admission, and an idle one's pull loop a ticket
    /// while it waits for a message). The dispatcher hands a job's first
    /// call straight to such a lane of its own process; a backlogged or
    /// paused one gets it through the calls stream, in its turn, so a lane
    /// without budget keeps its work in NATS either way.
    pub fn try_ready(self: &Arc<Self>) -> Option<Ticket> {
        let direct = self.direct_waiting.load(Ordering::SeqCst);
        if self.concurrency.available_permits() <= direct || self.paused_until().is_some() {
            return None;
        }
        // Checked and taken in one step: dispatcher tasks on other threads
        // race for the same room.
        let half = (self.queue_cap / 2).max(1);
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w <= half).then_some(w + 1)
            })
            .ok()?;
        self.direct_waiting.fetch_add(1, Ordering::SeqCst);
        Some(Ticket {
            lane: Some(self.clone()),
            direct: true,
        })
    }

    /// How many calls may wait for admission before the lane stops taking
    /// messages (about a second's worth of requests, at most an eighth of
    /// `max_concurrency` plus 16).
    pub fn queue_cap(&self) -> usize {
        self.queue_cap
    }

    /// When the current pause ends, if any.
    pub fn paused_until(&self) -> Option<Instant> {
        let p = *self.paused_until.lock().expect("pause lock");
        p.filter(|t| *t > Instant::now())
    }

    /// How long a call reserving `input` + `output` tokens would wait now for
    /// the provider's pause and the lane's token budgets (if it holds them),
    /// behind the calls already claimed (the request rate is not counted).
    pub fn expected_wait(&self, input: u64, output: u64) -> Duration {
        let pending = *self.pending.lock().expect("pending lock");
        self.wait_behind(pending, input, output)
    }

    fn wait_behind(&self, pending: u64, input: u64, output: u64) -> Duration {
        let pause = self.paused_until().map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        });
        let Some(own) = &self.own else {
            return pause;
        };
        let now = self.now_ms();
        let mut w = pause.max(own.tpm.wait(pending + input + output, now));
        if let Some(b) = &own.input_tpm {
            w = w.max(b.wait(input, now));
        }
        if let Some(b) = &own.output_tpm {
            w = w.max(b.wait(output, now));
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

    /// Wait for a concurrency slot, the pause to end, then, if the lane
    /// holds the provider's budgets, a request and the tokens (`input`
    /// estimated + `output` reserved), then the shared budgets of the
    /// provider and of `model`, in that order. Follows a
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
        if let Some(own) = &self.own {
            self.take(&own.rpm, 1).await;
            self.take(&own.tpm, input + output).await;
            self.unqueue(input + output);
            if let Some(b) = &own.input_tpm {
                self.take(b, input).await;
            }
            if let Some(b) = &own.output_tpm {
                self.take(b, output).await;
            }
        }
        self.shared.admit(model, Need { input, output }).await;
        if self.own.is_none() {
            self.unqueue(input + output);
        }
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
        if let Some(own) = &self.own {
            let now = self.now_ms();
            own.tpm.refund(unused.input + unused.output, now);
            if let Some(b) = &own.input_tpm {
                b.refund(unused.input, now);
            }
            if let Some(b) = &own.output_tpm {
                b.refund(unused.output, now);
            }
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
        let l = LaneLimiter::local(6000, 600, 4); // 10 tokens per second
        let b = &l.own.as_ref().unwrap().tpm;
        assert!(b.try_take(600, l.now_ms()).is_ok());
        let wait = b.try_take(100, l.now_ms()).unwrap_err();
        assert!((wait.as_secs_f64() - 10.0).abs() < 0.01, "{wait:?}");
        b.refund(100, l.now_ms());
        assert!(b.try_take(100, l.now_ms()).is_ok());
        let start = Instant::now();
        l.take(b, 50).await;
        let waited = start.elapsed().as_secs_f64();
        assert!((4.9..=5.2).contains(&waited), "{waited}");
    }

    #[tokio::test(start_paused = true)]
    async fn only_an_idle_lane_takes_a_call_directly() {
        let l = Arc::new(LaneLimiter::local(6000, 1_000_000, 2));
        // The pull loop's ticket, held while it waits for a message.
        let pulling = l.ready().await;
        let t = l.try_ready().expect("idle lane");
        let u = l
            .try_ready()
            .expect("a second slot for a second direct call");
        assert!(l.try_ready().is_none(), "both slots spoken for");
        let a = l.admit("m", 10, 10).await;
        drop(t); // admitted
        let b = l.admit("m", 10, 10).await;
        drop(u);
        assert!(l.try_ready().is_none(), "both slots busy");
        l.settle(a, Some((5, 5))).await;
        l.settle(b, Some((5, 5))).await;
        // Half its queue (16 here) taken by calls waiting for admission:
        // backlogged, whether they came from the stream or directly.
        assert_eq!(l.queue_cap(), 16);
        let mut queued = Vec::new();
        for _ in 0..7 {
            queued.push(l.ready().await);
        }
        let d = l.try_ready().expect("8 of 16: still flowing");
        assert!(l.try_ready().is_none(), "9 of 16 wait, one of them direct");
        drop(d);
        queued.push(l.ready().await);
        assert!(l.try_ready().is_none(), "9 of 16 wait");
        queued.clear();
        assert!(l.try_ready().is_some());
        l.pause_for(Duration::from_secs(3));
        assert!(l.try_ready().is_none(), "paused");
        tokio::time::sleep(Duration::from_secs(4)).await;
        let _t = l.try_ready().expect("the pause ended");
        // A ticket taken directly counts toward the backpressure as any other.
        assert_eq!(l.waiting.load(Ordering::SeqCst), 2);
        drop(pulling);
    }

    /// Dispatcher tasks on several threads asking at once take no more room
    /// than one asking after another.
    #[test]
    fn racing_direct_takers_never_overfill_the_queue() {
        let l = Arc::new(LaneLimiter::local(1, 1_000_000, 64)); // half its queue: 1
        let taken = std::thread::scope(|s| {
            let asks: Vec<_> = (0..8).map(|_| s.spawn(|| l.try_ready())).collect();
            asks.into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect::<Vec<_>>()
        });
        assert_eq!(taken.iter().filter(|t| t.is_some()).count(), 2);
        assert_eq!(l.waiting.load(Ordering::SeqCst), 2);
    }

    /// A lane out of request budget (one a minute) takes one call directly
    /// and leaves the rest to the calls stream.
    #[tokio::test(start_paused = true)]
    async fn a_lane_without_budget_takes_no_pile_of_direct_calls() {
        let l = Arc::new(LaneLimiter::local(1, 1_000_000, 64));
        let _pulling = l.ready().await;
        let first = l.try_ready().expect("room for one");
        let a = l.admit("m", 10, 10).await;
        drop(first);
        let second = l.try_ready().expect("the queue is empty again");
        assert!(
            l.try_ready().is_none(),
            "the second waits for the budget: nothing more"
        );
        drop((second, a));
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
    async fn with_shared_budgets_only_the_shared_document_meters() {
        // The shared document holds 60,000 tokens a minute (1,000 a second,
        // 500 at once); the lane's own 100 would hold the second call a minute.
        let mut per_min = std::collections::BTreeMap::new();
        per_min.insert(crate::limits::fleet::REQUESTS, 60_000);
        per_min.insert(crate::limits::fleet::TOKENS, 60_000);
        let provider = Limits {
            per_min: per_min.clone(),
            ..Limits::default()
        };
        let lims = ScopeLimits::new(provider, Default::default(), per_min);
        let l = LaneLimiter::new(60_000, 100, None, None, 8, SharedLimiter::local("t", lims))
            .budgets_shared(true);
        let start = Instant::now();
        for _ in 0..2 {
            let a = l.admit("m", 100, 100).await;
            l.settle(a, Some((100, 100))).await;
        }
        assert!(start.elapsed() < Duration::from_millis(10));
        // 100 tokens left: claims of 200 wait 0.1 s, 0.3 s behind the first,
        // 0.5 s behind both (over 0.4 s).
        let max = Some(Duration::from_millis(400));
        l.claim("m", 100, 100, max).await.unwrap();
        l.claim("m", 100, 100, max).await.unwrap();
        let w = l.claim("m", 100, 100, max).await.unwrap_err();
        assert!((w.as_secs_f64() - 0.5).abs() < 0.01, "{w:?}");
        for _ in 0..2 {
            let a = l.admit("m", 100, 100).await;
            l.settle(a, Some((100, 100))).await;
        }
        // Admitted calls no longer count ahead: 200 tokens short, 0.2 s.
        let w = l.claim("m", 100, 100, Some(Duration::ZERO)).await;
        let w = w.unwrap_err();
        assert!((w.as_secs_f64() - 0.2).abs() < 0.01, "{w:?}");
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

    #[tokio::test(start_paused = true)]
    async fn a_lane_takes_no_more_waiting_calls_than_keep_its_concurrency_busy() {
        // A high request rate (a second's worth: 10,000) but 160 calls at
        // once: 160 / 8 + 16 = 36 may wait for admission; the 37th message
        // stays in NATS until one is admitted.
        let l = Arc::new(LaneLimiter::local(600_000, u32::MAX, 160));
        let mut waiting = Vec::new();
        for _ in 0..36 {
            waiting.push(l.ready().await);
        }
        let l2 = l.clone();
        let tasks = crate::tasks::Tasks::new();
        let next = tasks.spawn(async move {
            let _ticket = l2.ready().await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!next.is_finished(), "a 37th call was taken to wait");
        drop(waiting.pop());
        tokio::time::timeout(Duration::from_secs(1), next)
            .await
            .expect("a freed place is taken")
            .unwrap();
        // A low request rate bounds it too: 600 a minute, 10 may wait.
        let slow = Arc::new(LaneLimiter::local(600, u32::MAX, 1000));
        assert_eq!(slow.queue_cap(), 10);
    }
}
