//! `switchyard feedback`: a person's rating (1-5, optional comment) of a
//! job's result, so satisfaction can be compared per model and per route
//! (views `satisfaction_by_model`, `satisfaction_by_route`).

use anyhow::{bail, Result};
use sqlx::PgPool;

/// The longest comment kept, in characters.
pub const MAX_COMMENT_CHARS: usize = 4000;

/// Record a rating of `job_id`'s result; returns the feedback row's id. A job
/// may be rated more than once (several raters); each rating is a row.
pub async fn record(pool: &PgPool, job_id: &str, score: u8, comment: Option<&str>) -> Result<i64> {
    if !(1..=5).contains(&score) {
        bail!("--score must be 1 to 5, got {score}");
    }
    if let Some(c) = comment {
        let n = c.chars().count();
        if n > MAX_COMMENT_CHARS {
            bail!("--comment is {n} characters; the limit is {MAX_COMMENT_CHARS}");
        }
    }
    let status: Option<(String, bool)> = sqlx::query_as(
        "SELECT j.status, EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id)
         FROM jobs j WHERE j.id = $1",
    )
    .bind(job_id)
    .fetch_optional(pool)
    .await?;
    match status {
        None => bail!("no job `{job_id}`"),
        Some((status, false)) => {
            bail!("job `{job_id}` has no result to rate (status {status})")
        }
        Some((_, true)) => {}
    }
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO feedback (job_id, score, comment) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(job_id)
    .bind(i16::from(score))
    .bind(comment)
    .fetch_one(pool)
    .await?;
    Ok(id)
}
