//! The dispatcher: consumes `<prefix>.jobs.>`, validates each job, stores it
//! (or dead-letters it), asks the router for the first call and publishes
//! that call to its provider lane. A job message is acked only after its row
//! is committed and its call is accepted by JetStream, or, when the call
//! went straight to a free lane of this process ([`Direct`]), after the
//! call's final commit.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::Message;
use tracing::{warn, Instrument};

use crate::pipeline::lane::LaneStep;

use serde_json::json;

use crate::bus::{published_ms, Bus};
use crate::config::{Config, AUTO_CATEGORY};
use crate::envelope::{parse_job, Parsed, ValidJob};
use crate::limits::budget::Verdict;
use crate::pipeline::flow::{self, JobCtx};
use crate::pipeline::settle::{Settlement, Settler};
use crate::route::{self, Routes};
use crate::store::{DeadLetterRow, JobRow, JobStatus, Row, Writer};
use tokio_util::sync::CancellationToken;

/// A valid job stored (its row written) and routed, counted once: not a
/// duplicate of a finished job, nor a parked one (`category` None).
fn count_received(stored: bool, status: Option<JobStatus>, category: Option<String>) {
    if let (true, Some(category)) = (stored, category) {
        if !status.is_some_and(|s| s.is_terminal()) {
            crate::metrics::global().inc(
                "switchyard_jobs_received_total",
                &[("category", category.as_str())],
                1.0,
            );
        }
    }
}

/// Redeliveries of one job message before JetStream gives up on it (each
/// one only happens when Postgres or NATS failed while handling it).
pub const DISPATCH_MAX_DELIVER: i64 = 20;

#[derive(Clone)]
pub struct Dispatcher {
    cfg: Arc<Config>,
    routes: Arc<Routes>,
    /// Settles its messages; its `bus` is also where the dispatcher consumes.
    settler: Settler,
    budget: Arc<crate::limits::budget::Book>,
    /// This process's lanes, when jobs' first calls may go to them directly.
    direct: Option<Arc<Direct>>,
}

/// Direct calls: a job whose plan starts with one real-time call, to a
/// provider whose lane runs in this process and is free (see
/// [`LaneStep::try_ready`]: not paused, a concurrency slot open, no backlog
/// of calls waiting for admission), has that call made
/// here, without the calls stream (one JetStream message fewer), and the
/// job's row committed with the call's intent (one commit fewer). The job
/// message is held (progress acks) until the call's final commit, then
/// acked: a crash gives it back, and its next delivery goes the usual way.
/// At most `dispatcher.direct_calls` at once; the rest go through the
/// stream, as do retries (the job message comes back after the delay) and
/// every later step.
pub struct Direct {
    lanes: std::collections::HashMap<String, Arc<LaneStep>>,
    slots: Arc<tokio::sync::Semaphore>,
    tracker: tokio_util::task::TaskTracker,
}

impl Direct {
    /// `None` when there is nothing to hand calls to (no lane here, or
    /// `dispatcher.direct_calls = 0`).
    pub fn new(
        cfg: &Config,
        lanes: std::collections::HashMap<String, Arc<LaneStep>>,
        tracker: tokio_util::task::TaskTracker,
    ) -> Option<Arc<Self>> {
        (cfg.dispatcher.direct_calls > 0 && !lanes.is_empty()).then(|| {
            Arc::new(Self {
                lanes,
                slots: Arc::new(tokio::sync::Semaphore::new(cfg.dispatcher.direct_calls)),
                tracker,
            })
        })
    }
}

impl Dispatcher {
    pub fn new(
        cfg: Arc<Config>,
        routes: Arc<Routes>,
        bus: Bus,
        writer: Writer,
        token: CancellationToken,
        budget: Arc<crate::limits::budget::Book>,
    ) -> Self {
        Self {
            settler: Settler { bus, writer, token },
            cfg,
            routes,
            budget,
            direct: None,
        }
    }

    /// Hand jobs' first calls to these lanes when they are free (see [`Direct`]).
    pub fn with_direct(mut self, direct: Option<Arc<Direct>>) -> Self {
        self.direct = direct;
        self
    }

    pub async fn consumer(&self) -> Result<PullConsumer> {
        let bus = &self.settler.bus;
        let n = &bus.names;
        bus.pull_consumer(
            &n.jobs_stream(),
            n.dispatcher_consumer(),
            &n.jobs_wildcard(),
            self.cfg.ack_wait(),
            DISPATCH_MAX_DELIVER,
            (self.cfg.dispatcher.concurrency
                + self.cfg.writer.batch_size
                + self.cfg.dispatcher.direct_calls) as i64,
        )
        .await
    }

