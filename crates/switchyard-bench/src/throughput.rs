//! `switchyard-bench`: end-to-end throughput (first publish → last result
//! committed) with a zero-latency in-process provider and with the HTTP
//! simulator, next to the raw JetStream ceiling (publish → consume → ack of
//! the same number of same-size messages) measured in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use sqlx::PgPool;

use switchyard::bus::Bus;
use switchyard::config::{Config, ProviderKind, RouteConfig};
use switchyard::demo::{on_simulator, sample_jobs};
use switchyard::enqueue::{publish_jobs, Outgoing};
use switchyard::pipeline::worker::{self, WorkerOptions};
use switchyard::sim::{SimProfile, SimServer};

#[derive(Debug, Clone, Serialize)]
pub struct BenchFigures {
    pub jobs: usize,
    pub inproc_jobs_per_sec: f64,
    pub http_jobs_per_sec: f64,
    pub jetstream_ceiling_msgs_per_sec: f64,
    /// In-process throughput as a share of the JetStream ceiling.
    pub inproc_to_ceiling_ratio: f64,
    pub http_to_ceiling_ratio: f64,
    pub inproc_secs: f64,
    pub http_secs: f64,
    pub ceiling_secs: f64,
    pub avg_payload_bytes: usize,
    pub peak_rss_mb: f64,
    /// CPU time of the whole machine's share in the in-process run (this
    /// process, every nats-server and every postgres process, from
    /// `/proc`), per job, in milliseconds ...
    pub cpu_ms_per_job: f64,
    /// ... and split by process.
    pub cpu_split_ms_per_job: CpuSplit,
    /// Postgres's own counters over the in-process run, per job
    /// (`pg_stat_database` before and after): committed transactions,
    /// rows inserted, rows updated.
    pub pg_commits_per_job: f64,
    pub pg_rows_inserted_per_job: f64,
    pub pg_rows_updated_per_job: f64,
    /// Share of the jobs whose first call went straight to an idle lane of
    /// the dispatcher's process (no calls-stream message; see
    /// `dispatcher.direct_calls`), in each run.
    pub inproc_direct_share: f64,
    pub http_direct_share: f64,
}

/// What one run through a worker measured.
pub(crate) struct Run {
    pub secs: f64,
    /// Messages the run's calls stream stored.
    pub calls_published: u64,
}

impl Run {
    /// Share of `jobs` single-call jobs whose call the stream never saw.
    fn direct_share(&self, jobs: usize) -> f64 {
        if jobs == 0 {
            return 0.0;
        }
        (1.0 - self.calls_published as f64 / jobs as f64).max(0.0)
    }
}

/// CPU time per job of each process family, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuSplit {
    pub switchyard: f64,
    pub nats_server: f64,
    pub postgres: f64,
}

