//! `switchyard-bench latency`: the latency Switchyard adds to a job at a
//! steady offered load. Jobs are published at `--rate` per second for
//! `--secs` seconds to a worker whose provider answers in-process (zero
//! provider time); a job's added latency is from the moment its publish
//! began to the moment its done event (published after its result is
//! committed) reached this process, minus the provider time recorded in
//! its cost row.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use serde::Serialize;
use sqlx::PgPool;

use switchyard::bus::{Bus, DoneEvent};
use switchyard::config::{Config, ProviderKind};
use switchyard::demo::sample_jobs;
use switchyard::pipeline::worker::{self, WorkerOptions};

#[derive(Debug, Clone, Serialize)]
pub struct LatencyFigures {
    pub offered_jobs_per_sec: f64,
    pub jobs: usize,
    /// Jobs whose done event arrived within the run's deadline.
    pub finished: usize,
    pub added_latency_p50_ms: f64,
    pub added_latency_p90_ms: f64,
    pub added_latency_p99_ms: f64,
    pub added_latency_max_ms: f64,
    /// Where the time goes, per job, p50 and p99 of each stage (ms), from
    /// the transaction start times Postgres records (`now()`):
    /// `dispatch` publish → the job row's transaction began;
    /// `to_intent` → the intent's transaction began (the job row's commit,
    /// the call's publish and second hop);
    /// `to_final` → the final rows' transaction began (the intent's commit,
    /// the provider); `to_done` → the done event arrived (the final commit,
    /// the ack, the event).
    pub stages_ms: Vec<Stage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub stage: &'static str,
    pub p50: f64,
    pub p99: f64,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub async fn run(
    cfg: Config,
    pool: PgPool,
    nats_url: &str,
    rate: f64,
    secs: f64,
) -> Result<LatencyFigures> {
    anyhow::ensure!(
        rate > 0.0 && secs > 0.0,
        "--rate and --secs must be positive"
    );
    let tag = &switchyard::ids::new_job_id()[..8];
    let mut cfg = cfg;
    crate::throughput::unthrottled(&mut cfg);
    for p in cfg.providers.values_mut() {
        p.kind = ProviderKind::Inproc;
    }
    cfg.nats.prefix = format!("{}-latency-{tag}", cfg.nats.prefix);
    let run = format!("latency-{tag}");
    let n = (rate * secs).round().max(1.0) as usize;
    let jobs = sample_jobs(&cfg, &run, n)?;

    let bus = Bus::connect(nats_url, &cfg.nats.prefix).await?;
    bus.delete_streams().await;
    let mut done = bus
        .client
        .subscribe(format!("{}.done.>", cfg.nats.prefix))
        .await?;
    let handle = worker::start(
        Arc::new(cfg.clone()),
        pool.clone(),
        bus.clone(),
        WorkerOptions::default(),
    )
    .await?;

    let clock = clock_pair();
    // The receiver: when each job's done event arrived.
    let arrivals = switchyard::tasks::Tasks::new().spawn(async move {
        let mut at: HashMap<String, Instant> = HashMap::with_capacity(n);
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs + 60.0);
        while at.len() < n {
            match tokio::time::timeout_at(deadline, done.next()).await {
                Ok(Some(m)) => {
                    if let Ok(ev) = serde_json::from_slice::<DoneEvent>(&m.payload) {
                        at.entry(ev.job_id).or_insert_with(Instant::now);
                    }
                }
                _ => break,
            }
        }
        at
    });

    // The publisher: one job every 1/rate seconds, each publish in its own
    // task so a slow ack never delays the next.
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(n);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let publishes = switchyard::tasks::Tasks::new();
    eprintln!("latency: {n} jobs at {rate} jobs/s through the in-process provider…");
    for job in jobs {
        tick.tick().await;
        sent.insert(job.id.clone(), Instant::now());
        let bus = bus.clone();
        publishes.spawn(async move {
            let subject = bus.names.job_subject(&job.category);
            let _ = bus
                .publish_durable(subject, &job.id, job.payload.into())
                .await;
        });
    }
    let at = arrivals.await?;
    publishes.stop(Duration::from_secs(5)).await;
    handle.shutdown().await;

