//! Command-line interface: argument parsing (clap) and one function per
//! subcommand that wires the library together.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::config::{Config, DEFAULT_DATABASE_URL, DEFAULT_NATS_URL};
use crate::demo;
use crate::ops::report::Format;
use crate::ops::{report, review};
use crate::pipeline::worker;
use crate::pipeline::worker::WorkerOptions;
use crate::sim::{SimProfile, SimServer};
use crate::{enqueue, store};

/// Switchyard: a durable, multi-model LLM job system. Jobs arrive on NATS
/// JetStream subjects by task category, rate-limited provider lanes serve
/// them, and every result and cost record lands in Postgres.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Args)]
pub struct Global {
    /// Config file (TOML). `SWITCHYARD_*` variables override its keys.
    /// Default: `config/switchyard.toml`, or the shipped config built into
    /// the binary when that file is absent.
    #[arg(long, global = true, env = "SWITCHYARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Postgres URL; the database is created when missing. TLS with
    /// `?sslmode=require|verify-ca|verify-full&sslrootcert=CA.pem`. Or the
    /// URL in a file named by `DATABASE_URL_FILE`.
    #[arg(long, global = true, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// NATS server URL(s), comma-separated for fallbacks (JetStream must be
    /// enabled); `tls://` for TLS, `nats://user:pass@host` or
    /// `nats://token@host` for credentials. Or the URL in a file named by
    /// `NATS_URL_FILE`. TLS files and other credentials: `NATS_CA_FILE`,
    /// `NATS_CREDS_FILE`, … (docs/configuration.md).
    #[arg(long, global = true, env = "NATS_URL", default_value = DEFAULT_NATS_URL, hide_env_values = true)]
    pub nats_url: String,
}

impl std::fmt::Debug for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Global")
            .field("config", &self.config)
            .field(
                "database_url",
                &crate::secrets::redact_url(&self.database_url),
            )
            .field("nats_url", &crate::secrets::redact_url(&self.nats_url))
            .finish()
    }
}

impl Global {
    /// The URLs from `DATABASE_URL_FILE` and `NATS_URL_FILE` of the process
    /// environment, where neither the flag nor the variable gives them.
    pub fn with_secret_files(self) -> Result<Self> {
        self.with_secret_files_from(&crate::secrets::process_env)
    }

