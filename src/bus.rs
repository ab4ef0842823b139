//! NATS JetStream: connection, subjects, streams, consumers and the message
//! shapes that travel between the dispatcher and the lanes. The only module
//! (with `bench`'s raw ceiling measurement) that talks to NATS. How a
//! process connects (URLs, TLS, credentials) is [`connect`].

pub mod connect;

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::envelope::{Message, Priority};
use crate::route::{Plan, StepRecord};

/// Subject and stream names for one prefix.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
    pub fn jobs_stream(&self) -> String {
        format!("{}_JOBS", self.prefix.to_ascii_uppercase())
    }
    pub fn calls_stream(&self) -> String {
        format!("{}_CALLS", self.prefix.to_ascii_uppercase())
    }
    pub fn job_subject(&self, category: &str) -> String {
        format!("{}.jobs.{category}", self.prefix)
    }
    pub fn jobs_wildcard(&self) -> String {
        format!("{}.jobs.>", self.prefix)
    }
    pub fn call_subject(&self, provider: &str) -> String {
        format!("{}.calls.{provider}", self.prefix)
    }
    /// The subject of a provider lane's calls at `priority`: `normal` on
    /// `<prefix>.calls.<provider>`, the others one token deeper (`.high`,
    /// `.low`), so the three consumers' filters never overlap.
    pub fn call_subject_at(&self, provider: &str, priority: Priority) -> String {
        match priority {
            Priority::Normal => self.call_subject(provider),
            p => format!("{}.calls.{provider}.{}", self.prefix, p.as_str()),
        }
    }
    /// Calls for a provider's batch API.
    pub fn batch_subject(&self, provider: &str) -> String {
        format!("{}.calls.{provider}.batch", self.prefix)
    }
    /// Where a call message goes: its provider's real-time lane, or its batch lane.
    pub fn subject_of(&self, call: &CallMsg) -> String {
        if call.batch && call.batch_result.is_none() {
            self.batch_subject(&call.provider)
        } else {
            self.call_subject_at(&call.provider, call.priority)
        }
    }
    pub fn calls_wildcard(&self) -> String {
        format!("{}.calls.>", self.prefix)
    }
    pub fn review_subject(&self, category: &str) -> String {
        format!("{}.review.{category}", self.prefix)
    }
    pub fn done_subject(&self, category: &str) -> String {
        format!("{}.done.{category}", self.prefix)
    }
    pub fn dispatcher_consumer(&self) -> &'static str {
        "dispatcher"
    }
    pub fn lane_consumer(&self, provider: &str) -> String {
        format!("lane-{provider}")
    }
    /// The lane's consumer of `priority` calls (`lane-<provider>` for normal).
    pub fn lane_consumer_at(&self, provider: &str, priority: Priority) -> String {
        match priority {
            Priority::Normal => self.lane_consumer(provider),
            p => format!("prio-{}-{provider}", p.as_str()),
        }
    }
    pub fn batch_consumer(&self, provider: &str) -> String {
        format!("batch-{provider}")
    }
    /// The last subject token after `<prefix>.jobs.` (the subject category).
    pub fn category_of<'a>(&self, subject: &'a str) -> &'a str {
        subject.rsplit('.').next().unwrap_or("")
    }
}

/// A connected JetStream context plus names.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
}

/// The format of the call messages this build writes. A worker that meets
/// a newer one leaves it for an upgraded worker (see [`CallMsg::newer_format`]).
pub const CALL_FORMAT: u32 = 1;

fn call_format_1() -> u32 {
    1
}

