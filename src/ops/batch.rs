//! `switchyard batch`: the provider batches with their state, counts, age
//! and cost so far; cancelling one at its provider. A cancelled batch ends
//! at the provider's pace; its answered items are recorded as usual and the
//! rest are sent real-time (while their jobs' deadlines allow): cancelling a
//! batch does not cancel its jobs.

use anyhow::{Context, Result};
use sqlx::PgPool;

use crate::config::Config;
use crate::providers::batch::BatchClient;
use crate::store::batches;
pub use crate::store::batches::BatchRow;

/// Batches, newest first.
pub async fn list(
    pool: &PgPool,
    provider: Option<&str>,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<BatchRow>> {
    batches::list(pool, provider, state, limit)
        .await
        .context("listing batches")
}

/// One batch, by our id or the provider's.
pub async fn show(pool: &PgPool, id: &str) -> Result<BatchRow> {
    batches::get(pool, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no batch `{id}`"))
}

/// Ask the batch's provider to cancel it.
pub async fn cancel(pool: &PgPool, cfg: &Config, id: &str) -> Result<BatchRow> {
    let b = show(pool, id).await?;
    let Some(pid) = b.provider_batch_id.as_deref() else {
        anyhow::bail!(
            "batch `{}` is {} and not with its provider yet: nothing to cancel there",
            b.id,
            b.state
        );
    };
    if b.state == "ended" {
        anyhow::bail!("batch `{}` has ended already", b.id);
    }
    let pc = cfg.providers.get(&b.provider).ok_or_else(|| {
        anyhow::anyhow!(
            "batch `{}` belongs to provider `{}`, which is not in the config",
            b.id,
            b.provider
        )
    })?;
    let client = BatchClient::from_config(&b.provider, pc)?
        .ok_or_else(|| anyhow::anyhow!("provider `{}` has no batch API", b.provider))?;
    client
        .cancel(pid)
        .await
        .with_context(|| format!("cancelling batch `{}` ({pid}) at `{}`", b.id, b.provider))?;
    Ok(b)
}

/// `age` as `42s`, `7m`, `3h`, `2d`.
pub fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}