    // Provider time per job, as recorded (zero-ish for the in-process provider).
    let provider_ms: HashMap<String, f64> = sqlx::query_as::<_, (String, f64)>(
        "SELECT job_id, sum(latency_ms)::float8 FROM calls WHERE job_id LIKE $1 GROUP BY job_id",
    )
    .bind(format!("{run}%"))
    .fetch_all(&pool)
    .await?
    .into_iter()
    .collect();
    let mut added: Vec<f64> = at
        .iter()
        .filter_map(|(id, arrived)| {
            let start = sent.get(id)?;
            let total = arrived.duration_since(*start).as_secs_f64() * 1000.0;
            Some((total - provider_ms.get(id).copied().unwrap_or(0.0)).max(0.0))
        })
        .collect();
    added.sort_by(|a, b| a.total_cmp(b));
    let stages_ms = stages(&pool, &run, clock, &sent, &at).await?;

    // Leave the database and NATS as we found them.
    for table in ["results", "calls"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE job_id LIKE $1"
        )))
        .bind(format!("{run}%"))
        .execute(&pool)
        .await?;
    }
    sqlx::query("DELETE FROM jobs WHERE id LIKE $1")
        .bind(format!("{run}%"))
        .execute(&pool)
        .await?;
    bus.delete_streams().await;

    Ok(LatencyFigures {
        offered_jobs_per_sec: rate,
        jobs: n,
        finished: added.len(),
        added_latency_p50_ms: quantile(&added, 0.50),
        added_latency_p90_ms: quantile(&added, 0.90),
        added_latency_p99_ms: quantile(&added, 0.99),
        added_latency_max_ms: added.last().copied().unwrap_or(0.0),
        stages_ms,
    })
}

/// Now on the monotonic clock and on the wall clock (ms since the epoch),
/// so that an `Instant` taken later converts to the wall clock Postgres uses.
fn clock_pair() -> (Instant, f64) {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    (Instant::now(), wall)
}

/// Each finished job's stages (see [`LatencyFigures::stages_ms`]), from the
/// wall clock this process and Postgres share.
async fn stages(
    pool: &PgPool,
    run: &str,
    (base, base_wall): (Instant, f64),
    sent: &HashMap<String, Instant>,
    at: &HashMap<String, Instant>,
) -> Result<Vec<Stage>> {
    let wall = |t: &Instant| base_wall + t.duration_since(base).as_secs_f64() * 1000.0;
    let rows: Vec<(String, f64, f64, f64)> = sqlx::query_as(
        "SELECT j.id, extract(epoch FROM j.created_at)::float8 * 1000,
                extract(epoch FROM c.first)::float8 * 1000,
                extract(epoch FROM r.created_at)::float8 * 1000
         FROM jobs j JOIN results r ON r.job_id = j.id
              JOIN (SELECT job_id, min(created_at) AS first FROM calls
                    WHERE job_id LIKE $1 GROUP BY job_id) c ON c.job_id = j.id
         WHERE j.id LIKE $1",
    )
    .bind(format!("{run}%"))
    .fetch_all(pool)
    .await?;
    let mut cols: [Vec<f64>; 4] = Default::default();
    for (id, job, intent, result) in rows {
        let (Some(sent), Some(done)) = (sent.get(&id).map(wall), at.get(&id).map(wall)) else {
            continue;
        };
        for (col, d) in
            cols.iter_mut()
                .zip([job - sent, intent - job, result - intent, done - result])
        {
            col.push(d);
        }
    }
    Ok(["dispatch", "to_intent", "to_final", "to_done"]
        .into_iter()
        .zip(cols)
        .map(|(stage, mut v)| {
            v.sort_by(|a, b| a.total_cmp(b));
            Stage {
                stage,
                p50: quantile(&v, 0.5),
                p99: quantile(&v, 0.99),
            }
        })
        .collect())
}

impl LatencyFigures {
    pub fn summary(&self) -> String {
        format!(
            "offered load              {:>10.0} jobs/s ({} jobs, {} finished)\n\
             added latency p50         {:>10.2} ms\n\
             added latency p90         {:>10.2} ms\n\
             added latency p99         {:>10.2} ms\n\
             added latency max         {:>10.2} ms\n\
             stages p50 / p99 (ms)     {}",
            self.offered_jobs_per_sec,
            self.jobs,
            self.finished,
            self.added_latency_p50_ms,
            self.added_latency_p90_ms,
            self.added_latency_p99_ms,
            self.added_latency_max_ms,
            self.stages_ms
                .iter()
                .map(|s| format!("{} {:.1} / {:.1}", s.stage, s.p50, s.p99))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantiles_of_a_sorted_list() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(super::quantile(&v, 0.5), 51.0);
        assert_eq!(super::quantile(&v, 0.99), 99.0);
        assert_eq!(super::quantile(&[], 0.5), 0.0);
    }
}
