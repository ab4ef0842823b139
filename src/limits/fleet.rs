//! Limits shared by every worker process of a provider: request and token
//! buckets ([`bucket`](crate::bucket)), in-flight leases, the
//! provider's pause and limits learned from the provider, kept in one
//! document per provider.
//!
//! With `fleet = true` the document lives in a NATS KV key
//! (`<provider>` in the bucket `<PREFIX>_LIMITS`) and a process changes it
//! only by compare-and-set on the key's revision: read, compute the next
//! state with the pure functions below, write if nobody wrote in between,
//! else retry with the fresh state. One key per provider means one read and
//! one write to admit a call (every budget and the concurrency slot, all or
//! nothing) and one of each to settle it; the document is then the only
//! holder of the provider's budgets. With `fleet = false` the same document
//! lives in this process's memory and holds model limits and what was
//! learned; the lane's own buckets hold the provider's budgets.
//!
//! *Why compare-and-set and not leased token blocks*: a process's
//! admissions and settlements queue to one task that applies them in
//! batches, one read and one compare-and-set write per batch, far below
//! provider rates; the state is exact at any moment, so N processes can
//! never overdraw, and there is nothing to rebalance when processes come and
//! go. Leased blocks would save round trips but strand budget in slow or
//! dead processes and need a rebalancing protocol. A process's in-flight
//! slots are a lease ([`LEASE_MS`], renewed while it has calls in flight), so
//! a killed process's slots return when its lease expires; tokens it took
//! are spent, as they are at the provider. Fail closed: while the document
//! cannot be read (or has a newer format than this build), lanes wait and
//! the process logs once; it never sends unmetered.
//!
//! *Adaptive*: a response's stated limits below the configured ones become
//! the model's rate ("provider enforces N"); a 429 no stated limit explains
//! halves the model's rate (once per second of 429s), which climbs back over
//! a minute to 95% of the rate that drew the 429, then probes upward by 5% a
//! minute; a provider's wait (retry-after, exhausted budget) pauses the
//! provider for every process. Remaining counts in headers lower a model's
//! bucket when below it; they never raise it.
//!
//! *What counts*: a call reserves its input estimate plus `max_tokens`; when
//! it ends the reservation is corrected to the real input, and to the real
//! output where the provider counts output (Anthropic) or kept at
//! `max_tokens` where it counts that at arrival (OpenAI, Gemini, the
//! simulator). A failed call keeps its reservation.
//!
//! All arithmetic is on explicit Unix-millisecond times and is tested
//! without a clock. NATS 2.9: async-nats 0.51's `create_key_value` fails
//! against 2.9, so there the KV's backing stream is created by hand (see
//! DESIGN.md) and then opened with `get_key_value`; 2.10 and later get the
//! client's `create_key_value` ([`open_store_with`] asks the server its
//! version). The bucket has `nats.replicas` copies.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, kv, stream};
use serde::{Deserialize, Serialize};

use crate::bucket::{Bucket, Shape};
use crate::clock::now_ms;
use crate::config::Config;
use crate::providers::RateInfo;
use crate::tasks::Tasks;

/// Budget names, as the providers' headers name them.
pub const REQUESTS: &str = "requests";
pub const TOKENS: &str = "tokens";
pub const INPUT_TOKENS: &str = "input_tokens";
pub const OUTPUT_TOKENS: &str = "output_tokens";

/// A bucket holds this many seconds of its limit: a provider that allows a
/// second's worth absorbs the jitter between our grant and its arrival.
/// Steady-state throughput is the full limit; only bursts are cut.
pub const BURST_SECS: f64 = 0.5;
/// A process's in-flight lease lasts this long unless renewed; a process
/// that dies gives its slots back when its lease runs out.
pub const LEASE_MS: i64 = 15_000;
/// Renew leases this often.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// A 429 the provider sent without telling its limit cuts our rate to
/// this share of the rate that drew it...
pub const BACKOFF: f64 = 0.5;
/// ...at most once per this many milliseconds (one burst of 429s is one signal)...
pub const DAMP_MS: i64 = 1_000;
/// ...then climbs back, evenly over this many milliseconds, to 95% of the
/// rate that drew the 429...
pub const REGAIN_MS: i64 = 60_000;
/// ...and beyond it probes upward by this share a minute, to the configured limit.
pub const PROBE_PER_MIN: f64 = 0.05;
/// How often a lane waiting for an in-flight slot looks again.
const SLOT_POLL: Duration = Duration::from_millis(20);

/// A bucket of this scope's budget refilled at `per_min`, holding
/// [`BURST_SECS`] of it.
fn burst(per_min: f64) -> Shape {
    Shape::holding(per_min, BURST_SECS)
}

/// The configured limits of one scope (a provider, or one of its models).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Per-minute limits held here, by budget name ([`REQUESTS`], [`TOKENS`], ...).
    pub per_min: BTreeMap<&'static str, u32>,
    /// Upper bounds for limits learned from the provider where `per_min`
    /// has none (a learned limit is held here even if none is configured).
    pub ceiling: BTreeMap<&'static str, u32>,
    /// Most calls in flight at once across the fleet.
    pub concurrency: Option<u32>,
}

impl Limits {
    /// The configured limit (or ceiling) of `budget`.
    pub fn of(&self, budget: &str) -> Option<u32> {
        self.per_min
            .get(budget)
            .or_else(|| self.ceiling.get(budget))
            .copied()
    }
}

/// What one call needs: one request, its estimated input and reserved output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Need {
    pub input: u64,
    pub output: u64,
}

impl Need {
    /// What a call takes from `budget`.
    fn of(self, budget: &str) -> f64 {
        match budget {
            REQUESTS => 1.0,
            INPUT_TOKENS => self.input as f64,
            OUTPUT_TOKENS => self.output as f64,
            _ => (self.input + self.output) as f64,
        }
    }
}

/// What the provider counted compared with a call's reservation: tokens to
/// give back (positive) or to charge on top (negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Correction {
    pub input: i64,
    pub output: i64,
}

impl Correction {
    fn tokens_of(self, budget: &str) -> f64 {
        match budget {
            REQUESTS => 0.0,
            INPUT_TOKENS => self.input as f64,
            OUTPUT_TOKENS => self.output as f64,
            _ => (self.input + self.output) as f64,
        }
    }
}

