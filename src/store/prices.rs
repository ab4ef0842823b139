//! `model_prices`: the configured models' prices, which the `job_costs`
//! family of views (`savings_by_category`, `what_if_by_model`) price
//! counterfactual calls at. Written from a worker's configuration at start.

use anyhow::Result;
use sqlx::PgPool;

use crate::pricing::Prices;

/// One configured model's prices.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPrices {
    pub model: String,
    pub provider: String,
    pub prices: Prices,
}

/// Make `model_prices` hold exactly `models`, with `baseline` marked. One
/// writer at a time (a transaction-scoped advisory lock), so processes
/// starting together leave one consistent table.
pub async fn sync(pool: &PgPool, models: &[ModelPrices], baseline: Option<&str>) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('switchyard.model_prices'))")
        .execute(&mut *tx)
        .await?;
    let names: Vec<&str> = models.iter().map(|m| m.model.as_str()).collect();
    sqlx::query("DELETE FROM model_prices WHERE model <> ALL($1::text[])")
        .bind(&names)
        .execute(&mut *tx)
        .await?;
    let col = |f: fn(&Prices) -> rust_decimal::Decimal| {
        models.iter().map(|m| f(&m.prices)).collect::<Vec<_>>()
    };
    sqlx::query(
        "INSERT INTO model_prices (model, provider, input_per_mtok, output_per_mtok,
                                   cached_input_per_mtok, cache_write_per_mtok, is_baseline)
         SELECT m, p, i, o, c, w, (m = $7::text) IS TRUE FROM UNNEST($1::text[], $2::text[], $3::numeric[],
                $4::numeric[], $5::numeric[], $6::numeric[]) AS u(m, p, i, o, c, w)
         ON CONFLICT (model) DO UPDATE SET provider = EXCLUDED.provider,
             input_per_mtok = EXCLUDED.input_per_mtok, output_per_mtok = EXCLUDED.output_per_mtok,
             cached_input_per_mtok = EXCLUDED.cached_input_per_mtok,
             cache_write_per_mtok = EXCLUDED.cache_write_per_mtok,
             is_baseline = EXCLUDED.is_baseline, synced_at = now()",
    )
    .bind(&names)
    .bind(models.iter().map(|m| m.provider.as_str()).collect::<Vec<_>>())
    .bind(col(|p| p.input_per_mtok))
    .bind(col(|p| p.output_per_mtok))
    .bind(col(|p| p.cached_input_per_mtok))
    .bind(col(|p| p.cache_write_per_mtok))
    .bind(baseline)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
