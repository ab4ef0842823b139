//! `switchyard-bench batch`: jobs of three batch categories (one per
//! provider format) through one in-process worker, against a simulator in
//! a process of its own whose batches end after `--batch-secs`; then the
//! reconciliation: nothing lost or doubled, every batch item the simulator
//! processed has exactly one `calls` row and no batch row lacks one, and
//! the saving is exactly the batch discount. The peak RSS is this process's
//! (the worker's: the simulator holds its batches elsewhere).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use switchyard::bus::Bus;
use switchyard::config::{BatchConfig, Config, Delivery, RouteConfig};
use switchyard::demo::on_simulator;
use switchyard::enqueue::{publish_jobs, wait_jobs, Jobs, Outgoing};
use switchyard::envelope::JobEnvelope;
use switchyard::pipeline::worker::{self, WorkerOptions};
use switchyard::sim::LedgerEntry;

use crate::throughput::{peak_rss_mb, unthrottled};

pub struct BatchOptions {
    pub jobs: usize,
    /// How long the simulator takes to end a batch.
    pub batch_secs: f64,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchFigures {
    pub published: usize,
    pub terminal: i64,
    pub lost: i64,
    pub duplicated_results: i64,
    /// Batch items the simulator processed without a `calls` row.
    pub unrecorded_calls: usize,
    /// Batch `calls` rows the simulator has no processed item for.
    pub phantom_calls: usize,
    pub batches: i64,
    pub items_per_batch: f64,
    /// First publish to the last job terminal.
    pub secs: f64,
    pub jobs_per_sec: f64,
    pub peak_rss_mb: f64,
    /// The batched calls' usage at real-time prices.
    pub realtime_cost_usd: Decimal,
    pub actual_cost_usd: Decimal,
    pub saving_usd: Decimal,
    /// Whether the saving is exactly the batch discount (half).
    pub saving_is_the_discount: bool,
}

impl BatchFigures {
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicated_results == 0
            && self.unrecorded_calls == 0
            && self.phantom_calls == 0
            && self.saving_is_the_discount
    }

    pub fn summary(&self) -> String {
        format!(
            "batch bench: {} jobs over OpenAI, Anthropic and Gemini batch APIs\n\
             \x20 terminal / lost / duplicated  {} / {} / {}\n\
             \x20 unrecorded / phantom calls    {} / {}\n\
             \x20 batches, items per batch      {}, {:.0}\n\
             \x20 end to end                    {:.1} s ({:.0} jobs/s)\n\
             \x20 peak RSS (worker process)     {:.1} MiB\n\
             \x20 real-time equivalent          ${}\n\
             \x20 actual                        ${}\n\
             \x20 saved                         ${} ({})",
            self.published,
            self.terminal,
            self.lost,
            self.duplicated_results,
            self.unrecorded_calls,
            self.phantom_calls,
            self.batches,
            self.items_per_batch,
            self.secs,
            self.jobs_per_sec,
            self.peak_rss_mb,
            self.realtime_cost_usd.round_dp(6),
            self.actual_cost_usd.round_dp(6),
            self.saving_usd.round_dp(6),
            if self.saving_is_the_discount {
                "exactly the batch discount"
            } else {
                "NOT the batch discount"
            }
        )
    }
}

