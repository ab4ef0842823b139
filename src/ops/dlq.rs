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
use crate::store;
use crate::store::dlq::Claimed;
pub use crate::store::dlq::DeadLetter;

/// Dead letters, newest first: not yet replayed unless `include_replayed`,
/// whose reason contains `reason` (case-insensitive) if given.
pub async fn list(
    pool: &PgPool,
    reason: Option<&str>,
    include_replayed: bool,
    limit: i64,
) -> Result<Vec<DeadLetter>> {
    store::dlq::list(pool, reason, include_replayed, limit)
        .await
        .context("listing dead letters")
}

pub async fn show(pool: &PgPool, id: i64) -> Result<DeadLetter> {
    store::dlq::get(pool, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no dead letter {id}"))
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
        Select::All { reason } => store::dlq::unreplayed_ids(pool, reason.as_deref()).await?,
    };
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(replay_one(pool, bus, id).await?);
    }
    Ok(out)
}

async fn replay_one(pool: &PgPool, bus: &Bus, id: i64) -> Result<Replay> {
    let mut claim = match store::dlq::claim(pool, id).await? {
        Claimed::Claimed(c) => c,
        Claimed::AlreadyReplayed => return Ok(Replay::AlreadyReplayed { id }),
        Claimed::NotFound => return Ok(Replay::NotFound { id }),
    };
    // A call continues its attempt numbering after the recorded attempts.
    let mut payload = std::mem::take(&mut claim.payload);
    if let Ok(mut call) = serde_json::from_slice::<CallMsg>(&payload) {
        let recorded = claim.recorded_attempt(&call.job_id, call.step).await?;
        call.attempt_base = u32::try_from(recorded.unwrap_or(0)).unwrap_or(0);
        payload = serde_json::to_vec(&call)?;
    }
    let (subject, job_id) = (claim.subject.clone(), claim.job_id.clone());
    // Committed before the message goes out, so whoever takes it sees the
    // job runnable; if the publish fails, the claim is undone.
    claim.commit().await?;
    if let Err(e) = bus
        .publish_durable(subject.clone(), &format!("replay-{id}"), payload.into())
        .await
    {
        let _ = store::dlq::unclaim(pool, id, job_id.as_deref()).await;
        return Err(e.context(format!("republishing dead letter {id} to {subject}")));
    }
    Ok(Replay::Replayed { id, job_id })
}
