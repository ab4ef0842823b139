//! Reads of one job and its rows outside the writer: its status, its
//! finished steps, its recorded provider attempts, parked jobs to resume,
//! and how many of a batch of jobs are finished.

use std::time::Duration;

use anyhow::Result;
use sqlx::PgPool;

use super::JobStatus;
use crate::route::{StepOutcome, StepRecord};

/// The `steps.outcome` value of a step outcome.
pub(super) fn outcome_str(o: StepOutcome) -> &'static str {
    match o {
        StepOutcome::Ok => "ok",
        StepOutcome::Failed => "failed",
        StepOutcome::TooSlow => "too_slow",
    }
}

/// The step outcome a `steps.outcome` value names (anything unknown reads
/// as failed).
fn outcome_of(s: &str) -> StepOutcome {
    match s {
        "ok" => StepOutcome::Ok,
        "too_slow" => StepOutcome::TooSlow,
        _ => StepOutcome::Failed,
    }
}

/// Take up to `limit` jobs of `category` parked longer than `idle` ago to
/// publish again: marks them (`parked_at` = now, so another worker does not
/// take them too) and returns their ids and envelopes. A job taken but not
/// republished (the process died) is taken again after `idle`.
pub async fn take_parked(
    pool: &PgPool,
    category: &str,
    idle: Duration,
    limit: i64,
) -> Result<Vec<(String, Option<serde_json::Value>)>> {
    Ok(sqlx::query_as(
        "UPDATE jobs SET parked_at = now()
         WHERE id IN (SELECT id FROM jobs
                      WHERE category = $1 AND status = $2 AND parked_at IS NOT NULL
                        AND parked_at < now() - make_interval(secs => $3)
                        AND (not_before IS NULL OR not_before <= now())
                      ORDER BY created_at LIMIT $4 FOR UPDATE SKIP LOCKED)
         RETURNING id, envelope",
    )
    .bind(category)
    .bind(JobStatus::Queued.as_str())
    .bind(idle.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// End a parked job as failed with `reason` (its deadline passed while it
/// waited); true if it was still parked.
pub async fn fail_parked(pool: &PgPool, job_id: &str, reason: &str) -> Result<bool> {
    end_parked(pool, job_id, reason, JobStatus::Failed).await
}

/// End a waiting (parked) job as expired with `reason`; true if it was.
pub async fn expire_parked(pool: &PgPool, job_id: &str, reason: &str) -> Result<bool> {
    end_parked(pool, job_id, reason, JobStatus::Expired).await
}

async fn end_parked(pool: &PgPool, job_id: &str, reason: &str, status: JobStatus) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET status = $3, error = $2, finished_at = now(), parked_at = NULL
         WHERE id = $1 AND status = $4 AND parked_at IS NOT NULL",
    )
    .bind(job_id)
    .bind(reason)
    .bind(status.as_str())
    .bind(JobStatus::Queued.as_str())
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The finished steps of a job, in step order.
pub async fn load_steps(pool: &PgPool, job_id: &str) -> Result<Vec<StepRecord>> {
    type StepTuple = (i32, String, String, Option<String>, Option<String>);
    let rows: Vec<StepTuple> = sqlx::query_as(
        "SELECT step, model, outcome, output, reason FROM steps WHERE job_id = $1 ORDER BY step",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(step, model, outcome, output, reason)| StepRecord {
            step,
            model,
            outcome: outcome_of(&outcome),
            output,
            reason,
        })
        .collect())
}

/// Status of a job, if it exists.
pub async fn job_status(pool: &PgPool, job_id: &str) -> Result<Option<JobStatus>> {
    let s: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_optional(pool)
        .await?;
    s.map(|s| parse_status(job_id, &s)).transpose()
}

/// `s`, read from job `job_id`'s row, as a status (the CHECK constraint
/// allows only known ones).
pub(super) fn parse_status(job_id: &str, s: &str) -> Result<JobStatus> {
    JobStatus::parse(s).ok_or_else(|| anyhow::anyhow!("job {job_id} has unknown status `{s}`"))
}

/// How many jobs whose ids start with `prefix` are terminal.
pub async fn count_finished_prefix(pool: &PgPool, prefix: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE id LIKE $1 AND status = ANY($2::text[])",
    )
    .bind(super::like_pattern(prefix, super::Like::Prefix))
    .bind(JobStatus::terminal_names())
    .fetch_one(pool)
    .await?)
}

/// How many of `ids` are finished: a terminal `jobs` row, or a dead letter
/// with no jobs row.
pub async fn count_finished(pool: &PgPool, ids: &[String]) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM unnest($1::text[]) AS i(id)
         WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.id = i.id
                       AND j.status = ANY($2::text[]))
            OR (NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = i.id)
                AND EXISTS (SELECT 1 FROM dead_letters d WHERE d.job_id = i.id))",
    )
    .bind(ids)
    .bind(JobStatus::terminal_names())
    .fetch_one(pool)
    .await?)
}

