//! The dashboard's figures from Postgres (fleet-wide): jobs finished
//! recently, today's (UTC) jobs by status and spend by model, and the last
//! hour's errors by model.

use anyhow::Result;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

/// Today (UTC) as a SQL date expression; a constant, never input.
const TODAY: &str = "(now() AT TIME ZONE 'UTC')::date";

/// Jobs that finished in the last ten minutes, by how many whole minutes
/// ago (0-10); minutes without a finished job are absent.
pub async fn finished_by_minutes_ago(pool: &PgPool) -> Result<Vec<(i32, i64)>> {
    Ok(sqlx::query_as(
        "SELECT (EXTRACT(EPOCH FROM now() - finished_at) / 60)::int4 AS ago, count(*)::int8
         FROM jobs WHERE finished_at > now() - interval '10 minutes' GROUP BY 1",
    )
    .fetch_all(pool)
    .await?)
}

/// Jobs that finished in the last minute.
pub async fn finished_last_minute(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*)::int8 FROM jobs WHERE finished_at > now() - interval '1 minute'",
    )
    .fetch_one(pool)
    .await?)
}

/// Today's (UTC) jobs by status, by status name.
pub async fn jobs_today(pool: &PgPool) -> Result<Vec<(String, i64)>> {
    // Constant SQL: the format! only joins the constant above.
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT status, count(*)::int8 FROM jobs
         WHERE (created_at AT TIME ZONE 'UTC')::date = {TODAY} GROUP BY 1 ORDER BY 1"
    )))
    .fetch_all(pool)
    .await?)
}

/// One model's calls and their cost.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct ModelSpend {
    pub model: String,
    pub calls: i64,
    pub cost_usd: Decimal,
}

/// Today's (UTC) calls and USD by model, the most expensive first.
pub async fn spend_today(pool: &PgPool) -> Result<Vec<ModelSpend>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT model, count(*)::int8 AS calls, sum(cost_usd) AS cost_usd FROM calls
         WHERE (created_at AT TIME ZONE 'UTC')::date = {TODAY} GROUP BY 1 ORDER BY 3 DESC"
    )))
    .fetch_all(pool)
    .await?)
}

/// One model's calls and how many of them failed.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ModelCallErrors {
    pub model: String,
    pub calls: i64,
    pub errors: i64,
}

/// The last hour's calls and errors (retryable or terminal) by model.
pub async fn errors_last_hour(pool: &PgPool) -> Result<Vec<ModelCallErrors>> {
    Ok(sqlx::query_as(
        "SELECT model, count(*)::int8 AS calls,
                count(*) FILTER (WHERE outcome IN ('retryable_error', 'terminal_error'))::int8 AS errors
         FROM calls WHERE created_at > now() - interval '1 hour' GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await?)
}
