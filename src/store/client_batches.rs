//! The OpenAI Batch-compatible front door's tables: `client_files` (uploads
//! and the files a batch produces), `client_batches` and
//! `client_batch_lines` (each input line: its job, or why it has none).
//! Not provider batches (`store::batches`).
//!
//! A batch's stored `status` moves validating → in_progress → (cancelling
//! →) finalizing → completed | cancelled | expired, or validating → failed;
//! its states are written only here. `request_counts` are derived from the
//! lines' jobs until the batch ends, then stored. Finalizing is a claim
//! (one reader writes the output and error files, in one transaction with
//! the end state; a dead reader's claim lapses), and the files' ids are
//! fixed by the batch's, so writing them twice is impossible.

use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use sqlx::PgPool;

use super::JobStatus;

/// A stored file, without its content.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FileMeta {
    pub id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    /// Unix seconds.
    pub created_at: i64,
    pub token_name: Option<String>,
}

/// A file to store.
#[derive(Debug, Clone)]
pub struct NewFile<'a> {
    pub id: &'a str,
    pub purpose: &'a str,
    pub filename: &'a str,
    pub content: &'a [u8],
    pub token_name: Option<&'a str>,
}

const FILE_META: &str = "SELECT id, purpose, filename, bytes,
        floor(extract(epoch FROM created_at))::int8 AS created_at, token_name
     FROM client_files";

/// Store `f`; its metadata as stored.
pub async fn insert_file(pool: &PgPool, f: &NewFile<'_>) -> Result<FileMeta> {
    Ok(sqlx::query_as(
        "INSERT INTO client_files (id, purpose, filename, bytes, content, token_name)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id, purpose, filename, bytes,
                   floor(extract(epoch FROM created_at))::int8 AS created_at, token_name",
    )
    .bind(f.id)
    .bind(f.purpose)
    .bind(f.filename)
    .bind(f.content.len() as i64)
    .bind(f.content)
    .bind(f.token_name)
    .fetch_one(pool)
    .await?)
}

/// File `id`, if it exists (and, with `owner`, that token stored it).
pub async fn file(pool: &PgPool, id: &str, owner: Option<&str>) -> Result<Option<FileMeta>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{FILE_META} WHERE id = $1 AND ($2::text IS NULL OR token_name = $2)"
    )))
    .bind(id)
    .bind(owner)
    .fetch_optional(pool)
    .await?)
}

/// File `id`'s content, if it exists (and, with `owner`, that token stored it).
pub async fn file_content(
    pool: &PgPool,
    id: &str,
    owner: Option<&str>,
) -> Result<Option<(String, Vec<u8>)>> {
    Ok(sqlx::query_as(
        "SELECT filename, content FROM client_files
         WHERE id = $1 AND ($2::text IS NULL OR token_name = $2)",
    )
    .bind(id)
    .bind(owner)
    .fetch_optional(pool)
    .await?)
}

/// A batch to create.
#[derive(Debug, Clone)]
pub struct NewBatch<'a> {
    pub id: &'a str,
    pub input_file_id: &'a str,
    pub endpoint: &'a str,
    pub completion_window: &'a str,
    pub metadata: Option<&'a Value>,
    pub token_name: Option<&'a str>,
    /// How long the batch has to complete (its `completion_window`).
    pub window: Duration,
}

/// One input line of a batch: the job it becomes (`job_id`, `category`), or
/// why it does not (`error_code`, `error_message`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewLine {
    pub line: i32,
    pub custom_id: String,
    pub category: Option<String>,
    pub job_id: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

