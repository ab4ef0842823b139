//! The pull loop every consumer of the worker runs: take a message when a
//! slot is free and the caller is ready, hand it to a tracked task.
//!
//! A provider lane pulls from three durable consumers, one per priority
//! (`<prefix>.calls.<provider>.high`, `<prefix>.calls.<provider>`,
//! `<prefix>.calls.<provider>.low`: separate subjects, so their filters do
//! not overlap, which a WorkQueue stream requires on NATS 2.9). Each time a
//! slot frees, the loop looks at the first waiting message of each and takes
//! the most urgent; every `round(1 / low_share)`-th take instead goes to the
//! message that has waited longest, so `normal` and `low` work keeps a share
//! of the lane while `high` work would fill it. Work waits in the streams,
//! not in the process: a consumer delivers at most its pull batch ahead of
//! the loop, and a message the loop holds while it picks gets progress acks,
//! so it is not redelivered while it waits its turn.
//!
//! One continuous pull stream per consumer (with heartbeats): short fetches
//! with an expiry were tried first, and a message the server delivered just
//! as a fetch expired could be dropped unread, stalling it until `ack_wait`.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::{AckKind, Message};
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// The pull streams' idle heartbeat: a pull whose consumer leader died
/// (a cluster node lost) is noticed after two missed heartbeats and made
/// again, on the consumer's new leader.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// The pause before pulling again after a failure, doubling with each
/// failure in a row up to the most.
const MIN_PULL_PAUSE: Duration = Duration::from_millis(50);
const MAX_PULL_PAUSE: Duration = Duration::from_secs(2);

/// One consumer the loop takes from, most urgent first.
pub struct Source {
    pub consumer: PullConsumer,
    /// Messages to request from NATS at a time.
    pub batch: usize,
}

/// How a loop takes its messages.
pub struct Pull {
    /// Messages handled at once.
    pub max_in_flight: usize,
    /// The share of takes that go to the longest-waiting message rather
    /// than the most urgent one (0: strict order). Only matters with more
    /// than one source.
    pub share: f64,
    /// The consumers' ack wait: held messages get a progress ack at a third of it.
    pub ack_wait: Duration,
}

/// A source's stream and the messages taken from it, not yet handled.
struct Open {
    name: String,
    consumer: PullConsumer,
    batch: usize,
    /// How many messages the loop holds from this source at most.
    hold: usize,
    stream: Option<pull::Stream>,
    held: VecDeque<(Message, Instant)>,
    /// Pulls failed in a row (0 once a message arrives) and when to pull
    /// again: a consumer whose leader is being elected (a cluster node
    /// died) answers "no responders" at once, for seconds.
    failures: u32,
    retry_at: Option<Instant>,
}

impl Open {
    async fn ensure_stream(&mut self) {
        if self.stream.is_some() || self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        match self
            .consumer
            .stream()
            .max_messages_per_batch(self.batch.max(1))
            .heartbeat(HEARTBEAT)
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(s) => {
                self.stream = Some(s);
                self.retry_at = None;
            }
            Err(e) => self.failed("pull failed; retrying", &e),
        }
    }

    /// A pull failed: pull again after a pause that grows with the failures
    /// in a row (up to [`MAX_PULL_PAUSE`]); say so once per run of failures.
    fn failed(&mut self, what: &str, e: &dyn std::fmt::Display) {
        self.stream = None;
        self.failures += 1;
        let pause = MIN_PULL_PAUSE
            .saturating_mul(1 << self.failures.min(6))
            .min(MAX_PULL_PAUSE);
        self.retry_at = Some(Instant::now() + pause);
        if self.failures == 1 {
            warn!(consumer = %self.name, error = %e, "{what}");
        } else {
            tracing::debug!(consumer = %self.name, error = %e, failures = self.failures, "{what}");
        }
    }

    /// Take what the stream already has, without waiting, up to `hold`.
    fn drain_ready(&mut self) {
        while self.held.len() < self.hold {
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            match stream.next().now_or_never() {
                None => return,
                Some(item) => self.accept(item),
            }
        }
    }

    fn accept(&mut self, item: Option<Result<Message, pull::MessagesError>>) {
        match item {
            Some(Ok(m)) => {
                if self.failures > 0 {
                    info!(consumer = %self.name, failures = self.failures, "pulling again");
                }
                self.failures = 0;
                self.held.push_back((m, Instant::now()));
            }
            Some(Err(e)) => self.failed("pull interrupted; pulling again", &e),
            None => self.stream = None,
        }
    }

    /// When a closed stream is due to be opened again.
    fn reopen_at(&self) -> Option<Instant> {
        match self.stream {
            Some(_) => None,
            None => Some(self.retry_at.unwrap_or_else(Instant::now)),
        }
    }
}

/// Which source to take from, given since when each one's first held
/// message waits (most urgent source first): the most urgent, except on
/// every `period`-th take, the one that waited longest.
fn pick(fronts: &[Option<Instant>], take: u64, period: u64) -> Option<usize> {
    let waiting = fronts
        .iter()
        .enumerate()
        .filter_map(|(i, at)| at.map(|at| (i, at)));
    if period > 0 && take.is_multiple_of(period) {
        waiting.min_by_key(|(_, at)| *at).map(|(i, _)| i)
    } else {
        waiting.map(|(i, _)| i).next()
    }
}

