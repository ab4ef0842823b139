//! `switchyard feedback`: a person's rating (1-5, optional comment) of a
//! job's result, so satisfaction can be compared per model and per route
//! (views `satisfaction_by_model`, `satisfaction_by_route`).

use anyhow::{bail, Result};
use sqlx::PgPool;

use crate::store;

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
    let Some(job) = store::feedback::rateable(pool, job_id).await? else {
        bail!("no job `{job_id}`");
    };
    if !job.has_result {
        bail!(
            "job `{job_id}` has no result to rate (status {})",
            job.status
        );
    }
    store::feedback::insert(pool, job_id, i16::from(score), comment).await
}
