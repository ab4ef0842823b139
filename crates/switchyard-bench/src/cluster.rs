//! `switchyard-bench cluster`: jobs through three worker processes on a
//! three-node NATS cluster (its own ports and stores on loopback), with the
//! jobs and calls streams and the limits KV bucket at three replicas, while
//! the node that leads the jobs stream is killed with SIGKILL mid-run and
//! started again later. Each worker is given every node, a different one
//! first. Afterwards the run is reconciled as the chaos run is (every job
//! ended once, every answered request recorded), and the throughput before,
//! during and after the leader change is reported.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use switchyard::bus::Bus;
use switchyard::config::Config;
use switchyard::demo::sample_jobs_with;
use switchyard::sim::{SimProfile, SimServer};
use switchyard_servers::{nats_server_bin, nats_server_version, NatsCluster, PrivatePg};

use crate::chaos::{
    count_terminal, publish_paced, reconcile_into, sim_worker_env, ChaosFigures, Fleet,
};

/// What `switchyard-bench cluster` runs.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub jobs: usize,
    /// Jobs published per second.
    pub publish_rate: f64,
    /// Kill the jobs stream's leader once this share of the jobs is terminal.
    pub kill_at: f64,
    /// How long the killed node stays down.
    pub down: Duration,
    /// The workers' `nats.ack_wait_secs`.
    pub ack_wait_secs: u64,
    /// Give up waiting for the jobs after this long.
    pub timeout: Duration,
    /// The `switchyard` binary the workers run.
    pub worker_exe: PathBuf,
    /// The nats-server binary (default: [`nats_server_bin`]).
    pub nats_server: Option<PathBuf>,
}

/// What the run found. Targets: `lost`, `duplicated_results`,
/// `unrecorded_calls`, `phantom_calls` 0 and `terminal` = `published`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterFigures {
    pub nats_server_version: String,
    pub nodes: usize,
    /// Replicas of the jobs stream, the calls stream and the limits KV
    /// bucket's stream, as the cluster reports them.
    pub replicas: [usize; 3],
    pub workers: usize,
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
    /// Requests the provider refused with 429 (the fleet's shared limits in
    /// the replicated KV bucket should keep this at 0).
    pub rate_limited_429: usize,
    /// Nodes killed with SIGKILL (and started again).
    pub node_kills: usize,
    /// The node killed (it led the jobs stream) and the one elected after it.
    pub killed_node: String,
    pub new_leader: String,
    /// Seconds from the kill until the jobs stream had a new leader.
    pub leader_elected_after_s: f64,
    /// Seconds the killed node stayed down.
    pub node_down_s: f64,
    /// Worker processes that exited by themselves and were restarted.
    pub worker_exits: usize,
    /// Jobs ending per second over the 5 s before the kill.
    pub jobs_per_sec_before: f64,
    /// ...over the 5 s after it.
    pub jobs_per_sec_during: f64,
    /// The lowest rate of a 1 s window in the 10 s after the kill.
    pub jobs_per_sec_min_1s: f64,
    /// How far that is below the rate before, in percent.
    pub dip_pct: f64,
    /// Seconds from the kill until a 1 s window ran at 80% of the rate
    /// before again (0 if it never fell below).
    pub recovery_s: f64,
    /// ...of which after the new leader was elected (the election itself
    /// is nats-server's: a follower waits a random 4-9 s for a dead
    /// leader before it campaigns).
    pub recovered_after_election_s: f64,
    /// Jobs ending per second from the restart of the node to the end.
    pub jobs_per_sec_after: f64,
    /// Jobs ended in each second from 3 s before the kill to 20 s after it.
    pub timeline: Vec<usize>,
    pub elapsed_s: f64,
    pub jobs_per_sec: f64,
}

