//! `switchyard prune`: retention. Deletes jobs that ended more than N days
//! ago with everything recorded about them (calls, steps, results,
//! feedback), and dead letters older than N days, in batches (short
//! transactions beside a running fleet). Jobs still queued, running or
//! parked are kept, whatever their age.

use crate::store::JobStatus;
use anyhow::Result;
use serde::Serialize;
use sqlx::PgPool;

/// What a prune deleted (or, dry, would delete).
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Pruned {
    pub jobs: i64,
    pub calls: i64,
    pub steps: i64,
    pub results: i64,
    pub feedback: i64,
    pub dead_letters: i64,
}

/// Delete what ended more than `days` ago, `batch` jobs per transaction.
pub async fn run(pool: &PgPool, days: u32, dry_run: bool, batch: i64) -> Result<Pruned> {
    let days = f64::from(days);
    if dry_run {
        let (jobs, calls, steps, results, feedback, dead_letters): (i64, i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "WITH v AS (SELECT id FROM jobs WHERE status = ANY($2::text[])
                            AND finished_at < now() - make_interval(days => $1::int))
                 SELECT (SELECT count(*) FROM v),
                        (SELECT count(*) FROM calls WHERE job_id IN (SELECT id FROM v)),
                        (SELECT count(*) FROM steps WHERE job_id IN (SELECT id FROM v)),
                        (SELECT count(*) FROM results WHERE job_id IN (SELECT id FROM v)),
                        (SELECT count(*) FROM feedback WHERE job_id IN (SELECT id FROM v)),
                        (SELECT count(*) FROM dead_letters
                          WHERE created_at < now() - make_interval(days => $1::int))",
            )
            .bind(days as i32)
            .bind(JobStatus::terminal_names())
            .fetch_one(pool)
            .await?;
        return Ok(Pruned {
            jobs,
            calls,
            steps,
            results,
            feedback,
            dead_letters,
        });
    }
    let mut total = Pruned::default();
    loop {
        // One statement per batch: the foreign keys are checked at its end,
        // when the job and the rows that name it are gone together.
        let (jobs, calls, steps, results, feedback): (i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "WITH v AS (SELECT id FROM jobs WHERE status = ANY($3::text[])
                            AND finished_at < now() - make_interval(days => $1::int)
                            LIMIT $2 FOR UPDATE SKIP LOCKED),
                      f AS (DELETE FROM feedback WHERE job_id IN (SELECT id FROM v) RETURNING 1),
                      c AS (DELETE FROM calls WHERE job_id IN (SELECT id FROM v) RETURNING 1),
                      s AS (DELETE FROM steps WHERE job_id IN (SELECT id FROM v) RETURNING 1),
                      r AS (DELETE FROM results WHERE job_id IN (SELECT id FROM v) RETURNING 1),
                      j AS (DELETE FROM jobs WHERE id IN (SELECT id FROM v) RETURNING 1)
                 SELECT (SELECT count(*) FROM j), (SELECT count(*) FROM c), (SELECT count(*) FROM s),
                        (SELECT count(*) FROM r), (SELECT count(*) FROM f)",
            )
            .bind(days as i32)
            .bind(batch)
            .bind(JobStatus::terminal_names())
            .fetch_one(pool)
            .await?;
        total.jobs += jobs;
        total.calls += calls;
        total.steps += steps;
        total.results += results;
        total.feedback += feedback;
        if jobs == 0 {
            break;
        }
    }
    loop {
        let n = sqlx::query(
            "DELETE FROM dead_letters WHERE id IN (
                 SELECT id FROM dead_letters WHERE created_at < now() - make_interval(days => $1::int)
                 LIMIT $2)",
        )
        .bind(days as i32)
        .bind(batch)
        .execute(pool)
        .await?
        .rows_affected() as i64;
        total.dead_letters += n;
        if n == 0 {
            break;
        }
    }
    Ok(total)
}
