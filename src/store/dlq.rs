//! `dead_letters` as operators see it: listing and reading dead letters,
//! and the replay claim: one transaction that marks a dead letter replayed
//! and lets its dead job run again, and its undo when the republish fails.

use anyhow::Result;
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

use super::{like_pattern, JobStatus, Like};

/// One dead letter.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub source: Option<String>,
    pub subject: String,
    pub job_id: Option<String>,
    pub reason: String,
    /// UTC, RFC 3339.
    pub created_at: String,
    pub replayed_at: Option<String>,
    #[serde(skip)]
    pub payload: Vec<u8>,
}

const COLUMNS: &str = "id, source, subject, job_id, reason,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS created_at,
    to_char(replayed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS replayed_at,
    payload";

/// Dead letters, newest first, at most `limit`: not yet replayed unless
/// `include_replayed`, whose reason contains `reason` (case-insensitive)
/// if given.
pub async fn list(
    pool: &PgPool,
    reason: Option<&str>,
    include_replayed: bool,
    limit: i64,
) -> Result<Vec<DeadLetter>> {
    let pattern = reason.map(|r| like_pattern(r, Like::Contains));
    // Constant SQL: the format! only joins the constant column list.
    Ok(sqlx::query_as::<_, DeadLetter>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM dead_letters
         WHERE ($1::text IS NULL OR reason ILIKE $1) AND ($2 OR replayed_at IS NULL)
         ORDER BY id DESC LIMIT $3"
    )))
    .bind(pattern)
    .bind(include_replayed)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Dead letter `id`, if there is one.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<DeadLetter>> {
    Ok(sqlx::query_as::<_, DeadLetter>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// The ids of the dead letters not yet replayed, oldest first, whose reason
/// contains `reason` (case-insensitive) if given.
pub async fn unreplayed_ids(pool: &PgPool, reason: Option<&str>) -> Result<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM dead_letters
         WHERE replayed_at IS NULL AND ($1::text IS NULL OR reason ILIKE $1)
         ORDER BY id",
    )
    .bind(reason.map(|r| like_pattern(r, Like::Contains)))
    .fetch_all(pool)
    .await?)
}

/// What [`claim`] found.
pub enum Claimed {
    /// The dead letter is now claimed (uncommitted until [`Claim::commit`]).
    Claimed(Claim),
    /// It was replayed before.
    AlreadyReplayed,
    /// There is no such dead letter.
    NotFound,
}

/// A dead letter claimed for replay, its transaction still open: dropped
/// without [`commit`](Self::commit), nothing happened.
pub struct Claim {
    tx: Transaction<'static, Postgres>,
    pub subject: String,
    pub job_id: Option<String>,
    /// The message as received.
    pub payload: Vec<u8>,
}

/// Claim dead letter `id` for replay: mark it replayed and, if it names a
/// job that is `dead`, set that job back to `queued`, in one transaction
/// that the caller commits once the message is ready to go out.
pub async fn claim(pool: &PgPool, id: i64) -> Result<Claimed> {
    let mut tx = pool.begin().await?;
    let claimed: Option<(String, Option<String>, Vec<u8>)> = sqlx::query_as(
        "UPDATE dead_letters SET replayed_at = now()
         WHERE id = $1 AND replayed_at IS NULL
         RETURNING subject, job_id, payload",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((subject, job_id, payload)) = claimed else {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM dead_letters WHERE id = $1)")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        return Ok(if exists {
            Claimed::AlreadyReplayed
        } else {
            Claimed::NotFound
        });
    };
    if let Some(job) = &job_id {
        // Let the dead job run again.
        sqlx::query(
            "UPDATE jobs SET status = $2, error = NULL, finished_at = NULL
             WHERE id = $1 AND status = $3",
        )
        .bind(job)
        .bind(JobStatus::Queued.as_str())
        .bind(JobStatus::Dead.as_str())
        .execute(&mut *tx)
        .await?;
    }
    Ok(Claimed::Claimed(Claim {
        tx,
        subject,
        job_id,
        payload,
    }))
}

impl Claim {
    /// The highest attempt recorded for step `step` of `job_id`, read in
    /// the claim's transaction.
    pub async fn recorded_attempt(&mut self, job_id: &str, step: i32) -> Result<Option<i32>> {
        Ok(sqlx::query_scalar(concat!(
            "SELECT max(attempt) FROM calls WHERE ",
            calls_of_job_1!(),
            " AND step = $2"
        ))
        .bind(job_id)
        .bind(step)
        .fetch_one(&mut *self.tx)
        .await?)
    }

    /// Commit the claim.
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

/// Undo a committed claim whose message could not be republished: dead
/// letter `id` is replayable again and its job (if `queued`) `dead` again.
/// Both are tried; the first error is returned.
pub async fn unclaim(pool: &PgPool, id: i64, job_id: Option<&str>) -> Result<()> {
    let letter = sqlx::query("UPDATE dead_letters SET replayed_at = NULL WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await;
    let job = match job_id {
        Some(job) => sqlx::query(
            "UPDATE jobs SET status = $2, finished_at = now() WHERE id = $1 AND status = $3",
        )
        .bind(job)
        .bind(JobStatus::Dead.as_str())
        .bind(JobStatus::Queued.as_str())
        .execute(pool)
        .await
        .map(|_| ()),
        None => Ok(()),
    };
    letter?;
    job?;
    Ok(())
}
