//! `provider_batches` and `batch_items`: batches filling per provider and
//! model, their submission and polling leases, and the items that map a
//! provider's `custom_id` back to a call.

use std::time::Duration;

use anyhow::Result;
use sqlx::PgPool;

/// A call to add to the open batch of its provider and model.
#[derive(Debug, Clone)]
pub struct NewItem<'a> {
    pub provider: &'a str,
    pub model: &'a str,
    pub job_id: &'a str,
    pub step: i32,
    /// The call message.
    pub call: serde_json::Value,
    /// Its size, counted against `max_bytes`.
    pub bytes: i64,
    /// Its estimated prompt tokens, counted against `max_tokens`.
    pub tokens: i64,
    /// The batch is submitted this long after this item at the latest.
    pub flush_after: Duration,
    pub max_items: i32,
    pub max_bytes: i64,
    /// The model's batch queue limit: one batch never holds more.
    pub max_tokens: Option<i64>,
}

/// What adding an item came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    Added {
        batch_id: String,
        custom_id: String,
        attempt: i32,
    },
    /// The step already waits in a batch.
    AlreadyPending,
}

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

/// Add `it` to the open batch of its provider and model (opening one when
/// none has room), in one transaction; one writer per provider and model at
/// a time. Its attempt is one past any recorded for the step.
pub async fn enqueue(pool: &PgPool, it: &NewItem<'_>) -> Result<Enqueued> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('switchyard.batch:' || $1 || ':' || $2))")
        .bind(it.provider)
        .bind(it.model)
        .execute(&mut *tx)
        .await?;
    let pending: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM batch_items WHERE job_id = $1 AND step = $2 AND state = 'pending'",
    )
    .bind(it.job_id)
    .bind(it.step)
    .fetch_optional(&mut *tx)
    .await?;
    if pending.is_some() {
        return Ok(Enqueued::AlreadyPending);
    }
    let attempt: i32 = sqlx::query_scalar(concat!(
            "SELECT GREATEST(
             COALESCE((SELECT max(attempt) FROM calls WHERE ",
            calls_of_job_1!(),
            " AND step = $2), 0),
             COALESCE((SELECT max(attempt) FROM batch_items WHERE job_id = $1 AND step = $2), 0)) + 1"
    ))
    .bind(it.job_id)
    .bind(it.step)
    .fetch_one(&mut *tx)
    .await?;
    let open: Option<(String, i32)> = sqlx::query_as(
        "SELECT id, items FROM provider_batches
         WHERE provider = $1 AND model = $2 AND state = 'open' AND items < $3
           AND bytes + $4 <= $5 AND ($7::int8 IS NULL OR tokens + $6 <= $7)
         ORDER BY created_at LIMIT 1 FOR UPDATE",
    )
    .bind(it.provider)
    .bind(it.model)
    .bind(it.max_items)
    .bind(it.bytes)
    .bind(it.max_bytes)
    .bind(it.tokens)
    .bind(it.max_tokens)
    .fetch_optional(&mut *tx)
    .await?;
    let (batch_id, n) = match open {
        Some(b) => b,
        None => {
            let id = format!("syb_{:016x}", fastrand::u64(..));
            sqlx::query(
                "INSERT INTO provider_batches (id, provider, model, flush_at)
                 VALUES ($1, $2, $3, now() + $4::interval)",
            )
            .bind(&id)
            .bind(it.provider)
            .bind(it.model)
            .bind(interval(it.flush_after))
            .execute(&mut *tx)
            .await?;
            (id, 0)
        }
    };
    let custom_id = format!("i{n}");
    sqlx::query(
        "INSERT INTO batch_items (batch_id, custom_id, job_id, step, attempt, call)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&batch_id)
    .bind(&custom_id)
    .bind(it.job_id)
    .bind(it.step)
    .bind(attempt)
    .bind(&it.call)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE provider_batches SET items = items + 1, bytes = bytes + $2, tokens = tokens + $5,
                flush_at = CASE WHEN items + 1 >= $3 THEN now()
                                ELSE LEAST(flush_at, now() + $4::interval) END
         WHERE id = $1",
    )
    .bind(&batch_id)
    .bind(it.bytes)
    .bind(it.max_items)
    .bind(interval(it.flush_after))
    .bind(it.tokens)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Enqueued::Added {
        batch_id,
        custom_id,
        attempt,
    })
}

/// Whether `provider` has a batch not yet ended (filling, being
/// submitted, or with the provider).
pub async fn any_unfinished(pool: &PgPool, provider: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM provider_batches WHERE provider = $1 AND state <> 'ended')",
    )
    .bind(provider)
    .fetch_one(pool)
    .await?)
}

