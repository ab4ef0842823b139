//! The report's reads: for the rows a [`Scope`] selects (a job-id prefix,
//! a time window, a category), jobs by status, calls and tokens and USD by
//! category and by model, dead letters, how each route served its jobs,
//! which models produced the results, daily spend, latency percentiles,
//! and the answered calls' tokens priced at a baseline model. Each async
//! function is one query returning typed rows, except that the per-job
//! sections (jobs by status, routes, served-by, the cost split) are pure
//! functions of one read of the [`JobFigure`]s; the savings arithmetic and
//! formatting are the caller's (`ops::report`).

use anyhow::Result;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use super::{like_pattern, JobStatus, Like};
use crate::pricing::Prices;

/// Which rows a report covers. Jobs (with their results, routes and cost
/// split) count by the jobs' creation time, calls by theirs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scope {
    /// Only jobs whose id starts with this (matched literally).
    pub job_prefix: Option<String>,
    pub since: TimeBound,
    pub until: TimeBound,
    pub category: Option<String>,
}

impl Scope {
    /// Whether the scope selects everything.
    pub fn is_everything(&self) -> bool {
        *self == Scope::default()
    }
}

/// One end of a report's time window.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum TimeBound {
    /// No bound.
    #[default]
    Open,
    /// An absolute date or time, as Postgres reads a `timestamptz`
    /// (`2026-11-01`, `2026-11-01T08:00:00Z`); see [`check_time`].
    At(String),
    /// This long back from now.
    Ago(u32, TimeUnit),
}

/// The unit of a [`TimeBound::Ago`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeUnit {
    Minutes,
    Hours,
    Days,
    Weeks,
}

impl TimeUnit {
    fn as_str(self) -> &'static str {
        match self {
            TimeUnit::Minutes => "minutes",
            TimeUnit::Hours => "hours",
            TimeUnit::Days => "days",
            TimeUnit::Weeks => "weeks",
        }
    }
}

/// Whether Postgres reads `at` as a time (the error says why not).
pub async fn check_time(pool: &PgPool, at: &str) -> Result<()> {
    sqlx::query("SELECT $1::timestamptz")
        .bind(at)
        .execute(pool)
        .await?;
    Ok(())
}

/// A time bound as SQL parameters: an absolute time, or an interval back
/// from now (`90 minutes`).
#[derive(Debug, Clone, Default, PartialEq)]
struct Bound {
    at: Option<String>,
    ago: Option<String>,
}

impl From<&TimeBound> for Bound {
    fn from(b: &TimeBound) -> Self {
        match b {
            TimeBound::Open => Bound::default(),
            TimeBound::At(at) => Bound {
                at: Some(at.clone()),
                ago: None,
            },
            TimeBound::Ago(n, unit) => Bound {
                at: None,
                ago: Some(format!("{n} {}", unit.as_str())),
            },
        }
    }
}

/// The SQL parameters of a [`Scope`]: `$1` id pattern, `$2`/`$3` since,
/// `$4`/`$5` until, `$6` category.
struct Params {
    like: String,
    since: Bound,
    until: Bound,
    category: Option<String>,
}

impl From<&Scope> for Params {
    fn from(s: &Scope) -> Self {
        Params {
            like: like_pattern(s.job_prefix.as_deref().unwrap_or(""), Like::Prefix),
            since: (&s.since).into(),
            until: (&s.until).into(),
            category: s.category.clone(),
        }
    }
}

/// The condition on a table's id, time and category columns, in `$1`-`$6`.
/// The arguments are column expressions of this file, never input.
fn cond(id: &str, time: &str, category: &str) -> String {
    format!(
        "{id} LIKE $1 AND ($2::text IS NULL OR {time} >= $2::timestamptz)
         AND ($3::text IS NULL OR {time} >= now() - $3::interval)
         AND ($4::text IS NULL OR {time} < $4::timestamptz)
         AND ($5::text IS NULL OR {time} < now() - $5::interval)
         AND ($6::text IS NULL OR {category} = $6)"
    )
}

