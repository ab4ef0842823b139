//! `switchyard-bench chaos`: jobs through several worker processes while a
//! random worker is killed with SIGKILL every few seconds (and restarted),
//! nats-server is killed and restarted once and PostgreSQL is stopped the
//! hard way and restarted once. It runs its own PostgreSQL and nats-server
//! (see [`switchyard_servers`]) so it can do that freely, and the simulator
//! in-process, so its ledger of answered requests outlives every worker.
//!
//! Afterwards it checks, in SQL and against the ledger (every request is
//! tagged with its job, step and attempt), that every job ended exactly once
//! and every answered request has its `calls` row.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use switchyard::bus::Bus;
use switchyard::config::Config;
use switchyard::demo::sample_jobs_with;
use switchyard::enqueue::{publish_jobs, Outgoing};
use switchyard::sim::{reconcile, SimProfile, SimServer};
use switchyard::store::JobStatus;
use switchyard_servers::{PrivateNats, PrivatePg};

/// What `switchyard-bench chaos` runs.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub jobs: usize,
    pub processes: usize,
    /// Jobs published per second (None: all at once).
    pub publish_rate: Option<f64>,
    /// A random worker is killed after a random pause in this range.
    pub kill_every: (Duration, Duration),
    /// How long nats-server stays dead (0: no NATS restart).
    pub nats_down: Duration,
    /// How long PostgreSQL stays stopped (0: no Postgres restart).
    pub pg_down: Duration,
    /// The workers' `nats.ack_wait_secs`: how soon a killed worker's
    /// messages are delivered again.
    pub ack_wait_secs: u64,
    /// Give up waiting for the jobs after this long.
    pub timeout: Duration,
    /// The `switchyard` binary the workers run.
    pub worker_exe: PathBuf,
    /// Give the jobs of batch-capable categories (the shipped `overnight`)
    /// far deadlines, so they go through the providers' batch APIs while
    /// workers are killed during collection, submission, polling and ingest.
    pub batch: bool,
}

/// What the run found. The targets: `lost`, `duplicated_results`,
/// `unrecorded_calls` and `phantom_calls` 0, `terminal` = `published`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChaosFigures {
    pub published: usize,
    pub terminal: usize,
    /// Published but not terminal when the run ended.
    pub lost: usize,
    /// Jobs that ended more than once (two results, or a result and a dead
    /// letter, ...).
    pub duplicated_results: usize,
    /// Requests the simulator answered with no `calls` row for their
    /// attempt (untagged requests count here too).
    pub unrecorded_calls: usize,
    /// `ok` rows for an attempt the simulator never answered with a 200.
    pub phantom_calls: usize,
    /// Terminal jobs that ended in no recorded way (succeeded without a
    /// result, dead without a dead letter).
    pub inconsistent: usize,
    /// Rollup keys where `call_rollups` differs from the calls (each side
    /// counted), and categories whose job counts differ: 0 when exact.
    pub rollup_mismatches: usize,
    /// Calls the rolled rows covered when they were compared (all of them
    /// once the roller caught up).
    pub rolled_calls: i64,
    /// Worker processes killed with SIGKILL (and restarted).
    pub kills: usize,
    /// Worker processes that exited by themselves (say, started while a
    /// server was down) and were restarted.
    pub exits: usize,
    pub nats_restarts: usize,
    pub pg_restarts: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub needs_review: usize,
    pub dead: usize,
    /// Requests the simulator answered (any status).
    pub answered: usize,
    pub calls_rows: usize,
    /// Attempts whose worker died before recording the answer: outcome
    /// `unknown`, at the reserved cost.
    pub unknown_calls: usize,
    /// The highest attempt number of a real-time call: a call made at a
    /// message's n-th delivery has attempt n or more, so this is how close
    /// a step came to `max_deliver` (where it would become a dead letter).
    pub max_attempt: i32,
    pub unknown_cost_usd: Decimal,
    pub total_cost_usd: Decimal,
    /// Steps answered `ok` more than once (paid twice; the job still ended once).
    pub duplicate_answers: usize,
    /// Batch items collected, processed by the simulator without a `calls`
    /// row, and recorded without a processed item (with `--batch`).
    pub batch_items: usize,
    pub batch_unrecorded: usize,
    pub batch_phantom: usize,
    /// Provider batches submitted.
    pub batches: usize,
    pub elapsed_s: f64,
    pub jobs_per_sec: f64,
}

