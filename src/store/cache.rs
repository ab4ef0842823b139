//! The response cache (`response_cache`): answers already paid for, by a
//! hash of the normalised provider request, and the claims that coalesce
//! identical requests in flight across the fleet.
//!
//! Postgres rather than NATS KV: an entry is written where the call's cost
//! record is, expiry and pruning are one indexed `DELETE`, analysts can see
//! what was reused, and the coalescing claim is an `INSERT … ON CONFLICT`
//! whose winner is decided by the database (a KV bucket would need a
//! compare-and-set loop and a second store to reconcile).

use std::time::Duration;

use anyhow::Result;
use rust_decimal::Decimal;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::envelope::Part;
use crate::pricing::Usage;
use crate::providers::CallRequest;

/// The cache key of a provider request (pure): a SHA-256 over the
/// provider, the model, every message (role, text, each image by a digest
/// of its data or its URL), `max_tokens`, `temperature`, the answer format
/// and how it is asked for, and `scope` (the category, or nothing for the
/// global scope). Job ids, metadata and tags are not part of it.
pub fn key(provider: &str, req: &CallRequest, scope: &str) -> String {
    let messages: Vec<serde_json::Value> = req
        .messages
        .iter()
        .map(|m| {
            let images: Vec<String> = m
                .images()
                .map(|p| match p {
                    Part::Image { url: Some(u), .. } => format!("url:{u}"),
                    Part::Image {
                        data, media_type, ..
                    } => format!(
                        "{}:{:x}",
                        media_type.as_deref().unwrap_or(""),
                        Sha256::digest(data.as_deref().unwrap_or("").as_bytes())
                    ),
                    Part::Text { .. } => String::new(),
                })
                .collect();
            serde_json::json!([m.role, m.content, images])
        })
        .collect();
    let normalised = serde_json::json!({
        "v": 1,
        "scope": scope,
        "provider": provider,
        "model": req.model,
        "messages": messages,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "format": req.response_format,
        "structured": req.structured,
    });
    format!("{:x}", Sha256::digest(normalised.to_string().as_bytes()))
}

/// A ready answer.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Entry {
    pub output: String,
    pub finish_reason: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_input_tokens: i64,
    pub reasoning_tokens: i64,
}

impl Entry {
    pub fn usage(&self) -> Usage {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Usage {
            input_tokens: n(self.input_tokens),
            output_tokens: n(self.output_tokens),
            cached_input_tokens: n(self.cached_input_tokens),
            cache_write_input_tokens: n(self.cache_write_input_tokens),
            reasoning_tokens: n(self.reasoning_tokens),
        }
    }
}

/// The ready, unexpired answer under `key`, counted as a hit.
pub async fn hit(pool: &PgPool, key: &str) -> Result<Option<Entry>> {
    Ok(sqlx::query_as(
        "UPDATE response_cache SET hits = hits + 1, last_hit_at = now()
         WHERE key = $1 AND state = 'ready' AND expires_at > now()
         RETURNING output, finish_reason, input_tokens, output_tokens, cached_input_tokens,
                   cache_write_input_tokens, reasoning_tokens",
    )
    .bind(key)
    .fetch_optional(pool)
    .await?)
}

/// Whether a ready, unexpired answer is under `key` (not counted as a hit).
pub async fn has(pool: &PgPool, key: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM response_cache
                        WHERE key = $1 AND state = 'ready' AND expires_at > now())",
    )
    .bind(key)
    .fetch_one(pool)
    .await?)
}

/// Who is to call the provider for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This caller: it calls, then fills or releases the entry.
    Mine,
    /// Another caller is under way; wait for its answer.
    Busy,
    /// A ready answer is there now.
    Ready,
}

/// Claim `key` for `owner` for `hold` (its call's timeout): taken when it
/// is free, expired, or a claim that outlived its time.
pub async fn claim(
    pool: &PgPool,
    key: &str,
    who: (&str, &str, &str),
    owner: &str,
    hold: Duration,
) -> Result<Claim> {
    let (category, provider, model) = who;
    let row: Option<(String, Option<String>)> = sqlx::query_as(
        "INSERT INTO response_cache (key, category, provider, model, state, owner,
                                     pending_until, expires_at)
         VALUES ($1, $2, $3, $4, 'pending', $5, now() + $6::interval, now() + $6::interval)
         ON CONFLICT (key) DO UPDATE SET
             state = 'pending', owner = EXCLUDED.owner, pending_until = EXCLUDED.pending_until,
             expires_at = EXCLUDED.expires_at, category = EXCLUDED.category
         WHERE response_cache.expires_at <= now()
            OR (response_cache.state = 'pending' AND response_cache.pending_until <= now())
         RETURNING state, owner",
    )
    .bind(key)
    .bind(category)
    .bind(provider)
    .bind(model)
    .bind(owner)
    .bind(format!("{} milliseconds", hold.as_millis()))
    .fetch_optional(pool)
    .await?;
    if row.is_some() {
        return Ok(Claim::Mine);
    }
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM response_cache WHERE key = $1")
            .bind(key)
            .fetch_optional(pool)
            .await?;
    Ok(match state.as_deref() {
        Some("ready") => Claim::Ready,
        Some(_) => Claim::Busy,
        // Pruned meanwhile: try again next round.
        None => Claim::Busy,
    })
}

