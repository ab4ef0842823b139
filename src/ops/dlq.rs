//! `switchyard dlq`: list, show and replay dead letters. A replay runs the
//! message again under its original job id, exactly once: the dead letter
//! is claimed (`replayed_at`) in the same transaction that lets its dead job
//! run again (status back to `queued`), and the message is republished with
//! a fresh `Nats-Msg-Id` (`replay-<id>`) so JetStream's duplicate window does
//! not swallow it. A replayed call continues its attempt numbering after the
//! attempts already recorded, so no cost row collides with an earlier one.

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::PgPool;

use crate::bus::{Bus, CallMsg};

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

/// Dead letters, newest first: not yet replayed unless `include_replayed`,
/// whose reason contains `reason` (case-insensitive) if given.
pub async fn list(
    pool: &PgPool,
    reason: Option<&str>,
    include_replayed: bool,
    limit: i64,
) -> Result<Vec<DeadLetter>> {
    let pattern = reason.map(like_pattern);
    let rows = sqlx::query_as::<_, DeadLetter>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM dead_letters
         WHERE ($1::text IS NULL OR reason ILIKE $1) AND ($2 OR replayed_at IS NULL)
         ORDER BY id DESC LIMIT $3"
    )))
    .bind(pattern)
    .bind(include_replayed)
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("listing dead letters")?;
    Ok(rows)
}

pub async fn show(pool: &PgPool, id: i64) -> Result<DeadLetter> {
    sqlx::query_as::<_, DeadLetter>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| anyhow::anyhow!("no dead letter {id}"))
}

fn like_pattern(s: &str) -> String {
    format!(
        "%{}%",
        s.replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    )
}

/// What happened to one dead letter asked to replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Replay {
    Replayed { id: i64, job_id: Option<String> },
    AlreadyReplayed { id: i64 },
    NotFound { id: i64 },
}

/// Which dead letters to replay.
pub enum Select {
    Ids(Vec<i64>),
    /// Every one not yet replayed, optionally whose reason matches.
    All {
        reason: Option<String>,
    },
}

pub async fn replay(pool: &PgPool, bus: &Bus, select: Select) -> Result<Vec<Replay>> {
    let ids: Vec<i64> = match select {
        Select::Ids(ids) => ids,
        Select::All { reason } => {
            sqlx::query_scalar(
                "SELECT id FROM dead_letters
                 WHERE replayed_at IS NULL AND ($1::text IS NULL OR reason ILIKE $1)
                 ORDER BY id",
            )
            .bind(reason.as_deref().map(like_pattern))
            .fetch_all(pool)
            .await?
        }
    };
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(replay_one(pool, bus, id).await?);
    }
    Ok(out)
}

async fn replay_one(pool: &PgPool, bus: &Bus, id: i64) -> Result<Replay> {
    let mut tx = pool.begin().await?;
    let claimed: Option<(String, Option<String>, Vec<u8>)> = sqlx::query_as(
        "UPDATE dead_letters SET replayed_at = now()
         WHERE id = $1 AND replayed_at IS NULL
         RETURNING subject, job_id, payload",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((subject, job_id, mut payload)) = claimed else {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM dead_letters WHERE id = $1)")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        return Ok(if exists {
            Replay::AlreadyReplayed { id }
        } else {
            Replay::NotFound { id }
        });
    };
    if let Some(job) = &job_id {
        // Let the dead job run again.
        sqlx::query(
            "UPDATE jobs SET status = 'queued', error = NULL, finished_at = NULL
             WHERE id = $1 AND status = 'dead'",
        )
        .bind(job)
        .execute(&mut *tx)
        .await?;
    }
    // A call continues its attempt numbering after the recorded attempts.
    if let Ok(mut call) = serde_json::from_slice::<CallMsg>(&payload) {
        let recorded: Option<i32> =
            sqlx::query_scalar("SELECT max(attempt) FROM calls WHERE job_id = $1 AND step = $2")
                .bind(&call.job_id)
                .bind(call.step)
                .fetch_one(&mut *tx)
                .await?;
        call.attempt_base = u32::try_from(recorded.unwrap_or(0)).unwrap_or(0);
        payload = serde_json::to_vec(&call)?;
    }
    // Committed before the message goes out, so whoever takes it sees the
    // job runnable; if the publish fails, the claim is undone.
    tx.commit().await?;
    if let Err(e) = bus
        .publish_durable(subject.clone(), &format!("replay-{id}"), payload.into())
        .await
    {
        let _ = sqlx::query("UPDATE dead_letters SET replayed_at = NULL WHERE id = $1")
            .bind(id)
            .execute(pool)
            .await;
        if let Some(job) = &job_id {
            let _ = sqlx::query(
                "UPDATE jobs SET status = 'dead', finished_at = now() WHERE id = $1 AND status = 'queued'",
            )
            .bind(job)
            .execute(pool)
            .await;
        }
        return Err(e.context(format!("republishing dead letter {id} to {subject}")));
    }
    Ok(Replay::Replayed { id, job_id })
}
