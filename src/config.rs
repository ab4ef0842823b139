//! Configuration: `config/switchyard.toml` plus `SWITCHYARD_*` environment
//! overrides, deserialised with `deny_unknown_fields` and then validated into
//! the runtime [`Config`]. Every error names the offending key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize};

/// Default location of the config file, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/switchyard.toml";

/// `config/switchyard.toml` as shipped, built into the binary: used when no
/// config path is given and there is no file at [`DEFAULT_CONFIG_PATH`].
pub const SHIPPED_CONFIG: &str = include_str!("../config/switchyard.toml");
/// Default database URL (the interface contract).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/switchyard";
/// Default NATS URL (the interface contract).
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Environment variables with this prefix override config keys.
pub const ENV_PREFIX: &str = "SWITCHYARD_";

/// A configuration error; the message always names the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
#[error("config error: {0}")]
pub struct ConfigError(pub String);

/// An error about config key `key`.
pub fn err(key: impl fmt::Display, msg: impl fmt::Display) -> ConfigError {
    ConfigError(format!("`{key}`: {msg}"))
}

/// The whole configuration, validated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// NATS subjects, streams and delivery settings.
    #[serde(default)]
    pub nats: NatsConfig,
    /// Postgres pool settings.
    #[serde(default)]
    pub database: DatabaseConfig,
    /// Input limits enforced by the dispatcher.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The batched Postgres writer.
    #[serde(default)]
    pub writer: WriterConfig,
    /// The dispatcher (jobs stream consumer).
    #[serde(default)]
    pub dispatcher: DispatcherConfig,
    /// Retries of provider calls.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Providers by name; each gets one worker lane.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Models by name (the name sent to the provider), with prices.
    pub models: BTreeMap<String, ModelConfig>,
    /// Task categories by name.
    pub categories: BTreeMap<String, CategoryConfig>,
    /// How jobs published with category `auto` find their category.
    #[serde(default)]
    pub classifier: Option<ClassifierConfig>,
    /// `switchyard report` settings.
    #[serde(default)]
    pub report: ReportConfig,
    /// The worker's metrics and dashboard endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// How a lane orders `high`, `normal` and `low` priority calls.
    #[serde(default)]
    pub priority: PriorityConfig,
    /// The OpenAI Batch-compatible front door (`/v1/files`, `/v1/batches`).
    #[serde(default)]
    pub openai_batch: OpenAiBatchConfig,
    /// Completion webhooks: who may be called back, how they are signed
    /// and retried.
    #[serde(default)]
    pub webhooks: WebhooksConfig,
}

/// Job priorities (the envelope's `priority`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriorityConfig {
    /// The share of a lane's takes that go to its longest-waiting call
    /// whatever its priority, so `normal` and `low` work never starves
    /// behind `high` (0 < share <= 0.5; default 0.05: one take in 20).
    pub low_share: f64,
}

impl Default for PriorityConfig {
    fn default() -> Self {
        Self { low_share: 0.05 }
    }
}

/// The OpenAI Batch-compatible front door: which category serves the
/// jobs of a batch line, by the `model` its body names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiBatchConfig {
    /// `body.model` of an input line → the category its job runs in (a
    /// category of `categories`, or `auto` with a classifier). A line
    /// naming a model not listed goes to the batch's error file.
    #[serde(default)]
    pub models: BTreeMap<String, String>,
}

impl OpenAiBatchConfig {
    /// The batch metadata key that names one category for every line of a
    /// batch, instead of each line's model.
    pub const CATEGORY_KEY: &'static str = "switchyard_category";
}

/// Completion webhooks (`callback_url` in a job, or a category's default).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// The only hosts a callback may go to: `hooks.example.com` (that host
    /// on the scheme's default port) or `127.0.0.1:8080` (that host and
    /// port). Exact, case-insensitive host match: no wildcards, no
    /// subdomains. Empty (the default): no callbacks at all.
    pub allow_hosts: Vec<String>,
    /// The HMAC-SHA256 key of the `Switchyard-Signature` header. Required
    /// when `allow_hosts` is set; better given as
    /// `SWITCHYARD_WEBHOOKS__SECRET` than written in the file. Never logged
    /// or stored.
    pub secret: Option<SecretString>,
    /// Attempts per delivery before it is given up (the first included).
    pub max_attempts: u32,
    /// Wait before the second attempt, in milliseconds; doubled for each
    /// further one, up to `max_delay_ms`.
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
    /// Seconds an attempt may take (connect, send, answer) before it counts
    /// as failed.
    pub timeout_secs: u64,
    /// Deliveries in flight at once in one process (a slow receiver holds
    /// at most this many; the pipeline never waits for them).
    pub concurrency: usize,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            allow_hosts: Vec::new(),
            secret: None,
            max_attempts: 8,
            base_delay_ms: 1000,
            max_delay_ms: 600_000,
            timeout_secs: 10,
            concurrency: 16,
        }
    }
}

impl WebhooksConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// A secret (from the config or the environment): its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// The worker's HTTP endpoint: `/metrics`, `/` (dashboard), `/api/stats`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to listen on, e.g. `127.0.0.1:9187` (none: no endpoint). The
    /// endpoint is unauthenticated and serves spend figures: keep it on
    /// loopback (or behind an authenticating proxy).
    #[serde(default)]
    pub listen: Option<String>,
}

/// `switchyard report` settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// The single model savings are measured against: what the answered
    /// calls would have cost on it (a model of `models`).
    #[serde(default)]
    pub baseline_model: Option<String>,
}

/// The category a job published as `auto` is served as.
pub const AUTO_CATEGORY: &str = "auto";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Rules tried in order; the first match decides the category.
    #[serde(default)]
    pub rules: Vec<ClassifierRule>,
    /// A cheap model asked when no rule matches; it must answer
    /// `{"category": "...", "confidence": 0.0-1.0}`.
    #[serde(default)]
    pub model: Option<String>,
    /// Below this confidence the job goes to `default_category`.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// The safe category for unmatched or low-confidence jobs.
    pub default_category: String,
}

