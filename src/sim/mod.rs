//! `switchyard sim`: a stand-in for the LLM providers on loopback. It serves
//! the providers' real paths on one address:
//!
//! - `POST /v1/chat/completions` (OpenAI),
//! - `POST /v1/messages` (Anthropic),
//! - `POST /v1beta/models/{model}:generateContent` and
//!   `/v1/models/{model}:generateContent` (Gemini),
//! - each provider's batch API (see the `batch` module),
//!
//! each with its own request, response and error formats and rate-limit
//! headers. Answers are deterministic text derived from the input, with usage
//! counted from the text. Clean by default; a [`SimProfile`] adds latency,
//! 500s, enforced RPM/TPM limits (429 with each provider's headers and error
//! body), cached/cache-write/reasoning token shares, per format. Tests can
//! also queue exact failures ([`Forced`]) per format. Every request answered
//! is kept in a ledger (`GET /ledger`), so tests can compare what the
//! providers were asked with what Switchyard recorded.

mod anthropic;
mod batch;
mod gemini;
mod openai;
mod schema;

pub use batch::{BatchFate, BatchTag, DEFAULT_BATCH_MS};

mod reconcile;
pub use reconcile::{reconcile, Reconciled};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::bucket::{Bucket, Shape};
use crate::envelope::{Message, Role};

/// The wire format a request arrived in (= which provider is simulated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Openai,
    Anthropic,
    Gemini,
}

/// Behaviour of the simulated providers. All zero = clean.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimProfile {
    /// Fixed latency added to every answer, in milliseconds.
    pub latency_ms: u64,
    /// Uniform random extra latency in `0..=jitter_ms`.
    pub jitter_ms: u64,
    /// Share of requests (0..1) answered with a server error (500).
    pub error_rate: f64,
    /// Requests per minute accepted per model (0 = unlimited); the bucket holds one second's worth.
    pub rpm: u32,
    /// Tokens per minute accepted per model (0 = unlimited), counting prompt + max_tokens.
    pub tpm: u32,
    /// Share (0..1) of prompt tokens reported as cached reads.
    pub cached_share: f64,
    /// Share (0..1) of prompt tokens reported as cache writes (Anthropic only).
    pub cache_write_share: f64,
    /// Reasoning/thinking tokens added to every answer's output.
    pub reasoning_tokens: u64,
    /// Send rate-limit headers (true, like OpenAI and Anthropic) or none (like
    /// many OpenAI-compatible servers, whose only signal is the 429 itself).
    pub rate_headers: bool,
    /// Share (0..1) of inputs every model answers identically (so consensus
    /// voters agree); the rest get model-specific answers.
    pub agreement: f64,
    /// Per model: share (0..1) of its requests answered with a terminal 400.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub model_errors: BTreeMap<String, f64>,
    /// Share (0..1) of structured answers that break their schema (a
    /// required property left out), for every model ...
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub invalid_json_rate: f64,
    /// ... or per model.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub model_invalid_json: BTreeMap<String, f64>,
    /// Fixed answers: the first entry whose `model` (if given) and `contains`
    /// (if given, searched in every message) match supplies the text.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<ScriptedAnswer>,
    /// Milliseconds from a batch's creation to its end (default 2000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_ms: Option<u64>,
    /// OpenAI: most prompt tokens one model may have in unfinished batches;
    /// a batch that would exceed it fails validation with
    /// `token_limit_exceeded`, as OpenAI's do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_queue_tokens: Option<u64>,
    /// Milliseconds a batch status request takes (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_poll_ms: Option<u64>,
    /// Anthropic: most requests in unfinished batches; a create that would
    /// exceed it gets a 429 `rate_limit_error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_queue_requests: Option<u64>,
    /// Per-format behaviour (`openai`, `anthropic`, `gemini`): a section
    /// replaces the top-level behaviour for that format.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub formats: BTreeMap<Format, SimProfile>,
}

impl Default for SimProfile {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            jitter_ms: 0,
            error_rate: 0.0,
            rpm: 0,
            tpm: 0,
            cached_share: 0.0,
            cache_write_share: 0.0,
            reasoning_tokens: 0,
            rate_headers: true,
            agreement: 0.0,
            model_errors: BTreeMap::new(),
            invalid_json_rate: 0.0,
            model_invalid_json: BTreeMap::new(),
            answers: Vec::new(),
            batch_ms: None,
            batch_queue_tokens: None,
            batch_queue_requests: None,
            batch_poll_ms: None,
            formats: BTreeMap::new(),
        }
    }
}