/// The scope's calls as rollup rows (migrations 0022, 0028), from
/// `$1`-`$6`: `call_rollups_live` (the rolled rows and the calls since the
/// roller's watermark, see [`super::rollups`]) for the whole UTC hours
/// inside the window, and `calls` aggregated the same way for the rest
/// (the partial hours at its ends, or everything when a job prefix is
/// given: rollups know no job ids). So every sum and count is exact, and a
/// window of any length reads at most two hours and the roller's tail of
/// raw calls. Columns: `hour`, `category`, `provider`,
/// `model`, `batched`, `calls`, `ok_calls`, `retryable_calls`,
/// `terminal_calls`, `cached_calls`, `input_tokens`, `output_tokens`,
/// `cached_input_tokens`, `cache_write_input_tokens`, `reasoning_tokens`,
/// `cost_usd`, `saved_usd`, `latency_hist` (NULL unless `hist`).
fn calls_src(hist: bool) -> String {
    let (hist_r, hist_c) = if hist {
        (
            "r.latency_hist",
            "latency_hist(CASE WHEN c.outcome = 'ok' THEN latency_bucket(c.latency_ms) END, 1)",
        )
    } else {
        ("NULL::int8[]", "NULL::int8[]")
    };
    let raw = |range: &str| {
        format!(
            "SELECT rollup_hour(c.created_at), c.category, c.provider, c.model,
                    c.batch_id IS NOT NULL, count(*),
                    count(*) FILTER (WHERE c.outcome = 'ok'),
                    count(*) FILTER (WHERE c.outcome = 'retryable_error'),
                    count(*) FILTER (WHERE c.outcome = 'terminal_error'),
                    count(*) FILTER (WHERE c.outcome = 'cached'),
                    sum(c.input_tokens), sum(c.output_tokens), sum(c.cached_input_tokens),
                    sum(c.cache_write_input_tokens), sum(c.reasoning_tokens),
                    sum(c.cost_usd), COALESCE(sum(c.saved_usd), 0), {hist_c}
             FROM calls c
             WHERE c.job_id LIKE $1 AND {range}
               AND ($6::text IS NULL OR c.category = $6)
             GROUP BY 1, 2, 3, 4, 5"
        )
    };
    format!(
        "(WITH b AS (
             SELECT s, u,
                    CASE WHEN $1 <> '%' THEN 'infinity'::timestamptz
                         WHEN rollup_hour(s) = s THEN s
                         ELSE rollup_hour(s) + interval '1 hour' END AS lo,
                    CASE WHEN $1 <> '%' THEN 'infinity'::timestamptz
                         ELSE rollup_hour(u) END AS hi
             FROM (SELECT COALESCE($2::timestamptz, now() - $3::interval,
                                   '-infinity'::timestamptz) AS s,
                          COALESCE($4::timestamptz, now() - $5::interval,
                                   'infinity'::timestamptz) AS u) t)
         SELECT r.hour, r.category, r.provider, r.model, r.batched, r.calls, r.ok_calls,
                r.retryable_calls, r.terminal_calls, r.cached_calls,
                r.input_tokens::numeric, r.output_tokens::numeric,
                r.cached_input_tokens::numeric, r.cache_write_input_tokens::numeric,
                r.reasoning_tokens::numeric, r.cost_usd, r.saved_usd, {hist_r}
         FROM call_rollups_live r
         WHERE r.hour >= (SELECT lo FROM b) AND r.hour < (SELECT hi FROM b)
           AND ($6::text IS NULL OR r.category = $6)
         UNION ALL {}
         UNION ALL {}
        ) AS src(hour, category, provider, model, batched, calls, ok_calls, retryable_calls,
                 terminal_calls, cached_calls, input_tokens, output_tokens, cached_input_tokens,
                 cache_write_input_tokens, reasoning_tokens, cost_usd, saved_usd, latency_hist)",
        raw("c.created_at >= (SELECT s FROM b) AND c.created_at < (SELECT LEAST(lo, u) FROM b)"),
        raw("c.created_at >= (SELECT GREATEST(hi, lo, s) FROM b) AND c.created_at < (SELECT u FROM b)"),
    )
}

/// The scope's jobs (by creation time) as job rollup rows (migration
/// 0024), from `$1`-`$6`: `job_rollups` for the whole UTC hours inside the
/// window that the roller has rolled and nothing has changed since (the
/// hour holding `rolled_until` up to it), and `job_figures_raw()` (the
/// same rows aggregated from `job_costs`) for the rest: the window's
/// partial hours, what is not rolled yet, hours marked dirty (up to
/// `rolled_until`), or everything when a job prefix is given. So every
/// figure is exact whatever the roller has done; see
/// [`super::job_rollups`]. The columns are `job_rollups`' (`hour`,
/// `category`, ..., `latency_hist`).
fn jobs_src() -> String {
    "(WITH b AS (
         SELECT s, u, lo, LEAST(hi, wm) AS rhi
         FROM (SELECT s, u,
                      CASE WHEN $1 <> '%' THEN 'infinity'::timestamptz
                           WHEN rollup_hour(s) = s THEN s
                           ELSE rollup_hour(s) + interval '1 hour' END AS lo,
                      CASE WHEN $1 <> '%' THEN 'infinity'::timestamptz
                           ELSE rollup_hour(u) END AS hi,
                      COALESCE((SELECT rolled_until FROM job_rollup_state),
                               '-infinity'::timestamptz) AS wm
               FROM (SELECT COALESCE($2::timestamptz, now() - $3::interval,
                                     '-infinity'::timestamptz) AS s,
                            COALESCE($4::timestamptz, now() - $5::interval,
                                     'infinity'::timestamptz) AS u) t) t2)
     SELECT j.* FROM job_rollups j
     WHERE j.hour >= (SELECT lo FROM b) AND j.hour < (SELECT rhi FROM b)
       AND NOT EXISTS (SELECT 1 FROM job_rollup_dirty d WHERE d.hour = j.hour)
       AND ($6::text IS NULL OR j.category = $6)
     UNION ALL
     SELECT f.* FROM b, LATERAL job_figures_raw(b.s, LEAST(b.lo, b.u), $1, $6) f
     UNION ALL
     SELECT f.* FROM b, LATERAL job_figures_raw(GREATEST(b.rhi, b.lo, b.s), b.u, $1, $6) f
     UNION ALL
     SELECT f.* FROM b, job_rollup_dirty d,
            LATERAL job_figures_raw(d.hour, LEAST(d.hour + interval '1 hour', b.rhi), $1, $6) f
     WHERE d.hour >= b.lo AND d.hour < b.rhi
    ) AS jsrc"
        .to_string()
}

