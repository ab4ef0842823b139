//! The dashboard's figures from Postgres (fleet-wide): jobs finished
//! recently (through `jobs_finished_idx`, migration 0027), today's (UTC)
//! jobs by status (job rollups) and spend by model (call rollups), and the
//! last hour's errors by model.

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

/// Today's (UTC) jobs by status, by status name: the report's per-job
/// figures for the window from midnight (the job rollups' whole hours and
/// a raw tail of minutes), so the count does not read every job of the day.
pub async fn jobs_today(pool: &PgPool) -> Result<Vec<(String, i64)>> {
    // Constant SQL: the format! only joins the constant above.
    let midnight: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT to_char({TODAY}, 'YYYY-MM-DD') || 'T00:00:00Z'"
    )))
    .fetch_one(pool)
    .await?;
    let scope = super::report::Scope {
        since: super::report::TimeBound::At(midnight),
        ..Default::default()
    };
    Ok(super::report::jobs_by_status(pool, &scope)
        .await?
        .into_iter()
        .map(|c| (c.status, c.jobs))
        .collect())
}

/// One model's calls and their cost.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct ModelSpend {
    pub model: String,
    pub calls: i64,
    pub cost_usd: Decimal,
}

/// Today's (UTC) calls and USD by model, the most expensive first (from
/// the hourly rollups and their raw tail: a UTC day is whole hours).
pub async fn spend_today(pool: &PgPool) -> Result<Vec<ModelSpend>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT model, sum(calls)::int8 AS calls, sum(cost_usd) AS cost_usd FROM call_rollups_live
         WHERE hour >= {TODAY}::timestamp AT TIME ZONE 'UTC'
         GROUP BY 1 HAVING sum(calls) > 0 ORDER BY 3 DESC"
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
    let scope = super::report::Scope {
        since: super::report::TimeBound::Ago(60, super::report::TimeUnit::Minutes),
        ..Default::default()
    };
    Ok(super::report::errors_by_model(pool, &scope)
        .await?
        .into_iter()
        .map(|(model, calls, errors)| ModelCallErrors {
            model,
            calls,
            errors,
        })
        .collect())
}
