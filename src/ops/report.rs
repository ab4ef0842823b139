//! `switchyard report`: jobs by status; calls, tokens and USD by category and
//! by model; savings against a single baseline model; read from Postgres
//! (optionally for a time window, a category or a job-id prefix) and
//! printed as a table, JSON or CSV.

use std::fmt::Write as _;

use anyhow::Result;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use crate::pricing::Prices;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusCount {
    pub status: String,
    pub jobs: i64,
}

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

/// Which model produced the results of a category.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServedBy {
    pub category: String,
    pub model: String,
    pub jobs: i64,
    /// Share of the category's results, 0-1.
    pub share: f64,
}

/// What one model cost on one UTC day.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DailySpend {
    pub day: String,
    pub model: String,
    pub cost_usd: Decimal,
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

/// What the same answered calls would have cost on the baseline model, per
/// category (or in total).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SavingsLine {
    pub category: String,
    /// Jobs with calls in the report.
    pub jobs: i64,
    /// Every call's cost: answered, failed, retried, `unknown`.
    pub actual_cost_usd: Decimal,
    /// The answered calls' recorded tokens at the baseline model's prices.
    pub baseline_cost_usd: Decimal,
    /// Baseline minus actual (negative: the routes cost more).
    pub savings_usd: Decimal,
}

/// Which rows a report covers. Times are RFC 3339 / ISO dates
/// (`2026-11-01`, `2026-11-01T08:00:00Z`) or durations back from now
/// (`90m`, `24h`, `7d`, `2w`); jobs count by their creation, calls by theirs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub job_prefix: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub category: Option<String>,
}

/// A time bound as SQL parameters: an absolute time, or an interval back from now.
#[derive(Debug, Clone, Default, PartialEq)]
struct Bound {
    at: Option<String>,
    ago: Option<String>,
}

fn bound(flag: &str, v: &Option<String>) -> Result<Bound> {
    let Some(v) = v.as_deref().map(str::trim) else {
        return Ok(Bound::default());
    };
    let re = regex::Regex::new(r"^(\d{1,6})\s*(m|h|d|w)$").expect("valid regex");
    if let Some(c) = re.captures(v) {
        let unit = match &c[2] {
            "m" => "minutes",
            "h" => "hours",
            "d" => "days",
            _ => "weeks",
        };
        return Ok(Bound {
            at: None,
            ago: Some(format!("{} {unit}", &c[1])),
        });
    }
    if v.is_empty() || !v.starts_with(|c: char| c.is_ascii_digit()) {
        anyhow::bail!(
            "{flag} `{v}`: expected a date or time (2026-11-01, 2026-11-01T08:00:00Z) or a duration back from now (90m, 24h, 7d, 2w)"
        );
    }
    Ok(Bound {
        at: Some(v.to_string()),
        ago: None,
    })
}

/// The SQL parameters of a [`Filter`]: `$1` id pattern, `$2`/`$3` since,
/// `$4`/`$5` until, `$6` category.
struct Params {
    like: String,
    since: Bound,
    until: Bound,
    category: Option<String>,
}

/// The condition on a table's id, time and category columns, in `$1`-`$6`.
fn cond(id: &str, time: &str, category: &str) -> String {
    format!(
        "{id} LIKE $1 AND ($2::text IS NULL OR {time} >= $2::timestamptz)
         AND ($3::text IS NULL OR {time} >= now() - $3::interval)
         AND ($4::text IS NULL OR {time} < $4::timestamptz)
         AND ($5::text IS NULL OR {time} < now() - $5::interval)
         AND ($6::text IS NULL OR {category} = $6)"
    )
}

