//! `switchyard-bench limits`: several worker processes share one provider
//! whose simulator enforces RPM/TPM limits; reports the 429s they collected
//! and how much of the binding limit they achieved.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::PgPool;

use switchyard::bus::Bus;
use switchyard::config::Config;
use switchyard::demo::sample_jobs;
use switchyard::enqueue::publish_jobs;
use switchyard::sim::{SimProfile, SimServer};

/// The one model every category is routed to for the measurement.
const MODEL: &str = "gpt-4o-mini";

/// What `switchyard-bench limits` runs.
#[derive(Debug, Clone)]
pub struct LimitOptions {
    pub processes: usize,
    pub duration: Duration,
    /// The limits the config declares.
    pub rpm: u32,
    pub tpm: u32,
    /// Fleet-wide limits (else per process).
    pub fleet: bool,
    /// What the simulated provider really enforces.
    pub provider_rpm: u32,
    pub provider_tpm: u32,
    /// The provider sends no rate-limit headers (only its 429s tell).
    pub no_headers: bool,
    /// Kill one worker process with SIGKILL halfway through.
    pub kill_one: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LimitFigures {
    pub processes: usize,
    pub duration_s: f64,
    pub fleet: bool,
    pub limit_rpm: u32,
    pub limit_tpm: u32,
    /// What the simulated provider really enforces.
    pub provider_rpm: u32,
    pub provider_tpm: u32,
    pub requests_ok: usize,
    pub rate_limited_429: usize,
    pub achieved_rpm: f64,
    /// Tokens per minute as the limit counts them (prompt + max_tokens).
    pub achieved_tpm: f64,
    /// Achieved share of the binding limit, 0 to 1.
    pub utilization: f64,
    /// Enqueue to first call, of the first and the last job that got a call.
    pub first_job_wait_s: Option<f64>,
    pub last_job_wait_s: Option<f64>,
    /// 429s in the second half of the run (after convergence).
    pub rate_limited_429_second_half: usize,
    /// Worker processes killed (`--kill-one`).
    pub kills: usize,
    /// From the kill plus the lease expiry to the end: achieved share of
    /// the binding limit by the survivors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_after_kill: Option<f64>,
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn run(
    cfg: Config,
    config_path: Option<&Path>,
    pool: PgPool,
    database_url: &str,
    nats_url: &str,
    opts: &LimitOptions,
) -> Result<LimitFigures> {
    let LimitOptions {
        processes,
        duration,
        rpm,
        tpm,
        fleet,
        ..
    } = *opts;
    let (sim_rpm, sim_tpm) = (opts.provider_rpm, opts.provider_tpm);
    let Some(model) = cfg.models.get(MODEL) else {
        anyhow::bail!("bench limits needs model `{MODEL}` in the config");
    };
    let provider = model.provider.clone();
    let tag = &switchyard::ids::new_job_id()[..8];
    let prefix = format!("{}-limits-{tag}", cfg.nats.prefix);
    let sim = SimServer::start(
        "127.0.0.1:0",
        SimProfile {
            rpm: sim_rpm,
            tpm: sim_tpm,
            latency_ms: 20,
            jitter_ms: 20,
            rate_headers: !opts.no_headers,
            ..SimProfile::default()
        },
    )
    .await?;

    // Every worker: this prefix, the simulator, one model for every category.
    let mut env =
        crate::chaos::sim_worker_env(&cfg, database_url, nats_url, &prefix, &sim.base_url());
    let up = provider.to_uppercase();
    env.push((format!("SWITCHYARD_PROVIDERS__{up}__RPM"), rpm.to_string()));
    env.push((format!("SWITCHYARD_PROVIDERS__{up}__TPM"), tpm.to_string()));
    env.push((
        format!("SWITCHYARD_PROVIDERS__{up}__FLEET"),
        fleet.to_string(),
    ));
    for (c, cat) in &cfg.categories {
        let uc = c.to_uppercase();
        env.push((
            format!("SWITCHYARD_CATEGORIES__{uc}__ROUTE"),
            format!(r#"{{ kind = "single", target = "{MODEL}" }}"#),
        ));
        if cat.variant.is_some() {
            env.push((
                format!("SWITCHYARD_CATEGORIES__{uc}__VARIANT__PERCENT"),
                "0".into(),
            ));
        }
    }

    let mut run_cfg = cfg.clone();
    run_cfg.nats.prefix = prefix.clone();
    let bus = Bus::connect_configured(nats_url, &run_cfg.nats).await?;
    run_cfg.classifier = None; // no `auto` jobs
    bus.ensure_streams(&run_cfg).await?;

    let exe = std::env::current_exe().context("locating the switchyard binary")?;
    let mut children = Children(Vec::new());
    for _ in 0..processes {
        let mut cmd = Command::new(&exe);
        if let Some(c) = config_path {
            cmd.arg("--config").arg(c);
        }
        cmd.arg("worker");
        cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.stdout(Stdio::null());
        children
            .0
            .push(cmd.spawn().context("starting a worker process")?);
    }

    // Enough work to keep the limit busy for the whole run.
    let n = ((f64::from(rpm) * duration.as_secs_f64() / 60.0) * 1.5).ceil() as usize + 50;
    let run_id = format!("limits-{tag}");
    let jobs = sample_jobs(&run_cfg, &run_id, n)?;
    eprintln!(
        "bench limits: {processes} worker processes, {} fleet limits, configured {rpm} RPM / {tpm} TPM, sim enforcing {sim_rpm} RPM / {sim_tpm} TPM on {MODEL}{}, {n} jobs, {:.0}s",
        if fleet { "with" } else { "without" },
        if opts.no_headers { " without rate-limit headers" } else { "" },
        duration.as_secs_f64()
    );
    let started = Instant::now();
    publish_jobs(&bus, &jobs, None).await?;
    let skip = Duration::from_secs(2); // let the workers start
    tokio::time::sleep(skip).await;
    for c in &mut children.0 {
        if let Some(status) = c.try_wait()? {
            anyhow::bail!("a worker process exited at start ({status}); see its log above");
        }
    }
    let mut kills = 0;
    let mut killed_at_ms = None;
    if opts.kill_one {
        tokio::time::sleep(duration / 2).await;
        if let Some(c) = children.0.first_mut() {
            c.kill().context("killing a worker")?;
            let _ = c.wait();
            kills += 1;
            killed_at_ms = Some(sim.now_ms());
            eprintln!("bench limits: killed one worker process (SIGKILL)");
        }
        tokio::time::sleep(duration - duration / 2).await;
    } else {
        tokio::time::sleep(duration).await;
    }
    let elapsed = started.elapsed();
    let end_ms = sim.now_ms();
    drop(children);

    // Only the measurement window counts, after the start-up seconds.
    let ledger = sim.ledger();
    let from_ms = skip.as_millis() as u64;
    let window: Vec<_> = ledger.iter().filter(|e| e.at_ms >= from_ms).collect();
    let ok: Vec<_> = window.iter().filter(|e| e.status == 200).collect();
    let limited = ledger.iter().filter(|e| e.status == 429).count();
    let minutes = (elapsed - skip).as_secs_f64() / 60.0;
    let achieved_rpm = ok.len() as f64 / minutes;
    // Tokens as the limit counts them: prompt + max_tokens of each request.
    let tokens: u64 = ok.iter().map(|e| e.prompt_tokens + e.max_tokens).sum();
    let achieved_tpm = tokens as f64 / minutes;
    // The binding limit is whichever is lower: what we configured or what the provider enforces.
    let share = |from_ms: u64, to_ms: u64| {
        let ok: Vec<_> = ledger
            .iter()
            .filter(|e| e.status == 200 && e.at_ms >= from_ms && e.at_ms < to_ms)
            .collect();
        let minutes = (to_ms.saturating_sub(from_ms)) as f64 / 60_000.0;
        let rpm_now = ok.len() as f64 / minutes;
        let tpm_now = ok
            .iter()
            .map(|e| e.prompt_tokens + e.max_tokens)
            .sum::<u64>() as f64
            / minutes;
        (rpm_now / f64::from(rpm.min(sim_rpm).max(1)))
            .max(tpm_now / f64::from(tpm.min(sim_tpm).max(1)))
            .min(1.0)
    };
    let utilization = (achieved_rpm / f64::from(rpm.min(sim_rpm).max(1)))
        .max(achieved_tpm / f64::from(tpm.min(sim_tpm).max(1)));
    let half_ms = from_ms + (end_ms - from_ms) / 2;
    let second_half_429 = ledger
        .iter()
        .filter(|e| e.status == 429 && e.at_ms >= half_ms)
        .count();
    let utilization_after_kill = killed_at_ms
        .map(|k| k + switchyard::limits::fleet::LEASE_MS as u64)
        .filter(|from| *from + 5_000 < end_ms)
        .map(|from| share(from, end_ms));

    let like = format!("{run_id}%");
    let waits: (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT min(w), max(w) FROM (
             SELECT EXTRACT(EPOCH FROM min(c.created_at) - j.enqueued_at)::float8 AS w
             FROM jobs j JOIN calls c ON c.job_id = j.id WHERE j.id LIKE $1 GROUP BY j.id, j.enqueued_at) t",
    )
    .bind(&like)
    .fetch_one(&pool)
    .await?;
    for sql in [
        "DELETE FROM results WHERE job_id LIKE $1",
        "DELETE FROM calls WHERE job_id LIKE $1",
        "DELETE FROM steps WHERE job_id LIKE $1",
        "DELETE FROM jobs WHERE id LIKE $1",
    ] {
        sqlx::query(sql).bind(&like).execute(&pool).await?;
    }
    bus.delete_streams().await;
    sim.stop();
    Ok(LimitFigures {
        processes,
        duration_s: (elapsed - skip).as_secs_f64(),
        fleet,
        limit_rpm: rpm,
        limit_tpm: tpm,
        provider_rpm: sim_rpm,
        provider_tpm: sim_tpm,
        requests_ok: ok.len(),
        rate_limited_429: limited,
        achieved_rpm,
        achieved_tpm,
        utilization: utilization.min(1.0),
        first_job_wait_s: waits.0,
        last_job_wait_s: waits.1,
        rate_limited_429_second_half: second_half_429,
        kills,
        utilization_after_kill,
    })
}

impl LimitFigures {
    pub fn summary(&self) -> String {
        format!(
            "processes                 {}\n\
             fleet-wide limits         {}\n\
             configured limit          {} RPM, {} TPM\n\
             provider enforces         {} RPM, {} TPM\n\
             429s received             {}\n\
             achieved                  {:.0} RPM, {:.0} TPM\n\
             utilization               {:.1}% of the binding limit\n\
             429s in the second half   {}\n\
             first / last job waited   {} / {}\n\
             processes killed          {}{}",
            self.processes,
            self.fleet,
            self.limit_rpm,
            self.limit_tpm,
            self.provider_rpm,
            self.provider_tpm,
            self.rate_limited_429,
            self.achieved_rpm,
            self.achieved_tpm,
            100.0 * self.utilization,
            self.rate_limited_429_second_half,
            self.first_job_wait_s
                .map_or("-".into(), |w| format!("{w:.1}s")),
            self.last_job_wait_s
                .map_or("-".into(), |w| format!("{w:.1}s")),
            self.kills,
            self.utilization_after_kill
                .map_or(String::new(), |u| format!(
                    "\nutilization after the kill {:.1}% (from the lease expiry on)",
                    100.0 * u
                )),
        )
    }
}
