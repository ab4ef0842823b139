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
use crate::store::report::{self as rows, Scope, TimeBound, TimeUnit};
pub use crate::store::report::{
    CostLine, DailySpend, LatencyLine, RouteLine, ServedBy, StatusCount,
};

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

/// The time bound flag `flag` gives: a duration back from now, or a date or
/// time (checked by Postgres in [`build`]).
fn bound(flag: &str, v: &Option<String>) -> Result<TimeBound> {
    let Some(v) = v.as_deref().map(str::trim) else {
        return Ok(TimeBound::Open);
    };
    let re = regex::Regex::new(r"^(\d{1,6})\s*(m|h|d|w)$").expect("valid regex");
    if let Some(c) = re.captures(v) {
        let unit = match &c[2] {
            "m" => TimeUnit::Minutes,
            "h" => TimeUnit::Hours,
            "d" => TimeUnit::Days,
            _ => TimeUnit::Weeks,
        };
        let n: u32 = c[1].parse().expect("at most six digits");
        return Ok(TimeBound::Ago(n, unit));
    }
    if v.is_empty() || !v.starts_with(|c: char| c.is_ascii_digit()) {
        anyhow::bail!(
            "{flag} `{v}`: expected a date or time (2026-11-01, 2026-11-01T08:00:00Z) or a duration back from now (90m, 24h, 7d, 2w)"
        );
    }
    Ok(TimeBound::At(v.to_string()))
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

/// Build the report for the rows `filter` selects; with `baseline` (a
/// model's name and prices), the savings against it.
pub async fn build(
    pool: &PgPool,
    filter: &Filter,
    baseline: Option<(&str, Prices)>,
) -> Result<Report> {
    let scope = Scope {
        job_prefix: filter.job_prefix.clone(),
        since: bound("--since", &filter.since)?,
        until: bound("--until", &filter.until)?,
        category: filter.category.clone(),
    };
    for (flag, b) in [("--since", &scope.since), ("--until", &scope.until)] {
        if let TimeBound::At(at) = b {
            rows::check_time(pool, at)
                .await
                .map_err(|e| anyhow::anyhow!("{flag} `{at}` is not a date or time: {e}"))?;
        }
    }
    let jobs_by_status = rows::jobs_by_status(pool, &scope).await?;
    let by_category = rows::costs_by_category(pool, &scope).await?;
    let by_model = rows::costs_by_model(pool, &scope).await?;
    let total = rows::cost_total(pool, &scope).await?;
    let dead_letters = rows::dead_letters(pool, &scope).await?;
    let routes = rows::routes(pool, &scope).await?;
    let served_by = rows::served_by(pool, &scope).await?;
    let daily = rows::daily_spend(pool, &scope).await?;
    let latency_by_model = rows::latency_by_model(pool, &scope).await?;
    let mut savings_by_category = Vec::new();
    let mut savings_total = None;
    if let Some((_, b)) = &baseline {
        // Every answered call's recorded tokens at the baseline's prices,
        // against every call's real cost.
        let repriced = rows::repriced_by_category(pool, &scope, b).await?;
        let line = |category: String, jobs: i64, actual: Decimal, base: Decimal| SavingsLine {
            category,
            jobs,
            actual_cost_usd: actual,
            baseline_cost_usd: base,
            savings_usd: base - actual,
        };
        let (mut actual, mut base) = (Decimal::ZERO, Decimal::ZERO);
        for r in repriced {
            let (a, bl) = (r.actual_cost_usd.normalize(), r.repriced_usd.normalize());
            actual += a;
            base += bl;
            savings_by_category.push(line(r.category, r.jobs, a, bl));
        }
        // A classified job has calls in `auto` and in its category: count it once.
        let jobs = rows::jobs_with_calls(pool, &scope).await?;
        savings_total = Some(line(
            "total".into(),
            jobs,
            actual.normalize(),
            base.normalize(),
        ));
    }
    Ok(Report {
        routes,
        served_by,
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
            .map(|d| DailySpend {
                cost_usd: d.cost_usd.normalize(),
                ..d
            })
            .collect(),
        latency_by_model,
        jobs_by_status,
        by_category,
        by_model,
        total,
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
