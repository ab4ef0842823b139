//! Background tasks that are tracked and end on shutdown (leaf).
//!
//! Runtime code never calls `tokio::spawn` (clippy's `disallowed-methods`
//! says so): every task goes on a [`Tasks`], whose token every loop selects
//! on, so that stopping a worker ends each of them and waits for them.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A set of tracked tasks and the token that tells their loops to end.
#[derive(Clone, Debug, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tasks that end when `token` is cancelled (or earlier).
    pub fn with_token(token: CancellationToken) -> Self {
        Self {
            tracker: TaskTracker::new(),
            token,
        }
    }

    /// Tasks on `tracker` whose loops end on `token`.
    pub fn from_parts(tracker: TaskTracker, token: CancellationToken) -> Self {
        Self { tracker, token }
    }

    /// The token the loops of these tasks select on.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Run `fut` as one of these tasks.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Cancel the token and wait up to `deadline` for every task to end.
    /// Returns false if some were still running at the deadline.
    pub async fn stop(&self, deadline: Duration) -> bool {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}
