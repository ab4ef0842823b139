//! The hourly call rollups (migrations 0022, 0023, 0028): the roller that
//! fills them, and a check that they equal the calls they summarize.
//!
//! `call_rollups` holds per UTC hour × category × provider × model ×
//! batched what the report, the dashboard, the budgets and the analysts'
//! views sum over calls: counts by outcome, tokens, USD, a latency
//! histogram, and the number of (job, category) pairs. Migration 0022 kept
//! it exact with triggers in every transaction that wrote calls, which cost
//! each job about 2.5 ms at p50 and 4 ms at p99 of added latency at 1,000
//! jobs/s (docs/benchmarks.md). Migration 0028 takes it off that path:
//!
//! * **The roller** ([`roll_periodically`], in every worker; an advisory
//!   lock lets one at a time work) adds the calls created before a moving
//!   watermark, `call_rollup_state.rolled_until`, to their hour's rows
//!   (`call_rollups_step()`: at most five minutes of calls per step and
//!   transaction). `call_rollups` covers exactly the calls created before
//!   the watermark; readers take the rest from `calls` through the view
//!   `call_rollups_live` (rolled rows plus the raw tail, aggregated the
//!   same way), so every figure is exact whatever the roller has done.
//! * **Young changes are the roll's.** The watermark only moves to a time T
//!   when no transaction that began before T + `settle` (30 s) is still
//!   open. A change made within `settle` of its call's creation (the
//!   writer's intent row, its final record: "young") has therefore
//!   committed before the roll that covers the call, and the roll sees it.
//!   Young changes cost the writer one check of its statement's rows
//!   against the clock, nothing more.
//! * **Late changes apply deltas.** Any other change (a call over 30 s
//!   old: a long call's final record, provider batches, retention,
//!   updates by hand, bulk loads) adds new minus old to the rows already
//!   rolled (calls before the watermark), as 0022's triggers did for
//!   everything. It reads the watermark under a shared advisory lock held
//!   to its commit; the roller takes that lock exclusively, so a roll never
//!   runs between a late change's reading and its commit.
//! * **Pairs**: `call_jobs` remembers the (job, category) pairs rolled or
//!   changed late, and the key each is counted under; the tail's pairs not
//!   in it are counted by `call_jobs_raw`, so `cost_per_job` is exact.
//! * **The tail** readers aggregate is `settle` plus up to [`ROLL_EVERY`]
//!   of calls, longer while a transaction stays open (the watermark waits
//!   for it) or while the roller is not running (no worker).
//!
//! The roller must see the other sessions' `xact_start` in
//! `pg_stat_activity` (the same role, or `pg_read_all_stats`).

use std::time::Duration;

use anyhow::Result;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often a worker's call roller looks for work.
pub const ROLL_EVERY: Duration = Duration::from_secs(5);

/// How often the roller's task makes sure the `calls` partitions ahead exist.
const PARTITIONS_EVERY: Duration = Duration::from_secs(3600);

/// Steps per look at most (each its own transaction, at most five minutes
/// of calls), so a backlog proceeds in slices and shutdown never waits on
/// more than one.
const STEPS_PER_LOOK: usize = 200;

/// One roller step: the new watermark when it added calls, `None` when
/// there was nothing to add (the watermark may still have moved over a
/// stretch without calls) or another roller is at work.
pub async fn step(pool: &PgPool) -> Result<Option<String>> {
    Ok(sqlx::query_scalar("SELECT call_rollups_step()::text")
        .fetch_one(pool)
        .await?)
}

/// Roller steps until there is nothing to add, `max` steps, or `token` is
/// cancelled; how many added calls.
pub async fn roll(pool: &PgPool, max: usize, token: &CancellationToken) -> Result<usize> {
    steps(max, token, "rolled calls", || step(pool)).await
}

/// `step` until it returns `None`, `max` times, or `token` is cancelled;
/// how many times it did something (each logged at debug with `what`).
pub(crate) async fn steps<F, Fut>(
    max: usize,
    token: &CancellationToken,
    what: &str,
    mut step: F,
) -> Result<usize>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>>>,
{
    let mut n = 0;
    while n < max && !token.is_cancelled() {
        match step().await? {
            Some(s) => {
                debug!(step = %s, "{what}");
                n += 1;
            }
            None => break,
        }
    }
    Ok(n)
}

/// Every `every` until `token` is cancelled: `look` (a roller's look).
pub(crate) async fn periodically<F, Fut>(every: Duration, token: CancellationToken, mut look: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => look().await,
        }
    }
}

/// Every [`ROLL_EVERY`] until `token` is cancelled: [`roll`], then the
/// lag gauge.
pub async fn roll_periodically(pool: PgPool, token: CancellationToken) {
    let t = token.clone();
    // Once an hour (and at the first look), the monthly `calls` partitions
    // ahead: a fleet that runs for months without a migrating start keeps
    // them ready.
    let partitions_due = std::sync::Mutex::new(std::time::Instant::now());
    periodically(ROLL_EVERY, token, || async {
        let due = {
            let mut at = partitions_due.lock().unwrap_or_else(|p| p.into_inner());
            let due = std::time::Instant::now() >= *at;
            if due {
                *at = std::time::Instant::now() + PARTITIONS_EVERY;
            }
            due
        };
        if due {
            // `Ok(None)`: `calls` was busy; the next hour tries again.
            if let Err(e) = super::retention::ensure_call_partitions(&pool).await {
                warn!(error = %format!("{e:#}"), "creating calls partitions failed");
            }
        }
        if let Err(e) = roll(&pool, STEPS_PER_LOOK, &t).await {
            warn!(error = %format!("{e:#}"), "rolling calls up failed");
        }
        match lag(&pool).await {
            Ok(Some(lag)) => {
                crate::metrics::global().set("switchyard_call_rollups_lag_seconds", &[], lag)
            }
            Ok(None) => {}
            Err(e) => warn!(error = %format!("{e:#}"), "reading the call rollups' state failed"),
        }
    })
    .await
}