    fn with_secret_files_from(mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        for (var, value, default) in [
            ("DATABASE_URL", &mut self.database_url, DEFAULT_DATABASE_URL),
            ("NATS_URL", &mut self.nats_url, DEFAULT_NATS_URL),
        ] {
            // Errors when both `VAR` and `VAR_FILE` are set.
            let Some(url) = crate::secrets::var_or_file(var, env)? else {
                continue;
            };
            // From the file, and no flag given (a flag beats the environment).
            if env(var).filter(|v| !v.is_empty()).is_none() && value == default {
                *value = url;
            }
        }
        Ok(self)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the database if missing and apply the migrations.
    Migrate,
    /// Run the dispatcher and provider lanes until SIGINT/SIGTERM.
    ///
    /// With no flags: the dispatcher and every provider lane of the config.
    /// Run as many workers as you like; they share the durable consumers.
    Worker {
        /// Do not run the dispatcher (run lanes only).
        #[arg(long)]
        no_dispatcher: bool,
        /// Run only these provider lanes (comma-separated); `none` for no lanes.
        #[arg(long, value_delimiter = ',')]
        lanes: Option<Vec<String>>,
        /// Seconds to wait for in-flight calls when stopping.
        #[arg(long, default_value_t = 30)]
        drain_secs: u64,
        /// Serve /metrics (Prometheus) and the live dashboard (/) here, e.g.
        /// 127.0.0.1:9187 (default: `metrics.listen`; none: off).
        #[arg(long)]
        metrics_listen: Option<String>,
        /// Do not deliver completion webhooks from this process (another
        /// worker does).
        #[arg(long)]
        no_webhooks: bool,
    },
    /// Serve the HTTP API (/v1/...), the dashboard (/), /api/stats and
    /// /metrics, without taking work (the worker serves them too with
    /// --metrics-listen).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9187")]
        listen: String,
    },
    /// Serve the provider simulator (OpenAI chat completions) until stopped.
    Sim {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: String,
        /// A TOML profile (latency_ms, jitter_ms, error_rate, rpm, tpm, cached_share).
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Use the demo's profile (latency, 3% 500s, RPM limits).
        #[arg(long, conflicts_with = "profile")]
        demo_profile: bool,
    },
    /// Publish the jobs of a JSONL file (one envelope per line).
    Enqueue {
        /// The JSONL file.
        file: PathBuf,
        /// Publish every line to this category's subject.
        #[arg(long)]
        category: Option<String>,
        /// Return only when every job is terminal (succeeded, failed, dead, needs_review).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds (exit code 2).
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
    },
    /// Print jobs by status and calls, tokens and USD by category and by model.
    Report {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Only jobs whose id starts with this prefix.
        #[arg(long)]
        job_prefix: Option<String>,
        /// From this time on: a date or time (2026-11-01, 2026-11-01T08:00:00Z)
        /// or a duration back from now (90m, 24h, 7d, 2w).
        #[arg(long)]
        since: Option<String>,
        /// Before this time (same forms as --since).
        #[arg(long)]
        until: Option<String>,
        /// Only this category.
        #[arg(long)]
        category: Option<String>,
        /// Measure savings against this model instead of `report.baseline_model`.
        #[arg(long)]
        baseline: Option<String>,
        /// Also write the report as a self-contained HTML page with inline SVG charts.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Run the whole system on the simulator with sample jobs and print the cost report.
    Demo {
        /// Number of sample jobs.
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        /// Simulator profile instead of the demo's default error mix.
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Retention: delete jobs that ended more than N days ago with their calls,
    /// steps, results and feedback, and dead letters older than N days.
    Prune {
        /// Keep the last this many days.
        #[arg(long)]
        older_than_days: u32,
        /// Only count what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Jobs deleted per transaction.
        #[arg(long, default_value_t = 5000)]
        batch: i64,
    },
    /// Rate a job's result (1-5), so satisfaction per model and route can be compared.
    Feedback {
        /// The job whose result is rated.
        job_id: String,
        /// 1 (bad) to 5 (excellent).
        #[arg(long)]
        score: u8,
        /// What the rater noticed.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Work the human-review queue: jobs a route could not finish.
    Review {
        #[command(subcommand)]
        action: ReviewAction,
    },
    /// Dead letters: list, show, and replay them under their original job ids.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Provider batches (categories with `delivery = "batch"` or `"auto"`):
    /// list, show, cancel.
    Batch {
        #[command(subcommand)]
        action: BatchAction,
    },
    /// Cancel jobs: by id, or every unfinished job matching a filter. A
    /// queued job never calls a provider; a running one stops at its next
    /// step; a job that ended already is left as it is.
    Cancel {
        /// Job ids.
        ids: Vec<String>,
        /// Every unfinished job of this category ...
        #[arg(long)]
        category: Option<String>,
        /// ... with this metadata (`KEY=VALUE`, repeatable) ...
        #[arg(long = "metadata", value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        /// ... created before this RFC 3339 time.
        #[arg(long)]
        created_before: Option<String>,
    },
    /// API tokens for the HTTP endpoints: create, list, revoke.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// The response cache (categories with `cache = { ttl = … }`): stats,
    /// clear.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Completion webhooks: list delivery attempts, replay a delivery.
    Webhooks {
        #[command(subcommand)]
        action: WebhooksAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum WebhooksAction {
    /// Delivery attempts, newest first: one line per attempt.
    List {
        /// Only this job's.
        #[arg(long)]
        job: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Deliver a job's webhook again, as a new series of attempts (a worker
    /// sends it). ID is a delivery id (from `webhooks list`) or, when no
    /// delivery has that id, a job id.
    Replay { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create a token; it is printed once, alone on the last line (only its
    /// hash is stored).
    Create {
        #[arg(long)]
        name: String,
        /// `submit` (submit jobs, read one's own), `read` (jobs, results,
        /// costs, dashboard, metrics) or `admin` (everything).
        #[arg(long)]
        scope: String,
    },
    /// Tokens by name, scope, first characters and use (never the token).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by name: it is refused from then on.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Entries, hits and what answers from the cache saved, per category.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete entries: every one, or one category's.
    Clear {
        #[arg(long)]
        category: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum BatchAction {
    /// Batches, newest first, with state, counts, age and cost so far.
    List {
        /// Only this provider's.
        #[arg(long)]
        provider: Option<String>,
        /// Only in this state (`open`, `submitting`, `submitted`, `ended`).
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One batch, by our id or the provider's.
    Show {
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Ask the provider to cancel a batch: its answered items are recorded,
    /// the rest are sent real-time (the jobs are not cancelled).
    Cancel { id: String },
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Dead letters not yet replayed, newest first.
    List {
        /// Only those whose reason contains this (case-insensitive).
        #[arg(long)]
        reason: Option<String>,
        /// Include dead letters already replayed.
        #[arg(long)]
        all: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter: where it came from, why, and its message.
    Show {
        id: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run dead letters again under their original job ids, each at most once.
    Replay {
        /// Dead letter ids (from `dlq list`).
        ids: Vec<i64>,
        /// Every dead letter not yet replayed (with --reason: those matching).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// With --all: only those whose reason contains this.
        #[arg(long, requires = "all")]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReviewAction {
    /// Jobs waiting for review, oldest first.
    List {
        /// Only this category.
        #[arg(long)]
        category: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One job: its input, every step tried and why the route gave up.
    Show {
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Finish a job: with the answer (`--output`) or by rejecting it (`--reject`).
    Resolve {
        id: String,
        /// The answer; the job succeeds with it (model `human`).
        #[arg(long, conflicts_with = "reject", required_unless_present = "reject")]
        output: Option<String>,
        /// Fail the job instead.
        #[arg(long)]
        reject: bool,
        /// Why it was rejected.
        #[arg(long, requires = "reject", default_value = "rejected by reviewer")]
        reason: String,
        /// Who resolved it (recorded in the decision log).
        #[arg(long, env = "USER", default_value = "reviewer")]
        by: String,
    },
}

/// Cancel `token` on SIGINT or SIGTERM.
// The listener lives as long as the process: the one task not tracked.
#[allow(clippy::disallowed_methods)]
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("stop requested; draining");
        token.cancel();
    });
}

/// Exit status of a command.
pub type ExitCode = u8;

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let global = cli.global.with_secret_files()?;
    let g = &global;
    let load = || Config::load(g.config.as_deref());
    match cli.command {
        Command::Migrate => {
            let cfg = load()?;
            store::connect_and_migrate(&g.database_url, cfg.database.max_connections).await?;
            println!("migrations applied");
            Ok(0)
        }
        Command::Worker {
            no_dispatcher,
            lanes,
            drain_secs,
            metrics_listen,
            no_webhooks,
        } => {
            let cfg = Arc::new(load()?);
            let pool =
                store::connect_and_migrate(&g.database_url, cfg.database.max_connections).await?;
            let bus = Bus::connect_configured(&g.nats_url, &cfg.nats).await?;
            let lanes = lanes.map(|l| l.into_iter().filter(|n| n != "none").collect());
            let handle = worker::start(
                cfg,
                pool,
                bus,
                WorkerOptions {
                    dispatcher: !no_dispatcher,
                    lanes,
                    drain_timeout: Duration::from_secs(drain_secs),
                    metrics_listen,
                    webhooks: !no_webhooks,
                },
            )
            .await?;
            cancel_on_signal(handle.token());
            let drained = handle.run_until_stopped().await;
            Ok(if drained { 0 } else { 1 })
        }
        Command::Serve { listen } => {
            let cfg = load()?;
            let pool = store::connect_and_migrate(&g.database_url, 4).await?;
            let bus = Bus::connect_configured(&g.nats_url, &cfg.nats).await?;
            let tasks = crate::tasks::Tasks::new();
            crate::ops::dashboard::serve(&listen, pool, bus, &cfg, &tasks).await?;
            cancel_on_signal(tasks.token().clone());
            tasks.token().cancelled().await;
            tasks.stop(Duration::from_secs(10)).await;
            Ok(0)
        }
        Command::Sim {
            listen,
            profile,
            demo_profile,
        } => {
            let profile = match (profile, demo_profile) {
                (Some(p), _) => SimProfile::load(&p)?,
                (None, true) => SimProfile::demo(),
                (None, false) => SimProfile::default(),
            };
            let sim = SimServer::start(&listen, profile.clone()).await?;
            eprintln!("simulator listening on {} with {profile:?}", sim.base_url());
            let token = CancellationToken::new();
            cancel_on_signal(token.clone());
            token.cancelled().await;
            sim.stop();
            Ok(0)
        }
        Command::Enqueue {
            file,
            category,
            wait,
            timeout_secs,
        } => {
            let cfg = load()?;
            let (jobs, errors) = enqueue::read_jsonl(&file, category.as_deref())?;
            for e in &errors {
                eprintln!("{}: {e}", file.display());
            }
            let bus = Bus::connect_configured(&g.nats_url, &cfg.nats).await?;
            bus.ensure_streams(&cfg).await?;
            let pb = enqueue::progress_bar(jobs.len() as u64, "published");
            let fresh = enqueue::publish_jobs(&bus, &jobs, Some(&pb)).await?;
            pb.finish();
            eprintln!(
                "published {} jobs ({} de-duplicated by JetStream), {} lines rejected",
                jobs.len(),
                jobs.len() - fresh,
                errors.len()
            );
            if wait {
                let pool = store::connect_and_migrate(&g.database_url, 4).await?;
                let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
                let pb = enqueue::progress_bar(ids.len() as u64, "finished");
                let ok = enqueue::wait_finished(
                    &pool,
                    &ids,
                    Duration::from_secs(timeout_secs),
                    Some(&pb),
                )
                .await?;
                pb.finish();
                if !ok {
                    eprintln!("timed out waiting for jobs to finish");
                    return Ok(2);
                }
            }
            Ok(if errors.is_empty() { 0 } else { 1 })
        }
        Command::Report {
            format,
            job_prefix,
            since,
            until,
            category,
            baseline,
            html,
        } => {
            let cfg = load()?;
            // A bad --baseline fails before connecting.
            cfg.baseline(baseline.as_deref())?;
            let pool =
                store::connect_and_migrate(&g.database_url, cfg.database.max_connections.min(4))
                    .await?;
            let filter = report::Filter {
                job_prefix,
                since,
                until,
                category,
            };
            let r = report::build(&pool, &filter, &cfg, baseline.as_deref()).await?;
            if let Some(path) = &html {
                std::fs::write(path, crate::ops::report_html::render(&r))
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            print!("{}", r.render(format));
            if format == Format::Json {
                println!();
            }
            Ok(0)
        }
        Command::Demo {
            jobs,
            profile,
            timeout_secs,
        } => {
            let cfg = load()?;
            let profile = match profile {
                Some(p) => SimProfile::load(&p)?,
                None => SimProfile::demo(),
            };
            // A database of its own unless DATABASE_URL names one.
            let db_url = if g.database_url == DEFAULT_DATABASE_URL {
                store::with_database(&g.database_url, demo::DEMO_DATABASE)?
            } else {
                g.database_url.clone()
            };
            let pool = store::connect_and_migrate(&db_url, cfg.database.max_connections).await?;
            let outcome = demo::run(
                cfg,
                pool,
                &g.nats_url,
                jobs,
                profile,
                Duration::from_secs(timeout_secs),
            )
            .await
            .context("demo failed")?;
            Ok(if demo::print(&outcome, jobs) { 0 } else { 1 })
        }
        Command::Cancel {
            ids,
            category,
            metadata,
            created_before,
        } => {
            let by_filter = category.is_some() || !metadata.is_empty() || created_before.is_some();
            anyhow::ensure!(
                ids.is_empty() == by_filter,
                "give job ids, or a filter (--category, --metadata, --created-before), not both"
            );
            let metadata = metadata
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| anyhow::anyhow!("--metadata `{kv}`: write KEY=VALUE"))
                })
                .collect::<Result<Vec<_>>>()?;
            if let Some(t) = &created_before {
                anyhow::ensure!(
                    crate::envelope::parse_deadline(t).is_some(),
                    "--created-before `{t}`: an RFC 3339 time (2026-11-30T06:00:00Z)"
                );
            }
            let cfg = load()?;
            let pool = store::connect_and_migrate(&g.database_url, 2).await?;
            let bus = Bus::connect_configured(&g.nats_url, &cfg.nats).await?;
            let announce = |id: &str, category: &str| crate::bus::DoneEvent {
                job_id: id.to_string(),
                category: category.to_string(),
                status: store::JobStatus::Cancelled,
            };
            let mut missing = 0;
            if by_filter {
                let filter = store::jobs::CancelFilter {
                    category,
                    metadata,
                    created_before,
                };
                let done = store::jobs::cancel_where(&pool, &filter).await?;
                for (id, category) in &done {
                    bus.publish_done(&announce(id, category)).await;
                    println!("{id}\tcancelled");
                }
                eprintln!("{} job(s) cancelled", done.len());
            } else {
                for id in &ids {
                    match store::jobs::cancel(&pool, id).await? {
                        store::jobs::Cancelled::Now { category } => {
                            bus.publish_done(&announce(id, &category)).await;
                            println!("{id}\tcancelled");
                        }
                        store::jobs::Cancelled::AlreadyEnded(s) => {
                            println!("{id}\talready ended ({s}); nothing changed")
                        }
                        store::jobs::Cancelled::NotFound => {
                            missing += 1;
                            println!("{id}\tno such job")
                        }
                    }
                }
            }
            bus.flush().await;
            Ok(if missing > 0 { 1 } else { 0 })
        }
        Command::Token { action } => {
            let pool = store::connect_and_migrate(&g.database_url, 2).await?;
            match action {
                TokenAction::Create { name, scope } => {
                    let scope = store::tokens::Scope::parse(&scope).ok_or_else(|| {
                        anyhow::anyhow!("--scope must be submit, read or admin, not `{scope}`")
                    })?;
                    anyhow::ensure!(!name.trim().is_empty(), "--name must not be empty");
                    let token = store::tokens::create(&pool, &name, scope).await?;
                    println!(
                        "token `{name}` (scope {}) created; it is shown once, store it now:",
                        scope.as_str()
                    );
                    println!("{token}");
                }
                TokenAction::List { json } => {
                    let rows = store::tokens::list(&pool).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&rows)?);
                    } else {
                        println!(
                            "{:<20} {:<7} {:<9} {:<26} {:<26} revoked",
                            "name", "scope", "starts", "created", "last used"
                        );
                        for r in &rows {
                            println!(
                                "{:<20} {:<7} {:<9} {:<26} {:<26} {}",
                                r.name,
                                r.scope,
                                format!("{}…", r.prefix),
                                r.created_at,
                                r.last_used_at.as_deref().unwrap_or("-"),
                                r.revoked_at.as_deref().unwrap_or("-")
                            );
                        }
                    }
                }
                TokenAction::Revoke { name } => {
                    anyhow::ensure!(
                        store::tokens::revoke(&pool, &name).await?,
                        "no live token named `{name}`"
                    );
                    println!("token `{name}` revoked");
                }
            }
            Ok(0)
        }
        Command::Webhooks { action } => {
            let pool = store::connect_and_migrate(&g.database_url, 2).await?;
            match action {
                WebhooksAction::List { job, limit, json } => {
                    let rows = store::webhooks::list(&pool, job.as_deref(), limit).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&rows)?);
                    } else {
                        println!(
                            "{:>8} {:>8} {:>7}  {:<28} {:<8} {:>6} {:>8}  {:<20}  error",
                            "id", "series", "attempt", "job", "state", "http", "ms", "attempted"
                        );
                        for r in &rows {
                            println!(
                                "{:>8} {:>8} {:>7}  {:<28} {:<8} {:>6} {:>8}  {:<20}  {}",
                                r.id,
                                r.series,
                                r.attempt,
                                r.job_id,
                                r.state,
                                r.http_status.map_or("-".into(), |s| s.to_string()),
                                r.latency_ms.map_or("-".into(), |s| s.to_string()),
                                r.attempted_at.as_deref().map_or(
                                    format!("due {}", r.due_at),
                                    |a| a.chars().take(19).collect()
                                ),
                                r.error.as_deref().unwrap_or("")
                            );
                        }
                        eprintln!("{} attempt(s)", rows.len());
                    }
                    Ok(0)
                }
                WebhooksAction::Replay { id } => {
                    use store::webhooks::Replay;
                    match store::webhooks::replay(&pool, &id).await? {
                        Replay::Started {
                            series,
                            job_id,
                            url,
                        } => {
                            println!("delivery {series}: job {job_id} to {url}, due now");
                            Ok(0)
                        }
                        Replay::NotFound => anyhow::bail!("no webhook delivery or job `{id}`"),
                        Replay::NotEnded { job_id, status } => anyhow::bail!(
                            "job `{job_id}` has not ended (status `{status}`): its webhook is sent when it does"
                        ),
                        Replay::NoCallback { job_id } => anyhow::bail!(
                            "job `{job_id}` has no callback_url and was never called back"
                        ),
                    }
                }
            }
        }
        Command::Cache { action } => {
            let pool = store::connect_and_migrate(&g.database_url, 2).await?;
            match action {
                CacheAction::Stats { json } => {
                    let rows = store::cache::stats(&pool).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&rows)?);
                    } else {
                        println!(
                            "{:<24} {:>8} {:>8} {:>8} {:>8} {:>12}",
                            "category", "entries", "pending", "expired", "hits", "saved USD"
                        );
                        for r in &rows {
                            println!(
                                "{:<24} {:>8} {:>8} {:>8} {:>8} {:>12}",
                                r.category,
                                r.entries,
                                r.pending,
                                r.expired,
                                r.hits,
                                r.saved_usd.round_dp(6)
                            );
                        }
                    }
                }
                CacheAction::Clear { category } => {
                    let n = store::cache::clear(&pool, category.as_deref()).await?;
                    match category {
                        Some(c) => println!("cleared {n} cache entries of category {c}"),
                        None => println!("cleared {n} cache entries"),
                    }
                }
            }
            Ok(0)
        }
        Command::Batch { action } => {
            let pool = store::connect_and_migrate(&g.database_url, 4).await?;
            use crate::ops::batch;
            match action {
                BatchAction::List {
                    provider,
                    state,
                    limit,
                    json,
                } => {
                    let rows =
                        batch::list(&pool, provider.as_deref(), state.as_deref(), limit).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&rows)?);
                    } else {
                        println!(
                            "{:<22} {:<10} {:<22} {:<10} {:<11} {:>7} {:>7} {:>7} {:>6} {:>12}",
                            "batch",
                            "provider",
                            "model",
                            "state",
                            "provider",
                            "items",
                            "done",
                            "failed",
                            "age",
                            "USD"
                        );
                        for b in &rows {
                            println!(
                                "{:<22} {:<10} {:<22} {:<10} {:<11} {:>7} {:>7} {:>7} {:>6} {:>12}",
                                b.id,
                                b.provider,
                                b.model,
                                b.state,
                                b.provider_state.as_deref().unwrap_or("-"),
                                b.items,
                                b.items_done,
                                b.failed,
                                batch::age(b.age_secs),
                                b.cost_usd.round_dp(6).to_string()
                            );
                        }
                        eprintln!("{} batch(es)", rows.len());
                    }
                    Ok(0)
                }
                BatchAction::Show { id, json } => {
                    let b = batch::show(&pool, &id).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&b)?);
                    } else {
                        println!("batch          {}", b.id);
                        println!("provider       {} ({})", b.provider, b.model);
                        println!(
                            "state          {} (provider: {} {})",
                            b.state,
                            b.provider_batch_id.as_deref().unwrap_or("-"),
                            b.provider_state.as_deref().unwrap_or("-")
                        );
                        println!(
                            "items          {} ({} handed on; provider: {} succeeded, {} failed)",
                            b.items, b.items_done, b.succeeded, b.failed
                        );
                        println!("cost so far    ${}", b.cost_usd.round_dp(6));
                        println!(
                            "created        {} ({} ago)",
                            b.created_at,
                            batch::age(b.age_secs)
                        );
                        println!(
                            "submitted      {}",
                            b.submitted_at.as_deref().unwrap_or("-")
                        );
                        println!("ended          {}", b.ended_at.as_deref().unwrap_or("-"));
                        if b.malformed_lines > 0 || b.unknown_lines > 0 {
                            println!(
                                "result lines   {} unreadable, {} naming no item (skipped)",
                                b.malformed_lines, b.unknown_lines
                            );
                        }
                        if let Some(e) = &b.error {
                            println!("error          {e}");
                        }
                    }
                    Ok(0)
                }
                BatchAction::Cancel { id } => {
                    let cfg = load()?;
                    let b = batch::cancel(&pool, &cfg, &id).await?;
                    eprintln!(
                        "asked {} to cancel batch {} ({}); a worker records what it answered and sends the rest real-time",
                        b.provider,
                        b.id,
                        b.provider_batch_id.as_deref().unwrap_or("-")
                    );
                    Ok(0)
                }
            }
        }
        Command::Dlq { action } => {
            let pool = store::connect_and_migrate(&g.database_url, 4).await?;
            match action {
                DlqAction::List {
                    reason,
                    all,
                    limit,
                    json,
                } => {
                    let items = crate::ops::dlq::list(&pool, reason.as_deref(), all, limit).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&items)?);
                    } else {
                        println!("{:>6}  {:<20}  {:<28}  reason", "id", "created", "job");
                        for d in &items {
                            let reason: String = d.reason.chars().take(100).collect();
                            println!(
                                "{:>6}  {:<20}  {:<28}  {}{}",
                                d.id,
                                d.created_at,
                                d.job_id.as_deref().unwrap_or("-"),
                                reason,
                                if d.replayed_at.is_some() {
                                    "  (replayed)"
                                } else {
                                    ""
                                }
                            );
                        }
                        eprintln!("{} dead letter(s)", items.len());
                    }
                    Ok(0)
                }
                DlqAction::Show { id, json } => {
                    let d = crate::ops::dlq::show(&pool, id).await?;
                    let body = String::from_utf8_lossy(&d.payload).into_owned();
                    if json {
                        let mut v = serde_json::to_value(&d)?;
                        v["payload"] = serde_json::Value::String(body);
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        println!("dead letter {}", d.id);
                        println!("created    {}", d.created_at);
                        println!("subject    {}", d.subject);
                        println!("source     {}", d.source.as_deref().unwrap_or("-"));
                        println!("job        {}", d.job_id.as_deref().unwrap_or("-"));
                        println!("replayed   {}", d.replayed_at.as_deref().unwrap_or("no"));
                        println!("reason     {}", d.reason);
                        println!("message ({} bytes)\n{}", d.payload.len(), body);
                    }
                    Ok(0)
                }
                DlqAction::Replay { ids, all, reason } => {
                    anyhow::ensure!(all || !ids.is_empty(), "name dead letter ids, or --all");
                    let cfg = load()?;
                    let bus = Bus::connect_configured(&g.nats_url, &cfg.nats).await?;
                    bus.ensure_streams(&cfg).await?;
                    let select = if all {
                        crate::ops::dlq::Select::All { reason }
                    } else {
                        crate::ops::dlq::Select::Ids(ids)
                    };
                    let outcomes = crate::ops::dlq::replay(&pool, &bus, select).await?;
                    let mut missing = 0;
                    for o in &outcomes {
                        match o {
                            crate::ops::dlq::Replay::Replayed { id, job_id } => println!(
                                "{id}: replayed (job {})",
                                job_id.as_deref().unwrap_or("-")
                            ),
                            crate::ops::dlq::Replay::AlreadyReplayed { id } => {
                                println!("{id}: already replayed; not again")
                            }
                            crate::ops::dlq::Replay::NotFound { id } => {
                                missing += 1;
                                println!("{id}: no such dead letter")
                            }
                        }
                    }
                    Ok(if missing > 0 { 1 } else { 0 })
                }
            }
        }
        Command::Prune {
            older_than_days,
            dry_run,
            batch,
        } => {
            anyhow::ensure!(older_than_days > 0, "--older-than-days must be at least 1");
            anyhow::ensure!(batch > 0, "--batch must be at least 1");
            let pool = store::connect_and_migrate(&g.database_url, 2).await?;
            let p = crate::ops::prune::run(&pool, older_than_days, dry_run, batch).await?;
            println!(
                "{} {} jobs, {} calls, {} steps, {} results, {} ratings, {} webhook deliveries, {} dead letters, {} provider batches with {} items (ended more than {older_than_days} days ago), {} expired cache entries; {} monthly calls partitions {}",
                if dry_run { "would delete" } else { "deleted" },
                p.jobs,
                p.calls,
                p.steps,
                p.results,
                p.feedback,
                p.webhook_deliveries,
                p.dead_letters,
                p.batches,
                p.batch_items,
                p.cache_entries,
                p.calls_partitions,
                if dry_run { "would be dropped whole" } else { "dropped whole" }
            );
            Ok(0)
        }
        Command::Feedback {
            job_id,
            score,
            comment,
        } => {
            let pool = store::connect_and_migrate(&g.database_url, 2).await?;
            let id =
                crate::ops::feedback::record(&pool, &job_id, score, comment.as_deref()).await?;
            println!("feedback {id} recorded: job {job_id} scored {score}");
            Ok(0)
        }
        Command::Review { action } => {
            let cfg = load()?;
            let pool = store::connect_and_migrate(&g.database_url, 4).await?;
            match action {
                ReviewAction::List { category, json } => {
                    let items = review::list(&pool, category.as_deref()).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&items)?);
                    } else {
                        println!("{:<28} {:<12} {:>9}  reason", "job", "category", "waiting");
                        for i in &items {
                            println!(
                                "{:<28} {:<12} {:>8}s  {}",
                                i.job_id,
                                i.category,
                                i.waiting_secs,
                                i.reason.as_deref().unwrap_or("")
                            );
                        }
                        eprintln!("{} job(s) waiting for review", items.len());
                    }
                    Ok(0)
                }
                ReviewAction::Show { id, json } => {
                    let d = review::show(&pool, &id).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&d)?);
                    } else {
                        print!("{}", d.render());
                    }
                    Ok(0)
                }
                ReviewAction::Resolve {
                    id,
                    output,
                    reject,
                    reason,
                    by,
                } => {
                    let how = match (output, reject) {
                        (Some(text), false) => review::Resolution::Output(text),
                        _ => review::Resolution::Reject(reason),
                    };
                    let status = match &how {
                        review::Resolution::Output(_) => crate::store::JobStatus::Succeeded,
                        review::Resolution::Reject(_) => crate::store::JobStatus::Failed,
                    };
                    let category = review::resolve(&pool, &id, how, &by).await?;
                    // The done event is best effort: the database already holds the outcome.
                    if let Ok(bus) = Bus::connect_configured(&g.nats_url, &cfg.nats).await {
                        bus.publish_done(&crate::bus::DoneEvent {
                            job_id: id.clone(),
                            category,
                            status,
                        })
                        .await;
                        bus.flush().await;
                    }
                    println!("job {id} {status}");
                    Ok(0)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global(database_url: &str) -> Global {
        Global {
            config: None,
            database_url: database_url.into(),
            nats_url: DEFAULT_NATS_URL.into(),
        }
    }

    #[test]
    fn url_files_apply_unless_the_flag_or_the_variable_gives_the_url() {
        let dir = std::env::temp_dir().join(format!("sy-cli-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("url");
        std::fs::write(&file, "postgres://app:pw@db/sy\n").unwrap();
        let path = file.display().to_string();
        let only_file = |k: &str| (k == "DATABASE_URL_FILE").then(|| path.clone());

        let g = global(DEFAULT_DATABASE_URL)
            .with_secret_files_from(&only_file)
            .unwrap();
        assert_eq!(g.database_url, "postgres://app:pw@db/sy");
        assert_eq!(g.nats_url, DEFAULT_NATS_URL);
        assert!(!format!("{g:?}").contains(":pw@"), "{g:?}");

        // A flag beats the file.
        let g = global("postgres://flag@db/sy")
            .with_secret_files_from(&only_file)
            .unwrap();
        assert_eq!(g.database_url, "postgres://flag@db/sy");

        // The variable and its file: an error.
        let both = |k: &str| match k {
            "DATABASE_URL_FILE" => Some(path.clone()),
            "DATABASE_URL" => Some("postgres://env@db/sy".into()),
            _ => None,
        };
        assert!(global("postgres://env@db/sy")
            .with_secret_files_from(&both)
            .is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