fn default_threshold() -> f64 {
    0.8
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierRule {
    /// The category a match selects.
    pub category: String,
    /// Matches when the input contains any of these words (case-insensitive).
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Matches when this regular expression finds a match in the input.
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Prefix of every subject (`<prefix>.jobs.<category>`) and stream (`<PREFIX>_JOBS`).
    pub prefix: String,
    /// Seconds a delivered message may stay unacknowledged before redelivery.
    pub ack_wait_secs: u64,
    /// JetStream duplicate window for `Nats-Msg-Id`, in seconds.
    pub duplicate_window_secs: u64,
    /// PEM file of the CA(s) that signed the NATS servers' certificates
    /// (instead of the system's roots); `NATS_CA_FILE` overrides it.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients
    /// (`NATS_CERT_FILE` overrides it); needs `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file` (`NATS_KEY_FILE` overrides it).
    pub tls_key_file: Option<PathBuf>,
    /// Use TLS even with `nats://` URLs (a `tls://` URL always does).
    pub tls_required: bool,
    /// A JWT credentials file (`.creds`, from `nsc`); `NATS_CREDS_FILE`
    /// overrides it. Passwords, tokens and seeds come from the environment
    /// only, never from config.
    pub creds_file: Option<PathBuf>,
    /// Copies JetStream keeps of the jobs and calls streams and of the
    /// limits KV bucket: 1 (a single server) or 3 (a cluster of at least
    /// three servers; the streams survive the loss of one).
    pub replicas: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            prefix: "switchyard".into(),
            ack_wait_secs: 120,
            duplicate_window_secs: 300,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            creds_file: None,
            replicas: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Connections in the pool of each process.
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest job payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Most `messages` one job may carry.
    pub max_messages: usize,
    /// Largest inline image (decoded), in bytes.
    pub max_image_bytes: usize,
    /// Most images one job may carry.
    pub max_images_per_job: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 256 * 1024,
            max_messages: 256,
            max_image_bytes: 5 << 20,
            max_images_per_job: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WriterConfig {
    /// Most messages committed in one transaction.
    pub batch_size: usize,
    /// How long a batch waits for more rows once it could be committed,
    /// in milliseconds (0: commit as soon as a commit slot is free).
    pub flush_interval_ms: u64,
    /// Transactions the writer commits at once; rows that arrive while
    /// they all run go into the next one (group commit).
    pub commits_in_flight: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            batch_size: 512,
            flush_interval_ms: 0,
            commits_in_flight: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatcherConfig {
    /// Jobs in flight in one dispatcher.
    pub concurrency: usize,
    /// Jobs whose first call this process makes itself, at once, without
    /// the calls stream, when the call's lane runs here and is free (see
    /// `pipeline::dispatcher::Direct`); 0: every call goes through the stream.
    pub direct_calls: usize,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            concurrency: 256,
            direct_calls: 256,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Provider attempts per call before the job fails.
    pub max_attempts: u32,
    /// Base backoff delay without a `retry-after`, in milliseconds.
    pub base_delay_ms: u64,
    /// Cap on the backoff delay, in milliseconds.
    pub max_delay_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay_ms: 500,
            max_delay_ms: 30_000,
        }
    }
}

/// Which adapter speaks to a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI chat completions.
    Openai,
    /// Any server speaking OpenAI chat completions (Ollama, vLLM, llama.cpp, gateways).
    OpenaiCompatible,
    /// Anthropic messages.
    Anthropic,
    /// Google Gemini generateContent.
    Gemini,
    /// Answers in-process with no I/O and no latency (benchmarks).
    Inproc,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The adapter.
    pub kind: ProviderKind,
    /// Base URL; the adapter appends the provider's path (`/v1/chat/completions`).
    #[serde(default)]
    pub base_url: String,
    /// Name of the environment variable holding the API key (never the key itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Requests per minute this process may send.
    pub rpm: u32,
    /// Tokens per minute (input estimate + reserved max_tokens) this process may send.
    pub tpm: u32,
    /// Input tokens per minute, for providers that limit input separately (Anthropic).
    #[serde(default)]
    pub input_tpm: Option<u32>,
    /// Output tokens per minute (reserved `max_tokens`), for providers that limit output separately.
    #[serde(default)]
    pub output_tpm: Option<u32>,
    /// Most requests in flight at once.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Request timeout in seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Hold `rpm`, `tpm` and `max_concurrency` across every worker process
    /// (NATS KV) instead of per process. Default: true, except `inproc`.
    #[serde(default)]
    pub fleet: Option<bool>,
    /// Whether the provider counts a request's `max_tokens` toward its
    /// token limits when it arrives (OpenAI, and the simulator) rather than
    /// the output really produced (Anthropic). Default: by `kind`.
    #[serde(default)]
    pub tpm_counts_max_tokens: Option<bool>,
    /// Largest response body read from the provider, in bytes; a longer one
    /// is a terminal `bad_response` error (a misbehaving OpenAI-compatible
    /// server cannot make a worker buffer without bound). Default 8 MiB.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// How long a worker holds a batch it submits or polls, in seconds: a
    /// dead worker's batches pass on to another after this long.
    #[serde(default = "default_batch_lease_secs")]
    pub batch_lease_secs: u64,
    /// Most requests this provider may hold in its batch queue at once
    /// (Anthropic's queued batch requests); further batches wait to be
    /// submitted until earlier ones end.
    #[serde(default)]
    pub batch_queue_requests: Option<u64>,
    /// Speak HTTP/2 to this provider: negotiated by ALPN over `https://`
    /// (HTTP/1.1 if the server does not offer it), with prior knowledge
    /// (h2c) over `http://`. Many calls share one connection instead of one
    /// connection per call in flight. Default false, as the providers'
    /// official SDKs.
    #[serde(default)]
    pub http2: bool,
    /// With `http2`: most calls in flight on one connection; a lane opens
    /// `max_concurrency / http2_streams_per_connection` connections (rounded
    /// up), so a server's stream limit does not cap the lane. Default 100.
    #[serde(default = "default_http2_streams_per_connection")]
    pub http2_streams_per_connection: usize,
}

const fn default_http2_streams_per_connection() -> usize {
    100
}

const fn default_max_response_bytes() -> usize {
    8 << 20
}

const fn default_batch_lease_secs() -> u64 {
    120
}

const fn default_max_concurrency() -> usize {
    32
}
const fn default_timeout_secs() -> u64 {
    60
}

