//! Fleet-wide token buckets in NATS KV (work in progress for the fleet-limits
//! issue; not yet wired into the lanes).
//!
//! One KV key per budget (e.g. `openai.rpm`) holds a token bucket's state.
//! A process takes tokens with compare-and-set on the key's revision, so any
//! number of processes share one budget exactly; a conflict just retries
//! with the fresh state. Refunds add tokens back the same way. The bucket
//! arithmetic is pure ([`BucketState::take`]) and tested with explicit times.
//!
//! NATS 2.9: async-nats 0.51's `create_key_value` fails against 2.9, so the
//! KV's backing stream is created by hand (see DESIGN.md) and then opened
//! with `get_key_value`.

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, kv, stream};
use serde::{Deserialize, Serialize};

use crate::bus::now_ms;

/// A token bucket's shared state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BucketState {
    /// Tokens available at `at_ms`.
    pub tokens: f64,
    /// When `tokens` was computed, Unix milliseconds.
    pub at_ms: i64,
}

/// A bucket's shape: `capacity` tokens, refilled at `capacity` per `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub capacity: f64,
    pub per_ms: f64,
}

impl Shape {
    pub fn per_minute(limit: u32) -> Self {
        let capacity = f64::from(limit.max(1));
        Self {
            capacity,
            per_ms: capacity / 60_000.0,
        }
    }
}

impl BucketState {
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

    /// Take `n` tokens at `now_ms` (requests above the capacity are clamped
    /// to it), or say how long until they are there.
    pub fn take(self, shape: Shape, n: f64, now_ms: i64) -> Result<Self, Duration> {
        let n = n.min(shape.capacity);
        let s = self.refilled(shape, now_ms);
        if s.tokens >= n {
            Ok(Self {
                tokens: s.tokens - n,
                ..s
            })
        } else {
            let ms = ((n - s.tokens) / shape.per_ms).ceil().max(1.0);
            Err(Duration::from_millis(ms as u64))
        }
    }

    /// Give back `n` unused tokens.
    pub fn refund(self, shape: Shape, n: f64, now_ms: i64) -> Self {
        let s = self.refilled(shape, now_ms);
        Self {
            tokens: (s.tokens + n).min(shape.capacity),
            ..s
        }
    }
}

/// Open (creating if needed) the KV bucket `<PREFIX>_LIMITS`.
pub async fn open_store(js: &jetstream::Context, prefix: &str) -> Result<kv::Store> {
    let bucket = format!("{}_LIMITS", prefix.to_ascii_uppercase().replace('-', "_"));
    let name = format!("KV_{bucket}");
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_direct: true,
        allow_rollup: true,
        deny_delete: true,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating KV stream {name}: {e}"))?;
    js.get_key_value(&bucket)
        .await
        .map_err(|e| anyhow::anyhow!("opening KV bucket {bucket}: {e}"))
}

/// One budget shared by every process through a KV key.
#[derive(Clone)]
pub struct FleetBucket {
    store: kv::Store,
    key: String,
    shape: Shape,
}

impl FleetBucket {
    pub fn new(store: kv::Store, key: &str, shape: Shape) -> Self {
        Self {
            store,
            key: key.to_string(),
            shape,
        }
    }

    /// One compare-and-set attempt of `f` on the current state. `Ok(None)`:
    /// another process won the race; try again.
    async fn cas<T>(
        &self,
        f: impl Fn(BucketState, i64) -> Result<(BucketState, T), Duration>,
    ) -> Result<Option<Result<T, Duration>>> {
        let now = now_ms();
        let entry = self
            .store
            .entry(&self.key)
            .await
            .with_context(|| format!("reading limit {}", self.key))?;
        let (state, revision) = match &entry {
            Some(e) if !e.value.is_empty() => (
                serde_json::from_slice::<BucketState>(&e.value)
                    .unwrap_or_else(|_| BucketState::full(self.shape, now)),
                Some(e.revision),
            ),
            Some(e) => (BucketState::full(self.shape, now), Some(e.revision)),
            None => (BucketState::full(self.shape, now), None),
        };
        let (next, out) = match f(state, now) {
            Ok(v) => v,
            Err(wait) => return Ok(Some(Err(wait))),
        };
        let body: bytes::Bytes = serde_json::to_vec(&next)?.into();
        let written = match revision {
            Some(r) => self.store.update(&self.key, body, r).await.is_ok(),
            None => self.store.create(&self.key, body).await.is_ok(),
        };
        Ok(written.then_some(Ok(out)))
    }

    /// Take `n` tokens now, or learn how long to wait.
    pub async fn try_take(&self, n: f64) -> Result<Result<(), Duration>> {
        loop {
            let shape = self.shape;
            if let Some(r) = self
                .cas(|s, now| s.take(shape, n, now).map(|s| (s, ())))
                .await?
            {
                return Ok(r);
            }
        }
    }

    /// Wait until `n` tokens are taken.
    pub async fn take(&self, n: f64) -> Result<()> {
        loop {
            match self.try_take(n).await? {
                Ok(()) => return Ok(()),
                Err(wait) => tokio::time::sleep(wait.min(Duration::from_secs(5))).await,
            }
        }
    }

    /// Give back `n` unused tokens.
    pub async fn refund(&self, n: f64) -> Result<()> {
        let shape = self.shape;
        loop {
            if self
                .cas(|s, now| Ok((s.refund(shape, n, now), ())))
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_arithmetic_with_explicit_time() {
        let shape = Shape::per_minute(600); // 10 per second
        let s = BucketState::full(shape, 0);
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
        // A request larger than the capacity is clamped, so it can run.
        assert!(BucketState::full(shape, 0).take(shape, 1e9, 0).is_ok());
    }
}

/// A provider-imposed pause shared by every process: when one lane learns
/// (from a 429 or an exhausted budget) that the provider wants no requests
/// until T, every lane of that provider waits until T.
#[derive(Clone)]
pub struct FleetPause {
    store: kv::Store,
    key: String,
}

impl FleetPause {
    pub fn new(store: kv::Store, key: &str) -> Self {
        Self {
            store,
            key: key.to_string(),
        }
    }

    /// Unix milliseconds until which the provider is paused (0: not paused).
    pub async fn until_ms(&self) -> Result<i64> {
        let entry = self
            .store
            .entry(&self.key)
            .await
            .with_context(|| format!("reading pause {}", self.key))?;
        Ok(entry
            .and_then(|e| std::str::from_utf8(&e.value).ok()?.parse::<i64>().ok())
            .unwrap_or(0))
    }

    /// Pause every process until `until_ms` (never shortens a pause).
    pub async fn extend(&self, until_ms: i64) -> Result<()> {
        for _ in 0..10 {
            let entry = self.store.entry(&self.key).await?;
            let current = entry
                .as_ref()
                .and_then(|e| std::str::from_utf8(&e.value).ok()?.parse::<i64>().ok())
                .unwrap_or(0);
            if current >= until_ms {
                return Ok(());
            }
            let body: bytes::Bytes = until_ms.to_string().into_bytes().into();
            let ok = match entry {
                Some(e) => self.store.update(&self.key, body, e.revision).await.is_ok(),
                None => self.store.create(&self.key, body).await.is_ok(),
            };
            if ok {
                return Ok(());
            }
        }
        anyhow::bail!("pause {} kept changing under us", self.key)
    }
}
