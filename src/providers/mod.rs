//! Provider adapters behind one closed enum built from config. Each adapter
//! turns a [`CallRequest`] into its provider's wire format, and the answer
//! (or failure) into a [`CallResponse`] or a typed [`CallError`] that says
//! whether to retry and after how long.

pub mod anthropic;
pub mod batch;
pub mod gemini;
pub mod headers;
pub mod http;
pub mod inproc;
pub mod openai;

use std::fmt;
use std::time::Duration;

use crate::config::{ProviderConfig, ProviderKind};
use crate::envelope::Message;
use crate::pricing::Usage;

/// What a lane asks a provider for.
#[derive(Debug, Clone, Default)]
pub struct CallRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    pub temperature: Option<f64>,
    /// `job#step#attempt`, sent as the `x-switchyard-call` header so a
    /// provider's logs (and the simulator's ledger) can be matched to the
    /// `calls` row of the same attempt.
    pub tag: Option<String>,
    /// The answer must be JSON in this format.
    pub response_format: Option<crate::structured::ResponseFormat>,
    /// How the model is asked for it.
    pub structured: crate::config::StructuredMode,
}

/// One rate-limit budget a provider reported (requests, tokens, input
/// tokens, output tokens): what is left and when it is replenished.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub name: &'static str,
    /// The limit per minute the provider states, if it does.
    pub limit: Option<u64>,
    pub remaining: u64,
    pub reset: Option<Duration>,
}

/// Rate-limit state reported by the provider with an answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateInfo {
    pub budgets: Vec<Budget>,
}

impl RateInfo {
    pub fn budget(&self, name: &str) -> Option<&Budget> {
        self.budgets.iter().find(|b| b.name == name)
    }

    /// How long the provider says the lane must stop sending: the latest
    /// reset among the exhausted budgets, if any is exhausted.
    pub fn exhausted_for(&self) -> Option<Duration> {
        self.budgets
            .iter()
            .filter(|b| b.remaining == 0)
            .filter_map(|b| b.reset)
            .max()
    }
}

/// A successful answer, normalised.
#[derive(Debug, Clone)]
pub struct CallResponse {
    pub text: String,
    pub finish_reason: Option<String>,
    pub usage: Usage,
    pub http_status: u16,
    pub rate: RateInfo,
}

/// Why a call failed, in provider-independent terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Too many requests or tokens for now.
    RateLimited,
    /// Out of credit or over a spend limit: retrying cannot help.
    QuotaExceeded,
    /// The provider is overloaded or failing (5xx, 408, 409).
    Server,
    /// No answer in time.
    Timeout,
    /// Could not connect, or the connection broke.
    Connection,
    /// An answer we could not parse.
    BadResponse,
    /// The request was rejected (4xx other than the above).
    BadRequest,
    /// Credentials missing or refused.
    Auth,
}

/// A failed call.
#[derive(Debug, Clone)]
pub struct CallError {
    pub class: ErrorClass,
    pub retryable: bool,
    pub http_status: Option<u16>,
    /// Provider-advised wait before retrying.
    pub retry_after: Option<Duration>,
    /// Human-readable reason, free of credentials.
    pub message: String,
    pub rate: RateInfo,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.http_status {
            Some(s) => write!(f, "{:?} (HTTP {s}): {}", self.class, self.message),
            None => write!(f, "{:?}: {}", self.class, self.message),
        }
    }
}

impl std::error::Error for CallError {}

impl CallError {
    pub fn new(class: ErrorClass, http_status: Option<u16>, message: impl Into<String>) -> Self {
        let retryable = matches!(
            class,
            ErrorClass::RateLimited
                | ErrorClass::Server
                | ErrorClass::Timeout
                | ErrorClass::Connection
                | ErrorClass::BadResponse
        );
        Self {
            class,
            retryable,
            http_status,
            retry_after: None,
            message: message.into(),
            rate: RateInfo::default(),
        }
    }
}

/// An API key. Its `Debug` and `Display` never show the value.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Replace every occurrence of the key in `text`.
    pub fn redact(&self, text: &str) -> String {
        if self.0.len() < 4 {
            return text.to_string();
        }
        text.replace(&self.0, "[REDACTED]")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

/// The closed set of adapters.
#[derive(Debug, Clone)]
pub enum Provider {
    OpenAi(openai::OpenAiAdapter),
    Anthropic(anthropic::AnthropicAdapter),
    Gemini(gemini::GeminiAdapter),
    Inproc(inproc::InprocAdapter),
}

impl Provider {
    /// Build the adapter for a provider from config; the key is read from the
    /// environment variable the config names.
    pub fn from_config(name: &str, cfg: &ProviderConfig) -> anyhow::Result<Self> {
        let key = cfg
            .api_key_env
            .as_deref()
            .and_then(|var| std::env::var(var).ok())
            .filter(|k| !k.is_empty())
            .map(Secret::new);
        let http = || http::HttpClient::for_provider(name, cfg, key.clone());
        Ok(match cfg.kind {
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
                Provider::OpenAi(openai::OpenAiAdapter::new(http()?))
            }
            ProviderKind::Anthropic => {
                Provider::Anthropic(anthropic::AnthropicAdapter::new(http()?))
            }
            ProviderKind::Gemini => Provider::Gemini(gemini::GeminiAdapter::new(http()?)),
            ProviderKind::Inproc => Provider::Inproc(inproc::InprocAdapter),
        })
    }

    pub async fn call(&self, req: &CallRequest) -> Result<CallResponse, CallError> {
        match self {
            Provider::OpenAi(a) => a.call(req).await,
            Provider::Anthropic(a) => a.call(req).await,
            Provider::Gemini(a) => a.call(req).await,
            Provider::Inproc(a) => a.call(req),
        }
    }
}

/// For providers that take the system prompt apart from the conversation:
/// the system messages joined (if any) and the other turns in order.
pub fn split_system(messages: &[Message]) -> (Option<String>, Vec<&Message>) {
    let system: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == crate::envelope::Role::System)
        .map(|m| m.content.as_str())
        .collect();
    let turns = messages
        .iter()
        .filter(|m| m.role != crate::envelope::Role::System)
        .collect();
    ((!system.is_empty()).then(|| system.join("\n\n")), turns)
}

/// Tokens reserved per image: above what any provider charges for one
/// image after its own scaling (OpenAI high detail ≈ 1,105 for 2048×768,
/// Anthropic ≈ 1,600 at its 1.15 MP cap, Gemini 258 a tile); the
/// reservation is settled against the reported usage after the call.
pub const IMAGE_TOKENS: u64 = 1_600;

/// Rough token estimate for limits: about four characters a token, plus a
/// per-message overhead, rounded up, plus [`IMAGE_TOKENS`] per image.
pub fn estimate_input_tokens(messages: &[Message]) -> u64 {
    messages
        .iter()
        .map(|m| {
            (m.content.chars().count() as u64).div_ceil(4)
                + 4
                + IMAGE_TOKENS * m.images().count() as u64
        })
        .sum::<u64>()
        + 3
}