impl ProviderConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// See `fleet`: true unless the provider is in-process.
    pub fn is_fleet(&self) -> bool {
        self.fleet.unwrap_or(self.kind != ProviderKind::Inproc)
    }

    /// With `http2`, how many HTTP/2 connections carry the lane's calls
    /// (see `http2_streams_per_connection`); None: HTTP/1.1.
    pub fn http2_connections(&self) -> Option<usize> {
        self.http2.then(|| {
            self.max_concurrency
                .div_ceil(self.http2_streams_per_connection.max(1))
                .max(1)
        })
    }

    /// See `tpm_counts_max_tokens`: true unless the provider is Anthropic.
    pub fn counts_max_tokens(&self) -> bool {
        self.tpm_counts_max_tokens
            .unwrap_or(self.kind != ProviderKind::Anthropic)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The provider (key of `[providers]`) that serves this model.
    pub provider: String,
    /// USD per 1M input tokens.
    #[serde(deserialize_with = "de_decimal")]
    pub input_per_mtok: Decimal,
    /// USD per 1M output tokens.
    #[serde(deserialize_with = "de_decimal")]
    pub output_per_mtok: Decimal,
    /// USD per 1M cached input tokens read (defaults to the input price).
    #[serde(default, deserialize_with = "de_opt_decimal")]
    pub cached_input_per_mtok: Option<Decimal>,
    /// USD per 1M input tokens written to a cache (defaults to the input price).
    #[serde(default, deserialize_with = "de_opt_decimal")]
    pub cache_write_input_per_mtok: Option<Decimal>,
    /// This model's own requests per minute, where the provider limits per
    /// model (held with the provider's, fleet-wide when the provider is).
    #[serde(default)]
    pub rpm: Option<u32>,
    /// This model's own tokens per minute.
    #[serde(default)]
    pub tpm: Option<u32>,
    /// This model's own input tokens per minute.
    #[serde(default)]
    pub input_tpm: Option<u32>,
    /// This model's own output tokens per minute.
    #[serde(default)]
    pub output_tpm: Option<u32>,
    /// Most prompt tokens this model may have enqueued in the provider's
    /// batches at once (OpenAI's per-model batch queue limit); further
    /// batches wait to be submitted until earlier ones end.
    #[serde(default)]
    pub batch_queue_tokens: Option<u64>,
    /// How the model is asked for structured output: `native` (the
    /// provider's own mechanism; default), `tool` (Anthropic: one forced
    /// tool whose input schema is the schema, for models without native
    /// support) or `none` (it cannot: categories that ask for JSON may not
    /// route to it).
    #[serde(default)]
    pub structured_output: StructuredMode,
}

/// How a model is asked for structured output.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StructuredMode {
    #[default]
    Native,
    Tool,
    None,
}

impl ModelConfig {
    pub fn prices(&self) -> crate::pricing::Prices {
        crate::pricing::Prices {
            input_per_mtok: self.input_per_mtok,
            output_per_mtok: self.output_per_mtok,
            cached_input_per_mtok: self.cached_input_per_mtok.unwrap_or(self.input_per_mtok),
            cache_write_per_mtok: self
                .cache_write_input_per_mtok
                .unwrap_or(self.input_per_mtok),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryConfig {
    /// How jobs of this category are served.
    pub route: RouteConfig,
    /// An A/B split: this share of the jobs (chosen by job id) takes another route.
    #[serde(default)]
    pub variant: Option<VariantConfig>,
    /// System prompt for every job of this category (a job's own `system` is appended).
    #[serde(default)]
    pub system: Option<String>,
    /// `max_tokens` when the job sets none.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Spending caps: what happens to new jobs once the category's calls
    /// cost this much today or this month (UTC).
    #[serde(default)]
    pub budget: Option<BudgetConfig>,
    /// How the category's calls are sent: `realtime`, `batch` (the
    /// providers' batch APIs, half price, within 24 h) or `auto` (batch when
    /// the job's deadline leaves `batch.min_slack`).
    #[serde(default)]
    pub delivery: Delivery,
    /// Batch settings (with `delivery` `batch` or `auto`).
    #[serde(default)]
    pub batch: BatchConfig,
    /// The answer every job of the category must give, unless the job sets
    /// its own: `{ type = "json_object" }` or `{ type = "json_schema",
    /// name = "…", schema = { … }, strict = true }`.
    #[serde(default)]
    pub response_format: Option<crate::structured::ResponseFormat>,
    /// Serve identical provider requests from the response cache: `{ ttl =
    /// "7d", scope = "category" | "global" }`.
    #[serde(default)]
    pub cache: Option<CacheConfig>,
    /// Where the category's jobs are called back when they end, unless a
    /// job names its own `callback_url` (its host on `webhooks.allow_hosts`).
    #[serde(default)]
    pub callback_url: Option<String>,
}

/// A category's response cache.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long an answer is served again (`7d`, `12h`).
    pub ttl: String,
    /// `category`: only this category's jobs share its entries; `global`:
    /// every category with `scope = "global"` does.
    #[serde(default)]
    pub scope: CacheScope,
    /// Longest a call waits for an identical one under way elsewhere
    /// before calling anyway (default: the provider's timeout).
    #[serde(default)]
    pub wait: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    #[default]
    Category,
    Global,
}

impl CacheConfig {
    /// `ttl` (checked when the config loads).
    pub fn ttl(&self) -> Duration {
        humantime::parse_duration(&self.ttl).unwrap_or(Duration::from_secs(86_400))
    }

    /// `wait`, if set (checked when the config loads).
    pub fn wait(&self) -> Option<Duration> {
        self.wait
            .as_deref()
            .and_then(|w| humantime::parse_duration(w).ok())
    }
}

/// How a category's calls are sent.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    #[default]
    Realtime,
    Batch,
    Auto,
}

/// A category's batch settings; durations as `90s`, `30m`, `26h`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// `auto` batches a job only when its deadline is at least this far away.
    pub min_slack: String,
    /// A batch is submitted this long after its first item arrived ...
    pub flush_after: String,
    /// ... or as soon as it holds this many items (capped by the provider's
    /// own limit).
    pub max_items: u32,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            min_slack: "26h".into(),
            flush_after: "60s".into(),
            max_items: 10_000,
        }
    }
}

impl BatchConfig {
    /// `min_slack` (checked when the config loads).
    pub fn min_slack(&self) -> Duration {
        humantime::parse_duration(&self.min_slack).unwrap_or(Duration::from_secs(26 * 3600))
    }

    /// `flush_after` (checked when the config loads).
    pub fn flush_after(&self) -> Duration {
        humantime::parse_duration(&self.flush_after).unwrap_or(Duration::from_secs(60))
    }
}

