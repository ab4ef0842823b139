//! Routing as a pure state machine: `(plan, job history, step outcome) →
//! decision`. No I/O; the dispatcher and the lanes only execute what it
//! returns.
//!
//! A job's [`Plan`] is resolved from its category's route when it is
//! dispatched (including the A/B variant and, for `auto` jobs, the
//! classifier) and travels with every call. Each call is a *step*; retries of
//! one step are [`decide`]'s business; what follows a finished step is
//! [`next`]'s, given every finished step so far ([`StepRecord`]).

pub mod check;
mod routes;
pub use routes::Routes;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::RetryConfig;
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
    /// The job succeeded with this answer.
    Complete { output: String, model: String },
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

fn with_user(conv: &[Message], text: String) -> Vec<Message> {
    let mut m = system_only(conv);
    m.push(Message {
        role: Role::User,
        content: text,
    });
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

/// Read the classifier's `{"category", "confidence"}`; anything else is
/// low confidence (None).
pub fn parse_classifier_answer(text: &str, categories: &[String]) -> Option<(String, f64)> {
    let v = extract_json(text)?;
    let cat = v.get("category")?.as_str()?.trim().to_string();
    let conf = v.get("confidence")?.as_f64()?;
    (categories.contains(&cat) && (0.0..=1.0).contains(&conf)).then_some((cat, conf))
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

/// Normalise an answer for voting: lower case, words only, single spaces.
pub fn normalise(answer: &str) -> String {
    answer
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Does a fallback answer pass the route's check?
pub fn check_answer(check: &Check, output: &str) -> Verdict {
    match check {
        Check::JsonSchema { schema } => {
            match extract_json(output).or_else(|| serde_json::from_str(output.trim()).ok()) {
                None => Verdict::Rejected("answer is not JSON".into()),
                Some(v) => match crate::route::check::validate(schema, &v) {
                    Ok(()) => Verdict::Accepted,
                    Err(e) => Verdict::Rejected(format!("answer fails the schema: {e}")),
                },
            }
        }
        Check::Confidence { min } => match self_reported_confidence(output) {
            Some(c) if c >= *min => Verdict::Accepted,
            Some(c) => Verdict::Rejected(format!("self-reported confidence {c} is below {min}")),
            None => Verdict::Rejected("answer reports no confidence".into()),
        },
    }
}

/// `"confidence": X` in a JSON answer, or a `confidence: X` line.
pub fn self_reported_confidence(output: &str) -> Option<f64> {
    if let Some(c) = extract_json(output).and_then(|v| v.get("confidence").and_then(|c| c.as_f64()))
    {
        return Some(c);
    }
    output.lines().rev().find_map(|l| {
        let l = l.trim().to_lowercase();
        let rest = l
            .strip_prefix("confidence")?
            .trim_start_matches([':', '=', ' ']);
        rest.trim_end_matches('%')
            .parse::<f64>()
            .ok()
            .map(|c| if c > 1.0 { c / 100.0 } else { c })
    })
}

/// The verdict on a finished step under a plan.
pub fn verdict(plan: &Plan, rec: &StepRecord) -> Verdict {
    match rec.outcome {
        StepOutcome::Failed => {
            Verdict::Rejected(rec.reason.clone().unwrap_or_else(|| "call failed".into()))
        }
        StepOutcome::TooSlow => Verdict::Rejected(
            rec.reason
                .clone()
                .unwrap_or_else(|| "limiter wait too long".into()),
        ),
        StepOutcome::Ok => match (plan, &rec.output) {
            (Plan::Fallback { check: Some(c), .. }, Some(out)) => check_answer(c, out),
            _ => Verdict::Accepted,
        },
    }
}

fn judge_prompt(input: &str, answers: &[(usize, &str)]) -> String {
    let mut p = format!(
        "Several assistants answered the request below. Decide which answer is correct and best.\n\
         Reply only with JSON: {{\"answer\": <number of the best answer>, \"confidence\": <0.0-1.0>}}.\n\n\
         Request:\n{input}\n\nAnswers:\n"
    );
    for (n, a) in answers {
        p.push_str(&format!("{n}. {a}\n"));
    }
    p
}

/// The classifier's prompt.
pub fn classifier_prompt(categories: &[String], input: &str) -> String {
    format!(
        "Classify the request into exactly one of these categories: {}.\n\
         Reply only with JSON: {{\"category\": \"<one of the categories>\", \"confidence\": <0.0-1.0>}}.\n\n\
         Request:\n{input}",
        categories.join(", ")
    )
}

/// What follows, given the finished steps (`history`, any order).
pub fn next(plan: &Plan, conv: &[Message], history: &[StepRecord]) -> Decision {
    let rec = |step: i32| history.iter().find(|r| r.step == step);
    match plan {
        Plan::Single { target } => match rec(0) {
            None => Decision::Calls(vec![StepCall {
                step: 0,
                target: target.clone(),
                messages: conv.to_vec(),
            }]),
            Some(r) if r.outcome == StepOutcome::Ok => Decision::Complete {
                output: r.output.clone().unwrap_or_default(),
                model: r.model.clone(),
            },
            Some(r) => Decision::Fail {
                error: r.reason.clone().unwrap_or_else(|| "call failed".into()),
            },
        },
        Plan::Fallback { targets, .. } => {
            for (i, t) in targets.iter().enumerate() {
                match rec(i as i32) {
                    None => {
                        return Decision::Calls(vec![StepCall {
                            step: i as i32,
                            target: t.clone(),
                            messages: conv.to_vec(),
                        }])
                    }
                    Some(r) => {
                        if verdict(plan, r) == Verdict::Accepted {
                            return Decision::Complete {
                                output: r.output.clone().unwrap_or_default(),
                                model: r.model.clone(),
                            };
                        }
                    }
                }
            }
            Decision::Review {
                reason: format!(
                    "all {} fallback targets failed or were rejected",
                    targets.len()
                ),
            }
        }
        Plan::Pipeline { stages } => {
            let input = input_text(conv);
            let mut outputs: BTreeMap<&str, &str> = BTreeMap::new();
            let mut previous = input.clone();
            for (i, s) in stages.iter().enumerate() {
                match rec(i as i32) {
                    Some(r) if r.outcome == StepOutcome::Ok => {
                        let out = r.output.as_deref().unwrap_or("");
                        outputs.insert(s.name.as_str(), out);
                        previous = out.to_string();
                    }
                    Some(r) => {
                        return Decision::Review {
                            reason: format!(
                                "stage `{}` failed: {}",
                                s.name,
                                r.reason.clone().unwrap_or_default()
                            ),
                        }
                    }
                    None => {
                        let prompt =
                            crate::template::render(&s.template, &input, &previous, &outputs);
                        return Decision::Calls(vec![StepCall {
                            step: i as i32,
                            target: s.target.clone(),
                            messages: with_user(conv, prompt),
                        }]);
                    }
                }
            }
            // Every stage answered: the last one's answer is the result.
            match stages.len().checked_sub(1).and_then(|l| rec(l as i32)) {
                Some(r) => Decision::Complete {
                    output: r.output.clone().unwrap_or_default(),
                    model: r.model.clone(),
                },
                None => Decision::Fail {
                    error: "a pipeline plan with no stages".into(),
                },
            }
        }
        Plan::Consensus {
            voters,
            min_agree,
            judge,
        } => {
            let n = voters.len() as i32;
            if (0..n).all(|i| rec(i).is_none()) {
                return Decision::Calls(
                    voters
                        .iter()
                        .enumerate()
                        .map(|(i, t)| StepCall {
                            step: i as i32,
                            target: t.clone(),
                            messages: conv.to_vec(),
                        })
                        .collect(),
                );
            }
            if (0..n).any(|i| rec(i).is_none()) {
                return Decision::Wait;
            }
            // Group the answers of voters that answered.
            let answered: Vec<&StepRecord> = (0..n)
                .filter_map(rec)
                .filter(|r| r.outcome == StepOutcome::Ok)
                .collect();
            let mut groups: Vec<(String, Vec<&StepRecord>)> = Vec::new();
            for r in &answered {
                let key = normalise(r.output.as_deref().unwrap_or(""));
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, g)) => g.push(r),
                    None => groups.push((key, vec![r])),
                }
            }
            groups.sort_by(|a, b| {
                b.1.len()
                    .cmp(&a.1.len())
                    .then(a.1[0].step.cmp(&b.1[0].step))
            });
            if let Some((_, g)) = groups.first() {
                if g.len() >= *min_agree {
                    return Decision::Complete {
                        output: g[0].output.clone().unwrap_or_default(),
                        model: g[0].model.clone(),
                    };
                }
            }
            let Some(judge) = judge else {
                return Decision::Review {
                    reason: format!(
                        "no consensus: {} of {} voters answered, largest agreement {} (need {min_agree})",
                        answered.len(),
                        n,
                        groups.first().map_or(0, |g| g.1.len())
                    ),
                };
            };
            if answered.is_empty() {
                return Decision::Review {
                    reason: "no consensus: every voter failed".into(),
                };
            }
            match rec(n) {
                None => {
                    let input = input_text(conv);
                    let list: Vec<(usize, &str)> = answered
                        .iter()
                        .enumerate()
                        .map(|(i, r)| (i + 1, r.output.as_deref().unwrap_or("")))
                        .collect();
                    Decision::Calls(vec![StepCall {
                        step: n,
                        target: judge.clone(),
                        messages: with_user(conv, judge_prompt(&input, &list)),
                    }])
                }
                Some(j) => {
                    let pick = (j.outcome == StepOutcome::Ok)
                        .then(|| j.output.as_deref().and_then(extract_json))
                        .flatten()
                        .and_then(|v| v.get("answer").and_then(|a| a.as_u64()))
                        .and_then(|k| answered.get((k as usize).checked_sub(1)?));
                    match pick {
                        Some(r) => Decision::Complete {
                            output: r.output.clone().unwrap_or_default(),
                            model: r.model.clone(),
                        },
                        None => Decision::Review {
                            reason: "no consensus and the judge gave no usable verdict".into(),
                        },
                    }
                }
            }
        }
        Plan::Classify {
            classifier,
            categories,
            threshold,
            default_category,
        } => match rec(CLASSIFY_STEP) {
            None => Decision::Calls(vec![StepCall {
                step: CLASSIFY_STEP,
                target: classifier.clone(),
                messages: vec![Message {
                    role: Role::User,
                    content: classifier_prompt(categories, &input_text(conv)),
                }],
            }]),
            Some(r) => {
                let parsed = (r.outcome == StepOutcome::Ok)
                    .then(|| parse_classifier_answer(r.output.as_deref().unwrap_or(""), categories))
                    .flatten();
                match parsed {
                    Some((category, confidence)) if confidence >= *threshold => {
                        Decision::Reclassify {
                            category,
                            confidence,
                            by: "model",
                        }
                    }
                    Some((_, confidence)) => Decision::Reclassify {
                        category: default_category.clone(),
                        confidence,
                        by: "default",
                    },
                    None => Decision::Reclassify {
                        category: default_category.clone(),
                        confidence: 0.0,
                        by: "default",
                    },
                }
            }
        },
    }
}