/// The internal message sent to a provider lane for one step of a job:
/// everything the lane needs to make the call, write its rows and decide what
/// follows, so a lane reads Postgres only for consensus votes and redeliveries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallMsg {
    /// The message's format ([`CALL_FORMAT`] when this build writes it;
    /// absent in messages of builds before formats were numbered: 1).
    #[serde(default = "call_format_1")]
    pub format: u32,
    pub job_id: String,
    pub category: String,
    pub provider: String,
    pub model: String,
    /// Step of the job's plan (see `route`); -1 is the classifier.
    pub step: i32,
    /// The messages of this call.
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// When the job was published to NATS, in Unix milliseconds.
    pub enqueued_at_ms: i64,
    /// The job's plan.
    pub plan: Plan,
    /// The job's conversation (system prompt and turns), for later steps.
    pub conv: Vec<Message>,
    /// Finished steps so far (sequential plans).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<StepRecord>,
    /// The job's own `max_tokens`, if it set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_max_tokens: Option<u32>,
    /// Attempts of this step recorded before (a replayed dead letter): the
    /// attempt number is this plus the delivery count.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt_base: u32,
    /// The job's deadline, in Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
    /// Sent through the provider's batch API (subject
    /// `<prefix>.calls.<provider>.batch`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub batch: bool,
    /// What the provider's batch made of this call: the lane records it and
    /// goes on as after a real-time answer, without calling the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_result: Option<BatchResult>,
    /// The job's own `response_format` (else its category's applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<crate::structured::ResponseFormat>,
    /// The job's `expires_at`, in Unix milliseconds: a job with no call
    /// made by then ends `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    /// The job's priority: which of the lane's subjects the call waits on.
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
}

/// One batch item's result, carried to the provider's lane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchResult {
    /// Our batch id (`provider_batches.id`).
    pub batch_id: String,
    /// The attempt the item was recorded under.
    pub attempt: i32,
    pub outcome: BatchOutcome,
}

/// What became of a batch item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BatchOutcome {
    Answered {
        text: String,
        #[serde(default)]
        finish_reason: Option<String>,
        usage: crate::pricing::Usage,
    },
    Failed {
        error: String,
        retryable: bool,
        #[serde(default)]
        http_status: Option<u16>,
    },
    /// The batch expired before the item was answered.
    Expired,
    /// The batch was cancelled before the item was answered.
    Cancelled,
    /// The batch ended without a line for the item.
    Missing,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl CallMsg {
    /// The format of `payload` when it is newer than this build reads: the
    /// message must not be read as this build's (a field it does not know
    /// could change its meaning). Anything unreadable is left to the full
    /// parse, which says why.
    pub fn newer_format(payload: &[u8]) -> Option<u32> {
        #[derive(Deserialize)]
        struct Head {
            #[serde(default = "call_format_1")]
            format: u32,
        }
        serde_json::from_slice::<Head>(payload)
            .ok()
            .map(|h| h.format)
            .filter(|f| *f > CALL_FORMAT)
    }

    /// Why this message cannot be worked on, if it cannot. A call message
    /// comes from outside the process (anyone may publish on the calls
    /// subject), so the lane checks it before spending money on it.
    pub fn validate(&self) -> Result<(), String> {
        if self.job_id.is_empty() {
            return Err("a call message with an empty job id".into());
        }
        self.plan.validate()?;
        if !self.plan.has_step(self.step) {
            return Err(format!(
                "step {} is not a step of its {} plan",
                self.step,
                self.plan.kind()
            ));
        }
        Ok(())
    }

    /// The answer format this call asks for: the job's (or its category's)
    /// on the steps whose answer may become the job's.
    pub fn response_format<'a>(
        &'a self,
        cfg: &'a crate::config::Config,
    ) -> Option<&'a crate::structured::ResponseFormat> {
        if !self.plan.answers_job(self.step) {
            return None;
        }
        cfg.response_format(&self.category, self.response_format.as_ref())
    }

    /// What to ask the provider for this call.
    pub fn request(&self, cfg: &crate::config::Config) -> crate::providers::CallRequest {
        crate::providers::CallRequest {
            model: self.model.clone(),
            messages: self.messages.clone(),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            tag: None,
            response_format: self.response_format(cfg).cloned(),
            structured: cfg
                .models
                .get(&self.model)
                .map(|m| m.structured_output)
                .unwrap_or_default(),
        }
    }

    /// `Nats-Msg-Id` of a call: unique per job and step (and replay, and
    /// batch result).
    pub fn msg_id(&self) -> String {
        if let Some(r) = &self.batch_result {
            return format!("{}#{}#b{}", self.job_id, self.step, r.attempt);
        }
        if self.attempt_base > 0 {
            format!("{}#{}#r{}", self.job_id, self.step, self.attempt_base)
        } else {
            format!("{}#{}", self.job_id, self.step)
        }
    }
}