macro_rules! bind_filter {
    ($q:expr, $p:expr) => {
        $q.bind(&$p.like)
            .bind(&$p.since.at)
            .bind(&$p.since.ago)
            .bind(&$p.until.at)
            .bind(&$p.until.ago)
            .bind(&$p.category)
    };
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// The job-id prefix the report is limited to, if any.
    pub job_prefix: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub category: Option<String>,
    pub jobs_by_status: Vec<StatusCount>,
    pub by_category: Vec<CostLine>,
    pub by_model: Vec<CostLine>,
    pub total: CostLine,
    pub dead_letters: i64,
    pub routes: Vec<RouteLine>,
    pub served_by: Vec<ServedBy>,
    /// USD per UTC day and model (for the HTML report's chart).
    pub daily_spend: Vec<DailySpend>,
    /// Provider latency of answered calls per model.
    pub latency_by_model: Vec<LatencyLine>,
    /// The model savings are measured against (`report.baseline_model`).
    pub baseline_model: Option<String>,
    pub baseline_cost_usd: Option<Decimal>,
    pub actual_cost_usd: Option<Decimal>,
    pub savings_usd: Option<Decimal>,
    /// Jobs with calls, each counted once.
    pub savings_jobs: Option<i64>,
    pub savings_by_category: Vec<SavingsLine>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

fn like_prefix(prefix: &Option<String>) -> String {
    match prefix {
        Some(p) => format!(
            "{}%",
            p.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        ),
        None => "%".into(),
    }
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

const COST_COLUMNS: &str = "count(*)::int8, count(*) FILTER (WHERE outcome = 'ok')::int8,
     COALESCE(sum(input_tokens), 0)::int8, COALESCE(sum(cached_input_tokens), 0)::int8,
     COALESCE(sum(cache_write_input_tokens), 0)::int8,
     COALESCE(sum(output_tokens), 0)::int8, COALESCE(sum(reasoning_tokens), 0)::int8,
     COALESCE(sum(cost_usd), 0)";

/// Build the report for the rows `filter` selects; with `baseline` (a
/// model's name and prices), the savings against it.
pub async fn build(
    pool: &PgPool,
    filter: &Filter,
    baseline: Option<(&str, Prices)>,
) -> Result<Report> {
    let p = Params {
        like: like_prefix(&filter.job_prefix),
        since: bound("--since", &filter.since)?,
        until: bound("--until", &filter.until)?,
        category: filter.category.clone(),
    };
    for (flag, b) in [("--since", &p.since), ("--until", &p.until)] {
        if let Some(at) = &b.at {
            sqlx::query("SELECT $1::timestamptz")
                .bind(at)
                .execute(pool)
                .await
                .map_err(|e| anyhow::anyhow!("{flag} `{at}` is not a date or time: {e}"))?;
        }
    }
    let on_jobs = cond("id", "created_at", "category");
    let on_calls = cond("job_id", "created_at", "category");
    let jobs_by_status: Vec<(String, i64)> = bind_filter!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT status, count(*)::int8 FROM jobs WHERE {on_jobs} GROUP BY status ORDER BY status"
        ))),
        p
    )
    .fetch_all(pool)
    .await?;
    let by_category: Vec<CostTuple> = bind_filter!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT category, {COST_COLUMNS} FROM calls WHERE {on_calls}
             GROUP BY category ORDER BY category"
        ))),
        p
    )
    .fetch_all(pool)
    .await?;
    let by_model: Vec<CostTuple> = bind_filter!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT provider || '/' || model, {COST_COLUMNS} FROM calls WHERE {on_calls}
             GROUP BY provider, model ORDER BY provider, model"
        ))),
        p
    )
    .fetch_all(pool)
    .await?;
    let total: CostTuple = bind_filter!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT 'total', {COST_COLUMNS} FROM calls WHERE {on_calls}"
        ))),
        p
    )
    .fetch_one(pool)
    .await?;
    // Dead letters whose job could not be read count only in an unfiltered report.
    let unfiltered = *filter == Filter::default();
    let on_dead = cond(
        "COALESCE(job_id, '')",
        "created_at",
        "(SELECT j.category FROM jobs j WHERE j.id = dead_letters.job_id)",
    );
    let dead_letters: i64 = bind_filter!(
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*)::int8 FROM dead_letters WHERE ($7 OR job_id IS NOT NULL) AND {on_dead}"
        ))),
        p
    )
    .bind(unfiltered)
    .fetch_one(pool)
    .await?;
    type RouteTuple = (
        String,
        String,
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        Decimal,
        Option<f64>,
    );
    let routes_sql = format!(
        "SELECT j.category, COALESCE(j.variant, '-'), COALESCE(j.route_decision->>'kind', 'single'),
                count(*)::int8,
                count(*) FILTER (WHERE j.status = 'succeeded')::int8,
                count(*) FILTER (WHERE j.status IN ('failed', 'dead'))::int8,
                count(*) FILTER (WHERE j.status = 'needs_review' OR j.route_decision ? 'review')::int8,
                count(*) FILTER (WHERE j.route_decision->>'kind' = 'fallback'
                                   AND EXISTS (SELECT 1 FROM steps s WHERE s.job_id = j.id AND s.step > 0))::int8,
                COALESCE(round(sum(COALESCE(c.cost, 0)) / count(*), 8), 0),
                avg(r.latency_ms)::float8
         FROM jobs j
         LEFT JOIN results r ON r.job_id = j.id
         LEFT JOIN LATERAL (SELECT sum(cost_usd) AS cost FROM calls WHERE calls.job_id = j.id) c ON true
         WHERE {} AND j.status <> 'dead'
         GROUP BY 1, 2, 3 ORDER BY 1, 2",
        cond("j.id", "j.created_at", "j.category")
    );
    let routes: Vec<RouteTuple> = bind_filter!(sqlx::query_as(sqlx::AssertSqlSafe(routes_sql)), p)
        .fetch_all(pool)
        .await?;
    let served: Vec<(String, String, i64, f64)> = bind_filter!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT j.category, r.model, count(*)::int8,
                    (count(*)::float8 / sum(count(*)) OVER (PARTITION BY j.category))::float8
             FROM results r JOIN jobs j ON j.id = r.job_id
             WHERE {} GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2",
            cond("j.id", "r.created_at", "j.category")
        ))),
        p
    )
    .fetch_all(pool)
    .await?;
    let daily: Vec<(String, String, Decimal)> = bind_filter!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT ((created_at AT TIME ZONE 'UTC')::date)::text, model, sum(cost_usd)
             FROM calls WHERE {on_calls} GROUP BY 1, 2 ORDER BY 1, 2"
        ))),
        p
    )
    .fetch_all(pool)
    .await?;
    let latency: Vec<(String, i64, f64, f64, f64)> = bind_filter!(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT model, count(*)::int8,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms)
             FROM calls WHERE outcome = 'ok' AND {on_calls} GROUP BY model ORDER BY model"
        ))),
        p
    )
    .fetch_all(pool)
    .await?;
    let mut savings_by_category = Vec::new();
    let mut savings_total = None;
    if let Some((_, b)) = &baseline {
        // Every answered call's recorded tokens at the baseline's prices
        // (the formula of `Prices::cost`), against every call's real cost.
        let rows: Vec<(String, i64, Decimal, Decimal)> = bind_filter!(
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT category, count(DISTINCT job_id)::int8, COALESCE(sum(cost_usd), 0),
                        COALESCE(sum(CASE WHEN outcome = 'ok' THEN
                            ((input_tokens - cached_input_tokens - cache_write_input_tokens) * $7
                             + cached_input_tokens * $8 + cache_write_input_tokens * $9
                             + output_tokens * $10) / 1000000 ELSE 0 END), 0)
                 FROM calls WHERE {on_calls} GROUP BY category ORDER BY category"
            ))),
            p
        )
        .bind(b.input_per_mtok)
        .bind(b.cached_input_per_mtok)
        .bind(b.cache_write_per_mtok)
        .bind(b.output_per_mtok)
        .fetch_all(pool)
        .await?;
        let line = |category: String, jobs: i64, actual: Decimal, base: Decimal| SavingsLine {
            category,
            jobs,
            actual_cost_usd: actual,
            baseline_cost_usd: base,
            savings_usd: base - actual,
        };
        let (mut actual, mut base) = (Decimal::ZERO, Decimal::ZERO);
        for (c, j, a, bl) in rows {
            let (a, bl) = (a.normalize(), bl.normalize());
            actual += a;
            base += bl;
            savings_by_category.push(line(c, j, a, bl));
        }
        // A classified job has calls in `auto` and in its category: count it once.
        let jobs: i64 = bind_filter!(
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(DISTINCT job_id)::int8 FROM calls WHERE {on_calls}"
            ))),
            p
        )
        .fetch_one(pool)
        .await?;
        savings_total = Some(line(
            "total".into(),
            jobs,
            actual.normalize(),
            base.normalize(),
        ));
    }
    Ok(Report {
        routes: routes
            .into_iter()
            .map(|t| RouteLine {
                category: t.0,
                variant: t.1,
                kind: t.2,
                jobs: t.3,
                succeeded: t.4,
                failed: t.5,
                reviewed: t.6,
                fell_back: t.7,
                cost_per_job: t.8,
                avg_latency_ms: t.9,
            })
            .collect(),
        served_by: served
            .into_iter()
            .map(|(category, model, jobs, share)| ServedBy {
                category,
                model,
                jobs,
                share,
            })
            .collect(),
        job_prefix: filter.job_prefix.clone(),
        since: filter.since.clone(),
        until: filter.until.clone(),
        category: filter.category.clone(),
        baseline_model: baseline.map(|(m, _)| m.to_string()),
        baseline_cost_usd: savings_total.as_ref().map(|t| t.baseline_cost_usd),
        actual_cost_usd: savings_total.as_ref().map(|t| t.actual_cost_usd),
        savings_usd: savings_total.as_ref().map(|t| t.savings_usd),
        savings_jobs: savings_total.as_ref().map(|t| t.jobs),
        savings_by_category,
        daily_spend: daily
            .into_iter()
            .map(|(day, model, cost_usd)| DailySpend {
                day,
                model,
                cost_usd: cost_usd.normalize(),
            })
            .collect(),
        latency_by_model: latency
            .into_iter()
            .map(|(model, calls, p50_ms, p95_ms, p99_ms)| LatencyLine {
                model,
                calls,
                p50_ms,
                p95_ms,
                p99_ms,
            })
            .collect(),
        jobs_by_status: jobs_by_status
            .into_iter()
            .map(|(status, jobs)| StatusCount { status, jobs })
            .collect(),
        by_category: by_category.into_iter().map(cost_line).collect(),
        by_model: by_model.into_iter().map(cost_line).collect(),
        total: cost_line(total),
        dead_letters,
    })
}