/// The environment that points a worker process at these servers, this
/// prefix and the simulator, with no API keys.
/// What the worker processes of a chaos or cluster run get beside
/// [`sim_worker_env`]: `CHAOS_WORKER_LOG` as their `RUST_LOG`, the run's ack
/// wait, and `provider` (`KEY`, value) overrides for every provider.
pub fn killable_workers(
    env: &mut Vec<(String, String)>,
    cfg: &Config,
    ack_wait_secs: u64,
    provider: &[(&str, &str)],
) {
    if let Ok(level) = std::env::var("CHAOS_WORKER_LOG") {
        env.push(("RUST_LOG".into(), level));
    }
    env.push((
        "SWITCHYARD_NATS__ACK_WAIT_SECS".into(),
        ack_wait_secs.to_string(),
    ));
    for p in cfg.providers.keys() {
        let up = p.to_uppercase();
        for (k, v) in provider {
            env.push((format!("SWITCHYARD_PROVIDERS__{up}__{k}"), v.to_string()));
        }
    }
}

pub fn sim_worker_env(
    cfg: &Config,
    database_url: &str,
    nats_url: &str,
    prefix: &str,
    sim_url: &str,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), database_url.into()),
        ("NATS_URL".into(), nats_url.into()),
        // These URLs, not files the bench itself was given (empty is unset;
        // both set would be an error).
        ("DATABASE_URL_FILE".into(), String::new()),
        ("NATS_URL_FILE".into(), String::new()),
        ("SWITCHYARD_NATS__PREFIX".into(), prefix.into()),
        ("RUST_LOG".into(), "warn".into()),
    ];
    for p in cfg.providers.keys() {
        let up = p.to_uppercase();
        env.push((
            format!("SWITCHYARD_PROVIDERS__{up}__BASE_URL"),
            sim_url.into(),
        ));
        env.push((
            format!("SWITCHYARD_PROVIDERS__{up}__API_KEY_ENV"),
            "SWITCHYARD_BENCH_NO_KEY".into(),
        ));
    }
    env
}

/// Worker processes; killed on drop.
pub(crate) struct Fleet {
    pub(crate) exe: PathBuf,
    /// The config file given to the bench, if any (else the workers use the
    /// default or the shipped one, like the bench did).
    pub(crate) config: Option<PathBuf>,
    pub(crate) env: Vec<(String, String)>,
    /// Worker `i`'s own variables, on top of `env` (may be shorter).
    pub(crate) own_env: Vec<Vec<(String, String)>>,
    pub(crate) logs: PathBuf,
    pub(crate) children: Vec<Child>,
}

impl Fleet {
    /// Start `n` workers of `exe` (with `config`, if any), each with `env`
    /// and its own variables from `own_env`, logging to a fresh directory
    /// (random name under `$TMPDIR` starting with `log_prefix`, mode 0700,
    /// kept after the run).
    pub(crate) fn start(
        exe: PathBuf,
        config: Option<&Path>,
        env: Vec<(String, String)>,
        own_env: Vec<Vec<(String, String)>>,
        log_prefix: &str,
        n: usize,
    ) -> Result<Self> {
        let logs = tempfile::Builder::new()
            .prefix(log_prefix)
            .tempdir()
            .context("creating the worker log directory")?
            .keep();
        let mut fleet = Fleet {
            exe,
            config: config.map(Path::to_path_buf),
            env,
            own_env,
            logs,
            children: Vec::new(),
        };
        for i in 0..n {
            let c = fleet.spawn(i)?;
            fleet.children.push(c);
        }
        Ok(fleet)
    }

