//! `switchyard worker`: wires the dispatcher and the provider lanes to NATS,
//! the batched writer and a shutdown token, and drains them on stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::bus::Bus;
use crate::config::Config;
use crate::pipeline::dispatcher::Dispatcher;
use crate::pipeline::lane::Lane;
use crate::pipeline::pull::{consume, Pull, Source};
use crate::route::Routes;
use crate::store::prices::ModelPrices;
use crate::store::Writer;
use crate::tasks::Tasks;

/// Which parts of the worker this process runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Run the dispatcher (jobs stream → calls).
    pub dispatcher: bool,
    /// Provider lanes to run; `None` = every provider in the config.
    pub lanes: Option<Vec<String>>,
    /// How long a stop waits for in-flight work before giving up.
    pub drain_timeout: Duration,
    /// Serve `/metrics` and the dashboard here (overrides `metrics.listen`).
    pub metrics_listen: Option<String>,
    /// Run the webhook deliverer (completion callbacks waiting in
    /// `webhook_deliveries`).
    pub webhooks: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            dispatcher: true,
            lanes: None,
            drain_timeout: Duration::from_secs(30),
            metrics_listen: None,
            webhooks: true,
        }
    }
}

/// A running worker.
pub struct WorkerHandle {
    token: CancellationToken,
    tracker: TaskTracker,
    /// The writer, its database probe and the fleet limiters' loops: they
    /// outlive the lanes' drain (in-flight calls still commit and settle)
    /// and stop after it.
    services: Tasks,
    drain_timeout: Duration,
}

impl WorkerHandle {
    /// The token whose cancellation stops the worker.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Stop fetching, let in-flight messages finish (commit, ack) within the
    /// drain timeout, then stop the writer. Returns false if the deadline passed.
    pub async fn shutdown(self) -> bool {
        self.token.cancel();
        self.tracker.close();
        let drained = tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_ok();
        if !drained {
            warn!(
                remaining = self.tracker.len(),
                "drain deadline passed; unacked messages will be redelivered"
            );
            return false;
        }
        if !self.services.stop(Duration::from_secs(10)).await {
            warn!(
                remaining = self.services.len(),
                "the writer did not stop in time"
            );
        }
        info!("worker drained");
        true
    }

    /// Wait until the token is cancelled (by a signal or a caller), then shut down.
    pub async fn run_until_stopped(self) -> bool {
        self.token.cancelled().await;
        self.shutdown().await
    }
}

/// Write `cfg`'s models and their prices to `model_prices`, with its
/// baseline marked: the savings views price counterfactual calls at them.
pub async fn sync_prices(pool: &PgPool, cfg: &Config) -> Result<()> {
    let prices: Vec<ModelPrices> = cfg
        .models
        .iter()
        .map(|(name, m)| ModelPrices {
            model: name.clone(),
            provider: m.provider.clone(),
            prices: m.prices(),
        })
        .collect();
    crate::store::prices::sync(pool, &prices, cfg.report.baseline_model.as_deref())
        .await
        .context("writing the configured models' prices to `model_prices`")
}

/// A pull loop's gate: no new messages while the database is unreachable.
fn db_up(writer: &Writer) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    let w = writer.clone();
    move || {
        let w = w.clone();
        Box::pin(async move { w.wait_up().await })
    }
}

