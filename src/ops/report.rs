//! `switchyard report`: jobs by status; calls, tokens and USD by category and
//! by model; savings against a single baseline model; read from Postgres
//! (optionally for a time window, a category or a job-id prefix) and
//! printed as a table, JSON or CSV.

use std::fmt::Write as _;

use anyhow::Result;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use crate::config::Config;
use crate::pricing::Prices;
use crate::store::report::{self as rows, CategoryCosts, Scope, TimeBound, TimeUnit};
pub use crate::store::report::{
    BatchLine, CostLine, DailySpend, LatencyLine, OneCallTokens, Overhead, RouteLine, ServedBy,
    StatusCount,
};

/// A category's (or all) jobs measured against one call per job on the
/// baseline model: the jobs a model answered, what all their calls cost and
/// where that went (the answer call, and overhead by kind), what one baseline
/// call per job would have cost (the first answered call's input, the
/// answer's output, at the baseline's prices); apart, what jobs resolved by
/// a person and jobs without a result cost; and what the routes bought.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SavingsLine {
    pub category: String,
    /// Jobs whose result is a model's answer: the jobs the savings cover.
    pub jobs: i64,
    /// Every call of those jobs: answers, retries, fallbacks, stages, voters,
    /// judges, classifiers.
    pub actual_cost_usd: Decimal,
    /// One call per job on the baseline model (`None`: no baseline).
    pub baseline_cost_usd: Option<Decimal>,
    /// Baseline minus actual (negative: the routes cost more).
    pub savings_usd: Option<Decimal>,
    /// Actual over baseline: 1.3 means the routes cost 1.3 times one
    /// baseline call per job.
    pub cost_ratio: Option<Decimal>,
    /// The calls whose answers became the results.
    pub answer_cost_usd: Decimal,
    /// Everything else: `actual_cost_usd - answer_cost_usd`.
    pub overhead_cost_usd: Decimal,
    pub overhead: Overhead,
    /// Succeeded jobs a person resolved in review (no model answer to price).
    pub person_jobs: i64,
    pub person_cost_usd: Decimal,
    /// Jobs without a result (failed, dead, waiting for review, running):
    /// spent, shown apart, never in the savings.
    pub no_result_jobs: i64,
    pub no_result_cost_usd: Decimal,
    /// All the category's jobs in the report.
    pub all_jobs: i64,
    /// Fallback jobs that needed more than their first target, over all jobs.
    pub fallback_rate: f64,
    /// Jobs that went to a person, over all jobs.
    pub review_rate: f64,
    /// Ratings of the category's results (`switchyard feedback`), and their mean.
    pub ratings: i64,
    pub avg_score: Option<f64>,
}

/// What a category's answered jobs would have cost served by one model
/// alone: one call per job at its prices, on the same tokens as the baseline.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WhatIf {
    /// A category, or `total`.
    pub category: String,
    pub model: String,
    pub jobs: i64,
    /// What those jobs cost as routed.
    pub actual_cost_usd: Decimal,
    /// What they would have cost on `model` alone.
    pub cost_usd: Decimal,
    /// `cost_usd - actual_cost_usd`: what routing saved against this model.
    pub savings_usd: Decimal,
}

fn ratio(n: i64, of: i64) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 / of as f64
    }
}

/// The savings line of one category's costs (or their sum).
fn savings_line(c: &CategoryCosts, baseline: Option<&Prices>) -> SavingsLine {
    let actual = c.actual_cost_usd.normalize();
    let base = baseline.map(|p| c.tokens.cost(p).normalize());
    SavingsLine {
        category: c.category.clone(),
        jobs: c.answered,
        actual_cost_usd: actual,
        baseline_cost_usd: base,
        savings_usd: base.map(|b| (b - actual).normalize()),
        cost_ratio: base
            .filter(|b| !b.is_zero())
            .map(|b| (actual / b).round_dp(3).normalize()),
        answer_cost_usd: c.answer_cost_usd.normalize(),
        overhead_cost_usd: (actual - c.answer_cost_usd).normalize(),
        overhead: c.overhead.normalize(),
        person_jobs: c.person_jobs,
        person_cost_usd: c.person_cost_usd.normalize(),
        no_result_jobs: c.no_result_jobs,
        no_result_cost_usd: c.no_result_cost_usd.normalize(),
        all_jobs: c.jobs,
        fallback_rate: ratio(c.fell_back, c.jobs),
        review_rate: ratio(c.reviewed, c.jobs),
        ratings: c.ratings,
        avg_score: (c.ratings > 0).then(|| c.score_sum as f64 / c.ratings as f64),
    }
}

