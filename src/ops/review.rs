//! Human review: jobs in status `needs_review` listed, shown and finished by
//! a person (`switchyard review list | show ID | resolve ID`). A resolved
//! job's result lands in `results` like any other, with model `human` and
//! the cost of all the calls made before review.

use anyhow::{bail, Result};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use crate::store;
pub use crate::store::review::{Resolution, ReviewItem};

/// Jobs waiting for a person, oldest first.
pub async fn list(pool: &PgPool, category: Option<&str>) -> Result<Vec<ReviewItem>> {
    store::review::waiting(pool, category).await
}

#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    pub step: i32,
    pub model: String,
    pub outcome: String,
    pub output: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReviewDetail {
    pub job_id: String,
    pub category: String,
    pub status: String,
    pub reason: Option<String>,
    pub envelope: Option<serde_json::Value>,
    pub route_decision: Option<serde_json::Value>,
    pub steps: Vec<StepView>,
    pub calls: i64,
    pub cost_usd: Decimal,
}

/// Everything a reviewer needs about one job.
pub async fn show(pool: &PgPool, job_id: &str) -> Result<ReviewDetail> {
    let Some(job) = store::review::job(pool, job_id).await? else {
        bail!("no job with id `{job_id}`");
    };
    let steps = store::load_steps(pool, job_id).await?;
    let totals = store::review::call_totals(pool, job_id).await?;
    Ok(ReviewDetail {
        job_id: job_id.to_string(),
        category: job.category,
        status: job.status.to_string(),
        reason: job.reason,
        envelope: job.envelope,
        route_decision: job.route_decision,
        steps: steps
            .into_iter()
            .map(|r| StepView {
                step: r.step,
                model: r.model,
                outcome: serde_json::to_value(r.outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                output: r.output,
                reason: r.reason,
            })
            .collect(),
        calls: totals.calls,
        cost_usd: totals.cost_usd,
    })
}

/// Finish a job waiting for review. Returns its category (for the done event).
pub async fn resolve(pool: &PgPool, job_id: &str, how: Resolution, by: &str) -> Result<String> {
    store::review::resolve(pool, job_id, how, by).await
}

impl ReviewDetail {
    /// A readable page for the terminal.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "job       {}", self.job_id);
        let _ = writeln!(out, "category  {}", self.category);
        let _ = writeln!(out, "status    {}", self.status);
        if let Some(r) = &self.reason {
            let _ = writeln!(out, "reason    {r}");
        }
        let _ = writeln!(
            out,
            "calls     {} (${})",
            self.calls,
            self.cost_usd.round_dp(6)
        );
        if let Some(e) = &self.envelope {
            let input = e
                .get("prompt")
                .and_then(|p| p.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| e.get("messages").map(|m| m.to_string()).unwrap_or_default());
            let _ = writeln!(out, "\ninput\n  {input}");
        }
        if !self.steps.is_empty() {
            let _ = writeln!(out, "\nsteps");
            for s in &self.steps {
                let _ = writeln!(
                    out,
                    "  [{}] {} {}{}",
                    s.step,
                    s.model,
                    s.outcome,
                    s.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                );
                if let Some(o) = &s.output {
                    let _ = writeln!(out, "      {o}");
                }
            }
        }
        if let Some(d) = &self.route_decision {
            let _ = writeln!(
                out,
                "\nroute decision\n  {}",
                serde_json::to_string(d).unwrap_or_default()
            );
        }
        out
    }
}