/// A simulator in its own process, killed on drop.
struct SimProcess(std::process::Child);

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(
    mut cfg: Config,
    pool: PgPool,
    nats_url: &str,
    opts: &BatchOptions,
) -> Result<BatchFigures> {
    let run_id = format!("bb-{}", &switchyard::ids::new_job_id()[..8]);
    cfg.nats.prefix = run_id.replace('-', "_");
    // The simulator, in a process of its own.
    let dir = tempfile::tempdir()?;
    let profile = dir.path().join("profile.toml");
    std::fs::write(
        &profile,
        format!("batch_ms = {}\n", (opts.batch_secs * 1000.0).round() as u64),
    )?;
    let port = switchyard_servers::free_port()?;
    let _sim = SimProcess(
        std::process::Command::new(crate::switchyard_exe()?)
            .args(["sim", "--listen", &format!("127.0.0.1:{port}"), "--profile"])
            .arg(&profile)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting the simulator")?,
    );
    let base = format!("http://127.0.0.1:{port}");
    switchyard::providers::http::install_tls_provider();
    let http = reqwest::Client::new();
    let started = Instant::now();
    while http.get(format!("{base}/health")).send().await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the simulator did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    on_simulator(&mut cfg, &base);
    unthrottled(&mut cfg);
    // One batch category per provider format.
    let template = cfg
        .categories
        .values()
        .next()
        .cloned()
        .context("the config has no category")?;
    cfg.categories.clear();
    for (name, model) in [
        ("bench_openai", "gpt-4o-mini"),
        ("bench_anthropic", "claude-haiku-4-5"),
        ("bench_gemini", "gemini-2.5-flash-lite"),
    ] {
        anyhow::ensure!(
            cfg.models.contains_key(model),
            "the config has no model `{model}`"
        );
        let mut c = template.clone();
        c.route = RouteConfig::Single {
            target: model.into(),
        };
        c.variant = None;
        c.budget = None;
        c.delivery = Delivery::Batch;
        c.batch = BatchConfig {
            flush_after: "2s".into(),
            max_items: 50_000,
            ..BatchConfig::default()
        };
        cfg.categories.insert(name.into(), c);
    }
    let categories: Vec<String> = cfg.categories.keys().cloned().collect();
    let jobs: Vec<Outgoing> = (0..opts.jobs)
        .map(|i| {
            let env = JobEnvelope::prompt(
                format!("{run_id}-{i:07}"),
                categories[i % categories.len()].clone(),
                format!("Write one line of catalogue copy for item {i}."),
            );
            Outgoing::from_envelope(&env)
        })
        .collect::<Result<_>>()?;

    let bus = Bus::connect_configured(nats_url, &cfg.nats).await?;
    let cfg = std::sync::Arc::new(cfg);
    let handle = worker::start(
        cfg.clone(),
        pool.clone(),
        bus.clone(),
        WorkerOptions::default(),
    )
    .await?;
    let started = Instant::now();
    publish_jobs(&bus, &jobs, None).await?;
    let finished = wait_jobs(
        &pool,
        Jobs::Prefix(&run_id, jobs.len()),
        opts.timeout,
        Duration::from_millis(200),
        None,
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    let peak = peak_rss_mb();
    handle.shutdown().await;
    bus.delete_streams().await;
    anyhow::ensure!(finished, "the batch bench did not finish in time");

    let like = format!("{run_id}-%");
    let terminal = count(
        &pool,
        "SELECT count(*)::int8 FROM jobs WHERE id LIKE $1 AND finished_at IS NOT NULL",
        &like,
    )
    .await?;
    let duplicated = count(
        &pool,
        "SELECT count(*)::int8 FROM (SELECT job_id, step FROM calls WHERE job_id LIKE $1
             AND outcome = 'ok' GROUP BY 1, 2 HAVING count(*) > 1) d",
        &like,
    )
    .await?;
    let batches = count(
        &pool,
        "SELECT count(DISTINCT i.batch_id)::int8 FROM batch_items i WHERE i.job_id LIKE $1",
        &like,
    )
    .await?;
    let ledger: Vec<LedgerEntry> = http
        .get(format!("{base}/ledger"))
        .send()
        .await?
        .json()
        .await
        .context("reading the simulator's ledger")?;
    let (items, unrecorded, phantom) = reconcile_batches(&pool, &ledger, &like).await?;
    let (actual, realtime): (Decimal, Decimal) = sqlx::query_as(
        "SELECT COALESCE(sum(cost_usd), 0), COALESCE(sum(cost_usd / $2), 0) FROM calls
         WHERE job_id LIKE $1 AND batch_id IS NOT NULL",
    )
    .bind(&like)
    .bind(switchyard::pricing::BATCH_DISCOUNT)
    .fetch_one(&pool)
    .await?;
    let saving = realtime - actual;
    Ok(BatchFigures {
        published: jobs.len(),
        terminal,
        lost: jobs.len() as i64 - terminal,
        duplicated_results: duplicated,
        unrecorded_calls: unrecorded,
        phantom_calls: phantom,
        batches,
        items_per_batch: if batches == 0 {
            0.0
        } else {
            items as f64 / batches as f64
        },
        secs,
        jobs_per_sec: jobs.len() as f64 / secs.max(1e-9),
        peak_rss_mb: peak,
        realtime_cost_usd: realtime.normalize(),
        actual_cost_usd: actual.normalize(),
        saving_usd: saving.normalize(),
        saving_is_the_discount: saving
            == actual * (Decimal::ONE / switchyard::pricing::BATCH_DISCOUNT - Decimal::ONE),
    })
}

/// The batch items of jobs whose id is `like` against the simulator's
/// ledger: (items, processed without a `calls` row, recorded without a
/// processed item).
pub async fn reconcile_batches(
    pool: &PgPool,
    ledger: &[LedgerEntry],
    like: &str,
) -> Result<(usize, usize, usize)> {
    // Each item: the provider's batch id, its custom id, and whether it has
    // an `ok` calls row of its own.
    let items: Vec<(Option<String>, String, bool)> = sqlx::query_as(
        "SELECT b.provider_batch_id, i.custom_id,
                EXISTS (SELECT 1 FROM calls c WHERE c.job_id = i.job_id AND c.step = i.step
                          AND c.attempt = i.attempt AND c.batch_id = i.batch_id AND c.outcome = 'ok')
         FROM batch_items i JOIN provider_batches b ON b.id = i.batch_id
         WHERE i.job_id LIKE $1",
    )
    .bind(like)
    .fetch_all(pool)
    .await?;
    let processed: HashSet<(String, String)> = ledger
        .iter()
        .filter(|e| e.status == 200)
        .filter_map(|e| e.batch.clone().map(|b| (b.batch_id, b.custom_id)))
        .collect();
    let recorded: HashSet<(String, String)> = items
        .iter()
        .filter(|(_, _, has_row)| *has_row)
        .filter_map(|(pid, cid, _)| pid.clone().map(|p| (p, cid.clone())))
        .collect();
    Ok((
        items.len(),
        processed.difference(&recorded).count(),
        recorded.difference(&processed).count(),
    ))
}

async fn count(pool: &PgPool, sql: &'static str, like: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(sql).bind(like).fetch_one(pool).await?)
}
