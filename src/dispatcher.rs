//! The dispatcher: consumes `<prefix>.jobs.>`, validates each job, stores it
//! (or dead-letters it), asks the router for the first call and publishes
//! that call to its provider lane. A job message is acked only after its row
//! is committed and its call is accepted by JetStream.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use tracing::{debug, warn, Instrument};

use crate::bus::{published_ms, Bus, CallMsg};
use crate::config::Config;
use crate::envelope::{parse_job, Parsed, ValidJob};
use crate::route;
use crate::store::{DeadLetterRow, JobRow, Row, Writer, TERMINAL};

/// Redeliveries of one job message before JetStream gives up on it (each
/// one only happens when Postgres or NATS failed while handling it).
pub const DISPATCH_MAX_DELIVER: i64 = 20;

#[derive(Clone)]
pub struct Dispatcher {
    cfg: Arc<Config>,
    bus: Bus,
    writer: Writer,
}

impl Dispatcher {
    pub fn new(cfg: Arc<Config>, bus: Bus, writer: Writer) -> Self {
        Self { cfg, bus, writer }
    }

    pub async fn consumer(&self) -> Result<PullConsumer> {
        let n = &self.bus.names;
        self.bus
            .pull_consumer(
                &n.jobs_stream(),
                n.dispatcher_consumer(),
                &n.jobs_wildcard(),
                self.cfg.ack_wait(),
                DISPATCH_MAX_DELIVER,
                (self.cfg.dispatcher.concurrency + self.cfg.writer.batch_size) as i64,
            )
            .await
    }

    /// Handle one job message. Never panics on its content.
    pub async fn handle(&self, msg: Message) {
        let (stream, seq, published) = match msg.info() {
            Ok(i) => (i.stream.to_string(), i.stream_sequence, published_ms(&i)),
            Err(e) => {
                warn!(error = %e, "job message without JetStream metadata; dropping");
                let _ = msg.ack().await;
                return;
            }
        };
        let subject = msg.subject.to_string();
        let category = self.bus.names.category_of(&subject).to_string();
        let parsed = parse_job(
            &msg.payload,
            &category,
            &format!("{stream}-{seq}"),
            self.cfg.limits.max_payload_bytes,
            |c| self.cfg.categories.contains_key(c),
        );
        let span =
            tracing::info_span!("job", job_id = tracing::field::Empty, category = %category, seq);
        let res = async {
            match parsed {
                Parsed::Valid(job) => {
                    tracing::Span::current().record("job_id", job.id.as_str());
                    self.accept(job, published).await
                }
                Parsed::Rejected {
                    id,
                    category: cat,
                    reason,
                } => {
                    warn!(job_id = ?id, %reason, "job dead-lettered");
                    let mut rows = vec![Row::DeadLetter(DeadLetterRow {
                        source: format!("{stream}:{seq}"),
                        subject: subject.clone(),
                        job_id: id.clone(),
                        payload: msg.payload.to_vec(),
                        reason: reason.to_string(),
                    })];
                    if let Some(id) = id {
                        let envelope = (msg.payload.len() <= self.cfg.limits.max_payload_bytes)
                            .then(|| serde_json::from_slice::<serde_json::Value>(&msg.payload).ok())
                            .flatten();
                        rows.push(Row::Job(JobRow {
                            id,
                            category: cat.unwrap_or(category.clone()),
                            status: "dead",
                            envelope,
                            route_decision: None,
                            error: Some(reason.to_string()),
                            enqueued_at_ms: published,
                        }));
                    }
                    self.writer.write(rows).await.map(|_| ())
                }
            }
        }
        .instrument(span)
        .await;
        match res {
            Ok(()) => {
                if let Err(e) = msg.ack().await {
                    warn!(error = %e, "ack failed; the job will be redelivered and deduplicated");
                }
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "job not dispatched; will retry");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }

    async fn accept(&self, job: ValidJob, published: i64) -> Result<()> {
        let Some(decision) = route::first_call(&self.cfg, &job.category) else {
            anyhow::bail!("category `{}` has no usable route", job.category);
        };
        let cat = &self.cfg.categories[&job.category];
        let row = JobRow {
            id: job.id.clone(),
            category: job.category.clone(),
            status: "queued",
            envelope: serde_json::to_value(&job.envelope).ok(),
            route_decision: serde_json::to_value(&decision).ok(),
            error: None,
            enqueued_at_ms: published,
        };
        let committed = self.writer.write(vec![Row::Job(row)]).await?;
        if let Some(status) = committed.job_status.get(&job.id) {
            if TERMINAL.contains(&status.as_str()) {
                debug!(%status, "job already finished; duplicate ignored");
                return Ok(());
            }
        }
        let call = CallMsg {
            job_id: job.id.clone(),
            category: job.category.clone(),
            provider: decision.provider.clone(),
            model: decision.model.clone(),
            step: 0,
            messages: job.envelope.conversation(cat.system.as_deref()),
            max_tokens: job.envelope.params.max_tokens.unwrap_or(cat.max_tokens),
            temperature: job.envelope.params.temperature,
            enqueued_at_ms: published,
        };
        let body = serde_json::to_vec(&call)?;
        self.bus
            .publish_durable(
                self.bus.names.call_subject(&call.provider),
                &call.msg_id(),
                body.into(),
            )
            .await?;
        Ok(())
    }
}
