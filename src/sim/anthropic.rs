//! The simulator's Anthropic Messages format.

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{role_of, ErrKind, RateState, SimRequest, SimUsage, Synthesized};
use crate::clock::fmt_rfc3339;
use crate::envelope::{Message, Role};

#[derive(Deserialize)]
struct MessagesRequest {
    model: String,
    max_tokens: u32,
    #[serde(default)]
    system: Option<SystemField>,
    messages: Vec<WireMessage>,
    #[serde(default)]
    output_config: Option<serde_json::Value>,
    /// The earlier beta's name for `output_config.format`.
    #[serde(default)]
    output_format: Option<serde_json::Value>,
    #[serde(default)]
    tools: Vec<serde_json::Value>,
    #[serde(default)]
    tool_choice: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SystemField {
    Text(String),
    Blocks(Vec<TextBlock>),
}

#[derive(Deserialize)]
struct TextBlock {
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct WireMessage {
    role: String,
    content: Content,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<serde_json::Value>),
}

/// A turn's text and its images (`image` blocks with a base64 or URL source).
fn text_of(c: Content) -> Result<(String, u32), String> {
    match c {
        Content::Text(t) => Ok((t, 0)),
        Content::Blocks(blocks) => {
            let (mut text, mut images) = (String::new(), 0);
            for b in blocks {
                match b.get("type").and_then(|t| t.as_str()) {
                    Some("text") => text.push_str(b["text"].as_str().unwrap_or("")),
                    Some("image") => {
                        let src = &b["source"];
                        let ok = match src["type"].as_str() {
                            Some("base64") => {
                                src["data"].is_string()
                                    && src["media_type"]
                                        .as_str()
                                        .is_some_and(|m| m.starts_with("image/"))
                            }
                            Some("url") => src["url"].is_string(),
                            _ => false,
                        };
                        if !ok {
                            return Err("image.source: base64 (media_type, data) or url".into());
                        }
                        images += 1;
                    }
                    Some("tool_result" | "tool_use") => {}
                    other => return Err(format!("content block type {other:?} not supported")),
                }
            }
            Ok((text, images))
        }
    }
}

pub(super) fn parse(body: &[u8]) -> Result<SimRequest, String> {
    let req: MessagesRequest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut messages = Vec::new();
    if let Some(system) = req.system {
        let content = match system {
            SystemField::Text(t) => t,
            SystemField::Blocks(b) => b.into_iter().map(|b| b.text).collect(),
        };
        messages.push(Message {
            role: Role::System,
            content,
            parts: Vec::new(),
        });
    }
    let mut images = 0;
    for m in req.messages {
        if !matches!(m.role.as_str(), "user" | "assistant") {
            return Err(format!("messages: unexpected role `{}`", m.role));
        }
        let (text, n) = text_of(m.content)?;
        images += n;
        messages.push(Message::text(role_of(&m.role), text));
    }
    // Structured output: natively, or through one forced tool.
    let native = req
        .output_config
        .as_ref()
        .and_then(|c| c.get("format"))
        .or(req.output_format.as_ref());
    let (schema, answer_tool) = match (native, &req.tool_choice) {
        (Some(f), _) => {
            if f.get("type").and_then(|t| t.as_str()) != Some("json_schema") {
                return Err("output_config.format.type: must be `json_schema`".into());
            }
            let schema = f
                .get("schema")
                .cloned()
                .ok_or("output_config.format.schema: missing")?;
            (Some(schema), None)
        }
        (None, Some(choice)) if choice.get("type").and_then(|t| t.as_str()) == Some("tool") => {
            let name = choice.get("name").and_then(|n| n.as_str()).unwrap_or("");
            let tool = req
                .tools
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
                .ok_or_else(|| format!("tool_choice: no tool named `{name}`"))?;
            let schema = tool
                .get("input_schema")
                .cloned()
                .ok_or("tools[].input_schema: missing")?;
            (Some(schema), Some(name.to_string()))
        }
        _ => (None, None),
    };
    Ok(SimRequest {
        model: req.model,
        messages,
        max_tokens: req.max_tokens,
        schema,
        answer_tool,
        images,
    })
}

pub(super) fn success(
    req: &SimRequest,
    s: &Synthesized,
    u: &SimUsage,
    at_ms: u64,
) -> serde_json::Value {
    serde_json::json!({
        "id": format!("msg_sim{at_ms}"),
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": match &req.answer_tool {
            Some(name) => serde_json::json!([{"type": "tool_use", "id": format!("toolu_sim{at_ms}"),
                "name": name,
                "input": serde_json::from_str::<serde_json::Value>(&s.text).unwrap_or_default()}]),
            None => serde_json::json!([{"type": "text", "text": s.text}]),
        },
        "stop_reason": match (&req.answer_tool, s.finish_reason) {
            (Some(_), _) => "tool_use",
            (None, "length") => "max_tokens",
            (None, _) => "end_turn",
        },
        "stop_sequence": null,
        "usage": {
            "input_tokens": u.prompt - u.cached - u.cache_write,
            "cache_creation_input_tokens": u.cache_write,
            "cache_read_input_tokens": u.cached,
            "output_tokens": u.visible + u.reasoning,
        }
    })
}

pub(super) fn error(kind: ErrKind, model: &str) -> Response {
    let (status, body) = error_body(kind, model);
    let mut resp = (status, Json(body)).into_response();
    if let ErrKind::RateLimited { wait } = kind {
        resp.headers_mut().insert(
            "retry-after",
            HeaderValue::from(wait.as_secs_f64().ceil().max(1.0) as u64),
        );
    }
    resp
}

/// An error's status and body (`{"type": "error", "error": {...}}`).
pub(super) fn error_body(kind: ErrKind, _model: &str) -> (StatusCode, serde_json::Value) {
    let (status, t, message) = match kind {
        ErrKind::RateLimited { .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "Number of requests has exceeded your per-minute rate limit.",
        ),
        ErrKind::Quota => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "You have reached your specified API usage spend limit.",
        ),
        ErrKind::Overloaded => (
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            "Overloaded",
        ),
        ErrKind::Server => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "Internal server error",
        ),
        ErrKind::BadRequest => (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "Invalid request",
        ),
        ErrKind::Unauthorized => (
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        ),
    };
    let body = serde_json::json!({
        "type": "error",
        "error": {"type": t, "message": message},
        "request_id": "req_sim",
    });
    (status, body)
}

/// `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`, resets as RFC 3339.
pub(super) fn rate_headers(h: &mut HeaderMap, rate: &RateState) {
    let now = SystemTime::now();
    for (what, b) in [("requests", rate.requests), ("tokens", rate.tokens)] {
        let Some(b) = b else { continue };
        // Round the reset up to the next whole second, as the API's timestamps are.
        let at = now + b.reset + Duration::from_millis(999);
        for (name, value) in [
            (
                format!("anthropic-ratelimit-{what}-limit"),
                b.limit.to_string(),
            ),
            (
                format!("anthropic-ratelimit-{what}-remaining"),
                b.remaining.to_string(),
            ),
            (format!("anthropic-ratelimit-{what}-reset"), fmt_rfc3339(at)),
        ] {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                h.insert(n, v);
            }
        }
    }
}
