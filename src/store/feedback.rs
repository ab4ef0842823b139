//! `feedback`: people's ratings of job results, and the check that a job
//! has a result to rate.

use anyhow::Result;
use sqlx::PgPool;

/// Whether a job can be rated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rateable {
    /// The job's status, as stored.
    pub status: String,
    /// Whether the job has a `results` row.
    pub has_result: bool,
}

/// Job `job_id`'s status and whether it has a result, if the job exists.
pub async fn rateable(pool: &PgPool, job_id: &str) -> Result<Option<Rateable>> {
    let row: Option<(String, bool)> = sqlx::query_as(
        "SELECT j.status, EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id)
         FROM jobs j WHERE j.id = $1",
    )
    .bind(job_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(status, has_result)| Rateable { status, has_result }))
}

/// Record one rating (`score` 1-5, checked by the caller and by the table);
/// returns the new row's id.
pub async fn insert(pool: &PgPool, job_id: &str, score: i16, comment: Option<&str>) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO feedback (job_id, score, comment) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(job_id)
    .bind(score)
    .bind(comment)
    .fetch_one(pool)
    .await?)
}