/// What a provider call came to, as the lane saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success,
    Retryable {
        retry_after: Option<Duration>,
        error: String,
    },
    Terminal {
        error: String,
    },
}

/// What to do after one attempt of a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// The step succeeded.
    Complete,
    /// Try the same call again after `delay` (the message is nak'ed with it).
    Retry { delay: Duration },
    /// The step failed (terminally, or out of retries).
    Fail { error: String },
}

/// Decide after attempt number `attempt` (1-based) of a step.
/// `jitter` in `0.0..1.0` spreads backoffs; pass a fixed value in tests.
pub fn decide(retry: &RetryConfig, attempt: u32, outcome: &Outcome, jitter: f64) -> Action {
    match outcome {
        Outcome::Success => Action::Complete,
        Outcome::Terminal { error } => Action::Fail {
            error: error.clone(),
        },
        Outcome::Retryable { error, .. } if attempt >= retry.max_attempts => Action::Fail {
            error: format!("gave up after {attempt} attempts: {error}"),
        },
        Outcome::Retryable { retry_after, .. } => Action::Retry {
            delay: retry_after.unwrap_or_else(|| backoff(retry, attempt, jitter)),
        },
    }
}

/// Exponential backoff: `base · 2^(attempt−1)`, capped, then scaled into
/// `[½, 1]` of itself by `jitter`.
pub fn backoff(retry: &RetryConfig, attempt: u32, jitter: f64) -> Duration {
    let exp = retry
        .base_delay_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(20));
    let capped = exp.min(retry.max_delay_ms) as f64;
    Duration::from_millis((capped * (0.5 + 0.5 * jitter.clamp(0.0, 1.0))) as u64)
}

#[cfg(test)]
mod tests;
