//! The human review queue: jobs in status `needs_review` listed and read,
//! and the resolve transaction that finishes one (a `results` row with
//! model `human`, or a failure with the reviewer's reason).

use anyhow::{bail, Context, Result};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use super::jobs::parse_status;
use super::JobStatus;

/// A job waiting for a person.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ReviewItem {
    pub job_id: String,
    pub category: String,
    pub reason: Option<String>,
    pub waiting_secs: i64,
}

/// Jobs waiting for a person, oldest first, of `category` if given. The
/// status is a literal so that `jobs_review_idx` (partial, `WHERE status =
/// 'needs_review'`) serves a generic plan too.
pub async fn waiting(pool: &PgPool, category: Option<&str>) -> Result<Vec<ReviewItem>> {
    Ok(sqlx::query_as(
        "SELECT id AS job_id, category, review_reason AS reason,
                EXTRACT(EPOCH FROM now() - COALESCE(finished_at, created_at))::int8 AS waiting_secs
         FROM jobs WHERE status = 'needs_review' AND ($1::text IS NULL OR category = $1)
         ORDER BY COALESCE(finished_at, created_at), id",
    )
    .bind(category)
    .fetch_all(pool)
    .await?)
}

/// What a reviewer reads of a job's own row.
#[derive(Debug, Clone)]
pub struct ReviewJob {
    pub category: String,
    pub status: JobStatus,
    pub reason: Option<String>,
    pub envelope: Option<serde_json::Value>,
    pub route_decision: Option<serde_json::Value>,
}

/// Job `job_id`'s row as a reviewer reads it, if the job exists.
pub async fn job(pool: &PgPool, job_id: &str) -> Result<Option<ReviewJob>> {
    type JobTuple = (
        String,
        String,
        Option<String>,
        Option<serde_json::Value>,
        Option<serde_json::Value>,
    );
    let row: Option<JobTuple> = sqlx::query_as(
        "SELECT category, status, review_reason, envelope, route_decision FROM jobs WHERE id = $1",
    )
    .bind(job_id)
    .fetch_optional(pool)
    .await?;
    row.map(|(category, status, reason, envelope, route_decision)| {
        Ok(ReviewJob {
            category,
            status: parse_status(job_id, &status)?,
            reason,
            envelope,
            route_decision,
        })
    })
    .transpose()
}

/// A job's provider calls: how many, and what they cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CallTotals {
    pub calls: i64,
    pub cost_usd: Decimal,
}

/// The calls recorded for `job_id`.
pub async fn call_totals(pool: &PgPool, job_id: &str) -> Result<CallTotals> {
    let (calls, cost_usd): (i64, Decimal) = sqlx::query_as(concat!(
        "SELECT count(*)::int8, COALESCE(sum(cost_usd), 0) FROM calls WHERE ",
        calls_of_job_1!()
    ))
    .bind(job_id)
    .fetch_one(pool)
    .await?;
    Ok(CallTotals { calls, cost_usd })
}

/// How a person finishes a job.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// The job succeeds with this answer.
    Output(String),
    /// The job fails with this reason.
    Reject(String),
}

/// Finish a job waiting for review, in one transaction that holds the job's
/// row: a result for an answer, or failure for a rejection, and the review
/// (`by`, how) in its decision log. Returns its category.
pub async fn resolve(pool: &PgPool, job_id: &str, how: Resolution, by: &str) -> Result<String> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT category, status FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((category, status)) = row else {
        bail!("no job with id `{job_id}`");
    };
    if status != JobStatus::NeedsReview.as_str() {
        bail!("job `{job_id}` is not waiting for review (status `{status}`)");
    }
    let review = serde_json::json!({"by": by, "outcome": match &how {
        Resolution::Output(_) => "resolved",
        Resolution::Reject(_) => "rejected",
    }});
    match how {
        Resolution::Output(text) => {
            sqlx::query(
                "INSERT INTO results (job_id, category, output, model, finish_reason, cost_usd,
                                      input_tokens, output_tokens, latency_ms)
                 SELECT j.id, j.category, $2, 'human', 'review', COALESCE(c.cost, 0),
                        COALESCE(c.inp, 0), COALESCE(c.outp, 0),
                        (EXTRACT(EPOCH FROM now() - COALESCE(j.enqueued_at, j.created_at)) * 1000)::int8
                 FROM jobs j LEFT JOIN LATERAL (
                     SELECT sum(cost_usd) AS cost, sum(input_tokens)::int8 AS inp,
                            sum(output_tokens)::int8 AS outp
                     FROM calls WHERE calls.job_id = j.id
                       AND calls.job_created_at IN (j.created_at, TIMESTAMPTZ '1970-01-01 00:00:00+00')) c ON true
                 WHERE j.id = $1
                 ON CONFLICT (job_id) DO NOTHING",
            )
            .bind(job_id)
            .bind(&text)
            .execute(&mut *tx)
            .await
            .context("recording the reviewed result")?;
            sqlx::query(
                "UPDATE jobs SET status = $3, finished_at = now(),
                        route_decision = jsonb_set(COALESCE(route_decision, '{}'::jsonb), '{review}', $2)
                 WHERE id = $1",
            )
            .bind(job_id)
            .bind(review)
            .bind(JobStatus::Succeeded.as_str())
            .execute(&mut *tx)
            .await?;
        }
        Resolution::Reject(reason) => {
            sqlx::query(
                "UPDATE jobs SET status = $4, finished_at = now(), error = $2,
                        route_decision = jsonb_set(COALESCE(route_decision, '{}'::jsonb), '{review}', $3)
                 WHERE id = $1",
            )
            .bind(job_id)
            .bind(format!("rejected in review: {reason}"))
            .bind(review)
            .bind(JobStatus::Failed.as_str())
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(category)
}
