//! `switchyard-bench soak`: the "million-job night". Single-call jobs go
//! through several `switchyard worker` processes to the HTTP simulator
//! (in this process, with a realistic latency and jitter, so every worker
//! has many calls in flight); a publisher keeps a bounded backlog of jobs
//! in JetStream (or publishes at a fixed rate). It reports:
//!
//! - jobs/s in each tenth of the jobs and the last tenth against the first;
//! - each worker's resident set (`/proc/<pid>/status`) at 10% and at 90%
//!   of the jobs done, their ratio and its peak, with the calls in flight
//!   (the simulator's count of requests being served) at those moments;
//! - Postgres bytes per job (every table of the run's own database, with
//!   its indexes and TOAST) and what JetStream still stores for the run;
//! - the chaos run's reconciliation: every job ended once, every request
//!   the simulator answered has its `calls` row and no `ok` row lacks one.
//!
//! `switchyard-bench rss` is the same machinery with one worker holding
//! about 1,000 calls in flight (one lane, a long simulator latency): the
//! worker's peak resident set against the 64 MB target.
//!
//! Each run has its own database (dropped afterwards) and subject prefix
//! (its streams deleted afterwards) on the NATS and Postgres it is given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use serde::Serialize;
use sqlx::PgPool;

use switchyard::bus::{Bus, DoneEvent};
use switchyard::config::Config;
use switchyard::enqueue::{publish_jobs, Outgoing};
use switchyard::envelope::JobEnvelope;
use switchyard::sim::{SimProfile, SimServer};

use crate::chaos::{count_terminal, reconcile_into, sim_worker_env, ChaosFigures, Fleet};

/// What `switchyard-bench soak` (and `rss`) runs.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub jobs: usize,
    /// Worker processes.
    pub workers: usize,
    /// The simulator's latency: `latency_ms` plus a uniform `0..=jitter_ms`.
    pub latency_ms: u64,
    pub jitter_ms: u64,
    /// Most jobs published but not yet done (0: no bound).
    pub backlog: usize,
    /// Most jobs published per second (None: as fast as the backlog allows).
    pub publish_rate: Option<f64>,
    /// Every provider's `max_concurrency` (held across the fleet).
    pub max_concurrency: usize,
    /// Publish every job to one category (one provider lane) instead of
    /// every configured category in turn.
    pub one_category: bool,
    /// Targets: the last tenth's jobs/s at least this share of the first's ...
    pub min_tenth_ratio: Option<f64>,
    /// ... each worker's RSS at 90% within this share of its RSS at 10% ...
    pub max_rss_drift: Option<f64>,
    /// ... and (rss mode) every worker's peak RSS at most this many MiB with
    /// at least `min_in_flight` calls in flight at some sample.
    pub max_peak_rss_mb: Option<f64>,
    pub min_in_flight: u64,
    /// Give up waiting for the jobs after this long.
    pub timeout: Duration,
    /// The `switchyard` binary the workers run.
    pub worker_exe: PathBuf,
    /// The Postgres URL; the run uses a database of its own on that server.
    pub database_url: String,
    pub nats_url: String,
    /// Extra environment for every worker (e.g. `MALLOC_ARENA_MAX`).
    pub worker_env: Vec<(String, String)>,
    /// Workers speak HTTP/2 to the simulator (every provider's `http2`).
    pub http2: bool,
    /// A self-test of the reconciliation: jobs 1..=withhold are counted as
    /// published but never sent, so the run must report them lost.
    pub withhold: usize,
}

impl SoakOptions {
    /// The soak's defaults for `jobs` jobs.
    pub fn soak(jobs: usize, database_url: &str, nats_url: &str) -> Result<Self> {
        Ok(Self {
            jobs,
            workers: 3,
            latency_ms: 200,
            jitter_ms: 200,
            backlog: 20_000,
            publish_rate: None,
            max_concurrency: 1000,
            one_category: false,
            min_tenth_ratio: Some(0.8),
            max_rss_drift: Some(0.10),
            max_peak_rss_mb: None,
            min_in_flight: 0,
            timeout: Duration::from_secs(3600),
            worker_exe: crate::switchyard_exe()?,
            database_url: database_url.into(),
            nats_url: nats_url.into(),
            worker_env: Vec::new(),
            http2: false,
            withhold: 0,
        })
    }