macro_rules! bind_scope {
    ($q:expr, $p:expr) => {
        $q.bind(&$p.like)
            .bind(&$p.since.at)
            .bind(&$p.since.ago)
            .bind(&$p.until.at)
            .bind(&$p.until.ago)
            .bind(&$p.category)
    };
}

/// The scope's jobs under one job rollup key (the hour summed away): how
/// many, and their sums. [`job_figures`] reads them once; the report's
/// per-job sections are pure functions of them ([`status_counts`],
/// [`route_lines`], [`served_by_lines`], [`category_costs`]).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct JobFigure {
    pub category: String,
    /// The A/B variant, or `-`.
    pub variant: String,
    /// Route kind (`single`, `fallback`, `pipeline`, `consensus`).
    pub route: String,
    pub status: String,
    /// `answered`, `person` or `no_result`.
    pub outcome: String,
    /// The result's model; empty without a result.
    pub answered_by: String,
    pub jobs: i64,
    pub fell_back: i64,
    pub reviewed: i64,
    pub calls: i64,
    pub cost_usd: Decimal,
    pub answer_cost_usd: Decimal,
    #[sqlx(flatten)]
    pub overhead: Overhead,
    #[sqlx(flatten)]
    pub tokens: OneCallTokens,
    /// Jobs with a result, and the sum of their enqueue-to-result latency.
    pub latency_jobs: i64,
    pub latency_sum_ms: Decimal,
}

/// The scope's jobs by rollup key, in key order (one query over
/// [`jobs_src`]).
pub async fn job_figures(pool: &PgPool, scope: &Scope) -> Result<Vec<JobFigure>> {
    let p = Params::from(scope);
    let sql = format!(
        "SELECT category, variant, route, status, outcome, answered_by,
                sum(jobs)::int8 AS jobs, sum(fell_back)::int8 AS fell_back,
                sum(reviewed)::int8 AS reviewed, sum(calls)::int8 AS calls,
                sum(cost_usd) AS cost_usd, sum(answer_cost_usd) AS answer_cost_usd,
                sum(retries_cost_usd) AS retries_usd, sum(classifier_cost_usd) AS classifier_usd,
                sum(fallback_cost_usd) AS fallback_usd, sum(stages_cost_usd) AS stages_usd,
                sum(voters_cost_usd) AS voters_usd, sum(judge_cost_usd) AS judge_usd,
                sum(first_uncached_input_tokens)::int8 AS uncached_input_tokens,
                sum(first_cached_input_tokens)::int8 AS cached_input_tokens,
                sum(answer_output_tokens)::int8 AS output_tokens,
                sum(latency_jobs)::int8 AS latency_jobs, sum(latency_sum_ms) AS latency_sum_ms
         FROM {} GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6",
        jobs_src()
    );
    Ok(
        bind_scope!(sqlx::query_as::<_, JobFigure>(sqlx::AssertSqlSafe(sql)), p)
            .fetch_all(pool)
            .await?,
    )
}

/// Jobs by status, by status name.
pub fn status_counts(figures: &[JobFigure]) -> Vec<StatusCount> {
    let mut by: std::collections::BTreeMap<&str, i64> = Default::default();
    for f in figures {
        *by.entry(&f.status).or_default() += f.jobs;
    }
    by.into_iter()
        .map(|(status, jobs)| StatusCount {
            status: status.to_string(),
            jobs,
        })
        .collect()
}