/// Create batch `b` (status `validating`) with its lines, in one
/// transaction. False when a batch of that id exists already (nothing
/// changes).
pub async fn create_batch(pool: &PgPool, b: &NewBatch<'_>, lines: &[NewLine]) -> Result<bool> {
    let mut tx = pool.begin().await?;
    let created = sqlx::query(
        "INSERT INTO client_batches (id, input_file_id, endpoint, completion_window, metadata,
                                     token_name, total, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(b.id)
    .bind(b.input_file_id)
    .bind(b.endpoint)
    .bind(b.completion_window)
    .bind(b.metadata)
    .bind(b.token_name)
    .bind(lines.len() as i32)
    .bind(b.window.as_secs_f64())
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !created {
        return Ok(false);
    }
    let col = |f: fn(&NewLine) -> Option<String>| lines.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO client_batch_lines (batch_id, line, custom_id, category, job_id,
                                         error_code, error_message)
         SELECT $1, u.line, u.custom_id, u.category, u.job_id, u.error_code, u.error_message
         FROM UNNEST($2::int4[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
              AS u(line, custom_id, category, job_id, error_code, error_message)",
    )
    .bind(b.id)
    .bind(lines.iter().map(|l| l.line).collect::<Vec<_>>())
    .bind(
        lines
            .iter()
            .map(|l| l.custom_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(col(|l| l.category.clone()))
    .bind(col(|l| l.job_id.clone()))
    .bind(col(|l| l.error_code.clone()))
    .bind(col(|l| l.error_message.clone()))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// The lines of batch `id` that should become jobs: (line, job id).
pub async fn lines_with_jobs(pool: &PgPool, id: &str) -> Result<Vec<(i32, String)>> {
    Ok(sqlx::query_as(
        "SELECT line, job_id FROM client_batch_lines
         WHERE batch_id = $1 AND job_id IS NOT NULL ORDER BY line",
    )
    .bind(id)
    .fetch_all(pool)
    .await?)
}

/// Line `line` of batch `id` did not become a job after all (the submit
/// path refused it): record why.
pub async fn refuse_line(pool: &PgPool, id: &str, line: i32, code: &str, why: &str) -> Result<()> {
    sqlx::query(
        "UPDATE client_batch_lines SET job_id = NULL, error_code = $3, error_message = $4
         WHERE batch_id = $1 AND line = $2",
    )
    .bind(id)
    .bind(line)
    .bind(code)
    .bind(why)
    .execute(pool)
    .await?;
    Ok(())
}

/// Every line of batch `id` is published: it is in progress.
pub async fn mark_in_progress(pool: &PgPool, id: &str) -> Result<()> {
    sqlx::query(
        "UPDATE client_batches SET status = 'in_progress', in_progress_at = now()
         WHERE id = $1 AND status = 'validating'",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Batch `id` could not be started: failed, with `errors` (OpenAI's
/// `errors` object).
pub async fn fail_batch(pool: &PgPool, id: &str, errors: &Value) -> Result<()> {
    sqlx::query(
        "UPDATE client_batches SET status = 'failed', failed_at = now(), errors = $2,
                completed = 0, failed = total
         WHERE id = $1 AND status = 'validating'",
    )
    .bind(id)
    .bind(errors)
    .execute(pool)
    .await?;
    Ok(())
}

/// A batch as stored, with its request counts.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BatchRow {
    pub id: String,
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    pub metadata: Option<Value>,
    pub token_name: Option<String>,
    pub status: String,
    /// Where finalizing leads: completed, cancelled or expired.
    pub ending: Option<String>,
    pub errors: Option<Value>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    /// Unix seconds.
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub expires_at: i64,
}

/// `$1`: succeeded; `$2`: the terminal statuses. `completed` counts the
/// lines whose job succeeded, `failed` the refused lines and the jobs that
/// ended otherwise.
const BATCH_SELECT: &str = "SELECT b.id, b.input_file_id, b.endpoint, b.completion_window,
        b.metadata, b.token_name, b.status, b.ending, b.errors, b.output_file_id,
        b.error_file_id, b.total::int8 AS total,
        COALESCE(b.completed, (SELECT count(*) FROM client_batch_lines l JOIN jobs j ON j.id = l.job_id
                               WHERE l.batch_id = b.id AND j.status = $1))::int8 AS completed,
        COALESCE(b.failed, (SELECT count(*) FROM client_batch_lines l LEFT JOIN jobs j ON j.id = l.job_id
                            WHERE l.batch_id = b.id
                              AND (l.job_id IS NULL OR (j.status = ANY($2::text[]) AND j.status <> $1))))::int8
            AS failed,
        floor(extract(epoch FROM b.created_at))::int8 AS created_at,
        floor(extract(epoch FROM b.in_progress_at))::int8 AS in_progress_at,
        floor(extract(epoch FROM b.cancelling_at))::int8 AS cancelling_at,
        floor(extract(epoch FROM b.finalizing_at))::int8 AS finalizing_at,
        floor(extract(epoch FROM b.completed_at))::int8 AS completed_at,
        floor(extract(epoch FROM b.cancelled_at))::int8 AS cancelled_at,
        floor(extract(epoch FROM b.failed_at))::int8 AS failed_at,
        floor(extract(epoch FROM b.expired_at))::int8 AS expired_at,
        floor(extract(epoch FROM b.expires_at))::int8 AS expires_at
     FROM client_batches b";

/// Batch `id`, if it exists (and, with `owner`, that token created it).
pub async fn batch(pool: &PgPool, id: &str, owner: Option<&str>) -> Result<Option<BatchRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{BATCH_SELECT} WHERE b.id = $3 AND ($4::text IS NULL OR b.token_name = $4)"
    )))
    .bind(JobStatus::Succeeded.as_str())
    .bind(JobStatus::terminal_names())
    .bind(id)
    .bind(owner)
    .fetch_optional(pool)
    .await?)
}

/// Up to `limit` batches, newest first, after batch `after` (keyset on
/// `(created_at, id)`), with `owner`: only that token's.
pub async fn list(
    pool: &PgPool,
    owner: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<BatchRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{BATCH_SELECT}
         WHERE ($3::text IS NULL OR b.token_name = $3)
           AND ($4::text IS NULL OR (b.created_at, b.id) <
                (SELECT a.created_at, a.id FROM client_batches a WHERE a.id = $4))
         ORDER BY b.created_at DESC, b.id DESC LIMIT $5"
    )))
    .bind(JobStatus::Succeeded.as_str())
    .bind(JobStatus::terminal_names())
    .bind(owner)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Whether batch `id` exists (and, with `owner`, that token created it).