    /// The rss mode's defaults: one worker, one lane of `in_flight` calls.
    pub fn rss(in_flight: usize, database_url: &str, nats_url: &str) -> Result<Self> {
        let latency_ms = 4000;
        Ok(Self {
            // About 20 s of calls at `in_flight` at a time.
            jobs: in_flight * 5,
            workers: 1,
            latency_ms,
            jitter_ms: 500,
            backlog: in_flight * 3,
            max_concurrency: in_flight,
            one_category: true,
            min_tenth_ratio: None,
            max_rss_drift: None,
            max_peak_rss_mb: Some(64.0),
            min_in_flight: in_flight as u64,
            ..Self::soak(in_flight * 5, database_url, nats_url)?
        })
    }
}

/// One worker's resident set, in MiB.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerRss {
    pub worker: usize,
    pub pid: u32,
    pub rss_mb_at_10pct: f64,
    pub rss_mb_at_90pct: f64,
    /// RSS at 90% over RSS at 10%.
    pub rss_ratio_90_to_10: f64,
    /// The kernel's high-water mark (VmHWM) just before the worker stopped.
    pub peak_rss_mb: f64,
    /// The largest VmRSS sampled.
    pub max_sampled_rss_mb: f64,
    /// Open sockets (provider connections, NATS, Postgres) at the 10% and
    /// 90% samples, and the most seen at a sample: what the connection
    /// pools hold.
    pub sockets_at_10pct: usize,
    pub sockets_at_90pct: usize,
    pub max_sockets: usize,
}

/// One table's share of the run's database.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableBytes {
    pub bytes: i64,
    pub bytes_per_job: f64,
}

/// One JetStream stream of the run, after it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamBytes {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakFigures {
    pub mode: String,
    pub jobs: usize,
    pub workers: usize,
    pub latency_ms: u64,
    pub jitter_ms: u64,
    pub backlog: usize,
    pub publish_rate: Option<f64>,
    pub max_concurrency: usize,
    pub categories: Vec<String>,
    pub published: usize,
    pub terminal: usize,
    pub lost: usize,
    pub duplicated_results: usize,
    pub inconsistent: usize,
    pub unrecorded_calls: usize,
    pub phantom_calls: usize,
    pub duplicate_answers: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub needs_review: usize,
    pub dead: usize,
    pub answered: usize,
    pub calls_rows: usize,
    pub unknown_calls: usize,
    /// Jobs done per second in each tenth of the jobs (by done events).
    pub tenth_jobs_per_sec: Vec<f64>,
    /// Seconds from the first publish to each tenth's end.
    pub tenth_end_s: Vec<f64>,
    pub last_to_first_tenth_ratio: f64,
    pub worker_rss: Vec<WorkerRss>,
    /// The largest of the workers' peaks (VmHWM), in MiB.
    pub worker_peak_rss_mb: f64,
    /// Calls in flight (every worker) when the 10% and 90% samples were taken ...
    pub calls_in_flight_at_10pct: u64,
    pub calls_in_flight_at_90pct: u64,
    /// ... and the most seen at a sample (a sample every 200 ms).
    pub calls_in_flight: u64,
    /// Whether the workers spoke HTTP/2, and the TCP connections the
    /// simulator accepted over the run.
    pub http2: bool,
    pub sim_connections: u64,
    /// Every table of the run's database with its indexes and TOAST, summed ...
    pub pg_bytes: i64,
    pub pg_bytes_per_job: f64,
    /// ... and by table (tables under 1 byte per job summed in `other`).
    pub pg_bytes_by_table: BTreeMap<String, TableBytes>,
    /// The run's streams after it (its jobs and calls work queues and the
    /// limits KV bucket), summed and by stream ...
    pub nats_stream_bytes: u64,
    pub nats_streams: Vec<StreamBytes>,
    /// ... and the whole JetStream account's file storage (every user of
    /// this server; absent where the server's answer cannot be read).
    pub nats_account_storage_bytes: Option<u64>,
    /// Worker processes that exited by themselves (and were restarted).
    pub worker_exits: usize,
    /// `/proc/loadavg`'s 1-minute load at the start and at the end.
    pub load_start: f64,
    pub load_end: f64,
    pub elapsed_s: f64,
    pub jobs_per_sec: f64,
    /// The targets missed (empty: passed).
    pub missed: Vec<String>,
}