/// A batch this process now submits.
#[derive(Debug, Clone)]
pub struct ToSubmit {
    pub id: String,
    pub model: String,
    /// A submission was under way before (its holder died): the provider
    /// may have the batch already.
    pub resumed: bool,
}

/// The provider's caps on what waits in its batch queue at once.
#[derive(Debug, Clone, Default)]
pub struct QueueLimits {
    /// Requests queued in all the provider's batches (Anthropic).
    pub requests: Option<i64>,
    /// Prompt tokens enqueued per model (OpenAI), by model.
    pub tokens: std::collections::HashMap<String, i64>,
}

/// Take the next batch of `provider` due for submission (its time came, or
/// an earlier submitter's lease ran out), leased to `owner` for `lease`. A
/// new submission must fit `limits` beside the batches already submitted
/// and not ended; one that does not stays open (its `error` says why) and
/// goes when earlier batches end. One claimer per provider at a time.
pub async fn claim_submit(
    pool: &PgPool,
    provider: &str,
    owner: &str,
    lease: Duration,
    limits: &QueueLimits,
) -> Result<Option<ToSubmit>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('switchyard.batch-submit:' || $1))")
        .bind(provider)
        .execute(&mut *tx)
        .await?;
    let due: Vec<(String, String, String, i32, i64)> = sqlx::query_as(
        "SELECT id, model, state, items, tokens FROM provider_batches
         WHERE provider = $1
           AND ((state = 'open' AND flush_at <= now())
                OR (state = 'submitting' AND lease_until < now()))
         ORDER BY state DESC, flush_at LIMIT 32",
    )
    .bind(provider)
    .fetch_all(&mut *tx)
    .await?;
    if due.is_empty() {
        return Ok(None);
    }
    // What the provider holds already: requests, and tokens per model.
    let queued: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT model, sum(items)::int8, sum(tokens)::int8 FROM provider_batches
         WHERE provider = $1 AND state IN ('submitting', 'submitted')
         GROUP BY model",
    )
    .bind(provider)
    .fetch_all(&mut *tx)
    .await?;
    let requests: i64 = queued.iter().map(|q| q.1).sum();
    let mut chosen = None;
    let mut held = Vec::new();
    for (id, model, state, items, tokens) in due {
        // A resumed submission is counted among the queued already.
        let fits = state == "submitting" || {
            let model_tokens = queued.iter().find(|q| q.0 == model).map_or(0, |q| q.2);
            let why_requests = limits
                .requests
                .filter(|&cap| requests + i64::from(items) > cap)
                .map(|cap| format!("{requests} of {cap} requests queued"));
            let why_tokens = limits
                .tokens
                .get(&model)
                .filter(|&&cap| model_tokens + tokens > cap)
                .map(|cap| format!("{model_tokens} of {cap} {model} tokens enqueued"));
            match why_requests.or(why_tokens) {
                Some(why) => {
                    held.push((
                        id.clone(),
                        format!("waiting for the provider's batch queue: {why}"),
                    ));
                    false
                }
                None => true,
            }
        };
        if fits {
            chosen = Some((id, state == "submitting"));
            break;
        }
    }
    for (id, why) in &held {
        sqlx::query("UPDATE provider_batches SET error = $2 WHERE id = $1")
            .bind(id)
            .bind(why)
            .execute(&mut *tx)
            .await?;
    }
    let claimed = match chosen {
        None => None,
        Some((id, resumed)) => {
            let model: String = sqlx::query_scalar(
                "UPDATE provider_batches
                 SET state = 'submitting', lease_owner = $2, lease_until = now() + $3::interval,
                     submitted_at = CASE WHEN $4 THEN submitted_at ELSE now() END, error = NULL
                 WHERE id = $1 RETURNING model",
            )
            .bind(&id)
            .bind(owner)
            .bind(interval(lease))
            .bind(resumed)
            .fetch_one(&mut *tx)
            .await?;
            Some(ToSubmit { id, model, resumed })
        }
    };
    tx.commit().await?;
    Ok(claimed)
}

/// The items of a batch still to submit (not handed off): custom id and
/// call message.
pub async fn items(pool: &PgPool, batch_id: &str) -> Result<Vec<(String, serde_json::Value)>> {
    Ok(sqlx::query_as(
        "SELECT custom_id, call FROM batch_items WHERE batch_id = $1 AND state = 'pending'
         ORDER BY length(custom_id), custom_id",
    )
    .bind(batch_id)
    .fetch_all(pool)
    .await?)
}