    /// Handle one job message. Never panics on its content.
    pub async fn handle(&self, mut msg: Message) {
        let (stream, seq, published, delivered) = match msg.info() {
            Ok(i) => (
                i.stream.to_string(),
                i.stream_sequence,
                published_ms(&i),
                i.delivered,
            ),
            Err(e) => {
                warn!(error = %e, "job message without JetStream metadata; dropping");
                let _ = msg.ack().await;
                return;
            }
        };
        let subject = msg.subject.to_string();
        let category = self.settler.bus.names.category_of(&subject).to_string();
        let parsed = parse_job(
            &msg.payload,
            &category,
            &format!("{stream}-{seq}"),
            &self.cfg.limits,
            |c| self.cfg.accepts_category(c),
            crate::clock::now_ms(),
            &self.cfg.webhooks.allow_hosts,
        );
        let parsed = match parsed {
            Parsed::Valid(job) => match self.unanswerable(&job) {
                Some(reason) => Parsed::Rejected {
                    id: Some(job.id),
                    category: Some(job.category),
                    reason,
                },
                None => Parsed::Valid(job),
            },
            rejected => rejected,
        };
        let span =
            tracing::info_span!("job", job_id = tracing::field::Empty, category = %category, seq);
        async move {
            match parsed {
                Parsed::Valid(job) => {
                    tracing::Span::current().record("job_id", job.id.as_str());
                    let id = job.id.clone();
                    let (settlement, received) = match self.accept(*job, published).await {
                        Ok(s) => s,
                        Err(e) => {
                            warn!(error = %format!("{e:#}"), "job not dispatched; will retry");
                            (Settlement::Nak(Some(Duration::from_secs(1))), None)
                        }
                    };
                    // Only a first delivery: a job message given back goes the usual way.
                    let (settlement, received) = match (delivered, received) {
                        (1, Some(category)) => match self.try_direct(msg, settlement, category) {
                            Ok(()) => return,
                            Err((m, s, category)) => {
                                msg = m;
                                (s, Some(category))
                            }
                        },
                        (_, received) => (settlement, received),
                    };
                    let committed = self.settler.settle(&msg, settlement).await;
                    let stored = committed.is_some();
                    let status = committed.and_then(|c| c.job_status.get(&id).copied());
                    count_received(stored, status, received);
                }
                Parsed::Rejected {
                    id,
                    category: cat,
                    reason,
                } => {
                    warn!(job_id = ?id, %reason, "job dead-lettered");
                    let mut rows = vec![Row::DeadLetter(DeadLetterRow {
                        source: format!("{stream}:{seq}"),
                        subject: subject.clone(),
                        job_id: id.clone(),
                        payload: msg.payload.to_vec(),
                        reason: reason.to_string(),
                    })];
                    if let Some(id) = id {
                        let envelope = (msg.payload.len() <= self.cfg.limits.max_payload_bytes)
                            .then(|| serde_json::from_slice::<serde_json::Value>(&msg.payload).ok())
                            .flatten();
                        rows.push(Row::Job(JobRow {
                            id,
                            category: cat.unwrap_or(category.clone()),
                            status: JobStatus::Dead,
                            envelope,
                            route_decision: None,
                            error: Some(reason.to_string()),
                            enqueued_at_ms: published,
                            variant: None,
                            // Its envelope, callback included, was not valid.
                            callback_url: None,
                        }));
                    }
                    let settled = self.settler.settle(&msg, Settlement::rows(rows)).await;
                    if settled.is_some() {
                        crate::metrics::global().inc(
                            "switchyard_jobs_finished_total",
                            &[("category", category.as_str()), ("status", "dead")],
                            1.0,
                        );
                    }
                }
            }
        }
        .instrument(span)
        .await;
    }

