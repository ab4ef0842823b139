//! `switchyard-bench`: throughput against the JetStream ceiling (no mode),
//! `latency` (added latency at a steady load),
//! `limits` (worker processes sharing one rate-limited provider), `batch`,
//! `soak` (the million-job night) and `rss` (a worker's memory with 1,000
//! calls in flight),
//! `ingest` (the memory a large batch result file costs), `chaos`
//! (kills and restarts under load, then a reconciliation) and `cluster`
//! (a three-node NATS cluster losing its jobs stream's leader under load). Each prints a
//! readable summary and, with `--json`, one JSON object on the last line.

use std::time::Duration;

switchyard::jemalloc_global!();

use anyhow::Result;
use clap::{Parser, Subcommand};
use switchyard::cli::Global;
use switchyard::config::Config;
use switchyard::store;

/// Switchyard's measuring harness (not shipped in the `switchyard` binary).
#[derive(Debug, Parser)]
#[command(name = "switchyard-bench", version)]
struct Cli {
    #[command(flatten)]
    global: Global,

    /// Number of jobs per run.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// End with one JSON object of the figures on the last line.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Jobs of batch categories (one per provider format) through the
    /// simulator's batch APIs: lost, doubled, unrecorded and phantom calls,
    /// the saving (exactly the batch discount) and the worker's peak RSS;
    /// exits 1 if a target is missed.
    Batch {
        /// Jobs to publish.
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        /// Seconds the simulator takes to end a batch.
        #[arg(long, default_value_t = 3.0)]
        batch_secs: f64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout_secs: u64,
        /// End with one JSON object of the figures on the last line.
        #[arg(long)]
        json: bool,
    },
    /// The response cache: the same jobs without a cache, with an empty one
    /// and with a full one (HTTP simulator): jobs/s and provider calls.
    Cache {
        /// Jobs per run.
        #[arg(long, default_value_t = 5_000)]
        jobs: usize,
        /// End with one JSON object of the figures on the last line.
        #[arg(long)]
        json: bool,
    },
    /// The memory reading one large batch result file costs: a loopback
    /// OpenAI batch API serves `--mb` megabytes of result lines to the
    /// batch client; reports the resident set before and at peak.
    Ingest {
        /// Size of the result file, in MiB.
        #[arg(long, default_value_t = 200)]
        mb: u64,
        /// End with one JSON object of the figures on the last line.
        #[arg(long)]
        json: bool,
    },
    /// The latency Switchyard adds (publish → result committed, minus the
    /// provider's time) at a steady offered load, in-process provider.
    Latency {
        /// Jobs offered per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Seconds of offered load.
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// End with one JSON object of the figures on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Worker processes sharing one rate-limited provider: 429s and utilization.
    Limits {
        /// Worker processes.
        #[arg(long, default_value_t = 3)]
        processes: usize,
        /// Seconds to measure.
        #[arg(long, default_value_t = 60)]
        duration_secs: u64,
        /// Requests per minute the simulator enforces (and the config declares).
        #[arg(long, default_value_t = 600)]
        rpm: u32,
        /// Tokens per minute the simulator enforces (and the config declares).
        #[arg(long, default_value_t = 100_000)]
        tpm: u32,
        /// Use per-process limits instead of the fleet-wide ones.
        #[arg(long)]
        per_process: bool,
        /// Requests per minute the provider really enforces (default: --rpm).
        #[arg(long)]
        provider_rpm: Option<u32>,
        /// Tokens per minute the provider really enforces (default: --tpm).
        #[arg(long)]
        provider_tpm: Option<u32>,
        /// The provider sends no rate-limit headers: only its 429s tell.
        #[arg(long)]
        no_headers: bool,
        /// Kill one worker process (SIGKILL) halfway through.
        #[arg(long)]
        kill_one: bool,
        /// End with one JSON object of the figures on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Jobs through worker processes while workers are killed (SIGKILL) and
    /// restarted, nats-server is killed and PostgreSQL stopped once each;
    /// then checks that nothing was lost or doubled and every answered
    /// request is in `calls`. Runs its own PostgreSQL and nats-server
    /// (needs their binaries); exits 1 if a target is missed.
    Chaos {
        /// Jobs to publish.
        #[arg(long, default_value_t = 50_000)]
        jobs: usize,
        /// Worker processes.
        #[arg(long, default_value_t = 3)]
        processes: usize,
        /// Jobs published per second (default: all at once).
        #[arg(long)]
        publish_rate: Option<f64>,
        /// Shortest pause between two kills, in seconds.
        #[arg(long, default_value_t = 2.0)]
        kill_min_secs: f64,
        /// Longest pause between two kills, in seconds.
        #[arg(long, default_value_t = 5.0)]
        kill_max_secs: f64,
        /// Seconds nats-server stays dead (0: no NATS restart).
        #[arg(long, default_value_t = 3.0)]
        nats_down_secs: f64,
        /// Seconds PostgreSQL stays stopped (0: no Postgres restart).
        #[arg(long, default_value_t = 5.0)]
        pg_down_secs: f64,
        /// The workers' ack wait: how soon a killed worker's messages come back.
        #[arg(long, default_value_t = 10)]
        ack_wait_secs: u64,
        /// Send the jobs of batch-capable categories through the providers'
        /// batch APIs (far deadlines), killing workers during collection,
        /// submission, polling and ingest.
        #[arg(long)]
        batch: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout_secs: u64,
        /// End with one JSON object of the figures on the last line.
        #[arg(long)]
        json: bool,
    },
    /// The million-job night: single-call jobs through worker processes to
    /// the HTTP simulator with a realistic latency; jobs/s per tenth of the
    /// jobs, each worker's RSS at 10% and 90% done, Postgres bytes per job,
    /// NATS storage after the run and a reconciliation (nothing lost or
    /// doubled). Its own database (dropped after) and subject prefix. Exits
    /// 1 if a target is missed.
    Soak {
        /// Jobs to publish.
        #[arg(long, default_value_t = 1_000_000)]
        jobs: usize,
        /// Worker processes.
        #[arg(long, default_value_t = 3)]
        workers: usize,
        /// The simulator's latency per call, in milliseconds ...
        #[arg(long, default_value_t = 200)]
        latency_ms: u64,
        /// ... plus a uniform random 0..=jitter.
        #[arg(long, default_value_t = 200)]
        jitter_ms: u64,
        /// Most jobs published and not yet done (0: publish without bound).
        #[arg(long, default_value_t = 20_000)]
        backlog: usize,
        /// Most jobs published per second (default: as the backlog allows).
        #[arg(long)]
        publish_rate: Option<f64>,
        /// Every provider lane's max_concurrency (held across the workers).
        #[arg(long, default_value_t = 1000)]
        max_concurrency: usize,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
        /// Workers speak HTTP/2 (h2c) to the simulator: every provider's
        /// `http2 = true`, so calls share connections.
        #[arg(long)]
        http2: bool,
        /// End with one JSON object of the figures on the last line.
        #[arg(long)]
        json: bool,
    },
    /// One worker process holding `--in-flight` calls at once (one
    /// category, one lane, a long simulator latency): its peak RSS against
    /// the 64 MB target, and the soak's reconciliation. Exits 1 if a target
    /// is missed.
    Rss {
        /// Calls the worker holds in flight (its lane's max_concurrency).
        #[arg(long, default_value_t = 1000)]
        in_flight: usize,
        /// Jobs to publish (default: 5 per call in flight).
        #[arg(long)]
        jobs: Option<usize>,
        /// The simulator's latency per call, in milliseconds.
        #[arg(long, default_value_t = 4000)]
        latency_ms: u64,
        /// Workers speak HTTP/2 (h2c) to the simulator: every provider's
        /// `http2 = true`, so calls share connections.
        #[arg(long)]
        http2: bool,
        /// End with one JSON object of the figures on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Three worker processes on a three-node NATS cluster on loopback (R3
    /// streams and KV; each worker on a different node, the others as
    /// fallbacks); the jobs stream's leader is killed (SIGKILL) mid-run and
    /// restarted; then a reconciliation and the throughput dip. Exits 1 if a
    /// target is missed.
    Cluster {
        /// Jobs to publish.
        #[arg(long, default_value_t = 5_000)]
        jobs: usize,
        /// Jobs published per second.
        #[arg(long, default_value_t = 100.0)]
        publish_rate: f64,
        /// Kill the leader once this share of the jobs is terminal.
        #[arg(long, default_value_t = 0.35)]
        kill_at: f64,
        /// Seconds the killed node stays down.
        #[arg(long, default_value_t = 10.0)]
        down_secs: f64,
        /// The workers' ack wait: how soon messages a worker lost come back.
        #[arg(long, default_value_t = 10)]
        ack_wait_secs: u64,
        /// The nats-server binary (default: `NATS_SERVER_BIN`, else
        /// `nats-server` on PATH, else /usr/sbin/nats-server).
        #[arg(long)]
        nats_server: Option<std::path::PathBuf>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout_secs: u64,
        /// End with one JSON object of the figures on the last line.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    switchyard::init_logging();
    match run(Cli::parse()).await {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<u8> {
    let global = cli.global.clone().with_secret_files()?;
    let g = &global;
    let load = || Config::load(g.config.as_deref());
    match cli {
        Cli {
            mode: Some(Mode::Cache { jobs, json }),
            ..
        } => {
            anyhow::ensure!(jobs > 0, "--jobs must be at least 1");
            let pool = store::connect_and_migrate(&g.database_url, 8).await?;
            let figures = switchyard_bench::cache::run(load()?, pool, &g.nats_url, jobs).await?;
            println!("{}", figures.summary());
            if json {
                println!("{}", serde_json::to_string(&figures)?);
            }
            Ok(0)
        }
        Cli {
            mode: Some(Mode::Latency { rate, secs, json }),
            ..
        } => {
            let pool = store::connect_and_migrate(&g.database_url, 16).await?;
            let figures =
                switchyard_bench::latency::run(load()?, pool, &g.nats_url, rate, secs).await?;
            println!("{}", figures.summary());
            if json {
                println!("{}", serde_json::to_string(&figures)?);
            }
            Ok(0)
        }
        Cli {
            mode: Some(Mode::Ingest { mb, json }),
            ..
        } => {
            anyhow::ensure!(mb > 0, "--mb must be at least 1");
            let figures = switchyard_bench::ingest::run(mb).await?;
            println!("{}", figures.summary());
            if json {
                println!("{}", serde_json::to_string(&figures)?);
            }
            Ok(0)
        }
        Cli {
            mode:
                Some(Mode::Limits {
                    processes,
                    duration_secs,
                    rpm,
                    tpm,
                    per_process,
                    provider_rpm,
                    provider_tpm,
                    no_headers,
                    kill_one,
                    json,
                }),
            ..
        } => {
            anyhow::ensure!(processes > 0, "--processes must be at least 1");
            let cfg = load()?;
            let pool = store::connect_and_migrate(&g.database_url, 4).await?;
            let figures = switchyard_bench::limits::run(
                cfg,
                g.config.as_deref(),
                pool,
                &g.database_url,
                &g.nats_url,
                &switchyard_bench::limits::LimitOptions {
                    processes,
                    duration: Duration::from_secs(duration_secs),
                    rpm,
                    tpm,
                    fleet: !per_process,
                    provider_rpm: provider_rpm.unwrap_or(rpm),
                    provider_tpm: provider_tpm.unwrap_or(tpm),
                    no_headers,
                    kill_one,
                },
            )
            .await?;
            println!("{}", figures.summary());
            if json {
                println!("{}", serde_json::to_string(&figures)?);
            }
            Ok(0)
        }
        Cli {
            mode:
                Some(Mode::Batch {
                    jobs,
                    batch_secs,
                    timeout_secs,
                    json,
                }),
            ..
        } => {
            anyhow::ensure!(jobs > 0, "--jobs must be at least 1");
            anyhow::ensure!(
                batch_secs.is_finite() && batch_secs >= 0.0,
                "--batch-secs must be 0 or more"
            );
            let cfg = load()?;
            let pool = store::connect_and_migrate(&g.database_url, 16).await?;
            let figures = switchyard_bench::batch::run(
                cfg,
                pool,
                &g.nats_url,
                &switchyard_bench::batch::BatchOptions {
                    jobs,
                    batch_secs,
                    timeout: Duration::from_secs(timeout_secs),
                },
            )
            .await?;
            println!("{}", figures.summary());
            if json {
                println!("{}", serde_json::to_string(&figures)?);
            }
            Ok(if figures.ok() { 0 } else { 1 })
        }
        Cli {
            mode:
                Some(Mode::Chaos {
                    jobs,
                    processes,
                    publish_rate,
                    kill_min_secs,
                    kill_max_secs,
                    nats_down_secs,
                    pg_down_secs,
                    ack_wait_secs,
                    batch,
                    timeout_secs,
                    json,
                }),
            ..
        } => {
            anyhow::ensure!(jobs > 0, "--jobs must be at least 1");
            let secs = |name: &str, v: f64| {
                anyhow::ensure!(v.is_finite() && v >= 0.0, "--{name} must be 0 or more");
                Ok(Duration::from_secs_f64(v))
            };
            let kill_every = (
                secs("kill-min-secs", kill_min_secs)?,
                secs("kill-max-secs", kill_max_secs)?,
            );
            anyhow::ensure!(
                kill_every.0 <= kill_every.1 && !kill_every.1.is_zero(),
                "--kill-min-secs must not exceed --kill-max-secs, and --kill-max-secs must be above 0"
            );
            if let Some(r) = publish_rate {
                anyhow::ensure!(r.is_finite() && r > 0.0, "--publish-rate must be above 0");
            }
            anyhow::ensure!(ack_wait_secs > 0, "--ack-wait-secs must be at least 1");
            let cfg = load()?;
            let figures = switchyard_bench::chaos::run(
                cfg,
                g.config.as_deref(),
                &switchyard_bench::chaos::ChaosOptions {
                    jobs,
                    processes,
                    publish_rate,
                    kill_every,
                    nats_down: secs("nats-down-secs", nats_down_secs)?,
                    pg_down: secs("pg-down-secs", pg_down_secs)?,
                    ack_wait_secs,
                    timeout: Duration::from_secs(timeout_secs),
                    worker_exe: switchyard_bench::switchyard_exe()?,
                    batch,
                },
            )
            .await?;
            println!("{}", figures.summary());
            if json {
                println!("{}", serde_json::to_string(&figures)?);
            }
            Ok(if figures.passed() { 0 } else { 1 })
        }
        Cli {
            mode:
                Some(Mode::Soak {
                    jobs,
                    workers,
                    latency_ms,
                    jitter_ms,
                    backlog,
                    publish_rate,
                    max_concurrency,
                    timeout_secs,
                    http2,
                    json,
                }),
            ..
        } => {
            if let Some(r) = publish_rate {
                anyhow::ensure!(r.is_finite() && r > 0.0, "--publish-rate must be above 0");
            }
            let opts = switchyard_bench::soak::SoakOptions {
                workers,
                latency_ms,
                jitter_ms,
                backlog,
                publish_rate,
                max_concurrency,
                timeout: Duration::from_secs(timeout_secs),
                http2,
                ..switchyard_bench::soak::SoakOptions::soak(jobs, &g.database_url, &g.nats_url)?
            };
            let figures = switchyard_bench::soak::run(load()?, g.config.as_deref(), &opts).await?;
            println!("{}", figures.summary());
            if json {
                println!("{}", serde_json::to_string(&figures)?);
            }
            Ok(if figures.passed() { 0 } else { 1 })
        }
        Cli {
            mode:
                Some(Mode::Rss {
                    in_flight,
                    jobs,
                    latency_ms,
                    http2,
                    json,
                }),
            ..
        } => {
            anyhow::ensure!(in_flight > 0, "--in-flight must be at least 1");
            let mut opts =
                switchyard_bench::soak::SoakOptions::rss(in_flight, &g.database_url, &g.nats_url)?;
            opts.latency_ms = latency_ms;
            opts.http2 = http2;
            if let Some(j) = jobs {
                opts.jobs = j;
            }
            let figures = switchyard_bench::soak::run(load()?, g.config.as_deref(), &opts).await?;
            println!("{}", figures.summary());
            if json {
                println!("{}", serde_json::to_string(&figures)?);
            }
            Ok(if figures.passed() { 0 } else { 1 })
        }
        Cli {
            mode:
                Some(Mode::Cluster {
                    jobs,
                    publish_rate,
                    kill_at,
                    down_secs,
                    ack_wait_secs,
                    nats_server,
                    timeout_secs,
                    json,
                }),
            ..
        } => {
            anyhow::ensure!(jobs > 0, "--jobs must be at least 1");
            anyhow::ensure!(
                publish_rate.is_finite() && publish_rate > 0.0,
                "--publish-rate must be above 0"
            );
            anyhow::ensure!(
                (0.0..1.0).contains(&kill_at),
                "--kill-at must be at least 0 and below 1"
            );
            anyhow::ensure!(
                down_secs.is_finite() && down_secs >= 0.0,
                "--down-secs must be 0 or more"
            );
            anyhow::ensure!(ack_wait_secs > 0, "--ack-wait-secs must be at least 1");
            let cfg = load()?;
            let figures = switchyard_bench::cluster::run(
                cfg,
                g.config.as_deref(),
                &switchyard_bench::cluster::ClusterOptions {
                    jobs,
                    publish_rate,
                    kill_at,
                    down: Duration::from_secs_f64(down_secs),
                    ack_wait_secs,
                    timeout: Duration::from_secs(timeout_secs),
                    worker_exe: switchyard_bench::switchyard_exe()?,
                    nats_server,
                },
            )
            .await?;
            println!("{}", figures.summary());
            if json {
                println!("{}", serde_json::to_string(&figures)?);
            }
            Ok(if figures.passed() { 0 } else { 1 })
        }
        Cli {
            jobs,
            json,
            mode: None,
            ..
        } => {
            anyhow::ensure!(jobs > 0, "--jobs must be at least 1");
            let cfg = load()?;
            let pool =
                store::connect_and_migrate(&g.database_url, cfg.database.max_connections).await?;
            let figures = switchyard_bench::throughput::run(cfg, pool, &g.nats_url, jobs).await?;
            println!("{}", figures.summary());
            if json {
                println!("{}", serde_json::to_string(&figures)?);
            }
            Ok(0)
        }
    }
}
