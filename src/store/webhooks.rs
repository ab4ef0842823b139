//! `webhook_deliveries`: one row per attempt to call a job's callback URL.
//! Migration 0018's trigger on `jobs` writes a series' first attempt when a
//! job with a callback URL ends; the deliverer claims due attempts (a lease,
//! `FOR UPDATE SKIP LOCKED`, so any number of workers share them), records
//! each one's outcome and writes the series' next attempt; a replay starts
//! a new series.

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use sqlx::PgPool;

use super::JobStatus;

/// `webhook_deliveries.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Due at `due_at` (or being sent, under a lease).
    Pending,
    /// The receiver answered 2xx.
    Ok,
    /// An HTTP error status, or no answer (timeout, connection refused).
    Failed,
    /// Not sent: the URL is not (or no longer) allowed.
    Refused,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Ok => "ok",
            DeliveryState::Failed => "failed",
            DeliveryState::Refused => "refused",
        }
    }
}

/// An attempt a deliverer has claimed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Due {
    pub id: i64,
    pub series: i64,
    pub attempt: i32,
    pub job_id: String,
    pub url: String,
}

/// Claim up to `limit` due attempts for `lease` (after it, another
/// deliverer may take an attempt whose deliverer died: at least once).
pub async fn claim(pool: &PgPool, limit: i64, lease: Duration) -> Result<Vec<Due>> {
    Ok(sqlx::query_as(
        "UPDATE webhook_deliveries d SET leased_until = now() + make_interval(secs => $2)
         FROM (SELECT id FROM webhook_deliveries
               WHERE state = $3 AND due_at <= now()
                 AND (leased_until IS NULL OR leased_until < now())
               ORDER BY due_at, id LIMIT $1
               FOR UPDATE SKIP LOCKED) due
         WHERE d.id = due.id
         RETURNING d.id, d.series, d.attempt, d.job_id, d.url",
    )
    .bind(limit)
    .bind(lease.as_secs_f64())
    .bind(DeliveryState::Pending.as_str())
    .fetch_all(pool)
    .await?)
}

/// What became of one attempt.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `Ok`, `Failed` or `Refused`.
    pub state: DeliveryState,
    pub http_status: Option<i32>,
    pub error: Option<String>,
    pub latency_ms: Option<i32>,
    /// Try again after this long (a next attempt row), or not.
    pub retry_in: Option<Duration>,
}

/// Record attempt `id`'s outcome and, with `retry_in`, write the series'
/// next attempt, in one transaction. False if the attempt was recorded
/// already (its lease ran out and another deliverer sent it too).
pub async fn record(pool: &PgPool, id: i64, o: &Outcome) -> Result<bool> {
    let mut tx = pool.begin().await?;
    let done: Option<(i64, i32, String, String, Option<i64>)> = sqlx::query_as(
        "UPDATE webhook_deliveries
         SET state = $2, http_status = $3, error = $4, latency_ms = $5,
             attempted_at = now(), leased_until = NULL
         WHERE id = $1 AND state = $6
         RETURNING series, attempt, job_id, url, replay_of",
    )
    .bind(id)
    .bind(o.state.as_str())
    .bind(o.http_status)
    .bind(&o.error)
    .bind(o.latency_ms)
    .bind(DeliveryState::Pending.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some((series, attempt, job_id, url, replay_of)) = done else {
        return Ok(false);
    };
    if let Some(wait) = o.retry_in {
        sqlx::query(
            "INSERT INTO webhook_deliveries (series, attempt, job_id, url, due_at, replay_of)
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5), $6)
             ON CONFLICT (series, attempt) DO NOTHING",
        )
        .bind(series)
        .bind(attempt + 1)
        .bind(job_id)
        .bind(url)
        .bind(wait.as_secs_f64())
        .bind(replay_of)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// One attempt, as `webhooks list` and `GET /v1/webhooks` show it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Delivery {
    pub id: i64,
    pub series: i64,
    pub attempt: i32,
    pub job_id: String,
    pub url: String,
    pub state: String,
    pub http_status: Option<i32>,
    pub error: Option<String>,
    pub latency_ms: Option<i32>,
    pub due_at: String,
    pub attempted_at: Option<String>,
    pub replay_of: Option<i64>,
    pub created_at: String,
}

/// Attempts, newest first: job `job_id`'s, or everyone's.
pub async fn list(pool: &PgPool, job_id: Option<&str>, limit: i64) -> Result<Vec<Delivery>> {
    Ok(sqlx::query_as(
        "SELECT id, series, attempt, job_id, url, state, http_status, error, latency_ms,
                due_at::text AS due_at, attempted_at::text AS attempted_at, replay_of,
                created_at::text AS created_at
         FROM webhook_deliveries
         WHERE $1::text IS NULL OR job_id = $1
         ORDER BY id DESC LIMIT $2",
    )
    .bind(job_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Replay {
    /// A new series starts now (its first attempt is due).
    Started {
        series: i64,
        job_id: String,
        url: String,
    },
    /// Neither a delivery nor a job of that id.
    NotFound,
    /// The job has not ended: its webhook comes when it does.
    NotEnded { job_id: String, status: String },
    /// The job has no callback URL and was never called back.
    NoCallback { job_id: String },
}

/// Deliver again, as a new series: `target` is a delivery id (any attempt
/// of a series) or, when no delivery has that id, a job id. The URL is the
/// delivery's, or for a job its callback URL (else its last delivery's).
pub async fn replay(pool: &PgPool, target: &str) -> Result<Replay> {
    let mut tx = pool.begin().await?;
    let by_delivery: Option<(String, String, i64)> = match target.parse::<i64>() {
        Ok(id) => {
            sqlx::query_as("SELECT job_id, url, series FROM webhook_deliveries WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
        }
        Err(_) => None,
    };
    let (job_id, url, replay_of) = match by_delivery {
        Some((job, url, series)) => (job, Some(url), Some(series)),
        None => {
            let row: Option<(Option<String>, Option<i64>)> = sqlx::query_as(
                "SELECT COALESCE(j.callback_url, d.url), d.series
                 FROM jobs j LEFT JOIN LATERAL (
                     SELECT url, series FROM webhook_deliveries
                     WHERE job_id = j.id ORDER BY id DESC LIMIT 1) d ON true
                 WHERE j.id = $1",
            )
            .bind(target)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                None => return Ok(Replay::NotFound),
                Some((url, series)) => (target.to_string(), url, series),
            }
        }
    };
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
        .bind(&job_id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(status) = status else {
        return Ok(Replay::NotFound);
    };
    if !JobStatus::parse(&status).is_some_and(JobStatus::is_final) {
        return Ok(Replay::NotEnded { job_id, status });
    }
    let Some(url) = url else {
        return Ok(Replay::NoCallback { job_id });
    };
    let series: i64 = sqlx::query_scalar(
        "INSERT INTO webhook_deliveries (id, series, attempt, job_id, url, replay_of)
         SELECT n.id, n.id, 1, $1, $2, $3
         FROM (SELECT nextval(pg_get_serial_sequence('webhook_deliveries', 'id')) AS id) n
         RETURNING series",
    )
    .bind(&job_id)
    .bind(&url)
    .bind(replay_of)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Replay::Started {
        series,
        job_id,
        url,
    })
}