    /// Hand the job's first call to a free lane of this process (see
    /// [`Direct`]), in a task of its own; everything back when it cannot go.
    #[allow(clippy::result_large_err)]
    fn try_direct(
        &self,
        msg: Message,
        s: Settlement,
        category: String,
    ) -> Result<(), (Message, Settlement, String)> {
        let Some(direct) = self.direct.clone() else {
            return Err((msg, s, category));
        };
        let lane = match &s {
            Settlement::Commit {
                effects,
                retry_in: None,
                ..
            } if effects.calls.len() == 1 && effects.done.is_none() && effects.review.is_none() => {
                let c = &effects.calls[0];
                (!c.batch && c.batch_result.is_none())
                    .then(|| direct.lanes.get(&c.provider).cloned())
                    .flatten()
            }
            _ => None,
        };
        let Some(lane) = lane else {
            return Err((msg, s, category));
        };
        let Ok(slot) = direct.slots.clone().try_acquire_owned() else {
            return Err((msg, s, category));
        };
        let Some(ticket) = lane.try_ready() else {
            return Err((msg, s, category));
        };
        let (rows, call) = match s {
            Settlement::Commit { mut effects, .. } => match effects.calls.pop() {
                Some(call) => (effects.rows, call),
                None => return Err((msg, Settlement::finished(effects), category)),
            },
            other => return Err((msg, other, category)),
        };
        let settler = self.settler.clone();
        let provider = call.provider.clone();
        let id = call.job_id.clone();
        direct.tracker.spawn(
            async move {
                let (settlement, status) = lane.direct(&msg, call, rows, ticket).await;
                let committed = settler.settle(&msg, settlement).await;
                let stored = status.is_some() || committed.is_some();
                let status =
                    status.or_else(|| committed.and_then(|c| c.job_status.get(&id).copied()));
                count_received(stored, status, Some(category));
                crate::metrics::global().inc(
                    "switchyard_direct_calls_total",
                    &[("provider", provider.as_str())],
                    1.0,
                );
                drop(slot);
            }
            .in_current_span(),
        );
        Ok(())
    }

    /// Why a job's messages could not travel in its call messages, if they
    /// could not: a call message carries them up to twice (the call's and
    /// the conversation's for later steps) and must fit the NATS server's
    /// `max_payload`. Inline images are what gets that large.
    fn too_large_to_travel(&self, job: &ValidJob) -> Option<String> {
        let messages = job.envelope.messages.as_ref()?;
        let bytes = serde_json::to_vec(messages).map_or(0, |v| v.len());
        let max = self.settler.bus.client.server_info().max_payload;
        (max > 0 && 2 * bytes + 16 * 1024 > max).then(|| {
            format!(
                "the job's messages ({} KiB) would not fit a call message under the NATS \
                 server's max_payload ({} KiB): send large images by `url`, or raise max_payload",
                bytes / 1024,
                max / 1024
            )
        })
    }

    /// Why a valid job cannot be worked on after all, if it cannot:
    /// messages too large to travel, or its own `response_format` a model
    /// that may answer it (its category's routes) cannot honour.
    /// Dead-lettered before any call. (A category's own format is checked
    /// at config load.)
    fn unanswerable(&self, job: &ValidJob) -> Option<crate::envelope::Rejection> {
        use crate::envelope::Rejection;
        if let Some(why) = self.too_large_to_travel(job) {
            return Some(Rejection::BadImage(why));
        }
        let rf = job.envelope.response_format.as_ref()?;
        self.cfg
            .format_unanswerable(&job.category, rf)
            .map(Rejection::BadResponseFormat)
    }

