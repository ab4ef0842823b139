//! A provider lane: consumes `<prefix>.calls.<provider>`, waits for the
//! lane's limiter, calls the provider, hands the call's cost record (and the
//! result or failure) to the writer, and acks, or naks with the retry delay,
//! only after the commit.
//!
//! [`LaneStep::step`] is the work for one call message: it decides what the
//! message comes to (a [`Settlement`]) without acking it, holding it through
//! a [`Hold`] while it waits, so it can be driven without NATS. [`Lane`]
//! adds the consumer and hands every settlement to the [`Settler`] that the
//! dispatcher shares.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use async_nats::jetstream::Message;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use crate::bus::{Bus, CallMsg};
use crate::config::Config;
use crate::limits::fleet::{Seen, SharedLimiter};
use crate::limits::lane::{Admission, LaneLimiter};
use crate::pipeline::flow::{self, JobCtx};
use crate::pipeline::settle::{commit_holding, Hold, Settlement, Settler};
use crate::pricing::Usage;
use crate::providers::{estimate_input_tokens, CallRequest, CallResponse, ErrorClass, Provider};
use crate::route::{self, Action, Outcome, StepOutcome, StepRecord};
use crate::store::{
    self, CallOutcome, CallRow, DeadLetterRow, JobStatus, Row, StatusRow, StepRow, Writer,
};

/// An `unknown` call row younger than the provider's timeout plus this is
/// taken for a call under way in another worker.
const BUSY_MARGIN: Duration = Duration::from_secs(10);
/// How soon a call message of a newer format comes back (to this worker or
/// an upgraded one).
const NEWER_FORMAT_RETRY: Duration = Duration::from_secs(15);

/// What looking up the response cache came to.
enum Looked {
    Hit(store::cache::Entry),
    /// Call the provider; `claimed`: this call holds the key's claim.
    Call {
        claimed: bool,
    },
}

/// This process, as the holder of response cache claims.
fn cache_owner() -> &'static str {
    static OWNER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    OWNER.get_or_init(|| format!("{}-{:08x}", std::process::id(), fastrand::u32(..)))
}

/// What a redelivered or multi-step call finds already done.
enum Recorded {
    No,
    JobFinished,
    /// This step is recorded; the job's steps so far.
    Step(Vec<StepRecord>),
}

/// One provider lane: its consumer, its step and the settling path.
pub struct Lane {
    step: Arc<LaneStep>,
    /// Settles its messages; its `bus` is also where the lane consumes.
    settler: Settler,
}

/// Where a call message came from.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub stream: String,
    pub seq: u64,
    /// How many times JetStream has delivered it (1 on the first).
    pub delivered: i64,
    pub subject: String,
}

/// The work of one lane for one call message, apart from NATS.
pub struct LaneStep {
    name: String,
    cfg: Arc<Config>,
    writer: Writer,
    pool: PgPool,
    provider: Provider,
    limiter: Arc<LaneLimiter>,
    /// Category budgets, for jobs the classifier moves to a category.
    budget: Arc<crate::limits::budget::Book>,
    /// The config's routes, for jobs the classifier moves to a category.
    routes: Arc<crate::route::Routes>,
    /// How long a provider call may take (after that it is given up).
    provider_timeout: Duration,
    token: CancellationToken,
    /// Steps (`job#step`) this process is working on: a redelivery of one
    /// (its ack wait ran out while NATS was unreachable) waits for the first
    /// instead of calling the provider a second time.
    in_hand: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// What every lane of a process shares: the fleet-limits KV bucket (if any
/// lane's limits are fleet-wide) and the view of the category budgets.
pub struct LaneShared {
    pub fleet_store: Option<async_nats::jetstream::kv::Store>,
    pub budget: Arc<crate::limits::budget::Book>,
    /// The config's routes, built at start-up.
    pub routes: Arc<crate::route::Routes>,
    /// Where the fleet limiters' loops run (they outlive the lanes' drain).
    pub services: crate::tasks::Tasks,
}

/// Rows committed in the same transaction as a call's intent: the job's
/// own row when the dispatcher hands the job's first call straight to its
/// lane ([`LaneStep::direct`]), so that the job row and the claim cost one
/// commit, not two. `status`: the job's status after that commit.
#[derive(Default)]
pub struct Prior {
    rows: Option<Vec<Row>>,
    status: Option<JobStatus>,
}

/// Removes a step from [`LaneStep::in_hand`] when its handling ends.
struct InHand<'a>(&'a LaneStep, String);

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.in_hand.lock() {
            s.remove(&self.1);
        }
    }
}

impl Lane {
    pub fn new(
        name: &str,
        cfg: Arc<Config>,
        bus: Bus,
        writer: Writer,
        pool: PgPool,
        token: CancellationToken,
        shared: &LaneShared,
    ) -> Result<Self> {
        let step = LaneStep::new(name, cfg, writer.clone(), pool, token.clone(), shared)?;
        Ok(Self {
            step: Arc::new(step),
            settler: Settler { bus, writer, token },
        })
    }

    /// Messages in flight in this lane (see [`LaneStep::max_in_flight`]).
    pub fn max_in_flight(&self) -> usize {
        self.step.max_in_flight()
    }

    /// The lane's step, for the dispatcher's direct calls (see
    /// [`LaneStep::direct`]).
    pub fn step(&self) -> Arc<LaneStep> {
        self.step.clone()
    }

    /// Messages to request from NATS at once: no more than may wait here
    /// (messages buffered unread get no progress acks).
    pub fn pull_batch(&self) -> usize {
        self.max_in_flight()
            .min(self.step.limiter.queue_cap())
            .max(1)
    }