/// A fixed answer of the simulator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScriptedAnswer {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub contains: Option<String>,
    pub text: String,
}

impl SimProfile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading sim profile {}", path.display()))?;
        let p: SimProfile =
            toml::from_str(&text).with_context(|| format!("sim profile {}", path.display()))?;
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        for (key, v) in [
            ("error_rate", self.error_rate),
            ("cached_share", self.cached_share),
            ("cache_write_share", self.cache_write_share),
            ("agreement", self.agreement),
        ]
        .into_iter()
        .chain(self.model_errors.values().map(|v| ("model_errors", *v)))
        .chain(std::iter::once((
            "invalid_json_rate",
            self.invalid_json_rate,
        )))
        .chain(
            self.model_invalid_json
                .values()
                .map(|v| ("model_invalid_json", *v)),
        ) {
            anyhow::ensure!(
                (0.0..=1.0).contains(&v),
                "sim profile `{key}` must be within 0..=1"
            );
        }
        anyhow::ensure!(
            self.cached_share + self.cache_write_share <= 1.0,
            "sim profile: `cached_share` + `cache_write_share` must not exceed 1"
        );
        for (f, p) in &self.formats {
            anyhow::ensure!(
                p.formats.is_empty(),
                "sim profile: formats.{f:?} cannot nest formats"
            );
            p.validate()?;
        }
        Ok(())
    }

    /// The behaviour for one format.
    pub fn for_format(&self, f: Format) -> &SimProfile {
        self.formats.get(&f).unwrap_or(self)
    }

    /// The demo's default mix: some latency, 3% 500s, RPM limits that cause
    /// 429s, cached prompts, Anthropic cache writes, Gemini thinking; the
    /// cheap Claude model refuses 10% of requests (so support falls back),
    /// and 70% of lookups get the same answer from every model (so
    /// consensus agrees; the rest go to the judge).
    pub fn demo() -> Self {
        let mut base = Self {
            latency_ms: 20,
            jitter_ms: 40,
            error_rate: 0.03,
            rpm: 3000,
            cached_share: 0.25,
            agreement: 0.7,
            ..Self::default()
        };
        base.model_errors.insert("claude-haiku-4-5".into(), 0.1);
        let mut formats = BTreeMap::new();
        formats.insert(
            Format::Anthropic,
            Self {
                cache_write_share: 0.1,
                ..base.clone()
            },
        );
        formats.insert(
            Format::Gemini,
            Self {
                reasoning_tokens: 16,
                ..base.clone()
            },
        );
        Self { formats, ..base }
    }
}

/// One request the sim answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LedgerEntry {
    pub seq: u64,
    pub format: Format,
    pub model: String,
    pub status: u16,
    /// All input tokens, including cached reads and cache writes.
    pub prompt_tokens: u64,
    /// All output tokens, including reasoning.
    pub completion_tokens: u64,
    /// The request's `max_tokens` (TPM limits count prompt + max_tokens).
    #[serde(default)]
    pub max_tokens: u64,
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
    /// Milliseconds since the sim started, when the request arrived.
    pub at_ms: u64,
    /// Whether the request carried credentials (`Authorization`, `x-api-key`, `x-goog-api-key`).
    pub has_auth: bool,
    /// For 429s: the advertised wait, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// Requests being served when this one arrived, this one included.
    #[serde(default)]
    pub in_flight: u64,
    /// The request's `x-switchyard-call` header, decoded: the job, step and
    /// attempt it was for (see [`crate::ids::call_tag`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<CallTag>,
    /// For a batch item: its batch and `custom_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchTag>,
    /// Images the request carried, in its format's image parts.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub images: u32,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// Input tokens the simulator counts per image (each provider's rule lands
/// between 85 and about 1,600; see [`crate::providers::IMAGE_TOKENS`]).
pub const SIM_IMAGE_TOKENS: u64 = 765;

/// Which attempt of which job's step a request was.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct CallTag {
    pub job_id: String,
    pub step: i32,
    pub attempt: i32,
}

/// A failure (or oddity) a test can queue for the next request of a format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Forced {
    /// 429 rate limit with the format's headers and a wait.
    RateLimited { retry_after_ms: u64 },
    /// Out of credit / spend limit / daily quota: terminal.
    Quota,
    /// Overloaded (Anthropic 529, Gemini 503 UNAVAILABLE, OpenAI 503).
    Overloaded,
    /// 500 server error.
    ServerError,
    /// 400 invalid request.
    BadRequest,
    /// 401 bad credentials.
    Unauthorized,
    /// 200 with a body that is JSON but not the format's response.
    Malformed,
    /// 200 with a body cut in the middle.
    Truncated,
    /// A normal answer after `ms` milliseconds (for timeouts).
    Slow { ms: u64 },
    /// A normal answer whose rate-limit headers say the request budget is
    /// exhausted until `reset_ms` from now.
    Exhausted { reset_ms: u64 },
}

