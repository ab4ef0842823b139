//! `switchyard report`: jobs by status; calls, tokens and USD by category and
//! by model, read from Postgres and printed as a table, JSON or CSV.

use std::fmt::Write as _;

use anyhow::Result;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

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

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// The job-id prefix the report is limited to, if any.
    pub job_prefix: Option<String>,
    pub jobs_by_status: Vec<StatusCount>,
    pub by_category: Vec<CostLine>,
    pub by_model: Vec<CostLine>,
    pub total: CostLine,
    pub dead_letters: i64,
    pub routes: Vec<RouteLine>,
    pub served_by: Vec<ServedBy>,
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

/// Build the report, optionally limited to jobs whose id starts with `job_prefix`.
pub async fn build(pool: &PgPool, job_prefix: Option<String>) -> Result<Report> {
    let like = like_prefix(&job_prefix);
    let jobs_by_status: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*)::int8 FROM jobs WHERE id LIKE $1 GROUP BY status ORDER BY status",
    )
    .bind(&like)
    .fetch_all(pool)
    .await?;
    let by_category: Vec<CostTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT category, {COST_COLUMNS} FROM calls WHERE job_id LIKE $1 GROUP BY category ORDER BY category"
    )))
    .bind(&like)
    .fetch_all(pool)
    .await?;
    let by_model: Vec<CostTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT provider || '/' || model, {COST_COLUMNS} FROM calls WHERE job_id LIKE $1
         GROUP BY provider, model ORDER BY provider, model"
    )))
    .bind(&like)
    .fetch_all(pool)
    .await?;
    let total: CostTuple = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT 'total', {COST_COLUMNS} FROM calls WHERE job_id LIKE $1"
    )))
    .bind(&like)
    .fetch_one(pool)
    .await?;
    let dead_letters: i64 = match &job_prefix {
        Some(_) => {
            sqlx::query_scalar("SELECT count(*)::int8 FROM dead_letters WHERE job_id LIKE $1")
                .bind(&like)
                .fetch_one(pool)
                .await?
        }
        None => {
            sqlx::query_scalar("SELECT count(*)::int8 FROM dead_letters")
                .fetch_one(pool)
                .await?
        }
    };
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
    let routes: Vec<RouteTuple> = sqlx::query_as(
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
         WHERE j.id LIKE $1 AND j.status <> 'dead'
         GROUP BY 1, 2, 3 ORDER BY 1, 2",
    )
    .bind(&like)
    .fetch_all(pool)
    .await?;
    let served: Vec<(String, String, i64, f64)> = sqlx::query_as(
        "SELECT j.category, r.model, count(*)::int8,
                (count(*)::float8 / sum(count(*)) OVER (PARTITION BY j.category))::float8
         FROM results r JOIN jobs j ON j.id = r.job_id
         WHERE j.id LIKE $1 GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2",
    )
    .bind(&like)
    .fetch_all(pool)
    .await?;
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
        job_prefix,
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
            "section,key,jobs,calls,ok_calls,input_tokens,cached_input_tokens,cache_write_input_tokens,output_tokens,reasoning_tokens,cost_usd\n",
        );
        for s in &self.jobs_by_status {
            let _ = writeln!(out, "status,{},{},,,,,,,,", csv_field(&s.status), s.jobs);
        }
        for (section, lines) in [("category", &self.by_category), ("model", &self.by_model)] {
            for l in lines.iter() {
                let _ = writeln!(
                    out,
                    "{section},{},,{},{},{},{},{},{},{},{}",
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
            "total,total,{},{},{},{},{},{},{},{},{}",
            self.total_jobs(),
            t.calls,
            t.ok_calls,
            t.input_tokens,
            t.cached_input_tokens,
            t.cache_write_input_tokens,
            t.output_tokens,
            t.reasoning_tokens,
            t.cost_usd
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
