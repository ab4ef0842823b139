//! The one path that settles a message, shared by the dispatcher and the
//! lanes. Their steps decide what a message comes to (a [`Settlement`])
//! without acking it; [`Settler::settle`] commits the rows (holding the
//! message with progress acks while the database is away), publishes the
//! follow-up calls, and only then acks — or naks, so the message comes back.

use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::{AckKind, Message};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::bus::Bus;
use crate::pipeline::flow::Effects;
use crate::store::{Committed, Row, Writer};

/// What handling one message came to.
#[derive(Debug)]
pub enum Settlement {
    /// Nothing to write (the job is finished already): ack.
    Ack,
    /// Nothing written: give the message back, delivered again after the
    /// delay (`None`: at once, as when the worker stops while it waits).
    Nak(Option<Duration>),
    /// Leave the message alone: JetStream redelivers it after its ack wait
    /// (a second delivery of a step this process still works on, at stop).
    Leave,
    /// Commit `effects.rows`; then, unless the commit found the job named
    /// by `unless_finished` finished already (a duplicate), publish
    /// `effects.calls`; then ack, or nak with `retry_in` (a provider retry);
    /// then announce `effects.done` and `effects.review`.
    Commit {
        effects: Effects,
        retry_in: Option<Duration>,
        unless_finished: Option<String>,
    },
}

impl Settlement {
    /// Commit `rows`, then ack.
    pub fn rows(rows: Vec<Row>) -> Self {
        Self::finished(Effects {
            rows,
            ..Effects::default()
        })
    }

    /// Commit the effects' rows, publish their calls, ack, announce.
    pub fn finished(effects: Effects) -> Self {
        Self::Commit {
            effects,
            retry_in: None,
            unless_finished: None,
        }
    }

    /// Commit `rows`, then nak: the same call again after `delay`.
    pub fn retry(rows: Vec<Row>, delay: Duration) -> Self {
        Self::Commit {
            effects: Effects {
                rows,
                ..Effects::default()
            },
            retry_in: Some(delay),
            unless_finished: None,
        }
    }

    /// A read or write failed: log it and have the message back in a second.
    pub fn failed(e: &anyhow::Error) -> Self {
        warn!(error = %format!("{e:#}"), "could not finish the message; it will be redelivered");
        Self::Nak(Some(REDELIVER_AFTER))
    }
}

/// How soon a message whose handling failed comes back.
const REDELIVER_AFTER: Duration = Duration::from_secs(1);

/// Something that can tell JetStream a message is still being worked on.
/// A NATS message does; a step driven in a test holds nothing.
pub trait Hold: Sync {
    fn progress(&self) -> impl Future<Output = ()> + Send;
}

impl Hold for Message {
    async fn progress(&self) {
        let _ = self.ack_with(AckKind::Progress).await;
    }
}

/// Commit `rows` while holding the message (progress acks) as long as the
/// database is unreachable, instead of burning its deliveries; gives up
/// only when `stop` is cancelled or the rows themselves are refused.
pub async fn commit_holding<H: Hold>(
    writer: &Writer,
    hold: &H,
    rows: Vec<Row>,
    stop: &CancellationToken,
) -> Result<Committed> {
    writer.write_holding(rows, || hold.progress(), stop).await
}

/// Settles messages: see the module doc.
#[derive(Clone)]
pub struct Settler {
    pub bus: Bus,
    pub writer: Writer,
    pub token: CancellationToken,
}

impl Settler {
    /// Carry out `s` for `msg`. Returns what was committed, if the message
    /// was settled with a commit that succeeded.
    pub async fn settle(&self, msg: &Message, s: Settlement) -> Option<Committed> {
        let (effects, retry_in, unless_finished) = match s {
            Settlement::Ack => {
                let _ = msg.ack().await;
                return None;
            }
            Settlement::Nak(delay) => {
                let _ = msg.ack_with(AckKind::Nak(delay)).await;
                return None;
            }
            Settlement::Leave => return None,
            Settlement::Commit {
                effects,
                retry_in,
                unless_finished,
            } => (effects, retry_in, unless_finished),
        };
        let Effects {
            rows,
            calls,
            done,
            review,
        } = effects;
        let committed = if rows.is_empty() {
            Committed::default()
        } else {
            match commit_holding(&self.writer, msg, rows, &self.token).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "commit failed; message will be redelivered");
                    let _ = msg.ack_with(AckKind::Nak(Some(REDELIVER_AFTER))).await;
                    return None;
                }
            }
        };
        let duplicate = unless_finished
            .as_ref()
            .and_then(|id| committed.job_status.get(id))
            .is_some_and(|s| s.is_terminal());
        if duplicate {
            tracing::debug!("job already finished; duplicate ignored");
            let _ = msg.ack().await;
            return Some(committed);
        }
        for c in &calls {
            let published = match serde_json::to_vec(c) {
                Ok(body) => {
                    self.bus
                        .publish_durable(self.bus.names.subject_of(c), &c.msg_id(), body.into())
                        .await
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = published {
                warn!(error = %format!("{e:#}"), "publishing the next step failed; will retry");
                let _ = msg.ack_with(AckKind::Nak(Some(REDELIVER_AFTER))).await;
                return None;
            }
        }
        let acked = match retry_in {
            Some(d) => msg.ack_with(AckKind::Nak(Some(d))).await,
            None => msg.ack().await,
        };
        if let Err(e) = acked {
            warn!(error = %e, "ack failed; a redelivery will find the job finished");
        }
        if let Some(ev) = &review {
            self.bus.publish_review(ev).await;
        }
        if let Some(ev) = &done {
            crate::metrics::global().inc(
                "switchyard_jobs_finished_total",
                &[
                    ("category", ev.category.as_str()),
                    ("status", ev.status.as_str()),
                ],
                1.0,
            );
            self.bus.publish_done(ev).await;
        }
        Some(committed)
    }
}
