//! The simulator's Gemini generateContent format.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{role_of, ErrKind, SimRequest, SimUsage, Synthesized};
use crate::envelope::{Message, Role};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateRequest {
    contents: Vec<Content>,
    #[serde(default)]
    system_instruction: Option<Content>,
    #[serde(default)]
    generation_config: Option<GenerationConfig>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    #[serde(default)]
    text: String,
    #[serde(default)]
    inline_data: Option<serde_json::Value>,
    #[serde(default)]
    file_data: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(default)]
    max_output_tokens: Option<u32>,
    #[serde(default)]
    response_mime_type: Option<String>,
    #[serde(default)]
    response_json_schema: Option<serde_json::Value>,
    /// The OpenAPI-subset schema (`nullable`, upper-case types allowed).
    #[serde(default)]
    response_schema: Option<serde_json::Value>,
}

fn text(c: Content) -> String {
    c.parts.into_iter().map(|p| p.text).collect()
}

/// Images among a turn's parts (`inlineData` with `mimeType` and `data`,
/// `fileData` with `mimeType` and `fileUri`).
fn images(c: &Content) -> Result<u32, String> {
    let mut n = 0;
    for p in &c.parts {
        if let Some(d) = &p.inline_data {
            if !(d["mimeType"].is_string() && d["data"].is_string()) {
                return Err("inlineData: mimeType and data".into());
            }
            n += 1;
        }
        if let Some(f) = &p.file_data {
            if !(f["mimeType"].is_string() && f["fileUri"].is_string()) {
                return Err("fileData: mimeType and fileUri".into());
            }
            n += 1;
        }
    }
    Ok(n)
}

pub(super) fn parse(model: &str, body: &[u8]) -> Result<SimRequest, String> {
    let req: GenerateRequest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut messages = Vec::new();
    if let Some(s) = req.system_instruction {
        messages.push(Message {
            role: Role::System,
            content: text(s),
            parts: Vec::new(),
        });
    }
    let mut image_count = 0;
    for c in req.contents {
        image_count += images(&c)?;
        let role = role_of(c.role.as_deref().unwrap_or("user"));
        messages.push(Message {
            role,
            content: text(c),
            parts: Vec::new(),
        });
    }
    let g = req.generation_config;
    let json = g.as_ref().and_then(|g| g.response_mime_type.as_deref()) == Some("application/json");
    let schema = g
        .as_ref()
        .and_then(|g| g.response_json_schema.clone().or(g.response_schema.clone()));
    if schema.is_some() && !json {
        return Err(
            "generationConfig: a response schema needs responseMimeType application/json".into(),
        );
    }
    Ok(SimRequest {
        model: model.to_string(),
        messages,
        max_tokens: g.as_ref().and_then(|g| g.max_output_tokens).unwrap_or(8192),
        schema: if json {
            Some(schema.unwrap_or_else(|| serde_json::json!({"type": "object"})))
        } else {
            None
        },
        answer_tool: None,
        images: image_count,
    })
}

pub(super) fn success(req: &SimRequest, s: &Synthesized, u: &SimUsage) -> serde_json::Value {
    serde_json::json!({
        "candidates": [{
            "content": {"role": "model", "parts": [{"text": s.text}]},
            "finishReason": if s.finish_reason == "length" { "MAX_TOKENS" } else { "STOP" },
            "index": 0,
        }],
        "usageMetadata": {
            "promptTokenCount": u.prompt,
            "cachedContentTokenCount": u.cached,
            "candidatesTokenCount": u.visible,
            "thoughtsTokenCount": u.reasoning,
            "totalTokenCount": u.prompt + u.visible + u.reasoning,
        },
        "modelVersion": req.model,
    })
}

pub(super) fn error(kind: ErrKind, model: &str) -> Response {
    let (status, body) = error_body(kind, model);
    (status, Json(body)).into_response()
}

/// An error's status and body (`{"error": {"code", "message", "status", "details"}}`).
pub(super) fn error_body(kind: ErrKind, model: &str) -> (StatusCode, serde_json::Value) {
    let (code, status, message, delay) = match kind {
        ErrKind::RateLimited { wait } => (
            429,
            "RESOURCE_EXHAUSTED",
            format!(
                "Quota exceeded for metric: generate_content_requests_per_minute, model: {model}"
            ),
            Some(format!("{}s", wait.as_secs_f64())),
        ),
        ErrKind::Quota => (
            429,
            "RESOURCE_EXHAUSTED",
            format!("Quota exceeded for metric: generate_content_requests_per_day, model: {model}"),
            Some("43200s".to_string()),
        ),
        ErrKind::Overloaded => (
            503,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.".into(),
            None,
        ),
        ErrKind::Server => (
            500,
            "INTERNAL",
            "An internal error has occurred.".into(),
            None,
        ),
        ErrKind::BadRequest => (
            400,
            "INVALID_ARGUMENT",
            "Request contains an invalid argument.".into(),
            None,
        ),
        ErrKind::Unauthorized => (403, "PERMISSION_DENIED", "API key not valid.".into(), None),
    };
    let mut details = Vec::new();
    if let Some(d) = delay {
        details.push(serde_json::json!({
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests"}],
        }));
        details.push(serde_json::json!({
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": d,
        }));
    }
    let body = serde_json::json!({
        "error": {"code": code, "message": message, "status": status, "details": details}
    });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    )
}