    /// What a valid job comes to: its row (and park), and its first calls
    /// unless it is parked; with the category to count it under, unless parked.
    async fn accept(&self, job: ValidJob, published: i64) -> Result<(Settlement, Option<String>)> {
        let (cfg, routes) = (&self.cfg, &*self.routes);
        let env = &job.envelope;
        // Job control: expired before it started, or not yet due.
        let now = crate::clock::now_ms();
        let waiting = |error: Option<String>| JobRow {
            id: job.id.clone(),
            category: job.category.clone(),
            status: JobStatus::Queued,
            envelope: serde_json::to_value(env).ok(),
            route_decision: None,
            error,
            enqueued_at_ms: published,
            variant: None,
            callback_url: cfg.callback_url(&job.category, env.callback_url.as_deref()),
        };
        if job.expires_at_ms.is_some_and(|t| t <= now) {
            let why = format!(
                "not started by its expires_at ({})",
                env.expires_at.as_deref().unwrap_or("")
            );
            let rows = vec![
                Row::Job(waiting(None)),
                Row::Status(crate::store::StatusRow {
                    job_id: job.id.clone(),
                    status: JobStatus::Expired,
                    error: Some(why),
                    ..Default::default()
                }),
            ];
            return Ok((Settlement::rows(rows), Some(job.category.clone())));
        }
        if let Some(not_before_ms) = job.not_before_ms.filter(|t| *t > now) {
            // Stored and acked: the worker's scheduler publishes it again when due.
            let rows = vec![
                Row::Job(waiting(None)),
                Row::Schedule {
                    job_id: job.id.clone(),
                    not_before_ms,
                },
            ];
            return Ok((Settlement::rows(rows), None));
        }
        let raw_conv = env.conversation(None);
        let params = flow::JobParams {
            job_max_tokens: env.params.max_tokens,
            temperature: env.params.temperature,
            enqueued_at_ms: published,
            deadline_ms: job.deadline_ms,
            response_format: env.response_format.clone(),
            expires_at_ms: job.expires_at_ms,
            priority: env.priority,
        };
        let start = |category: &str, classifier: Option<serde_json::Value>| {
            flow::start(
                cfg,
                routes,
                &job.id,
                category,
                &raw_conv,
                params.clone(),
                classifier,
            )
            .ok_or_else(|| anyhow::anyhow!("category `{category}` has no usable route"))
        };
        let (ctx, log, variant) = if job.category == AUTO_CATEGORY {
            let input = route::input_text(&raw_conv);
            match routes.classify_by_rules(&input) {
                Some((category, rule)) => start(
                    &category,
                    Some(
                        json!({"category": category, "confidence": 1.0, "by": "rule", "rule": rule}),
                    ),
                )?,
                None => match routes.classify_plan() {
                    Some(Ok(plan)) => {
                        let log = json!({
                            "kind": plan.kind(),
                            "category": AUTO_CATEGORY,
                            "plan": plan,
                            "reason": "no classifier rule matched; asking the classifier model",
                        });
                        let ctx = JobCtx {
                            job_id: job.id.clone(),
                            category: AUTO_CATEGORY.to_string(),
                            plan,
                            conv: raw_conv.clone(),
                            job_max_tokens: params.job_max_tokens,
                            temperature: params.temperature,
                            enqueued_at_ms: published,
                            deadline_ms: params.deadline_ms,
                            response_format: params.response_format.clone(),
                            expires_at_ms: params.expires_at_ms,
                            priority: params.priority,
                        };
                        (ctx, log, None)
                    }
                    Some(Err(default)) => start(
                        &default,
                        Some(
                            json!({"category": default, "confidence": 0.0, "by": "default",
                                    "reason": "no rule matched and no classifier model"}),
                        ),
                    )?,
                    None => {
                        anyhow::bail!("category `auto` needs a [classifier] section in the config")
                    }
                },
            }
        } else {
            start(&job.category, None)?
        };
        let (mut ctx, mut log) = (ctx, log);
        // The category's budget: downgrade to a cheaper model, or park.
        let mut rows = Vec::new();
        if let Some(v) = self.budget.verdict(cfg, &ctx.category).await? {
            let park = v.apply(routes, &mut ctx.plan, &mut log);
            if park || matches!(v, Verdict::Within { pausable: true }) {
                // Parked now, or (a resumed job) no longer.
                rows.push(Row::Park {
                    job_id: job.id.clone(),
                    parked: park,
                });
            }
        }
        if job.not_before_ms.is_some() && !rows.iter().any(|r| matches!(r, Row::Park { .. })) {
            // A scheduled job that is due: no longer parked.
            rows.push(Row::Park {
                job_id: job.id.clone(),
                parked: false,
            });
        }
        let row = JobRow {
            id: job.id.clone(),
            category: ctx.category.clone(),
            status: JobStatus::Queued,
            envelope: serde_json::to_value(env).ok(),
            route_decision: Some(log),
            error: None,
            enqueued_at_ms: published,
            variant,
            callback_url: cfg.callback_url(&ctx.category, env.callback_url.as_deref()),
        };
        let parked = rows
            .iter()
            .any(|r| matches!(r, Row::Park { parked: true, .. }));
        rows.insert(0, Row::Job(row));
        if parked {
            // Stored and acked; published again when the budget allows.
            return Ok((Settlement::rows(rows), None));
        }
        let first = route::next(&ctx.plan, &ctx.conv, &[]);
        let mut fx = flow::effects(cfg, routes, &ctx, &[], first);
        rows.append(&mut fx.rows);
        fx.rows = rows;
        Ok((
            Settlement::Commit {
                effects: fx,
                retry_in: None,
                unless_finished: Some(job.id.clone()),
            },
            Some(ctx.category.clone()),
        ))
    }
}