/// How long the newest `unknown` attempt of `job_id`'s `step` still holds
/// it (intents younger than `busy_for` refuse other attempts; see
/// [`crate::store::Row::Intent`]): `None` when none does any more.
pub async fn busy_left(
    pool: &PgPool,
    job_id: &str,
    step: i32,
    busy_for: std::time::Duration,
) -> Result<Option<std::time::Duration>> {
    let secs: Option<f64> = sqlx::query_scalar(concat!(
        "SELECT extract(epoch FROM max(created_at) + make_interval(secs => $3) - now())::float8
         FROM calls WHERE ",
        calls_of_job_1!(),
        " AND step = $2 AND outcome = 'unknown'"
    ))
    .bind(job_id)
    .bind(step)
    .bind(busy_for.as_secs_f64())
    .fetch_one(pool)
    .await?;
    Ok(secs
        .filter(|s| *s > 0.0)
        .map(|s| std::time::Duration::from_secs_f64(s.min(busy_for.as_secs_f64()))))
}

/// One recorded provider attempt of a job.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Attempt {
    pub step: i32,
    pub attempt: i32,
    /// The call's error, or its outcome when it recorded none.
    pub error: String,
}

/// Every provider attempt recorded for `job_id`, by step and attempt.
pub async fn attempts(pool: &PgPool, job_id: &str) -> Result<Vec<Attempt>> {
    Ok(sqlx::query_as(concat!(
        "SELECT step, attempt, COALESCE(error, outcome) AS error FROM calls WHERE ",
        calls_of_job_1!(),
        " ORDER BY step, attempt"
    ))
    .bind(job_id)
    .fetch_all(pool)
    .await?)
}

/// A job as the HTTP API shows it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct JobView {
    pub id: String,
    pub category: String,
    pub status: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    pub review_reason: Option<String>,
    pub metadata: Option<serde_json::Value>,
    /// The decision log.
    pub route_decision: Option<serde_json::Value>,
    pub output: Option<String>,
    pub output_json: Option<serde_json::Value>,
    pub model: Option<String>,
    pub cost_usd: Option<rust_decimal::Decimal>,
    pub latency_ms: Option<i64>,
}

const JOB_VIEW: &str = "SELECT j.id, j.category, j.status, j.created_at::text AS created_at,
        j.finished_at::text AS finished_at, j.error, j.review_reason,
        j.envelope->'metadata' AS metadata, j.route_decision,
        r.output, r.output_json, r.model,
        COALESCE(r.cost_usd, (SELECT sum(cost_usd) FROM calls c WHERE c.job_id = j.id
                      AND c.job_created_at IN (j.created_at, TIMESTAMPTZ '1970-01-01 00:00:00+00'))) AS cost_usd,
        r.latency_ms::int8 AS latency_ms
     FROM jobs j LEFT JOIN results r ON r.job_id = j.id";

/// One job with its result, if any.
pub async fn job_view(pool: &PgPool, id: &str) -> Result<Option<JobView>> {
    Ok(
        sqlx::query_as(sqlx::AssertSqlSafe(format!("{JOB_VIEW} WHERE j.id = $1")))
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
}

/// A call of a job, as the HTTP API shows it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct CallView {
    pub step: i32,
    pub attempt: i32,
    pub provider: String,
    pub model: String,
    pub outcome: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: rust_decimal::Decimal,
    pub latency_ms: Option<i32>,
    pub batch_id: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
}

/// Every call of a job, by step and attempt.
pub async fn job_calls(pool: &PgPool, id: &str) -> Result<Vec<CallView>> {
    Ok(sqlx::query_as(concat!(
        "SELECT step, attempt, provider, model, outcome, input_tokens, output_tokens, cost_usd,
                latency_ms, batch_id, error, created_at::text AS created_at
         FROM calls WHERE ",
        calls_of_job_1!(),
        " ORDER BY step, attempt"
    ))
    .bind(id)
    .fetch_all(pool)
    .await?)
}

/// What `GET /v1/jobs` filters on.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub category: Option<String>,
    pub status: Option<String>,
    /// RFC 3339 bounds on `created_at`.
    pub since: Option<String>,
    pub until: Option<String>,
    /// `metadata.KEY=VALUE` pairs, all of which must match.
    pub metadata: Vec<(String, String)>,
    /// Continue after this (created_at as Postgres prints it, id).
    pub after: Option<(String, String)>,
    pub limit: i64,
}