impl ClusterFigures {
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.terminal == self.published
            && self.duplicated_results == 0
            && self.inconsistent == 0
            && self.unrecorded_calls == 0
            && self.phantom_calls == 0
            && self.node_kills >= 1
    }

    pub fn summary(&self) -> String {
        format!(
            "nats-server               {} ({} nodes, replicas jobs/calls/limits {:?})\n\
             jobs published            {}\n\
             jobs terminal             {}: {} succeeded, {} failed, {} needs review, {} dead\n\
             lost                      {}\n\
             duplicated results        {}\n\
             ended in no recorded way  {}\n\
             requests answered (sim)   {} ({} refused with 429)\n\
             calls rows                {} ({} unknown)\n\
             unrecorded calls          {}\n\
             phantom calls             {}\n\
             steps answered twice      {}\n\
             node kills (SIGKILL)      {}: {} led the jobs stream, {} elected after {:.2}s; down {:.1}s\n\
             jobs/s before the kill    {:.1}\n\
             jobs/s 5 s after it       {:.1} (worst 1 s window {:.1}: a {:.0}% dip; back to 80% after {:.1}s, {:.1}s after the election)\n\
             jobs/s after the restart  {:.1}\n\
             jobs a second from -3 s   {:?}\n\
             elapsed                   {:.1}s ({:.1} jobs/s), {} worker restarts after an exit\n\
             verdict                   {}",
            self.nats_server_version,
            self.nodes,
            self.replicas,
            self.published,
            self.terminal,
            self.succeeded,
            self.failed,
            self.needs_review,
            self.dead,
            self.lost,
            self.duplicated_results,
            self.inconsistent,
            self.answered,
            self.rate_limited_429,
            self.calls_rows,
            self.unknown_calls,
            self.unrecorded_calls,
            self.phantom_calls,
            self.duplicate_answers,
            self.node_kills,
            self.killed_node,
            self.new_leader,
            self.leader_elected_after_s,
            self.node_down_s,
            self.jobs_per_sec_before,
            self.jobs_per_sec_during,
            self.jobs_per_sec_min_1s,
            self.dip_pct,
            self.recovery_s,
            self.recovered_after_election_s,
            self.jobs_per_sec_after,
            self.timeline,
            self.elapsed_s,
            self.jobs_per_sec,
            self.worker_exits,
            if self.passed() {
                "PASS: a leader killed, nothing lost, nothing doubled, every answer recorded"
            } else {
                "FAIL"
            }
        )
    }
}

/// The leader of `stream`, as the cluster reports it.
async fn leader_of(bus: &Bus, stream: &str) -> Option<String> {
    let mut s = bus.js.get_stream(stream).await.ok()?;
    let info = s.info().await.ok()?;
    info.cluster.as_ref().and_then(|c| c.leader.clone())
}

async fn replicas_of(bus: &Bus, stream: &str) -> usize {
    match bus.js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.config.num_replicas).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Terminal counts over time: (seconds since start, terminal).
#[derive(Default)]
struct Samples(Vec<(f64, usize)>);

impl Samples {
    /// Terminal at `t` (the last sample at or before it).
    fn at(&self, t: f64) -> usize {
        self.0
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map_or(0, |(_, n)| *n)
    }
    /// Jobs ending per second over `[from, to]`.
    fn rate(&self, from: f64, to: f64) -> f64 {
        if to <= from {
            return 0.0;
        }
        (self.at(to).saturating_sub(self.at(from))) as f64 / (to - from)
    }
}