/// Event published (core NATS) on `<prefix>.review.<category>` when a job
/// needs a person.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReviewEvent {
    pub job_id: String,
    pub category: String,
    pub reason: String,
}

/// Event published (core NATS) on `<prefix>.done.<category>` when a job ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DoneEvent {
    pub job_id: String,
    pub category: String,
    pub status: crate::store::JobStatus,
}

impl Bus {
    /// Connect to `url` (one URL or several separated by commas) with the
    /// TLS settings and credentials of the environment (`NATS_CA_FILE`,
    /// `NATS_CREDS_FILE`, …; see [`connect::NatsSecurity::load`]) and any in
    /// the URL.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        let sec = connect::NatsSecurity::from_process_env(&crate::config::NatsConfig::default())?;
        Self::connect_with(url, prefix, &sec).await
    }

    /// [`Bus::connect`] honouring the config's `nats.tls_*` and
    /// `nats.creds_file` keys too (the environment wins), on its prefix.
    pub async fn connect_configured(url: &str, nats: &crate::config::NatsConfig) -> Result<Self> {
        let sec = connect::NatsSecurity::from_process_env(nats)?;
        Self::connect_with(url, &nats.prefix, &sec).await
    }

    /// Connect with explicit security settings.
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        sec: &connect::NatsSecurity,
    ) -> Result<Self> {
        let client = connect::connect(url, sec).await?;
        let js = jetstream::new(client.clone());
        Ok(Self {
            client,
            js,
            names: Names::new(prefix),
        })
    }

    /// The connected server's version (major, minor), if it says.
    pub fn server_version(&self) -> Option<(u32, u32)> {
        parse_version(&self.client.server_info().version)
    }

    /// Create (or reuse) the jobs and calls streams: WorkQueue retention, file
    /// storage, de-duplication by `Nats-Msg-Id`, `nats.replicas` copies (an
    /// existing stream with another count is updated to it).
    pub async fn ensure_streams(&self, cfg: &Config) -> Result<()> {
        let dup = Duration::from_secs(cfg.nats.duplicate_window_secs);
        let replicas = cfg.nats.replicas;
        for (name, subject) in [
            (self.names.jobs_stream(), self.names.jobs_wildcard()),
            (self.names.calls_stream(), self.names.calls_wildcard()),
        ] {
            let stream = self
                .js
                .get_or_create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![subject],
                    retention: stream::RetentionPolicy::WorkQueue,
                    storage: stream::StorageType::File,
                    duplicate_window: dup,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    anyhow::anyhow!("creating stream {name}: {}", replicas_hint(e, replicas))
                })?;
            let config = stream.cached_info().config.clone();
            ensure_replicas(&self.js, config, replicas).await?;
        }
        Ok(())
    }

    /// A durable pull consumer with explicit acks on `stream`, filtered to `filter`.
    pub async fn pull_consumer(
        &self,
        stream_name: &str,
        durable: &str,
        filter: &str,
        ack_wait: Duration,
        max_deliver: i64,
        max_ack_pending: i64,
    ) -> Result<consumer::PullConsumer> {
        let stream = self
            .js
            .get_stream(stream_name)
            .await
            .map_err(|e| anyhow::anyhow!("getting stream {stream_name}: {e}"))?;
        let config = consumer::pull::Config {
            durable_name: Some(durable.to_string()),
            filter_subject: filter.to_string(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_deliver,
            max_ack_pending,
            ..Default::default()
        };
        // Create, or update an existing consumer to the current settings.
        let consumer = match stream.create_consumer(config.clone()).await {
            Ok(c) => c,
            Err(_) => stream
                .get_consumer(durable)
                .await
                .map_err(|e| anyhow::anyhow!("getting consumer {durable} on {stream_name}: {e}"))?,
        };
        Ok(consumer)
    }

    /// Publish with `Nats-Msg-Id` and wait for JetStream's ack.
    /// Returns false when JetStream reports the message as a duplicate.
    ///
    /// While a cluster elects a new stream leader (a node died) or the
    /// client reconnects to another node, a publication meets "no
    /// responders" or no ack in time: it is sent again with the same id
    /// (JetStream drops a second copy) for up to [`PUBLISH_RETRY_FOR`].
    pub async fn publish_durable(
        &self,
        subject: String,
        msg_id: &str,
        payload: Bytes,
    ) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + PUBLISH_RETRY_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            let sent = self
                .js
                .send_publish(
                    subject.clone(),
                    jetstream::message::PublishMessage::build()
                        .payload(payload.clone())
                        .message_id(msg_id),
                )
                .await;
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) => return Ok(!ack.duplicate),
                Err(e) if transient(&e) && tokio::time::Instant::now() + pause < deadline => {
                    tracing::debug!(%subject, msg_id, error = %e, "publication not acknowledged; sending it again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "no acknowledgement from JetStream for message {msg_id} on {subject}: it may or \
                         may not be stored; publishing it again with the same id is safe (duplicates \
                         are dropped)"
                    )))
                }
            }
        }
    }

    /// Best-effort core-NATS event; losing one never loses a job.
    /// Max-deliveries advisories of every stream, shared by this prefix's
    /// workers (a queue group: each advisory reaches one of them).
    pub async fn max_delivery_advisories(&self) -> Result<async_nats::Subscriber> {
        self.client
            .queue_subscribe(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.*.*",
                format!("{}-advisories", self.names.prefix),
            )
            .await
            .map_err(|e| anyhow::anyhow!("subscribing to max-deliveries advisories: {e}"))
    }

    pub async fn publish_done(&self, ev: &DoneEvent) {
        if let Ok(body) = serde_json::to_vec(ev) {
            let _ = self
                .client
                .publish(self.names.done_subject(&ev.category), body.into())
                .await;
        }
    }

    /// Send what is buffered (a short-lived command's events) before exiting.
    pub async fn flush(&self) {
        let _ = self.client.flush().await;
    }

    /// Best-effort core-NATS event for the review queue.
    pub async fn publish_review(&self, ev: &ReviewEvent) {
        if let Ok(body) = serde_json::to_vec(ev) {
            let _ = self
                .client
                .publish(self.names.review_subject(&ev.category), body.into())
                .await;
        }
    }

    /// Messages waiting or in flight: jobs per category (messages still in
    /// the jobs stream, by subject) and calls per provider lane (the lane
    /// consumer's pending plus unacknowledged messages).
    pub async fn queue_depths(&self, providers: &[String]) -> Result<QueueDepths> {
        let mut d = QueueDepths::default();
        // One STREAM.INFO request with a subjects filter (the client's
        // paging iterator waits for pages a small stream never sends).
        #[derive(Deserialize)]
        struct State {
            #[serde(default)]
            subjects: Option<std::collections::HashMap<String, u64>>,
        }
        #[derive(Deserialize)]
        struct Info {
            state: State,
        }
        let info: jetstream::response::Response<Info> = self
            .js
            .request(
                format!("STREAM.INFO.{}", self.names.jobs_stream()),
                &serde_json::json!({ "subjects_filter": self.names.jobs_wildcard() }),
            )
            .await
            .context("reading the jobs stream's subjects")?;
        match info {
            jetstream::response::Response::Ok(i) => {
                for (subject, n) in i.state.subjects.unwrap_or_default() {
                    d.jobs
                        .insert(self.names.category_of(&subject).to_string(), n);
                }
            }
            jetstream::response::Response::Err { error } => {
                anyhow::bail!("reading the jobs stream's subjects: {error}")
            }
        }
        let calls = self.js.get_stream(self.names.calls_stream()).await?;
        for p in providers {
            let mut n = 0;
            for prio in Priority::ALL {
                n += match calls
                    .consumer_info(self.names.lane_consumer_at(p, prio))
                    .await
                {
                    Ok(i) => i.num_pending + i.num_ack_pending as u64,
                    Err(_) => 0, // no worker has run this lane yet
                };
            }
            d.lanes.insert(p.clone(), n);
        }
        Ok(d)
    }

    /// Delete both streams of this prefix (tests and bench clean-up).
    pub async fn delete_streams(&self) {
        let _ = self.js.delete_stream(self.names.jobs_stream()).await;
        let _ = self.js.delete_stream(self.names.calls_stream()).await;
        let kv = format!(
            "KV_{}_LIMITS",
            self.names.prefix.to_ascii_uppercase().replace('-', "_")
        );
        let _ = self.js.delete_stream(kv).await;
    }
}