/// Jobs (but dead ones) by category, variant and route kind, in that order.
pub fn route_lines(figures: &[JobFigure]) -> Vec<RouteLine> {
    #[derive(Default)]
    struct Acc {
        jobs: i64,
        succeeded: i64,
        failed: i64,
        reviewed: i64,
        fell_back: i64,
        cost: Decimal,
        latency_jobs: i64,
        latency_sum: Decimal,
    }
    let mut by: std::collections::BTreeMap<(&str, &str, &str), Acc> = Default::default();
    for f in figures {
        if f.status == JobStatus::Dead.as_str() {
            continue;
        }
        let a = by.entry((&f.category, &f.variant, &f.route)).or_default();
        a.jobs += f.jobs;
        if f.status == JobStatus::Succeeded.as_str() {
            a.succeeded += f.jobs;
        }
        if f.status == JobStatus::Failed.as_str() {
            a.failed += f.jobs;
        }
        a.reviewed += f.reviewed;
        a.fell_back += f.fell_back;
        a.cost += f.cost_usd;
        a.latency_jobs += f.latency_jobs;
        a.latency_sum += f.latency_sum_ms;
    }
    by.into_iter()
        .filter(|(_, a)| a.jobs > 0)
        .map(|((category, variant, kind), a)| RouteLine {
            category: category.to_string(),
            variant: variant.to_string(),
            kind: kind.to_string(),
            jobs: a.jobs,
            succeeded: a.succeeded,
            failed: a.failed,
            reviewed: a.reviewed,
            fell_back: a.fell_back,
            // As Postgres's round(x, 8): half away from zero, scale 8.
            cost_per_job: {
                let mut c = (a.cost / Decimal::from(a.jobs)).round_dp_with_strategy(
                    8,
                    rust_decimal::RoundingStrategy::MidpointAwayFromZero,
                );
                c.rescale(8);
                c
            },
            avg_latency_ms: (a.latency_jobs > 0).then(|| {
                use rust_decimal::prelude::ToPrimitive;
                a.latency_sum.to_f64().unwrap_or(f64::NAN) / a.latency_jobs as f64
            }),
        })
        .collect()
}

/// Results by category and model: by category, the most used model first.
pub fn served_by_lines(figures: &[JobFigure]) -> Vec<ServedBy> {
    let mut by: std::collections::BTreeMap<&str, std::collections::BTreeMap<&str, i64>> =
        Default::default();
    for f in figures.iter().filter(|f| f.outcome != "no_result") {
        *by.entry(&f.category)
            .or_default()
            .entry(&f.answered_by)
            .or_default() += f.jobs;
    }
    let mut out = Vec::new();
    for (category, models) in by {
        let total: i64 = models.values().sum();
        let mut lines: Vec<ServedBy> = models
            .into_iter()
            .filter(|(_, jobs)| *jobs > 0)
            .map(|(model, jobs)| ServedBy {
                category: category.to_string(),
                model: model.to_string(),
                jobs,
                share: jobs as f64 / total as f64,
            })
            .collect();
        lines.sort_by(|a, b| b.jobs.cmp(&a.jobs).then_with(|| a.model.cmp(&b.model)));
        out.extend(lines);
    }
    out
}

/// The categories' cost split (what `job_costs` says, summed), by
/// category; ratings are set apart ([`ratings_by_category`]).
pub fn category_costs(figures: &[JobFigure]) -> Vec<CategoryCosts> {
    let mut by: std::collections::BTreeMap<&str, CategoryCosts> = Default::default();
    for f in figures {
        let c = by.entry(&f.category).or_insert_with(|| CategoryCosts {
            category: f.category.clone(),
            ..Default::default()
        });
        c.jobs += f.jobs;
        c.fell_back += f.fell_back;
        c.reviewed += f.reviewed;
        match f.outcome.as_str() {
            "answered" => {
                c.answered += f.jobs;
                c.actual_cost_usd += f.cost_usd;
                c.answer_cost_usd += f.answer_cost_usd;
                c.overhead += &f.overhead;
                c.tokens += f.tokens;
            }
            "person" => {
                c.person_jobs += f.jobs;
                c.person_cost_usd += f.cost_usd;
            }
            _ => {
                c.no_result_jobs += f.jobs;
                c.no_result_cost_usd += f.cost_usd;
            }
        }
    }
    by.into_values().collect()
}

/// Ratings of the scope's jobs by category: (category, ratings, score sum).
/// Not rolled up (they come late): read from `feedback`.
pub async fn ratings_by_category(pool: &PgPool, scope: &Scope) -> Result<Vec<(String, i64, i64)>> {
    let p = Params::from(scope);
    Ok(bind_scope!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT j.category, count(*)::int8, COALESCE(sum(f.score), 0)::int8
             FROM feedback f JOIN jobs j ON j.id = f.job_id WHERE {} GROUP BY 1",
            cond("j.id", "j.created_at", "j.category")
        ))),
        p
    )
    .fetch_all(pool)
    .await?)
}