impl CpuSplit {
    /// CPU seconds used so far by this process, by every `nats-server` and
    /// by every `postgres` process on the machine (utime + stime from
    /// `/proc/<pid>/stat`, with the children each has waited for, so an
    /// exited postgres backend stays counted in its postmaster). Run it on
    /// a quiet machine: every postgres and nats-server process counts.
    pub fn now() -> Self {
        let ticks = 100.0; // USER_HZ on Linux
        let me = std::process::id().to_string();
        let mut out = Self::default();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in dir.flatten() {
            let pid = e.file_name().to_string_lossy().to_string();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ...`: comm may hold spaces; split after the last `)`.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let comm = head.split_once('(').map_or("", |(_, c)| c);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // After `)`: state is field 0; utime and stime are fields 11
            // and 12, cutime and cstime (children waited for: a postgres
            // backend that exited counts in its postmaster's) 13 and 14.
            let cpu = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let secs = (cpu(11) + cpu(12) + cpu(13) + cpu(14)) / ticks;
            if pid == me {
                out.switchyard += secs;
            } else if comm == "nats-server" {
                out.nats_server += secs;
            } else if comm == "postgres" {
                out.postgres += secs;
            }
        }
        out
    }

    /// Milliseconds per job between `self` (before) and `after`.
    pub fn per_job(&self, after: &Self, jobs: usize) -> Self {
        let per = |a: f64, b: f64| (b - a) * 1000.0 / jobs.max(1) as f64;
        Self {
            switchyard: per(self.switchyard, after.switchyard),
            nats_server: per(self.nats_server, after.nats_server),
            postgres: per(self.postgres, after.postgres),
        }
    }

    pub fn total(&self) -> f64 {
        self.switchyard + self.nats_server + self.postgres
    }
}

/// `pg_stat_database`'s committed transactions, rows inserted and updated
/// of the current database, after asking this backend to flush its own.
async fn pg_counters(pool: &PgPool) -> Result<(i64, i64, i64)> {
    let _ = sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await;
    Ok(sqlx::query_as(
        "SELECT xact_commit, tup_inserted, tup_updated FROM pg_stat_database
         WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

/// Peak resident set size of this process (VmHWM), in MiB.
pub fn peak_rss_mb() -> f64 {
    proc_status_mb("VmHWM:")
}

/// A size line of `/proc/self/status` (`VmRSS:`, `VmHWM:`), in MiB.
pub fn proc_status_mb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn vacuum(pool: &PgPool) {
    if let Err(e) = sqlx::query("VACUUM ANALYZE jobs, calls, results, steps")
        .execute(pool)
        .await
    {
        tracing::warn!(error = %e, "VACUUM before the bench failed; figures may suffer from dead rows");
    }
}

/// Serve every category by a single call to its route's first model, with no
/// A/B split and no classifier, so a job is one publish, one call and one
/// result, comparable with the JetStream ceiling.
fn single_routes(cfg: &mut Config) {
    for cat in cfg.categories.values_mut() {
        let first = cat.route.models()[0].to_string();
        cat.route = RouteConfig::Single { target: first };
        cat.variant = None;
    }
    cfg.classifier = None;
}

/// Remove the limits that would make the bench measure the lane's rate
/// limiter instead of the system.
pub(crate) fn unthrottled(cfg: &mut Config) {
    single_routes(cfg);
    for p in cfg.providers.values_mut() {
        p.rpm = 100_000_000;
        p.tpm = u32::MAX;
        p.input_tpm = None;
        p.output_tpm = None;
        p.max_concurrency = p.max_concurrency.max(128);
    }
    for m in cfg.models.values_mut() {
        (m.rpm, m.tpm, m.input_tpm, m.output_tpm) = (None, None, None, None);
    }
}

pub(crate) async fn run_pipeline(
    cfg: Config,
    pool: &PgPool,
    nats_url: &str,
    jobs: &[Outgoing],
    run_prefix: &str,
) -> Result<Run> {
    let bus = Bus::connect_configured(nats_url, &cfg.nats).await?;
    bus.delete_streams().await;
    let cfg = Arc::new(cfg);
    let handle = worker::start(
        cfg.clone(),
        pool.clone(),
        bus.clone(),
        WorkerOptions::default(),
    )
    .await?;
    let done = bus
        .client
        .subscribe(format!("{}.done.>", cfg.nats.prefix))
        .await?;
    let started = Instant::now();
    publish_jobs(&bus, jobs, None).await?;
    let finished = wait_done(done, pool, run_prefix, jobs.len(), Duration::from_secs(600)).await?;
    anyhow::ensure!(finished, "bench run did not finish within 10 minutes");
    let secs = started.elapsed().as_secs_f64();
    let calls_published = match bus.js.get_stream(bus.names.calls_stream()).await {
        Ok(mut st) => st.info().await.map_or(0, |i| i.state.last_sequence),
        Err(_) => 0,
    };
    handle.shutdown().await;
    bus.delete_streams().await;
    Ok(Run {
        secs,
        calls_published,
    })
}

/// Wait until `n` jobs whose ids start with `prefix` are finished: by their
/// done events (published after each job's commit), so the wait costs the
/// database nothing while the run is measured; the count is then confirmed
/// in Postgres. Postgres is also asked once a second, in case events were
/// lost (they are best effort). False on timeout.
pub(crate) async fn wait_done(
    mut done: async_nats::Subscriber,
    pool: &PgPool,
    prefix: &str,
    n: usize,
    timeout: Duration,
) -> Result<bool> {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = std::collections::HashSet::with_capacity(n);
    let mut ask_at = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut asked_at_seen = usize::MAX;
    loop {
        let all_seen = seen.len() >= n && seen.len() != asked_at_seen;
        if all_seen || tokio::time::Instant::now() >= ask_at {
            asked_at_seen = seen.len();
            let finished = switchyard::store::jobs::count_finished_prefix(pool, prefix).await?;
            if finished as usize >= n {
                return Ok(true);
            }
            ask_at = tokio::time::Instant::now() + Duration::from_secs(1);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        let until = ask_at.min(deadline);
        match tokio::time::timeout_at(until, done.next()).await {
            Ok(Some(m)) => {
                if let Ok(ev) = serde_json::from_slice::<switchyard::bus::DoneEvent>(&m.payload) {
                    if ev.job_id.starts_with(prefix) {
                        seen.insert(ev.job_id);
                    }
                }
            }
            Ok(None) => ask_at = tokio::time::Instant::now(),
            Err(_) => {}
        }
    }
}

/// Publish, consume and ack `n` messages of `size` bytes on a bare stream.
async fn jetstream_ceiling(
    nats_url: &str,
    stream_name: &str,
    n: usize,
    size: usize,
) -> Result<f64> {
    // The same URLs, TLS and credentials as every other connection.
    let sec = switchyard::bus::connect::NatsSecurity::from_process_env(&Default::default())?;
    let client = switchyard::bus::connect::connect(nats_url, &sec).await?;
    let js = jetstream::new(client);
    let _ = js.delete_stream(stream_name).await;
    let subject = format!("{}.x", stream_name.to_ascii_lowercase());
    let s = js
        .create_stream(stream::Config {
            name: stream_name.to_string(),
            subjects: vec![subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating stream: {e}"))?;
    let consumer: consumer::PullConsumer = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("ceiling".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating consumer: {e}"))?;
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let publisher = {
        let js = js.clone();
        let subject = subject.clone();
        switchyard::tasks::Tasks::new().spawn(async move {
            let mut pending = FuturesUnordered::new();
            for i in 0..n {
                if pending.len() >= 512 {
                    if let Some(r) = pending.next().await {
                        r?;
                    }
                }
                let ack = js
                    .send_publish(
                        subject.clone(),
                        jetstream::message::PublishMessage::build()
                            .payload(payload.clone())
                            .message_id(format!("c{i}")),
                    )
                    .await?;
                pending.push(async move { ack.await });
            }
            while let Some(r) = pending.next().await {
                r?;
            }
            anyhow::Ok(())
        })
    };
    let mut consumed = 0;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    while consumed < n {
        let m = tokio::time::timeout(Duration::from_secs(60), messages.next())
            .await
            .context("ceiling consumer stalled")?
            .context("ceiling consumer ended")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        consumed += 1;
    }
    publisher.await??;
    let secs = started.elapsed().as_secs_f64();
    let _ = js.delete_stream(stream_name).await;
    Ok(secs)
}

pub async fn run(cfg: Config, pool: PgPool, nats_url: &str, n: usize) -> Result<BenchFigures> {
    let tag = &switchyard::ids::new_job_id()[..8];
    let base = format!("{}-bench-{tag}", cfg.nats.prefix);
    // Start from clean tables: where autovacuum is off (as on the
    // development machines), the dead rows earlier runs left behind would
    // slow every index lookup and make runs incomparable.
    vacuum(&pool).await;

    // 1. In-process provider.
    let mut c1 = cfg.clone();
    unthrottled(&mut c1);
    for p in c1.providers.values_mut() {
        p.kind = ProviderKind::Inproc;
    }
    c1.nats.prefix = format!("{base}-inproc");
    let run1 = format!("bench-{tag}-i");
    let jobs1 = sample_jobs(&c1, &run1, n)?;
    let avg = jobs1.iter().map(|j| j.payload.len()).sum::<usize>() / n.max(1);
    eprintln!("bench: {n} jobs through the in-process provider…");
    // The run's own pool, closed after it: its backends exit, so Postgres
    // has flushed their counters when they are read.
    let run_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(c1.database.max_connections)
        .connect_with((*pool.connect_options()).clone())
        .await?;
    let pg_before = pg_counters(&pool).await?;
    let cpu_before = CpuSplit::now();
    let inproc = run_pipeline(c1, &run_pool, nats_url, &jobs1, &run1).await?;
    let inproc_secs = inproc.secs;
    let cpu = cpu_before.per_job(&CpuSplit::now(), n);
    run_pool.close().await;
    // Backends report their counters as they exit: give them a moment.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pg_after = pg_counters(&pool).await?;
    let pg_per_job = |a: i64, b: i64| (b - a) as f64 / n.max(1) as f64;

    // 2. HTTP simulator, clean profile.
    let sim = SimServer::start("127.0.0.1:0", SimProfile::default()).await?;
    let mut c2 = cfg.clone();
    unthrottled(&mut c2);
    on_simulator(&mut c2, &sim.base_url());
    c2.nats.prefix = format!("{base}-http");
    let run2 = format!("bench-{tag}-h");
    let jobs2 = sample_jobs(&c2, &run2, n)?;
    eprintln!("bench: {n} jobs through the HTTP simulator…");
    vacuum(&pool).await;
    let http = run_pipeline(c2, &pool, nats_url, &jobs2, &run2).await?;
    let http_secs = http.secs;
    sim.stop();

    // 3. JetStream ceiling with the same count and size.
    eprintln!("bench: JetStream ceiling with {n} messages of {avg} bytes…");
    let stream_name = format!("{}_CEILING", base.to_ascii_uppercase().replace('-', "_"));
    let ceiling_secs = jetstream_ceiling(nats_url, &stream_name, n, avg).await?;

    // Leave the database as we found it.
    for run in [&run1, &run2] {
        let like = format!("{run}%");
        sqlx::query("DELETE FROM results WHERE job_id LIKE $1")
            .bind(&like)
            .execute(&pool)
            .await?;
        sqlx::query("DELETE FROM calls WHERE job_id LIKE $1")
            .bind(&like)
            .execute(&pool)
            .await?;
        sqlx::query("DELETE FROM jobs WHERE id LIKE $1")
            .bind(&like)
            .execute(&pool)
            .await?;
    }

    let rate = |secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let ceiling = rate(ceiling_secs);
    Ok(BenchFigures {
        jobs: n,
        inproc_jobs_per_sec: rate(inproc_secs),
        http_jobs_per_sec: rate(http_secs),
        jetstream_ceiling_msgs_per_sec: ceiling,
        inproc_to_ceiling_ratio: if ceiling > 0.0 {
            rate(inproc_secs) / ceiling
        } else {
            0.0
        },
        http_to_ceiling_ratio: if ceiling > 0.0 {
            rate(http_secs) / ceiling
        } else {
            0.0
        },
        inproc_secs,
        http_secs,
        ceiling_secs,
        avg_payload_bytes: avg,
        peak_rss_mb: peak_rss_mb(),
        cpu_ms_per_job: cpu.total(),
        cpu_split_ms_per_job: cpu,
        pg_commits_per_job: pg_per_job(pg_before.0, pg_after.0),
        pg_rows_inserted_per_job: pg_per_job(pg_before.1, pg_after.1),
        pg_rows_updated_per_job: pg_per_job(pg_before.2, pg_after.2),
        inproc_direct_share: inproc.direct_share(n),
        http_direct_share: http.direct_share(n),
    })
}

impl BenchFigures {
    pub fn summary(&self) -> String {
        format!(
            "jobs                      {}\n\
             in-process provider       {:>10.0} jobs/s  ({:.2}s)\n\
             HTTP simulator            {:>10.0} jobs/s  ({:.2}s)\n\
             JetStream ceiling         {:>10.0} msgs/s  ({:.2}s, {} B messages)\n\
             in-process / ceiling      {:>10.2}\n\
             HTTP / ceiling            {:>10.2}\n\
             peak RSS                  {:>10.1} MiB\n\
             CPU per job (in-process)  {:>10.3} ms  (switchyard {:.3}, nats-server {:.3}, postgres {:.3})\n\
             Postgres per job          {:>10.2} commits, {:.2} rows inserted, {:.2} updated\n\
             first calls made directly {:>10.2} in-process, {:.2} HTTP",
            self.jobs,
            self.inproc_jobs_per_sec,
            self.inproc_secs,
            self.http_jobs_per_sec,
            self.http_secs,
            self.jetstream_ceiling_msgs_per_sec,
            self.ceiling_secs,
            self.avg_payload_bytes,
            self.inproc_to_ceiling_ratio,
            self.http_to_ceiling_ratio,
            self.peak_rss_mb,
            self.cpu_ms_per_job,
            self.cpu_split_ms_per_job.switchyard,
            self.cpu_split_ms_per_job.nats_server,
            self.cpu_split_ms_per_job.postgres,
            self.pg_commits_per_job,
            self.pg_rows_inserted_per_job,
            self.pg_rows_updated_per_job,
            self.inproc_direct_share,
            self.http_direct_share
        )
    }
}