/// How long [`Bus::publish_durable`] keeps sending a publication that is
/// not acknowledged: a cluster elects a new stream leader within a few
/// seconds of losing one.
pub const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(15);

/// Whether a publication failed in a way a retry with the same id may mend:
/// no ack in time, the connection lost, nobody answering (a stream without
/// a leader for a moment, or mid-reconnect), JetStream unavailable (503), or
/// a clustered stream still replicating another copy of the same id
/// (10158, "duplicate message id is in process": the retry is then
/// answered as a duplicate).
fn transient(e: &jetstream::context::PublishError) -> bool {
    use jetstream::context::PublishErrorKind as K;
    matches!(
        e.kind(),
        K::TimedOut | K::BrokenPipe | K::StreamNotFound | K::MaxAckPending
    ) || (matches!(e.kind(), K::Other) && {
        let s = e.to_string();
        s.contains("503")
            || s.contains("10158")
            || s.contains("not currently available")
            || s.contains("no responders")
    })
}

/// `major.minor` of a server version such as `2.15.1` or `2.9.10`.
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.split('-').next()?.parse().ok()?;
    Some((major, minor))
}

/// A stream config error, with what `nats.replicas` needs when it says so.
fn replicas_hint(e: impl std::fmt::Display, replicas: usize) -> String {
    let s = e.to_string();
    if replicas > 1 && (s.contains("replicas") || s.contains("peers") || s.contains("clustered")) {
        format!(
            "{s} (nats.replicas = {replicas} needs a NATS cluster of at least {replicas} \
             JetStream servers; use 1 with a single server)"
        )
    } else {
        s
    }
}