impl Report {
    pub fn jobs_with_status(&self, status: &str) -> i64 {
        self.jobs_by_status
            .iter()
            .find(|s| s.status == status)
            .map_or(0, |s| s.jobs)
    }

    pub fn total_jobs(&self) -> i64 {
        self.jobs_by_status.iter().map(|s| s.jobs).sum()
    }

    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => serde_json::to_string_pretty(self).unwrap_or_default(),
            Format::Csv => self.to_csv(),
            Format::Table => self.to_table(),
        }
    }

    fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Jobs by status");
        for s in &self.jobs_by_status {
            let _ = writeln!(out, "  {:<14} {:>8}", s.status, s.jobs);
        }
        let _ = writeln!(out, "  {:<14} {:>8}", "total", self.total_jobs());
        let _ = writeln!(out, "  {:<14} {:>8}", "dead letters", self.dead_letters);
        self.routes_table(&mut out);
        self.savings_table(&mut out);
        for (title, lines) in [
            ("Cost by category", &self.by_category),
            ("Cost by model", &self.by_model),
        ] {
            let _ = writeln!(out, "\n{title}");
            let _ = writeln!(
                out,
                "  {:<30} {:>6} {:>6} {:>10} {:>9} {:>9} {:>10} {:>12}",
                "", "calls", "ok", "input tok", "cached", "cache wr", "output tok", "USD"
            );
            for l in lines.iter().chain(std::iter::once(&self.total)) {
                let _ = writeln!(
                    out,
                    "  {:<30} {:>6} {:>6} {:>10} {:>9} {:>9} {:>10} {:>12}",
                    l.key,
                    l.calls,
                    l.ok_calls,
                    l.input_tokens,
                    l.cached_input_tokens,
                    l.cache_write_input_tokens,
                    l.output_tokens,
                    l.cost_usd.round_dp(6).to_string()
                );
            }
        }
        out
    }

    fn savings_table(&self, out: &mut String) {
        let Some(model) = &self.baseline_model else {
            return;
        };
        let _ = writeln!(
            out,
            "\nSavings against {model} alone (its prices on every answered call's tokens)"
        );
        let _ = writeln!(
            out,
            "  {:<14} {:>7} {:>12} {:>12} {:>12} {:>8}",
            "category", "jobs", "actual USD", "baseline USD", "saved USD", "saved %"
        );
        let total = SavingsLine {
            category: "total".into(),
            jobs: self.savings_jobs.unwrap_or_default(),
            actual_cost_usd: self.actual_cost_usd.unwrap_or_default(),
            baseline_cost_usd: self.baseline_cost_usd.unwrap_or_default(),
            savings_usd: self.savings_usd.unwrap_or_default(),
        };
        for l in self
            .savings_by_category
            .iter()
            .chain(std::iter::once(&total))
        {
            let pct = if l.baseline_cost_usd.is_zero() {
                "-".to_string()
            } else {
                format!(
                    "{:.1}",
                    (l.savings_usd / l.baseline_cost_usd * Decimal::ONE_HUNDRED).round_dp(1)
                )
            };
            let _ = writeln!(
                out,
                "  {:<14} {:>7} {:>12} {:>12} {:>12} {:>8}",
                l.category,
                l.jobs,
                l.actual_cost_usd.round_dp(6).to_string(),
                l.baseline_cost_usd.round_dp(6).to_string(),
                l.savings_usd.round_dp(6).to_string(),
                pct
            );
        }
    }

    fn routes_table(&self, out: &mut String) {
        if self.routes.is_empty() {
            return;
        }
        let pct = |n: i64, of: i64| {
            if of == 0 {
                0.0
            } else {
                100.0 * n as f64 / of as f64
            }
        };
        let _ = writeln!(out, "\nRoutes by category (A/B variants side by side)");
        let _ = writeln!(
            out,
            "  {:<12} {:<10} {:<10} {:>6} {:>8} {:>9} {:>8} {:>12} {:>11}",
            "category",
            "variant",
            "kind",
            "jobs",
            "ok %",
            "fallbk %",
            "review %",
            "USD/job",
            "latency ms"
        );
        for r in &self.routes {
            let _ = writeln!(
                out,
                "  {:<12} {:<10} {:<10} {:>6} {:>8.1} {:>9.1} {:>8.1} {:>12} {:>11}",
                r.category,
                r.variant,
                r.kind,
                r.jobs,
                pct(r.succeeded, r.jobs),
                pct(r.fell_back, r.jobs),
                pct(r.reviewed, r.jobs),
                r.cost_per_job.round_dp(6).to_string(),
                r.avg_latency_ms.map_or("-".into(), |l| format!("{l:.0}"))
            );
        }
        let _ = writeln!(out, "\nModels serving each category (share of results)");
        for s in &self.served_by {
            let _ = writeln!(
                out,
                "  {:<12} {:<30} {:>6} {:>6.1}%",
                s.category,
                s.model,
                s.jobs,
                100.0 * s.share
            );
        }
    }

    fn to_csv(&self) -> String {
        let mut out = String::from(
            "section,key,jobs,calls,ok_calls,input_tokens,cached_input_tokens,cache_write_input_tokens,output_tokens,reasoning_tokens,cost_usd,baseline_cost_usd,savings_usd\n",
        );
        for s in &self.jobs_by_status {
            let _ = writeln!(out, "status,{},{},,,,,,,,,,", csv_field(&s.status), s.jobs);
        }
        for l in &self.savings_by_category {
            let _ = writeln!(
                out,
                "savings,{},{},,,,,,,,{},{},{}",
                csv_field(&l.category),
                l.jobs,
                l.actual_cost_usd,
                l.baseline_cost_usd,
                l.savings_usd
            );
        }
        for (section, lines) in [("category", &self.by_category), ("model", &self.by_model)] {
            for l in lines.iter() {
                let _ = writeln!(
                    out,
                    "{section},{},,{},{},{},{},{},{},{},{},,",
                    csv_field(&l.key),
                    l.calls,
                    l.ok_calls,
                    l.input_tokens,
                    l.cached_input_tokens,
                    l.cache_write_input_tokens,
                    l.output_tokens,
                    l.reasoning_tokens,
                    l.cost_usd
                );
            }
        }
        let t = &self.total;
        let _ = writeln!(
            out,
            "total,total,{},{},{},{},{},{},{},{},{},{},{}",
            self.total_jobs(),
            t.calls,
            t.ok_calls,
            t.input_tokens,
            t.cached_input_tokens,
            t.cache_write_input_tokens,
            t.output_tokens,
            t.reasoning_tokens,
            t.cost_usd,
            self.baseline_cost_usd
                .map_or(String::new(), |d| d.to_string()),
            self.savings_usd.map_or(String::new(), |d| d.to_string())
        );
        out
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
