//! Turning a routing [`Decision`] into effects: the rows to commit and, after
//! the commit, the calls to publish and the events to announce. Shared by
//! the dispatcher (first steps) and the lanes (what follows a step). No I/O.

use serde_json::json;

use crate::bus::{CallMsg, DoneEvent, ReviewEvent};
use crate::clock::now_ms;
use crate::config::Config;
use crate::envelope::Priority;
use crate::envelope::{Message, Role};
use crate::route::{self, Decision, Plan, Routes, StepRecord, Verdict, CLASSIFY_STEP};
use crate::store::{JobStatus, ReclassRow, ResultRow, Row, StatusRow};
use crate::structured::ResponseFormat;

/// Tokens the classifier may answer with.
pub const CLASSIFIER_MAX_TOKENS: u32 = 64;

/// What a job is, as far as routing is concerned.
#[derive(Debug, Clone)]
pub struct JobCtx {
    pub job_id: String,
    pub category: String,
    pub plan: Plan,
    /// System prompt and turns.
    pub conv: Vec<Message>,
    pub job_max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub enqueued_at_ms: i64,
    /// The job's deadline, in Unix milliseconds.
    pub deadline_ms: Option<i64>,
    /// The job's own `response_format` (else its category's applies).
    pub response_format: Option<ResponseFormat>,
    /// The job's `expires_at`, in Unix milliseconds.
    pub expires_at_ms: Option<i64>,
    pub priority: Priority,
}

/// Whether a call of a `category` job to `provider` goes through the
/// provider's batch API: the category's `delivery` says so (`batch`, or
/// `auto` with a deadline at least `batch.min_slack` away) and the provider
/// has one.
pub fn batched(cfg: &Config, category: &str, provider: &str, deadline_ms: Option<i64>) -> bool {
    use crate::config::{Delivery, ProviderKind};
    let Some(cat) = cfg.categories.get(category) else {
        return false;
    };
    let has_batches = cfg
        .providers
        .get(provider)
        .is_some_and(|p| p.kind != ProviderKind::Inproc);
    has_batches
        && match cat.delivery {
            Delivery::Realtime => false,
            Delivery::Batch => true,
            Delivery::Auto => deadline_ms.is_some_and(|d| {
                d - now_ms() >= cat.batch.min_slack().as_millis().min(i64::MAX as u128) as i64
            }),
        }
}

/// Rows to commit, then messages to publish and events to send.
#[derive(Debug, Default)]
pub struct Effects {
    pub rows: Vec<Row>,
    pub calls: Vec<CallMsg>,
    pub done: Option<DoneEvent>,
    pub review: Option<ReviewEvent>,
}

/// The decision log's `tried` list: every finished step, what it came to,
/// and why the route moved on from it.
pub fn tried(plan: &Plan, history: &[StepRecord]) -> serde_json::Value {
    let mut h: Vec<&StepRecord> = history.iter().collect();
    h.sort_by_key(|r| r.step);
    serde_json::Value::Array(
        h.into_iter()
            .map(|r| {
                let (outcome, why) = match (r.outcome, route::verdict(plan, r)) {
                    (route::StepOutcome::Ok, Verdict::Accepted) => ("ok", None),
                    (route::StepOutcome::Ok, Verdict::Rejected(why)) => ("rejected", Some(why)),
                    (route::StepOutcome::Failed, Verdict::Rejected(why)) => ("failed", Some(why)),
                    (route::StepOutcome::TooSlow, Verdict::Rejected(why)) => {
                        ("too_slow", Some(why))
                    }
                    (_, _) => ("ok", None),
                };
                let mut v = json!({"step": r.step, "model": r.model, "outcome": outcome});
                if let Some(w) = why {
                    v["reason"] = w.into();
                }
                v
            })
            .collect(),
    )
}

/// Merge a category's system prompt in front of a conversation's.
pub fn with_category_system(conv: &[Message], system: Option<&str>) -> Vec<Message> {
    let Some(system) = system else {
        return conv.to_vec();
    };
    let mut out = Vec::with_capacity(conv.len() + 1);
    match conv.first() {
        Some(m) if m.role == Role::System => {
            out.push(Message {
                role: Role::System,
                content: format!("{system}\n\n{}", m.content),
                parts: Vec::new(),
            });
            out.extend(conv[1..].iter().cloned());
        }
        _ => {
            out.push(Message {
                role: Role::System,
                content: system.to_string(),
                parts: Vec::new(),
            });
            out.extend(conv.iter().cloned());
        }
    }
    out
}

