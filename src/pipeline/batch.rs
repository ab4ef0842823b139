//! A provider's batch lane: calls of categories with `delivery = "batch"`
//! (or `auto` with time to spare) go through the provider's batch API at
//! half price.
//!
//! - **Collect**: consumes `<prefix>.calls.<provider>.batch`; each call
//!   becomes an item of the open batch of its provider and model in
//!   Postgres (`batch_items`, one transaction), then the message is acked.
//!   Durable from then on: nothing waits in memory.
//! - **Submit**: a batch whose `flush_after` came (or that is full) is
//!   leased by one process and submitted, tagged with our id. A submission
//!   whose holder died is resumed by another process, which first looks
//!   for the batch at the provider (OpenAI metadata, Gemini display name;
//!   Anthropic keeps no tag: a recent batch of the same size that no row
//!   names) instead of submitting it twice.
//! - **Poll and ingest**: each submitted batch is polled by one process at a
//!   time (a lease, `providers.<name>.batch_lease_secs`, that passes on
//!   when its holder dies), more often while it is young and as its jobs'
//!   earliest deadline draws near; when it ends, its results are streamed
//!   and every item's result is published to the provider's real-time subject as a call
//!   message carrying it (`CallMsg::batch_result`, `Nats-Msg-Id`
//!   `<job>#<step>#b<attempt>`), where the lane records it at batch prices
//!   and the job goes on exactly as after a real-time answer (or the item
//!   goes real-time, see `LaneStep`). Items without a result line (an
//!   expired Gemini batch) are handed on as `missing`. Re-ingesting after a
//!   crash publishes the same messages again: JetStream drops duplicates,
//!   and the lane ignores a result for a settled step beyond recording it.
//!
//! One failing batch never stops the others: every error is logged and the
//! batch is polled again later.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::{BatchOutcome, BatchResult, Bus, CallMsg};
use crate::config::Config;
use crate::providers::batch::{
    BatchClient, BatchEnd, BatchItem, BatchState, ItemOutcome, ItemResult, Kind,
};
use crate::providers::CallRequest;
use crate::store::batches::{self, Enqueued, NewItem};

/// Results handled per database round trip while ingesting.
const CHUNK: usize = 256;

/// When to poll a running batch again: often while it is young (most end
/// within minutes), rarely when it is old, and more often again as the
/// earliest deadline of its waiting jobs draws near (a quarter of the time
/// left, so an answer that comes in time is not missed).
pub fn next_poll(age_secs: f64, nearest_deadline_ms: Option<i64>, now_ms: i64) -> Duration {
    let by_age = match age_secs {
        a if a < 60.0 => Duration::from_millis(500),
        a if a < 600.0 => Duration::from_secs(5),
        a if a < 3600.0 => Duration::from_secs(30),
        _ => Duration::from_secs(120),
    };
    let by_deadline = nearest_deadline_ms.map_or(by_age, |d| {
        let left = u64::try_from(d.saturating_sub(now_ms)).unwrap_or(0);
        Duration::from_millis(left / 4)
    });
    by_age.min(by_deadline).max(Duration::from_millis(500))
}

/// One provider's batch lane.
pub struct BatchLane {
    name: String,
    cfg: Arc<Config>,
    pool: PgPool,
    bus: Bus,
    client: BatchClient,
    /// This process, as a lease holder.
    owner: String,
    /// How long it holds a batch (`providers.<name>.batch_lease_secs`).
    lease: Duration,
    /// The provider's batch queue caps.
    queue: batches::QueueLimits,
    token: CancellationToken,
}

impl BatchLane {
    /// The batch lane of provider `name`, if its kind has a batch API.
    pub fn new(
        name: &str,
        cfg: Arc<Config>,
        pool: PgPool,
        bus: Bus,
        token: CancellationToken,
    ) -> Result<Option<Self>> {
        let pc = cfg
            .providers
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no provider `{name}` in config"))?;
        let Some(client) = BatchClient::from_config(name, pc)? else {
            return Ok(None);
        };
        let lease = Duration::from_secs(pc.batch_lease_secs);
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let queue = batches::QueueLimits {
            requests: pc.batch_queue_requests.map(as_i64),
            tokens: cfg
                .models
                .iter()
                .filter(|(_, m)| m.provider == name)
                .filter_map(|(id, m)| Some((id.clone(), as_i64(m.batch_queue_tokens?))))
                .collect(),
        };
        Ok(Some(Self {
            name: name.to_string(),
            cfg,
            pool,
            bus,
            client,
            owner: format!("{}-{:08x}", std::process::id(), fastrand::u32(..)),
            lease,
            queue,
            token,
        }))
    }