/// The provider's batch ids already recorded for `provider`.
pub async fn known_provider_ids(pool: &PgPool, provider: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT provider_batch_id FROM provider_batches
         WHERE provider = $1 AND provider_batch_id IS NOT NULL",
    )
    .bind(provider)
    .fetch_all(pool)
    .await?)
}

/// The batch is with the provider under `provider_batch_id`; first poll soon.
pub async fn submitted(pool: &PgPool, id: &str, provider_batch_id: &str) -> Result<()> {
    sqlx::query(
        "UPDATE provider_batches SET state = 'submitted', provider_batch_id = $2,
                next_poll_at = now() + interval '500 milliseconds',
                lease_owner = NULL, lease_until = NULL, error = NULL
         WHERE id = $1",
    )
    .bind(id)
    .bind(provider_batch_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Submission failed for now: try again after `after`.
pub async fn reopen(pool: &PgPool, id: &str, error: &str, after: Duration) -> Result<()> {
    sqlx::query(
        "UPDATE provider_batches SET state = 'open', flush_at = now() + $3::interval,
                lease_owner = NULL, lease_until = NULL, error = $2
         WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(interval(after))
    .execute(pool)
    .await?;
    Ok(())
}

/// A submitted batch this process now polls.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ToPoll {
    pub id: String,
    pub provider_batch_id: String,
    pub model: String,
    /// Seconds since it was submitted.
    pub age_secs: f64,
    /// The earliest deadline (Unix milliseconds) of a job with an item
    /// still waiting in it, if any has one.
    pub nearest_deadline_ms: Option<i64>,
}

/// Take up to `limit` submitted batches of `provider` due for a poll, leased
/// to `owner` for `lease` (one poller per batch at a time; a dead poller's
/// batches pass on when its lease runs out).
pub async fn claim_polls(
    pool: &PgPool,
    provider: &str,
    owner: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<ToPoll>> {
    Ok(sqlx::query_as(
        "WITH c AS (
             SELECT id FROM provider_batches
             WHERE provider = $1 AND state = 'submitted' AND next_poll_at <= now()
               AND (lease_until IS NULL OR lease_until < now())
             ORDER BY next_poll_at LIMIT $4 FOR UPDATE SKIP LOCKED)
         UPDATE provider_batches p SET lease_owner = $2, lease_until = now() + $3::interval
         FROM c WHERE p.id = c.id
         RETURNING p.id, p.provider_batch_id, p.model,
                   EXTRACT(EPOCH FROM now() - COALESCE(p.submitted_at, p.created_at))::float8 AS age_secs,
                   (SELECT min((i.call->>'deadline_ms')::int8) FROM batch_items i
                     WHERE i.batch_id = p.id AND i.state = 'pending') AS nearest_deadline_ms",
    )
    .bind(provider)
    .bind(owner)
    .bind(interval(lease))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// A poll's news: the provider's state and counts; next poll after `next`.
pub async fn polled(
    pool: &PgPool,
    id: &str,
    provider_state: &str,
    succeeded: i64,
    failed: i64,
    next: Duration,
) -> Result<()> {
    sqlx::query(
        "UPDATE provider_batches SET provider_state = $2, succeeded = $3, failed = $4,
                next_poll_at = now() + $5::interval, lease_owner = NULL, lease_until = NULL
         WHERE id = $1",
    )
    .bind(id)
    .bind(provider_state)
    .bind(succeeded as i32)
    .bind(failed as i32)
    .bind(interval(next))
    .execute(pool)
    .await?;
    Ok(())
}

/// An item, as the ingest needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Item {
    pub custom_id: String,
    pub attempt: i32,
    pub call: serde_json::Value,
}

/// The items of a batch whose result is still to hand on: among
/// `custom_ids`, pending and handed-off ones (a handed-off item's answer is
/// still recorded); with `None`, every pending one.
pub async fn pending_items(
    pool: &PgPool,
    batch_id: &str,
    custom_ids: Option<&[String]>,
) -> Result<Vec<Item>> {
    Ok(sqlx::query_as(
        "SELECT custom_id, attempt, call FROM batch_items
         WHERE batch_id = $1
           AND (state = 'pending' OR ($2::text[] IS NOT NULL AND state = 'handed_off'))
           AND ($2::text[] IS NULL OR custom_id = ANY($2::text[]))",
    )
    .bind(batch_id)
    .bind(custom_ids)
    .fetch_all(pool)
    .await?)
}

/// Pending items of `provider`'s unfinished batches whose job's deadline
/// falls before `before_ms` (Unix milliseconds): (batch id, item).
pub async fn near_deadline(
    pool: &PgPool,
    provider: &str,
    before_ms: i64,
    limit: i64,
) -> Result<Vec<(String, Item)>> {
    let rows: Vec<(String, String, i32, serde_json::Value)> = sqlx::query_as(
        "SELECT i.batch_id, i.custom_id, i.attempt, i.call
         FROM batch_items i JOIN provider_batches b ON b.id = i.batch_id
         WHERE i.state = 'pending' AND (i.call->>'deadline_ms')::int8 < $2
           AND b.provider = $1 AND b.state <> 'ended'
         LIMIT $3",
    )
    .bind(provider)
    .bind(before_ms)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(b, custom_id, attempt, call)| {
            (
                b,
                Item {
                    custom_id,
                    attempt,
                    call,
                },
            )
        })
        .collect())
}

/// These pending items were sent real-time.
pub async fn handed_off(pool: &PgPool, batch_id: &str, custom_ids: &[String]) -> Result<()> {
    sqlx::query(
        "UPDATE batch_items SET state = 'handed_off'
         WHERE batch_id = $1 AND custom_id = ANY($2::text[]) AND state = 'pending'",
    )
    .bind(batch_id)
    .bind(custom_ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// These items' results are handed on.
pub async fn items_done(pool: &PgPool, batch_id: &str, custom_ids: &[String]) -> Result<()> {
    sqlx::query(
        "UPDATE batch_items SET state = 'done' WHERE batch_id = $1 AND custom_id = ANY($2::text[])",
    )
    .bind(batch_id)
    .bind(custom_ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// The batch is over: every item handed on.
pub async fn ended(
    pool: &PgPool,
    id: &str,
    provider_state: &str,
    error: Option<&str>,
) -> Result<()> {
    ingested(pool, id, provider_state, error, 0, 0).await
}

/// The batch is over after its results were read: every item handed on,
/// `malformed` lines unreadable and `unknown` naming no item of the batch.
pub async fn ingested(
    pool: &PgPool,
    id: &str,
    provider_state: &str,
    error: Option<&str>,
    malformed: u64,
    unknown: u64,
) -> Result<()> {
    sqlx::query(
        "UPDATE provider_batches SET state = 'ended', provider_state = $2, error = $3,
                malformed_lines = $4, unknown_lines = $5,
                ended_at = now(), lease_owner = NULL, lease_until = NULL
         WHERE id = $1",
    )
    .bind(id)
    .bind(provider_state)
    .bind(error)
    .bind(i32::try_from(malformed).unwrap_or(i32::MAX))
    .bind(i32::try_from(unknown).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(())
}

/// A batch as `switchyard batch` shows it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct BatchRow {
    pub id: String,
    pub provider: String,
    pub model: String,
    pub state: String,
    pub provider_batch_id: Option<String>,
    pub provider_state: Option<String>,
    pub items: i32,
    /// Items whose result is handed on.
    pub items_done: i64,
    pub succeeded: i32,
    pub failed: i32,
    pub malformed_lines: i32,
    pub unknown_lines: i32,
    /// What its recorded calls cost so far.
    pub cost_usd: rust_decimal::Decimal,
    pub error: Option<String>,
    pub created_at: String,
    pub submitted_at: Option<String>,
    pub ended_at: Option<String>,
    pub age_secs: f64,
}

const BATCH_ROW: &str = "SELECT b.id, b.provider, b.model, b.state, b.provider_batch_id,
        b.provider_state, b.items,
        (SELECT count(*) FROM batch_items i WHERE i.batch_id = b.id AND i.state = 'done') AS items_done,
        b.succeeded, b.failed, b.malformed_lines, b.unknown_lines,
        COALESCE((SELECT sum(c.cost_usd) FROM calls c WHERE c.batch_id = b.id), 0) AS cost_usd,
        b.error, b.created_at::text AS created_at, b.submitted_at::text AS submitted_at,
        b.ended_at::text AS ended_at,
        EXTRACT(EPOCH FROM now() - b.created_at)::float8 AS age_secs
     FROM provider_batches b";

/// Batches, newest first: of `provider` and in `state` if given.
pub async fn list(
    pool: &PgPool,
    provider: Option<&str>,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<BatchRow>> {
    // Constant SQL: the format! only joins the constant above.
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{BATCH_ROW} WHERE ($1::text IS NULL OR b.provider = $1)
           AND ($2::text IS NULL OR b.state = $2)
         ORDER BY b.created_at DESC LIMIT $3"
    )))
    .bind(provider)
    .bind(state)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// One batch, by our id or the provider's.
pub async fn get(pool: &PgPool, id: &str) -> Result<Option<BatchRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{BATCH_ROW} WHERE b.id = $1 OR b.provider_batch_id = $1 LIMIT 1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?)
}
