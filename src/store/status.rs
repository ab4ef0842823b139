//! A job's status: the one place its values and the terminal list live.
//! SQL receives the terminal list as a bound parameter
//! ([`JobStatus::terminal_names`]), never as a literal copy.

use serde::{Deserialize, Serialize};

/// `jobs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    #[default]
    Queued,
    Running,
    Succeeded,
    Failed,
    NeedsReview,
    Dead,
    /// Cancelled by a person or a client before it ended.
    Cancelled,
    /// Not started by its `expires_at`: ended without a provider call.
    Expired,
}

impl JobStatus {
    /// Every status, in the order a job may pass through them.
    pub const ALL: [JobStatus; 8] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::NeedsReview,
        JobStatus::Dead,
        JobStatus::Cancelled,
        JobStatus::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::NeedsReview => "needs_review",
            JobStatus::Dead => "dead",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Expired => "expired",
        }
    }

    /// The status named `s`, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether a job in this status is finished: its status is never
    /// overwritten and its calls are never made again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }

    /// Whether the job has ended for good: terminal, and not waiting for a
    /// person (a review's resolve ends a `needs_review` job, as succeeded or
    /// failed). A completion webhook reports these; migration 0018's
    /// trigger lists them (`tests/webhooks.rs` checks that they agree).
    pub fn is_final(self) -> bool {
        self.is_terminal() && self != JobStatus::NeedsReview
    }

    /// The terminal statuses' names, to bind as `$n::text[]`.
    pub fn terminal_names() -> Vec<&'static str> {
        Self::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .map(Self::as_str)
            .collect()
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(JobStatus::parse("done"), None);
        assert_eq!(
            JobStatus::terminal_names(),
            [
                "succeeded",
                "failed",
                "needs_review",
                "dead",
                "cancelled",
                "expired"
            ]
        );
    }
}