    pub async fn consumer(&self) -> Result<PullConsumer> {
        let n = &self.bus.names;
        self.bus
            .pull_consumer(
                &n.calls_stream(),
                &n.batch_consumer(&self.name),
                &n.batch_subject(&self.name),
                self.cfg.ack_wait(),
                i64::from(self.cfg.retry.max_attempts) + 3,
                1024,
            )
            .await
    }

    /// The provider's own limits on one batch: items and bytes.
    fn provider_caps(&self) -> (i32, i64) {
        match self.client.kind() {
            Kind::OpenAi => (50_000, 190 << 20),
            Kind::Anthropic => (100_000, 240 << 20),
            // Inline requests: 20 MB in all.
            Kind::Gemini => (20_000, 18 << 20),
        }
    }

    /// Collect one batch call message into its open batch.
    pub async fn collect(&self, msg: Message) {
        // A newer format is the real-time lane's to judge (it waits for an
        // upgraded worker, or dead-letters with the reason).
        if let Some(format) = CallMsg::newer_format(&msg.payload) {
            warn!(lane = %self.name, format, "batch call message of a newer format; leaving it for an upgraded worker");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(15))))
                .await;
            return;
        }
        let call = match serde_json::from_slice::<CallMsg>(&msg.payload)
            .map_err(|e| e.to_string())
            .and_then(|c| c.validate().map(|()| c))
        {
            Ok(c) => c,
            Err(why) => {
                // The real-time lane dead-letters what it cannot work on.
                warn!(lane = %self.name, %why, "batch call message unreadable; passing it to the lane");
                let id = msg
                    .info()
                    .map(|i| format!("unreadable-{}-{}", i.stream, i.stream_sequence))
                    .unwrap_or_default();
                let to = self.bus.names.call_subject(&self.name);
                match self.bus.publish_durable(to, &id, msg.payload.clone()).await {
                    Ok(_) => {
                        let _ = msg.ack().await;
                    }
                    Err(_) => {
                        let _ = msg
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                }
                return;
            }
        };
        match self.enqueue(&call).await {
            Ok(()) => {
                let _ = msg.ack().await;
            }
            Err(e) => {
                warn!(lane = %self.name, job_id = %call.job_id, error = %format!("{e:#}"),
                      "could not add the call to a batch; it will be redelivered");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }

    async fn enqueue(&self, call: &CallMsg) -> Result<()> {
        if let Some(s) = crate::store::job_status(&self.pool, &call.job_id).await? {
            if s.is_terminal() {
                return Ok(());
            }
        }
        if call.plan.records_steps() {
            let steps = crate::store::load_steps(&self.pool, &call.job_id).await?;
            if steps.iter().any(|r| r.step == call.step) {
                return Ok(());
            }
        }
        let cat = self.cfg.categories.get(&call.category);
        let batch_cfg = cat.map(|c| c.batch.clone()).unwrap_or_default();
        let (cap_items, cap_bytes) = self.provider_caps();
        // A call the response cache can answer is never put in a batch.
        if let Some((_, scope)) = self.cfg.cache_of(&call.category) {
            let key = crate::store::cache::key(&self.name, &call.request(&self.cfg), scope);
            if crate::store::cache::has(&self.pool, &key).await? {
                let mut call = call.clone();
                call.batch = false;
                // Its own message id: the batch subject's copy used the plain one.
                call.attempt_base = call.attempt_base.max(1);
                return self.publish_to_lane(&call).await;
            }
        }
        let tokens = i64::try_from(crate::providers::estimate_input_tokens(&call.messages))
            .unwrap_or(i64::MAX);
        let max_tokens = self.queue.tokens.get(&call.model).copied();
        if max_tokens.is_some_and(|cap| tokens > cap) {
            // Larger than the model's whole batch queue: it can only go real-time.
            warn!(lane = %self.name, job_id = %call.job_id, tokens,
                  "call larger than the model's batch queue limit; it goes real-time");
            let mut call = call.clone();
            call.batch = false;
            // Its own message id: the batch subject's copy used the plain one.
            call.attempt_base = call.attempt_base.max(1);
            return self.publish_to_lane(&call).await;
        }
        let body = serde_json::to_value(call)?;
        let bytes = body.to_string().len() as i64;
        let added = batches::enqueue(
            &self.pool,
            &NewItem {
                provider: &self.name,
                model: &call.model,
                job_id: &call.job_id,
                step: call.step,
                call: body,
                bytes,
                flush_after: batch_cfg.flush_after(),
                max_items: i32::try_from(batch_cfg.max_items)
                    .unwrap_or(i32::MAX)
                    .min(cap_items)
                    .min(
                        self.queue
                            .requests
                            .map_or(i32::MAX, |r| i32::try_from(r).unwrap_or(i32::MAX)),
                    ),
                max_bytes: cap_bytes,
                tokens,
                max_tokens,
            },
        )
        .await?;
        if let Enqueued::Added {
            batch_id,
            custom_id,
            ..
        } = added
        {
            debug!(lane = %self.name, job_id = %call.job_id, %batch_id, %custom_id, "call added to a batch");
        }
        Ok(())
    }

    /// Submit due batches and poll submitted ones until stopped.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = self.token.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Idle (no batch under way): one query a tick instead of three.
            match batches::any_unfinished(&self.pool, &self.name).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    warn!(lane = %self.name, error = %format!("{e:#}"), "batch check failed");
                    continue;
                }
            }
            if let Err(e) = self.submit_due().await {
                warn!(lane = %self.name, error = %format!("{e:#}"), "batch submission round failed");
            }
            if let Err(e) = self.poll_due().await {
                warn!(lane = %self.name, error = %format!("{e:#}"), "batch polling round failed");
            }
            if let Err(e) = self.guard_deadlines().await {
                warn!(lane = %self.name, error = %format!("{e:#}"), "deadline guard round failed");
            }
        }
    }

    async fn submit_due(&self) -> Result<()> {
        while !self.token.is_cancelled() {
            let Some(b) =
                batches::claim_submit(&self.pool, &self.name, &self.owner, self.lease, &self.queue)
                    .await?
            else {
                return Ok(());
            };
            if let Err(e) = self.submit(&b).await {
                warn!(lane = %self.name, batch = %b.id, error = %format!("{e:#}"), "batch not submitted");
            }
        }
        Ok(())
    }

    /// Send real-time the waiting items whose job's deadline draws near
    /// (within twice the provider's timeout plus a minute): the batch may
    /// still answer them, and that answer is recorded, but it will not be
    /// the job's.
    async fn guard_deadlines(&self) -> Result<()> {
        let timeout = self.cfg.providers[&self.name].timeout();
        let margin = (timeout * 2 + Duration::from_secs(60)).as_millis() as i64;
        let due =
            batches::near_deadline(&self.pool, &self.name, crate::clock::now_ms() + margin, 256)
                .await?;
        for (batch_id, item) in due {
            let mut call: CallMsg = serde_json::from_value(item.call.clone())?;
            call.batch = false;
            call.attempt_base = u32::try_from(item.attempt).unwrap_or(0);
            self.publish_to_lane(&call).await?;
            batches::handed_off(&self.pool, &batch_id, std::slice::from_ref(&item.custom_id))
                .await?;
            info!(lane = %self.name, batch = %batch_id, job_id = %call.job_id,
                  "deadline near: the call goes real-time");
        }
        Ok(())
    }

    async fn submit(&self, b: &batches::ToSubmit) -> Result<()> {
        let items = batches::items(&self.pool, &b.id).await?;
        if items.is_empty() {
            // Every item went real-time before the batch was due.
            return batches::ended(&self.pool, &b.id, "empty", None).await;
        }
        let calls: Vec<(String, CallRequest)> = items
            .into_iter()
            .filter_map(|(custom_id, v)| {
                let c: CallMsg = serde_json::from_value(v).ok()?;
                Some((custom_id, c.request(&self.cfg)))
            })
            .collect();
        if b.resumed {
            if let Some(pid) = self.find_submitted(&b.id, calls.len() as u64).await? {
                info!(lane = %self.name, batch = %b.id, provider_batch = %pid,
                      "found the batch a stopped worker submitted; not submitting it again");
                return batches::submitted(&self.pool, &b.id, &pid).await;
            }
        }
        let items: Vec<BatchItem<'_>> = calls
            .iter()
            .map(|(id, r)| BatchItem {
                custom_id: id,
                request: r,
            })
            .collect();
        match self.client.submit(&b.model, &b.id, &items).await {
            Ok(pid) => {
                info!(lane = %self.name, batch = %b.id, provider_batch = %pid, items = items.len(), "batch submitted");
                batches::submitted(&self.pool, &b.id, &pid).await
            }
            Err(e) if e.retryable => {
                batches::reopen(&self.pool, &b.id, &e.to_string(), Duration::from_secs(30)).await
            }
            Err(e) => {
                // Refused as a whole: every item goes on without the batch.
                warn!(lane = %self.name, batch = %b.id, error = %e, "the provider refused the batch");
                self.hand_on_pending(&b.id, |_| BatchOutcome::Failed {
                    error: format!("the provider refused the batch: {e}"),
                    retryable: true,
                    http_status: e.http_status,
                })
                .await?;
                batches::ended(&self.pool, &b.id, "refused", Some(&e.to_string())).await
            }
        }
    }

    /// The provider's id of batch `tag` if a stopped worker submitted it.
    async fn find_submitted(&self, tag: &str, items: u64) -> Result<Option<String>> {
        let recent = self.client.recent(200).await?;
        if self.client.kind() != Kind::Anthropic {
            return Ok(recent
                .into_iter()
                .find(|b| b.tag.as_deref() == Some(tag))
                .map(|b| b.id));
        }
        // Anthropic keeps no tag: a recent batch of this size no row names.
        let known = batches::known_provider_ids(&self.pool, &self.name).await?;
        let mut candidates: Vec<_> = recent
            .into_iter()
            .filter(|b| b.total == items && !known.contains(&b.id))
            .collect();
        Ok((candidates.len() == 1).then(|| candidates.remove(0).id))
    }

    async fn poll_due(&self) -> Result<()> {
        let due = batches::claim_polls(&self.pool, &self.name, &self.owner, self.lease, 8).await?;
        for b in due {
            if self.token.is_cancelled() {
                return Ok(());
            }
            if let Err(e) = self.poll(&b).await {
                warn!(lane = %self.name, batch = %b.id, error = %format!("{e:#}"), "batch poll failed; will poll again");
                let _ = batches::polled(
                    &self.pool,
                    &b.id,
                    "poll failed",
                    0,
                    0,
                    Duration::from_secs(10),
                )
                .await;
            }
        }
        Ok(())
    }

    /// Poll one batch; ingest it when it has ended.
    async fn poll(&self, b: &batches::ToPoll) -> Result<()> {
        let status = self.client.status(&b.provider_batch_id).await?;
        let counts = status.counts;
        let state = match &status.state {
            BatchState::Running => "running",
            BatchState::Cancelling => "cancelling",
            BatchState::Ended(BatchEnd::Completed) => "completed",
            BatchState::Ended(BatchEnd::Expired) => "expired",
            BatchState::Ended(BatchEnd::Cancelled) => "cancelled",
            BatchState::Ended(BatchEnd::Failed(_)) => "failed",
        };
        if !matches!(status.state, BatchState::Ended(_)) {
            let next = next_poll(b.age_secs, b.nearest_deadline_ms, crate::clock::now_ms());
            return batches::polled(
                &self.pool,
                &b.id,
                state,
                counts.succeeded as i64,
                counts.failed as i64,
                next,
            )
            .await;
        }
        // Stream the results through a small channel, in chunks.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ItemResult>(CHUNK);
        let read = async {
            let r = self.client.results(&status, &tx).await;
            drop(tx);
            r
        };
        let handle = async {
            let mut chunk = Vec::with_capacity(CHUNK);
            let mut unknown = 0u64;
            loop {
                let more = rx.recv_many(&mut chunk, CHUNK).await;
                if more == 0 {
                    break;
                }
                unknown += self
                    .hand_on_results(&b.id, std::mem::take(&mut chunk))
                    .await?;
            }
            anyhow::Ok(unknown)
        };
        let (read, unknown) = tokio::join!(read, handle);
        let tally = read?;
        let unknown = unknown?;
        if tally.malformed > 0 || unknown > 0 {
            warn!(lane = %self.name, batch = %b.id, malformed = tally.malformed, unknown,
                  "batch results with unreadable lines or unknown custom ids (counted, skipped)");
        }
        // What the batch did not answer at all goes on as missing.
        let missing = self
            .hand_on_pending(&b.id, |_| BatchOutcome::Missing)
            .await?;
        info!(lane = %self.name, batch = %b.id, state, items = tally.items, missing,
              "batch ingested");
        let error = match &status.state {
            BatchState::Ended(BatchEnd::Failed(why)) => Some(why.as_str()),
            _ => None,
        };
        batches::ingested(&self.pool, &b.id, state, error, tally.malformed, unknown).await
    }

    /// Publish the results of `results` to the lane; returns how many named
    /// no pending item of the batch.
    async fn hand_on_results(&self, batch_id: &str, results: Vec<ItemResult>) -> Result<u64> {
        let ids: Vec<String> = results.iter().map(|r| r.custom_id.clone()).collect();
        let items = batches::pending_items(&self.pool, batch_id, Some(&ids)).await?;
        let mut by_id: std::collections::HashMap<String, batches::Item> = items
            .into_iter()
            .map(|i| (i.custom_id.clone(), i))
            .collect();
        let mut unknown = 0;
        let mut done = Vec::with_capacity(results.len());
        for r in results {
            let Some(item) = by_id.remove(&r.custom_id) else {
                unknown += 1;
                continue;
            };
            let outcome = match r.outcome {
                ItemOutcome::Answered(resp) => BatchOutcome::Answered {
                    text: resp.text,
                    finish_reason: resp.finish_reason,
                    usage: resp.usage,
                },
                ItemOutcome::Failed(e) => BatchOutcome::Failed {
                    error: e.to_string(),
                    retryable: e.retryable,
                    http_status: e.http_status,
                },
                ItemOutcome::Expired => BatchOutcome::Expired,
                ItemOutcome::Cancelled => BatchOutcome::Cancelled,
            };
            self.publish_result(batch_id, &item, outcome).await?;
            done.push(item.custom_id);
        }
        batches::items_done(&self.pool, batch_id, &done).await?;
        Ok(unknown)
    }

    /// Hand every still-pending item of a batch on with `outcome`; returns
    /// how many.
    async fn hand_on_pending(
        &self,
        batch_id: &str,
        outcome: impl Fn(&batches::Item) -> BatchOutcome,
    ) -> Result<usize> {
        let items = batches::pending_items(&self.pool, batch_id, None).await?;
        let mut done = Vec::with_capacity(items.len());
        for item in &items {
            self.publish_result(batch_id, item, outcome(item)).await?;
            done.push(item.custom_id.clone());
        }
        batches::items_done(&self.pool, batch_id, &done).await?;
        Ok(done.len())
    }

    async fn publish_result(
        &self,
        batch_id: &str,
        item: &batches::Item,
        outcome: BatchOutcome,
    ) -> Result<()> {
        let mut call: CallMsg = serde_json::from_value(item.call.clone())?;
        call.batch_result = Some(BatchResult {
            batch_id: batch_id.to_string(),
            attempt: item.attempt,
            outcome,
        });
        self.publish_to_lane(&call).await
    }

    /// Publish `call` to the provider's real-time lane under its own id.
    async fn publish_to_lane(&self, call: &CallMsg) -> Result<()> {
        let body = serde_json::to_vec(call)?;
        self.bus
            .publish_durable(self.bus.names.subject_of(call), &call.msg_id(), body.into())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_slow_down_with_age_and_speed_up_near_a_deadline() {
        let now = 1_000_000_000;
        let s = Duration::from_secs;
        assert_eq!(next_poll(10.0, None, now), Duration::from_millis(500));
        assert_eq!(next_poll(300.0, None, now), s(5));
        assert_eq!(next_poll(1800.0, None, now), s(30));
        assert_eq!(next_poll(7200.0, None, now), s(120));
        // Two hours old, its first deadline 40 s away: every 10 s.
        assert_eq!(next_poll(7200.0, Some(now + 40_000), now), s(10));
        // A far deadline changes nothing; a past one polls at the floor.
        assert_eq!(next_poll(7200.0, Some(now + 86_400_000), now), s(120));
        assert_eq!(
            next_poll(7200.0, Some(now - 5_000), now),
            Duration::from_millis(500)
        );
    }
}