/// Every how many takes the longest-waiting message goes first (0: never).
fn period(share: f64) -> u64 {
    if share <= 0.0 {
        0
    } else {
        (1.0 / share.min(1.0)).round().max(1.0) as u64
    }
}

/// Wait for `fut`, giving the held messages progress acks meanwhile; `None`
/// when the token is cancelled first.
async fn hold_on<F: Future>(
    fut: F,
    sources: &mut [Open],
    token: &CancellationToken,
    every: Duration,
) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            _ = token.cancelled() => return None,
            out = &mut fut => return Some(out),
            _ = tokio::time::sleep(every) => progress(sources).await,
        }
    }
}

async fn progress(sources: &mut [Open]) {
    for s in sources.iter() {
        for (m, _) in &s.held {
            let _ = m.ack_with(AckKind::Progress).await;
        }
    }
}

/// Run `handler` on each message of `sources` in a tracked task, with at
/// most `max_in_flight` at once, and only when `ready` says there is room
/// (a lane without budget takes nothing: its messages stay in NATS).
#[allow(clippy::too_many_arguments)]
pub async fn consume<R, RFut, T, F, Fut>(
    name: String,
    sources: Vec<Source>,
    pull: Pull,
    token: CancellationToken,
    tracker: TaskTracker,
    ready: R,
    handler: F,
) where
    R: Fn() -> RFut,
    RFut: Future<Output = T>,
    F: Fn(Message, T) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let single = sources.len() == 1;
    let mut sources: Vec<Open> = sources
        .into_iter()
        .enumerate()
        .map(|(i, s)| Open {
            name: if single {
                name.clone()
            } else {
                format!("{name}#{i}")
            },
            consumer: s.consumer,
            batch: s.batch.clamp(1, pull.max_in_flight.max(1)),
            // A single source needs no look-ahead: the stream buffers.
            hold: if single { 1 } else { s.batch.max(1) },
            stream: None,
            held: VecDeque::new(),
            failures: 0,
            retry_at: None,
        })
        .collect();
    let period = if single { 0 } else { period(pull.share) };
    let every = (pull.ack_wait / 3).max(Duration::from_millis(100));
    let slots = Arc::new(Semaphore::new(pull.max_in_flight.max(1)));
    let mut takes: u64 = 0;
    'outer: while !token.is_cancelled() {
        let Some(permit) =
            hold_on(slots.clone().acquire_owned(), &mut sources, &token, every).await
        else {
            break;
        };
        let permit = permit.expect("never closed");
        let Some(ticket) = hold_on(ready(), &mut sources, &token, every).await else {
            break;
        };
        let msg = loop {
            for s in sources.iter_mut() {
                s.ensure_stream().await;
                s.drain_ready();
            }
            let fronts: Vec<_> = sources
                .iter()
                .map(|s| s.held.front().map(|(_, at)| *at))
                .collect();
            if let Some(i) = pick(&fronts, takes + 1, period) {
                takes += 1;
                break sources[i].held.pop_front().map(|(m, _)| m);
            }
            // A closed stream is opened again when due, even while the
            // others wait.
            let reopen = sources.iter().filter_map(Open::reopen_at).min();
            // Nothing waiting anywhere: wait for the first message of any
            // source (a `next` future dropped unfinished loses nothing).
            let mut nexts: Vec<_> = sources
                .iter_mut()
                .enumerate()
                .filter_map(|(i, s)| s.stream.as_mut().map(|st| st.next().map(move |n| (i, n))))
                .collect();
            if nexts.is_empty() {
                drop(nexts);
                let at = reopen.unwrap_or_else(|| Instant::now() + MIN_PULL_PAUSE);
                tokio::select! {
                    _ = token.cancelled() => break 'outer,
                    _ = tokio::time::sleep_until(at.max(Instant::now() + Duration::from_millis(10))) => continue,
                }
            }
            let wake = Instant::now() + every;
            let got = tokio::select! {
                _ = token.cancelled() => break 'outer,
                (got, _, _) = futures::future::select_all(nexts.iter_mut()) => Some(got),
                _ = tokio::time::sleep_until(wake) => None,
                _ = tokio::time::sleep_until(reopen.unwrap_or(wake).max(Instant::now() + Duration::from_millis(10))), if reopen.is_some() => continue,
            };
            drop(nexts);
            match got {
                Some((i, item)) => sources[i].accept(item),
                None => progress(&mut sources).await,
            }
        };
        if let Some(msg) = msg {
            let fut = handler(msg, ticket);
            tracker.spawn(async move {
                fut.await;
                drop(permit);
            });
        }
    }
    info!(consumer = %name, "stopped fetching");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_urgent_goes_first_but_the_longest_waiting_keeps_its_share() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(5);
        // high (waiting since `later`), normal (empty), low (since t0).
        let fronts = [Some(later), None, Some(t0)];
        let p = period(0.05);
        assert_eq!(p, 20);
        let picks: Vec<_> = (1..=40).map(|n| pick(&fronts, n, p).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 2).count(), 2, "{picks:?}");
        assert_eq!(picks[19], 2);
        assert_eq!(picks[0], 0);
        // Strict order without a share; nothing waiting, nothing taken.
        assert!((1..=40).all(|n| pick(&fronts, n, period(0.0)) == Some(0)));
        assert_eq!(pick(&[None, None, None], 20, p), None);
        // Only low waiting: low, whatever the turn.
        assert_eq!(pick(&[None, None, Some(t0)], 1, p), Some(2));
    }
}