    /// Wait until the lane has budget for another message (backpressure);
    /// the ticket counts the message as waiting until it is admitted.
    pub async fn ready(&self) -> crate::limits::lane::Ticket {
        self.step.ready().await
    }

    /// See [`LaneStep::max_deliver`].
    pub fn max_deliver(&self) -> i64 {
        self.step.max_deliver()
    }

    /// The lane's consumers, most urgent first: one per priority, each on
    /// its own subject (see `pipeline::pull`).
    pub async fn consumers(&self) -> Result<Vec<crate::pipeline::pull::Source>> {
        let bus = &self.settler.bus;
        let n = &bus.names;
        let cfg = &self.step.cfg;
        let mut out = Vec::new();
        for prio in crate::envelope::Priority::ALL {
            let consumer = bus
                .pull_consumer(
                    &n.calls_stream(),
                    &n.lane_consumer_at(&self.step.name, prio),
                    &n.call_subject_at(&self.step.name, prio),
                    cfg.ack_wait(),
                    self.max_deliver(),
                    (self.max_in_flight() + cfg.writer.batch_size) as i64,
                )
                .await?;
            // The urgent and the low queues deliver a few at a time: what
            // they deliver waits its turn here.
            let batch = match prio {
                crate::envelope::Priority::Normal => self.pull_batch(),
                _ => self.pull_batch().min(8),
            };
            out.push(crate::pipeline::pull::Source { consumer, batch });
        }
        Ok(out)
    }

    /// Handle one call message: its step, then its settlement.
    pub async fn handle(&self, msg: Message, ticket: crate::limits::lane::Ticket) {
        let settlement = match msg.info() {
            Ok(i) => {
                let d = Delivery {
                    stream: i.stream.to_string(),
                    seq: i.stream_sequence,
                    delivered: i.delivered,
                    subject: msg.subject.to_string(),
                };
                // Boxed, like the step's parts below: a task holds only what
                // its current phase needs (see `LaneStep::step_call`).
                Box::pin(self.step.step(&d, &msg.payload, &msg, ticket)).await
            }
            Err(e) => {
                warn!(lane = %self.step.name, error = %e, "call message without JetStream metadata; dropping");
                Settlement::Ack
            }
        };
        Box::pin(self.settler.settle(&msg, settlement)).await;
    }
}

impl LaneStep {
    pub fn new(
        name: &str,
        cfg: Arc<Config>,
        writer: Writer,
        pool: PgPool,
        token: CancellationToken,
        shared: &LaneShared,
    ) -> Result<Self> {
        let pc = cfg
            .providers
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no provider `{name}` in config"))?;
        let provider = Provider::from_config(name, pc)?;
        let lims = crate::limits::fleet::scope_limits(&cfg, name);
        let fleet_limiter = if pc.is_fleet() {
            let store = shared.fleet_store.clone().ok_or_else(|| {
                anyhow::anyhow!("providers.{name}.fleet needs the limits KV bucket")
            })?;
            SharedLimiter::fleet(name, store, lims, &shared.services)
        } else {
            SharedLimiter::local(name, lims)
        };
        let limiter = LaneLimiter::new(
            pc.rpm,
            pc.tpm,
            pc.input_tpm,
            pc.output_tpm,
            pc.max_concurrency,
            fleet_limiter,
        )
        .counting_max_tokens(pc.counts_max_tokens())
        .budgets_shared(pc.is_fleet());
        let provider_timeout = pc.timeout();
        Ok(Self {
            name: name.to_string(),
            cfg,
            writer,
            pool,
            provider,
            limiter: Arc::new(limiter),
            budget: shared.budget.clone(),
            routes: shared.routes.clone(),
            provider_timeout,
            token,
            in_hand: Default::default(),
        })
    }

    /// Messages in flight in this lane: calls running plus calls waiting for
    /// their commit.
    pub fn max_in_flight(&self) -> usize {
        self.cfg.providers[&self.name].max_concurrency * 2 + 16
    }

    /// JetStream delivers a call at most this often: the retry budget plus
    /// room for redeliveries after crashes.
    pub fn max_deliver(&self) -> i64 {
        i64::from(self.cfg.retry.max_attempts) + 3
    }

    /// A ticket at once if the lane is free to start a call now (see
    /// [`LaneLimiter::try_ready`]).
    pub fn try_ready(&self) -> Option<crate::limits::lane::Ticket> {
        self.limiter.try_ready()
    }

    /// See [`Lane::ready`].
    pub async fn ready(&self) -> crate::limits::lane::Ticket {
        self.limiter.ready().await
    }

    async fn commit<H: Hold>(&self, hold: &H, rows: Vec<Row>) -> Result<store::Committed> {
        commit_holding(&self.writer, hold, rows, &self.token).await
    }

