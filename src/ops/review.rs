//! Human review: jobs in status `needs_review` listed, shown and finished by
//! a person (`switchyard review list | show ID | resolve ID`). A resolved
//! job's result lands in `results` like any other, with model `human` and
//! the cost of all the calls made before review.

use anyhow::{bail, Context, Result};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

#[derive(Debug, Clone, Serialize)]
pub struct ReviewItem {
    pub job_id: String,
    pub category: String,
    pub reason: Option<String>,
    pub waiting_secs: i64,
}

/// Jobs waiting for a person, oldest first.
pub async fn list(pool: &PgPool, category: Option<&str>) -> Result<Vec<ReviewItem>> {
    let rows: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(
        "SELECT id, category, review_reason,
                EXTRACT(EPOCH FROM now() - COALESCE(finished_at, created_at))::int8
         FROM jobs WHERE status = 'needs_review' AND ($1::text IS NULL OR category = $1)
         ORDER BY COALESCE(finished_at, created_at), id",
    )
    .bind(category)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(job_id, category, reason, waiting_secs)| ReviewItem {
            job_id,
            category,
            reason,
            waiting_secs,
        })
        .collect())
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
    type JobTuple = (
        String,
        String,
        Option<String>,
        Option<serde_json::Value>,
        Option<serde_json::Value>,
    );
    let job: Option<JobTuple> = sqlx::query_as(
        "SELECT category, status, review_reason, envelope, route_decision FROM jobs WHERE id = $1",
    )
    .bind(job_id)
    .fetch_optional(pool)
    .await?;
    let Some((category, status, reason, envelope, route_decision)) = job else {
        bail!("no job with id `{job_id}`");
    };
    let steps = crate::store::load_steps(pool, job_id).await?;
    let (calls, cost_usd): (i64, Decimal) = sqlx::query_as(
        "SELECT count(*)::int8, COALESCE(sum(cost_usd), 0) FROM calls WHERE job_id = $1",
    )
    .bind(job_id)
    .fetch_one(pool)
    .await?;
    Ok(ReviewDetail {
        job_id: job_id.to_string(),
        category,
        status,
        reason,
        envelope,
        route_decision,
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
        calls,
        cost_usd,
    })
}

/// How a person finishes a job.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// The job succeeds with this answer.
    Output(String),
    /// The job fails with this reason.
    Reject(String),
}

/// Finish a job waiting for review. Returns its category (for the done event).
pub async fn resolve(pool: &PgPool, job_id: &str, how: Resolution, by: &str) -> Result<String> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT category, status FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((category, status)) = row else {
        bail!("no job with id `{job_id}`");
    };
    if status != "needs_review" {
        bail!("job `{job_id}` is not waiting for review (status `{status}`)");
    }
    let review = serde_json::json!({"by": by, "outcome": match &how {
        Resolution::Output(_) => "resolved",
        Resolution::Reject(_) => "rejected",
    }});
    match how {
        Resolution::Output(text) => {
            sqlx::query(
                "INSERT INTO results (job_id, category, output, model, finish_reason, cost_usd,
                                      input_tokens, output_tokens, latency_ms)
                 SELECT j.id, j.category, $2, 'human', 'review', COALESCE(c.cost, 0),
                        COALESCE(c.inp, 0), COALESCE(c.outp, 0),
                        (EXTRACT(EPOCH FROM now() - COALESCE(j.enqueued_at, j.created_at)) * 1000)::int8
                 FROM jobs j LEFT JOIN LATERAL (
                     SELECT sum(cost_usd) AS cost, sum(input_tokens)::int8 AS inp,
                            sum(output_tokens)::int8 AS outp
                     FROM calls WHERE calls.job_id = j.id) c ON true
                 WHERE j.id = $1
                 ON CONFLICT (job_id) DO NOTHING",
            )
            .bind(job_id)
            .bind(&text)
            .execute(&mut *tx)
            .await
            .context("recording the reviewed result")?;
            sqlx::query(
                "UPDATE jobs SET status = 'succeeded', finished_at = now(),
                        route_decision = jsonb_set(COALESCE(route_decision, '{}'::jsonb), '{review}', $2)
                 WHERE id = $1",
            )
            .bind(job_id)
            .bind(review)
            .execute(&mut *tx)
            .await?;
        }
        Resolution::Reject(reason) => {
            sqlx::query(
                "UPDATE jobs SET status = 'failed', finished_at = now(), error = $2,
                        route_decision = jsonb_set(COALESCE(route_decision, '{}'::jsonb), '{review}', $3)
                 WHERE id = $1",
            )
            .bind(job_id)
            .bind(format!("rejected in review: {reason}"))
            .bind(review)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(category)
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
