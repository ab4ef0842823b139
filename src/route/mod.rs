//! Routing as a pure state machine: `(plan, job history, step outcome) →
//! decision`. No I/O; the dispatcher and the lanes only execute what it
//! returns.
//!
//! A job's [`Plan`] is resolved from its category's route when it is
//! dispatched (including the A/B variant and, for `auto` jobs, the
//! classifier) and travels with every call. Each call is a *step*; retries of
//! one step are [`decide`]'s business; what follows a finished step is
//! [`next`]'s, given every finished step so far ([`StepRecord`]).

mod classify;
mod consensus;
mod fallback;
mod pipeline;
mod retry;
mod routes;
mod single;

pub use classify::{classifier_prompt, parse_classifier_answer};
pub use consensus::normalise;
pub use fallback::{check_answer, self_reported_confidence, verdict};
pub use retry::{backoff, decide, Action, Outcome};
pub use routes::Routes;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::envelope::{Message, Role};

/// A model and the provider lane that serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub model: String,
    pub provider: String,
}

/// A check a fallback answer must pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Check {
    JsonSchema { schema: serde_json::Value },
    Confidence { min: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    pub target: Target,
    pub template: String,
}

/// How one job is served, resolved from config at dispatch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Plan {
    Single {
        target: Target,
    },
    Fallback {
        targets: Vec<Target>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_wait_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check: Option<Check>,
    },
    Pipeline {
        stages: Vec<Stage>,
    },
    Consensus {
        voters: Vec<Target>,
        min_agree: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        judge: Option<Target>,
    },
    /// An `auto` job waiting for the classifier model's answer.
    Classify {
        classifier: Target,
        categories: Vec<String>,
        threshold: f64,
        default_category: String,
    },
}

impl Plan {
    pub fn kind(&self) -> &'static str {
        match self {
            Plan::Single { .. } => "single",
            Plan::Fallback { .. } => "fallback",
            Plan::Pipeline { .. } => "pipeline",
            Plan::Consensus { .. } => "consensus",
            Plan::Classify { .. } => "classify",
        }
    }

    /// The longest a fallback step may wait for its lane's limiter.
    pub fn max_wait(&self) -> Option<Duration> {
        match self {
            Plan::Fallback {
                max_wait_ms: Some(ms),
                targets,
                ..
            } if targets.len() > 1 => Some(Duration::from_millis(*ms)),
            _ => None,
        }
    }

    /// Whether the job has steps of its own: each finished step is recorded
    /// (`steps`), its call messages carry the conversation, and the decision
    /// log lists what was tried. A single call's outcome is the job's.
    pub fn records_steps(&self) -> bool {
        !matches!(self, Plan::Single { .. })
    }

    /// Whether its steps run at once (consensus voters): a finished step
    /// reads its siblings from `steps` after committing its own, so call
    /// messages carry no history. Sequential plans carry their finished
    /// steps in each call message instead.
    pub fn runs_steps_in_parallel(&self) -> bool {
        matches!(self, Plan::Consensus { .. })
    }

    /// Why this plan cannot be run, if it cannot: a plan read from a message
    /// (not built from the config) may be anything.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Plan::Single { .. } => Ok(()),
            Plan::Fallback { targets, .. } if targets.is_empty() => {
                Err("a fallback plan with no targets".into())
            }
            Plan::Pipeline { stages } if stages.is_empty() => {
                Err("a pipeline plan with no stages".into())
            }
            Plan::Consensus { voters, .. } if voters.is_empty() => {
                Err("a consensus plan with no voters".into())
            }
            Plan::Consensus {
                voters, min_agree, ..
            } if *min_agree == 0 || *min_agree > voters.len() => Err(format!(
                "a consensus plan needing {min_agree} of {} voters to agree",
                voters.len()
            )),
            Plan::Classify { categories, .. } if categories.is_empty() => {
                Err("a classify plan with no categories".into())
            }
            Plan::Classify { threshold, .. } if !(0.0..=1.0).contains(threshold) => {
                Err(format!("a classify plan with threshold {threshold}"))
            }
            _ => Ok(()),
        }
    }

    /// Whether `step` is a step of this plan.
    pub fn has_step(&self, step: i32) -> bool {
        let below = |n: usize| usize::try_from(step).is_ok_and(|s| s < n);
        match self {
            Plan::Single { .. } => step == 0,
            Plan::Fallback { targets, .. } => below(targets.len()),
            Plan::Pipeline { stages } => below(stages.len()),
            Plan::Consensus { voters, judge, .. } => {
                below(voters.len() + usize::from(judge.is_some()))
            }
            Plan::Classify { .. } => step == CLASSIFY_STEP,
        }
    }

    /// Whether `step`'s answer may become the job's answer (and so must
    /// follow the job's `response_format`): not a pipeline's earlier
    /// stages, a consensus judge or the classifier.
    pub fn answers_job(&self, step: i32) -> bool {
        let below = |n: usize| usize::try_from(step).is_ok_and(|s| s < n);
        match self {
            Plan::Single { .. } => step == 0,
            Plan::Fallback { targets, .. } => below(targets.len()),
            Plan::Pipeline { stages } => usize::try_from(step).is_ok_and(|s| s + 1 == stages.len()),
            Plan::Consensus { voters, .. } => below(voters.len()),
            Plan::Classify { .. } => false,
        }
    }

    /// Whether a step may be skipped for a long limiter wait (not the last fallback target).
    pub fn may_skip(&self, step: i32) -> bool {
        matches!(self, Plan::Fallback { targets, .. } if (step as usize) + 1 < targets.len())
    }
}