/// Deterministic answer for a conversation.
pub struct Synthesized {
    pub text: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub finish_reason: &'static str,
}

const WORDS: [&str; 16] = [
    "switch", "yard", "route", "model", "token", "answer", "cost", "lane", "queue", "result",
    "steady", "clear", "quick", "fine", "ready", "done",
];

fn fnv1a(data: &[u8], mut h: u64) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Tokens in a text, as the sim counts them: a quarter of the characters,
/// rounded up.
pub fn count_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// The sim's answer: text derived from a hash of model and input, between 8
/// and 72 tokens long, cut at `max_tokens`; usage counted from the text.
pub fn synthesize(model: &str, messages: &[Message], max_tokens: u32) -> Synthesized {
    let mut h = fnv1a(model.as_bytes(), 0xcbf29ce484222325);
    let mut prompt_tokens = 3;
    for m in messages {
        h = fnv1a(m.content.as_bytes(), h);
        prompt_tokens += count_tokens(&m.content) + 4;
    }
    let want = 8 + (h % 65);
    let n = want.min(u64::from(max_tokens.max(1)));
    // Each word is cut to 3 characters plus a separator, so the text is `n`
    // tokens long by `count_tokens`.
    let mut text = String::with_capacity(n as usize * 4);
    let mut x = h;
    for i in 0..n {
        x = x.rotate_left(7) ^ i.wrapping_mul(0x9e3779b97f4a7c15);
        let w = WORDS[(x % WORDS.len() as u64) as usize];
        text.push_str(&w[..3]);
        text.push_str(if i + 1 == n { "." } else { " " });
    }
    Synthesized {
        text,
        prompt_tokens,
        completion_tokens: n,
        finish_reason: if n < want { "length" } else { "stop" },
    }
}

/// The simulator's answer under a profile: a scripted answer if one
/// matches; JSON when the request is Switchyard's classifier or judge prompt;
/// otherwise [`synthesize`], model-independent for the `agreement` share of inputs.
pub fn answer(p: &SimProfile, model: &str, messages: &[Message], max_tokens: u32) -> Synthesized {
    let prompt_tokens = 3 + messages
        .iter()
        .map(|m| count_tokens(&m.content) + 4)
        .sum::<u64>();
    let fixed = |text: String| {
        let n = count_tokens(&text);
        Synthesized {
            text,
            prompt_tokens,
            completion_tokens: n,
            finish_reason: "stop",
        }
    };
    if let Some(a) = p.answers.iter().find(|a| {
        a.model.as_deref().is_none_or(|m| m == model)
            && a.contains
                .as_deref()
                .is_none_or(|c| messages.iter().any(|m| m.content.contains(c)))
    }) {
        return fixed(a.text.clone());
    }
    let last = messages.last().map_or("", |m| m.content.as_str());
    let h = fnv1a(last.as_bytes(), fnv1a(model.as_bytes(), 0xcbf29ce484222325));
    if let Some(rest) =
        last.strip_prefix("Classify the request into exactly one of these categories: ")
    {
        let list = rest.split(".\n").next().unwrap_or("");
        let cats: Vec<&str> = list.split(", ").filter(|c| !c.is_empty()).collect();
        if !cats.is_empty() {
            let cat = cats[(h % cats.len() as u64) as usize];
            let conf = 0.5 + ((h >> 16) % 50) as f64 / 100.0;
            return fixed(format!(
                r#"{{"category": "{cat}", "confidence": {conf:.2}}}"#
            ));
        }
    }
    if last.contains("Reply only with JSON: {\"answer\"") {
        let n = last
            .split("\nAnswers:\n")
            .nth(1)
            .map_or(1, |a| {
                a.lines()
                    .filter(|l| {
                        l.split_once(". ")
                            .is_some_and(|(k, _)| k.parse::<u32>().is_ok())
                    })
                    .count()
            })
            .max(1);
        return fixed(format!(
            r#"{{"answer": {}, "confidence": 0.9}}"#,
            1 + h % n as u64
        ));
    }
    let agree = p.agreement > 0.0
        && (fnv1a(last.as_bytes(), 0x84222325cbf29ce4) % 1000) as f64 / 1000.0 < p.agreement;
    synthesize(if agree { "" } else { model }, messages, max_tokens)
}