/// Start the dispatcher and lanes selected by `opts`.
pub async fn start(
    cfg: Arc<Config>,
    pool: PgPool,
    bus: Bus,
    opts: WorkerOptions,
) -> Result<WorkerHandle> {
    // Every route built now: a bad one stops the start, naming its key.
    let routes = Arc::new(Routes::build(&cfg).map_err(|e| anyhow::anyhow!("config: {e}"))?);
    bus.ensure_streams(&cfg).await?;
    sync_prices(&pool, &cfg).await?;
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let services = Tasks::new();
    let writer = Writer::spawn(
        pool.clone(),
        cfg.writer.batch_size,
        Duration::from_millis(cfg.writer.flush_interval_ms),
        cfg.writer.commits_in_flight,
        &services,
    );

    let lane_names: Vec<String> = match &opts.lanes {
        None => cfg.providers.keys().cloned().collect(),
        Some(names) => {
            for n in names {
                anyhow::ensure!(
                    cfg.providers.contains_key(n),
                    "unknown lane `{n}`: the config's providers are {:?}",
                    cfg.providers.keys().collect::<Vec<_>>()
                );
            }
            names.clone()
        }
    };

    // Fleet-wide limits live in one KV bucket per prefix.
    let fleet_store = if lane_names.iter().any(|n| cfg.providers[n].is_fleet()) {
        Some(
            crate::limits::fleet::open_store_with(
                &bus.js,
                &bus.names.prefix,
                Some(cfg.nats.replicas),
            )
            .await?,
        )
    } else {
        None
    };

    // One view of the budgets' spend for the dispatcher and the lanes.
    let book = Arc::new(crate::limits::budget::Book::new(&cfg, pool.clone()));

    // Settled hours of jobs go into the job rollups (one roller at a time
    // across the fleet: an advisory lock).
    tracker.spawn(crate::store::job_rollups::roll_periodically(
        pool.clone(),
        token.clone(),
    ));

    // Calls 30 s old go into the call rollups (one roller at a time).
    tracker.spawn(crate::store::rollups::roll_periodically(
        pool.clone(),
        token.clone(),
    ));

    // Messages JetStream gave up on become dead letters.
    tracker.spawn(crate::pipeline::poison::run(
        bus.clone(),
        pool.clone(),
        writer.clone(),
        token.clone(),
    ));

    let shared = crate::pipeline::lane::LaneShared {
        fleet_store: fleet_store.clone(),
        budget: book.clone(),
        routes: routes.clone(),
        services: services.clone(),
    };
    // The lanes' steps, for the dispatcher's direct calls.
    let mut steps = std::collections::HashMap::new();
    for name in lane_names.clone() {
        let lane = Arc::new(
            Lane::new(
                &name,
                cfg.clone(),
                bus.clone(),
                writer.clone(),
                pool.clone(),
                token.clone(),
                &shared,
            )
            .with_context(|| format!("building lane `{name}`"))?,
        );
        steps.insert(name.clone(), lane.step());
        let consumers = lane.consumers().await?;
        let in_flight = lane.max_in_flight();
        let gate = lane.clone();
        let db = writer.clone();
        tracker.spawn(consume(
            format!("lane-{name}"),
            consumers,
            Pull {
                max_in_flight: in_flight,
                share: cfg.priority.low_share,
                ack_wait: cfg.ack_wait(),
            },
            token.clone(),
            tracker.clone(),
            move || {
                let lane = gate.clone();
                let db = db.clone();
                // No new work while the database is unreachable or the lane
                // has no budget: the messages stay in NATS.
                async move {
                    db.wait_up().await;
                    lane.ready().await
                }
            },
            move |m, ticket| {
                let lane = lane.clone();
                async move { lane.handle(m, ticket).await }
            },
        ));
    }
    if opts.dispatcher {
        let d = Dispatcher::new(
            cfg.clone(),
            routes.clone(),
            bus.clone(),
            writer.clone(),
            token.clone(),
            book.clone(),
        )
        .with_direct(crate::pipeline::dispatcher::Direct::new(
            &cfg,
            steps,
            tracker.clone(),
        ));
        // Parked jobs of paused categories go out again when their budget allows.
        tracker.spawn(resume_parked(
            cfg.clone(),
            pool.clone(),
            bus.clone(),
            book.clone(),
            token.clone(),
        ));
        // Scheduled jobs (`not_before`) go out when they are due.
        tracker.spawn(resume_scheduled(pool.clone(), bus.clone(), token.clone()));
        let consumer = d.consumer().await?;
        let in_flight = cfg.dispatcher.concurrency;
        tracker.spawn(consume(
            "dispatcher".into(),
            vec![Source {
                consumer,
                batch: in_flight,
            }],
            Pull {
                max_in_flight: in_flight,
                share: 0.0,
                ack_wait: cfg.ack_wait(),
            },
            token.clone(),
            tracker.clone(),
            db_up(&writer),
            move |m, ()| {
                let d = d.clone();
                async move { d.handle(m).await }
            },
        ));
    }
    // Batch lanes, where a category sends calls through a provider's batch API.
    let batching = cfg
        .categories
        .values()
        .any(|c| c.delivery != crate::config::Delivery::Realtime);
    for name in lane_names.iter().filter(|_| batching) {
        let Some(lane) = crate::pipeline::batch::BatchLane::new(
            name,
            cfg.clone(),
            pool.clone(),
            bus.clone(),
            token.clone(),
        )
        .with_context(|| format!("building the batch lane of `{name}`"))?
        else {
            continue;
        };
        let lane = Arc::new(lane);
        let consumer = lane.consumer().await?;
        let collector = lane.clone();
        tracker.spawn(consume(
            format!("batch-{name}"),
            vec![Source {
                consumer,
                batch: 64,
            }],
            Pull {
                max_in_flight: 64,
                share: 0.0,
                ack_wait: cfg.ack_wait(),
            },
            token.clone(),
            tracker.clone(),
            db_up(&writer),
            move |m, ()| {
                let lane = collector.clone();
                async move { lane.collect(m).await }
            },
        ));
        tracker.spawn(lane.run());
    }
    if opts.webhooks {
        // Completion webhooks, beside the pipeline: their receivers never
        // hold a job or a message; any number of workers share the attempts.
        crate::webhooks::deliver::spawn(
            cfg.clone(),
            pool.clone(),
            &Tasks::from_parts(tracker.clone(), token.clone()),
        )?;
    }
    if let Some(listen) = opts.metrics_listen.as_ref().or(cfg.metrics.listen.as_ref()) {
        crate::ops::dashboard::serve(
            listen,
            pool.clone(),
            bus.clone(),
            &cfg,
            &Tasks::from_parts(tracker.clone(), token.clone()),
        )
        .await?;
        let (w, stop) = (writer.clone(), token.clone());
        tracker.spawn(async move {
            loop {
                let up = if w.is_up() { 1.0 } else { 0.0 };
                crate::metrics::global().set("switchyard_database_up", &[], up);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }
    info!(prefix = %bus.names.prefix, "worker started");
    Ok(WorkerHandle {
        token,
        tracker,
        services,
        drain_timeout: opts.drain_timeout,
    })
}

/// How long a parked job taken for republishing stays taken.
const RESUME_IDLE: Duration = Duration::from_secs(10);

/// Every few seconds, for each paused category within its budget again (a
/// new day or month, or a higher cap), publish its parked jobs again under a
/// fresh message id; the dispatcher runs them (or parks them again).
async fn resume_parked(
    cfg: Arc<Config>,
    pool: PgPool,
    bus: Bus,
    book: Arc<crate::limits::budget::Book>,
    token: CancellationToken,
) {
    let paused: Vec<String> = cfg
        .categories
        .iter()
        .filter(|(_, c)| {
            c.budget
                .as_ref()
                .is_some_and(|b| b.on_exceed == crate::config::BudgetAction::Pause)
        })
        .map(|(n, _)| n.clone())
        .collect();
    if paused.is_empty() {
        return;
    }
    loop {
        for cat in &paused {
            match book.exceeded(&cfg, cat).await {
                Ok(None) => {}
                Ok(Some(_)) => continue,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "budget check failed");
                    continue;
                }
            }
            let jobs = match crate::store::take_parked(&pool, cat, RESUME_IDLE, 500).await {
                Ok(j) => j,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "reading parked jobs failed");
                    continue;
                }
            };
            if !jobs.is_empty() {
                info!(category = %cat, jobs = jobs.len(), "budget allows again; resuming parked jobs");
            }
            for (id, envelope) in jobs {
                // A deadline that passed while the job was parked ends it
                // here (published again, it would only be dead-lettered).
                let deadline = envelope
                    .as_ref()
                    .and_then(|e| e.get("deadline"))
                    .and_then(|d| d.as_str())
                    .map(|d| (d.to_string(), crate::envelope::parse_deadline(d)));
                if let Some((d, at)) = &deadline {
                    if at.is_none_or(|ms| ms <= crate::clock::now_ms()) {
                        let why = format!(
                            "deadline {d} passed while the job was parked by the category's budget"
                        );
                        match crate::store::jobs::fail_parked(&pool, &id, &why).await {
                            Ok(_) => info!(job_id = %id, %why, "parked job failed"),
                            Err(e) => {
                                warn!(job_id = %id, error = %format!("{e:#}"), "failing a parked job failed")
                            }
                        }
                        continue;
                    }
                }
                let Some(body) = envelope.and_then(|e| serde_json::to_vec(&e).ok()) else {
                    continue;
                };
                let msg_id = format!("resume-{id}-{}", crate::clock::now_ms());
                if let Err(e) = bus
                    .publish_durable(bus.names.job_subject(cat), &msg_id, body.into())
                    .await
                {
                    // Still parked: taken again after RESUME_IDLE.
                    warn!(job_id = %id, error = %format!("{e:#}"), "republishing a parked job failed");
                }
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Every second, publish the scheduled jobs that are due again under a
/// fresh message id (the dispatcher runs them); one whose `expires_at`
/// passed while it waited ends `expired` here.
async fn resume_scheduled(pool: PgPool, bus: Bus, token: CancellationToken) {
    loop {
        match crate::store::jobs::take_scheduled(&pool, RESUME_IDLE, 500).await {
            Err(e) => warn!(error = %format!("{e:#}"), "reading scheduled jobs failed"),
            Ok(jobs) => {
                for (id, category, envelope) in jobs {
                    let expires = envelope
                        .as_ref()
                        .and_then(|e| e.get("expires_at"))
                        .and_then(|d| d.as_str())
                        .map(|d| (d.to_string(), crate::envelope::parse_deadline(d)));
                    if let Some((at, Some(ms))) = &expires {
                        if *ms <= crate::clock::now_ms() {
                            let why = format!("not started by its expires_at ({at})");
                            if let Err(e) =
                                crate::store::jobs::expire_parked(&pool, &id, &why).await
                            {
                                warn!(job_id = %id, error = %format!("{e:#}"), "expiring a scheduled job failed");
                            }
                            continue;
                        }
                    }
                    let Some(body) = envelope.and_then(|e| serde_json::to_vec(&e).ok()) else {
                        continue;
                    };
                    let msg_id = format!("scheduled-{id}-{}", crate::clock::now_ms());
                    if let Err(e) = bus
                        .publish_durable(bus.names.job_subject(&category), &msg_id, body.into())
                        .await
                    {
                        // Still parked: taken again after RESUME_IDLE.
                        warn!(job_id = %id, error = %format!("{e:#}"), "publishing a scheduled job failed");
                    }
                }
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