/// A category's spending caps (USD, as decimal strings or numbers).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    #[serde(default)]
    pub daily_usd: Option<Decimal>,
    #[serde(default)]
    pub monthly_usd: Option<Decimal>,
    /// `downgrade` (serve new jobs with `downgrade_to`) or `pause` (park
    /// them until the next period).
    pub on_exceed: BudgetAction,
    /// The cheaper model that serves the category while a cap is reached.
    #[serde(default)]
    pub downgrade_to: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BudgetAction {
    Downgrade,
    Pause,
}

const fn default_max_tokens() -> u32 {
    512
}

/// A route: how a category is served.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RouteConfig {
    /// One target model.
    Single { target: String },
    /// Targets in order (cheapest first); move on when one fails, would wait
    /// longer than `max_wait_secs`, or its answer fails `check`; after the
    /// last, human review.
    Fallback {
        targets: Vec<String>,
        #[serde(default)]
        max_wait_secs: Option<u64>,
        #[serde(default)]
        check: Option<CheckConfig>,
    },
    /// Named stages in order, each a call with its own prompt template
    /// (`{{input}}`, `{{previous}}`, `{{stages.NAME}}`).
    Pipeline { stages: Vec<StageConfig> },
    /// The same input to every target in parallel; the answer at least
    /// `min_agree` of them give (normalised) wins, else the `judge` model
    /// decides, else human review.
    Consensus {
        targets: Vec<String>,
        #[serde(default)]
        min_agree: Option<usize>,
        #[serde(default)]
        judge: Option<String>,
    },
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    pub target: String,
    /// Prompt template; default `{{previous}}` (the first stage: `{{input}}`).
    #[serde(default)]
    pub prompt: Option<String>,
}

/// A check an answer must pass, else the fallback moves on.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CheckConfig {
    /// The answer must be JSON valid against this JSON Schema (any draft the
    /// `jsonschema` crate knows; no remote `$ref`).
    JsonSchema { schema: toml::Value },
    /// The answer must report `"confidence"` (JSON) or `confidence: X` of at least `min`.
    Confidence { min: f64 },
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VariantConfig {
    /// Name recorded in the decision log and the report (default `b`).
    #[serde(default = "default_variant_name")]
    pub name: String,
    /// Share of jobs, 0-100, that take the variant route.
    pub percent: u8,
    pub route: RouteConfig,
}

fn default_variant_name() -> String {
    "b".into()
}

impl RouteConfig {
    /// The models whose answer may become the job's answer (and so are
    /// asked for the category's `response_format`): every target but a
    /// pipeline's earlier stages and a consensus judge.
    pub fn answer_models(&self) -> Vec<&str> {
        match self {
            RouteConfig::Single { target } => vec![target.as_str()],
            RouteConfig::Fallback { targets, .. } | RouteConfig::Consensus { targets, .. } => {
                targets.iter().map(String::as_str).collect()
            }
            RouteConfig::Pipeline { stages } => stages
                .last()
                .map(|s| s.target.as_str())
                .into_iter()
                .collect(),
        }
    }

    /// Every model the route may call.
    pub fn models(&self) -> Vec<&str> {
        match self {
            RouteConfig::Single { target } => vec![target],
            RouteConfig::Fallback { targets, .. } => targets.iter().map(String::as_str).collect(),
            RouteConfig::Pipeline { stages } => stages.iter().map(|s| s.target.as_str()).collect(),
            RouteConfig::Consensus { targets, judge, .. } => targets
                .iter()
                .map(String::as_str)
                .chain(judge.as_deref())
                .collect(),
        }
    }
}

fn decimal_from_value<E: serde::de::Error>(v: toml::Value) -> Result<Decimal, E> {
    let s = match v {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        // A float's shortest representation is what the user typed (0.15 -> "0.15").
        toml::Value::Float(f) => f.to_string(),
        other => {
            return Err(E::custom(format!(
                "expected a decimal price, got a {}",
                other.type_str()
            )))
        }
    };
    let d = Decimal::from_str(s.trim())
        .map_err(|e| E::custom(format!("invalid decimal `{s}`: {e}")))?;
    if d.is_sign_negative() {
        return Err(E::custom(format!("price must not be negative, got {d}")));
    }
    Ok(d)
}

fn de_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    decimal_from_value(toml::Value::deserialize(d)?)
}

fn de_opt_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    Option::<toml::Value>::deserialize(d)?
        .map(decimal_from_value)
        .transpose()
}

impl Config {
    /// Why `model` cannot answer in format `rf`, if it cannot (an unknown
    /// model is the router's business, not this).
    pub fn structured_unsupported(
        &self,
        rf: &crate::structured::ResponseFormat,
        model: &str,
    ) -> Option<String> {
        let m = self.models.get(model)?;
        let kind = self.providers.get(&m.provider)?.kind;
        rf.unsupported(kind, m.structured_output)
    }