/// A limit learned from the provider, lower than the configured one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Learned {
    pub per_min: f64,
    pub at_ms: i64,
    /// From the provider's limit header (exact, kept) or from 429s (a guess
    /// that grows back).
    pub from_header: bool,
    /// From 429s: the rate that drew the last one.
    #[serde(default)]
    pub bad: f64,
}

impl Learned {
    /// The rate this learned limit allows at `now_ms`, at most `ceiling`.
    pub fn rate(&self, ceiling: f64, now_ms: i64) -> f64 {
        if self.from_header {
            return self.per_min.min(ceiling);
        }
        let t = (now_ms - self.at_ms).max(0) as f64;
        let regain = REGAIN_MS as f64;
        let target = (0.95 * self.bad).max(self.per_min);
        let r = if t < regain {
            self.per_min + (target - self.per_min) * t / regain
        } else {
            target * (1.0 + PROBE_PER_MIN * (t - regain) / 60_000.0)
        };
        r.min(ceiling)
    }
}

/// One process's calls in flight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub n: u32,
    pub expires_ms: i64,
}

/// The shared state of one scope.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Scope {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub buckets: BTreeMap<String, Bucket>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub learned: BTreeMap<String, Learned>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub leases: BTreeMap<String, Lease>,
    pub paused_until_ms: i64,
}

fn ms(d: i64) -> Duration {
    Duration::from_millis(d.max(1) as u64)
}

impl Scope {
    /// The budgets held in this scope: the configured ones and the learned
    /// ones, with their configured limit (or ceiling).
    fn held(&self, lim: &Limits) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = lim
            .per_min
            .iter()
            .map(|(b, c)| (b.to_string(), *c))
            .collect();
        for b in self.learned.keys() {
            if !lim.per_min.contains_key(b.as_str()) {
                if let Some(c) = lim.of(b) {
                    v.push((b.clone(), c));
                }
            }
        }
        v
    }

    /// The rate of `budget` now: the configured limit, or lower if learned.
    pub fn rate(&self, budget: &str, configured: u32, now_ms: i64) -> f64 {
        let c = f64::from(configured.max(1));
        self.learned.get(budget).map_or(c, |l| l.rate(c, now_ms))
    }

    /// Calls in flight under live leases.
    pub fn in_flight(&self, now_ms: i64) -> u32 {
        self.leases
            .values()
            .filter(|l| l.expires_ms > now_ms)
            .map(|l| l.n)
            .sum()
    }

    /// Take what `need` needs from every budget, and an in-flight slot for
    /// `holder`, all or nothing; else how long to wait.
    pub fn admit(
        &mut self,
        lim: &Limits,
        need: Need,
        holder: &str,
        now_ms: i64,
    ) -> Result<(), Duration> {
        if self.paused_until_ms > now_ms {
            return Err(ms(self.paused_until_ms - now_ms));
        }
        self.leases.retain(|_, l| l.n > 0 && l.expires_ms > now_ms);
        self.learned.retain(|b, l| {
            lim.of(b)
                .is_some_and(|c| l.from_header || l.rate(f64::from(c), now_ms) < f64::from(c))
        });
        let held = self.held(lim);
        self.buckets.retain(|b, _| held.iter().any(|(h, _)| h == b));
        if let Some(max) = lim.concurrency {
            if self.in_flight(now_ms) >= max {
                let soonest = self
                    .leases
                    .values()
                    .map(|l| l.expires_ms)
                    .min()
                    .unwrap_or(now_ms);
                return Err(ms(soonest - now_ms).min(SLOT_POLL));
            }
        }
        let mut next = Vec::new();
        let mut wait = Duration::ZERO;
        for (budget, configured) in held {
            let shape = burst(self.rate(&budget, configured, now_ms));
            let state = self
                .buckets
                .get(&budget)
                .copied()
                .unwrap_or_else(|| Bucket::full(shape, now_ms));
            match state.take(shape, need.of(&budget), now_ms) {
                Ok(s) => next.push((budget, s)),
                Err(w) => wait = wait.max(w),
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for (budget, s) in next {
            self.buckets.insert(budget, s);
        }
        if lim.concurrency.is_some() {
            let l = self.leases.entry(holder.to_string()).or_insert(Lease {
                n: 0,
                expires_ms: 0,
            });
            l.n += 1;
            l.expires_ms = now_ms + LEASE_MS;
        }
        Ok(())
    }

    /// How long until a call needing `this` could be taken behind `queued`
    /// calls needing `ahead` in all, at `now_ms`: the pause and every held
    /// budget (not the in-flight slots). Like [`admit`](Self::admit), a call
    /// larger than a bucket runs once the bucket is full.
    pub fn wait_for(
        &self,
        lim: &Limits,
        queued: usize,
        ahead: Need,
        this: Need,
        now_ms: i64,
    ) -> Duration {
        let mut w = if self.paused_until_ms > now_ms {
            ms(self.paused_until_ms - now_ms)
        } else {
            Duration::ZERO
        };
        for (budget, configured) in self.held(lim) {
            let shape = burst(self.rate(&budget, configured, now_ms));
            let state = self
                .buckets
                .get(&budget)
                .copied()
                .unwrap_or_else(|| Bucket::full(shape, now_ms));
            let before = if budget == REQUESTS {
                queued as f64
            } else {
                ahead.of(&budget)
            };
            let amount = before + this.of(&budget).min(shape.capacity);
            w = w.max(state.wait(shape, amount, now_ms));
        }
        w
    }

    /// Correct a call's reservation by what the provider counted (a
    /// request, once sent, is never given back), and free its slot.
    pub fn settle(&mut self, lim: &Limits, back: Correction, holder: &str, now_ms: i64) {
        for (budget, configured) in self.held(lim) {
            let shape = burst(self.rate(&budget, configured, now_ms));
            if let Some(s) = self.buckets.get_mut(&budget) {
                *s = s.refund(shape, back.tokens_of(&budget), now_ms);
            }
        }
        if lim.concurrency.is_some() {
            if let Some(l) = self.leases.get_mut(holder) {
                l.n = l.n.saturating_sub(1);
                l.expires_ms = now_ms + LEASE_MS;
                if l.n == 0 {
                    self.leases.remove(holder);
                }
            }
        }
    }

    /// `holder` still has `n` calls in flight: keep its lease alive.
    pub fn renew(&mut self, holder: &str, n: u32, now_ms: i64) {
        if n == 0 {
            self.leases.remove(holder);
        } else {
            self.leases.insert(
                holder.to_string(),
                Lease {
                    n,
                    expires_ms: now_ms + LEASE_MS,
                },
            );
        }
    }

    /// Send nothing until `until_ms` (never shortens a pause). Whether it changed.
    pub fn pause_until(&mut self, until_ms: i64) -> bool {
        let changed = until_ms > self.paused_until_ms;
        self.paused_until_ms = self.paused_until_ms.max(until_ms);
        changed
    }

    /// The provider says its limit for `budget` is `limit` (per minute):
    /// the rate from now on is that, at most the configured one, and the
    /// scope holds the budget so the provider's remaining count can tighten
    /// it. Whether it changed.
    pub fn learn_limit(&mut self, budget: &str, limit: u64, configured: u32, now_ms: i64) -> bool {
        let limit = (limit as f64).min(f64::from(configured));
        match self.learned.get(budget) {
            Some(l) if l.from_header && l.per_min == limit => false,
            _ => {
                self.learned.insert(
                    budget.to_string(),
                    Learned {
                        per_min: limit,
                        at_ms: now_ms,
                        from_header: true,
                        bad: 0.0,
                    },
                );
                true
            }
        }
    }

    /// The provider says `remaining` of `budget` are left: if our bucket
    /// holds more, it holds that many now (someone else, or an estimate
    /// below its count, used the difference). Whether it changed.
    pub fn sync_remaining(
        &mut self,
        budget: &str,
        remaining: u64,
        configured: u32,
        now_ms: i64,
    ) -> bool {
        let shape = burst(self.rate(budget, configured, now_ms));
        let Some(b) = self.buckets.get_mut(budget) else {
            return false;
        };
        let now = b.refilled(shape, now_ms);
        let remaining = remaining as f64;
        if now.tokens > remaining {
            *b = Bucket {
                tokens: remaining,
                at_ms: now.at_ms,
            };
            true
        } else {
            false
        }
    }

    /// A 429 came that no known limit explains: cut every budget whose rate
    /// is not known from the provider's headers. Whether it changed.
    pub fn back_off(&mut self, lim: &Limits, now_ms: i64) -> bool {
        let mut changed = false;
        let all = lim.per_min.iter().chain(lim.ceiling.iter());
        for (&budget, &configured) in all {
            match self.learned.get(budget) {
                Some(l) if l.from_header => continue,
                Some(l) if now_ms - l.at_ms < DAMP_MS => continue,
                _ => {}
            }
            let bad = self.rate(budget, configured, now_ms);
            self.learned.insert(
                budget.to_string(),
                Learned {
                    per_min: (bad * BACKOFF).max(1.0),
                    at_ms: now_ms,
                    from_header: false,
                    bad,
                },
            );
            changed = true;
        }
        changed
    }
}

/// The format of [`Doc`] this build reads and writes.
pub const DOC_FORMAT: u32 = 1;

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// The shared state of one provider: its own scope and its models'.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Doc {
    /// The document's format ([`DOC_FORMAT`] when this build writes it; 0 in
    /// documents written before formats were numbered). A worker that meets
    /// a newer format waits instead of overwriting what it cannot read.
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub format: u32,
    pub provider: Scope,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, Scope>,
}