/// [`category_costs`] with the ratings set in.
pub fn with_ratings(
    mut costs: Vec<CategoryCosts>,
    ratings: &[(String, i64, i64)],
) -> Vec<CategoryCosts> {
    for (category, n, score_sum) in ratings {
        if let Some(c) = costs.iter_mut().find(|c| &c.category == category) {
            c.ratings = *n;
            c.score_sum = *score_sum;
        }
    }
    costs
}

/// Jobs in one status.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusCount {
    pub status: String,
    pub jobs: i64,
}

/// The scope's jobs by status, by status name.
pub async fn jobs_by_status(pool: &PgPool, scope: &Scope) -> Result<Vec<StatusCount>> {
    Ok(status_counts(&job_figures(pool, scope).await?))
}

/// Calls, tokens and USD of one category, one model, or all.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CostLine {
    /// Category name, or `provider/model`.
    pub key: String,
    pub calls: i64,
    pub ok_calls: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_input_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_usd: Decimal,
}

type CostTuple = (String, i64, i64, i64, i64, i64, i64, i64, Decimal);

fn cost_line(t: CostTuple) -> CostLine {
    CostLine {
        key: t.0,
        calls: t.1,
        ok_calls: t.2,
        input_tokens: t.3,
        cached_input_tokens: t.4,
        cache_write_input_tokens: t.5,
        output_tokens: t.6,
        reasoning_tokens: t.7,
        cost_usd: t.8,
    }
}

/// The aggregates of a [`CostLine`] after its key, over [`calls_src`].
const COST_COLUMNS: &str = "COALESCE(sum(calls), 0)::int8, COALESCE(sum(ok_calls), 0)::int8,
     COALESCE(sum(input_tokens), 0)::int8, COALESCE(sum(cached_input_tokens), 0)::int8,
     COALESCE(sum(cache_write_input_tokens), 0)::int8,
     COALESCE(sum(output_tokens), 0)::int8, COALESCE(sum(reasoning_tokens), 0)::int8,
     COALESCE(sum(cost_usd), 0)";

/// The scope's calls by category.
pub async fn costs_by_category(pool: &PgPool, scope: &Scope) -> Result<Vec<CostLine>> {
    let p = Params::from(scope);
    let rows: Vec<CostTuple> = bind_scope!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT category, {COST_COLUMNS} FROM {}
             GROUP BY category HAVING sum(calls) > 0 ORDER BY category",
            calls_src(false)
        ))),
        p
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(cost_line).collect())
}

/// The scope's calls by `provider/model`.
pub async fn costs_by_model(pool: &PgPool, scope: &Scope) -> Result<Vec<CostLine>> {
    let p = Params::from(scope);
    let rows: Vec<CostTuple> = bind_scope!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT provider || '/' || model, {COST_COLUMNS} FROM {}
             GROUP BY provider, model HAVING sum(calls) > 0 ORDER BY provider, model",
            calls_src(false)
        ))),
        p
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(cost_line).collect())
}

/// All the scope's calls, keyed `total`.
pub async fn cost_total(pool: &PgPool, scope: &Scope) -> Result<CostLine> {
    let p = Params::from(scope);
    let row: CostTuple = bind_scope!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT 'total', {COST_COLUMNS} FROM {}",
            calls_src(false)
        ))),
        p
    )
    .fetch_one(pool)
    .await?;
    Ok(cost_line(row))
}

/// The scope's dead letters (by their job's id and category). Dead letters
/// whose job could not be read count only when the scope is everything.
pub async fn dead_letters(pool: &PgPool, scope: &Scope) -> Result<i64> {
    let p = Params::from(scope);
    let on_dead = cond(
        "COALESCE(job_id, '')",
        "created_at",
        "(SELECT j.category FROM jobs j WHERE j.id = dead_letters.job_id)",
    );
    Ok(bind_scope!(
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*)::int8 FROM dead_letters WHERE ($7 OR job_id IS NOT NULL) AND {on_dead}"
        ))),
        p
    )
    .bind(scope.is_everything())
    .fetch_one(pool)
    .await?)
}

/// How one category (and A/B variant) was served.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteLine {
    pub category: String,
    /// The A/B variant, or `-` for the category's main route.
    pub variant: String,
    /// Route kind (`single`, `fallback`, `pipeline`, `consensus`).
    pub kind: String,
    pub jobs: i64,
    pub succeeded: i64,
    pub failed: i64,
    /// Jobs that went to human review (waiting or already resolved by a person).
    pub reviewed: i64,
    /// Fallback jobs that needed more than their first target.
    pub fell_back: i64,
    /// USD of all calls, per job.
    pub cost_per_job: Decimal,
    /// Mean enqueue-to-result latency of succeeded jobs.
    pub avg_latency_ms: Option<f64>,
}

