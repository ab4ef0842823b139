//! `switchyard sim`: a stand-in LLM provider on loopback. It speaks OpenAI
//! chat completions (`POST /v1/chat/completions`) with deterministic text
//! derived from the input and usage counted from the text. Clean by default;
//! a [`SimProfile`] adds latency, 500s and enforced RPM/TPM limits (429 with
//! `retry-after` and `x-ratelimit-*` headers). Every answered request is kept
//! in a ledger readable at `GET /ledger`, so tests can compare what the
//! provider was asked with what Switchyard recorded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::envelope::{Message, Role};

/// Behaviour of the simulated providers. All zero = clean.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimProfile {
    /// Fixed latency added to every answer, in milliseconds.
    pub latency_ms: u64,
    /// Uniform random extra latency in `0..=jitter_ms`.
    pub jitter_ms: u64,
    /// Share of requests (0..1) answered with a 500 server error.
    pub error_rate: f64,
    /// Requests per minute accepted per model (0 = unlimited); the bucket holds one second's worth.
    pub rpm: u32,
    /// Tokens per minute accepted per model (0 = unlimited), counting prompt + max_tokens.
    pub tpm: u32,
    /// Share (0..1) of prompt tokens reported as cached.
    pub cached_share: f64,
    /// Send `x-ratelimit-*` headers (true, like OpenAI) or none (like many
    /// OpenAI-compatible servers, whose only signal is the 429 itself).
    pub rate_headers: bool,
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
            rate_headers: true,
        }
    }
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
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.error_rate),
            "sim profile `error_rate` must be within 0..=1"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.cached_share),
            "sim profile `cached_share` must be within 0..=1"
        );
        Ok(())
    }

    /// The demo's default mix: some latency, 3% 500s, RPM limits that cause 429s.
    pub fn demo() -> Self {
        Self {
            latency_ms: 20,
            jitter_ms: 40,
            error_rate: 0.03,
            rpm: 3000,
            tpm: 0,
            cached_share: 0.25,
            rate_headers: true,
        }
    }
}

/// One request the sim answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LedgerEntry {
    pub seq: u64,
    pub model: String,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// Milliseconds since the sim started, when the request arrived.
    pub at_ms: u64,
    /// Whether the request carried credentials (`Authorization` or a provider key header).
    #[serde(default)]
    pub has_auth: bool,
    /// For 429s: the advertised `retry-after`, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
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
    // Each word is padded to exactly 4 characters with its separator, so the
    // text is `n` tokens long by `count_tokens`.
    let mut text = String::with_capacity(n as usize * 4);
    let mut x = h;
    for i in 0..n {
        x = x.rotate_left(7) ^ i.wrapping_mul(0x9e3779b97f4a7c15);
        let w = WORDS[(x % WORDS.len() as u64) as usize];
        let piece = if i + 1 == n { "." } else { " " };
        text.push_str(&w[..3]);
        text.push_str(piece);
    }
    Synthesized {
        text,
        prompt_tokens,
        completion_tokens: n,
        finish_reason: if n < want { "length" } else { "stop" },
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Take `n` from a bucket of `capacity` refilled at `per_sec`; else the wait.
    fn take(&mut self, n: f64, capacity: f64, per_sec: f64, now: Instant) -> Result<f64, Duration> {
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * per_sec).min(capacity);
        self.last = now;
        if self.tokens >= n {
            self.tokens -= n;
            Ok(self.tokens)
        } else {
            Err(Duration::from_secs_f64((n - self.tokens) / per_sec))
        }
    }
}

struct SimState {
    profile: SimProfile,
    started: Instant,
    ledger: Mutex<Vec<LedgerEntry>>,
    buckets: Mutex<HashMap<String, (Bucket, Bucket)>>,
}

/// A running simulator.
pub struct SimServer {
    pub addr: SocketAddr,
    state: Arc<SimState>,
    shutdown: CancellationToken,
}

impl SimServer {
    /// Bind `listen` (use port 0 for an ephemeral port) and serve until shut down.
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
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/ledger", get(ledger))
            .route("/health", get(|| async { "ok" }))
            .with_state(state.clone());
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        });
        Ok(Self {
            addr,
            state,
            shutdown,
        })
    }

    /// `http://ADDR`, to use as a provider's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A copy of the ledger.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.state
            .ledger
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default, alias = "max_completion_tokens")]
    max_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<String>,
}

fn openai_error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    });
    (status, Json(body)).into_response()
}