/// Seconds from the watermark to now (`None` before the first roll; about
/// 30 to 35 s when the roller keeps up).
pub async fn lag(pool: &PgPool) -> Result<Option<f64>> {
    Ok(sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM now() - rolled_until)::float8 FROM call_rollup_state",
    )
    .fetch_one(pool)
    .await?)
}

/// Rows where `call_rollups` (summed over shards) and an aggregate of the
/// calls created before the watermark disagree, per (hour, category,
/// provider, model, batched), on every column including the latency
/// histogram; then categories whose `jobs` (rolled, plus the tail's new
/// pairs) differ from `count(DISTINCT job_id)`. Empty when exact.
const DIFF: &str = r#"
WITH w AS (
    SELECT COALESCE(rolled_until, '-infinity'::timestamptz) AS wm FROM call_rollup_state
), r AS (
    SELECT hour, category, provider, model, batched,
           sum(calls) AS calls, sum(ok_calls) AS ok, sum(retryable_calls) AS re,
           sum(terminal_calls) AS te, sum(unknown_calls) AS un, sum(cached_calls) AS ca,
           sum(retry_calls) AS rt, sum(input_tokens) AS i, sum(output_tokens) AS o,
           sum(cached_input_tokens) AS ci, sum(cache_write_input_tokens) AS cw,
           sum(reasoning_tokens) AS rs, sum(cost_usd) AS cost, sum(saved_usd) AS saved,
           sum(latency_ms_sum) AS ls,
           CASE WHEN sum(ok_calls) > 0 THEN latency_hist_sum(latency_hist) END AS h
    FROM call_rollups GROUP BY 1, 2, 3, 4, 5
    HAVING sum(calls) <> 0 OR sum(cost_usd) <> 0 OR sum(input_tokens) <> 0
        OR sum(output_tokens) <> 0 OR sum(latency_ms_sum) <> 0
), c AS (
    SELECT hour, category, provider, model, batched, calls::numeric, ok_calls::numeric,
           retryable_calls::numeric, terminal_calls::numeric, unknown_calls::numeric,
           cached_calls::numeric, retry_calls::numeric, input_tokens::numeric,
           output_tokens::numeric, cached_input_tokens::numeric,
           cache_write_input_tokens::numeric, reasoning_tokens::numeric, cost_usd, saved_usd,
           latency_ms_sum::numeric, CASE WHEN ok_calls > 0 THEN latency_hist END
    FROM w, LATERAL call_figures_raw('-infinity', w.wm)
)
SELECT format('rollup %s', r.*) FROM (SELECT * FROM r EXCEPT SELECT * FROM c) r
UNION ALL
SELECT format('calls %s', c.*) FROM (SELECT * FROM c EXCEPT SELECT * FROM r) c
UNION ALL
SELECT format('jobs %s', x.*) FROM (
    (SELECT category, sum(jobs) FROM cost_per_job GROUP BY 1
     EXCEPT SELECT category, count(DISTINCT job_id) FROM calls GROUP BY 1)
    UNION ALL
    (SELECT category, count(DISTINCT job_id) FROM calls GROUP BY 1
     EXCEPT SELECT category, sum(jobs) FROM cost_per_job GROUP BY 1)) x
"#;

/// Where the rollups differ from the calls they cover (one line per
/// differing rollup key, from each side); empty when they are exact. Reads
/// every call: a check, not a report.
pub async fn mismatches(pool: &PgPool) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(DIFF).fetch_all(pool).await?)
}

/// How many calls the rolled rows cover, and how many the raw tail holds.
pub async fn coverage(pool: &PgPool) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT COALESCE(sum(calls), 0)::int8 FROM call_rollups),
                (SELECT count(*) FROM calls, call_rollup_state s
                 WHERE created_at >= COALESCE(s.rolled_until, '-infinity'))::int8",
    )
    .fetch_one(pool)
    .await?)
}

/// Make changes to calls late after `settle` (an interval, such as
/// `"2 seconds"`) instead of 30 s, and let the roller cover calls that old:
/// tests and the invariants benches, so both paths run while they watch.
/// Only lower it: raising it while calls are written is not safe (see
/// migration 0028).
pub async fn lower_settle(pool: &PgPool, settle: &str) -> Result<()> {
    sqlx::query("UPDATE call_rollup_state SET settle = $1::interval")
        .bind(settle)
        .execute(pool)
        .await?;
    Ok(())
}

/// Roll until every call is covered, which takes the settle time past the
/// newest call, or give up `patience` after that; the calls the rolled rows
/// then cover and those still in the raw tail (0 unless it gave up).
pub async fn roll_until_covered(pool: &PgPool, patience: Duration) -> Result<(i64, i64)> {
    let settle: f64 =
        sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM settle)::float8 FROM call_rollup_state")
            .fetch_one(pool)
            .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(settle) + patience;
    let token = CancellationToken::new();
    loop {
        roll(pool, 10_000, &token).await?;
        let (rolled, tail) = coverage(pool).await?;
        if tail == 0 || tokio::time::Instant::now() > deadline {
            return Ok((rolled, tail));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