impl Doc {
    /// Admit a call to `model` in both scopes, all or nothing.
    pub fn admit(
        &mut self,
        lims: &ScopeLimits,
        model: &str,
        need: Need,
        holder: &str,
        now_ms: i64,
    ) -> Result<(), Duration> {
        let mut next = self.clone();
        let a = next.provider.admit(&lims.provider, need, holder, now_ms);
        let b = next.models.entry(model.to_string()).or_default().admit(
            lims.model(model),
            need,
            holder,
            now_ms,
        );
        match (a, b) {
            (Ok(()), Ok(())) => {
                *self = next;
                Ok(())
            }
            (Err(w), Ok(())) | (Ok(()), Err(w)) => Err(w),
            (Err(a), Err(b)) => Err(a.max(b)),
        }
    }

    pub fn settle(
        &mut self,
        lims: &ScopeLimits,
        model: &str,
        back: Correction,
        holder: &str,
        now_ms: i64,
    ) {
        self.provider.settle(&lims.provider, back, holder, now_ms);
        if let Some(s) = self.models.get_mut(model) {
            s.settle(lims.model(model), back, holder, now_ms);
        }
    }

    /// How long a call to `model` needing `this` would wait behind
    /// `queued` calls needing `ahead`, in both scopes.
    pub fn wait_for(
        &self,
        lims: &ScopeLimits,
        model: &str,
        queued: usize,
        ahead: Need,
        this: Need,
        now_ms: i64,
    ) -> Duration {
        let p = self
            .provider
            .wait_for(&lims.provider, queued, ahead, this, now_ms);
        let m = self.models.get(model).map_or(Duration::ZERO, |s| {
            s.wait_for(lims.model(model), queued, ahead, this, now_ms)
        });
        p.max(m)
    }

    /// Apply what a response from `model` said. Returns whether the
    /// document changed, and what to log.
    pub fn observe(
        &mut self,
        lims: &ScopeLimits,
        model: &str,
        seen: &Seen,
        now_ms: i64,
    ) -> (bool, Vec<String>) {
        let mut changed = false;
        let mut logs = Vec::new();
        if let Some(d) = seen.pause {
            if self.provider.pause_until(now_ms + d.as_millis() as i64) {
                changed = true;
                logs.push(format!(
                    "provider asked for a pause of {:.1}s",
                    d.as_secs_f64()
                ));
            }
        }
        let lim = lims.model(model);
        let scope = self.models.entry(model.to_string()).or_default();
        let mut explained = false;
        for (budget, limit) in &seen.limits {
            if let Some(configured) = lim.of(budget) {
                explained = true;
                if scope.learn_limit(budget, *limit, configured, now_ms) {
                    changed = true;
                    if *limit < u64::from(configured) {
                        logs.push(format!(
                            "provider enforces {limit} {budget}/min on {model}, configured {configured}"
                        ));
                    }
                }
            }
        }
        for (budget, remaining) in &seen.remaining {
            if let Some(configured) = lim.of(budget) {
                changed |= scope.sync_remaining(budget, *remaining, configured, now_ms);
            }
        }
        if seen.rate_limited && !explained && scope.back_off(lim, now_ms) {
            changed = true;
            logs.push(format!(
                "429 on {model} without limits; rate cut to {:.0}%",
                BACKOFF * 100.0
            ));
        }
        (changed, logs)
    }
}