    /// What one call message comes to. Never panics on its content.
    pub async fn step<H: Hold>(
        &self,
        d: &Delivery,
        payload: &[u8],
        hold: &H,
        ticket: crate::limits::lane::Ticket,
    ) -> Settlement {
        // A message of a newer format (a rolling upgrade: a newer worker
        // wrote it) is left for an upgraded worker; when none took it
        // before the last delivery, it becomes a dead letter saying so
        // (replay it once the fleet is upgraded).
        // One parse on the common path; only a message that does not parse
        // as this build's is read again for its format alone.
        let read = serde_json::from_slice::<CallMsg>(payload);
        let newer = match &read {
            Ok(c) => Some(c.format).filter(|f| *f > crate::bus::CALL_FORMAT),
            Err(_) => CallMsg::newer_format(payload),
        };
        if let Some(format) = newer {
            let reason = format!(
                "call message format {format} is newer than this worker's {}: upgrade this worker, then replay it",
                crate::bus::CALL_FORMAT
            );
            crate::metrics::global().inc(
                "switchyard_newer_format_messages_total",
                &[("lane", &self.name)],
                1.0,
            );
            if d.delivered < self.max_deliver() {
                warn!(lane = %self.name, %reason, "leaving a call message for an upgraded worker");
                return Settlement::Nak(Some(NEWER_FORMAT_RETRY));
            }
            warn!(lane = %self.name, %reason, "dead-lettering a call message");
            return Settlement::rows(vec![Row::DeadLetter(DeadLetterRow {
                source: format!("{}:{}", d.stream, d.seq),
                subject: d.subject.clone(),
                job_id: None,
                payload: payload.to_vec(),
                reason,
            })]);
        }
        // A message that parses but cannot be worked on (a malformed plan,
        // a step its plan lacks) ends its job as `dead`, with the reason.
        let parsed = match read {
            Ok(c) => match c.validate() {
                Ok(()) => Ok(c),
                Err(why) => Err((Some(c.job_id), format!("not a valid call message: {why}"))),
            },
            Err(e) => Err((None, format!("not a valid call message: {e}"))),
        };
        let call = match parsed {
            Ok(c) => c,
            Err((job_id, reason)) => {
                warn!(lane = %self.name, %reason, "dead-lettering a call message");
                let mut rows = vec![Row::DeadLetter(DeadLetterRow {
                    source: format!("{}:{}", d.stream, d.seq),
                    subject: d.subject.clone(),
                    job_id: job_id.clone(),
                    payload: payload.to_vec(),
                    reason: reason.clone(),
                })];
                if let Some(job_id) = job_id {
                    rows.push(Row::Status(StatusRow {
                        job_id,
                        status: JobStatus::Dead,
                        error: Some(reason),
                        ..Default::default()
                    }));
                }
                return Settlement::rows(rows);
            }
        };
        Box::pin(self.step_delivered(hold, call, d.delivered, ticket, &mut Prior::default())).await
    }

    /// A call on its `delivered`-th delivery (a direct call's is its first):
    /// its attempt number, span and the deliveries left, then
    /// [`Self::step_call`].
    async fn step_delivered<H: Hold>(
        &self,
        hold: &H,
        call: CallMsg,
        delivered: i64,
        ticket: crate::limits::lane::Ticket,
        prior: &mut Prior,
    ) -> Settlement {
        let attempt =
            (delivered + i64::from(call.attempt_base)).clamp(1, i64::from(i32::MAX)) as i32;
        // The attempt number is settled when the call's intent is recorded.
        let span = info_span!("call", job_id = %call.job_id, category = %call.category,
                              provider = %self.name, model = %call.model, delivery = attempt,
                              attempt = tracing::field::Empty, direct = prior.rows.is_some());
        // Deliveries JetStream has left for this message after this one.
        let left = self.max_deliver() - delivered;
        Box::pin(
            self.step_call(hold, call, attempt, left, ticket, prior)
                .instrument(span),
        )
        .await
    }

    /// A job's first call, handed over by the dispatcher of this process
    /// instead of published to the calls stream: the lane was free (its
    /// `ticket` taken at once, see [`LaneLimiter::try_ready`]). `rows` (the
    /// job's row, from the dispatcher) commit with the call's intent, or,
    /// if the step ends before one, with its settlement. `hold` is the job
    /// message, which the returned settlement settles: acked after the
    /// final commit, or given back (a provider retry's delay, a stop), in
    /// which case it is dispatched again and goes through the calls stream.
    /// Also returns the job's status after its row was written, when the
    /// intent carried it (`None`: the settlement's commit carries the row).
    pub async fn direct<H: Hold>(
        &self,
        hold: &H,
        call: CallMsg,
        rows: Vec<Row>,
        ticket: crate::limits::lane::Ticket,
    ) -> (Settlement, Option<JobStatus>) {
        let mut prior = Prior {
            rows: Some(rows),
            status: None,
        };
        let settled = Box::pin(self.step_delivered(hold, call, 1, ticket, &mut prior)).await;
        let Some(rows) = prior.rows else {
            return (settled, prior.status);
        };
        // The step ended before its intent (expired, answered from the
        // cache, an unknown model, ...): the job's row goes with its end.
        let settled = match settled {
            Settlement::Commit {
                mut effects,
                retry_in,
                unless_finished,
            } => {
                let mut all = rows;
                all.append(&mut effects.rows);
                effects.rows = all;
                Settlement::Commit {
                    effects,
                    retry_in,
                    unless_finished,
                }
            }
            Settlement::Ack => Settlement::rows(rows),
            // Given back: dispatched again, its row written then.
            other @ (Settlement::Nak(_) | Settlement::Leave) => other,
        };
        (settled, None)
    }