    pub(crate) fn spawn(&self, i: usize) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("worker-{i}.log")))
            .context("opening a worker log")?;
        let mut cmd = Command::new(&self.exe);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd.arg("worker")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(
                self.own_env
                    .get(i)
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting a worker process")
    }

    /// SIGKILL worker `i` and start it again.
    fn kill_and_restart(&mut self, i: usize) -> Result<()> {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
        self.children[i] = self.spawn(i)?;
        Ok(())
    }

    /// Restart workers that exited by themselves; returns how many.
    pub(crate) fn revive(&mut self) -> Result<usize> {
        let mut n = 0;
        for i in 0..self.children.len() {
            if self.children[i].try_wait()?.is_some() {
                self.children[i] = self.spawn(i)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// SIGTERM every worker and wait for them to drain (SIGKILL after `grace`).
    pub(crate) fn stop(&mut self, grace: Duration) {
        for c in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + grace;
        for c in &mut self.children {
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Publish `jobs` at `rate` per second (all at once if None), retrying a
/// chunk whose publication failed (NATS down): the same ids are dropped as
/// duplicates, so a retry never doubles a job.
pub(crate) async fn publish_paced(
    bus: Bus,
    jobs: Vec<Outgoing>,
    rate: Option<f64>,
    done: Arc<AtomicUsize>,
) {
    let chunk = match rate {
        Some(r) => ((r / 10.0).ceil() as usize).max(1),
        None => 1000,
    };
    let started = Instant::now();
    for (i, part) in jobs.chunks(chunk).enumerate() {
        if let Some(r) = rate {
            let due = started + Duration::from_secs_f64((i * chunk) as f64 / r);
            tokio::time::sleep_until(due.into()).await;
        }
        loop {
            match publish_jobs(&bus, part, None).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "publishing failed; publishing the same ids again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        done.fetch_add(part.len(), Ordering::SeqCst);
    }
}

pub(crate) async fn count_terminal(pool: &PgPool) -> Option<usize> {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE status = ANY($1::text[])")
        .bind(switchyard::store::JobStatus::terminal_names())
        .fetch_one(pool)
        .await
        .ok()
        .map(|n| n as usize)
}

pub async fn run(
    cfg: Config,
    config_path: Option<&Path>,
    opts: &ChaosOptions,
) -> Result<ChaosFigures> {
    anyhow::ensure!(opts.processes > 0, "--processes must be at least 1");
    let pg = tokio::task::spawn_blocking(PrivatePg::start)
        .await?
        .context("starting a private PostgreSQL for the chaos run")?;
    let mut nats = tokio::task::spawn_blocking(PrivateNats::start)
        .await?
        .context("starting a private nats-server for the chaos run")?;
    let database_url = pg.url("switchyard");
    let pool = switchyard::store::connect_and_migrate(&database_url, 4).await?;
    // Changes turn late after 2 s and rolls cover calls that old: both
    // rollup paths race the kills and restarts.
    switchyard::store::rollups::lower_settle(&pool, "2 seconds").await?;

    // The demo's error mix (500s, a model that refuses 10%, cached prompts)
    // and a per-model limit that draws some 429s.
    let mut profile = SimProfile::demo();
    profile.rpm = 20_000;
    for f in profile.formats.values_mut() {
        f.rpm = 20_000;
    }
    let sim = SimServer::start("127.0.0.1:0", profile).await?;
    let prefix = "chaos";
    let mut env = sim_worker_env(&cfg, &database_url, &nats.url(), prefix, &sim.base_url());
    // The configured limits would make this a rate-limit test: lift them.
    // A short provider timeout: a killed worker's call counts as under way
    // (and holds its step) for that long plus a margin.
    killable_workers(
        &mut env,
        &cfg,
        opts.ack_wait_secs,
        &[
            ("TIMEOUT_SECS", "10"),
            // A killed worker's batch passes on after 10 s.
            ("BATCH_LEASE_SECS", "10"),
            ("RPM", "1000000"),
            ("TPM", "1000000000"),
            ("INPUT_TPM", "1000000000"),
            ("OUTPUT_TPM", "1000000000"),
        ],
    );

    let bus = Bus::connect(&nats.url(), prefix).await?;
    let mut run_cfg = cfg.clone();
    run_cfg.nats.prefix = prefix.into();
    bus.ensure_streams(&run_cfg).await?;

    let mut fleet = Fleet::start(
        opts.worker_exe.clone(),
        config_path,
        env,
        Vec::new(),
        "switchyard-chaos-",
        opts.processes,
    )?;
    let logs = fleet.logs.clone();

    let jobs = sample_jobs_with(&run_cfg, "chaos", opts.jobs, opts.batch)?;
    let published = jobs.len();
    eprintln!(
        "bench chaos: {published} jobs, {} worker processes, a SIGKILL every {:.0}-{:.0}s, \
         NATS down {:.0}s at 30%, Postgres down {:.0}s at 60%; worker logs in {}",
        opts.processes,
        opts.kill_every.0.as_secs_f64(),
        opts.kill_every.1.as_secs_f64(),
        opts.nats_down.as_secs_f64(),
        opts.pg_down.as_secs_f64(),
        logs.display()
    );
    let started = Instant::now();
    let sent = Arc::new(AtomicUsize::new(0));
    let tasks = switchyard::tasks::Tasks::new();
    let publisher = tasks.spawn(publish_paced(
        bus.clone(),
        jobs,
        opts.publish_rate,
        sent.clone(),
    ));

    let mut figures = ChaosFigures {
        published,
        ..Default::default()
    };
    let pause = |(lo, hi): (Duration, Duration)| {
        lo + Duration::from_secs_f64(fastrand::f64() * hi.saturating_sub(lo).as_secs_f64())
    };
    let mut next_kill = Instant::now() + pause(opts.kill_every);
    let mut nats_due = !opts.nats_down.is_zero();
    let mut pg_due = !opts.pg_down.is_zero();
    let deadline = Instant::now() + opts.timeout;
    let mut last_report = Instant::now();
    let mut terminal = 0;
    while Instant::now() < deadline {
        if let Some(t) = count_terminal(&pool).await {
            terminal = t;
        }
        if terminal >= published && sent.load(Ordering::SeqCst) >= published {
            break;
        }
        figures.exits += fleet.revive()?;
        if Instant::now() >= next_kill {
            let i = fastrand::usize(..fleet.children.len());
            fleet.kill_and_restart(i)?;
            figures.kills += 1;
            next_kill = Instant::now() + pause(opts.kill_every);
        }
        if nats_due && terminal * 10 >= published * 3 {
            nats_due = false;
            eprintln!("bench chaos: killing nats-server ({terminal} jobs terminal)");
            nats.kill();
            tokio::time::sleep(opts.nats_down).await;
            nats = tokio::task::spawn_blocking(move || nats.run().map(|_| nats))
                .await?
                .context("restarting nats-server")?;
            figures.nats_restarts += 1;
            eprintln!("bench chaos: nats-server is back");
        }
        if pg_due && terminal * 10 >= published * 6 {
            pg_due = false;
            eprintln!("bench chaos: stopping PostgreSQL ({terminal} jobs terminal)");
            let pg_ref = &pg;
            tokio::task::block_in_place(|| pg_ref.ctl_stop()).context("stopping PostgreSQL")?;
            tokio::time::sleep(opts.pg_down).await;
            tokio::task::block_in_place(|| pg_ref.ctl_start()).context("restarting PostgreSQL")?;
            figures.pg_restarts += 1;
            eprintln!("bench chaos: PostgreSQL is back");
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "bench chaos: {terminal}/{published} terminal, {} kills, {:.0}s",
                figures.kills,
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    publisher.abort();
    // Let the workers drain: in-flight calls finish and are recorded.
    tokio::task::block_in_place(|| fleet.stop(Duration::from_secs(30)));

    reconcile_into(&pool, &sim, &mut figures).await?;
    figures.elapsed_s = elapsed.as_secs_f64();
    figures.jobs_per_sec = figures.terminal as f64 / elapsed.as_secs_f64().max(1e-9);

    pool.close().await;
    sim.stop();
    drop(fleet);
    drop(nats);
    drop(pg);
    if figures.passed() && std::env::var_os("CHAOS_WORKER_LOG").is_none() {
        let _ = std::fs::remove_dir_all(&logs);
    }
    Ok(figures)
}

/// Fill in `f` (whose `published` is set) from the database and the
/// simulator's ledger: how the jobs ended, and every answered request
/// against its `calls` row.
pub(crate) async fn reconcile_into(
    pool: &PgPool,
    sim: &SimServer,
    f: &mut ChaosFigures,
) -> Result<()> {
    let status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status")
            .fetch_all(pool)
            .await?;
    for (s, n) in status {
        let n = n as usize;
        match JobStatus::parse(&s) {
            Some(JobStatus::Succeeded) => f.succeeded = n,
            Some(JobStatus::Failed) => f.failed = n,
            Some(JobStatus::NeedsReview) => f.needs_review = n,
            Some(JobStatus::Dead) => f.dead = n,
            _ => {}
        }
    }
    f.terminal = f.succeeded + f.failed + f.needs_review + f.dead;
    f.lost = f.published.saturating_sub(f.terminal);
    // A job ends once: a result (succeeded), a dead letter (dead), or its
    // status with the reason (failed, needs_review).
    let (twice, never): (i64, i64) = sqlx::query_as(
        "WITH ends AS (
             SELECT j.id, j.status,
                    (SELECT count(*) FROM results r WHERE r.job_id = j.id)
                  + (SELECT count(*) FROM dead_letters d WHERE d.job_id = j.id AND d.replayed_at IS NULL)
                  + CASE WHEN j.status = ANY($1::text[]) THEN 1 ELSE 0 END AS n
             FROM jobs j WHERE j.status = ANY($2::text[]))
         SELECT count(*) FILTER (WHERE n > 1), count(*) FILTER (WHERE n = 0) FROM ends",
    )
    .bind([JobStatus::Failed.as_str(), JobStatus::NeedsReview.as_str()])
    .bind(JobStatus::terminal_names())
    .fetch_one(pool)
    .await?;
    f.duplicated_results = twice as usize;
    f.inconsistent = never as usize;
    // Real-time calls against the real-time requests; batch items apart.
    let rows: Vec<(String, i32, i32, String)> =
        sqlx::query_as("SELECT job_id, step, attempt, outcome FROM calls WHERE batch_id IS NULL")
            .fetch_all(pool)
            .await?;
    let (unknown, unknown_cost, total_cost): (i64, Option<Decimal>, Option<Decimal>) =
        sqlx::query_as(
            "SELECT count(*) FILTER (WHERE outcome = 'unknown'),
                    sum(cost_usd) FILTER (WHERE outcome = 'unknown'), sum(cost_usd) FROM calls",
        )
        .fetch_one(pool)
        .await?;
    let ledger = sim.ledger();
    let (batch_ledger, ledger): (Vec<_>, Vec<_>) =
        ledger.into_iter().partition(|e| e.batch.is_some());
    let rec = reconcile(&ledger, &rows);
    let (items, unrecorded, phantom) =
        crate::batch::reconcile_batches(pool, &batch_ledger, "%").await?;
    f.batch_items = items;
    f.batch_unrecorded = unrecorded;
    f.batch_phantom = phantom;
    f.batches = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM provider_batches WHERE provider_batch_id IS NOT NULL",
    )
    .fetch_one(pool)
    .await? as usize;
    // Let the roller catch up first, so the check compares rolled rows,
    // not the raw tail with itself.
    f.rolled_calls = switchyard::store::rollups::roll_until_covered(pool, Duration::from_secs(60))
        .await?
        .0;
    f.rollup_mismatches = switchyard::store::rollups::mismatches(pool).await?.len();
    f.answered = rec.answered;
    f.unrecorded_calls = rec.unrecorded;
    f.phantom_calls = rec.phantom;
    f.duplicate_answers = rec.duplicate_answers;
    f.calls_rows = rows.len();
    f.unknown_calls = unknown as usize;
    f.max_attempt = rows.iter().map(|r| r.2).max().unwrap_or(0);
    f.unknown_cost_usd = unknown_cost.unwrap_or_default();
    f.total_cost_usd = total_cost.unwrap_or_default();
    if rec.duplicate_answers > 0 {
        // Show how the twice-answered steps came about.
        let twice: Vec<(String, i32, i32, String, String, i32)> = sqlx::query_as(
            "SELECT c.job_id, c.step, c.attempt, c.provider,
                    to_char(c.created_at, 'HH24:MI:SS.MS'), c.latency_ms
             FROM calls c JOIN (SELECT job_id, step FROM calls WHERE outcome = 'ok'
                                GROUP BY job_id, step HAVING count(*) > 1 LIMIT 5) d
               ON d.job_id = c.job_id AND d.step = c.step
             ORDER BY c.job_id, c.step, c.attempt",
        )
        .fetch_all(pool)
        .await?;
        for (job, step, attempt, provider, at, latency) in twice {
            eprintln!(
                "bench chaos: answered twice: {job} step {step} attempt {attempt} on {provider} at {at} ({latency} ms)"
            );
        }
    }
    Ok(())
}

impl ChaosFigures {
    /// Whether the run met every target.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.terminal == self.published
            && self.duplicated_results == 0
            && self.unrecorded_calls == 0
            && self.phantom_calls == 0
            && self.inconsistent == 0
            && self.rollup_mismatches == 0
            && self.batch_unrecorded == 0
            && self.batch_phantom == 0
    }

    pub fn summary(&self) -> String {
        format!(
            "jobs published            {}\n\
             jobs terminal             {} ({:.2}%): {} succeeded, {} failed, {} needs review, {} dead\n\
             lost                      {}\n\
             duplicated results        {}\n\
             ended in no recorded way  {}\n\
             requests answered (sim)   {}\n\
             calls rows                {} ({} unknown, ${} reserved; highest attempt {}; {} rolled)\n\
             unrecorded calls          {}\n\
             phantom calls             {}\n\
             steps answered twice      {}\n\
             batches / batch items     {} / {} ({} unrecorded, {} phantom)\n\
             kills (SIGKILL)           {} (+{} restarts after an exit)\n\
             NATS / Postgres restarts  {} / {}\n\
             total cost                ${}\n\
             elapsed                   {:.1}s ({:.0} jobs/s)\n\
             verdict                   {}",
            self.published,
            self.terminal,
            100.0 * self.terminal as f64 / self.published.max(1) as f64,
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
            self.unknown_cost_usd.round_dp(6),
            self.max_attempt,
            self.rolled_calls,
            self.unrecorded_calls,
            self.phantom_calls,
            self.duplicate_answers,
            self.batches,
            self.batch_items,
            self.batch_unrecorded,
            self.batch_phantom,
            self.kills,
            self.exits,
            self.nats_restarts,
            self.pg_restarts,
            self.total_cost_usd.round_dp(6),
            self.elapsed_s,
            self.jobs_per_sec,
            if self.passed() {
                "PASS: nothing lost, nothing doubled, every answer recorded"
            } else {
                "FAIL"
            }
        )
    }
}
