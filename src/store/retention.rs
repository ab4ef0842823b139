//! Retention: what `switchyard prune` counts and deletes. Jobs that ended
//! (a terminal status) before a cut-off go with every row that names them
//! (calls, steps, results, feedback, webhook deliveries); dead letters and ended provider
//! batches (with their items) go by their own age.
//! Deletes run one batch per statement, so each transaction stays short.
//! Before them, whole monthly `calls` partitions whose jobs all ended
//! before the cut-off are dropped (migration 0030): one aggregate taken out
//! of the rollups and a `DROP TABLE` per month instead of a delete per row.

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
    /// Monthly `calls` partitions dropped whole (their calls are counted
    /// in `calls`).
    pub calls_partitions: i64,
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
        calls_partitions: droppable_call_partitions(pool, days).await?.len() as i64,
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

/// Monthly `calls` partitions (migration 0030) that retention can drop
/// whole, oldest first: the month ended more than
/// `days` ago and every job created in it ended (a terminal status,
/// `finished_at`) more than `days` ago, as the row deletes judge a job.
/// Empty old months go too.
pub async fn droppable_call_partitions(pool: &PgPool, days: u32) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "WITH p AS (
             SELECT c.relname::text AS name,
                    to_date(substr(c.relname, 8), 'YYYYMM')::timestamp AT TIME ZONE 'UTC' AS lo
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'calls'::regclass AND c.relname ~ '^calls_p[0-9]{6}$')
         SELECT name FROM p
         WHERE lo + interval '1 month' <= now() - make_interval(days => $1::int)
           AND NOT EXISTS (
               SELECT 1 FROM jobs j
               WHERE j.created_at >= p.lo AND j.created_at < p.lo + interval '1 month'
                 AND NOT COALESCE(j.status = ANY($2::text[])
                                  AND j.finished_at < now() - make_interval(days => $1::int),
                                  false))
         ORDER BY lo",
    )
    .bind(days_param(days))
    .bind(JobStatus::terminal_names())
    .fetch_all(pool)
    .await?)
}

/// How long creating or dropping a `calls` partition waits for its locks.
/// Both take `calls` exclusively for a moment; a request queued behind a
/// long query (an analyst's) would hold every writer queued behind it.
const PARTITION_LOCK_TIMEOUT: &str = "5s";

/// Run `q` (one scalar) in a transaction whose lock waits give up after
/// [`PARTITION_LOCK_TIMEOUT`]; `None` when a lock was not granted in time.
async fn with_lock_timeout<T>(
    pool: &PgPool,
    q: sqlx::query::QueryScalar<'_, sqlx::Postgres, T, sqlx::postgres::PgArguments>,
) -> Result<Option<T>>
where
    T: Send + Unpin,
    (T,): for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(PARTITION_LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    match q.fetch_one(&mut *tx).await {
        Ok(v) => {
            tx.commit().await?;
            Ok(Some(v))
        }
        Err(e)
            if e.as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "55P03") =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Drop one monthly `calls` partition: its calls leave the rollups and go,
/// without deleting row by row (`calls_drop_partition`). Returns the calls
/// dropped, or `None` when `calls` could not be locked within
/// [`PARTITION_LOCK_TIMEOUT`] (the month is then left as it is).
pub async fn drop_call_partition(pool: &PgPool, name: &str) -> Result<Option<i64>> {
    with_lock_timeout(
        pool,
        sqlx::query_scalar("SELECT calls_drop_partition($1)").bind(name),
    )
    .await
}

/// How many months ahead `calls` partitions are kept ready.
const PARTITIONS_AHEAD: i32 = 1;

/// Create the monthly `calls` partitions from last month (a job created
/// just before the month turned still gets calls) to [`PARTITIONS_AHEAD`]
/// months on,
/// moving rows the default partition holds for them; returns how many were
/// created, or `None` when `calls` could not be locked within
/// [`PARTITION_LOCK_TIMEOUT`] (calls for a missing month wait in
/// `calls_default` until a later try).
pub async fn ensure_call_partitions(pool: &PgPool) -> Result<Option<i32>> {
    with_lock_timeout(
        pool,
        sqlx::query_scalar("SELECT calls_ensure_partitions(now() - interval '1 month', $1)")
            .bind(PARTITIONS_AHEAD),
    )
    .await
}
