//! The rows the pipeline hands to the [`Writer`](super::Writer): one type
//! per table it writes, and what a commit reports back.

use std::collections::HashMap;
use std::time::Duration;

use rust_decimal::Decimal;

use super::JobStatus;
use crate::pricing::{Prices, Usage};
use crate::route::StepRecord;

#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub category: String,
    pub status: JobStatus,
    pub envelope: Option<serde_json::Value>,
    pub route_decision: Option<serde_json::Value>,
    pub error: Option<String>,
    pub enqueued_at_ms: i64,
    /// The A/B variant the job took.
    pub variant: Option<String>,
    /// Where the job is called back when it ends: its envelope's
    /// `callback_url`, else its category's default.
    pub callback_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DeadLetterRow {
    /// `<stream>:<sequence>`, unique, so a redelivery is recorded once.
    pub source: String,
    pub subject: String,
    pub job_id: Option<String>,
    pub payload: Vec<u8>,
    pub reason: String,
}

/// The outcome column of `calls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    RetryableError,
    TerminalError,
    Unknown,
    /// Answered from the response cache: no provider call, cost 0.
    Cached,
}

impl CallOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::RetryableError => "retryable_error",
            CallOutcome::TerminalError => "terminal_error",
            CallOutcome::Unknown => "unknown",
            CallOutcome::Cached => "cached",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CallRow {
    pub job_id: String,
    pub category: String,
    pub provider: String,
    pub model: String,
    pub step: i32,
    pub attempt: i32,
    pub usage: Usage,
    pub prices: Prices,
    pub latency_ms: i32,
    pub http_status: Option<i32>,
    pub outcome: CallOutcome,
    pub error: Option<String>,
    /// The provider batch the call went in (`provider_batches.id`).
    pub batch_id: Option<String>,
}

impl CallRow {
    /// What the call cost: nothing for an answer from the cache (the
    /// row keeps the tokens and prices; `saved_usd` says what it saved).
    pub fn cost(&self) -> Decimal {
        if self.outcome == CallOutcome::Cached {
            return Decimal::ZERO;
        }
        self.prices.cost(&self.usage)
    }
}

#[derive(Debug, Clone)]
pub struct ResultRow {
    pub job_id: String,
    pub category: String,
    pub output: String,
    /// The answer as JSON, when the job asked for JSON.
    pub output_json: Option<serde_json::Value>,
    pub model: String,
    /// The step whose answer is the result (`None`: no model's).
    pub answer_step: Option<i32>,
    pub finish_reason: Option<String>,
    pub latency_ms: i64,
}

#[derive(Debug, Clone, Default)]
pub struct StatusRow {
    pub job_id: String,
    pub status: JobStatus,
    pub error: Option<String>,
    /// Why a person must finish the job (status `needs_review`).
    pub review_reason: Option<String>,
    /// The decision log's list of steps tried and why each moved on.
    pub tried: Option<serde_json::Value>,
}

/// A finished step of a job.
#[derive(Debug, Clone)]
pub struct StepRow {
    pub job_id: String,
    pub record: StepRecord,
}

/// The classifier chose a category: the job now belongs to it.
#[derive(Debug, Clone)]
pub struct ReclassRow {
    pub job_id: String,
    pub category: String,
    pub variant: Option<String>,
    pub route_decision: serde_json::Value,
    /// The new category's default callback URL: the job's unless its
    /// envelope names its own.
    pub callback_default: Option<String>,
}

/// One row to write.
#[derive(Debug, Clone)]
pub enum Row {
    Job(JobRow),
    DeadLetter(DeadLetterRow),
    /// The final cost record of a provider call; replaces its intent.
    Call(CallRow),
    /// Written before a provider call: outcome `unknown` with the reserved
    /// (estimated) usage and cost, so a call whose worker dies before it can
    /// record the answer is still accounted for. The attempt number is the
    /// row's or, if that is taken (a NATS server that lost acks delivers a
    /// message as new), one past the step's highest;
    /// [`Committed::attempts`] says which. The final [`Row::Call`] of the
    /// same attempt replaces it.
    ///
    /// Writing it is the check-and-claim before every provider call: no
    /// intent is written if the step is answered (an `ok` row, a step row,
    /// or the job is finished), or if another attempt of it is `unknown`
    /// and younger than `busy_for` (the provider's timeout and a margin):
    /// another worker is calling it right now (a message whose ack wait
    /// ran out while it waited is delivered to a second worker while the
    /// first still works on it, and a NATS server restarted after a crash
    /// forgets acks). The step is then missing from [`Committed::attempts`].
    Intent {
        row: CallRow,
        busy_for: Duration,
    },
    /// Park a queued job (its category's budget is paused) or clear its
    /// parking (it runs now).
    Park {
        job_id: String,
        parked: bool,
    },
    /// Park a queued job until `not_before_ms` (Unix milliseconds).
    Schedule {
        job_id: String,
        not_before_ms: i64,
    },
    Result(ResultRow),
    Status(StatusRow),
    Step(StepRow),
    Reclass(ReclassRow),
}

/// What the writer reports back once a request's rows are committed.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    /// Status of each job a `Row::Job` named, after the commit.
    pub job_status: HashMap<String, JobStatus>,
    /// For each `Row::Intent` that was written: (job id, step) -> the
    /// attempt number it holds. Missing: the step is answered, or another
    /// worker is calling it.
    pub attempts: HashMap<(String, i32), i32>,
}