/// The scope's jobs (but dead ones) by category, variant and route kind.
pub async fn routes(pool: &PgPool, scope: &Scope) -> Result<Vec<RouteLine>> {
    Ok(route_lines(&job_figures(pool, scope).await?))
}

/// Which model produced the results of a category.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServedBy {
    pub category: String,
    pub model: String,
    pub jobs: i64,
    /// Share of the category's results, 0-1.
    pub share: f64,
}

/// The scope's results by category and model, the most used model first.
pub async fn served_by(pool: &PgPool, scope: &Scope) -> Result<Vec<ServedBy>> {
    Ok(served_by_lines(&job_figures(pool, scope).await?))
}

/// What one model cost on one UTC day.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DailySpend {
    pub day: String,
    pub model: String,
    pub cost_usd: Decimal,
}

/// The scope's calls' USD per UTC day and model.
pub async fn daily_spend(pool: &PgPool, scope: &Scope) -> Result<Vec<DailySpend>> {
    let p = Params::from(scope);
    let rows: Vec<(String, String, Decimal)> = bind_scope!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT ((hour AT TIME ZONE 'UTC')::date)::text, model, sum(cost_usd)
             FROM {} GROUP BY 1, 2 HAVING sum(calls) > 0 ORDER BY 1, 2",
            calls_src(false)
        ))),
        p
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(day, model, cost_usd)| DailySpend {
            day,
            model,
            cost_usd,
        })
        .collect())
}

/// Provider latency percentiles of one model's answered calls.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencyLine {
    pub model: String,
    pub calls: i64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// The scope's answered calls' latency percentiles by model, read from the
/// rollups' histograms (approximate: the representative value of the
/// bucket holding each percentile, within about 9%).
pub async fn latency_by_model(pool: &PgPool, scope: &Scope) -> Result<Vec<LatencyLine>> {
    let p = Params::from(scope);
    let rows: Vec<(String, i64, f64, f64, f64)> = bind_scope!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT model, calls, latency_hist_quantile(h, 0.5), latency_hist_quantile(h, 0.95),
                    latency_hist_quantile(h, 0.99)
             FROM (SELECT model, sum(ok_calls)::int8 AS calls, latency_hist_sum(latency_hist) AS h
                   FROM {} GROUP BY model HAVING sum(ok_calls) > 0) t ORDER BY model",
            calls_src(true)
        ))),
        p
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(model, calls, p50_ms, p95_ms, p99_ms)| LatencyLine {
            model,
            calls,
            p50_ms,
            p95_ms,
            p99_ms,
        })
        .collect())
}

/// The scope's calls and errors (retryable or terminal) by model.
pub async fn errors_by_model(pool: &PgPool, scope: &Scope) -> Result<Vec<(String, i64, i64)>> {
    let p = Params::from(scope);
    Ok(bind_scope!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT model, sum(calls)::int8, sum(retryable_calls + terminal_calls)::int8
             FROM {} GROUP BY 1 HAVING sum(calls) > 0 ORDER BY 1",
            calls_src(false)
        ))),
        p
    )
    .fetch_all(pool)
    .await?)
}

/// Where an answered job's money went besides the answer call, by kind.
#[derive(Debug, Clone, Default, Serialize, PartialEq, sqlx::FromRow)]
pub struct Overhead {
    /// Calls that did not answer: errors, retried attempts, `unknown`.
    pub retries_usd: Decimal,
    /// The classifier's calls (jobs published to `auto`).
    pub classifier_usd: Decimal,
    /// Earlier fallback targets whose answers were rejected.
    pub fallback_usd: Decimal,
    /// Earlier pipeline stages.
    pub stages_usd: Decimal,
    /// Consensus voters other than the one whose answer won.
    pub voters_usd: Decimal,
    /// The consensus judge.
    pub judge_usd: Decimal,
}