    /// The sub-futures awaited here (and in [`Self::claim`]) are boxed: a
    /// future is as large as its largest state, and a lane holds up to
    /// `max_in_flight` tasks, half of them waiting for admission, so inline
    /// they would all carry the provider call's, the commits' and the
    /// database reads' states (18 KB per task; issue 18's RSS target). Boxed,
    /// each part is allocated only while it runs.
    async fn step_call<H: Hold>(
        &self,
        hold: &H,
        call: CallMsg,
        attempt: i32,
        deliveries_left: i64,
        ticket: crate::limits::lane::Ticket,
        prior: &mut Prior,
    ) -> Settlement {
        let key = call.msg_id();
        // Hold a second delivery of a step in hand here until the first is
        // done (telling JetStream we are on it), then check what it did.
        loop {
            let fresh = self
                .in_hand
                .lock()
                .map(|mut s| s.insert(key.clone()))
                .unwrap_or(true);
            if fresh {
                break;
            }
            debug!("this step is already being handled here; the redelivery waits for it");
            Box::pin(hold.progress()).await;
            tokio::select! {
                _ = self.token.cancelled() => return Settlement::Leave,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        let _in_hand = InHand(self, key);
        if let Some(result) = &call.batch_result {
            return Box::pin(self.batch_result(hold, &call, result)).await;
        }
        // Whether the job is finished or the step recorded is read first,
        // except on a single-call job's first delivery without a response
        // cache: there the intent row's insert checks both atomically (and
        // a refused intent is looked into at once), which saves a read per
        // job. A multi-step job needs its steps; a redelivery or a cache
        // look-up must not act for a finished job.
        let look_first =
            attempt > 1 || call.plan.records_steps() || self.cfg.cache_of(&call.category).is_some();
        if look_first {
            if let Some(s) = Box::pin(self.done_already(hold, &call)).await {
                return s;
            }
        }
        if let Some(s) = Box::pin(self.expired(&call)).await {
            return s;
        }
        let Some(model) = self.cfg.models.get(&call.model) else {
            let record = StepRecord {
                step: call.step,
                model: call.model.clone(),
                outcome: StepOutcome::Failed,
                output: None,
                reason: Some(format!("model `{}` is not in the config", call.model)),
            };
            return Box::pin(self.after_step(hold, &call, Some(record), Vec::new(), None)).await;
        };
        let prices = model.prices();
        let mut req = call.request(&self.cfg);
        let estimate = estimate_input_tokens(&req.messages);

        // The response cache: an identical request answered before is
        // served again; one under way elsewhere is waited for.
        let cache = self.cache_key(&call, &req);
        let mut cache_claimed = false;
        if let Some((key, cc)) = &cache {
            match Box::pin(self.look_up(hold, &call, key, cc)).await {
                Ok(Looked::Hit(entry)) => {
                    return Box::pin(self.answer_from_cache(hold, &call, attempt, prices, entry))
                        .await
                }
                Ok(Looked::Call { claimed }) => cache_claimed = claimed,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "response cache unavailable; calling the provider")
                }
            }
        }

        // The call's cost record, filled in as it goes.
        let row = self.cost_row(&call, attempt, prices, None);
        let waiting_since = Instant::now();
        let (admission, attempt) =
            match Box::pin(self.claim(hold, &call, estimate, &row, deliveries_left, ticket, prior))
                .await
            {
                Ok(claimed) => claimed,
                Err(settled) => return settled,
            };
        let m = crate::metrics::global();
        m.observe(
            "switchyard_limiter_wait_seconds",
            &[("provider", self.name.as_str())],
            waiting_since.elapsed().as_secs_f64(),
        );
        tracing::Span::current().record("attempt", attempt);
        let row = CallRow { attempt, ..row };
        req.tag = Some(crate::ids::call_tag(&call.job_id, call.step, attempt));

        let (mut row, outcome, response) = Box::pin(self.call_provider(&req, row, admission)).await;
        self.count_call(&row, row.http_status == Some(429));
        let record = match route::decide(&self.cfg.retry, attempt as u32, &outcome, fastrand::f64())
        {
            Action::Retry { delay } => {
                if cache_claimed {
                    Box::pin(self.release_cache(cache.as_ref())).await;
                }
                let rows = vec![
                    Row::Call(row),
                    Row::Status(StatusRow {
                        job_id: call.job_id.clone(),
                        status: JobStatus::Running,
                        ..Default::default()
                    }),
                ];
                return Settlement::retry(rows, delay);
            }
            // `decide` completes only a success, which has a response.
            Action::Complete => match response {
                Some(resp) => self.answered(&call, &mut row, resp.text, resp.finish_reason),
                None => StepRecord {
                    step: call.step,
                    model: call.model.clone(),
                    outcome: StepOutcome::Failed,
                    output: None,
                    reason: Some("completed without a response".into()),
                },
            },
            Action::Fail { error } => StepRecord {
                step: call.step,
                model: call.model.clone(),
                outcome: StepOutcome::Failed,
                output: None,
                reason: Some(error),
            },
        };
        if record.outcome == StepOutcome::Ok {
            Box::pin(self.fill_cache(cache.as_ref(), &call, &record, &row)).await;
        } else if cache_claimed {
            Box::pin(self.release_cache(cache.as_ref())).await;
        }
        Box::pin(self.after_step(hold, &call, Some(record), Vec::new(), Some(row))).await
    }

    /// The cache key of this call and its category's cache settings, when
    /// the category caches.
    fn cache_key(
        &self,
        call: &CallMsg,
        req: &CallRequest,
    ) -> Option<(String, crate::config::CacheConfig)> {
        let (cc, scope) = self.cfg.cache_of(&call.category)?;
        Some((store::cache::key(&self.name, req, scope), cc.clone()))
    }

