//! The simulator's OpenAI chat completions format.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{role_of, BudgetState, ErrKind, RateState, SimRequest, SimUsage, Synthesized};
use crate::envelope::Message;

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default, alias = "max_completion_tokens")]
    max_tokens: Option<u32>,
    #[serde(default)]
    response_format: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    /// A string, or a list of `text` and `image_url` parts.
    #[serde(default)]
    content: Option<serde_json::Value>,
}

/// A turn's text and its images, as OpenAI's content parts carry them.
fn read_content(c: Option<serde_json::Value>) -> Result<(String, u32), String> {
    match c {
        None | Some(serde_json::Value::Null) => Ok((String::new(), 0)),
        Some(serde_json::Value::String(t)) => Ok((t, 0)),
        Some(serde_json::Value::Array(parts)) => {
            let (mut text, mut images) = (Vec::new(), 0);
            for p in parts {
                match p.get("type").and_then(|t| t.as_str()) {
                    Some("text") => text.push(p["text"].as_str().unwrap_or("").to_string()),
                    Some("image_url") => {
                        let url = p.pointer("/image_url/url").and_then(|u| u.as_str());
                        match url {
                            Some(u) if u.starts_with("data:image/") && u.contains(";base64,") => {}
                            Some(u) if u.starts_with("http") => {}
                            _ => return Err("image_url.url: a data: URL or http(s) URL".into()),
                        }
                        images += 1;
                    }
                    other => return Err(format!("content part type {other:?} not supported")),
                }
            }
            Ok((text.join("\n"), images))
        }
        Some(_) => Err("content: a string or a list of parts".into()),
    }
}

pub(super) fn parse(body: &[u8]) -> Result<SimRequest, String> {
    let req: ChatRequest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut images = 0;
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in req.messages {
        let (text, n) = read_content(m.content)?;
        images += n;
        messages.push(Message::text(role_of(&m.role), text));
    }
    Ok(SimRequest {
        model: req.model,
        messages,
        images,
        max_tokens: req.max_tokens.unwrap_or(4096),
        schema: match req.response_format {
            None => None,
            Some(rf) => match rf.get("type").and_then(|t| t.as_str()) {
                Some("json_object") => Some(serde_json::json!({"type": "object"})),
                Some("json_schema") => Some(
                    rf.pointer("/json_schema/schema")
                        .cloned()
                        .ok_or("response_format.json_schema.schema: missing")?,
                ),
                Some("text") => None,
                other => return Err(format!("response_format.type: unknown `{other:?}`")),
            },
        },
        answer_tool: None,
    })
}

pub(super) fn success(
    req: &SimRequest,
    s: &Synthesized,
    u: &SimUsage,
    at_ms: u64,
) -> serde_json::Value {
    let completion = u.visible + u.reasoning;
    serde_json::json!({
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
            "prompt_tokens": u.prompt,
            "completion_tokens": completion,
            "total_tokens": u.prompt + completion,
            "prompt_tokens_details": {"cached_tokens": u.cached},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning},
        }
    })
}

pub(super) fn error(kind: ErrKind, model: &str) -> Response {
    let (status, body) = error_body(kind, model);
    let mut resp = (status, Json(body)).into_response();
    if let ErrKind::RateLimited { wait } = kind {
        let h = resp.headers_mut();
        h.insert(
            "retry-after",
            HeaderValue::from(wait.as_secs_f64().ceil() as u64),
        );
        h.insert("retry-after-ms", HeaderValue::from(wait.as_millis() as u64));
    }
    resp
}

/// An error's status and body.
pub(super) fn error_body(kind: ErrKind, model: &str) -> (StatusCode, serde_json::Value) {
    let (status, kind_s, code, message) = match kind {
        ErrKind::RateLimited { wait } => (
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            Some("rate_limit_exceeded"),
            format!(
                "Rate limit reached for {model} in organization org-sim on requests per min (RPM). Please try again in {}ms.",
                wait.as_millis()
            ),
        ),
        ErrKind::Quota => (
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            Some("insufficient_quota"),
            "You exceeded your current quota, please check your plan and billing details.".into(),
        ),
        ErrKind::Overloaded => (
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            None,
            "The engine is currently overloaded, please try again later.".into(),
        ),
        ErrKind::Server => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!".into(),
        ),
        ErrKind::BadRequest => (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "Invalid request body.".into(),
        ),
        ErrKind::Unauthorized => (
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided.".into(),
        ),
    };
    let body = serde_json::json!({
        "error": {"message": message, "type": kind_s, "param": null, "code": code}
    });
    (status, body)
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, resets as Go durations.
pub(super) fn rate_headers(h: &mut HeaderMap, rate: &RateState) {
    for (what, b) in [("requests", rate.requests), ("tokens", rate.tokens)] {
        let Some(BudgetState {
            limit,
            remaining,
            reset,
        }) = b
        else {
            continue;
        };
        for (name, value) in [
            (format!("x-ratelimit-limit-{what}"), limit.to_string()),
            (
                format!("x-ratelimit-remaining-{what}"),
                remaining.to_string(),
            ),
            (
                format!("x-ratelimit-reset-{what}"),
                format!("{}ms", reset.as_millis()),
            ),
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