async fn chat_completions(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let has_auth = headers.contains_key("authorization")
        || headers.contains_key("x-api-key")
        || headers.contains_key("x-goog-api-key");
    let arrived = Instant::now();
    let at_ms = arrived.duration_since(st.started).as_millis() as u64;
    let req: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                &format!("could not parse request body: {e}"),
            )
        }
    };
    let messages: Vec<Message> = req
        .messages
        .iter()
        .map(|m| Message {
            role: match m.role.as_str() {
                "system" | "developer" => Role::System,
                "assistant" => Role::Assistant,
                _ => Role::User,
            },
            content: m.content.clone().unwrap_or_default(),
        })
        .collect();
    let max_tokens = req.max_tokens.unwrap_or(4096);
    let s = synthesize(&req.model, &messages, max_tokens);
    let p = &st.profile;
    let record = |status: u16, completion: u64, cached: u64, retry_after_ms: Option<u64>| {
        let mut l = st.ledger.lock().expect("ledger lock");
        let seq = l.len() as u64 + 1;
        l.push(LedgerEntry {
            seq,
            model: req.model.clone(),
            status,
            prompt_tokens: s.prompt_tokens,
            completion_tokens: completion,
            cached_tokens: cached,
            at_ms,
            has_auth,
            retry_after_ms,
        });
    };

    // Enforced limits, per model.
    let mut rate_headers = HeaderMap::new();
    if p.rpm > 0 || p.tpm > 0 {
        let mut buckets = st.buckets.lock().expect("bucket lock");
        let (rb, tb) = buckets.entry(req.model.clone()).or_insert_with(|| {
            (
                Bucket {
                    tokens: (f64::from(p.rpm) / 60.0).max(1.0),
                    last: arrived,
                },
                Bucket {
                    tokens: (f64::from(p.tpm) / 60.0).max(1.0),
                    last: arrived,
                },
            )
        });
        let mut denied: Option<(Duration, &str)> = None;
        if p.rpm > 0 {
            let per_sec = f64::from(p.rpm) / 60.0;
            let cap = per_sec.max(1.0);
            match rb.take(1.0, cap, per_sec, arrived) {
                Ok(left) => set_rate_headers(
                    &mut rate_headers,
                    "requests",
                    p.rpm,
                    left as u64,
                    refill_time(cap - left, per_sec),
                ),
                Err(wait) => {
                    set_rate_headers(&mut rate_headers, "requests", p.rpm, 0, wait);
                    denied = Some((wait, "requests"));
                }
            }
        }
        if p.tpm > 0 && denied.is_none() {
            let per_sec = f64::from(p.tpm) / 60.0;
            let need = (s.prompt_tokens + u64::from(max_tokens)) as f64;
            let cap = per_sec.max(need);
            match tb.take(need, cap, per_sec, arrived) {
                Ok(left) => set_rate_headers(
                    &mut rate_headers,
                    "tokens",
                    p.tpm,
                    left as u64,
                    refill_time(cap - left, per_sec),
                ),
                Err(wait) => {
                    set_rate_headers(&mut rate_headers, "tokens", p.tpm, 0, wait);
                    denied = Some((wait, "tokens"));
                }
            }
        }
        drop(buckets);
        if !p.rate_headers {
            rate_headers.clear();
        }
        if let Some((wait, what)) = denied {
            // Whole seconds, rounded up, as OpenAI sends them.
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            record(429, 0, 0, Some(secs * 1000));
            let mut resp = openai_error(
                StatusCode::TOO_MANY_REQUESTS,
                what,
                Some("rate_limit_exceeded"),
                &format!(
                    "Rate limit reached for {} in organization org-sim on {what}. Please try again in {secs}s.",
                    req.model
                ),
            );
            resp.headers_mut().extend(rate_headers);
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from(secs));
            return resp;
        }
    }

    let delay = p.latency_ms
        + if p.jitter_ms > 0 {
            fastrand::u64(0..=p.jitter_ms)
        } else {
            0
        };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if p.error_rate > 0.0 && fastrand::f64() < p.error_rate {
        record(500, 0, 0, None);
        return openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!",
        );
    }
    let cached = (s.prompt_tokens as f64 * p.cached_share).floor() as u64;
    record(200, s.completion_tokens, cached, None);
    let body = serde_json::json!({
        "id": format!("chatcmpl-sim{at_ms}"),
        "object": "chat.completion",
        "created": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "model": req.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": s.text, "refusal": null},
            "finish_reason": s.finish_reason,
        }],
        "usage": {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
    });
    let mut resp = (StatusCode::OK, Json(body)).into_response();
    resp.headers_mut().extend(rate_headers);
    resp
}

/// Time for a bucket to refill `missing` tokens.
fn refill_time(missing: f64, per_sec: f64) -> Duration {
    Duration::from_secs_f64((missing / per_sec).max(0.0))
}

fn set_rate_headers(h: &mut HeaderMap, what: &str, limit: u32, remaining: u64, reset: Duration) {
    let reset = format!("{}ms", reset.as_millis());
    for (name, value) in [
        (format!("x-ratelimit-limit-{what}"), limit.to_string()),
        (
            format!("x-ratelimit-remaining-{what}"),
            remaining.to_string(),
        ),
        (format!("x-ratelimit-reset-{what}"), reset),
    ] {
        if let (Ok(n), Ok(v)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            h.insert(n, v);
        }
    }
}

async fn ledger(State(st): State<Arc<SimState>>) -> Json<Vec<LedgerEntry>> {
    Json(st.ledger.lock().map(|l| l.clone()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(s: &str) -> Vec<Message> {
        vec![Message {
            role: Role::User,
            content: s.into(),
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
}
