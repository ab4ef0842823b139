//! OpenAI chat completions (`POST {base}/v1/chat/completions`), used for
//! OpenAI itself and for any OpenAI-compatible server.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::headers::openai_rate_info;
use super::http::{body_snippet, interpret_with, HttpClient, RawResponse};
use super::{CallError, CallRequest, CallResponse, ErrorClass};
use crate::envelope::Role;
use crate::pricing::Usage;
use crate::structured::ResponseFormat;

#[derive(Debug, Clone)]
pub struct OpenAiAdapter {
    http: HttpClient,
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage>,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
}

#[derive(Serialize)]
struct WireMessage {
    role: &'static str,
    content: serde_json::Value,
}

/// A turn's content: its text, or (with images) a list of `text` and
/// `image_url` parts (a URL, or the data as a `data:` URL).
fn content(m: &crate::envelope::Message) -> serde_json::Value {
    use crate::envelope::Part;
    if m.images().next().is_none() {
        return m.content.as_str().into();
    }
    m.parts
        .iter()
        .map(|p| match p {
            Part::Text { text } => serde_json::json!({"type": "text", "text": text}),
            Part::Image {
                url,
                data,
                media_type,
            } => {
                let url = match (url, data) {
                    (Some(u), _) => u.clone(),
                    (None, d) => format!(
                        "data:{};base64,{}",
                        media_type.as_deref().unwrap_or("image/png"),
                        d.as_deref().unwrap_or("")
                    ),
                };
                serde_json::json!({"type": "image_url", "image_url": {"url": url}})
            }
        })
        .collect()
}

/// The response body (only what we use).
#[derive(Debug, Deserialize)]
pub struct WireResponse {
    pub choices: Vec<WireChoice>,
    pub usage: WireUsage,
}