pub async fn run(
    cfg: Config,
    config_path: Option<&Path>,
    opts: &ClusterOptions,
) -> Result<ClusterFigures> {
    let exe = match &opts.nats_server {
        Some(p) => p.clone(),
        None => {
            nats_server_bin().context("nats-server is not installed (or give --nats-server)")?
        }
    };
    let mut figures = ClusterFigures {
        nats_server_version: nats_server_version(&exe).unwrap_or_default(),
        nodes: 3,
        workers: 3,
        ..Default::default()
    };
    let pg = tokio::task::spawn_blocking(PrivatePg::start)
        .await?
        .context("starting a private PostgreSQL for the cluster run")?;
    let exe2 = exe.clone();
    let mut cluster = tokio::task::spawn_blocking(move || NatsCluster::start(3, Some(exe2)))
        .await?
        .context("starting a three-node NATS cluster")?;
    let database_url = pg.url("switchyard");
    let pool = switchyard::store::connect_and_migrate(&database_url, 4).await?;
    switchyard::store::rollups::lower_settle(&pool, "2 seconds").await?;

    let mut profile = SimProfile::demo();
    profile.rpm = 20_000;
    for f in profile.formats.values_mut() {
        f.rpm = 20_000;
    }
    let sim = SimServer::start("127.0.0.1:0", profile).await?;
    let prefix = "cluster";
    let mut run_cfg = cfg.clone();
    run_cfg.nats.prefix = prefix.into();
    run_cfg.nats.replicas = 3;

    // The cluster elects its JetStream meta leader a moment after the
    // nodes listen: create the R3 streams and bucket when it has.
    let bus = Bus::connect(&cluster.urls_from(0), prefix).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let made = async {
            bus.ensure_streams(&run_cfg).await?;
            switchyard::limits::fleet::open_store_with(&bus.js, prefix, Some(3)).await
        }
        .await;
        match made {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %format!("{e:#}"), "cluster not ready yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.context("the cluster never accepted R3 streams")),
        }
    }
    let names = bus.names.clone();
    let kv_stream = format!("KV_{}_LIMITS", prefix.to_ascii_uppercase());
    figures.replicas = [
        replicas_of(&bus, &names.jobs_stream()).await,
        replicas_of(&bus, &names.calls_stream()).await,
        replicas_of(&bus, &kv_stream).await,
    ];

    let mut env = sim_worker_env(&cfg, &database_url, "", prefix, &sim.base_url());
    env.retain(|(k, _)| k != "NATS_URL");
    env.push(("SWITCHYARD_NATS__REPLICAS".into(), "3".into()));
    // Shared (fleet) limits in the R3 bucket, below the simulator's: a
    // 429 means the fleet lost count. A short provider timeout, as in chaos.
    crate::chaos::killable_workers(
        &mut env,
        &cfg,
        opts.ack_wait_secs,
        &[
            ("FLEET", "true"),
            ("TIMEOUT_SECS", "10"),
            ("RPM", "12000"),
            ("TPM", "1000000000"),
            ("INPUT_TPM", "1000000000"),
            ("OUTPUT_TPM", "1000000000"),
        ],
    );
    let own_env = (0..3)
        .map(|i| vec![("NATS_URL".to_string(), cluster.urls_from(i))])
        .collect();
    let mut fleet = Fleet::start(
        opts.worker_exe.clone(),
        config_path,
        env,
        own_env,
        "switchyard-cluster-",
        3,
    )?;
    let logs = fleet.logs.clone();

    let jobs = sample_jobs_with(&run_cfg, "cluster", opts.jobs, false)?;
    let published = jobs.len();
    figures.published = published;
    eprintln!(
        "bench cluster: {published} jobs at {}/s, 3 workers on 3 nodes (nats-server {}), \
         the jobs stream's leader killed at {:.0}% and restarted {:.0}s later; logs in {}",
        opts.publish_rate,
        figures.nats_server_version,
        opts.kill_at * 100.0,
        opts.down.as_secs_f64(),
        logs.display()
    );
    let started = Instant::now();
    let sent = Arc::new(AtomicUsize::new(0));
    let tasks = switchyard::tasks::Tasks::new();
    let publisher = tasks.spawn(publish_paced(
        bus.clone(),
        jobs,
        Some(opts.publish_rate),
        sent.clone(),
    ));

    let mut samples = Samples::default();
    let mut killed: Option<(usize, f64)> = None;
    let mut restarted_at: Option<f64> = None;
    let mut election: Option<tokio::task::JoinHandle<Option<(String, f64)>>> = None;
    let mut last_report = Instant::now();
    let deadline = Instant::now() + opts.timeout;
    let mut terminal = 0;
    while Instant::now() < deadline {
        if let Some(t) = count_terminal(&pool).await {
            terminal = t;
        }
        let now = started.elapsed().as_secs_f64();
        samples.0.push((now, terminal));
        if terminal >= published && sent.load(Ordering::SeqCst) >= published {
            break;
        }
        figures.worker_exits += fleet.revive()?;
        if killed.is_none() && terminal as f64 >= opts.kill_at * published as f64 {
            let leader = leader_of(&bus, &names.jobs_stream())
                .await
                .context("the jobs stream has no leader")?;
            let i = cluster
                .index_of(&leader)
                .with_context(|| format!("the jobs stream's leader {leader} is not a node"))?;
            eprintln!("bench cluster: SIGKILL {leader}, the jobs stream's leader ({terminal} jobs terminal)");
            cluster.nodes[i].kill();
            let at = started.elapsed().as_secs_f64();
            killed = Some((i, at));
            figures.node_kills += 1;
            figures.killed_node = leader.clone();
            // A new leader, as a survivor reports it (watched apart, so the
            // sampling goes on).
            let (bus2, stream, old) = (bus.clone(), names.jobs_stream(), leader.clone());
            let t0 = Instant::now();
            election = Some(tasks.spawn(async move {
                let until = t0 + Duration::from_secs(60);
                while Instant::now() < until {
                    let asked =
                        tokio::time::timeout(Duration::from_millis(500), leader_of(&bus2, &stream))
                            .await;
                    if let Ok(Some(l)) = asked {
                        if l != old {
                            return Some((l, t0.elapsed().as_secs_f64()));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                None
            }));
        }
        if let (Some((i, at)), None) = (killed, restarted_at) {
            if now - at >= opts.down.as_secs_f64() {
                let node = &mut cluster.nodes[i];
                tokio::task::block_in_place(|| node.run()).context("restarting the killed node")?;
                let back = started.elapsed().as_secs_f64();
                figures.node_down_s = back - at;
                restarted_at = Some(back);
                eprintln!("bench cluster: {} is back", figures.killed_node);
            }
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!("bench cluster: {terminal}/{published} terminal, {now:.0}s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    publisher.abort();
    if let Some(Ok(Some((l, after)))) = match election {
        Some(e) => Some(e.await),
        None => None,
    } {
        eprintln!("bench cluster: {l} led the jobs stream {after:.2}s after the kill");
        figures.new_leader = l;
        figures.leader_elected_after_s = after;
    }
    tokio::task::block_in_place(|| fleet.stop(Duration::from_secs(30)));

    let mut f = ChaosFigures {
        published,
        ..Default::default()
    };
    reconcile_into(&pool, &sim, &mut f).await?;
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
    figures.rate_limited_429 = sim.ledger().iter().filter(|e| e.status == 429).count();
    figures.elapsed_s = elapsed.as_secs_f64();
    figures.jobs_per_sec = figures.terminal as f64 / figures.elapsed_s.max(1e-9);

    if let Some((_, at)) = killed {
        let end = figures.elapsed_s;
        let before = samples.rate((at - 5.0).max(0.0), at);
        figures.jobs_per_sec_before = before;
        figures.jobs_per_sec_during = samples.rate(at, (at + 5.0).min(end));
        // 1 s windows sliding by 0.1 s over the 30 s after the kill.
        let mut worst = f64::INFINITY;
        let mut recovered: Option<f64> = None;
        let mut fell = false;
        let mut t = at + 1.0;
        while t <= (at + 30.0).min(end) {
            let r = samples.rate(t - 1.0, t);
            if t <= at + 10.0 {
                worst = worst.min(r);
            }
            if r < 0.8 * before {
                fell = true;
            } else if fell && recovered.is_none() {
                recovered = Some(t - at);
            }
            t += 0.1;
        }
        if worst.is_finite() {
            figures.jobs_per_sec_min_1s = worst;
            figures.dip_pct = if before > 0.0 {
                (100.0 * (1.0 - worst / before)).max(0.0)
            } else {
                0.0
            };
        }
        figures.recovery_s = if fell {
            recovered.unwrap_or(30.0_f64.min(end - at))
        } else {
            0.0
        };
        if let Some(back) = restarted_at {
            figures.jobs_per_sec_after = samples.rate(back, end);
        }
        if figures.recovery_s > 0.0 && !figures.new_leader.is_empty() {
            figures.recovered_after_election_s =
                (figures.recovery_s - figures.leader_elected_after_s).max(0.0);
        }
        figures.timeline = (-3..20)
            .map(|k| {
                let t = at + f64::from(k);
                samples.at(t + 1.0).saturating_sub(samples.at(t))
            })
            .collect();
    }

    pool.close().await;
    sim.stop();
    drop(fleet);
    drop(cluster);
    drop(pg);
    if figures.passed() && std::env::var_os("CHAOS_WORKER_LOG").is_none() {
        let _ = std::fs::remove_dir_all(&logs);
    }
    Ok(figures)
}
