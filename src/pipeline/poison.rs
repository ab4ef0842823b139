//! Messages JetStream gave up on. When a job or call message reaches its
//! consumer's `max_deliver` (a worker crashed on it again and again, or its
//! commit kept failing), the server publishes a max-deliveries advisory. One
//! worker per prefix (a queue group) records the message in `dead_letters`
//! with every recorded attempt's error, marks its job `dead` unless it already
//! ended, and deletes the message from the work-queue stream, which would
//! otherwise keep it forever.

use anyhow::{Context, Result};
use futures::StreamExt;
use serde::Deserialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::{Bus, CallMsg, DoneEvent};
use crate::store::{self, DeadLetterRow, JobStatus, Row, StatusRow, Writer};

/// The fields of `io.nats.jetstream.advisory.v1.max_deliver` we use.
#[derive(Debug, Clone, Deserialize)]
pub struct MaxDeliveries {
    pub stream: String,
    pub consumer: String,
    pub stream_seq: u64,
    pub deliveries: u64,
}

/// Listen for max-deliveries advisories of this prefix's streams until `token` is cancelled.
pub async fn run(bus: Bus, pool: PgPool, writer: Writer, token: CancellationToken) {
    let mut sub = match bus.max_delivery_advisories().await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "cannot listen for max-deliveries advisories; poison messages will stay in their streams");
            return;
        }
    };
    let ours = [bus.names.jobs_stream(), bus.names.calls_stream()];
    loop {
        let msg = tokio::select! {
            _ = token.cancelled() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        let adv: MaxDeliveries = match serde_json::from_slice(&msg.payload) {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "unreadable max-deliveries advisory");
                continue;
            }
        };
        if !ours.contains(&adv.stream) {
            continue;
        }
        if let Err(e) = handle(&bus, &pool, &writer, &adv).await {
            warn!(stream = %adv.stream, seq = adv.stream_seq, error = %format!("{e:#}"),
                  "could not dead-letter a message JetStream gave up on");
        }
    }
}

/// The job a stored message belongs to, and its category if the message
/// says: a call message's, or a job envelope's.
fn job_of(payload: &[u8]) -> Option<(String, Option<String>)> {
    if let Ok(c) = serde_json::from_slice::<CallMsg>(payload) {
        return Some((c.job_id, Some(c.category)));
    }
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let id = v.get("id")?.as_str()?.to_string();
    let category = v
        .get("category")
        .and_then(|c| c.as_str())
        .map(str::to_string);
    Some((id, category))
}

/// Dead-letter the message the advisory names, then delete it from its stream.
pub async fn handle(bus: &Bus, pool: &PgPool, writer: &Writer, adv: &MaxDeliveries) -> Result<()> {
    let stream = bus
        .js
        .get_stream(&adv.stream)
        .await
        .map_err(|e| anyhow::anyhow!("getting stream {}: {e}", adv.stream))?;
    let msg = match stream.get_raw_message(adv.stream_seq).await {
        Ok(m) => m,
        // Gone already (another worker, or it was acked at the last moment).
        Err(_) => return Ok(()),
    };
    let job = job_of(&msg.payload);
    let job_id = job.as_ref().map(|(id, _)| id.clone());
    let mut reason = format!(
        "JetStream gave up after {} deliveries to consumer {}",
        adv.deliveries, adv.consumer
    );
    let mut finished = false;
    if let Some(id) = &job_id {
        if let Some(status) = store::job_status(pool, id).await? {
            finished = status.is_terminal();
        }
        let attempts = store::jobs::attempts(pool, id)
            .await
            .context("reading the job's attempts")?;
        if attempts.is_empty() {
            reason.push_str("; no provider attempt was recorded");
        } else {
            reason.push_str("; attempts:");
            for store::jobs::Attempt {
                step,
                attempt,
                error,
            } in attempts
            {
                reason.push_str(&format!(" [step {step} attempt {attempt}: {error}]"));
            }
        }
    }
    if !finished {
        let mut rows = vec![Row::DeadLetter(DeadLetterRow {
            source: format!("{}:{}", adv.stream, adv.stream_seq),
            subject: msg.subject.to_string(),
            job_id: job_id.clone(),
            payload: msg.payload.to_vec(),
            reason: reason.clone(),
        })];
        if let Some(id) = &job_id {
            rows.push(Row::Status(StatusRow {
                job_id: id.clone(),
                status: JobStatus::Dead,
                error: Some(reason.clone()),
                ..Default::default()
            }));
        }
        writer.write(rows).await?;
        info!(job_id = ?job_id, %reason, "dead-lettered a message JetStream gave up on");
        if let Some((id, category)) = job {
            let category =
                category.unwrap_or_else(|| bus.names.category_of(&msg.subject).to_string());
            bus.publish_done(&DoneEvent {
                job_id: id,
                category,
                status: JobStatus::Dead,
            })
            .await;
        }
    }
    stream
        .delete_message(adv.stream_seq)
        .await
        .map_err(|e| anyhow::anyhow!("deleting {}:{}: {e}", adv.stream, adv.stream_seq))?;
    Ok(())
}
