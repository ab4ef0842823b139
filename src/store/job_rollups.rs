//! The hourly job rollups (migration 0024) and the roller that fills them.
//!
//! The report's per-job sections (jobs by status, routes, served-by, the
//! savings' cost split) used to read every job of their window through the
//! `job_costs` view: 38 s for `report --since 7d` at 10 million calls.
//! `job_rollups` holds those figures summed per hour of the jobs' creation
//! × category × variant × route × status × outcome × answering model, and
//! the readers in [`super::report`] take whole rolled hours from it and the
//! rest (the window's partial edges, hours not rolled yet, hours changed
//! since) from `job_costs`. The numbers are the same either way; only the
//! time differs.
//!
//! Unlike the call rollups, which triggers keep exact in the writers' own
//! transactions, a job's figures depend on five tables and change until
//! the job settles, so recomputing them on every write would cost the hot
//! path several times per job. Instead:
//!
//! * **The roller** ([`roll_periodically`], in every worker; an advisory
//!   lock lets one at a time work) snapshots whole hours once they are over
//!   an hour old (`job_rollups_step()`, one hour per call and transaction),
//!   and moves `job_rollup_state.rolled_until` past them.
//! * **Late changes** (a job over an hour old whose row, calls, results or
//!   steps change: scheduled jobs, provider batches, reviews, replays,
//!   retention) mark the job's hour in `job_rollup_dirty` from triggers, in
//!   the changing transaction. A young job costs its writes only a cheap
//!   check (a `WHEN` clause on `jobs`; a primary-key lookup per changed row
//!   of the other tables). Readers read dirty hours raw, and the roller
//!   re-rolls them once quiet for a minute.
//! * **No race with the roll**: a change too young to mark was made by a
//!   transaction that began less than an hour after the job's creation.
//!   The roller closes hour H only when no transaction that began before
//!   H + 2 hours is still open (`pg_stat_activity`), so such a change has
//!   committed and the roll sees it. The roller must see the other
//!   sessions' `xact_start` (same role, or `pg_read_all_stats`).
//! * **Ratings** are not rolled: feedback comes late and often, and would
//!   keep hours dirty. Readers count them from `feedback` directly.

use std::time::Duration;

use anyhow::Result;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often a worker's roller looks for work.
pub const ROLL_EVERY: Duration = Duration::from_secs(30);

/// Hours rolled per look at most (each its own transaction), so a backfill
/// of months proceeds in slices and shutdown never waits on more than one.
const STEPS_PER_LOOK: usize = 200;

/// One roller step: the hour it rolled (or the new `rolled_until` when it
/// skipped empty hours), `None` when there was nothing to do or another
/// roller is at work.
pub async fn step(pool: &PgPool) -> Result<Option<String>> {
    Ok(sqlx::query_scalar("SELECT job_rollups_step()::text")
        .fetch_one(pool)
        .await?)
}

/// Roller steps until there is nothing to do, `max` steps, or `token` is
/// cancelled; how many did something.
pub async fn roll(pool: &PgPool, max: usize, token: &CancellationToken) -> Result<usize> {
    let mut n = 0;
    while n < max && !token.is_cancelled() {
        match step(pool).await? {
            Some(h) => {
                debug!(hour = %h, "rolled jobs");
                n += 1;
            }
            None => break,
        }
    }
    Ok(n)
}

/// Every [`ROLL_EVERY`] until `token` is cancelled: [`roll`].
pub async fn roll_periodically(pool: PgPool, token: CancellationToken) {
    let mut tick = tokio::time::interval(ROLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = roll(&pool, STEPS_PER_LOOK, &token).await {
                    warn!(error = %format!("{e:#}"), "rolling job figures up failed");
                }
            }
        }
    }
}

/// The hour rows of `job_rollups` and a fresh aggregate of `job_costs`
/// for every rolled hour that is not marked dirty, compared column by
/// column; one line per differing row from each side, empty when exact.
const DIFF: &str = r#"
WITH rolled AS (
    SELECT h.hour FROM job_rollup_state s,
         LATERAL generate_series(
             (SELECT rollup_hour(min(created_at)) FROM jobs), s.rolled_until - interval '1 hour',
             interval '1 hour') h(hour)
    WHERE s.rolled_until IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM job_rollup_dirty d WHERE d.hour = h.hour)
), r AS (
    SELECT j.hour, category, variant, route, status, outcome, answered_by, jobs, fell_back,
           reviewed, calls, cost_usd, answer_cost_usd, retries_cost_usd, classifier_cost_usd,
           fallback_cost_usd, stages_cost_usd, voters_cost_usd, judge_cost_usd,
           first_uncached_input_tokens, first_cached_input_tokens, answer_output_tokens,
           latency_jobs, latency_sum_ms, latency_hist
    FROM job_rollups j JOIN rolled USING (hour)
), c AS (
    SELECT rollup_hour(jc.created_at) AS hour, jc.category, jc.variant, jc.route, jc.status,
           jc.outcome, COALESCE(jc.answered_by, ''), count(*), count(*) FILTER (WHERE jc.fell_back),
           count(*) FILTER (WHERE jc.reviewed), sum(jc.calls), sum(jc.cost_usd),
           sum(jc.answer_cost_usd), sum(jc.retries_cost_usd), sum(jc.classifier_cost_usd),
           sum(jc.fallback_cost_usd), sum(jc.stages_cost_usd), sum(jc.voters_cost_usd),
           sum(jc.judge_cost_usd), sum(jc.first_uncached_input_tokens),
           sum(jc.first_cached_input_tokens), sum(jc.answer_output_tokens),
           count(r.latency_ms), COALESCE(sum(r.latency_ms), 0),
           latency_hist(CASE WHEN r.latency_ms IS NOT NULL THEN latency_bucket(r.latency_ms) END, 1)
    FROM job_costs jc LEFT JOIN results r ON r.job_id = jc.job_id
    WHERE rollup_hour(jc.created_at) IN (SELECT hour FROM rolled)
    GROUP BY 1, 2, 3, 4, 5, 6, 7
)
SELECT format('rollup %s', x.*) FROM (SELECT * FROM r EXCEPT SELECT * FROM c) x
UNION ALL
SELECT format('jobs %s', x.*) FROM (SELECT * FROM c EXCEPT SELECT * FROM r) x
"#;

/// Where the job rollups differ from the jobs they summarize (rolled hours
/// not marked dirty); empty when exact. Reads every job: a check, not a
/// report.
pub async fn mismatches(pool: &PgPool) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(DIFF).fetch_all(pool).await?)
}

/// What the roller has done: the end of the rolled hours (`None`: none
/// yet), the hours marked dirty, and the rollup rows.
pub async fn state(pool: &PgPool) -> Result<(Option<String>, i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT rolled_until::text FROM job_rollup_state),
                (SELECT count(*) FROM job_rollup_dirty)::int8,
                (SELECT count(*) FROM job_rollups)::int8",
    )
    .fetch_one(pool)
    .await?)
}
