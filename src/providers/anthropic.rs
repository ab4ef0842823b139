//! Anthropic Messages (`POST {base}/v1/messages`).
//!
//! The system prompt travels in the top-level `system` field, not as a
//! message. `usage.input_tokens` excludes cached reads and cache writes, so
//! the internal (contract) input count is their sum.

use std::time::SystemTime;

use serde::Deserialize;

use super::headers::anthropic_rate_info;
use super::http::{body_snippet, interpret_with, HttpClient, RawResponse};
use super::{split_system, CallError, CallRequest, CallResponse, ErrorClass};
use crate::config::StructuredMode;
use crate::envelope::Role;
use crate::pricing::Usage;
use crate::structured::ResponseFormat;

pub const API_VERSION: &str = "2023-06-01";

#[derive(Debug, Clone)]
pub struct AnthropicAdapter {
    http: HttpClient,
}

impl AnthropicAdapter {
    pub fn new(http: HttpClient) -> Self {
        Self { http }
    }

    /// The call, its request already encoded (see [`HttpClient::exchange`]).
    pub fn call(
        &self,
        req: &CallRequest,
    ) -> impl std::future::Future<Output = Result<CallResponse, CallError>> + '_ {
        self.http.exchange(
            "/v1/messages",
            |k| ("x-api-key", k.expose().to_string()),
            vec![("anthropic-version", API_VERSION.to_string())],
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
        anthropic_rate_info(&raw.headers, now),
        parse_success,
        classify_error,
    )
}

/// The Messages request: system messages joined into `system`; the rest
/// alternate user/assistant as given.
pub fn build_request(req: &CallRequest) -> serde_json::Value {
    let (system, turns) = split_system(&req.messages);
    let messages: Vec<serde_json::Value> = turns
        .iter()
        .map(|m| {
            serde_json::json!({
                "role": if m.role == Role::Assistant { "assistant" } else { "user" },
                "content": content(m),
            })
        })
        .collect();
    let mut body = serde_json::json!({
        "model": req.model,
        "max_tokens": req.max_tokens,
        "messages": messages,
    });
    if let Some(system) = system {
        body["system"] = system.into();
    }
    if let Some(t) = req.temperature {
        body["temperature"] = serde_json::json!(t);
    }
    if let Some(rf) = &req.response_format {
        add_format(&mut body, rf, req.structured);
    }
    body
}

/// A turn's content: its text, or (with images) `text` and `image` blocks
/// (a base64 or a URL source).
fn content(m: &crate::envelope::Message) -> serde_json::Value {
    use crate::envelope::Part;
    if m.images().next().is_none() {
        return m.content.as_str().into();
    }
    m.parts
        .iter()
        .map(|p| match p {
            Part::Text { text } => serde_json::json!({"type": "text", "text": text}),
            Part::Image { url: Some(url), .. } => {
                serde_json::json!({"type": "image", "source": {"type": "url", "url": url}})
            }
            Part::Image {
                data, media_type, ..
            } => serde_json::json!({"type": "image", "source": {"type": "base64",
                "media_type": media_type, "data": data}}),
        })
        .collect()
}

/// The name of the tool that carries a structured answer in `tool` mode.
pub const ANSWER_TOOL: &str = "answer";

/// Ask for `rf`: natively (`output_config.format`), or through one forced
/// tool whose input schema is the schema (`tool` mode, and always for a
/// `json_object` format, which has no schema of its own).
fn add_format(body: &mut serde_json::Value, rf: &ResponseFormat, mode: StructuredMode) {
    match (rf, mode) {
        (ResponseFormat::JsonSchema { schema, .. }, StructuredMode::Native) => {
            body["output_config"] =
                serde_json::json!({"format": {"type": "json_schema", "schema": schema}});
        }
        _ => {
            body["tools"] = serde_json::json!([{
                "name": ANSWER_TOOL,
                "description": format!("Give the answer as `{}`.", rf.name()),
                "input_schema": rf.schema(),
            }]);
            body["tool_choice"] = serde_json::json!({"type": "tool", "name": ANSWER_TOOL});
        }
    }
}

#[derive(Debug, Deserialize)]
struct WireResponse {
    content: Vec<WireBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    usage: WireUsage,
}

#[derive(Debug, Deserialize)]
struct WireBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    /// A `tool_use` block's input (the structured answer in `tool` mode).
    #[serde(default)]
    input: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    input_tokens: u64,
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

/// Parse a 200 body: text blocks joined; usage converted to the contract's meaning.
pub fn parse_success(bytes: &[u8]) -> Result<CallResponse, CallError> {
    let wire: WireResponse = serde_json::from_slice(bytes).map_err(|e| {
        CallError::new(
            ErrorClass::BadResponse,
            Some(200),
            format!("unparseable Anthropic message: {e}"),
        )
    })?;
    // The answer tool's input, when the model was made to answer through it.
    let tool_answer = wire
        .content
        .iter()
        .find(|b| b.kind == "tool_use")
        .and_then(|b| b.input.as_ref())
        .map(ToString::to_string);
    let text: String = tool_answer.unwrap_or_else(|| {
        wire.content
            .iter()
            .filter(|b| b.kind == "text")
            .filter_map(|b| b.text.as_deref())
            .collect()
    });
    let read = wire.usage.cache_read_input_tokens.unwrap_or(0);
    let written = wire.usage.cache_creation_input_tokens.unwrap_or(0);
    Ok(CallResponse {
        text,
        finish_reason: wire.stop_reason,
        usage: Usage {
            input_tokens: wire.usage.input_tokens + read + written,
            output_tokens: wire.usage.output_tokens,
            cached_input_tokens: read,
            cache_write_input_tokens: written,
            // Thinking is billed inside output_tokens; the API reports no split.
            reasoning_tokens: 0,
        },
        http_status: 200,
        rate: super::RateInfo::default(),
    })
}