    /// The response cache of `category`, if it caches, and the scope its
    /// keys carry (the category, or nothing for the global scope).
    pub fn cache_of<'a>(&'a self, category: &'a str) -> Option<(&'a CacheConfig, &'a str)> {
        let cc = self.categories.get(category)?.cache.as_ref()?;
        let scope = match cc.scope {
            CacheScope::Category => category,
            CacheScope::Global => "",
        };
        Some((cc, scope))
    }

    /// Whether a job may name `category`: a configured one, or `auto`
    /// when a classifier is configured.
    pub fn accepts_category(&self, category: &str) -> bool {
        self.categories.contains_key(category)
            || (category == AUTO_CATEGORY && self.classifier.is_some())
    }

    /// Why a job of `category` asking for `rf` cannot be answered, if it
    /// cannot: a model of the category's routes (variant included) whose
    /// answer may become the job's cannot honour the format.
    pub fn format_unanswerable(
        &self,
        category: &str,
        rf: &crate::structured::ResponseFormat,
    ) -> Option<String> {
        let cat = self.categories.get(category)?;
        let mut routes = vec![&cat.route];
        routes.extend(cat.variant.as_ref().map(|v| &v.route));
        routes
            .into_iter()
            .flat_map(RouteConfig::answer_models)
            .find_map(|m| {
                self.structured_unsupported(rf, m)
                    .map(|why| format!("model `{m}` of category `{category}`: {why}"))
            })
    }

    /// The callback URL of a job of `category` that set `own` (or none):
    /// its own, else the category's default.
    pub fn callback_url(&self, category: &str, own: Option<&str>) -> Option<String> {
        own.map(str::to_string).or_else(|| {
            self.categories
                .get(category)
                .and_then(|c| c.callback_url.clone())
        })
    }

    /// The answer format of a job of `category` that set `own` (or none).
    pub fn response_format<'a>(
        &'a self,
        category: &str,
        own: Option<&'a crate::structured::ResponseFormat>,
    ) -> Option<&'a crate::structured::ResponseFormat> {
        own.or_else(|| {
            self.categories
                .get(category)
                .and_then(|c| c.response_format.as_ref())
        })
    }

    /// Load `path` (or `$SWITCHYARD_CONFIG`, or the default path) and apply the
    /// process environment's overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let explicit = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("SWITCHYARD_CONFIG").map(Into::into));
        let path = match explicit {
            Some(p) => p,
            None if !Path::new(DEFAULT_CONFIG_PATH).exists() => {
                // Run from anywhere: no config here means the shipped one.
                tracing::info!(
                    "no {DEFAULT_CONFIG_PATH} in this directory; using the shipped config built into the binary"
                );
                return Self::from_toml_with_env(SHIPPED_CONFIG, &env)
                    .map_err(|e| ConfigError(format!("the shipped config: {}", e.0)));
            }
            None => DEFAULT_CONFIG_PATH.into(),
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml_with_env(&text, &env)
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Parse TOML text, apply `SWITCHYARD_*` overrides from `env`, validate.
    pub fn from_toml_with_env(text: &str, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError(format!("invalid TOML: {e}")))?;
        apply_env_overrides(&mut value, env)?;
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." {
                    ConfigError(inner.to_string())
                } else {
                    err(path, inner)
                }
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse TOML text without environment overrides.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with_env(text, &[])
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.nats.prefix;
        if p.is_empty()
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(err(
                "nats.prefix",
                format!("`{p}` must be non-empty ASCII letters, digits, `-` or `_`"),
            ));
        }
        if !(self.priority.low_share > 0.0 && self.priority.low_share <= 0.5) {
            return Err(err(
                "priority.low_share",
                "must be more than 0 and at most 0.5",
            ));
        }
        if !matches!(self.nats.replicas, 1 | 3) {
            return Err(err(
                "nats.replicas",
                format!(
                    "`{}` must be 1 (one server) or 3 (a cluster of three or more)",
                    self.nats.replicas
                ),
            ));
        }
        if self.nats.ack_wait_secs == 0 {
            return Err(err("nats.ack_wait_secs", "must be at least 1"));
        }
        if self.writer.batch_size == 0 {
            return Err(err("writer.batch_size", "must be at least 1"));
        }
        if !(1..=16).contains(&self.writer.commits_in_flight) {
            return Err(err("writer.commits_in_flight", "must be between 1 and 16"));
        }
        if self.dispatcher.concurrency == 0 {
            return Err(err("dispatcher.concurrency", "must be at least 1"));
        }
        if self.retry.max_attempts == 0 {
            return Err(err("retry.max_attempts", "must be at least 1"));
        }
        if self.database.max_connections < 2 {
            return Err(err("database.max_connections", "must be at least 2"));
        }
        if self.limits.max_payload_bytes == 0 {
            return Err(err("limits.max_payload_bytes", "must be at least 1"));
        }
        if self.limits.max_messages == 0 {
            return Err(err("limits.max_messages", "must be at least 1"));
        }
        if self.providers.is_empty() {
            return Err(err("providers", "at least one provider is required"));
        }
        for (name, prov) in &self.providers {
            check_token(&format!("providers.{name}"), name)?;
            if prov.kind != ProviderKind::Inproc
                && !(prov.base_url.starts_with("http://") || prov.base_url.starts_with("https://"))
            {
                return Err(err(
                    format!("providers.{name}.base_url"),
                    format!("`{}` must start with http:// or https://", prov.base_url),
                ));
            }
            if prov.rpm == 0 {
                return Err(err(format!("providers.{name}.rpm"), "must be at least 1"));
            }
            if prov.tpm == 0 {
                return Err(err(format!("providers.{name}.tpm"), "must be at least 1"));
            }
            for (key, v) in [
                ("input_tpm", prov.input_tpm),
                ("output_tpm", prov.output_tpm),
            ] {
                if v == Some(0) {
                    return Err(err(format!("providers.{name}.{key}"), "must be at least 1"));
                }
            }
            if prov.max_concurrency == 0 {
                return Err(err(
                    format!("providers.{name}.max_concurrency"),
                    "must be at least 1",
                ));
            }
            if prov.http2_streams_per_connection == 0 {
                return Err(err(
                    format!("providers.{name}.http2_streams_per_connection"),
                    "must be at least 1",
                ));
            }
            if prov.batch_lease_secs == 0 {
                return Err(err(
                    format!("providers.{name}.batch_lease_secs"),
                    "must be at least 1",
                ));
            }
            if prov.batch_queue_requests == Some(0) {
                return Err(err(
                    format!("providers.{name}.batch_queue_requests"),
                    "must be at least 1",
                ));
            }
            if prov.timeout_secs == 0 {
                return Err(err(
                    format!("providers.{name}.timeout_secs"),
                    "must be at least 1",
                ));
            }
        }
        for (name, model) in &self.models {
            for (key, v) in [
                ("rpm", model.rpm),
                ("tpm", model.tpm),
                ("input_tpm", model.input_tpm),
                ("output_tpm", model.output_tpm),
            ] {
                if v == Some(0) {
                    return Err(err(format!("models.{name}.{key}"), "must be at least 1"));
                }
            }
            if model.batch_queue_tokens == Some(0) {
                return Err(err(
                    format!("models.{name}.batch_queue_tokens"),
                    "must be at least 1",
                ));
            }
            if !self.providers.contains_key(&model.provider) {
                return Err(err(
                    format!("models.{name}.provider"),
                    format!("unknown provider `{}`", model.provider),
                ));
            }
        }
        if self.categories.is_empty() {
            return Err(err("categories", "at least one category is required"));
        }
        for (name, cat) in &self.categories {
            check_token(&format!("categories.{name}"), name)?;
            let mut routes = vec![(format!("categories.{name}.route"), &cat.route)];
            if let Some(v) = &cat.variant {
                if v.percent > 100 {
                    return Err(err(
                        format!("categories.{name}.variant.percent"),
                        "must be 0 to 100",
                    ));
                }
                routes.push((format!("categories.{name}.variant.route"), &v.route));
            }
            for (key, route) in routes {
                self.validate_route(&key, route)?;
            }
            if cat.max_tokens == 0 {
                return Err(err(
                    format!("categories.{name}.max_tokens"),
                    "must be at least 1",
                ));
            }
            for model in cat.route.models() {
                let prov = &self.providers[&self.models[model].provider];
                if prov.tpm < cat.max_tokens {
                    return Err(err(
                        format!("providers.{}.tpm", self.models[model].provider),
                        format!(
                            "{} is below categories.{name}.max_tokens ({}): no call could ever be sent",
                            prov.tpm, cat.max_tokens
                        ),
                    ));
                }
            }
        }
        for (name, cat) in &self.categories {
            let Some(rf) = &cat.response_format else {
                continue;
            };
            let key = format!("categories.{name}.response_format");
            rf.validate().map_err(|e| err(&key, e))?;
            let mut routes = vec![&cat.route];
            routes.extend(cat.variant.as_ref().map(|v| &v.route));
            for model in routes.into_iter().flat_map(RouteConfig::answer_models) {
                if let Some(why) = self.structured_unsupported(rf, model) {
                    return Err(err(&key, format!("model `{model}`: {why}")));
                }
            }
        }
        for (name, model) in &self.models {
            if model.structured_output == StructuredMode::Tool
                && self.providers.get(&model.provider).map(|p| p.kind)
                    != Some(ProviderKind::Anthropic)
            {
                return Err(err(
                    format!("models.{name}.structured_output"),
                    "`tool` is for Anthropic models; use `native` or `none`",
                ));
            }
        }
        for (name, cat) in &self.categories {
            let Some(c) = &cat.cache else { continue };
            let key = format!("categories.{name}.cache");
            for (k, v) in [("ttl", Some(&c.ttl)), ("wait", c.wait.as_ref())] {
                let Some(v) = v else { continue };
                match humantime::parse_duration(v) {
                    Ok(d) if !d.is_zero() => {}
                    Ok(_) => return Err(err(format!("{key}.{k}"), "must be above zero")),
                    Err(e) => {
                        return Err(err(
                            format!("{key}.{k}"),
                            format!("`{v}` is not a duration (7d, 12h, 30s): {e}"),
                        ))
                    }
                }
            }
        }
        for (name, cat) in &self.categories {
            let key = format!("categories.{name}.batch");
            for (k, v) in [
                ("min_slack", &cat.batch.min_slack),
                ("flush_after", &cat.batch.flush_after),
            ] {
                humantime::parse_duration(v).map_err(|e| {
                    err(
                        format!("{key}.{k}"),
                        format!("`{v}` is not a duration (90s, 30m, 26h): {e}"),
                    )
                })?;
            }
            if cat.batch.max_items == 0 {
                return Err(err(format!("{key}.max_items"), "must be at least 1"));
            }
        }
        if self.categories.contains_key(AUTO_CATEGORY) {
            return Err(err(
                format!("categories.{AUTO_CATEGORY}"),
                "`auto` is reserved for jobs the classifier categorises",
            ));
        }
        for (name, cat) in &self.categories {
            let Some(b) = &cat.budget else { continue };
            let key = format!("categories.{name}.budget");
            if b.daily_usd.is_none() && b.monthly_usd.is_none() {
                return Err(err(&key, "set daily_usd, monthly_usd or both"));
            }
            for (k, v) in [("daily_usd", b.daily_usd), ("monthly_usd", b.monthly_usd)] {
                if v.is_some_and(|v| v <= Decimal::ZERO) {
                    return Err(err(format!("{key}.{k}"), "must be above 0"));
                }
            }
            match (b.on_exceed, &b.downgrade_to) {
                (BudgetAction::Downgrade, None) => {
                    return Err(err(
                        format!("{key}.downgrade_to"),
                        "required with on_exceed = \"downgrade\"",
                    ))
                }
                (BudgetAction::Downgrade, Some(m)) if !self.models.contains_key(m) => {
                    return Err(err(
                        format!("{key}.downgrade_to"),
                        format!("unknown model `{m}`"),
                    ))
                }
                (BudgetAction::Pause, Some(_)) => {
                    return Err(err(
                        format!("{key}.downgrade_to"),
                        "only with on_exceed = \"downgrade\"",
                    ))
                }
                _ => {}
            }
        }
        for (model, category) in &self.openai_batch.models {
            if !self.accepts_category(category) {
                return Err(err(
                    format!("openai_batch.models.{model}"),
                    format!("unknown category `{category}`"),
                ));
            }
        }
        self.validate_webhooks()?;
        if let Some(b) = &self.report.baseline_model {
            if !self.models.contains_key(b) {
                return Err(err(
                    "report.baseline_model",
                    format!("`{b}` is not one of `models`"),
                ));
            }
        }
        if let Some(c) = &self.classifier {
            if !self.categories.contains_key(&c.default_category) {
                return Err(err(
                    "classifier.default_category",
                    format!("unknown category `{}`", c.default_category),
                ));
            }
            if !(0.0..=1.0).contains(&c.threshold) {
                return Err(err("classifier.threshold", "must be within 0..=1"));
            }
            if let Some(m) = &c.model {
                if !self.models.contains_key(m) {
                    return Err(err("classifier.model", format!("unknown model `{m}`")));
                }
            }
            for (i, r) in c.rules.iter().enumerate() {
                if !self.categories.contains_key(&r.category) {
                    return Err(err(
                        format!("classifier.rules[{i}].category"),
                        format!("unknown category `{}`", r.category),
                    ));
                }
                if r.keywords.is_empty() && r.regex.is_none() {
                    return Err(err(
                        format!("classifier.rules[{i}]"),
                        "give `keywords` or `regex`",
                    ));
                }
                if let Some(re) = &r.regex {
                    regex::Regex::new(re)
                        .map_err(|e| err(format!("classifier.rules[{i}].regex"), e))?;
                }
            }
        }
        Ok(())
    }

    fn validate_webhooks(&self) -> Result<(), ConfigError> {
        let w = &self.webhooks;
        for (i, h) in w.allow_hosts.iter().enumerate() {
            crate::webhooks::parse_allowed(h)
                .map_err(|e| err(format!("webhooks.allow_hosts[{i}]"), e))?;
        }
        if !w.allow_hosts.is_empty() && w.secret.as_ref().is_none_or(|s| s.expose().is_empty()) {
            return Err(err(
                "webhooks.secret",
                "required when webhooks.allow_hosts is set (set SWITCHYARD_WEBHOOKS__SECRET)",
            ));
        }
        for (key, v) in [
            ("max_attempts", u64::from(w.max_attempts)),
            ("base_delay_ms", w.base_delay_ms),
            ("timeout_secs", w.timeout_secs),
            ("concurrency", w.concurrency as u64),
        ] {
            if v == 0 {
                return Err(err(format!("webhooks.{key}"), "must be at least 1"));
            }
        }
        if w.max_delay_ms < w.base_delay_ms {
            return Err(err(
                "webhooks.max_delay_ms",
                format!(
                    "must be at least webhooks.base_delay_ms ({})",
                    w.base_delay_ms
                ),
            ));
        }
        for (name, cat) in &self.categories {
            if let Some(u) = &cat.callback_url {
                crate::webhooks::check_url(u, &w.allow_hosts)
                    .map_err(|e| err(format!("categories.{name}.callback_url"), e))?;
            }
        }
        Ok(())
    }

    fn validate_route(&self, key: &str, route: &RouteConfig) -> Result<(), ConfigError> {
        let known = |k: String, m: &str| {
            if self.models.contains_key(m) {
                Ok(())
            } else {
                Err(err(k, format!("unknown model `{m}`")))
            }
        };
        match route {
            RouteConfig::Single { target } => known(format!("{key}.target"), target)?,
            RouteConfig::Fallback { targets, check, .. } => {
                if targets.is_empty() {
                    return Err(err(format!("{key}.targets"), "needs at least one model"));
                }
                for (i, t) in targets.iter().enumerate() {
                    known(format!("{key}.targets[{i}]"), t)?;
                }
                if let Some(CheckConfig::JsonSchema { schema }) = check {
                    if !schema.is_table() {
                        return Err(err(
                            format!("{key}.check.schema"),
                            "must be a table (a JSON Schema object)",
                        ));
                    }
                    let json = serde_json::to_value(schema).unwrap_or_default();
                    crate::structured::check_schema(&json)
                        .map_err(|e| err(format!("{key}.check.schema"), e))?;
                }
            }
            RouteConfig::Pipeline { stages } => {
                if stages.is_empty() {
                    return Err(err(format!("{key}.stages"), "needs at least one stage"));
                }
                let mut seen = std::collections::HashSet::new();
                for (i, st) in stages.iter().enumerate() {
                    known(format!("{key}.stages[{i}].target"), &st.target)?;
                    if !seen.insert(st.name.as_str()) {
                        return Err(err(
                            format!("{key}.stages[{i}].name"),
                            format!("duplicate stage `{}`", st.name),
                        ));
                    }
                    if let Some(p) = &st.prompt {
                        for r in crate::template::stage_refs(p) {
                            if !seen.contains(r.as_str()) || r == st.name {
                                return Err(err(
                                    format!("{key}.stages[{i}].prompt"),
                                    format!("`{{{{stages.{r}}}}}` names no earlier stage"),
                                ));
                            }
                        }
                    }
                }
            }
            RouteConfig::Consensus {
                targets,
                min_agree,
                judge,
            } => {
                if targets.len() < 2 {
                    return Err(err(format!("{key}.targets"), "needs at least two models"));
                }
                for (i, t) in targets.iter().enumerate() {
                    known(format!("{key}.targets[{i}]"), t)?;
                }
                if let Some(j) = judge {
                    known(format!("{key}.judge"), j)?;
                }
                if let Some(m) = min_agree {
                    if *m < 1 || *m > targets.len() {
                        return Err(err(
                            format!("{key}.min_agree"),
                            format!("must be 1 to {}", targets.len()),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every category a job may be published to: the configured ones and `auto`.
    pub fn subject_categories(&self) -> Vec<String> {
        self.categories
            .keys()
            .cloned()
            .chain(std::iter::once(AUTO_CATEGORY.to_string()))
            .collect()
    }

    /// The savings baseline: `report.baseline_model` (or `over`) with its prices.
    pub fn baseline<'a>(
        &'a self,
        over: Option<&'a str>,
    ) -> Result<Option<(&'a str, crate::pricing::Prices)>, ConfigError> {
        match over.or(self.report.baseline_model.as_deref()) {
            None => Ok(None),
            Some(m) => match self.models.get(m) {
                Some(mc) => Ok(Some((m, mc.prices()))),
                None => Err(err("--baseline", format!("`{m}` is not one of `models`"))),
            },
        }
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.nats.ack_wait_secs)
    }
}

/// Subject tokens (category and provider names) must be single NATS tokens.
fn check_token(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(err(
            key,
            "name must be ASCII letters, digits, `-` or `_` (it becomes a NATS subject token)",
        ));
    }
    Ok(())
}

/// Apply `SWITCHYARD_A__B__C=value` as `a.b.c = value`. The value is parsed
/// as a TOML value when it is one (numbers, booleans, inline tables), else
/// taken as a string. `SWITCHYARD_CONFIG` (the file), `SWITCHYARD_TOKEN`
/// and `SWITCHYARD_URL` (the HTTP client's) are not overrides.
const NOT_OVERRIDES: &[&str] = &["SWITCHYARD_CONFIG", "SWITCHYARD_TOKEN", "SWITCHYARD_URL"];

fn apply_env_overrides(
    root: &mut toml::Table,
    env: &[(String, String)],
) -> Result<(), ConfigError> {
    let mut vars: Vec<&(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !NOT_OVERRIDES.contains(&k.as_str()))
        .collect();
    vars.sort();
    for (key, raw) in vars {
        let path: Vec<String> = key[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(|s| s.is_empty()) {
            return Err(ConfigError(format!(
                "environment variable {key}: empty path segment"
            )));
        }
        // A secret is text as given: `0x1f…` or `12345` must not become a number.
        let value = if path.last().is_some_and(|s| s == "secret") {
            toml::Value::String(raw.clone())
        } else {
            parse_env_value(raw)
        };
        let dotted = path.join(".");
        let mut table = &mut *root;
        for seg in &path[..path.len() - 1] {
            let entry = table
                .entry(seg.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError(format!(
                        "environment variable {key}: `{seg}` in `{dotted}` is not a table"
                    )))
                }
            };
        }
        table.insert(path[path.len() - 1].clone(), value);
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    let probe = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&probe) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SHIPPED: &str = include_str!("../config/switchyard.toml");

    #[test]
    fn shipped_config_is_valid() {
        let cfg = Config::from_toml(SHIPPED).unwrap();
        assert_eq!(cfg.nats.prefix, "switchyard");
        assert!(cfg.categories.len() >= 3);
        let m = &cfg.models["gemini-2.5-flash-lite"];
        assert_eq!(
            m.prices().input_per_mtok,
            Decimal::from_str("0.10").unwrap()
        );
    }

    #[test]
    fn the_shipped_config_maps_every_model_for_openai_batches() {
        let cfg = Config::from_toml(SHIPPED).unwrap();
        for model in cfg.models.keys() {
            assert!(
                cfg.openai_batch.models.contains_key(model),
                "openai_batch.models lacks `{model}`"
            );
        }
    }

    #[test]
    fn an_openai_batch_mapping_to_an_unknown_category_is_named() {
        let text = format!(
            "{}\n[openai_batch]\nmodels = {{ \"gpt-4o\" = \"nowhere\" }}\n",
            SHIPPED.split("[openai_batch]").next().unwrap()
        );
        let e = Config::from_toml(&text).unwrap_err().0;
        assert!(
            e.contains("openai_batch.models.gpt-4o") && e.contains("nowhere"),
            "{e}"
        );
    }

    #[test]
    fn nats_replicas_is_one_or_three_and_a_bad_count_names_the_key() {
        assert_eq!(Config::from_toml(SHIPPED).unwrap().nats.replicas, 1);
        let three = vec![("SWITCHYARD_NATS__REPLICAS".to_string(), "3".to_string())];
        assert_eq!(
            Config::from_toml_with_env(SHIPPED, &three)
                .unwrap()
                .nats
                .replicas,
            3
        );
        for bad in ["0", "2", "5"] {
            let env = vec![("SWITCHYARD_NATS__REPLICAS".to_string(), bad.to_string())];
            let e = Config::from_toml_with_env(SHIPPED, &env).unwrap_err().0;
            assert!(e.contains("nats.replicas") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn env_overrides_apply_with_types() {
        let env = vec![
            ("SWITCHYARD_NATS__PREFIX".to_string(), "test1".to_string()),
            ("SWITCHYARD_PROVIDERS__OPENAI__RPM".into(), "42".into()),
            ("SWITCHYARD_CONFIG".into(), "ignored.toml".into()),
            ("SWITCHYARD_TOKEN".into(), "sy_client_token".into()),
            ("OTHER".into(), "x".into()),
        ];
        let cfg = Config::from_toml_with_env(SHIPPED, &env).unwrap();
        assert_eq!(cfg.nats.prefix, "test1");
        assert_eq!(cfg.providers["openai"].rpm, 42);
    }

    #[test]
    fn env_override_with_wrong_type_names_the_key() {
        let env = vec![(
            "SWITCHYARD_PROVIDERS__OPENAI__RPM".to_string(),
            "lots".to_string(),
        )];
        let e = Config::from_toml_with_env(SHIPPED, &env).unwrap_err().0;
        assert!(e.contains("providers.openai.rpm"), "{e}");
    }

    #[test]
    fn webhook_settings_are_checked_and_name_their_key() {
        let with = |pairs: &[(&str, &str)]| {
            let env: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::from_toml_with_env(SHIPPED, &env)
        };
        let hosts = (
            "SWITCHYARD_WEBHOOKS__ALLOW_HOSTS",
            r#"["hooks.example.com", "127.0.0.1:8080"]"#,
        );
        let secret = ("SWITCHYARD_WEBHOOKS__SECRET", "s3cret");
        let cfg = with(&[
            hosts,
            secret,
            (
                "SWITCHYARD_CATEGORIES__SUPPORT__CALLBACK_URL",
                "https://hooks.example.com/support",
            ),
        ])
        .unwrap();
        assert_eq!(cfg.webhooks.secret.as_ref().unwrap().expose(), "s3cret");
        // A secret that reads as a TOML number stays the text given.
        let numeric = with(&[hosts, ("SWITCHYARD_WEBHOOKS__SECRET", "0x1234")]).unwrap();
        assert_eq!(numeric.webhooks.secret.unwrap().expose(), "0x1234");
        assert!(
            !format!("{cfg:?}").contains("s3cret"),
            "Debug shows the secret"
        );
        assert_eq!(
            cfg.callback_url("support", None).as_deref(),
            Some("https://hooks.example.com/support")
        );
        assert_eq!(
            cfg.callback_url("support", Some("http://127.0.0.1:8080/x"))
                .as_deref(),
            Some("http://127.0.0.1:8080/x")
        );
        assert_eq!(cfg.callback_url("sales", None), None);
        for (pairs, key) in [
            (vec![hosts], "`webhooks.secret`"),
            (
                vec![
                    ("SWITCHYARD_WEBHOOKS__ALLOW_HOSTS", r#"["https://x.com"]"#),
                    secret,
                ],
                "`webhooks.allow_hosts[0]`",
            ),
            (
                vec![
                    hosts,
                    secret,
                    (
                        "SWITCHYARD_CATEGORIES__SALES__CALLBACK_URL",
                        "http://10.0.0.1/x",
                    ),
                ],
                "`categories.sales.callback_url`",
            ),
            (
                vec![("SWITCHYARD_WEBHOOKS__MAX_ATTEMPTS", "0")],
                "`webhooks.max_attempts`",
            ),
            (vec![("SWITCHYARD_WEBHOOKS__RETRIES", "3")], "webhooks"),
        ] {
            let e = with(&pairs).unwrap_err().0;
            assert!(e.contains(key), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let text = SHIPPED.replace("rpm = 5000", "rmp = 5000");
        let e = Config::from_toml(&text).unwrap_err().0;
        assert!(e.contains("providers.openai") && e.contains("rmp"), "{e}");
    }

    #[test]
    fn bad_reference_is_named() {
        let text = SHIPPED.replace("judge = \"gpt-4.1\"", "judge = \"gpt-9\"");
        let e = Config::from_toml(&text).unwrap_err().0;
        assert!(
            e.contains("categories.lookup.route.judge") && e.contains("gpt-9"),
            "{e}"
        );
    }

    #[test]
    fn bad_price_is_named() {
        let text = SHIPPED.replace("output_per_mtok = \"0.60\"", "output_per_mtok = \"cheap\"");
        let e = Config::from_toml(&text).unwrap_err().0;
        assert!(e.contains("models.gpt-4o-mini.output_per_mtok"), "{e}");
    }

    #[test]
    fn float_prices_stay_exact() {
        let text = SHIPPED.replace("input_per_mtok = \"0.15\"", "input_per_mtok = 0.15");
        let cfg = Config::from_toml(&text).unwrap();
        assert_eq!(
            cfg.models["gpt-4o-mini"].input_per_mtok,
            Decimal::from_str("0.15").unwrap()
        );
    }
}
