//! Retries within one step: what the lane saw, and whether to try again.

use std::time::Duration;

use crate::config::RetryConfig;

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