/// What a response said about the provider's limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    /// Budget name → the limit per minute the provider stated.
    pub limits: Vec<(String, u64)>,
    /// Budget name → what the provider says is left.
    pub remaining: Vec<(String, u64)>,
    pub rate_limited: bool,
    /// The provider asked for no requests for this long.
    pub pause: Option<Duration>,
}

impl Seen {
    pub fn from_rate(rate: &RateInfo, rate_limited: bool, pause: Option<Duration>) -> Self {
        Self {
            limits: rate
                .budgets
                .iter()
                .filter_map(|b| Some((b.name.to_string(), b.limit?)))
                .collect(),
            remaining: rate
                .budgets
                .iter()
                .map(|b| (b.name.to_string(), b.remaining))
                .collect(),
            rate_limited,
            pause,
        }
    }

    fn is_empty(&self) -> bool {
        self.limits.is_empty()
            && self.remaining.is_empty()
            && !self.rate_limited
            && self.pause.is_none()
    }
}

/// The configured limits of a provider and of its models.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScopeLimits {
    pub provider: Limits,
    /// Per model with limits of its own.
    pub models: HashMap<String, Limits>,
    /// Any other model: no limits of its own; what it learns is capped by
    /// the provider's configured limits.
    pub default_model: Limits,
}

impl ScopeLimits {
    /// `ceiling`: the provider's configured per-minute limits (the upper
    /// bound of what a model can learn).
    pub fn new(
        provider: Limits,
        models: HashMap<String, Limits>,
        ceiling: BTreeMap<&'static str, u32>,
    ) -> Self {
        let default_model = Limits {
            ceiling,
            ..Limits::default()
        };
        Self {
            provider,
            models,
            default_model,
        }
    }

    pub fn model(&self, model: &str) -> &Limits {
        self.models.get(model).unwrap_or(&self.default_model)
    }
}

/// Open (creating if needed, with one replica) the KV bucket `<PREFIX>_LIMITS`.
pub async fn open_store(js: &jetstream::Context, prefix: &str) -> Result<kv::Store> {
    open_store_with(js, prefix, None).await
}

/// Open the KV bucket `<PREFIX>_LIMITS`, creating it with `replicas` copies
/// (`nats.replicas`; `None`: 1) or, when it exists with another count,
/// moving it to `replicas` (`None`: as it is).
///
/// A server of 2.10 or later gets the bucket from the client's own
/// `create_key_value`; 2.9 gets the backing stream made by hand (see the
/// module doc). Both make the same stream, so a fleet keeps its bucket
/// across a server upgrade.
pub async fn open_store_with(
    js: &jetstream::Context,
    prefix: &str,
    replicas: Option<usize>,
) -> Result<kv::Store> {
    let bucket = format!("{}_LIMITS", prefix.to_ascii_uppercase().replace('-', "_"));
    let name = format!("KV_{bucket}");
    if let Ok(store) = js.get_key_value(&bucket).await {
        if let Some(r) = replicas {
            let mut stream = js
                .get_stream(&name)
                .await
                .map_err(|e| anyhow::anyhow!("reading KV stream {name}: {e}"))?;
            let config = stream
                .info()
                .await
                .map_err(|e| anyhow::anyhow!("reading KV stream {name}: {e}"))?
                .config
                .clone();
            crate::bus::ensure_replicas(js, config, r).await?;
        }
        return Ok(store);
    }
    let num_replicas = replicas.unwrap_or(1);
    let version = crate::bus::parse_version(&js.client().server_info().version);
    if version.is_some_and(|v| v >= (2, 10)) {
        let made = js
            .create_key_value(kv::Config {
                bucket: bucket.clone(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas,
                ..Default::default()
            })
            .await;
        return match made {
            Ok(store) => Ok(store),
            // Another worker made it first.
            Err(e) => js.get_key_value(&bucket).await.map_err(|_| {
                anyhow::anyhow!(
                    "creating KV bucket {bucket}: {e}{}",
                    replicas_note(num_replicas)
                )
            }),
        };
    }
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_direct: true,
        allow_rollup: true,
        deny_delete: true,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        num_replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "creating KV stream {name}: {e}{}",
            replicas_note(num_replicas)
        )
    })?;
    js.get_key_value(&bucket)
        .await
        .map_err(|e| anyhow::anyhow!("opening KV bucket {bucket}: {e}"))
}

fn replicas_note(replicas: usize) -> String {
    if replicas > 1 {
        format!(
            " (nats.replicas = {replicas} needs a NATS cluster of at least {replicas} JetStream servers)"
        )
    } else {
        String::new()
    }
}

enum Backend {
    /// Calls go through the batching task behind `ops`; `store` serves
    /// reads and lease renewals.
    Kv {
        store: Box<kv::Store>,
        key: String,
        ops: mpsc::UnboundedSender<Op>,
    },
    Local(Mutex<Doc>),
}

/// A change a lane asks of the KV document.
enum Op {
    Admit {
        model: String,
        need: Need,
        reply: oneshot::Sender<Result<Result<(), Duration>, String>>,
    },
    Finish {
        model: String,
        back: Option<Correction>,
        seen: Seen,
        reply: oneshot::Sender<()>,
    },
}

struct Inner {
    provider: String,
    /// The local backend runs on tokio's clock (tests can drive it); KV
    /// state is shared between machines, so it runs on the wall clock.
    clock: (i64, tokio::time::Instant),
    backend: Backend,
    lims: ScopeLimits,
    holder: String,
    in_flight: Arc<AtomicU32>,
}

/// A provider's shared limiter: in KV for the fleet, or in memory.
#[derive(Clone)]
pub struct SharedLimiter(Arc<Inner>);

impl SharedLimiter {
    /// Limits held in this process only.
    pub fn local(provider: &str, lims: ScopeLimits) -> Self {
        Self::build(provider, Backend::Local(Mutex::new(Doc::default())), lims)
    }