/// The savings lines of categories' costs, and of their sum (`total`).
pub fn savings_lines(
    costs: &[CategoryCosts],
    baseline: Option<&Prices>,
) -> (Vec<SavingsLine>, SavingsLine) {
    (
        costs.iter().map(|c| savings_line(c, baseline)).collect(),
        savings_line(&sum_costs(costs), baseline),
    )
}

/// The sum of categories' costs, as category `total`.
fn sum_costs(lines: &[CategoryCosts]) -> CategoryCosts {
    let mut t = CategoryCosts {
        category: "total".into(),
        ..Default::default()
    };
    for c in lines {
        t.jobs += c.jobs;
        t.answered += c.answered;
        t.actual_cost_usd += c.actual_cost_usd;
        t.answer_cost_usd += c.answer_cost_usd;
        t.overhead += &c.overhead;
        t.tokens += c.tokens;
        t.person_jobs += c.person_jobs;
        t.person_cost_usd += c.person_cost_usd;
        t.no_result_jobs += c.no_result_jobs;
        t.no_result_cost_usd += c.no_result_cost_usd;
        t.fell_back += c.fell_back;
        t.reviewed += c.reviewed;
        t.ratings += c.ratings;
        t.score_sum += c.score_sum;
    }
    t
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
    /// One call per answered job on the baseline model ([`SavingsLine`]).
    pub baseline_cost_usd: Option<Decimal>,
    /// Every call of the jobs a model answered.
    pub actual_cost_usd: Option<Decimal>,
    pub savings_usd: Option<Decimal>,
    /// Jobs a model answered: the jobs the savings cover.
    pub savings_jobs: Option<i64>,
    /// Per category (jobs by their creation time, in their final category).
    pub savings_by_category: Vec<SavingsLine>,
    /// The categories' sum, with the spend kept apart (person-resolved
    /// jobs, jobs without a result).
    pub savings_total: SavingsLine,
    /// Every configured model alone, per category and in total, the
    /// cheapest first.
    pub what_if: Vec<WhatIf>,
    /// Calls through the providers' batch APIs (half price), per category
    /// and per model, and what that saved against real-time prices.
    pub batch_by_category: Vec<BatchLine>,
    pub batch_by_model: Vec<BatchLine>,
    /// Calls answered from the response cache and what they saved.
    pub cache_by_category: Vec<rows::CacheLine>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

/// Build the report for the rows `filter` selects, with savings against
/// `baseline` (a model of `cfg`; default `report.baseline_model`) and what
/// every model of `cfg` alone would have cost.
pub async fn build(
    pool: &PgPool,
    filter: &Filter,
    cfg: &Config,
    baseline: Option<&str>,
) -> Result<Report> {
    let baseline = cfg.baseline(baseline)?;
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
    // The sections' queries are independent: run them side by side (the
    // pool's connections), each aggregating its share of the raw tails.
    // The per-job sections come from one read of the job figures.
    let (
        figures,
        by_category,
        by_model,
        total,
        dead_letters,
        daily,
        latency_by_model,
        batch_by_category,
        batch_by_model,
        cache_by_category,
        ratings,
    ) = tokio::try_join!(
        rows::job_figures(pool, &scope),
        rows::costs_by_category(pool, &scope),
        rows::costs_by_model(pool, &scope),
        rows::cost_total(pool, &scope),
        rows::dead_letters(pool, &scope),
        rows::daily_spend(pool, &scope),
        rows::latency_by_model(pool, &scope),
        rows::batch_lines(pool, &scope, false),
        rows::batch_lines(pool, &scope, true),
        rows::cache_lines(pool, &scope),
        rows::ratings_by_category(pool, &scope),
    )?;
    let jobs_by_status = rows::status_counts(&figures);
    let routes = rows::route_lines(&figures);
    let served_by = rows::served_by_lines(&figures);
    let costs = rows::with_ratings(rows::category_costs(&figures), &ratings);
    let sum = sum_costs(&costs);
    let base_prices = baseline.as_ref().map(|(_, p)| p);
    let (savings_by_category, savings_total) = savings_lines(&costs, base_prices);
    let mut what_if = Vec::new();
    for c in costs.iter().chain(std::iter::once(&sum)) {
        let mut lines: Vec<WhatIf> = cfg
            .models
            .iter()
            .map(|(model, m)| {
                let cost = c.tokens.cost(&m.prices()).normalize();
                WhatIf {
                    category: c.category.clone(),
                    model: model.clone(),
                    jobs: c.answered,
                    actual_cost_usd: c.actual_cost_usd.normalize(),
                    cost_usd: cost,
                    savings_usd: (cost - c.actual_cost_usd).normalize(),
                }
            })
            .collect();
        lines.sort_by(|a, b| a.cost_usd.cmp(&b.cost_usd).then(a.model.cmp(&b.model)));
        what_if.extend(lines);
    }
    let with_baseline = |v: Decimal| baseline.as_ref().map(|_| v);
    Ok(Report {
        routes,
        served_by,
        job_prefix: filter.job_prefix.clone(),
        since: filter.since.clone(),
        until: filter.until.clone(),
        category: filter.category.clone(),
        baseline_model: baseline.as_ref().map(|(m, _)| m.to_string()),
        baseline_cost_usd: savings_total.baseline_cost_usd,
        actual_cost_usd: with_baseline(savings_total.actual_cost_usd),
        savings_usd: savings_total.savings_usd,
        savings_jobs: baseline.as_ref().map(|_| savings_total.jobs),
        savings_by_category,
        savings_total,
        what_if,
        daily_spend: daily
            .into_iter()
            .map(|d| DailySpend {
                cost_usd: d.cost_usd.normalize(),
                ..d
            })
            .collect(),
        latency_by_model,
        batch_by_category,
        batch_by_model,
        cache_by_category,
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
        let lines = || {
            self.savings_by_category
                .iter()
                .chain(std::iter::once(&self.savings_total))
        };
        let usd = |d: Decimal| d.round_dp(6).to_string();
        let pct = |n: Decimal, of: Decimal| {
            if of.is_zero() {
                "-".to_string()
            } else {
                format!("{:.1}", (n / of * Decimal::ONE_HUNDRED).round_dp(1))
            }
        };
        if let Some(model) = &self.baseline_model {
            let _ = writeln!(
                out,
                "\nSavings against {model}: one {model} call per answered job (its first call's input, its answer's output)"
            );
            let _ = writeln!(
                out,
                "  {:<14} {:>7} {:>12} {:>12} {:>12} {:>8} {:>8}",
                "category", "jobs", "actual USD", "baseline USD", "saved USD", "saved %", "cost x"
            );
            for l in lines() {
                let base = l.baseline_cost_usd.unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {:<14} {:>7} {:>12} {:>12} {:>12} {:>8} {:>8}",
                    l.category,
                    l.jobs,
                    usd(l.actual_cost_usd),
                    usd(base),
                    usd(l.savings_usd.unwrap_or_default()),
                    pct(l.savings_usd.unwrap_or_default(), base),
                    l.cost_ratio.map_or("-".into(), |r| format!("{:.2}", r))
                );
            }
        }
        let _ = writeln!(
            out,
            "\nWhere the answered jobs' money went: the answer calls, and the overhead by kind (USD)"
        );
        let _ = write!(out, "  {:<14} {:>11}", "category", "answer");
        for (name, _) in Overhead::default().parts() {
            let _ = write!(out, " {name:>11}");
        }
        let _ = writeln!(out, " {:>11} {:>9}", "overhead", "overhd %");
        for l in lines() {
            let _ = write!(out, "  {:<14} {:>11}", l.category, usd(l.answer_cost_usd));
            for (_, v) in l.overhead.parts() {
                let _ = write!(out, " {:>11}", usd(v));
            }
            let _ = writeln!(
                out,
                " {:>11} {:>9}",
                usd(l.overhead_cost_usd),
                pct(l.overhead_cost_usd, l.actual_cost_usd)
            );
        }
        let _ = writeln!(
            out,
            "\nWhat the routes bought, and what was spent apart from the savings"
        );
        let _ = writeln!(
            out,
            "  {:<14} {:>7} {:>9} {:>9} {:>8} {:>6} {:>12} {:>12} {:>12} {:>12}",
            "category",
            "jobs",
            "fallbk %",
            "review %",
            "ratings",
            "score",
            "by a person",
            "person USD",
            "no result",
            "no rslt USD"
        );
        for l in lines() {
            let _ = writeln!(
                out,
                "  {:<14} {:>7} {:>9.1} {:>9.1} {:>8} {:>6} {:>12} {:>12} {:>12} {:>12}",
                l.category,
                l.all_jobs,
                100.0 * l.fallback_rate,
                100.0 * l.review_rate,
                l.ratings,
                l.avg_score.map_or("-".into(), |s| format!("{s:.2}")),
                l.person_jobs,
                usd(l.person_cost_usd),
                l.no_result_jobs,
                usd(l.no_result_cost_usd)
            );
        }
        self.what_if_table(out);
        self.batch_table(out);
        self.cache_table(out);
    }

    /// Calls answered from the response cache, when there are any.
    fn cache_table(&self, out: &mut String) {
        if self.cache_by_category.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "\nAnswered from the response cache (no provider call) and what that saved (USD)"
        );
        let _ = writeln!(
            out,
            "  {:<30} {:>7} {:>8} {:>8} {:>12}",
            "", "calls", "cached", "share %", "saved"
        );
        for l in &self.cache_by_category {
            let _ = writeln!(
                out,
                "  {:<30} {:>7} {:>8} {:>8.1} {:>12}",
                l.category,
                l.calls,
                l.cached_calls,
                100.0 * l.cached_share,
                l.saved_usd.round_dp(6).to_string()
            );
        }
    }

    /// Batched calls, when there are any.
    fn batch_table(&self, out: &mut String) {
        if self.batch_by_category.iter().all(|l| l.batched_calls == 0) {
            return;
        }
        let _ = writeln!(
            out,
            "\nThrough the providers' batch APIs (half price) and what that saved (USD)"
        );
        let _ = writeln!(
            out,
            "  {:<30} {:>7} {:>8} {:>8} {:>12} {:>12} {:>12}",
            "", "calls", "batched", "share %", "batched", "real-time eq", "saved"
        );
        for l in self.batch_by_category.iter().chain(&self.batch_by_model) {
            if l.batched_calls == 0 {
                continue;
            }
            let _ = writeln!(
                out,
                "  {:<30} {:>7} {:>8} {:>8.1} {:>12} {:>12} {:>12}",
                l.key,
                l.calls,
                l.batched_calls,
                100.0 * l.batched_share,
                l.batched_cost_usd.round_dp(6).to_string(),
                l.realtime_equivalent_usd.round_dp(6).to_string(),
                l.saved_usd.round_dp(6).to_string()
            );
        }
    }

    /// Models as rows, categories (and the total) as columns; the routes'
    /// actual cost on top.
    fn what_if_table(&self, out: &mut String) {
        let mut categories: Vec<&str> = Vec::new();
        let mut models: Vec<&str> = Vec::new();
        for w in &self.what_if {
            if !categories.contains(&w.category.as_str()) {
                categories.push(&w.category);
            }
            if !models.contains(&w.model.as_str()) {
                models.push(&w.model);
            }
        }
        if categories.is_empty() {
            return;
        }
        models.sort();
        let _ = writeln!(
            out,
            "\nWhat if one model alone had served each category (USD, one call per answered job)"
        );
        let _ = write!(out, "  {:<24}", "");
        for c in &categories {
            let _ = write!(out, " {c:>12}");
        }
        let _ = writeln!(out);
        let cell = |c: &str, m: Option<&str>| {
            self.what_if
                .iter()
                .find(|w| w.category == c && m.is_none_or(|m| w.model == m))
                .map_or("-".to_string(), |w| {
                    let v = if m.is_some() {
                        w.cost_usd
                    } else {
                        w.actual_cost_usd
                    };
                    v.round_dp(6).to_string()
                })
        };
        for m in std::iter::once(None).chain(models.iter().map(|m| Some(*m))) {
            let _ = write!(out, "  {:<24}", m.unwrap_or("(as routed)"));
            for c in &categories {
                let _ = write!(out, " {:>12}", cell(c, m));
            }
            let _ = writeln!(out);
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
        let mut out = CSV_COLUMNS.join(",");
        out.push('\n');
        let mut row = |cols: &[(&str, String)]| {
            let cells: Vec<String> = CSV_COLUMNS
                .iter()
                .map(|name| {
                    cols.iter()
                        .find(|(n, _)| n == name)
                        .map_or(String::new(), |(_, v)| csv_field(v))
                })
                .collect();
            out.push_str(&cells.join(","));
            out.push('\n');
        };
        let opt = |d: Option<Decimal>| d.map_or(String::new(), |d| d.to_string());
        for s in &self.jobs_by_status {
            row(&[
                ("section", "status".into()),
                ("key", s.status.clone()),
                ("jobs", s.jobs.to_string()),
            ]);
        }
        for l in self
            .savings_by_category
            .iter()
            .chain(std::iter::once(&self.savings_total))
        {
            let parts: Vec<(String, String)> = l
                .overhead
                .parts()
                .iter()
                .map(|(name, v)| (format!("{name}_usd"), v.to_string()))
                .collect();
            let mut cols = vec![
                ("section", "savings".into()),
                ("key", l.category.clone()),
                ("model", self.baseline_model.clone().unwrap_or_default()),
                ("jobs", l.jobs.to_string()),
                ("cost_usd", l.actual_cost_usd.to_string()),
                ("baseline_cost_usd", opt(l.baseline_cost_usd)),
                ("savings_usd", opt(l.savings_usd)),
                ("answer_cost_usd", l.answer_cost_usd.to_string()),
                ("overhead_cost_usd", l.overhead_cost_usd.to_string()),
            ];
            cols.extend(parts.iter().map(|(n, v)| (n.as_str(), v.clone())));
            row(&cols);
            for (section, jobs, cost) in [
                ("person", l.person_jobs, l.person_cost_usd),
                ("no_result", l.no_result_jobs, l.no_result_cost_usd),
            ] {
                row(&[
                    ("section", section.into()),
                    ("key", l.category.clone()),
                    ("jobs", jobs.to_string()),
                    ("cost_usd", cost.to_string()),
                ]);
            }
        }
        for w in &self.what_if {
            row(&[
                ("section", "what_if".into()),
                ("key", w.category.clone()),
                ("model", w.model.clone()),
                ("jobs", w.jobs.to_string()),
                ("cost_usd", w.actual_cost_usd.to_string()),
                ("baseline_cost_usd", w.cost_usd.to_string()),
                ("savings_usd", w.savings_usd.to_string()),
            ]);
        }
        for (section, lines) in [
            ("batch_category", &self.batch_by_category),
            ("batch_model", &self.batch_by_model),
        ] {
            for l in lines {
                row(&[
                    ("section", section.into()),
                    ("key", l.key.clone()),
                    ("calls", l.calls.to_string()),
                    ("batched_calls", l.batched_calls.to_string()),
                    ("cost_usd", l.batched_cost_usd.to_string()),
                    ("baseline_cost_usd", l.realtime_equivalent_usd.to_string()),
                    ("savings_usd", l.saved_usd.to_string()),
                ]);
            }
        }
        let lines = [("category", &self.by_category), ("model", &self.by_model)];
        let total = ("total", self.total_jobs(), &self.total);
        let keyed = lines
            .iter()
            .flat_map(|(section, lines)| lines.iter().map(move |l| (*section, None, l)))
            .chain(std::iter::once((total.0, Some(total.1), total.2)));
        for (section, jobs, l) in keyed {
            row(&[
                ("section", section.into()),
                ("key", l.key.clone()),
                ("jobs", jobs.map_or(String::new(), |j| j.to_string())),
                ("calls", l.calls.to_string()),
                ("ok_calls", l.ok_calls.to_string()),
                ("input_tokens", l.input_tokens.to_string()),
                ("cached_input_tokens", l.cached_input_tokens.to_string()),
                (
                    "cache_write_input_tokens",
                    l.cache_write_input_tokens.to_string(),
                ),
                ("output_tokens", l.output_tokens.to_string()),
                ("reasoning_tokens", l.reasoning_tokens.to_string()),
                ("cost_usd", l.cost_usd.to_string()),
            ]);
        }
        out
    }
}

/// The CSV's columns; each section fills those it has (docs/analytics.md).
const CSV_COLUMNS: [&str; 23] = [
    "section",
    "key",
    "model",
    "jobs",
    "calls",
    "ok_calls",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
    "baseline_cost_usd",
    "savings_usd",
    "answer_cost_usd",
    "overhead_cost_usd",
    "retries_usd",
    "classifier_usd",
    "fallback_usd",
    "stages_usd",
    "voters_usd",
    "judge_usd",
    "batched_calls",
];

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