pub async fn exists(pool: &PgPool, id: &str, owner: Option<&str>) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM client_batches
                        WHERE id = $1 AND ($2::text IS NULL OR token_name = $2))",
    )
    .bind(id)
    .bind(owner)
    .fetch_one(pool)
    .await?)
}

/// Begin cancelling batch `id` (validating or in progress): `cancelling`,
/// bound for `cancelled`. False if it was not running.
pub async fn begin_cancel(pool: &PgPool, id: &str) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE client_batches SET status = 'cancelling', cancelling_at = now(), ending = 'cancelled'
         WHERE id = $1 AND status IN ('validating', 'in_progress')",
    )
    .bind(id)
    .execute(pool)
    .await?
    .rows_affected()
        == 1)
}

/// Batch `id` is in progress past its `expires_at`: bound for `expired`
/// (its unfinished jobs are to be cancelled). False otherwise.
pub async fn begin_expiry(pool: &PgPool, id: &str) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE client_batches SET ending = 'expired'
         WHERE id = $1 AND status = 'in_progress' AND ending IS NULL AND expires_at <= now()",
    )
    .bind(id)
    .execute(pool)
    .await?
    .rows_affected()
        == 1)
}

/// Give every line of batch `id` whose job no dispatcher has stored yet a
/// `cancelled` job row, so the dispatcher, when it takes the job, finds it
/// ended and calls nothing. The ids it cancelled.
pub async fn cancel_undispatched(pool: &PgPool, id: &str, reason: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "INSERT INTO jobs (id, category, status, error, enqueued_at, finished_at)
         SELECT l.job_id, l.category, $2, $3, now(), now()
         FROM client_batch_lines l
         WHERE l.batch_id = $1 AND l.job_id IS NOT NULL AND l.category IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = l.job_id)
         ON CONFLICT (id) DO NOTHING
         RETURNING id",
    )
    .bind(id)
    .bind(JobStatus::Cancelled.as_str())
    .bind(reason)
    .fetch_all(pool)
    .await?)
}