    /// Limits held across every process sharing `store`. A task applies
    /// this process's admissions and settlements in batches, one
    /// compare-and-set per batch; another renews this process's in-flight
    /// lease while it has calls in flight.
    ///
    /// Both run on `tasks`: the batcher ends when the last clone of this
    /// limiter is dropped (after applying what is queued), the renewer on
    /// `tasks`' token.
    pub fn fleet(provider: &str, store: kv::Store, lims: ScopeLimits, tasks: &Tasks) -> Self {
        let key = provider.to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        let holder = new_holder();
        let in_flight = Arc::new(AtomicU32::new(0));
        tasks.spawn(apply_batches(Batcher {
            provider: provider.to_string(),
            in_flight: in_flight.clone(),
            store: store.clone(),
            key: key.clone(),
            lims: lims.clone(),
            holder: holder.clone(),
            ops: rx,
        }));
        let me = Self(Arc::new(Inner {
            provider: provider.to_string(),
            clock: (now_ms(), tokio::time::Instant::now()),
            backend: Backend::Kv {
                store: Box::new(store),
                key,
                ops: tx,
            },
            lims,
            holder,
            in_flight,
        }));
        tasks.spawn(renew_leases(Arc::downgrade(&me.0), tasks.token().clone()));
        me
    }

    fn build(provider: &str, backend: Backend, lims: ScopeLimits) -> Self {
        Self(Arc::new(Inner {
            provider: provider.to_string(),
            clock: (now_ms(), tokio::time::Instant::now()),
            backend,
            lims,
            holder: new_holder(),
            in_flight: Arc::new(AtomicU32::new(0)),
        }))
    }

    fn now(&self) -> i64 {
        match self.0.backend {
            Backend::Kv { .. } => now_ms(),
            Backend::Local(_) => {
                let (base, at) = self.0.clock;
                base + at.elapsed().as_millis() as i64
            }
        }
    }