/// A parsed request, whatever its format.
#[derive(Debug)]
pub(crate) struct SimRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    /// The schema the answer must follow (`{"type": "object"}` for plain
    /// JSON mode), when the request asks for structured output.
    pub schema: Option<serde_json::Value>,
    /// Anthropic: the forced tool the answer goes through.
    pub answer_tool: Option<String>,
    /// Images among the turns (each format's image parts).
    pub images: u32,
}

/// Usage of one simulated answer, in the contract's meaning.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SimUsage {
    /// All input tokens.
    pub prompt: u64,
    pub cached: u64,
    pub cache_write: u64,
    /// Visible output tokens.
    pub visible: u64,
    pub reasoning: u64,
}

/// The state of one rate-limit budget, for headers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BudgetState {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

/// Rate-limit state to report with an answer.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RateState {
    pub requests: Option<BudgetState>,
    pub tokens: Option<BudgetState>,
}

/// The error kinds every format renders in its own way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum ErrKind {
    RateLimited { wait: Duration },
    Quota,
    Overloaded,
    Server,
    BadRequest,
    Unauthorized,
}

/// Take `n` from `b` at `now_ms` (the sim's clock): what is left, or the
/// wait. The bucket is refilled either way, as a TPM bucket's capacity
/// follows the request.
fn take(b: &mut Bucket, shape: Shape, n: f64, now_ms: i64) -> Result<f64, Duration> {
    *b = b.refilled(shape, now_ms);
    *b = b.take(shape, n, now_ms)?;
    Ok(b.tokens)
}

/// The state of a budget of `limit` a minute after a take: `Ok(left)` or
/// denied (`Err`), for headers.
fn budget_state(limit: u32, shape: Shape, taken: &Result<f64, Duration>) -> BudgetState {
    let (remaining, reset) = match taken {
        Ok(left) => (*left, shape.time_for(shape.capacity - left)),
        Err(_) => (0.0, shape.time_for(shape.capacity)),
    };
    BudgetState {
        limit: u64::from(limit),
        remaining: remaining as u64,
        reset,
    }
}

struct SimState {
    profile: SimProfile,
    started: Instant,
    ledger: Mutex<Vec<LedgerEntry>>,
    buckets: Mutex<HashMap<(Format, String), (Bucket, Bucket)>>,
    forced: Mutex<HashMap<Format, VecDeque<Forced>>>,
    in_flight: std::sync::atomic::AtomicU64,
    /// TCP connections accepted.
    connections: std::sync::atomic::AtomicU64,
    batches: Mutex<batch::Book>,
}

/// Counts a request as in flight while it lives.
struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A running simulator.
pub struct SimServer {
    pub addr: SocketAddr,
    state: Arc<SimState>,
    /// The server's task; `stop` (or drop) cancels its token.
    tasks: crate::tasks::Tasks,
}

impl SimServer {
    /// Bind `listen` (port 0 for an ephemeral port) and serve until stopped.
    pub async fn start(listen: &str, profile: SimProfile) -> anyhow::Result<Self> {
        profile.validate()?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the simulator to {listen}"))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(SimState {
            profile,
            started: Instant::now(),
            ledger: Mutex::new(Vec::new()),
            buckets: Mutex::new(HashMap::new()),
            forced: Mutex::new(HashMap::new()),
            in_flight: Default::default(),
            connections: Default::default(),
            batches: Default::default(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(openai_route))
            .route("/v1/messages", post(anthropic_route))
            .route("/v1beta/models/{action}", post(gemini_route))
            .route("/v1/models/{action}", post(gemini_route))
            .route("/v1/files", post(batch::openai_upload))
            .route("/v1/files/{id}", get(batch::openai_file))
            .route("/v1/files/{id}/content", get(batch::openai_file_content))
            // OpenAI's batches, and Gemini's on its `v1` paths.
            .route(
                "/v1/batches",
                post(batch::openai_create).get(batch::v1_list),
            )
            .route(
                "/v1/batches/{id}",
                get(batch::v1_get)
                    .delete(batch::gemini_delete)
                    .post(batch::gemini_action),
            )
            .route("/v1/batches/{id}/cancel", post(batch::openai_cancel))
            .route(
                "/v1/messages/batches",
                post(batch::anthropic_create).get(batch::anthropic_list),
            )
            .route(
                "/v1/messages/batches/{id}",
                get(batch::anthropic_get).delete(batch::anthropic_delete),
            )
            .route(
                "/v1/messages/batches/{id}/cancel",
                post(batch::anthropic_cancel),
            )
            .route(
                "/v1/messages/batches/{id}/results",
                get(batch::anthropic_results),
            )
            .route("/v1beta/batches", get(batch::gemini_list))
            .route(
                "/v1beta/batches/{id}",
                get(batch::gemini_get)
                    .delete(batch::gemini_delete)
                    .post(batch::gemini_action),
            )
            .route("/ledger", get(ledger))
            .route("/control/force", post(force_route))
            .route("/control/force_batch", post(force_batch_route))
            // Batch input files and batches are large (OpenAI: 200 MB).
            .layer(axum::extract::DefaultBodyLimit::max(256 << 20))
            .route("/health", get(|| async { "ok" }))
            .with_state(state.clone());
        let tasks = crate::tasks::Tasks::new();
        let token = tasks.token().clone();
        let counted = state.clone();
        // HTTP/1.1, and HTTP/2 with prior knowledge (h2c) on the same port.
        let listener = axum::serve::ListenerExt::tap_io(listener, move |_| {
            counted
                .connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        tasks.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        });
        Ok(Self { addr, state, tasks })
    }