impl Overhead {
    /// The kinds (`retries`, `classifier`, `fallback`, `stages`, `voters`,
    /// `judge`) with their USD, in that order: what tables and CSV list.
    pub fn parts(&self) -> [(&'static str, Decimal); 6] {
        [
            ("retries", self.retries_usd),
            ("classifier", self.classifier_usd),
            ("fallback", self.fallback_usd),
            ("stages", self.stages_usd),
            ("voters", self.voters_usd),
            ("judge", self.judge_usd),
        ]
    }

    pub fn total(&self) -> Decimal {
        self.parts().iter().map(|(_, v)| *v).sum()
    }

    /// Every part normalized (no trailing zeros).
    pub fn normalize(&self) -> Overhead {
        Overhead {
            retries_usd: self.retries_usd.normalize(),
            classifier_usd: self.classifier_usd.normalize(),
            fallback_usd: self.fallback_usd.normalize(),
            stages_usd: self.stages_usd.normalize(),
            voters_usd: self.voters_usd.normalize(),
            judge_usd: self.judge_usd.normalize(),
        }
    }
}

impl std::ops::AddAssign<&Overhead> for Overhead {
    fn add_assign(&mut self, o: &Overhead) {
        self.retries_usd += o.retries_usd;
        self.classifier_usd += o.classifier_usd;
        self.fallback_usd += o.fallback_usd;
        self.stages_usd += o.stages_usd;
        self.voters_usd += o.voters_usd;
        self.judge_usd += o.judge_usd;
    }
}

/// The tokens a one-call-per-job baseline is priced on, summed over jobs:
/// each job's first answered call's input (uncached, cache writes included;
/// cached reads) and its answer call's output.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq, sqlx::FromRow)]
pub struct OneCallTokens {
    pub uncached_input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
}

impl OneCallTokens {
    /// What these tokens cost at `prices` (cache writes priced as input).
    pub fn cost(&self, prices: &Prices) -> Decimal {
        let n = |v: i64| v.max(0) as u64;
        prices.cost(&crate::pricing::Usage {
            input_tokens: n(self.uncached_input_tokens) + n(self.cached_input_tokens),
            cached_input_tokens: n(self.cached_input_tokens),
            output_tokens: n(self.output_tokens),
            ..Default::default()
        })
    }
}

impl std::ops::AddAssign for OneCallTokens {
    fn add_assign(&mut self, o: OneCallTokens) {
        self.uncached_input_tokens += o.uncached_input_tokens;
        self.cached_input_tokens += o.cached_input_tokens;
        self.output_tokens += o.output_tokens;
    }
}

/// One category's jobs as the `job_costs` view sees them (migration 0008):
/// the jobs a model answered with their cost split and baseline tokens;
/// apart, jobs a person resolved and jobs without a result; what the
/// routes bought.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct CategoryCosts {
    pub category: String,
    /// Every job of the category in the scope.
    pub jobs: i64,
    /// Jobs whose result is a model's answer.
    pub answered: i64,
    /// All the answered jobs' calls.
    pub actual_cost_usd: Decimal,
    /// The answer calls alone.
    pub answer_cost_usd: Decimal,
    #[sqlx(flatten)]
    pub overhead: Overhead,
    #[sqlx(flatten)]
    pub tokens: OneCallTokens,
    pub person_jobs: i64,
    pub person_cost_usd: Decimal,
    pub no_result_jobs: i64,
    pub no_result_cost_usd: Decimal,
    pub fell_back: i64,
    pub reviewed: i64,
    pub ratings: i64,
    pub score_sum: i64,
}

/// The scope's jobs (by creation time) by category, from `job_costs`.
pub async fn job_costs_by_category(pool: &PgPool, scope: &Scope) -> Result<Vec<CategoryCosts>> {
    let costs = category_costs(&job_figures(pool, scope).await?);
    Ok(with_ratings(
        costs,
        &ratings_by_category(pool, scope).await?,
    ))
}

/// One category's calls answered from the response cache.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct CacheLine {
    pub category: String,
    pub calls: i64,
    pub cached_calls: i64,
    /// Cached calls over all calls, 0-1.
    pub cached_share: f64,
    /// What the cached answers would have cost (`calls.saved_usd`).
    pub saved_usd: Decimal,
}

/// Calls answered from the response cache and what they saved, per
/// category (categories with at least one).
pub async fn cache_lines(pool: &PgPool, scope: &Scope) -> Result<Vec<CacheLine>> {
    let p = Params::from(scope);
    let sql = format!(
        "SELECT category, sum(calls)::int8 AS calls,
                sum(cached_calls)::int8 AS cached_calls,
                sum(cached_calls)::float8 / sum(calls)::float8 AS cached_share,
                COALESCE(sum(saved_usd), 0) AS saved_usd
         FROM {} GROUP BY 1
         HAVING sum(cached_calls) > 0 ORDER BY 1",
        calls_src(false)
    );
    let rows: Vec<CacheLine> = bind_scope!(sqlx::query_as(sqlx::AssertSqlSafe(sql)), p)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|l| CacheLine {
            saved_usd: l.saved_usd.normalize(),
            ..l
        })
        .collect())
}

/// One category's (or model's) calls through the providers' batch APIs.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct BatchLine {
    /// Category name, or `provider/model`.
    pub key: String,
    pub calls: i64,
    pub batched_calls: i64,
    /// Batched calls over all calls, 0-1.
    pub batched_share: f64,
    /// What the batched calls cost.
    pub batched_cost_usd: Decimal,
    /// What the same calls would have cost real-time (their usage at the
    /// full unit prices: twice the batch prices).
    pub realtime_equivalent_usd: Decimal,
    /// `realtime_equivalent_usd - batched_cost_usd`.
    pub saved_usd: Decimal,
}