#[derive(Debug, Deserialize)]
pub struct WireChoice {
    pub message: WireAnswer,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct WireAnswer {
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub refusal: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct WireUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    pub completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionDetails {
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct PromptDetails {
    #[serde(default)]
    pub cached_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct WireErrorBody {
    error: WireError,
}

#[derive(Debug, Deserialize)]
struct WireError {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

impl OpenAiAdapter {
    pub fn new(http: HttpClient) -> Self {
        Self { http }
    }

    /// The call, its request already encoded (see [`HttpClient::exchange`]).
    pub fn call(
        &self,
        req: &CallRequest,
    ) -> impl std::future::Future<Output = Result<CallResponse, CallError>> + '_ {
        self.http.exchange(
            "/v1/chat/completions",
            |k| ("authorization", format!("Bearer {}", k.expose())),
            Vec::new(),
            &build_request(req),
            req.tag.as_deref(),
            interpret,
        )
    }
}

/// Turn an HTTP answer into a response or a typed error (pure).
pub fn interpret(raw: &RawResponse, now: SystemTime) -> Result<CallResponse, CallError> {
    interpret_with(
        raw,
        now,
        openai_rate_info(&raw.headers),
        parse_success,
        classify_error,
    )
}

/// The chat completions request for `req`: system prompt as the first message.
pub fn build_request(req: &CallRequest) -> serde_json::Value {
    let messages: Vec<WireMessage> = req
        .messages
        .iter()
        .map(|m| WireMessage {
            role: match m.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
            },
            content: content(m),
        })
        .collect();
    let mut body = serde_json::to_value(WireRequest {
        model: &req.model,
        messages,
        max_tokens: req.max_tokens,
        temperature: req.temperature,
    })
    .unwrap_or_default();
    if let Some(rf) = &req.response_format {
        body["response_format"] = response_format(rf);
    }
    body
}

/// OpenAI's `response_format` for a job's format.
pub fn response_format(rf: &ResponseFormat) -> serde_json::Value {
    match rf {
        ResponseFormat::JsonObject {} => serde_json::json!({"type": "json_object"}),
        ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        } => serde_json::json!({"type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": strict}}),
    }
}

/// Parse a 200 body.
pub fn parse_success(bytes: &[u8]) -> Result<CallResponse, CallError> {
    let wire: WireResponse = serde_json::from_slice(bytes).map_err(|e| {
        CallError::new(
            ErrorClass::BadResponse,
            Some(200),
            format!("unparseable chat completion: {e}"),
        )
    })?;
    let Some(choice) = wire.choices.into_iter().next() else {
        return Err(CallError::new(
            ErrorClass::BadResponse,
            Some(200),
            "chat completion has no choices",
        ));
    };
    let text = match (choice.message.content, choice.message.refusal) {
        (Some(t), _) => t,
        (None, Some(r)) => r,
        (None, None) => String::new(),
    };
    let cached = wire
        .usage
        .prompt_tokens_details
        .and_then(|d| d.cached_tokens)
        .unwrap_or(0);
    let reasoning = wire
        .usage
        .completion_tokens_details
        .and_then(|d| d.reasoning_tokens)
        .unwrap_or(0);
    Ok(CallResponse {
        text,
        finish_reason: choice.finish_reason,
        usage: Usage {
            input_tokens: wire.usage.prompt_tokens,
            output_tokens: wire.usage.completion_tokens,
            cached_input_tokens: cached.min(wire.usage.prompt_tokens),
            cache_write_input_tokens: 0,
            reasoning_tokens: reasoning.min(wire.usage.completion_tokens),
        },
        http_status: 200,
        rate: super::RateInfo::default(),
    })
}

/// Map a non-200 status and body to a typed error.
pub fn classify_error(status: u16, body: &[u8]) -> CallError {
    let parsed: Option<WireError> = serde_json::from_slice::<WireErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let code = parsed
        .as_ref()
        .and_then(|e| e.code.as_ref())
        .and_then(|c| c.as_str().map(str::to_string));
    let kind = parsed.as_ref().and_then(|e| e.kind.clone());
    let message = parsed
        .as_ref()
        .and_then(|e| e.message.clone())
        .unwrap_or_else(|| body_snippet(body));
    let is_quota = code.as_deref() == Some("insufficient_quota")
        || kind.as_deref() == Some("insufficient_quota");
    let class = match status {
        429 if is_quota => ErrorClass::QuotaExceeded,
        429 => ErrorClass::RateLimited,
        401 | 403 => ErrorClass::Auth,
        408 | 409 => ErrorClass::Server,
        s if s >= 500 => ErrorClass::Server,
        _ => ErrorClass::BadRequest,
    };
    CallError::new(class, Some(status), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_usage_with_cached_tokens() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini",
          "choices":[{"index":0,"message":{"role":"assistant","content":"hi","refusal":null},"finish_reason":"stop"}],
          "usage":{"prompt_tokens":100,"completion_tokens":7,"total_tokens":107,
                   "prompt_tokens_details":{"cached_tokens":64},"completion_tokens_details":{"reasoning_tokens":0}}}"#;
        let r = parse_success(body).unwrap();
        assert_eq!(r.text, "hi");
        assert_eq!(r.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 100,
                output_tokens: 7,
                cached_input_tokens: 64,
                cache_write_input_tokens: 0,
                reasoning_tokens: 0,
            }
        );
    }

    #[test]
    fn truncated_body_is_a_bad_response_not_a_panic() {
        let e = parse_success(br#"{"choices":[{"message":{"content":"h"#).unwrap_err();
        assert_eq!(e.class, ErrorClass::BadResponse);
    }

    #[test]
    fn classifies_errors() {
        let rl = br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        let e = classify_error(429, rl);
        assert_eq!(e.class, ErrorClass::RateLimited);
        assert!(e.retryable);
        let q = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        let e = classify_error(429, q);
        assert_eq!(e.class, ErrorClass::QuotaExceeded);
        assert!(!e.retryable);
        assert!(classify_error(500, b"").retryable);
        assert!(classify_error(503, b"<html>").retryable);
        assert!(!classify_error(400, b"{}").retryable);
        assert_eq!(classify_error(401, b"{}").class, ErrorClass::Auth);
    }
}