    /// `http://ADDR`, to use as a provider's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Milliseconds since the simulator started (the ledger's clock).
    pub fn now_ms(&self) -> u64 {
        self.state.started.elapsed().as_millis() as u64
    }

    /// Requests being served right now (answered or not yet).
    pub fn in_flight(&self) -> u64 {
        self.state
            .in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// TCP connections accepted so far (one per HTTP/1.1 call in flight; a
    /// few for many calls over HTTP/2).
    pub fn connections(&self) -> u64 {
        self.state
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A copy of the ledger.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.state
            .ledger
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// Queue `forced` for the next requests of `format`, in order.
    pub fn force(&self, format: Format, forced: impl IntoIterator<Item = Forced>) {
        if let Ok(mut q) = self.state.forced.lock() {
            q.entry(format).or_default().extend(forced);
        }
    }

    /// Make the next batch of `format` end as `fate` says.
    pub fn force_batch(&self, format: Format, fate: BatchFate) {
        if let Ok(mut b) = self.state.batches.lock() {
            b.force(format, fate);
        }
    }

    /// Batch status requests answered so far, and the most that were ever
    /// under way at once for one batch.
    pub fn batch_polls(&self) -> (u64, u32) {
        self.state
            .batches
            .lock()
            .map(|b| (b.polls, b.max_polls_at_once))
            .unwrap_or_default()
    }

    pub fn stop(&self) {
        self.tasks.token().cancel();
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.tasks.token().cancel();
    }
}

#[derive(Deserialize)]
struct ForceRequest {
    format: Format,
    #[serde(flatten)]
    forced: Forced,
    #[serde(default = "one")]
    count: usize,
}

fn one() -> usize {
    1
}

async fn force_route(State(st): State<Arc<SimState>>, Json(req): Json<ForceRequest>) -> StatusCode {
    if let Ok(mut q) = st.forced.lock() {
        q.entry(req.format)
            .or_default()
            .extend(std::iter::repeat_n(req.forced, req.count));
    }
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct ForceBatchRequest {
    format: Format,
    fate: BatchFate,
}

async fn force_batch_route(
    State(st): State<Arc<SimState>>,
    Json(req): Json<ForceBatchRequest>,
) -> StatusCode {
    if let Ok(mut b) = st.batches.lock() {
        b.force(req.format, req.fate);
    }
    StatusCode::NO_CONTENT
}

async fn ledger(State(st): State<Arc<SimState>>) -> Json<Vec<LedgerEntry>> {
    Json(st.ledger.lock().map(|l| l.clone()).unwrap_or_default())
}

fn has_auth(headers: &HeaderMap) -> bool {
    ["authorization", "x-api-key", "x-goog-api-key"]
        .iter()
        .any(|h| headers.contains_key(*h))
}

async fn openai_route(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    serve(&st, Format::Openai, openai::parse(&body), &headers).await
}

async fn anthropic_route(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    serve(&st, Format::Anthropic, anthropic::parse(&body), &headers).await
}

async fn gemini_route(
    State(st): State<Arc<SimState>>,
    UrlPath(action): UrlPath<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(model) = action.strip_suffix(":batchGenerateContent") {
        return batch::gemini_create(&st, model, &headers, &body);
    }
    let parsed = match action.strip_suffix(":generateContent") {
        Some(model) if !model.is_empty() => gemini::parse(model, &body),
        _ => Err(format!("unsupported method `{action}`")),
    };
    serve(&st, Format::Gemini, parsed, &headers).await
}

fn render_error(
    format: Format,
    kind: ErrKind,
    model: &str,
    rate: &RateState,
    send_rate: bool,
) -> Response {
    let mut resp = match format {
        Format::Openai => openai::error(kind, model),
        Format::Anthropic => anthropic::error(kind, model),
        Format::Gemini => gemini::error(kind, model),
    };
    if send_rate {
        add_rate_headers(format, resp.headers_mut(), rate);
    }
    resp
}

fn add_rate_headers(format: Format, h: &mut HeaderMap, rate: &RateState) {
    match format {
        Format::Openai => openai::rate_headers(h, rate),
        Format::Anthropic => anthropic::rate_headers(h, rate),
        Format::Gemini => {}
    }
}

/// The common path of every format: forced failures, limits, latency, errors,
/// usage, ledger; the format modules only parse and render.
async fn serve(
    st: &SimState,
    format: Format,
    parsed: Result<SimRequest, String>,
    headers: &HeaderMap,
) -> Response {
    let arrived = Instant::now();
    let at_ms = arrived.duration_since(st.started).as_millis() as u64;
    let in_flight = st
        .in_flight
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        + 1;
    let _counted = InFlight(&st.in_flight);
    let auth = has_auth(headers);
    let call = headers
        .get(crate::ids::CALL_TAG_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::ids::parse_call_tag)
        .map(|(job_id, step, attempt)| CallTag {
            job_id,
            step,
            attempt,
        });
    let max_tokens_of_request = parsed.as_ref().map_or(0, |r| u64::from(r.max_tokens));
    let images = parsed.as_ref().map_or(0, |r| r.images);
    let p = st.profile.for_format(format);
    let record = |model: &str, status: u16, usage: SimUsage, retry_after_ms: Option<u64>| {
        if let Ok(mut l) = st.ledger.lock() {
            let seq = l.len() as u64 + 1;
            l.push(LedgerEntry {
                seq,
                format,
                model: model.to_string(),
                status,
                prompt_tokens: usage.prompt,
                completion_tokens: usage.visible + usage.reasoning,
                max_tokens: max_tokens_of_request,
                cached_tokens: usage.cached,
                cache_write_tokens: usage.cache_write,
                reasoning_tokens: usage.reasoning,
                at_ms,
                has_auth: auth,
                retry_after_ms,
                in_flight,
                call: call.clone(),
                batch: None,
                images,
            });
        }
    };
    let req = match parsed {
        Ok(r) => r,
        Err(why) => {
            record("", 400, SimUsage::default(), None);
            let mut resp = render_error(
                format,
                ErrKind::BadRequest,
                "",
                &RateState::default(),
                false,
            );
            tracing::debug!(%why, "sim rejected a request");
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            return resp;
        }
    };
    let s = answer_request(p, &req);
    let prompt_only = SimUsage {
        prompt: s.prompt_tokens,
        ..Default::default()
    };
    let forced = st
        .forced
        .lock()
        .ok()
        .and_then(|mut q| q.get_mut(&format).and_then(|q| q.pop_front()));

    // Enforced limits, per format and model.
    let mut rate = RateState::default();
    let mut denied: Option<Duration> = None;
    if p.rpm > 0 || p.tpm > 0 {
        // Each bucket holds a second's worth (at least one); a TPM bucket
        // grows to hold a larger request, so it runs once that much is back.
        let rpm = Shape::holding(f64::from(p.rpm), 1.0);
        let need = (s.prompt_tokens + u64::from(req.max_tokens)) as f64;
        let second = Shape::holding(f64::from(p.tpm), 1.0);
        let tpm = Shape {
            capacity: second.capacity.max(need),
            ..second
        };
        let now = at_ms as i64;
        let mut buckets = st.buckets.lock().expect("bucket lock");
        let (rb, tb) = buckets
            .entry((format, req.model.clone()))
            .or_insert_with(|| (Bucket::full(rpm, now), Bucket::full(second, now)));
        if p.rpm > 0 {
            let taken = take(rb, rpm, 1.0, now);
            rate.requests = Some(budget_state(p.rpm, rpm, &taken));
            denied = taken.err();
        }
        if p.tpm > 0 && denied.is_none() {
            let taken = take(tb, tpm, need, now);
            rate.tokens = Some(budget_state(p.tpm, tpm, &taken));
            denied = taken.err();
        }
    }
    if let Some(Forced::Exhausted { reset_ms }) = &forced {
        rate.requests = Some(BudgetState {
            limit: rate.requests.map_or(1000, |b| b.limit),
            remaining: 0,
            reset: Duration::from_millis(*reset_ms),
        });
    }
    let send_rate = p.rate_headers;
    if let Some(wait) = denied {
        // Whole seconds, rounded up, as the providers send them.
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let wait = Duration::from_secs(secs);
        record(&req.model, 429, prompt_only, Some(secs * 1000));
        return render_error(
            format,
            ErrKind::RateLimited { wait },
            &req.model,
            &rate,
            send_rate,
        );
    }

    let mut delay = p.latency_ms
        + if p.jitter_ms > 0 {
            fastrand::u64(0..=p.jitter_ms)
        } else {
            0
        };
    if let Some(Forced::Slow { ms }) = &forced {
        delay += ms;
    }
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let forced_error = match &forced {
        Some(Forced::RateLimited { retry_after_ms }) => Some(ErrKind::RateLimited {
            wait: Duration::from_millis(*retry_after_ms),
        }),
        Some(Forced::Quota) => Some(ErrKind::Quota),
        Some(Forced::Overloaded) => Some(ErrKind::Overloaded),
        Some(Forced::ServerError) => Some(ErrKind::Server),
        Some(Forced::BadRequest) => Some(ErrKind::BadRequest),
        Some(Forced::Unauthorized) => Some(ErrKind::Unauthorized),
        _ => None,
    };
    if let Some(kind) = forced_error.or_else(|| random_error(p, &req.model)) {
        let (status, retry_ms) = match kind {
            ErrKind::RateLimited { wait } => (429, Some(wait.as_millis() as u64)),
            ErrKind::Quota => (429, None),
            ErrKind::Overloaded => (
                if format == Format::Anthropic {
                    529
                } else {
                    503
                },
                None,
            ),
            ErrKind::Server => (500, None),
            ErrKind::BadRequest => (400, None),
            ErrKind::Unauthorized => (401, None),
        };
        record(&req.model, status, prompt_only, retry_ms);
        if let ErrKind::RateLimited { .. } = kind {
            if let Some(r) = rate.requests.as_mut() {
                r.remaining = 0;
            }
        }
        return render_error(format, kind, &req.model, &rate, send_rate);
    }

    let usage = usage_for(p, format, &s);
    record(&req.model, 200, usage, None);
    let body = match format {
        Format::Openai => openai::success(&req, &s, &usage, at_ms),
        Format::Anthropic => anthropic::success(&req, &s, &usage, at_ms),
        Format::Gemini => gemini::success(&req, &s, &usage),
    };
    let mut resp = match forced {
        Some(Forced::Malformed) => (
            StatusCode::OK,
            Json(serde_json::json!({"unexpected": true})),
        )
            .into_response(),
        Some(Forced::Truncated) => {
            let text = body.to_string();
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                text[..text.len() / 2].to_string(),
            )
                .into_response()
        }
        _ => (StatusCode::OK, Json(body)).into_response(),
    };
    if send_rate {
        add_rate_headers(format, resp.headers_mut(), &rate);
    }
    resp
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

/// The answer to a parsed request: [`answer`], and when the request asks
/// for structured output (and no scripted answer matches), JSON that
/// follows its schema, derived from the same text (so consensus voters that
/// agree give the same JSON), broken at the profile's `invalid_json` rates.
pub(crate) fn answer_request(p: &SimProfile, req: &SimRequest) -> Synthesized {
    let mut s = answer(p, &req.model, &req.messages, req.max_tokens);
    s.prompt_tokens += SIM_IMAGE_TOKENS * u64::from(req.images);
    let Some(schema) = &req.schema else {
        return s;
    };
    let scripted = p.answers.iter().any(|a| {
        a.model.as_deref().is_none_or(|m| m == req.model)
            && a.contains
                .as_deref()
                .is_none_or(|c| req.messages.iter().any(|m| m.content.contains(c)))
    });
    if scripted {
        return s;
    }
    let mut v = schema::instance(schema, fnv1a(s.text.as_bytes(), 0xcbf2_9ce4_8422_2325));
    let rate = p
        .model_invalid_json
        .get(&req.model)
        .copied()
        .unwrap_or(p.invalid_json_rate);
    if rate > 0.0 && fastrand::f64() < rate {
        v = schema::broken(schema, v);
    }
    s.text = v.to_string();
    s.completion_tokens = count_tokens(&s.text);
    s.finish_reason = "stop";
    s
}

/// The profile's random failure for a request to `model`, if it draws one:
/// the model's share of terminal 400s, else the share of 500s.
fn random_error(p: &SimProfile, model: &str) -> Option<ErrKind> {
    let model_error = p
        .model_errors
        .get(model)
        .is_some_and(|share| fastrand::f64() < *share);
    if model_error {
        return Some(ErrKind::BadRequest);
    }
    (p.error_rate > 0.0 && fastrand::f64() < p.error_rate).then_some(ErrKind::Server)
}

/// The usage of an answer under the profile: cached reads, cache writes
/// (Anthropic), reasoning tokens.
fn usage_for(p: &SimProfile, format: Format, s: &Synthesized) -> SimUsage {
    let cached = (s.prompt_tokens as f64 * p.cached_share).floor() as u64;
    let cache_write = if format == Format::Anthropic {
        (s.prompt_tokens as f64 * p.cache_write_share).floor() as u64
    } else {
        0
    };
    SimUsage {
        prompt: s.prompt_tokens,
        cached,
        cache_write,
        visible: s.completion_tokens,
        reasoning: p.reasoning_tokens,
    }
}

/// Role of an incoming message by its wire name.
pub(crate) fn role_of(name: &str) -> Role {
    match name {
        "system" | "developer" => Role::System,
        "assistant" | "model" => Role::Assistant,
        _ => Role::User,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(s: &str) -> Vec<Message> {
        vec![Message {
            role: Role::User,
            content: s.into(),
            parts: Vec::new(),
        }]
    }

    #[test]
    fn synthesis_is_deterministic_and_counted() {
        let a = synthesize("m", &msgs("hello there"), 500);
        let b = synthesize("m", &msgs("hello there"), 500);
        assert_eq!(a.text, b.text);
        assert_eq!(count_tokens(&a.text), a.completion_tokens);
        assert_eq!(a.prompt_tokens, 3 + 3 + 4);
        let c = synthesize("m", &msgs("hello there"), 2);
        assert_eq!(c.completion_tokens, 2);
        assert_eq!(c.finish_reason, "length");
    }

    #[test]
    fn answers_json_to_classifier_and_judge_prompts() {
        let p = SimProfile::default();
        let user = |t: String| {
            vec![Message {
                role: Role::User,
                content: t,
                parts: Vec::new(),
            }]
        };
        let cats = vec!["lookup".to_string(), "sales".to_string()];
        let a = answer(
            &p,
            "m",
            &user(crate::route::classifier_prompt(&cats, "price?")),
            64,
        );
        let (cat, conf) = crate::route::parse_classifier_answer(&a.text, &cats).unwrap();
        assert!(cats.contains(&cat) && (0.5..1.0).contains(&conf));
        assert_eq!(a.completion_tokens, count_tokens(&a.text));
        let judge = "Reply only with JSON: {\"answer\": <n>}\n\nAnswers:\n1. a\n2. b\n";
        let v = crate::route::extract_json(&answer(&p, "m", &user(judge.into()), 64).text).unwrap();
        assert!((1..=2).contains(&v["answer"].as_u64().unwrap()));
        let agree = SimProfile {
            agreement: 1.0,
            ..Default::default()
        };
        let q = user("same question".into());
        assert_eq!(
            answer(&agree, "x", &q, 100).text,
            answer(&agree, "y", &q, 100).text
        );
        assert_ne!(answer(&p, "x", &q, 100).text, answer(&p, "y", &q, 100).text);
        let scripted = SimProfile {
            answers: vec![ScriptedAnswer {
                model: Some("x".into()),
                contains: Some("same".into()),
                text: "{}".into(),
            }],
            ..Default::default()
        };
        assert_eq!(answer(&scripted, "x", &q, 100).text, "{}");
        assert_ne!(answer(&scripted, "y", &q, 100).text, "{}");
    }

    #[test]
    fn profile_sections_per_format() {
        let p: SimProfile = toml::from_str(
            "latency_ms = 5\n[formats.anthropic]\nerror_rate = 0.5\ncache_write_share = 0.2\n",
        )
        .unwrap();
        p.validate().unwrap();
        assert_eq!(p.for_format(Format::Openai).latency_ms, 5);
        assert_eq!(p.for_format(Format::Anthropic).latency_ms, 0);
        assert_eq!(p.for_format(Format::Anthropic).error_rate, 0.5);
        assert!(toml::from_str::<SimProfile>("latncy_ms = 5").is_err());
        SimProfile::demo().validate().unwrap();
    }
}
