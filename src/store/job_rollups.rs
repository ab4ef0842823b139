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
//!   lock lets one at a time work) adds the jobs created up to five
//!   minutes ago to their hour's rows (`job_rollups_step()`, at most one
//!   hour per call and transaction; figures are sums and histograms, so
//!   the open hour is added to as it goes, migration 0026) and moves
//!   `job_rollup_state.rolled_until` to the minute past them. The rows of
//!   the hour holding `rolled_until` cover that hour up to it.
//! * **Late changes** (a job over five minutes old whose row, calls,
//!   results or steps change: slow or scheduled jobs, provider batches,
//!   reviews, replays, retention) mark the job's hour in
//!   `job_rollup_dirty` from triggers, in the changing transaction. A young
//!   job costs its writes only a cheap check (a `WHEN` clause on `jobs`; a
//!   primary-key lookup per changed row of the other tables). Readers read
//!   dirty hours raw (up to `rolled_until`), and the roller re-rolls them
//!   once quiet for a minute.
//! * **No race with the roll**: a change too young to mark was made by a
//!   transaction that began less than five minutes after the job's
//!   creation. The roller rolls jobs created before T only when no
//!   transaction that began before T + 5 minutes is still open
//!   (`pg_stat_activity`), so such a change has committed and the roll
//!   sees it. The roller must see the other sessions' `xact_start` (same
//!   role, or `pg_read_all_stats`).
//! * **The raw tail** readers aggregate from `job_costs` is therefore five
//!   to six minutes of jobs plus up to [`ROLL_EVERY`] (migration 0024 rolled
//!   whole hours over an hour old: one to two hours of jobs, which grew
//!   with the fleet's rate and dominated the report at tens of millions of
//!   calls; see docs/benchmarks.md). Jobs that run longer than five
//!   minutes mark their hour as they finish, which is read raw until
//!   quiet: under a backlog the open hour is read raw, as 0024 always did.
//! * **Ratings** are not rolled: feedback comes late and often, and would
//!   keep hours dirty. Readers count them from `feedback` directly.

use std::time::Duration;

use anyhow::Result;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How often a worker's roller looks for work.
pub const ROLL_EVERY: Duration = Duration::from_secs(30);

/// Steps per look at most (each its own transaction, at most an hour of
/// jobs), so a backfill of months proceeds in slices and shutdown never
/// waits on more than one.
const STEPS_PER_LOOK: usize = 200;

/// One roller step: the dirty hour it re-rolled or the new
/// `rolled_until`, `None` when there was nothing to do or another roller
/// is at work.
pub async fn step(pool: &PgPool) -> Result<Option<String>> {
    Ok(sqlx::query_scalar("SELECT job_rollups_step()::text")
        .fetch_one(pool)
        .await?)
}

/// Roller steps until there is nothing to do, `max` steps, or `token` is
/// cancelled; how many did something.
pub async fn roll(pool: &PgPool, max: usize, token: &CancellationToken) -> Result<usize> {
    super::rollups::steps(max, token, "rolled jobs", || step(pool)).await
}

/// Every [`ROLL_EVERY`] until `token` is cancelled: [`roll`].
pub async fn roll_periodically(pool: PgPool, token: CancellationToken) {
    let t = token.clone();
    super::rollups::periodically(ROLL_EVERY, token, || async {
        if let Err(e) = roll(&pool, STEPS_PER_LOOK, &t).await {
            warn!(error = %format!("{e:#}"), "rolling job figures up failed");
        }
        if let Err(e) = observe(&pool).await {
            warn!(error = %format!("{e:#}"), "reading the job rollups' state failed");
        }
    })
    .await
}

/// Set the roller's gauges from the database, and return them: seconds
/// from `rolled_until` to now (`None` before the first roll; five to six
/// minutes when the roller keeps up) and the hours marked dirty. Every
/// worker sets them, whichever rolled.
pub async fn observe(pool: &PgPool) -> Result<(Option<f64>, i64)> {
    let (lag, dirty): (Option<f64>, i64) = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM now() - rolled_until)::float8,
                (SELECT count(*) FROM job_rollup_dirty)::int8
         FROM job_rollup_state",
    )
    .fetch_one(pool)
    .await?;
    let m = crate::metrics::global();
    if let Some(lag) = lag {
        m.set("switchyard_job_rollups_lag_seconds", &[], lag);
    }
    m.set("switchyard_job_rollups_dirty_hours", &[], dirty as f64);
    Ok((lag, dirty))
}

/// The rows of `job_rollups` and a fresh aggregate (`job_figures_raw`)
/// for every rolled hour that is not marked dirty, compared column by
/// column; one line per differing row from each side, empty when exact.
const DIFF: &str = r#"
WITH r AS (
    SELECT j.* FROM job_rollups j, job_rollup_state s
    WHERE j.hour < s.rolled_until
      AND NOT EXISTS (SELECT 1 FROM job_rollup_dirty d WHERE d.hour = j.hour)
), c AS (
    SELECT f.* FROM job_rollup_state s, LATERAL job_figures_raw('-infinity', s.rolled_until) f
    WHERE NOT EXISTS (SELECT 1 FROM job_rollup_dirty d WHERE d.hour = f.hour)
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