#[derive(Debug, Deserialize)]
struct WireErrorBody {
    error: WireError,
}

#[derive(Debug, Deserialize)]
struct WireError {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Map a non-200 answer to a typed error.
pub fn classify_error(status: u16, body: &[u8]) -> CallError {
    let parsed = serde_json::from_slice::<WireErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let kind = parsed
        .as_ref()
        .and_then(|e| e.kind.clone())
        .unwrap_or_default();
    let message = parsed
        .as_ref()
        .and_then(|e| e.message.clone())
        .unwrap_or_else(|| body_snippet(body));
    let spend_limit = {
        let m = message.to_ascii_lowercase();
        m.contains("spend limit") || m.contains("credit balance") || m.contains("billing")
    };
    let class = match (status, kind.as_str()) {
        (429, _) if spend_limit => ErrorClass::QuotaExceeded,
        (400, _) if spend_limit => ErrorClass::QuotaExceeded,
        (429, _) | (_, "rate_limit_error") => ErrorClass::RateLimited,
        (529, _) | (_, "overloaded_error") => ErrorClass::Server,
        (401 | 403, _) | (_, "authentication_error" | "permission_error") => ErrorClass::Auth,
        (408 | 409, _) => ErrorClass::Server,
        (s, _) if s >= 500 => ErrorClass::Server,
        _ => ErrorClass::BadRequest,
    };
    let message = if kind.is_empty() {
        message
    } else {
        format!("{kind}: {message}")
    };
    CallError::new(class, Some(status), message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Message;

    #[test]
    fn system_goes_to_the_top_level() {
        let req = CallRequest {
            model: "claude-haiku-4-5".into(),
            messages: vec![
                Message {
                    role: Role::System,
                    content: "be kind".into(),
                    parts: Vec::new(),
                },
                Message {
                    role: Role::User,
                    content: "hi".into(),
                    parts: Vec::new(),
                },
            ],
            max_tokens: 100,
            temperature: Some(0.5),
            tag: None,
            ..Default::default()
        };
        let b = build_request(&req);
        assert_eq!(b["system"], "be kind");
        assert_eq!(b["max_tokens"], 100);
        assert_eq!(b["messages"].as_array().unwrap().len(), 1);
        assert_eq!(b["messages"][0]["role"], "user");
    }

    #[test]
    fn usage_adds_cache_reads_and_writes_to_input() {
        let body = br#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5",
            "content":[{"type":"text","text":"Hello"},{"type":"text","text":" there"}],
            "stop_reason":"end_turn","stop_sequence":null,
            "usage":{"input_tokens":20,"cache_creation_input_tokens":100,"cache_read_input_tokens":300,"output_tokens":12}}"#;
        let r = parse_success(body).unwrap();
        assert_eq!(r.text, "Hello there");
        assert_eq!(r.finish_reason.as_deref(), Some("end_turn"));
        assert_eq!(r.usage.input_tokens, 420);
        assert_eq!(r.usage.cached_input_tokens, 300);
        assert_eq!(r.usage.cache_write_input_tokens, 100);
        assert_eq!(r.usage.output_tokens, 12);
    }

    #[test]
    fn error_classes() {
        let e = |status, t: &str, m: &str| {
            classify_error(
                status,
                format!(r#"{{"type":"error","error":{{"type":"{t}","message":"{m}"}},"request_id":"req_1"}}"#)
                    .as_bytes(),
            )
        };
        assert_eq!(
            e(429, "rate_limit_error", "slow down").class,
            ErrorClass::RateLimited
        );
        assert!(e(429, "rate_limit_error", "slow down").retryable);
        let spend = e(
            429,
            "rate_limit_error",
            "You have reached your specified API usage spend limit",
        );
        assert_eq!(spend.class, ErrorClass::QuotaExceeded);
        assert!(!spend.retryable);
        assert!(e(529, "overloaded_error", "Overloaded").retryable);
        assert!(e(500, "api_error", "oops").retryable);
        assert!(!e(400, "invalid_request_error", "bad").retryable);
        assert_eq!(
            e(401, "authentication_error", "bad key").class,
            ErrorClass::Auth
        );
        assert!(!e(413, "request_too_large", "big").retryable);
        assert!(classify_error(502, b"<html>bad gateway</html>").retryable);
        assert_eq!(
            parse_success(br#"{"content":[{"type":"text","te"#)
                .unwrap_err()
                .class,
            ErrorClass::BadResponse
        );
    }
}
