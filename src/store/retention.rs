//! Retention: what `switchyard prune` counts and deletes. Jobs that ended
//! (a terminal status) before a cut-off go with every row that names them
//! (calls, steps, results, feedback, webhook deliveries); dead letters and ended provider
//! batches (with their items) go by their own age.
//! Deletes run one batch per statement, so each transaction stays short.

use anyhow::Result;
use serde::Serialize;
use sqlx::PgPool;

use super::JobStatus;

/// Rows pruned (or, dry, that would be).
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Pruned {
    pub jobs: i64,
    pub calls: i64,
    pub steps: i64,
    pub results: i64,
    pub feedback: i64,
    pub dead_letters: i64,
    /// Provider batches that ended before the cut-off, and their items.
    pub batches: i64,
    pub batch_items: i64,
    /// Expired response cache entries (whatever `days`).
    pub cache_entries: i64,
    /// Webhook delivery attempts of the pruned jobs.
    pub webhook_deliveries: i64,
}

/// `days` as the `int` that `make_interval` takes.
fn days_param(days: u32) -> i32 {
    i32::try_from(days).unwrap_or(i32::MAX)
}

/// What a prune of everything older than `days` would delete.
pub async fn count_older_than(pool: &PgPool, days: u32) -> Result<Pruned> {
    type Counts = (i64, i64, i64, i64, i64, i64, i64, i64, i64, i64);
    let (
        jobs,
        calls,
        steps,
        results,
        feedback,
        dead_letters,
        batches,
        batch_items,
        cache_entries,
        webhook_deliveries,
    ): Counts = sqlx::query_as(
        "WITH v AS (SELECT id FROM jobs WHERE status = ANY($2::text[])
                        AND finished_at < now() - make_interval(days => $1::int))
             SELECT (SELECT count(*) FROM v),
                    (SELECT count(*) FROM calls WHERE job_id IN (SELECT id FROM v)),
                    (SELECT count(*) FROM steps WHERE job_id IN (SELECT id FROM v)),
                    (SELECT count(*) FROM results WHERE job_id IN (SELECT id FROM v)),
                    (SELECT count(*) FROM feedback WHERE job_id IN (SELECT id FROM v)),
                    (SELECT count(*) FROM dead_letters
                      WHERE created_at < now() - make_interval(days => $1::int)),
                    (SELECT count(*) FROM provider_batches WHERE state = 'ended'
                      AND ended_at < now() - make_interval(days => $1::int)),
                    (SELECT count(*) FROM batch_items WHERE batch_id IN (
                       SELECT id FROM provider_batches WHERE state = 'ended'
                        AND ended_at < now() - make_interval(days => $1::int))),
                    (SELECT count(*) FROM response_cache WHERE expires_at <= now()),
                    (SELECT count(*) FROM webhook_deliveries WHERE job_id IN (SELECT id FROM v))",
    )
    .bind(days_param(days))
    .bind(JobStatus::terminal_names())
    .fetch_one(pool)
    .await?;
    Ok(Pruned {
        jobs,
        calls,
        steps,
        results,
        feedback,
        dead_letters,
        batches,
        batch_items,
        cache_entries,
        webhook_deliveries,
    })
}

/// Delete up to `batch` jobs that ended more than `days` ago, with their
/// calls, steps, results, feedback and webhook deliveries; returns what went (`dead_letters`
/// is 0). Jobs locked by someone else are skipped this time.
pub async fn delete_jobs_older_than(pool: &PgPool, days: u32, batch: i64) -> Result<Pruned> {
    // One statement per batch: the foreign keys are checked at its end,
    // when the job and the rows that name it are gone together.
    let (jobs, calls, steps, results, feedback, webhook_deliveries): (
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
    ) = sqlx::query_as(
        "WITH v AS (SELECT id FROM jobs WHERE status = ANY($3::text[])
                    AND finished_at < now() - make_interval(days => $1::int)
                    LIMIT $2 FOR UPDATE SKIP LOCKED),
              f AS (DELETE FROM feedback WHERE job_id IN (SELECT id FROM v) RETURNING 1),
              c AS (DELETE FROM calls WHERE job_id IN (SELECT id FROM v) RETURNING 1),
              s AS (DELETE FROM steps WHERE job_id IN (SELECT id FROM v) RETURNING 1),
              r AS (DELETE FROM results WHERE job_id IN (SELECT id FROM v) RETURNING 1),
              w AS (DELETE FROM webhook_deliveries WHERE job_id IN (SELECT id FROM v) RETURNING 1),
              j AS (DELETE FROM jobs WHERE id IN (SELECT id FROM v) RETURNING 1)
         SELECT (SELECT count(*) FROM j), (SELECT count(*) FROM c), (SELECT count(*) FROM s),
                (SELECT count(*) FROM r), (SELECT count(*) FROM f), (SELECT count(*) FROM w)",
    )
    .bind(days_param(days))
    .bind(batch)
    .bind(JobStatus::terminal_names())
    .fetch_one(pool)
    .await?;
    Ok(Pruned {
        jobs,
        calls,
        steps,
        results,
        feedback,
        webhook_deliveries,
        ..Default::default()
    })
}

/// Delete up to `batch` dead letters older than `days`; returns how many went.
pub async fn delete_dead_letters_older_than(pool: &PgPool, days: u32, batch: i64) -> Result<i64> {
    Ok(sqlx::query(
        "DELETE FROM dead_letters WHERE id IN (
             SELECT id FROM dead_letters WHERE created_at < now() - make_interval(days => $1::int)
             LIMIT $2)",
    )
    .bind(days_param(days))
    .bind(batch)
    .execute(pool)
    .await?
    .rows_affected() as i64)
}

/// Delete up to `batch` provider batches that ended more than `days` ago,
/// with their items; returns (batches, items). Their calls keep their
/// `batch_id` (the calls go with their jobs).
pub async fn delete_batches_older_than(pool: &PgPool, days: u32, batch: i64) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "WITH v AS (SELECT id FROM provider_batches WHERE state = 'ended'
                    AND ended_at < now() - make_interval(days => $1::int)
                    LIMIT $2 FOR UPDATE SKIP LOCKED),
              i AS (DELETE FROM batch_items WHERE batch_id IN (SELECT id FROM v) RETURNING 1),
              b AS (DELETE FROM provider_batches WHERE id IN (SELECT id FROM v) RETURNING 1)
         SELECT (SELECT count(*) FROM b), (SELECT count(*) FROM i)",
    )
    .bind(days_param(days))
    .bind(batch)
    .fetch_one(pool)
    .await?)
}