/// Store an answer (validated, paid for) under `key` for `ttl`.
#[allow(clippy::too_many_arguments)]
pub async fn fill(
    pool: &PgPool,
    key: &str,
    who: (&str, &str, &str),
    output: &str,
    finish_reason: Option<&str>,
    usage: &Usage,
    cost: Decimal,
    ttl: Duration,
) -> Result<()> {
    let (category, provider, model) = who;
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    sqlx::query(
        "INSERT INTO response_cache (key, category, provider, model, state, output, finish_reason,
                                     input_tokens, output_tokens, cached_input_tokens,
                                     cache_write_input_tokens, reasoning_tokens, cost_usd,
                                     expires_at)
         VALUES ($1, $2, $3, $4, 'ready', $5, $6, $7, $8, $9, $10, $11, $12,
                 now() + $13::interval)
         ON CONFLICT (key) DO UPDATE SET
             state = 'ready', owner = NULL, pending_until = NULL, output = EXCLUDED.output,
             finish_reason = EXCLUDED.finish_reason, input_tokens = EXCLUDED.input_tokens,
             output_tokens = EXCLUDED.output_tokens,
             cached_input_tokens = EXCLUDED.cached_input_tokens,
             cache_write_input_tokens = EXCLUDED.cache_write_input_tokens,
             reasoning_tokens = EXCLUDED.reasoning_tokens, cost_usd = EXCLUDED.cost_usd,
             expires_at = EXCLUDED.expires_at, created_at = now()
         WHERE response_cache.state = 'pending' OR response_cache.expires_at <= now()",
    )
    .bind(key)
    .bind(category)
    .bind(provider)
    .bind(model)
    .bind(output)
    .bind(finish_reason)
    .bind(n(usage.input_tokens))
    .bind(n(usage.output_tokens))
    .bind(n(usage.cached_input_tokens))
    .bind(n(usage.cache_write_input_tokens))
    .bind(n(usage.reasoning_tokens))
    .bind(cost)
    .bind(format!("{} milliseconds", ttl.as_millis()))
    .execute(pool)
    .await?;
    Ok(())
}

/// Give up `owner`'s claim on `key` (its call failed): the waiters call.
pub async fn release(pool: &PgPool, key: &str, owner: &str) -> Result<()> {
    sqlx::query("DELETE FROM response_cache WHERE key = $1 AND state = 'pending' AND owner = $2")
        .bind(key)
        .bind(owner)
        .execute(pool)
        .await?;
    Ok(())
}

/// The cache per category, as `switchyard cache stats` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Stats {
    pub category: String,
    pub entries: i64,
    pub pending: i64,
    pub expired: i64,
    pub hits: i64,
    /// What the answers served from the cache would have cost (`calls`).
    pub saved_usd: Decimal,
}

pub async fn stats(pool: &PgPool) -> Result<Vec<Stats>> {
    Ok(sqlx::query_as(
        "WITH e AS (
             SELECT category,
                    count(*) FILTER (WHERE state = 'ready' AND expires_at > now()) AS entries,
                    count(*) FILTER (WHERE state = 'pending') AS pending,
                    count(*) FILTER (WHERE expires_at <= now()) AS expired,
                    COALESCE(sum(hits), 0)::int8 AS hits
             FROM response_cache GROUP BY category),
         s AS (SELECT category, COALESCE(sum(saved_usd), 0) AS saved_usd
               FROM calls WHERE outcome = 'cached' GROUP BY category)
         SELECT COALESCE(e.category, s.category) AS category,
                COALESCE(e.entries, 0) AS entries, COALESCE(e.pending, 0) AS pending,
                COALESCE(e.expired, 0) AS expired, COALESCE(e.hits, 0) AS hits,
                COALESCE(s.saved_usd, 0) AS saved_usd
         FROM e FULL JOIN s ON s.category = e.category
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await?)
}

/// Delete entries (of `category`, if given); how many went.
pub async fn clear(pool: &PgPool, category: Option<&str>) -> Result<u64> {
    Ok(
        sqlx::query("DELETE FROM response_cache WHERE $1::text IS NULL OR category = $1")
            .bind(category)
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

/// Delete up to `batch` expired entries; how many went.
pub async fn delete_expired(pool: &PgPool, batch: i64) -> Result<i64> {
    Ok(sqlx::query(
        "DELETE FROM response_cache WHERE key IN (
             SELECT key FROM response_cache WHERE expires_at <= now() LIMIT $1)",
    )
    .bind(batch)
    .execute(pool)
    .await?
    .rows_affected() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Message, Role};

    fn req(text: &str) -> CallRequest {
        CallRequest {
            model: "m".into(),
            messages: vec![Message::text(Role::User, text)],
            max_tokens: 100,
            tag: Some("job-1#0#1".into()),
            ..Default::default()
        }
    }

    #[test]
    fn keys_follow_the_request_not_the_job() {
        let a = key("openai", &req("hi"), "support");
        assert_eq!(a.len(), 64);
        let mut other_job = req("hi");
        other_job.tag = Some("job-2#3#1".into());
        assert_eq!(
            a,
            key("openai", &other_job, "support"),
            "job tags are not part of it"
        );
        assert_ne!(a, key("openai", &req("hi!"), "support"));
        assert_ne!(a, key("anthropic", &req("hi"), "support"));
        assert_ne!(a, key("openai", &req("hi"), ""), "scopes differ");
        let mut t = req("hi");
        t.temperature = Some(0.5);
        assert_ne!(a, key("openai", &t, "support"));
        let mut f = req("hi");
        f.response_format = Some(crate::structured::ResponseFormat::JsonObject {});
        assert_ne!(a, key("openai", &f, "support"));
        let img = |data: &str| {
            let mut r = req("hi");
            r.messages[0].parts = vec![
                Part::Text { text: "hi".into() },
                Part::Image {
                    url: None,
                    data: Some(data.into()),
                    media_type: Some("image/png".into()),
                },
            ];
            key("openai", &r, "support")
        };
        assert_ne!(img("AAAA"), img("AAAB"), "images by their digest");
        assert_eq!(img("AAAA"), img("AAAA"));
    }
}