    /// A ready answer under `key`, or whether this call holds the claim
    /// to make it. While another process's identical call is under way, wait
    /// for its answer (telling JetStream we are working), up to the cache's
    /// `wait` (default: the provider's timeout); then call anyway.
    async fn look_up<H: Hold>(
        &self,
        hold: &H,
        call: &CallMsg,
        key: &str,
        cc: &crate::config::CacheConfig,
    ) -> Result<Looked> {
        let deadline = Instant::now() + cc.wait().unwrap_or(self.provider_timeout);
        let mut progress = Instant::now();
        loop {
            if let Some(e) = store::cache::hit(&self.pool, key).await? {
                return Ok(Looked::Hit(e));
            }
            let who = (
                call.category.as_str(),
                self.name.as_str(),
                call.model.as_str(),
            );
            let hold_for = self.provider_timeout * 2 + BUSY_MARGIN;
            match store::cache::claim(&self.pool, key, who, cache_owner(), hold_for).await? {
                store::cache::Claim::Mine => return Ok(Looked::Call { claimed: true }),
                store::cache::Claim::Ready => continue,
                store::cache::Claim::Busy => {}
            }
            if Instant::now() >= deadline || self.token.is_cancelled() {
                debug!("an identical call is still under way elsewhere; calling anyway");
                return Ok(Looked::Call { claimed: false });
            }
            if progress.elapsed() >= self.cfg.ack_wait() / 3 {
                hold.progress().await;
                progress = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The step answered from the cache: a `cached` cost record (cost 0;
    /// the tokens and prices say what it saved), then on as after a call.
    async fn answer_from_cache<H: Hold>(
        &self,
        hold: &H,
        call: &CallMsg,
        attempt: i32,
        prices: crate::pricing::Prices,
        entry: store::cache::Entry,
    ) -> Settlement {
        let mut row = self.cost_row(call, attempt, prices, None);
        row.usage = entry.usage();
        row.outcome = CallOutcome::Cached;
        self.count_call(&row, false);
        let record = self.answered(call, &mut row, entry.output, entry.finish_reason);
        self.after_step(hold, call, Some(record), Vec::new(), Some(row))
            .await
    }

    /// Keep an accepted answer (validated, paid for) for identical calls.
    async fn fill_cache(
        &self,
        cache: Option<&(String, crate::config::CacheConfig)>,
        call: &CallMsg,
        record: &StepRecord,
        row: &CallRow,
    ) {
        let (Some((key, cc)), Some(output)) = (cache, record.output.as_deref()) else {
            return;
        };
        let who = (
            call.category.as_str(),
            self.name.as_str(),
            call.model.as_str(),
        );
        if let Err(e) = store::cache::fill(
            &self.pool,
            key,
            who,
            output,
            record.reason.as_deref(),
            &row.usage,
            row.cost(),
            cc.ttl(),
        )
        .await
        {
            warn!(error = %format!("{e:#}"), "could not store the answer in the response cache");
        }
    }

    /// Give up this process's claim on a cache key (its call failed).
    async fn release_cache(&self, cache: Option<&(String, crate::config::CacheConfig)>) {
        if let Some((key, _)) = cache {
            if let Err(e) = store::cache::release(&self.pool, key, cache_owner()).await {
                debug!(error = %format!("{e:#}"), "could not release a response cache claim");
            }
        }
    }

    /// A job past its `expires_at` with no call made yet ends `expired`
    /// here, before any provider is called; a started one goes on.
    async fn expired(&self, call: &CallMsg) -> Option<Settlement> {
        let at = call
            .expires_at_ms
            .filter(|t| *t <= crate::clock::now_ms())?;
        match store::jobs::has_calls(&self.pool, &call.job_id).await {
            Ok(true) => None,
            Ok(false) => {
                let when = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(at).unwrap_or(0)),
                );
                debug!("the job expired before it started");
                Some(Settlement::rows(vec![Row::Status(StatusRow {
                    job_id: call.job_id.clone(),
                    status: JobStatus::Expired,
                    error: Some(format!("not started by its expires_at ({when})")),
                    ..Default::default()
                })]))
            }
            Err(e) => {
                self.writer.report_failure(&e);
                Some(Settlement::failed(&e))
            }
        }
    }

    /// The step record of an answer: accepted, or failed when it does not
    /// follow the job's `response_format` (the call stays recorded as the
    /// paid answer it was, with the validation error; what follows a
    /// failed step, such as the next fallback target, is the route's).
    fn answered(
        &self,
        call: &CallMsg,
        row: &mut CallRow,
        text: String,
        finish_reason: Option<String>,
    ) -> StepRecord {
        let invalid = call
            .response_format(&self.cfg)
            .and_then(|rf| crate::structured::check_answer(rf, &text).err());
        match invalid {
            None => StepRecord {
                step: call.step,
                model: call.model.clone(),
                outcome: StepOutcome::Ok,
                output: Some(text),
                reason: finish_reason,
            },
            Some(e) => {
                let why = format!("invalid output: {e}");
                debug!(%why, "the answer does not follow the job's response_format");
                row.error = Some(why.clone());
                StepRecord {
                    step: call.step,
                    model: call.model.clone(),
                    outcome: StepOutcome::Failed,
                    output: None,
                    reason: Some(why),
                }
            }
        }
    }

    /// A call's cost record before the provider has answered.
    fn cost_row(
        &self,
        call: &CallMsg,
        attempt: i32,
        prices: crate::pricing::Prices,
        batch_id: Option<String>,
    ) -> CallRow {
        CallRow {
            job_id: call.job_id.clone(),
            category: call.category.clone(),
            provider: self.name.clone(),
            model: call.model.clone(),
            step: call.step,
            attempt,
            usage: Usage::default(),
            prices,
            latency_ms: 0,
            http_status: None,
            outcome: CallOutcome::Ok,
            error: None,
            batch_id,
        }
    }

    /// What a provider's batch made of this call (`result`): its cost row at
    /// the batch prices, then the job goes on as after a real-time answer.
    /// An item the batch did not answer (a retryable error, expired,
    /// cancelled, missing) is sent real-time when the job's deadline leaves
    /// time for it, else its step fails with the reason; a terminal error
    /// fails the step. An answer for a step recorded meanwhile, or for a
    /// finished job, is recorded (it was paid for) and goes no further.
    async fn batch_result<H: Hold>(
        &self,
        hold: &H,
        call: &CallMsg,
        result: &crate::bus::BatchResult,
    ) -> Settlement {
        use crate::bus::BatchOutcome;
        let prices = self
            .cfg
            .models
            .get(&call.model)
            .map(|m| m.prices().batch())
            .unwrap_or(crate::pricing::Prices {
                input_per_mtok: rust_decimal::Decimal::ZERO,
                output_per_mtok: rust_decimal::Decimal::ZERO,
                cached_input_per_mtok: rust_decimal::Decimal::ZERO,
                cache_write_per_mtok: rust_decimal::Decimal::ZERO,
            });
        let mut row = self.cost_row(call, result.attempt, prices, Some(result.batch_id.clone()));
        // Not answered, and why: (reason, may another call help).
        let unanswered = match &result.outcome {
            BatchOutcome::Answered { usage, .. } => {
                row.usage = *usage;
                row.http_status = Some(200);
                None
            }
            BatchOutcome::Failed {
                error,
                retryable,
                http_status,
            } => Some((
                format!("batch item failed: {error}"),
                *retryable,
                *http_status,
            )),
            BatchOutcome::Expired => Some(("the batch expired first".to_string(), true, None)),
            BatchOutcome::Cancelled => Some(("the batch was cancelled".to_string(), true, None)),
            BatchOutcome::Missing => {
                Some(("the batch ended without this item".to_string(), true, None))
            }
        };
        if let Some((why, retryable, status)) = &unanswered {
            row.outcome = if *retryable {
                CallOutcome::RetryableError
            } else {
                CallOutcome::TerminalError
            };
            row.error = Some(why.clone());
            row.http_status = status.map(i32::from);
        }
        self.count_call(&row, false);
        match self.recorded(call).await {
            Ok(Recorded::No) => {}
            Ok(Recorded::JobFinished | Recorded::Step(_)) => {
                debug!("batch result for a step already settled: recorded, no further");
                return Settlement::rows(vec![Row::Call(row)]);
            }
            Err(e) => {
                self.writer.report_failure(&e);
                return Settlement::failed(&e);
            }
        }
        let record = match (&result.outcome, unanswered) {
            (
                BatchOutcome::Answered {
                    text,
                    finish_reason,
                    ..
                },
                _,
            ) => self.answered(call, &mut row, text.clone(), finish_reason.clone()),
            (_, Some((why, true, _))) if self.time_for_realtime(call) => {
                // Real time, as the next attempt of the same step.
                let mut again = call.clone();
                again.batch = false;
                again.batch_result = None;
                again.attempt_base = u32::try_from(result.attempt).unwrap_or(0);
                debug!(%why, "batch item not answered; sending it real-time");
                return Settlement::finished(flow::Effects {
                    rows: vec![
                        Row::Call(row),
                        Row::Status(StatusRow {
                            job_id: call.job_id.clone(),
                            status: JobStatus::Running,
                            ..Default::default()
                        }),
                    ],
                    calls: vec![again],
                    ..Default::default()
                });
            }
            (_, why) => StepRecord {
                step: call.step,
                model: call.model.clone(),
                outcome: StepOutcome::Failed,
                output: None,
                reason: Some(match why {
                    Some((why, true, _)) => {
                        format!("{why}, and the job's deadline leaves no time to call again")
                    }
                    Some((why, false, _)) => why,
                    None => "batch item not answered".into(),
                }),
            },
        };
        if record.outcome == StepOutcome::Ok {
            let cache = self.cache_key(call, &call.request(&self.cfg));
            self.fill_cache(cache.as_ref(), call, &record, &row).await;
        }
        self.after_step(hold, call, Some(record), Vec::new(), Some(row))
            .await
    }

    /// Whether a real-time call could still answer before the job's
    /// deadline (the provider's timeout from now).
    fn time_for_realtime(&self, call: &CallMsg) -> bool {
        call.deadline_ms.is_none_or(|d| {
            d > crate::clock::now_ms()
                + self.provider_timeout.as_millis().min(i64::MAX as u128) as i64
        })
    }

    /// Make the call and fill its cost row; settle the limiter with what
    /// the provider said (usage, rate-limit state, a wait it asked for).
    async fn call_provider(
        &self,
        req: &CallRequest,
        mut row: CallRow,
        admission: Admission,
    ) -> (CallRow, Outcome, Option<CallResponse>) {
        let started = Instant::now();
        let result = self.provider.call(req).await;
        row.latency_ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
        let (outcome, response) = match result {
            Ok(resp) => {
                let seen = Seen::from_rate(&resp.rate, false, resp.rate.exhausted_for());
                let used = (resp.usage.input_tokens, resp.usage.output_tokens);
                self.limiter.finish(admission, Some(used), seen).await;
                row.usage = resp.usage;
                row.http_status = Some(i32::from(resp.http_status));
                (Outcome::Success, Some(resp))
            }
            Err(e) => {
                // A failed call: no usage we know of.
                let limited = e.class == ErrorClass::RateLimited;
                let pause = e.retry_after.or_else(|| e.rate.exhausted_for());
                let seen = Seen::from_rate(&e.rate, limited, pause);
                self.limiter.finish(admission, None, seen).await;
                row.http_status = e.http_status.map(i32::from);
                row.outcome = if e.retryable {
                    CallOutcome::RetryableError
                } else {
                    CallOutcome::TerminalError
                };
                row.error = Some(e.to_string());
                if e.retryable {
                    debug!(error = %e, "provider call failed; retryable");
                } else {
                    warn!(error = %e, "provider call failed");
                }
                let outcome = if e.retryable {
                    Outcome::Retryable {
                        retry_after: e.retry_after,
                        error: e.to_string(),
                    }
                } else {
                    Outcome::Terminal {
                        error: e.to_string(),
                    }
                };
                (outcome, None)
            }
        };

        (row, outcome, response)
    }

    /// Claim the step: wait for the limiter (or give the step up as too
    /// slow), then record the call's intent, which is the check-and-claim
    /// across processes. `Ok` with the admission and the attempt number the
    /// intent took; `Err` with how the message settles instead.
    /// `deliveries_left`: how many more times JetStream would deliver it.
    #[allow(clippy::too_many_arguments)]
    async fn claim<H: Hold>(
        &self,
        hold: &H,
        call: &CallMsg,
        estimate: u64,
        row: &CallRow,
        deliveries_left: i64,
        ticket: crate::limits::lane::Ticket,
        prior: &mut Prior,
    ) -> Result<(Admission, i32), Settlement> {
        let attempt = row.attempt;
        // How long an intent counts as a call under way.
        let busy_for = self.provider_timeout + BUSY_MARGIN;
        let mut ticket = Some(ticket);
        loop {
            // A fallback step whose lane would make it wait too long moves on.
            let max_wait = call
                .plan
                .max_wait()
                .filter(|_| call.plan.may_skip(call.step));
            if let Err(wait) = Box::pin(self.limiter.claim(
                &call.model,
                estimate,
                u64::from(call.max_tokens),
                max_wait,
            ))
            .await
            {
                let record = StepRecord {
                    step: call.step,
                    model: call.model.clone(),
                    outcome: StepOutcome::TooSlow,
                    output: None,
                    reason: Some(format!(
                        "lane `{}` would wait {:.1}s, over max_wait {:.1}s",
                        self.name,
                        wait.as_secs_f64(),
                        max_wait.unwrap_or_default().as_secs_f64()
                    )),
                };
                return Err(
                    Box::pin(self.after_step(hold, call, Some(record), Vec::new(), None)).await,
                );
            }

            // Wait for the limiter, telling JetStream we are still working, and
            // giving the message back at once if the worker is stopping.
            let admission = {
                let mut admit = Box::pin(self.limiter.admit(
                    &call.model,
                    estimate,
                    u64::from(call.max_tokens),
                ));
                let mut tick = tokio::time::interval(self.cfg.ack_wait() / 3);
                tick.tick().await;
                loop {
                    tokio::select! {
                        a = &mut admit => break a,
                        _ = self.token.cancelled() => return Err(Settlement::Nak(None)),
                        _ = tick.tick() => Box::pin(hold.progress()).await,
                    }
                }
            };
            drop(ticket.take()); // admitted: no longer waiting
                                 // It may have waited here past its job's `expires_at`.
            if let Some(s) = Box::pin(self.expired(call)).await {
                Box::pin(self.limiter.settle(admission, Some((0, 0)))).await;
                return Err(s);
            }

            // Record the intent first: if this process dies while the provider
            // answers, the call is still in `calls` (outcome `unknown`, at the
            // reserved cost).
            let intent = Row::Intent {
                row: CallRow {
                    attempt,
                    usage: Usage {
                        input_tokens: estimate,
                        output_tokens: u64::from(call.max_tokens),
                        ..Usage::default()
                    },
                    outcome: CallOutcome::Unknown,
                    ..row.clone()
                },
                busy_for,
            };
            let mut rows = prior.rows.take().unwrap_or_default();
            let with_job = !rows.is_empty();
            rows.push(intent);
            match Box::pin(self.commit(hold, rows)).await {
                Ok(c) => {
                    if with_job {
                        prior.status = c.job_status.get(&call.job_id).copied();
                    }
                    if let Some(a) = c.attempts.get(&(call.job_id.clone(), call.step)) {
                        return Ok((admission, *a));
                    }
                }
                Err(e) => {
                    Box::pin(self.limiter.settle(admission, Some((0, 0)))).await;
                    return Err(Settlement::failed(&e));
                }
            }
            // The job ended or the step is answered (settled at once), or
            // another worker's intent holds the step: that worker is calling
            // it right now (this message's ack wait ran out while it waited
            // there, and JetStream delivered it again), or it died calling
            // and its intent stands until it is too old to be alive.
            Box::pin(self.limiter.settle(admission, Some((0, 0)))).await;
            if let Some(s) = Box::pin(self.done_already(hold, call)).await {
                return Err(s);
            }
            // Give the message back until the intent stops counting rather
            // than hold it here: a worker holding it may be killed in turn,
            // and JetStream counts each such redelivery toward max_deliver
            // (a killed worker's steps could run out of deliveries while
            // their intents stood). Held here only when that return would
            // be the message's last delivery, or the intent is just ending.
            if deliveries_left >= 2 {
                match store::jobs::busy_left(&self.pool, &call.job_id, call.step, busy_for).await {
                    Ok(Some(left)) if left > Duration::from_secs(1) => {
                        debug!(?left, "step held by another attempt's intent; giving the message back until it ends");
                        return Err(Settlement::Nak(Some(left + Duration::from_millis(500))));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(self.read_failed(&e)),
                }
            }
            debug!("step being called elsewhere; holding the message");
            Box::pin(hold.progress()).await;
            tokio::select! {
                _ = self.token.cancelled() => return Err(Settlement::Nak(None)),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// This call in the process's metrics.
    fn count_call(&self, row: &CallRow, rate_limited: bool) {
        use rust_decimal::prelude::ToPrimitive;
        let m = crate::metrics::global();
        let (p, model) = (self.name.as_str(), row.model.as_str());
        m.inc(
            "switchyard_calls_total",
            &[
                ("provider", p),
                ("model", model),
                ("outcome", row.outcome.as_str()),
            ],
            1.0,
        );
        if rate_limited {
            m.inc(
                "switchyard_rate_limited_total",
                &[("provider", p), ("model", model)],
                1.0,
            );
        }
        for (direction, n) in [
            ("input", row.usage.input_tokens),
            ("output", row.usage.output_tokens),
        ] {
            m.inc(
                "switchyard_tokens_total",
                &[("provider", p), ("model", model), ("direction", direction)],
                n as f64,
            );
        }
        m.inc(
            "switchyard_cost_usd_total",
            &[("provider", p), ("model", model)],
            row.cost().to_f64().unwrap_or(0.0),
        );
        m.observe(
            "switchyard_call_latency_seconds",
            &[("provider", p), ("model", model)],
            f64::from(row.latency_ms) / 1000.0,
        );
    }

    /// Whether this call's work is done already, and if so, handle the
    /// message (ack it, or resume the job from what is recorded). A
    /// redelivery may follow a crash after the commit but before the ack:
    /// then the job is finished, or this step is recorded, and must not be
    /// paid for twice. Every call checks, even a first delivery: a NATS
    /// server that crashed can forget acks and deliver an answered call
    /// again as new, and a follow-up call may have been published twice.
    async fn done_already<H: Hold>(&self, hold: &H, call: &CallMsg) -> Option<Settlement> {
        match self.recorded(call).await {
            Ok(Recorded::JobFinished) => Some(Settlement::Ack),
            Ok(Recorded::Step(history)) => {
                debug!("step already recorded; resuming from the database");
                Some(self.after_step(hold, call, None, history, None).await)
            }
            Ok(Recorded::No) => None,
            Err(e) => Some(self.read_failed(&e)),
        }
    }

    /// A read of the job's state failed: try the message again shortly
    /// (and stop taking work if the database is away).
    fn read_failed(&self, e: &anyhow::Error) -> Settlement {
        warn!(error = %format!("{e:#}"), "status check failed; will retry");
        self.writer.report_failure(e);
        Settlement::Nak(Some(Duration::from_secs(1)))
    }

    /// Whether this call's work is already done.
    async fn recorded(&self, call: &CallMsg) -> Result<Recorded> {
        if let Some(s) = store::job_status(&self.pool, &call.job_id).await? {
            if s.is_terminal() {
                return Ok(Recorded::JobFinished);
            }
        }
        if !call.plan.records_steps() {
            // Single jobs record no steps: finished means terminal.
            return Ok(Recorded::No);
        }
        let steps = store::load_steps(&self.pool, &call.job_id).await?;
        Ok(if steps.iter().any(|r| r.step == call.step) {
            Recorded::Step(steps)
        } else {
            Recorded::No
        })
    }

    /// A step ended (`record`, with its cost row `call_row`), or was found
    /// recorded (`record` None, `history` from the database): commit what it
    /// means, publish what follows, then ack.
    async fn after_step<H: Hold>(
        &self,
        hold: &H,
        call: &CallMsg,
        record: Option<StepRecord>,
        history: Vec<StepRecord>,
        call_row: Option<CallRow>,
    ) -> Settlement {
        let ctx = JobCtx::of_call(call);
        let mut rows: Vec<Row> = call_row.map(Row::Call).into_iter().collect();
        let parallel = call.plan.runs_steps_in_parallel();
        let records = call.plan.records_steps();
        let history = match record {
            None => history,
            Some(rec) => {
                if records {
                    rows.push(Row::Step(StepRow {
                        job_id: call.job_id.clone(),
                        record: rec.clone(),
                    }));
                }
                if parallel {
                    // Votes arrive in parallel: commit this one, then read them all.
                    if let Err(e) = self.commit(hold, std::mem::take(&mut rows)).await {
                        return Settlement::failed(&e);
                    }
                    match store::load_steps(&self.pool, &call.job_id).await {
                        Ok(h) => h,
                        Err(e) => {
                            self.writer.report_failure(&e);
                            return Settlement::failed(&e);
                        }
                    }
                } else {
                    let mut h = call.history.clone();
                    h.push(rec);
                    h
                }
            }
        };
        let decision = route::next(&call.plan, &call.conv, &history);
        // A job the classifier moves to a category meets that category's budget.
        let verdict = match &decision {
            route::Decision::Reclassify { category, .. } => {
                match self.budget.verdict(&self.cfg, category).await {
                    Ok(v) => v,
                    Err(e) => {
                        self.writer.report_failure(&e);
                        return Settlement::failed(&e);
                    }
                }
            }
            _ => None,
        };
        let mut fx = flow::effects_budgeted(
            &self.cfg,
            &self.routes,
            &ctx,
            &history,
            decision,
            verdict.as_ref(),
        );
        rows.append(&mut fx.rows);
        fx.rows = rows;
        Settlement::finished(fx)
    }
}