/// Give the existing stream of `config` `replicas` copies, if it has
/// another count: JetStream moves a stream between 1 and 3 replicas in
/// place, keeping its messages and consumers.
pub async fn ensure_replicas(
    js: &jetstream::Context,
    mut config: stream::Config,
    replicas: usize,
) -> Result<()> {
    if config.num_replicas.max(1) == replicas {
        return Ok(());
    }
    let name = config.name.clone();
    let from = config.num_replicas.max(1);
    config.num_replicas = replicas;
    js.update_stream(config).await.map_err(|e| {
        anyhow::anyhow!(
            "stream {name} has {from} replicas; changing it to {replicas} (nats.replicas): {}",
            replicas_hint(e, replicas)
        )
    })?;
    tracing::info!(stream = %name, from, to = replicas, "stream replicas changed (nats.replicas)");
    Ok(())
}

/// See [`Bus::queue_depths`].
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct QueueDepths {
    pub jobs: std::collections::BTreeMap<String, u64>,
    pub lanes: std::collections::BTreeMap<String, u64>,
}

/// Unix milliseconds of a JetStream message's publish time.
pub fn published_ms(info: &jetstream::message::Info<'_>) -> i64 {
    (info.published.unix_timestamp_nanos() / 1_000_000) as i64
}