/// The scope's calls by category (`by_model`: by `provider/model`), with
/// what went through batches and what that saved.
pub async fn batch_lines(pool: &PgPool, scope: &Scope, by_model: bool) -> Result<Vec<BatchLine>> {
    let p = Params::from(scope);
    let key = if by_model {
        "provider || '/' || model"
    } else {
        "category"
    };
    // Batch prices are half the real-time ones (`pricing::BATCH_DISCOUNT`).
    let sql = format!(
        "SELECT {key} AS key, sum(calls)::int8 AS calls,
                COALESCE(sum(calls) FILTER (WHERE batched), 0)::int8 AS batched_calls,
                COALESCE(sum(calls) FILTER (WHERE batched), 0)::float8 / sum(calls)::float8
                    AS batched_share,
                COALESCE(sum(cost_usd) FILTER (WHERE batched), 0) AS batched_cost_usd,
                COALESCE(sum(cost_usd) FILTER (WHERE batched), 0) / $7 AS realtime_equivalent_usd,
                COALESCE(sum(cost_usd) FILTER (WHERE batched), 0) / $7
                    - COALESCE(sum(cost_usd) FILTER (WHERE batched), 0) AS saved_usd
         FROM {} GROUP BY 1 HAVING sum(calls) > 0 ORDER BY 1",
        calls_src(false)
    );
    let rows: Vec<BatchLine> = bind_scope!(sqlx::query_as(sqlx::AssertSqlSafe(sql)), p)
        .bind(crate::pricing::BATCH_DISCOUNT)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|l| BatchLine {
            batched_cost_usd: l.batched_cost_usd.normalize(),
            realtime_equivalent_usd: l.realtime_equivalent_usd.normalize(),
            saved_usd: l.saved_usd.normalize(),
            ..l
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(category: &str, status: &str, outcome: &str, model: &str, jobs: i64) -> JobFigure {
        JobFigure {
            category: category.into(),
            variant: "-".into(),
            route: "fallback".into(),
            status: status.into(),
            outcome: outcome.into(),
            answered_by: model.into(),
            jobs,
            fell_back: 1,
            reviewed: 0,
            calls: jobs * 2,
            cost_usd: Decimal::new(jobs, 3),
            answer_cost_usd: Decimal::new(jobs, 4),
            overhead: Overhead::default(),
            tokens: OneCallTokens::default(),
            latency_jobs: if outcome == "no_result" { 0 } else { jobs },
            latency_sum_ms: if outcome == "no_result" {
                Decimal::ZERO
            } else {
                Decimal::from(100 * jobs)
            },
        }
    }

    #[test]
    fn the_job_sections_add_the_figures_up_as_the_report_states_them() {
        let f = [
            fig("b", "succeeded", "answered", "m1", 3),
            fig("b", "succeeded", "answered", "m2", 3),
            fig("b", "failed", "no_result", "", 2),
            fig("b", "dead", "no_result", "", 5),
            fig("a", "succeeded", "person", "human", 1),
        ];
        let status: Vec<(String, i64)> = status_counts(&f)
            .into_iter()
            .map(|s| (s.status, s.jobs))
            .collect();
        assert_eq!(
            status,
            [
                ("dead".into(), 5),
                ("failed".into(), 2),
                ("succeeded".into(), 7)
            ]
        );
        // Dead jobs are left out of the routes; cost per job at scale 8.
        let r = route_lines(&f);
        assert_eq!((r[0].category.as_str(), r[0].jobs), ("a", 1));
        assert_eq!((r[1].jobs, r[1].succeeded, r[1].failed), (8, 6, 2));
        assert_eq!(r[1].cost_per_job.to_string(), "0.00100000");
        assert_eq!(r[1].avg_latency_ms, Some(100.0));
        assert_eq!(r[1].fell_back, 3);
        // Ties by model name; shares of the category's results.
        let s: Vec<(String, String, i64)> = served_by_lines(&f)
            .into_iter()
            .map(|s| (s.category, s.model, s.jobs))
            .collect();
        assert_eq!(
            s,
            [
                ("a".into(), "human".into(), 1),
                ("b".into(), "m1".into(), 3),
                ("b".into(), "m2".into(), 3)
            ]
        );
        let c = category_costs(&f);
        assert_eq!((c[1].jobs, c[1].answered, c[1].no_result_jobs), (13, 6, 7));
        assert_eq!(c[1].actual_cost_usd, Decimal::new(6, 3));
        assert_eq!(
            (c[0].person_jobs, c[0].person_cost_usd),
            (1, Decimal::new(1, 3))
        );
        let c = with_ratings(c, &[("b".into(), 2, 9)]);
        assert_eq!((c[1].ratings, c[1].score_sum, c[0].ratings), (2, 9, 0));
    }
}
