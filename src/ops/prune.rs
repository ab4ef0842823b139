//! `switchyard prune`: retention. Deletes jobs that ended more than N days
//! ago with everything recorded about them (calls, steps, results,
//! feedback), dead letters and ended provider batches (with their items)
//! older than N days, and expired response cache entries, in batches (short
//! transactions beside a running fleet). Jobs still queued, running or
//! parked are kept, whatever their age. Monthly `calls` partitions whose
//! jobs all ended before the cut-off are dropped whole, first.

use anyhow::Result;
use sqlx::PgPool;

use crate::store::retention;
pub use crate::store::retention::Pruned;

/// Delete what ended more than `days` ago, `batch` jobs per transaction.
pub async fn run(pool: &PgPool, days: u32, dry_run: bool, batch: i64) -> Result<Pruned> {
    if dry_run {
        return retention::count_older_than(pool, days).await;
    }
    let mut total = Pruned::default();
    if retention::ensure_call_partitions(pool).await?.is_none() {
        tracing::warn!("calls is busy: the partitions ahead are left for a later try");
    }
    // Whole months of calls first: one aggregate and a DROP each instead of
    // a delete per row (their jobs' other rows go below, and a month whose
    // drop could not have its lock goes row by row with them).
    for name in retention::droppable_call_partitions(pool, days).await? {
        match retention::drop_call_partition(pool, &name).await? {
            Some(n) => {
                total.calls += n;
                total.calls_partitions += 1;
            }
            None => {
                // The next months would wait as long: they too go row by row.
                tracing::warn!(
                    partition = %name,
                    "calls is busy: months are deleted row by row instead of dropped"
                );
                break;
            }
        }
    }
    loop {
        let b = retention::delete_jobs_older_than(pool, days, batch).await?;
        total.jobs += b.jobs;
        total.calls += b.calls;
        total.steps += b.steps;
        total.results += b.results;
        total.feedback += b.feedback;
        total.webhook_deliveries += b.webhook_deliveries;
        if b.jobs == 0 {
            break;
        }
    }
    loop {
        let n = retention::delete_dead_letters_older_than(pool, days, batch).await?;
        total.dead_letters += n;
        if n == 0 {
            break;
        }
    }
    loop {
        let (b, i) = retention::delete_batches_older_than(pool, days, batch).await?;
        total.batches += b;
        total.batch_items += i;
        if b == 0 {
            break;
        }
    }
    loop {
        let n = crate::store::cache::delete_expired(pool, batch).await?;
        total.cache_entries += n;
        if n == 0 {
            break;
        }
    }
    Ok(total)
}