/// The step number of the classifier call (route steps count from 0; a
/// consensus judge is the step after the last voter).
pub const CLASSIFY_STEP: i32 = -1;

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    /// The provider answered.
    Ok,
    /// Failed terminally or ran out of retries.
    Failed,
    /// Not called: the lane's limiter would have waited longer than `max_wait`.
    TooSlow,
}

/// A finished step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: i32,
    pub model: String,
    pub outcome: StepOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A call to make.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCall {
    pub step: i32,
    pub target: Target,
    pub messages: Vec<Message>,
}

/// What happens next to a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Make these calls (several at once for consensus).
    Calls(Vec<StepCall>),
    /// The job succeeded with this answer, given by `model` at `step`.
    Complete {
        output: String,
        model: String,
        step: i32,
    },
    /// A person must finish the job.
    Review { reason: String },
    /// The job failed.
    Fail { error: String },
    /// Other steps are still running (consensus voters).
    Wait,
    /// The classifier chose a category: serve the job as that category.
    Reclassify {
        category: String,
        confidence: f64,
        by: &'static str,
    },
}

/// The verdict on one finished step, with the reason it did not count.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Accepted,
    Rejected(String),
}

/// The text user turns of a conversation: what templates call `{{input}}`.
pub fn input_text(conv: &[Message]) -> String {
    conv.iter()
        .filter(|m| m.role != Role::System)
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn system_only(conv: &[Message]) -> Vec<Message> {
    conv.iter()
        .filter(|m| m.role == Role::System)
        .cloned()
        .collect()
}

/// The conversation's system prompt and one user turn of `text`; with
/// `images`, the job's images follow the text (they travel with the input).
fn with_user(conv: &[Message], text: String, images: bool) -> Vec<Message> {
    let mut m = system_only(conv);
    let pictures: Vec<crate::envelope::Part> = conv
        .iter()
        .filter(|m| m.role != Role::System)
        .flat_map(|m| m.images().cloned())
        .collect();
    let mut turn = Message::text(Role::User, text);
    if images && !pictures.is_empty() {
        turn.parts = std::iter::once(crate::envelope::Part::Text {
            text: turn.content.clone(),
        })
        .chain(pictures)
        .collect();
    }
    m.push(turn);
    m
}

/// 0..100, stable for a job id (FNV-1a).
pub fn bucket(job_id: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in job_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h % 100
}

/// The first JSON object in a text (models like to wrap JSON in prose or fences).
pub fn extract_json(text: &str) -> Option<serde_json::Value> {
    let t = text.trim();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(t) {
        return v.is_object().then_some(v);
    }
    let start = t.find('{')?;
    let end = t.rfind('}')?;
    (end > start)
        .then(|| serde_json::from_str::<serde_json::Value>(&t[start..=end]).ok())
        .flatten()
        .filter(|v| v.is_object())
}

/// What follows, given the finished steps (`history`, any order). Each
/// pattern decides in its own module.
pub fn next(plan: &Plan, conv: &[Message], history: &[StepRecord]) -> Decision {
    let rec = |step: i32| history.iter().find(|r| r.step == step);
    match plan {
        Plan::Single { target } => single::next(target, conv, rec(0)),
        Plan::Fallback { targets, .. } => fallback::next(plan, targets, conv, &rec),
        Plan::Pipeline { stages } => pipeline::next(stages, conv, &rec),
        Plan::Consensus {
            voters,
            min_agree,
            judge,
        } => consensus::next(voters, *min_agree, judge.as_ref(), conv, &rec),
        Plan::Classify {
            classifier,
            categories,
            threshold,
            default_category,
        } => classify::next(
            classifier,
            categories,
            *threshold,
            default_category,
            conv,
            rec(CLASSIFY_STEP),
        ),
    }
}

#[cfg(test)]
mod tests;