    /// Try once to admit a call to `model`: `Ok(Err(wait))` if it must wait.
    pub async fn try_admit(&self, model: &str, need: Need) -> Result<Result<(), Duration>> {
        // Counted before the attempt, so a renewal never sees fewer calls
        // in flight here than the shared lease holds.
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        let r = match &self.0.backend {
            Backend::Local(doc) => {
                let now = self.now();
                let mut d = doc.lock().expect("limits lock");
                Ok(d.admit(&self.0.lims, model, need, &self.0.holder, now))
            }
            Backend::Kv { ops, .. } => {
                let (reply, rx) = oneshot::channel();
                let op = Op::Admit {
                    model: model.to_string(),
                    need,
                    reply,
                };
                match ops.send(op) {
                    Err(_) => Err(anyhow::anyhow!("the limits task has stopped")),
                    Ok(()) => match rx.await {
                        Ok(Ok(r)) => Ok(r),
                        Ok(Err(e)) => Err(anyhow::anyhow!(e)),
                        Err(_) => Err(anyhow::anyhow!("the limits task has stopped")),
                    },
                }
            }
        };
        if !matches!(r, Ok(Ok(()))) {
            self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        r
    }

    /// Wait until a call to `model` is admitted. Fails closed: while the
    /// state cannot be reached it waits, and says so.
    pub async fn admit(&self, model: &str, need: Need) {
        let mut warned = false;
        loop {
            match self.try_admit(model, need).await {
                Ok(Ok(())) => return,
                Ok(Err(wait)) => tokio::time::sleep(wait.min(Duration::from_secs(1))).await,
                Err(e) => {
                    if !warned {
                        tracing::warn!(provider = %self.0.provider, error = %format!("{e:#}"),
                            "shared limiter unreachable; not sending until it is back");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Correct an admitted call's reservation by what the provider
    /// counted, and give back its slot.
    pub async fn settle(&self, model: &str, back: Correction) {
        self.finish(model, Some(back), Seen::default()).await;
    }

    /// Learn from what a response said, without settling a call.
    pub async fn observe(&self, model: &str, seen: Seen) {
        self.finish(model, None, seen).await;
    }

    /// One change for the end of a call: settle its reservation (`back`)
    /// and slot, and learn from the response (`seen`): the provider's stated
    /// limits and remaining counts, a 429, a pause.
    pub async fn finish(&self, model: &str, back: Option<Correction>, seen: Seen) {
        if let Some(applied) = self.start_finish(model, back, seen) {
            let _ = applied.await;
        }
    }

    /// [`finish`](Self::finish) without waiting for the shared write: the
    /// change is queued in order, behind this process's earlier ones.
    pub fn finish_detached(&self, model: &str, back: Option<Correction>, seen: Seen) {
        let _ = self.start_finish(model, back, seen);
    }

    /// Apply (local) or queue (KV) the end of a call; the local in-flight
    /// count drops once the shared lease has, so a renewal never undercounts.
    fn start_finish(
        &self,
        model: &str,
        back: Option<Correction>,
        seen: Seen,
    ) -> Option<oneshot::Receiver<()>> {
        let release = || {
            if back.is_some() {
                self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        };
        match &self.0.backend {
            Backend::Local(doc) => {
                self.finish_local(doc, model, back, &seen);
                release();
                None
            }
            Backend::Kv { .. } if back.is_none() && seen.is_empty() => None,
            Backend::Kv { ops, .. } => {
                let (reply, rx) = oneshot::channel();
                let op = Op::Finish {
                    model: model.to_string(),
                    back,
                    seen,
                    reply,
                };
                if ops.send(op).is_err() {
                    release();
                    return None;
                }
                Some(rx)
            }
        }
    }

    fn finish_local(&self, doc: &Mutex<Doc>, model: &str, back: Option<Correction>, seen: &Seen) {
        let now = self.now();
        let mut d = doc.lock().expect("limits lock");
        if let Some(back) = back {
            d.settle(&self.0.lims, model, back, &self.0.holder, now);
        }
        let (_, logs) = d.observe(&self.0.lims, model, seen, now);
        for l in logs {
            tracing::warn!(provider = %self.0.provider, "{l}");
        }
    }

    /// How long a call to `model` needing `this` would wait for the shared
    /// budgets behind `queued` calls of this process needing `ahead` (one
    /// read; other processes' queues are not seen).
    pub async fn expected_wait(
        &self,
        model: &str,
        queued: usize,
        ahead: Need,
        this: Need,
    ) -> Result<Duration> {
        let doc = self.snapshot().await?;
        Ok(doc.wait_for(&self.0.lims, model, queued, ahead, this, self.now()))
    }

    /// The shared state now (for tests and diagnostics).
    pub async fn snapshot(&self) -> Result<Doc> {
        match &self.0.backend {
            Backend::Local(doc) => Ok(doc.lock().expect("limits lock").clone()),
            Backend::Kv { store, key, .. } => Ok(read_doc(store, key).await?.0),
        }
    }

    /// Keep this process's in-flight lease alive, or drop it when this
    /// process has nothing in flight.
    pub async fn renew(&self) -> Result<()> {
        if self.0.lims.provider.concurrency.is_none() {
            return Ok(());
        }
        let Backend::Kv { store, key, .. } = &self.0.backend else {
            return Ok(());
        };
        let holder = &self.0.holder;
        loop {
            let (mut doc, revision) = read_doc(store, key).await?;
            let Some(lease) = doc.provider.leases.get(holder).copied() else {
                return Ok(());
            };
            // The local count is read last and never lags the shared one
            // (it is raised before an admission is tried).
            let n = self.0.in_flight.load(Ordering::SeqCst);
            doc.provider.renew(holder, lease.n.min(n), now_ms());
            if write_doc(store, key, &doc, revision).await? {
                return Ok(());
            }
        }
    }
}

fn new_holder() -> String {
    format!("{}-{}", std::process::id(), crate::ids::new_job_id())
}

/// The document and its revision (`None`: no document yet). Fails closed:
/// a document that cannot be parsed, or has a newer format than this build
/// knows, is an error (the lanes wait) — never replaced by full buckets.
///
/// The read goes to the stream's leader (`STREAM.MSG.GET`), not to KV's
/// direct get: with replicas a direct get may be answered by a follower
/// that has not yet applied the last write, and every compare-and-set on
/// that stale revision would fail.
async fn read_doc(store: &kv::Store, key: &str) -> Result<(Doc, Option<u64>)> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
    let subject = format!("{}{key}", store.prefix);
    let entry = match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => Some(m),
        Err(e) if matches!(e.kind(), K::NoMessageFound) => None,
        Err(e) => return Err(anyhow::Error::new(e).context(format!("reading the limits of {key}"))),
    };
    let doc = match entry.as_ref().filter(|e| !e.payload.is_empty()) {
        None => Doc::default(),
        Some(e) => parse_doc(&e.payload).with_context(|| format!("the limits of {key}"))?,
    };
    Ok((doc, entry.map(|e| e.sequence)))
}

/// A stored document, if this build can read it (pure).
pub fn parse_doc(bytes: &[u8]) -> Result<Doc> {
    let doc: Doc = serde_json::from_slice(bytes).context("unreadable limits document")?;
    anyhow::ensure!(
        doc.format <= DOC_FORMAT,
        "limits document format {} is newer than this worker's {DOC_FORMAT}: upgrade this worker",
        doc.format
    );
    Ok(doc)
}

/// Write `doc` if the key is still at `revision`: `Ok(false)` if another
/// process wrote first; an error if the write itself failed.
async fn write_doc(store: &kv::Store, key: &str, doc: &Doc, revision: Option<u64>) -> Result<bool> {
    let doc = Doc {
        format: DOC_FORMAT,
        ..doc.clone()
    };
    let body: bytes::Bytes = serde_json::to_vec(&doc)?.into();
    // A conflict is the revision having moved (another process wrote
    // first): read again and retry. Any other failure may or may not have
    // written: the revision tells.
    let written: Result<(), anyhow::Error> = match revision {
        Some(r) => match store.update(key, body, r).await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(e.kind(), kv::UpdateErrorKind::WrongLastRevision) || conflict(&e) =>
            {
                return Ok(false)
            }
            Err(e) => Err(e.into()),
        },
        None => match store.create(key, body).await {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind(), kv::CreateErrorKind::AlreadyExists) || conflict(&e) => {
                return Ok(false)
            }
            Err(e) => Err(e.into()),
        },
    };
    match written {
        Ok(()) => Ok(true),
        Err(e) => {
            let (_, now_rev) = read_doc(store, key).await?;
            if now_rev == revision {
                Err(e.context(format!("writing the limits of {key}")))
            } else {
                Ok(false)
            }
        }
    }
}

/// Whether a failed write says the key's last revision was not the one
/// expected: 10071, or 10164, which a clustered stream's leader answers
/// while an earlier write to the same key is still being replicated (the
/// client reports that one as "other"). Either way: read again, retry.
fn conflict(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if s.contains("wrong last sequence") || s.contains("10071") || s.contains("10164") {
            return true;
        }
        cur = err.source();
    }
    false
}

struct Batcher {
    provider: String,
    /// This process's calls in flight, lowered as their settlements apply.
    in_flight: Arc<AtomicU32>,
    store: kv::Store,
    key: String,
    lims: ScopeLimits,
    holder: String,
    ops: mpsc::UnboundedReceiver<Op>,
}

/// Most changes applied in one compare-and-set.
const BATCH: usize = 256;

/// Apply queued changes in batches: read the document, apply every change
/// in order, write once; on a conflict, again from a fresh read. Admissions
/// are answered with the outcome; when the state cannot be read or written
/// they get the error (their lane waits), settlements are retried.
async fn apply_batches(mut b: Batcher) {
    let mut batch: Vec<Op> = Vec::new();
    // Whether the last try failed (logged and shown once per outage).
    let mut unavailable = false;
    loop {
        if batch.is_empty() {
            match b.ops.recv().await {
                Some(op) => batch.push(op),
                None => return,
            }
        }
        while batch.len() < BATCH {
            match b.ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        match apply_once(&b, &batch).await {
            Ok(Some(outcomes)) => {
                if unavailable {
                    tracing::info!(provider = %b.provider, "shared limits available again");
                    unavailable = false;
                    crate::metrics::global().set(
                        "switchyard_limits_unavailable",
                        &[("provider", b.provider.as_str())],
                        0.0,
                    );
                }
                for (op, outcome) in batch.drain(..).zip(outcomes) {
                    match op {
                        Op::Admit { reply, .. } => {
                            let _ = reply.send(Ok(outcome));
                        }
                        Op::Finish { reply, back, .. } => {
                            if back.is_some() {
                                b.in_flight.fetch_sub(1, Ordering::SeqCst);
                            }
                            let _ = reply.send(());
                        }
                    }
                }
            }
            Ok(None) => {} // another process wrote first: again
            Err(e) => {
                let why = format!("{e:#}");
                if !unavailable {
                    // Once per outage, not once per try.
                    tracing::warn!(provider = %b.provider, error = %why,
                        "shared limits unavailable; this provider's calls wait until they are back");
                    unavailable = true;
                    crate::metrics::global().set(
                        "switchyard_limits_unavailable",
                        &[("provider", b.provider.as_str())],
                        1.0,
                    );
                }
                // Admissions fail now; settlements wait for the next try.
                let mut keep = Vec::new();
                for op in batch.drain(..) {
                    match op {
                        Op::Admit { reply, .. } => {
                            let _ = reply.send(Err(why.clone()));
                        }
                        finish => keep.push(finish),
                    }
                }
                batch = keep;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One read-apply-write of `batch`: the admissions' outcomes (settlements
/// get `Ok`), or `None` if another process wrote first.
async fn apply_once(b: &Batcher, batch: &[Op]) -> Result<Option<Vec<Result<(), Duration>>>> {
    let (mut doc, revision) = read_doc(&b.store, &b.key).await?;
    let now = now_ms();
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut changed = false;
    let mut logs = Vec::new();
    for op in batch {
        match op {
            Op::Admit { model, need, .. } => {
                let r = doc.admit(&b.lims, model, *need, &b.holder, now);
                changed |= r.is_ok();
                outcomes.push(r);
            }
            Op::Finish {
                model, back, seen, ..
            } => {
                if let Some(back) = back {
                    doc.settle(&b.lims, model, *back, &b.holder, now);
                    changed = true;
                }
                let (c, mut l) = doc.observe(&b.lims, model, seen, now);
                changed |= c;
                logs.append(&mut l);
                outcomes.push(Ok(()));
            }
        }
    }
    if changed && !write_doc(&b.store, &b.key, &doc, revision).await? {
        return Ok(None);
    }
    for l in logs {
        tracing::warn!(provider = %b.provider, "{l}");
    }
    Ok(Some(outcomes))
}

async fn renew_leases(weak: Weak<Inner>, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RENEW_EVERY) => {}
        }
        let Some(inner) = weak.upgrade() else { return };
        let me = SharedLimiter(inner);
        if let Err(e) = me.renew().await {
            tracing::warn!(provider = %me.0.provider, error = %format!("{e:#}"), "could not renew the in-flight lease");
        }
    }
}

/// The limits of provider `name` and of its models that have their own:
/// what its lanes hold in common (fleet-wide concurrency only when fleet).
pub fn scope_limits(cfg: &Config, name: &str) -> ScopeLimits {
    let p = &cfg.providers[name];
    let budgets = |rpm: u32, tpm: u32, input: Option<u32>, output: Option<u32>| {
        let mut m = std::collections::BTreeMap::new();
        m.insert(REQUESTS, rpm);
        m.insert(TOKENS, tpm);
        if let Some(v) = input {
            m.insert(INPUT_TOKENS, v);
        }
        if let Some(v) = output {
            m.insert(OUTPUT_TOKENS, v);
        }
        m
    };
    let configured = budgets(p.rpm, p.tpm, p.input_tpm, p.output_tpm);
    // Fleet-wide, the shared state holds the provider's limits; per
    // process, the lane's own buckets do, and the shared state (in
    // memory) holds only model limits and what the provider teaches.
    let provider = Limits {
        per_min: if p.is_fleet() {
            configured.clone()
        } else {
            Default::default()
        },
        ceiling: configured.clone(),
        concurrency: p.is_fleet().then_some(p.max_concurrency as u32),
    };
    let models = cfg
        .models
        .iter()
        .filter(|(_, m)| m.provider == name)
        .filter(|(_, m)| {
            m.rpm.is_some() || m.tpm.is_some() || m.input_tpm.is_some() || m.output_tpm.is_some()
        })
        .map(|(id, m)| {
            let mut per_min = std::collections::BTreeMap::new();
            for (b, v) in [
                (REQUESTS, m.rpm),
                (TOKENS, m.tpm),
                (INPUT_TOKENS, m.input_tpm),
                (OUTPUT_TOKENS, m.output_tpm),
            ] {
                if let Some(v) = v {
                    per_min.insert(b, v);
                }
            }
            let lim = Limits {
                per_min,
                ceiling: configured.clone(),
                concurrency: None,
            };
            (id.clone(), lim)
        })
        .collect();
    ScopeLimits::new(provider, models, configured)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lims(rpm: u32, tpm: u32, concurrency: Option<u32>) -> Limits {
        let mut per_min = BTreeMap::new();
        per_min.insert(REQUESTS, rpm);
        per_min.insert(TOKENS, tpm);
        Limits {
            per_min,
            concurrency,
            ..Limits::default()
        }
    }

    const NEED: Need = Need {
        input: 60,
        output: 40,
    };

    #[test]
    fn admission_takes_every_budget_or_none() {
        // 600 RPM (holds 5) and 6,000 TPM (holds 50 tokens).
        let l = lims(600, 6_000, None);
        let mut s = Scope::default();
        // 100 tokens > 50: runs on the full bucket, leaving a debt of 50.
        s.admit(&l, NEED, "a", 0).unwrap();
        let tokens_before = s.buckets[TOKENS];
        let requests_before = s.buckets[REQUESTS];
        // The token budget is short: nothing is taken, not even a request.
        let wait = s.admit(&l, NEED, "a", 0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(1000)); // 100 tokens at 100/s
        assert_eq!(s.buckets[TOKENS], tokens_before);
        assert_eq!(s.buckets[REQUESTS], requests_before);
        // Unused reservation comes back: 60 of 100 unused.
        s.settle(
            &l,
            Correction {
                input: 0,
                output: 60,
            },
            "a",
            0,
        );
        assert_eq!(s.buckets[TOKENS].tokens, 10.0);
        assert_eq!(
            s.buckets[REQUESTS], requests_before,
            "a request is never refunded"
        );
        assert!(s
            .admit(
                &l,
                Need {
                    input: 10,
                    output: 0
                },
                "a",
                0
            )
            .is_ok());
    }

    #[test]
    fn leases_cap_in_flight_and_expire_with_their_process() {
        let l = lims(60_000, 60_000_000, Some(2));
        let mut s = Scope::default();
        s.admit(&l, NEED, "dead", 0).unwrap();
        s.admit(&l, NEED, "alive", 0).unwrap();
        assert_eq!(s.in_flight(0), 2);
        let wait = s.admit(&l, NEED, "alive", 10).unwrap_err();
        assert!(wait <= SLOT_POLL);
        // The live process renews; the dead one cannot.
        s.renew("alive", 1, 10_000);
        assert!(s.admit(&l, NEED, "alive", LEASE_MS - 1).is_err());
        s.admit(&l, NEED, "alive", LEASE_MS).unwrap();
        assert_eq!(s.leases.len(), 1, "the dead process's lease is gone");
        assert_eq!(s.in_flight(LEASE_MS), 2);
        // Settling gives a slot back; the last one removes the lease.
        s.settle(&l, Correction::default(), "alive", LEASE_MS + 1);
        s.settle(&l, Correction::default(), "alive", LEASE_MS + 2);
        assert!(s.leases.is_empty());
    }

    #[test]
    fn a_pause_is_never_shortened_and_holds_admissions() {
        let l = lims(600, 60_000, None);
        let mut s = Scope::default();
        assert!(s.pause_until(5_000));
        assert!(!s.pause_until(3_000));
        assert_eq!(
            s.admit(&l, NEED, "a", 1_000).unwrap_err(),
            Duration::from_millis(4_000)
        );
        assert!(s.admit(&l, NEED, "a", 5_000).is_ok());
    }

    #[test]
    fn stated_limits_bind_until_they_change_and_429s_back_off_then_recover() {
        let l = lims(600, 60_000, None);
        let mut s = Scope::default();
        assert!(s.learn_limit(REQUESTS, 120, 600, 0));
        assert!(!s.learn_limit(REQUESTS, 120, 600, 1), "unchanged: no write");
        assert_eq!(s.rate(REQUESTS, 600, 1_000_000), 120.0);
        // A limit above the configured one is held at the configured one.
        assert!(s.learn_limit(TOKENS, 90_000, 60_000, 0));
        assert_eq!(s.rate(TOKENS, 60_000, 0), 60_000.0);
        assert!(s.learn_limit(REQUESTS, 600, 600, 2), "back to configured");
        assert_eq!(s.rate(REQUESTS, 600, 2), 600.0);
        s.learned.clear();

        // A 429 with no stated limit: cut, once per burst...
        assert!(s.back_off(&l, 10_000));
        assert_eq!(s.rate(REQUESTS, 600, 10_000), 600.0 * BACKOFF);
        assert!(!s.back_off(&l, 10_000 + DAMP_MS - 1));
        // ...climbing back evenly toward 95% of the rate that drew it:
        let half = 10_000 + REGAIN_MS / 2;
        let expect = 300.0 + (570.0 - 300.0) / 2.0;
        assert!((s.rate(REQUESTS, 600, half) - expect).abs() < 1e-9);
        // A second 429 at that rate cuts from there and aims below it.
        let t2 = half;
        assert!(s.back_off(&l, t2));
        assert!((s.rate(REQUESTS, 600, t2) - expect * BACKOFF).abs() < 1e-9);
        let regained = t2 + REGAIN_MS;
        assert!((s.rate(REQUESTS, 600, regained) - 0.95 * expect).abs() < 1e-9);
        // ...then probing upward by PROBE_PER_MIN a minute, to the configured limit.
        let later = regained + 60_000;
        let probed = 0.95 * expect * (1.0 + PROBE_PER_MIN);
        assert!((s.rate(REQUESTS, 600, later) - probed).abs() < 1e-9);
        assert_eq!(s.rate(REQUESTS, 600, later + 3_600_000), 600.0);
        // Recovered limits are dropped at the next admission.
        s.admit(&l, NEED, "a", later + 3_600_000).unwrap();
        assert!(s.learned.is_empty());
        // A stated limit is not overridden by 429s.
        s.learn_limit(REQUESTS, 300, 600, 0);
        assert!(s.back_off(&l, 0), "tokens still back off");
        assert_eq!(s.rate(REQUESTS, 600, 0), 300.0);
    }

    #[test]
    fn the_expected_wait_counts_the_queue_and_the_pause() {
        // 6,000 TPM: 100 a second, the bucket holds 50.
        let l = lims(600_000, 6_000, None);
        let mut s = Scope::default();
        let one = Need {
            input: 20,
            output: 20,
        };
        let none = Need::default();
        assert_eq!(s.wait_for(&l, 0, none, one, 0), Duration::ZERO);
        s.admit(&l, one, "a", 0).unwrap(); // 10 left
                                           // This call (40) behind two queued calls (80): 110 short of 10.
        let ahead = Need {
            input: 60,
            output: 20,
        };
        assert_eq!(
            s.wait_for(&l, 2, ahead, one, 0),
            Duration::from_millis(1100)
        );
        // A call larger than the bucket needs a full bucket, not all of it.
        let big = Need {
            input: 500,
            output: 0,
        };
        assert_eq!(s.wait_for(&l, 0, none, big, 0), Duration::from_millis(400));
        s.pause_until(5_000);
        assert_eq!(
            s.wait_for(&l, 0, none, one, 0),
            Duration::from_millis(5_000)
        );
    }

    #[test]
    fn the_providers_remaining_count_tightens_the_bucket() {
        // 6,000 RPM: our bucket holds 50 requests.
        let l = lims(6_000, 6_000_000, None);
        let mut s = Scope::default();
        s.admit(&l, NEED, "a", 0).unwrap();
        assert_eq!(s.buckets[REQUESTS].tokens, 49.0);
        // The provider says only 3 are left (someone else uses the account).
        assert!(s.sync_remaining(REQUESTS, 3, 6_000, 0));
        assert!(!s.sync_remaining(REQUESTS, 10, 6_000, 0), "never loosens");
        for _ in 0..3 {
            s.admit(&l, NEED, "a", 0).unwrap();
        }
        assert_eq!(
            s.admit(&l, NEED, "a", 0).unwrap_err(),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn a_document_admits_in_the_provider_and_the_model_scope() {
        let mut models = HashMap::new();
        models.insert("small".to_string(), lims(60, 60_000, None));
        let provider = lims(6_000, 600_000, Some(10));
        let sl = ScopeLimits::new(provider.clone(), models, provider.per_min);
        let mut d = Doc::default();
        // The model's own 60 RPM holds 1 request; the provider's holds 50.
        d.admit(&sl, "small", NEED, "p", 0).unwrap();
        assert!(d.admit(&sl, "small", NEED, "p", 0).is_err());
        assert_eq!(d.provider.in_flight(0), 1, "a refused call takes no slot");
        d.admit(&sl, "large", NEED, "p", 0).unwrap();
        // A stated limit is learned for the model it came from only.
        let seen = Seen {
            limits: vec![(REQUESTS.into(), 120)],
            ..Default::default()
        };
        let (changed, logs) = d.observe(&sl, "large", &seen, 0);
        assert!(changed);
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_eq!(d.models["large"].rate(REQUESTS, 6_000, 0), 120.0);
        assert!(d.provider.learned.is_empty());
        // The document survives a round trip through KV's bytes.
        let back: Doc = serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }
}
