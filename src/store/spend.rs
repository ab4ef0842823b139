//! Category spend for budgets: what `calls` holds per category since the
//! start of the UTC day and of the UTC month.

use std::collections::HashMap;

use anyhow::Result;
use rust_decimal::Decimal;
use sqlx::PgPool;

/// One category's spend in USD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Spend {
    /// Since the start of today (UTC).
    pub today_usd: Decimal,
    /// Since the start of this month (UTC).
    pub this_month_usd: Decimal,
}

/// The spend of each of `categories` that has calls this month (a
/// category missing from the map has spent nothing).
pub async fn by_category(pool: &PgPool, categories: &[String]) -> Result<HashMap<String, Spend>> {
    let rows: Vec<(String, Decimal, Decimal)> = sqlx::query_as(
        // From the hourly rollups and the roller's raw tail: UTC days and
        // months are whole hours.
        "SELECT category,
                COALESCE(sum(cost_usd) FILTER (
                    WHERE hour >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'), 0),
                COALESCE(sum(cost_usd), 0)
         FROM call_rollups_live
         WHERE category = ANY($1)
           AND hour >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
         GROUP BY category HAVING sum(calls) > 0",
    )
    .bind(categories)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(category, today_usd, this_month_usd)| {
            (
                category,
                Spend {
                    today_usd,
                    this_month_usd,
                },
            )
        })
        .collect())
}
