//! `switchyard-bench cache`: what the response cache does to throughput and
//! to the provider bill. The same jobs (the demo's prompts, one call each,
//! through the HTTP simulator) run three times: without a cache, with an
//! empty cache (every call a miss, its answer stored), and again with the
//! cache filled (every call a hit: no provider call).

use std::time::Instant;

use anyhow::Result;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use switchyard::config::{CacheConfig, CacheScope, Config};
use switchyard::demo::{on_simulator, sample_jobs};
use switchyard::sim::{SimProfile, SimServer};

use crate::throughput::{run_pipeline, unthrottled};

#[derive(Debug, Clone, Serialize)]
pub struct CacheFigures {
    pub jobs: usize,
    pub nocache_jobs_per_sec: f64,
    pub cold_jobs_per_sec: f64,
    pub warm_jobs_per_sec: f64,
    pub nocache_provider_calls: usize,
    pub cold_provider_calls: usize,
    pub warm_provider_calls: usize,
    /// What the cold run paid, and what the warm run's cached answers saved.
    pub cold_cost_usd: Decimal,
    pub warm_cost_usd: Decimal,
    pub warm_saved_usd: Decimal,
}

impl CacheFigures {
    pub fn summary(&self) -> String {
        format!(
            "response cache, {} jobs (one call each, HTTP simulator):\n\
             \x20 no cache      {:>8.0} jobs/s  {:>6} provider calls\n\
             \x20 cold (misses) {:>8.0} jobs/s  {:>6} provider calls  ${}\n\
             \x20 warm (hits)   {:>8.0} jobs/s  {:>6} provider calls  ${} (saved ${})",
            self.jobs,
            self.nocache_jobs_per_sec,
            self.nocache_provider_calls,
            self.cold_jobs_per_sec,
            self.cold_provider_calls,
            self.cold_cost_usd,
            self.warm_jobs_per_sec,
            self.warm_provider_calls,
            self.warm_cost_usd,
            self.warm_saved_usd
        )
    }
}

async fn usd(pool: &PgPool, sql: &str, like: &str) -> Result<Decimal> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .bind(like)
        .fetch_one(pool)
        .await?)
}

pub async fn run(cfg: Config, pool: PgPool, nats_url: &str, n: usize) -> Result<CacheFigures> {
    let tag = &switchyard::ids::new_job_id()[..8];
    let sim = SimServer::start("127.0.0.1:0", SimProfile::default()).await?;
    let started = Instant::now();
    let mut base = cfg.clone();
    unthrottled(&mut base);
    on_simulator(&mut base, &sim.base_url());
    let mut cached = base.clone();
    for c in cached.categories.values_mut() {
        c.cache = Some(CacheConfig {
            ttl: "1h".into(),
            scope: CacheScope::Category,
            wait: None,
        });
    }
    let mut secs = Vec::new();
    let mut calls = Vec::new();
    let mut runs = Vec::new();
    for (name, cfg) in [("n", &base), ("c", &cached), ("w", &cached)] {
        let mut c = cfg.clone();
        c.nats.prefix = format!("{}-bcache-{tag}-{name}", cfg.nats.prefix);
        let run = format!("bcache-{tag}-{name}");
        // The same prompts every time: they depend on the index only.
        let jobs = sample_jobs(&c, &run, n)?;
        let before = sim.ledger().len();
        eprintln!("bench: {n} jobs, run {name}…");
        secs.push(run_pipeline(c, &pool, nats_url, &jobs, &run).await?.secs);
        calls.push(sim.ledger().len() - before);
        runs.push(run);
    }
    sim.stop();
    let cost = "SELECT COALESCE(sum(cost_usd), 0) FROM calls WHERE job_id LIKE $1";
    let saved = "SELECT COALESCE(sum(saved_usd), 0) FROM calls WHERE job_id LIKE $1";
    let figures = CacheFigures {
        jobs: n,
        nocache_jobs_per_sec: n as f64 / secs[0],
        cold_jobs_per_sec: n as f64 / secs[1],
        warm_jobs_per_sec: n as f64 / secs[2],
        nocache_provider_calls: calls[0],
        cold_provider_calls: calls[1],
        warm_provider_calls: calls[2],
        cold_cost_usd: usd(&pool, cost, &format!("{}%", runs[1]))
            .await?
            .normalize(),
        warm_cost_usd: usd(&pool, cost, &format!("{}%", runs[2]))
            .await?
            .normalize(),
        warm_saved_usd: usd(&pool, saved, &format!("{}%", runs[2]))
            .await?
            .normalize(),
    };
    // Leave the database as we found it.
    for run in &runs {
        let like = format!("{run}%");
        for sql in [
            "DELETE FROM results WHERE job_id LIKE $1",
            "DELETE FROM calls WHERE job_id LIKE $1",
            "DELETE FROM jobs WHERE id LIKE $1",
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                .bind(&like)
                .execute(&pool)
                .await?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    sqlx::query("DELETE FROM response_cache WHERE created_at > now() - make_interval(secs => $1)")
        .bind(elapsed + 5.0)
        .execute(&pool)
        .await?;
    Ok(figures)
}