/// The jobs of batch `id` that have not ended.
pub async fn unended_jobs(pool: &PgPool, id: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT l.job_id FROM client_batch_lines l
         WHERE l.batch_id = $1 AND l.job_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = l.job_id
                                                  AND j.status = ANY($2::text[]))
         ORDER BY l.line",
    )
    .bind(id)
    .bind(JobStatus::terminal_names())
    .fetch_all(pool)
    .await?)
}

/// Claim batch `id` for finalizing, if every job of it has ended and no
/// one else holds it: `finalizing` (held for `lease`). True if claimed.
pub async fn claim_finalize(pool: &PgPool, id: &str, lease: Duration) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE client_batches b
         SET status = 'finalizing', finalizing_at = COALESCE(b.finalizing_at, now()),
             claimed_until = now() + make_interval(secs => $3),
             ending = COALESCE(b.ending, 'completed')
         WHERE b.id = $1
           AND (b.status IN ('in_progress', 'cancelling')
                OR (b.status = 'finalizing' AND b.claimed_until < now()))
           AND NOT EXISTS (
               SELECT 1 FROM client_batch_lines l
               WHERE l.batch_id = b.id AND l.job_id IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = l.job_id
                                                        AND j.status = ANY($2::text[])))",
    )
    .bind(id)
    .bind(JobStatus::terminal_names())
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected()
        == 1)
}

/// What became of one line of an ended batch.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LineOutcome {
    pub line: i32,
    pub custom_id: String,
    pub job_id: Option<String>,
    /// Why the line never became a job.
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub status: Option<String>,
    pub job_error: Option<String>,
    pub review_reason: Option<String>,
    pub output: Option<String>,
    pub model: Option<String>,
    pub finish_reason: Option<String>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    /// Unix seconds: when the answer was recorded (or the job ended).
    pub created: i64,
}

/// Every line of batch `id`, in file order, with its job's end and result.
pub async fn outcomes(pool: &PgPool, id: &str) -> Result<Vec<LineOutcome>> {
    Ok(sqlx::query_as(
        "SELECT l.line, l.custom_id, l.job_id, l.error_code, l.error_message,
                j.status, j.error AS job_error, j.review_reason,
                r.output, r.model, r.finish_reason, r.input_tokens, r.output_tokens,
                floor(extract(epoch FROM COALESCE(r.created_at, j.finished_at, now())))::int8 AS created
         FROM client_batch_lines l
         LEFT JOIN jobs j ON j.id = l.job_id
         LEFT JOIN results r ON r.job_id = l.job_id
         WHERE l.batch_id = $1 ORDER BY l.line",
    )
    .bind(id)
    .fetch_all(pool)
    .await?)
}

/// End batch `id`, which this caller claimed: store its output and error
/// files (either may be absent) and its counts, and move it to its ending
/// state, in one transaction. False if the claim was lost (nothing stored).
pub async fn finish(
    pool: &PgPool,
    id: &str,
    output: Option<&NewFile<'_>>,
    error: Option<&NewFile<'_>>,
    counts: (i64, i64),
) -> Result<bool> {
    let mut tx = pool.begin().await?;
    for f in [output, error].into_iter().flatten() {
        sqlx::query(
            "INSERT INTO client_files (id, purpose, filename, bytes, content, token_name)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(f.id)
        .bind(f.purpose)
        .bind(f.filename)
        .bind(f.content.len() as i64)
        .bind(f.content)
        .bind(f.token_name)
        .execute(&mut *tx)
        .await?;
    }
    let done = sqlx::query(
        "UPDATE client_batches
         SET status = ending, claimed_until = NULL,
             output_file_id = $2, error_file_id = $3, completed = $4, failed = $5,
             completed_at = CASE WHEN ending = 'completed' THEN now() END,
             cancelled_at = CASE WHEN ending = 'cancelled' THEN now() END,
             expired_at = CASE WHEN ending = 'expired' THEN now() END
         WHERE id = $1 AND status = 'finalizing'",
    )
    .bind(id)
    .bind(output.map(|f| f.id))
    .bind(error.map(|f| f.id))
    .bind(counts.0 as i32)
    .bind(counts.1 as i32)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if done {
        tx.commit().await?;
    }
    Ok(done)
}
