//! Routing as a pure state machine: `(route, job state, call outcome) →
//! action`. No I/O; the dispatcher and the lanes only execute what it
//! returns. Today's routes have one kind, `single`; fallbacks, pipelines and
//! consensus extend [`decide`] with more states.

use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, RetryConfig, RouteConfig};

/// Where a job goes first, and why (stored as `jobs.route_decision`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteDecision {
    pub route: &'static str,
    pub category: String,
    pub model: String,
    pub provider: String,
    pub reason: String,
}

/// Pick the first call of a job from its category's route.
pub fn first_call(cfg: &Config, category: &str) -> Option<RouteDecision> {
    let cat = cfg.categories.get(category)?;
    match &cat.route {
        RouteConfig::Single { target } => {
            let model = cfg.models.get(target)?;
            Some(RouteDecision {
                route: "single",
                category: category.to_string(),
                model: target.clone(),
                provider: model.provider.clone(),
                reason: format!("category `{category}` routes to `{target}`"),
            })
        }
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

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Record the result; the job succeeded.
    Complete,
    /// Try the same call again after `delay` (the message is nak'ed with it).
    Retry { delay: Duration },
    /// The job failed.
    Fail { error: String },
}

/// Decide after attempt number `attempt` (1-based) of a single-target call.
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
mod tests {
    use super::*;

    fn retry() -> RetryConfig {
        RetryConfig {
            max_attempts: 3,
            base_delay_ms: 100,
            max_delay_ms: 1000,
        }
    }

    #[test]
    fn success_completes_at_any_attempt() {
        for a in 1..=5 {
            assert_eq!(
                decide(&retry(), a, &Outcome::Success, 0.5),
                Action::Complete
            );
        }
    }

    #[test]
    fn terminal_fails_at_once() {
        let o = Outcome::Terminal {
            error: "quota".into(),
        };
        assert_eq!(
            decide(&retry(), 1, &o, 0.0),
            Action::Fail {
                error: "quota".into()
            }
        );
    }

    #[test]
    fn retryable_honours_retry_after_then_gives_up() {
        let o = Outcome::Retryable {
            retry_after: Some(Duration::from_secs(7)),
            error: "429".into(),
        };
        assert_eq!(
            decide(&retry(), 1, &o, 0.0),
            Action::Retry {
                delay: Duration::from_secs(7)
            }
        );
        assert_eq!(
            decide(&retry(), 2, &o, 0.0),
            Action::Retry {
                delay: Duration::from_secs(7)
            }
        );
        assert!(
            matches!(decide(&retry(), 3, &o, 0.0), Action::Fail { error } if error.contains("3 attempts"))
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        let r = retry();
        assert_eq!(backoff(&r, 1, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(&r, 2, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(&r, 3, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(&r, 9, 1.0), Duration::from_millis(1000));
        assert_eq!(backoff(&r, 2, 0.0), Duration::from_millis(100));
        assert_eq!(backoff(&r, 64, 1.0), Duration::from_millis(1000));
    }

    #[test]
    fn first_call_follows_the_category() {
        let cfg = Config::from_toml(include_str!("../config/switchyard.toml")).unwrap();
        let d = first_call(&cfg, "support").unwrap();
        assert_eq!(d.model, "claude-sonnet-4-5");
        assert_eq!(d.provider, "anthropic");
        assert!(first_call(&cfg, "nope").is_none());
    }
}