/// `metadata.KEY=VALUE` pairs as the JSON object `envelope->'metadata'`
/// must contain (`{}` matches every job).
fn metadata_filter(pairs: &[(String, String)]) -> serde_json::Value {
    serde_json::Value::Object(
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

/// A page of jobs, newest first, and the key of its last one.
pub async fn list_jobs(
    pool: &PgPool,
    f: &JobFilter,
) -> Result<(Vec<JobView>, Option<(String, String)>)> {
    // Keyset pagination on (created_at, id), newest first: stable under
    // concurrent inserts (new jobs sort before the cursor).
    let jobs: Vec<JobView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{JOB_VIEW}
         WHERE ($1::text IS NULL OR j.category = $1)
           AND ($2::text IS NULL OR j.status = $2)
           AND ($3::timestamptz IS NULL OR j.created_at >= $3::timestamptz)
           AND ($4::timestamptz IS NULL OR j.created_at < $4::timestamptz)
           AND ($5::jsonb = '{{}}'::jsonb OR j.envelope->'metadata' @> $5::jsonb)
           AND ($6::timestamptz IS NULL OR (j.created_at, j.id) < ($6::timestamptz, $7::text))
         ORDER BY j.created_at DESC, j.id DESC LIMIT $8"
    )))
    // An unnamed statement: planned for its own values every time (a
    // cached generic plan cannot tell a rare metadata value, best found
    // through the GIN index, from a common one, best found walking the
    // (created_at, id) index; scripts/explain-jobs-api.sh measures both).
    .persistent(false)
    .bind(&f.category)
    .bind(&f.status)
    .bind(&f.since)
    .bind(&f.until)
    .bind(metadata_filter(&f.metadata))
    .bind(f.after.as_ref().map(|a| a.0.clone()))
    .bind(f.after.as_ref().map(|a| a.1.clone()))
    .bind(f.limit)
    .fetch_all(pool)
    .await?;
    let last = jobs.last().map(|j| (j.created_at.clone(), j.id.clone()));
    Ok((jobs, last))
}

/// What cancelling one job came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// It was queued or running (or parked): now `cancelled`; its category.
    Now {
        category: String,
    },
    /// It had ended already: nothing changed.
    AlreadyEnded(JobStatus),
    NotFound,
}

/// Cancel job `id` unless it has ended. A parked job is let go of too.
pub async fn cancel(pool: &PgPool, id: &str) -> Result<Cancelled> {
    let row: Option<String> = sqlx::query_scalar(
        "UPDATE jobs SET status = $2, finished_at = now(), parked_at = NULL,
                error = COALESCE(error, 'cancelled')
         WHERE id = $1 AND NOT (status = ANY($3::text[])) RETURNING category",
    )
    .bind(id)
    .bind(JobStatus::Cancelled.as_str())
    .bind(JobStatus::terminal_names())
    .fetch_optional(pool)
    .await?;
    if let Some(category) = row {
        return Ok(Cancelled::Now { category });
    }
    Ok(match job_status(pool, id).await? {
        Some(s) => Cancelled::AlreadyEnded(s),
        None => Cancelled::NotFound,
    })
}

/// Which unfinished jobs `cancel_where` cancels; at least one is set.
#[derive(Debug, Clone, Default)]
pub struct CancelFilter {
    pub category: Option<String>,
    pub metadata: Vec<(String, String)>,
    /// RFC 3339: jobs created before it.
    pub created_before: Option<String>,
}

/// Cancel every unfinished job matching `f`; (id, category) of each.
pub async fn cancel_where(pool: &PgPool, f: &CancelFilter) -> Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "UPDATE jobs SET status = $1, finished_at = now(), parked_at = NULL,
                error = COALESCE(error, 'cancelled')
         WHERE NOT (status = ANY($2::text[]))
           AND ($3::text IS NULL OR category = $3)
           AND ($4::jsonb = '{}'::jsonb OR envelope->'metadata' @> $4::jsonb)
           AND ($5::timestamptz IS NULL OR created_at < $5::timestamptz)
         RETURNING id, category",
    )
    .bind(JobStatus::Cancelled.as_str())
    .bind(JobStatus::terminal_names())
    .bind(&f.category)
    .bind(metadata_filter(&f.metadata))
    .bind(&f.created_before)
    .fetch_all(pool)
    .await?)
}

/// Whether any provider call of job `id` is recorded (it has started).
pub async fn has_calls(pool: &PgPool, id: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(concat!(
        "SELECT EXISTS (SELECT 1 FROM calls WHERE ",
        calls_of_job_1!(),
        ")"
    ))
    .bind(id)
    .fetch_one(pool)
    .await?)
}

/// Take up to `limit` scheduled jobs that are due (their `not_before`
/// passed) to publish again, as [`take_parked`] does: not yet taken since
/// they became due, or taken more than `idle` ago (the taker died).
pub async fn take_scheduled(
    pool: &PgPool,
    idle: Duration,
    limit: i64,
) -> Result<Vec<(String, String, Option<serde_json::Value>)>> {
    Ok(sqlx::query_as(
        "UPDATE jobs SET parked_at = now()
         WHERE id IN (SELECT id FROM jobs
                      WHERE status = $1 AND parked_at IS NOT NULL AND not_before IS NOT NULL
                        AND not_before <= now()
                        AND (parked_at <= not_before OR parked_at < now() - make_interval(secs => $2))
                      ORDER BY not_before LIMIT $3 FOR UPDATE SKIP LOCKED)
         RETURNING id, category, envelope",
    )
    .bind(JobStatus::Queued.as_str())
    .bind(idle.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