/// A line of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), in MiB.
/// The sockets a process holds open (its file descriptors that are sockets).
pub fn pid_sockets(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count()
}

pub fn pid_status_mb(pid: u32, key: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Texts the jobs ask, by turn.
const PROMPTS: &[&str] = &[
    "My order {n} arrived damaged; the box was crushed and one cup is broken. What can you do?",
    "Write a two-sentence product description for a stainless steel water bottle, item {n}.",
    "What is the capital of the country whose code is listed on line {n} of the shipping manifest?",
    "Draft a short, friendly reply to a customer asking for a quote on {n} office chairs.",
    "Summarise in one sentence: the delivery for ticket {n} was late by two days due to weather.",
];

/// Job `i` of the run: its category in turn, a prompt of a few dozen tokens.
fn job(run: &str, categories: &[String], i: usize) -> Result<Outgoing> {
    let cat = &categories[i % categories.len()];
    let prompt = PROMPTS[(i / categories.len()) % PROMPTS.len()].replace("{n}", &i.to_string());
    let mut env = JobEnvelope::prompt(format!("{run}-{i:07}"), cat.clone(), prompt);
    env.metadata.insert("run".into(), run.to_string());
    Outgoing::from_envelope(&env)
}

/// The job index in a job id `<run>-<index>`.
fn index_of(run: &str, id: &str) -> Option<usize> {
    id.strip_prefix(run)?.strip_prefix('-')?.parse().ok()
}

/// Overrides that make every category a single call to its route's first
/// model, lift the rate limits and set the lanes' concurrency.
fn worker_overrides(cfg: &Config, opts: &SoakOptions, env: &mut Vec<(String, String)>) {
    for (name, cat) in &cfg.categories {
        let first = cat.route.models()[0].to_string();
        env.push((
            format!("SWITCHYARD_CATEGORIES__{}__ROUTE", name.to_uppercase()),
            format!("{{ kind = \"single\", target = \"{first}\" }}"),
        ));
    }
    crate::chaos::killable_workers(
        env,
        cfg,
        // A call takes up to a few seconds: keep redeliveries for real losses.
        60,
        &[
            ("TIMEOUT_SECS", "60"),
            ("RPM", "100000000"),
            ("TPM", "4000000000"),
            ("INPUT_TPM", "4000000000"),
            ("OUTPUT_TPM", "4000000000"),
            ("MAX_CONCURRENCY", &opts.max_concurrency.to_string()),
            ("HTTP2", if opts.http2 { "true" } else { "false" }),
        ],
    );
    env.extend(opts.worker_env.iter().cloned());
}

/// The run's database: created and migrated here, dropped by [`drop_database`].
async fn create_database(url: &str) -> Result<PgPool> {
    switchyard::store::connect_and_migrate(url, 4).await
}

async fn drop_database(base_url: &str, db: &str) -> Result<()> {
    let admin = with_database(base_url, "postgres");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin)
        .await
        .context("connecting to the postgres database to drop the run's")?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"
    )))
    .execute(&pool)
    .await?;
    pool.close().await;
    Ok(())
}

/// Every table of the current database (with indexes and TOAST); a
/// partitioned table's partitions (`calls`, migration 0030) under its name.
async fn table_bytes(pool: &PgPool) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT COALESCE((SELECT i.inhparent::regclass::text FROM pg_inherits i
                          WHERE i.inhrelid = c.oid), c.relname::text),
                sum(pg_total_relation_size(c.oid))::int8
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'm')
         GROUP BY 1 ORDER BY 2 DESC",
    )
    .fetch_all(pool)
    .await?)
}

async fn stream_bytes(bus: &Bus, name: &str) -> Option<StreamBytes> {
    let mut s = bus.js.get_stream(name).await.ok()?;
    let info = s.info().await.ok()?;
    Some(StreamBytes {
        name: name.to_string(),
        messages: info.state.messages,
        bytes: info.state.bytes,
    })
}

/// Pull requests waiting on `stream`'s consumers, summed.
async fn waiting_pulls(bus: &Bus, stream: &str) -> usize {
    let Ok(s) = bus.js.get_stream(stream).await else {
        return 0;
    };
    let mut infos = s.consumers();
    let mut n = 0;
    while let Some(Ok(i)) = infos.next().await {
        n += i.num_waiting;
    }
    n
}