/// The effects of `decision` for a job whose finished steps are `history`.
pub fn effects(
    cfg: &Config,
    routes: &Routes,
    ctx: &JobCtx,
    history: &[StepRecord],
    decision: Decision,
) -> Effects {
    effects_budgeted(cfg, routes, ctx, history, decision, None)
}

/// [`effects`], where a job the classifier moves to a category meets that
/// category's budget `verdict` (downgraded, or parked instead of started).
pub fn effects_budgeted(
    cfg: &Config,
    routes: &Routes,
    ctx: &JobCtx,
    history: &[StepRecord],
    decision: Decision,
    verdict: Option<&crate::limits::budget::Verdict>,
) -> Effects {
    let mut fx = Effects::default();
    // A single-call job's log needs no `tried` list: its plan names the one target.
    let log = |plan: &Plan| plan.records_steps().then(|| tried(plan, history));
    match decision {
        Decision::Wait => {}
        Decision::Calls(calls) => {
            let max_tokens = ctx.job_max_tokens.unwrap_or_else(|| {
                cfg.categories
                    .get(&ctx.category)
                    .map_or(512, |c| c.max_tokens)
            });
            for c in calls {
                fx.calls.push(CallMsg {
                    format: crate::bus::CALL_FORMAT,
                    job_id: ctx.job_id.clone(),
                    category: ctx.category.clone(),
                    provider: c.target.provider.clone(),
                    model: c.target.model.clone(),
                    step: c.step,
                    messages: c.messages,
                    max_tokens: if c.step == CLASSIFY_STEP {
                        CLASSIFIER_MAX_TOKENS
                    } else {
                        max_tokens
                    },
                    temperature: ctx.temperature,
                    enqueued_at_ms: ctx.enqueued_at_ms,
                    plan: ctx.plan.clone(),
                    // A single call needs no conversation for later steps.
                    conv: if ctx.plan.records_steps() {
                        ctx.conv.clone()
                    } else {
                        Vec::new()
                    },
                    history: if ctx.plan.runs_steps_in_parallel() {
                        Vec::new()
                    } else {
                        history.to_vec()
                    },
                    job_max_tokens: ctx.job_max_tokens,
                    attempt_base: 0,
                    deadline_ms: ctx.deadline_ms,
                    batch: batched(cfg, &ctx.category, &c.target.provider, ctx.deadline_ms),
                    batch_result: None,
                    response_format: ctx.response_format.clone(),
                    expires_at_ms: ctx.expires_at_ms,
                    priority: ctx.priority,
                });
            }
        }
        Decision::Complete {
            output,
            model,
            step,
        } => {
            // The answer was checked against the format when it came in.
            let output_json = cfg
                .response_format(&ctx.category, ctx.response_format.as_ref())
                .and_then(|_| crate::structured::parse_answer(&output));
            fx.rows.push(Row::Result(ResultRow {
                job_id: ctx.job_id.clone(),
                category: ctx.category.clone(),
                output,
                output_json,
                model,
                answer_step: Some(step),
                finish_reason: None,
                latency_ms: (now_ms() - ctx.enqueued_at_ms).max(0),
            }));
            fx.rows.push(Row::Status(StatusRow {
                job_id: ctx.job_id.clone(),
                status: JobStatus::Succeeded,
                tried: log(&ctx.plan),
                ..Default::default()
            }));
            fx.done = Some(done(ctx, JobStatus::Succeeded));
        }
        Decision::Fail { error } => {
            fx.rows.push(Row::Status(StatusRow {
                job_id: ctx.job_id.clone(),
                status: JobStatus::Failed,
                error: Some(error),
                tried: log(&ctx.plan),
                ..Default::default()
            }));
            fx.done = Some(done(ctx, JobStatus::Failed));
        }
        Decision::Review { reason } => {
            fx.rows.push(Row::Status(StatusRow {
                job_id: ctx.job_id.clone(),
                status: JobStatus::NeedsReview,
                review_reason: Some(reason.clone()),
                tried: log(&ctx.plan),
                ..Default::default()
            }));
            fx.review = Some(ReviewEvent {
                job_id: ctx.job_id.clone(),
                category: ctx.category.clone(),
                reason,
            });
            fx.done = Some(done(ctx, JobStatus::NeedsReview));
        }
        Decision::Reclassify {
            category,
            confidence,
            by,
        } => {
            let classifier = json!({"category": category, "confidence": confidence, "by": by,
                                    "model": history.iter().find(|r| r.step == CLASSIFY_STEP).map(|r| r.model.clone())});
            match start(
                cfg,
                routes,
                &ctx.job_id,
                &category,
                &ctx.conv,
                JobParams {
                    job_max_tokens: ctx.job_max_tokens,
                    temperature: ctx.temperature,
                    enqueued_at_ms: ctx.enqueued_at_ms,
                    deadline_ms: ctx.deadline_ms,
                    response_format: ctx.response_format.clone(),
                    expires_at_ms: ctx.expires_at_ms,
                    priority: ctx.priority,
                },
                Some(classifier),
            ) {
                Some((mut new_ctx, mut decision_log, variant)) => {
                    let park = verdict
                        .is_some_and(|v| v.apply(routes, &mut new_ctx.plan, &mut decision_log));
                    fx.rows.push(Row::Reclass(ReclassRow {
                        job_id: ctx.job_id.clone(),
                        category: category.clone(),
                        variant,
                        route_decision: decision_log,
                        callback_default: cfg.callback_url(&category, None),
                    }));
                    if park {
                        // Waits, as its category, until the budget allows.
                        fx.rows.push(Row::Status(StatusRow {
                            job_id: ctx.job_id.clone(),
                            status: JobStatus::Queued,
                            ..Default::default()
                        }));
                        fx.rows.push(Row::Park {
                            job_id: ctx.job_id.clone(),
                            parked: true,
                        });
                        return fx;
                    }
                    let first = route::next(&new_ctx.plan, &new_ctx.conv, &[]);
                    let more = effects(cfg, routes, &new_ctx, &[], first);
                    fx.rows.extend(more.rows);
                    fx.calls.extend(more.calls);
                    fx.done = more.done;
                    fx.review = more.review;
                }
                None => {
                    fx.rows.push(Row::Status(StatusRow {
                        job_id: ctx.job_id.clone(),
                        status: JobStatus::Failed,
                        error: Some(format!(
                            "classified as `{category}`, which has no usable route"
                        )),
                        ..Default::default()
                    }));
                    fx.done = Some(done(ctx, JobStatus::Failed));
                }
            }
        }
    }
    fx
}

fn done(ctx: &JobCtx, status: JobStatus) -> DoneEvent {
    DoneEvent {
        job_id: ctx.job_id.clone(),
        category: ctx.category.clone(),
        status,
    }
}

/// Resolve a job's plan for `category` (with its A/B variant) and the
/// decision log to store. `raw_conv` is the job's conversation without the
/// category's system prompt.
pub fn start(
    cfg: &Config,
    routes: &Routes,
    job_id: &str,
    category: &str,
    raw_conv: &[Message],
    params: JobParams,
    classifier: Option<serde_json::Value>,
) -> Option<(JobCtx, serde_json::Value, Option<String>)> {
    let JobParams {
        job_max_tokens,
        temperature,
        enqueued_at_ms,
        deadline_ms,
        response_format,
        expires_at_ms,
        priority,
    } = params;
    let cat = cfg.categories.get(category)?;
    let (plan, variant) = routes.plan_for(category, job_id)?;
    let mut log = json!({
        "kind": plan.kind(),
        "category": category,
        "plan": plan,
        "reason": match &variant {
            Some(v) => format!("category `{category}` routes by its `{}` route; A/B variant `{v}` chosen by job id", plan.kind()),
            None => format!("category `{category}` routes by its `{}` route", plan.kind()),
        },
    });
    if let Some(v) = &variant {
        log["variant"] = v.clone().into();
    }
    if let Some(c) = classifier {
        log["classifier"] = c;
    }
    Some((
        JobCtx {
            job_id: job_id.to_string(),
            category: category.to_string(),
            plan,
            conv: with_category_system(raw_conv, cat.system.as_deref()),
            job_max_tokens,
            temperature,
            enqueued_at_ms,
            deadline_ms,
            response_format,
            expires_at_ms,
            priority,
        },
        log,
        variant,
    ))
}

/// What a job brings to its routing besides its id, category and conversation.
#[derive(Debug, Clone, Default)]
pub struct JobParams {
    pub job_max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub enqueued_at_ms: i64,
    pub deadline_ms: Option<i64>,
    pub response_format: Option<ResponseFormat>,
    pub expires_at_ms: Option<i64>,
    pub priority: Priority,
}

impl JobCtx {
    /// The routing context a call message carries.
    pub fn of_call(c: &CallMsg) -> Self {
        Self {
            job_id: c.job_id.clone(),
            category: c.category.clone(),
            plan: c.plan.clone(),
            conv: c.conv.clone(),
            job_max_tokens: c.job_max_tokens,
            temperature: c.temperature,
            enqueued_at_ms: c.enqueued_at_ms,
            deadline_ms: c.deadline_ms,
            response_format: c.response_format.clone(),
            expires_at_ms: c.expires_at_ms,
            priority: c.priority,
        }
    }
}