/// Wait (60 s at most) until every worker pulls from the jobs stream and
/// from at least one calls lane each, so the first tenth measures jobs,
/// not process start-up.
async fn wait_ready(bus: &Bus, workers: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = waiting_pulls(bus, &bus.names.jobs_stream()).await;
        let calls = waiting_pulls(bus, &bus.names.calls_stream()).await;
        if jobs >= workers && calls >= workers {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the workers did not pull within 60 s ({jobs} pulls on jobs, {calls} on calls)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The JetStream account's storage in bytes, from the server's own answer
/// (`$JS.API.INFO`; async-nats 0.51's typed account info cannot read 2.9's).
async fn account_storage(bus: &Bus) -> Option<u64> {
    let reply = bus
        .client
        .request("$JS.API.INFO", bytes::Bytes::new())
        .await
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&reply.payload)
        .ok()?
        .get("storage")?
        .as_u64()
}

/// What the sampler saw.
#[derive(Default)]
struct Watch {
    tenth_at: Vec<f64>,
    rss_at_10: Vec<f64>,
    rss_at_90: Vec<f64>,
    max_rss: Vec<f64>,
    sockets_at_10: Vec<usize>,
    sockets_at_90: Vec<usize>,
    max_sockets: Vec<usize>,
    in_flight_at_10: u64,
    in_flight_at_90: u64,
    in_flight_max: u64,
}

pub async fn run(
    cfg: Config,
    config_path: Option<&Path>,
    opts: &SoakOptions,
) -> Result<SoakFigures> {
    anyhow::ensure!(opts.jobs >= 10, "--jobs must be at least 10");
    anyhow::ensure!(opts.workers > 0, "--workers must be at least 1");
    anyhow::ensure!(
        opts.max_concurrency > 0,
        "--max-concurrency must be at least 1"
    );
    let tag = switchyard::ids::new_job_id()[..8].to_ascii_lowercase();
    let run_id = format!("soak-{tag}");
    let db = format!("switchyard_soak_{tag}");
    let database_url = with_database(&opts.database_url, &db);
    let prefix = format!("soak-{tag}");
    let mut categories: Vec<String> = cfg.categories.keys().cloned().collect();
    anyhow::ensure!(!categories.is_empty(), "the config has no categories");
    if opts.one_category {
        categories.truncate(1);
    }

    let pool = create_database(&database_url).await?;
    let result = run_in(
        &cfg,
        config_path,
        opts,
        &pool,
        &database_url,
        &prefix,
        &run_id,
        &categories,
    )
    .await;
    pool.close().await;
    if let Err(e) = drop_database(&opts.database_url, &db).await {
        tracing::warn!(error = %format!("{e:#}"), "dropping the soak database {db} failed");
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_in(
    cfg: &Config,
    config_path: Option<&Path>,
    opts: &SoakOptions,
    pool: &PgPool,
    database_url: &str,
    prefix: &str,
    run_id: &str,
    categories: &[String],
) -> Result<SoakFigures> {
    let n = opts.jobs;
    let mut figures = SoakFigures {
        mode: if opts.max_peak_rss_mb.is_some() {
            "rss"
        } else {
            "soak"
        }
        .into(),
        jobs: n,
        workers: opts.workers,
        latency_ms: opts.latency_ms,
        jitter_ms: opts.jitter_ms,
        backlog: opts.backlog,
        publish_rate: opts.publish_rate,
        max_concurrency: opts.max_concurrency,
        categories: categories.to_vec(),
        load_start: load_avg(),
        ..Default::default()
    };

    let profile = SimProfile {
        latency_ms: opts.latency_ms,
        jitter_ms: opts.jitter_ms,
        ..SimProfile::default()
    };
    let sim = SimServer::start("127.0.0.1:0", profile).await?;

    let bus = Bus::connect(&opts.nats_url, prefix).await?;
    let mut run_cfg = cfg.clone();
    run_cfg.nats.prefix = prefix.into();
    bus.delete_streams().await;
    bus.ensure_streams(&run_cfg).await?;
    let mut done_sub = bus.client.subscribe(format!("{prefix}.done.>")).await?;

    let mut env = sim_worker_env(cfg, database_url, &opts.nats_url, prefix, &sim.base_url());
    worker_overrides(cfg, opts, &mut env);
    let mut fleet = Fleet::start(
        opts.worker_exe.clone(),
        config_path,
        env,
        Vec::new(),
        "switchyard-soak-",
        opts.workers,
    )?;
    let logs = fleet.logs.clone();
    eprintln!(
        "bench {}: {n} jobs ({}), {} worker processes, simulator {}+0..{} ms, backlog {}, \
         publish rate {}, max_concurrency {}; worker logs in {}",
        figures.mode,
        categories.join(", "),
        opts.workers,
        opts.latency_ms,
        opts.jitter_ms,
        if opts.backlog == 0 {
            "unbounded".to_string()
        } else {
            opts.backlog.to_string()
        },
        opts.publish_rate
            .map_or("unpaced".to_string(), |r| format!("{r}/s")),
        opts.max_concurrency,
        logs.display()
    );

    if let Err(e) = wait_ready(&bus, opts.workers).await {
        bus.delete_streams().await;
        return Err(e);
    }

    // Done events, one per job that ended (deduplicated by index).
    let done = Arc::new(AtomicUsize::new(0));
    let tasks = switchyard::tasks::Tasks::new();
    let receiver = {
        let done = done.clone();
        let run = run_id.to_string();
        tasks.spawn(async move {
            let mut seen = vec![false; n];
            while let Some(m) = done_sub.next().await {
                let Ok(ev) = serde_json::from_slice::<DoneEvent>(&m.payload) else {
                    continue;
                };
                if let Some(i) = index_of(&run, &ev.job_id).filter(|i| *i < n) {
                    if !std::mem::replace(&mut seen[i], true) {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
    };

    // The publisher: chunks of jobs, never more than `backlog` ahead of the
    // done events, never faster than `publish_rate`. A chunk whose
    // publication failed is published again with the same ids (JetStream
    // drops the copies).
    let sent = Arc::new(AtomicUsize::new(0));
    let publish_failed = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let publisher = {
        let (bus, done, sent, failed) = (
            bus.clone(),
            done.clone(),
            sent.clone(),
            publish_failed.clone(),
        );
        let (run, cats) = (run_id.to_string(), categories.to_vec());
        let (backlog, rate, withhold) = (opts.backlog, opts.publish_rate, opts.withhold);
        tasks.spawn(async move {
            let chunk = 256.min(if backlog == 0 { 256 } else { backlog.max(1) });
            let mut i = 0;
            while i < n {
                let end = (i + chunk).min(n);
                if backlog > 0 {
                    while end.saturating_sub(done.load(Ordering::SeqCst)) > backlog {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                if let Some(r) = rate {
                    let due = started + Duration::from_secs_f64(i as f64 / r);
                    tokio::time::sleep_until(due.into()).await;
                }
                let part: Vec<Outgoing> = match (i..end)
                    .filter(|k| !(1..=withhold).contains(k))
                    .map(|k| job(&run, &cats, k))
                    .collect()
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "building jobs failed");
                        failed.store(true, Ordering::SeqCst);
                        return;
                    }
                };
                loop {
                    match publish_jobs(&bus, &part, None).await {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "publishing failed; publishing the same ids again");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                sent.store(end, Ordering::SeqCst);
                i = end;
            }
        })
    };

    // The sampler: every 200 ms the done count, the workers' RSS and the
    // calls in flight; a tenth's end when the count crosses it.
    let mut w = Watch {
        max_rss: vec![0.0; opts.workers],
        max_sockets: vec![0; opts.workers],
        ..Default::default()
    };
    let deadline = Instant::now() + opts.timeout;
    let mut last_report = Instant::now();
    let mut last_db_check = Instant::now();
    let mut finished = false;
    let mut sample = 0u64;
    while Instant::now() < deadline {
        let d = done.load(Ordering::SeqCst);
        let now = started.elapsed().as_secs_f64();
        let pids: Vec<u32> = fleet.children.iter().map(|c| c.id()).collect();
        let rss: Vec<f64> = pids
            .iter()
            .map(|p| pid_status_mb(*p, "VmRSS:").unwrap_or(0.0))
            .collect();
        let in_flight = sim.in_flight();
        w.in_flight_max = w.in_flight_max.max(in_flight);
        for (m, r) in w.max_rss.iter_mut().zip(&rss) {
            *m = m.max(*r);
        }
        // Sockets once a second (a directory walk per worker).
        let sockets: Option<Vec<usize>> = (sample.is_multiple_of(5)
            || (w.rss_at_10.is_empty() && d * 10 >= n)
            || (w.rss_at_90.is_empty() && d * 10 >= n * 9))
            .then(|| pids.iter().map(|p| pid_sockets(*p)).collect());
        sample += 1;
        if let Some(s) = &sockets {
            for (m, c) in w.max_sockets.iter_mut().zip(s) {
                *m = (*m).max(*c);
            }
        }
        while w.tenth_at.len() < 10 && d * 10 >= n * (w.tenth_at.len() + 1) {
            w.tenth_at.push(now);
        }
        if w.rss_at_10.is_empty() && d * 10 >= n {
            w.rss_at_10 = rss.clone();
            w.sockets_at_10 = sockets.clone().unwrap_or_default();
            w.in_flight_at_10 = in_flight;
        }
        if w.rss_at_90.is_empty() && d * 10 >= n * 9 {
            w.rss_at_90 = rss.clone();
            w.sockets_at_90 = sockets.clone().unwrap_or_default();
            w.in_flight_at_90 = in_flight;
        }
        if d >= n {
            finished = true;
            break;
        }
        if publish_failed.load(Ordering::SeqCst) {
            break;
        }
        // Done events are core NATS: should one be missed, the database says.
        if last_db_check.elapsed() >= Duration::from_secs(30) && sent.load(Ordering::SeqCst) >= n {
            last_db_check = Instant::now();
            if count_terminal(pool).await.is_some_and(|t| t >= n) {
                finished = true;
                break;
            }
        }
        figures.worker_exits += fleet.revive()?;
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "bench {}: {d}/{n} done, {} published, {in_flight} calls in flight, worker RSS {:?} MiB, {now:.0}s",
                figures.mode,
                sent.load(Ordering::SeqCst),
                rss.iter().map(|r| (r * 10.0).round() / 10.0).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    if !finished {
        eprintln!(
            "bench {}: gave up waiting ({} done)",
            figures.mode,
            done.load(Ordering::SeqCst)
        );
    }
    publisher.abort();
    // The peaks, before the workers stop.
    for (i, c) in fleet.children.iter().enumerate() {
        let pid = c.id();
        let at10 = w.rss_at_10.get(i).copied().unwrap_or(0.0);
        let at90 = w.rss_at_90.get(i).copied().unwrap_or(0.0);
        figures.worker_rss.push(WorkerRss {
            worker: i,
            pid,
            rss_mb_at_10pct: at10,
            rss_mb_at_90pct: at90,
            rss_ratio_90_to_10: if at10 > 0.0 { at90 / at10 } else { 0.0 },
            peak_rss_mb: pid_status_mb(pid, "VmHWM:").unwrap_or(0.0),
            max_sampled_rss_mb: w.max_rss.get(i).copied().unwrap_or(0.0),
            sockets_at_10pct: w.sockets_at_10.get(i).copied().unwrap_or(0),
            sockets_at_90pct: w.sockets_at_90.get(i).copied().unwrap_or(0),
            max_sockets: w.max_sockets.get(i).copied().unwrap_or(0),
        });
    }
    tokio::task::block_in_place(|| fleet.stop(Duration::from_secs(30)));
    receiver.abort();

    let mut f = ChaosFigures {
        published: n,
        ..Default::default()
    };
    reconcile_into(pool, &sim, &mut f).await?;
    figures.http2 = opts.http2;
    figures.sim_connections = sim.connections();
    sim.stop();
    figures.published = f.published;
    figures.terminal = f.terminal;
    figures.lost = f.lost;
    figures.duplicated_results = f.duplicated_results;
    figures.inconsistent = f.inconsistent;
    figures.unrecorded_calls = f.unrecorded_calls;
    figures.phantom_calls = f.phantom_calls;
    figures.duplicate_answers = f.duplicate_answers;
    figures.succeeded = f.succeeded;
    figures.failed = f.failed;
    figures.needs_review = f.needs_review;
    figures.dead = f.dead;
    figures.answered = f.answered;
    figures.calls_rows = f.calls_rows;
    figures.unknown_calls = f.unknown_calls;

    // Per tenth.
    let tenth = n as f64 / 10.0;
    let mut prev = 0.0;
    for at in &w.tenth_at {
        figures
            .tenth_jobs_per_sec
            .push(tenth / (at - prev).max(1e-9));
        figures.tenth_end_s.push(*at);
        prev = *at;
    }
    if figures.tenth_jobs_per_sec.len() == 10 {
        figures.last_to_first_tenth_ratio =
            figures.tenth_jobs_per_sec[9] / figures.tenth_jobs_per_sec[0];
    }
    figures.worker_peak_rss_mb = figures
        .worker_rss
        .iter()
        .map(|r| r.peak_rss_mb.max(r.max_sampled_rss_mb))
        .fold(0.0, f64::max);
    figures.calls_in_flight_at_10pct = w.in_flight_at_10;
    figures.calls_in_flight_at_90pct = w.in_flight_at_90;
    figures.calls_in_flight = w.in_flight_max;

    // Postgres.
    let tables = table_bytes(pool).await?;
    figures.pg_bytes = tables.iter().map(|(_, b)| *b).sum();
    figures.pg_bytes_per_job = figures.pg_bytes as f64 / n as f64;
    let mut other = 0;
    for (t, b) in tables {
        if b as f64 / n as f64 >= 1.0 {
            figures.pg_bytes_by_table.insert(
                t,
                TableBytes {
                    bytes: b,
                    bytes_per_job: b as f64 / n as f64,
                },
            );
        } else {
            other += b;
        }
    }
    figures.pg_bytes_by_table.insert(
        "other".into(),
        TableBytes {
            bytes: other,
            bytes_per_job: other as f64 / n as f64,
        },
    );

    // NATS.
    let kv = format!(
        "KV_{}_LIMITS",
        prefix.to_ascii_uppercase().replace('-', "_")
    );
    for name in [bus.names.jobs_stream(), bus.names.calls_stream(), kv] {
        if let Some(s) = stream_bytes(&bus, &name).await {
            figures.nats_stream_bytes += s.bytes;
            figures.nats_streams.push(s);
        }
    }
    figures.nats_account_storage_bytes = account_storage(&bus).await;
    bus.delete_streams().await;

    figures.elapsed_s = elapsed.as_secs_f64();
    figures.jobs_per_sec = figures.terminal as f64 / figures.elapsed_s.max(1e-9);
    figures.load_end = load_avg();
    figures.missed = missed(&figures, opts);
    drop(fleet);
    if figures.missed.is_empty() && std::env::var_os("CHAOS_WORKER_LOG").is_none() {
        let _ = std::fs::remove_dir_all(&logs);
    }
    Ok(figures)
}

/// The targets `f` misses under `opts`.
fn missed(f: &SoakFigures, opts: &SoakOptions) -> Vec<String> {
    let mut m = Vec::new();
    if f.lost > 0 || f.terminal != f.published {
        m.push(format!("{} of {} jobs did not end", f.lost, f.published));
    }
    for (what, v) in [
        ("jobs ended twice", f.duplicated_results),
        ("jobs ended in no recorded way", f.inconsistent),
        ("answered requests without a calls row", f.unrecorded_calls),
        (
            "ok calls rows the simulator never answered",
            f.phantom_calls,
        ),
        ("steps answered twice", f.duplicate_answers),
        ("worker processes exited", f.worker_exits),
    ] {
        if v > 0 {
            m.push(format!("{v} {what}"));
        }
    }
    if f.tenth_jobs_per_sec.len() != 10 {
        m.push(format!(
            "only {} tenths measured",
            f.tenth_jobs_per_sec.len()
        ));
    }
    if let Some(min) = opts.min_tenth_ratio {
        if f.last_to_first_tenth_ratio < min {
            m.push(format!(
                "last tenth at {:.2} of the first (target >= {min})",
                f.last_to_first_tenth_ratio
            ));
        }
    }
    if let Some(drift) = opts.max_rss_drift {
        for w in &f.worker_rss {
            if (w.rss_ratio_90_to_10 - 1.0).abs() > drift {
                m.push(format!(
                    "worker {} RSS at 90% is {:.2}x its RSS at 10% (target within {:.0}%)",
                    w.worker,
                    w.rss_ratio_90_to_10,
                    drift * 100.0
                ));
            }
        }
    }
    if let Some(max) = opts.max_peak_rss_mb {
        if f.worker_peak_rss_mb > max {
            m.push(format!(
                "worker peak RSS {:.1} MiB (target <= {max})",
                f.worker_peak_rss_mb
            ));
        }
    }
    if f.calls_in_flight < opts.min_in_flight {
        m.push(format!(
            "at most {} calls in flight (wanted >= {})",
            f.calls_in_flight, opts.min_in_flight
        ));
    }
    m
}

impl SoakFigures {
    pub fn passed(&self) -> bool {
        self.missed.is_empty()
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "jobs                      {} ({} categories: {}), {} worker processes\n\
             simulator latency         {} ms + 0..{} ms; backlog {}; publish rate {}; max_concurrency {}\n\
             jobs terminal             {}: {} succeeded, {} failed, {} needs review, {} dead\n\
             lost / doubled            {} / {} ({} ended in no recorded way)\n\
             requests answered (sim)   {}; calls rows {} ({} unknown); unrecorded {}, phantom {}, answered twice {}\n\
             jobs/s per tenth          {}\n\
             last / first tenth        {:.3}\n",
            self.published,
            self.categories.len(),
            self.categories.join(", "),
            self.workers,
            self.latency_ms,
            self.jitter_ms,
            if self.backlog == 0 { "unbounded".to_string() } else { self.backlog.to_string() },
            self.publish_rate.map_or("unpaced".to_string(), |r| format!("{r}/s")),
            self.max_concurrency,
            self.terminal,
            self.succeeded,
            self.failed,
            self.needs_review,
            self.dead,
            self.lost,
            self.duplicated_results,
            self.inconsistent,
            self.answered,
            self.calls_rows,
            self.unknown_calls,
            self.unrecorded_calls,
            self.phantom_calls,
            self.duplicate_answers,
            self.tenth_jobs_per_sec
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" "),
            self.last_to_first_tenth_ratio,
        );
        for w in &self.worker_rss {
            s += &format!(
                "worker {} RSS (MiB)        {:.1} at 10%, {:.1} at 90% (x{:.3}), peak {:.1} (largest sample {:.1}); sockets {} at 10%, {} at 90%, {} at most\n",
                w.worker,
                w.rss_mb_at_10pct,
                w.rss_mb_at_90pct,
                w.rss_ratio_90_to_10,
                w.peak_rss_mb,
                w.max_sampled_rss_mb,
                w.sockets_at_10pct,
                w.sockets_at_90pct,
                w.max_sockets
            );
        }
        s += &format!(
            "calls in flight           {} at 10%, {} at 90%, {} at most, over {} connections ({})\n\
             Postgres                  {:.0} bytes/job ({:.1} MiB):",
            self.calls_in_flight_at_10pct,
            self.calls_in_flight_at_90pct,
            self.calls_in_flight,
            self.sim_connections,
            if self.http2 { "HTTP/2" } else { "HTTP/1.1" },
            self.pg_bytes_per_job,
            self.pg_bytes as f64 / 1048576.0
        );
        let mut by: Vec<_> = self.pg_bytes_by_table.iter().collect();
        by.sort_by_key(|b| std::cmp::Reverse(b.1.bytes));
        for (t, b) in by {
            s += &format!(" {t} {:.0}", b.bytes_per_job);
        }
        s += &format!(
            "\nNATS after the run        {} bytes in the run's streams ({}); account storage {}\n\
             load (1 min)              {:.2} at the start, {:.2} at the end\n\
             elapsed                   {:.1}s ({:.0} jobs/s)\n\
             verdict                   {}",
            self.nats_stream_bytes,
            self.nats_streams
                .iter()
                .map(|s| format!("{} {} msgs {} B", s.name, s.messages, s.bytes))
                .collect::<Vec<_>>()
                .join(", "),
            self.nats_account_storage_bytes
                .map_or("unreadable".to_string(), |b| format!("{b} bytes")),
            self.load_start,
            self.load_end,
            self.elapsed_s,
            self.jobs_per_sec,
            if self.passed() {
                "PASS".to_string()
            } else {
                format!("FAIL: {}", self.missed.join("; "))
            }
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/switchyard", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=require", "x"),
            "postgres://u@h/x?sslmode=require"
        );
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    }

    #[test]
    fn job_ids_give_their_index() {
        let cats = vec!["a".to_string(), "b".to_string()];
        let j = job("soak-x", &cats, 41).unwrap();
        assert_eq!(j.category, "b");
        assert_eq!(index_of("soak-x", &j.id), Some(41));
        assert_eq!(index_of("soak-y", &j.id), None);
    }
}
