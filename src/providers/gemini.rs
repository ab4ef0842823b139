//! Google Gemini (`POST {base}/v1beta/models/{model}:generateContent`).
//!
//! The system prompt travels in `systemInstruction`; assistant turns have
//! role `model`. `promptTokenCount` includes cached tokens; thoughts are not
//! inside `candidatesTokenCount` and bill as output.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::headers::parse_go_duration;
use super::http::{body_snippet, interpret_with, HttpClient, RawResponse};
use super::{split_system, CallError, CallRequest, CallResponse, ErrorClass, RateInfo};
use crate::envelope::Role;
use crate::pricing::Usage;
use crate::structured::ResponseFormat;

/// A `retryDelay` longer than this means a daily quota: fail over rather than sleep.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct GeminiAdapter {
    http: HttpClient,
}

impl GeminiAdapter {
    pub fn new(http: HttpClient) -> Self {
        Self { http }
    }

    /// The call, its request already encoded (see [`HttpClient::exchange`]).
    pub fn call(
        &self,
        req: &CallRequest,
    ) -> impl std::future::Future<Output = Result<CallResponse, CallError>> + '_ {
        self.http.exchange(
            &format!("/v1beta/models/{}:generateContent", req.model),
            |k| ("x-goog-api-key", k.expose().to_string()),
            Vec::new(),
            &build_request(req),
            req.tag.as_deref(),
            interpret,
        )
    }
}

/// Turn an HTTP answer into a response or a typed error (pure).
pub fn interpret(raw: &RawResponse, now: SystemTime) -> Result<CallResponse, CallError> {
    interpret_with(raw, now, RateInfo::default(), parse_success, classify_error)
}

/// The generateContent request: system messages joined into `systemInstruction`.
pub fn build_request(req: &CallRequest) -> serde_json::Value {
    build(req, false)
}

/// The request as a batch item. A schema goes as `responseSchema` (the
/// OpenAPI subset) where it fits: `responseJsonSchema` inside batch
/// requests has been reported to come back malformed.
pub fn build_batch_request(req: &CallRequest) -> serde_json::Value {
    build(req, true)
}

fn build(req: &CallRequest, batch: bool) -> serde_json::Value {
    let (system, turns) = split_system(&req.messages);
    let contents: Vec<serde_json::Value> = turns
        .iter()
        .map(|m| {
            serde_json::json!({
                "role": if m.role == Role::Assistant { "model" } else { "user" },
                "parts": parts(m),
            })
        })
        .collect();
    let mut generation = serde_json::json!({ "maxOutputTokens": req.max_tokens });
    if let Some(t) = req.temperature {
        generation["temperature"] = serde_json::json!(t);
    }
    if let Some(rf) = &req.response_format {
        generation["responseMimeType"] = "application/json".into();
        if let ResponseFormat::JsonSchema { schema, .. } = rf {
            match batch
                .then(|| crate::structured::gemini_openapi_schema(schema))
                .flatten()
            {
                Some(openapi) => generation["responseSchema"] = openapi,
                None => generation["responseJsonSchema"] = schema.clone(),
            }
        }
    }
    let mut body = serde_json::json!({
        "contents": contents,
        "generationConfig": generation,
    });
    if let Some(system) = system {
        body["systemInstruction"] = serde_json::json!({"parts": [{"text": system}]});
    }
    body
}

/// A turn's parts: its text, or (with images) `text`, `inlineData` (base64)
/// and `fileData` (a URL) parts.
fn parts(m: &crate::envelope::Message) -> serde_json::Value {
    use crate::envelope::Part;
    if m.images().next().is_none() {
        return serde_json::json!([{"text": m.content}]);
    }
    m.parts
        .iter()
        .map(|p| match p {
            Part::Text { text } => serde_json::json!({"text": text}),
            Part::Image {
                url: Some(url),
                media_type,
                ..
            } => serde_json::json!({"fileData": {
                "mimeType": media_type.clone().unwrap_or_else(|| mime_of(url).to_string()),
                "fileUri": url}}),
            Part::Image {
                data, media_type, ..
            } => serde_json::json!({"inlineData": {"mimeType": media_type, "data": data}}),
        })
        .collect()
}

/// An image URL's media type, by its extension (JPEG when unknown).
fn mime_of(url: &str) -> &'static str {
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    match path.rsplit('.').next() {
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        _ => "image/jpeg",
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse {
    #[serde(default)]
    candidates: Vec<WireCandidate>,
    usage_metadata: WireUsage,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireCandidate {
    #[serde(default)]
    content: Option<WireContent>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireContent {
    #[serde(default)]
    parts: Vec<WirePart>,
}

#[derive(Debug, Deserialize)]
struct WirePart {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    cached_content_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
}

/// Parse a 200 body: the first candidate's non-thought text parts joined.
pub fn parse_success(bytes: &[u8]) -> Result<CallResponse, CallError> {
    let wire: WireResponse = serde_json::from_slice(bytes).map_err(|e| {
        CallError::new(
            ErrorClass::BadResponse,
            Some(200),
            format!("unparseable Gemini response: {e}"),
        )
    })?;
    let first = wire.candidates.into_iter().next();
    let finish_reason = first.as_ref().and_then(|c| c.finish_reason.clone());
    let text: String = first
        .and_then(|c| c.content)
        .map(|c| {
            c.parts
                .into_iter()
                .filter(|p| p.thought != Some(true))
                .filter_map(|p| p.text)
                .collect()
        })
        .unwrap_or_default();
    let u = wire.usage_metadata;
    Ok(CallResponse {
        text,
        finish_reason,
        usage: Usage {
            input_tokens: u.prompt_token_count,
            output_tokens: u.candidates_token_count + u.thoughts_token_count,
            cached_input_tokens: u.cached_content_token_count.min(u.prompt_token_count),
            cache_write_input_tokens: 0,
            reasoning_tokens: u.thoughts_token_count,
        },
        http_status: 200,
        rate: RateInfo::default(),
    })
}

#[derive(Debug, Deserialize)]
struct WireErrorBody {
    error: WireError,
}

#[derive(Debug, Deserialize)]
struct WireError {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    details: Vec<serde_json::Value>,
}

/// Map a non-200 answer to a typed error, reading `RetryInfo.retryDelay`.
pub fn classify_error(status: u16, body: &[u8]) -> CallError {
    let parsed = serde_json::from_slice::<WireErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let grpc = parsed
        .as_ref()
        .and_then(|e| e.status.clone())
        .unwrap_or_default();
    let message = parsed
        .as_ref()
        .and_then(|e| e.message.clone())
        .unwrap_or_else(|| body_snippet(body));
    let retry_delay = parsed.as_ref().and_then(|e| {
        e.details
            .iter()
            .filter(|d| {
                d.get("@type")
                    .and_then(|t| t.as_str())
                    .is_some_and(|t| t.ends_with("google.rpc.RetryInfo"))
            })
            .find_map(|d| d.get("retryDelay").and_then(|v| v.as_str()))
            .and_then(parse_retry_delay)
    });
    let class = match (status, grpc.as_str()) {
        (429, _) | (_, "RESOURCE_EXHAUSTED") => match retry_delay {
            Some(d) if d > MAX_RETRY_DELAY => ErrorClass::QuotaExceeded,
            _ => ErrorClass::RateLimited,
        },
        (401 | 403, _) | (_, "PERMISSION_DENIED" | "UNAUTHENTICATED") => ErrorClass::Auth,
        (408 | 409, _) => ErrorClass::Server,
        (s, _) if s >= 500 => ErrorClass::Server,
        _ => ErrorClass::BadRequest,
    };
    let message = if grpc.is_empty() {
        message
    } else {
        format!("{grpc}: {message}")
    };
    let mut err = CallError::new(class, Some(status), message);
    if err.retryable {
        err.retry_after = retry_delay;
    }
    err
}

/// A protobuf Duration in JSON: `"58s"`, `"1.5s"` (also tolerates Go-style `"1m"`).
/// Long delays are kept (unlike headers) so a daily quota can be recognised.
fn parse_retry_delay(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(secs) = s.strip_suffix('s').and_then(|n| n.parse::<f64>().ok()) {
        if (0.0..1e9).contains(&secs) {
            return Some(Duration::from_secs_f64(secs));
        }
        return None;
    }
    parse_go_duration(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Message;

    #[test]
    fn request_shape() {
        let req = CallRequest {
            model: "gemini-2.5-flash".into(),
            messages: vec![
                Message {
                    role: Role::System,
                    content: "be brief".into(),
                    parts: Vec::new(),
                },
                Message {
                    role: Role::User,
                    content: "hi".into(),
                    parts: Vec::new(),
                },
                Message {
                    role: Role::Assistant,
                    content: "hello".into(),
                    parts: Vec::new(),
                },
            ],
            max_tokens: 64,
            temperature: None,
            tag: None,
            ..Default::default()
        };
        let b = build_request(&req);
        assert_eq!(b["systemInstruction"]["parts"][0]["text"], "be brief");
        assert_eq!(b["contents"][1]["role"], "model");
        assert_eq!(b["generationConfig"]["maxOutputTokens"], 64);
        assert!(b["generationConfig"].get("temperature").is_none());
    }

    #[test]
    fn thoughts_bill_as_output() {
        let body = br#"{"candidates":[{"content":{"role":"model","parts":[{"text":"thinking...","thought":true},{"text":"Paris."}]},"finishReason":"STOP"}],
            "usageMetadata":{"promptTokenCount":120,"cachedContentTokenCount":100,"candidatesTokenCount":3,"thoughtsTokenCount":40,"totalTokenCount":163},
            "modelVersion":"gemini-2.5-flash"}"#;
        let r = parse_success(body).unwrap();
        assert_eq!(r.text, "Paris.");
        assert_eq!(r.finish_reason.as_deref(), Some("STOP"));
        assert_eq!(r.usage.input_tokens, 120);
        assert_eq!(r.usage.cached_input_tokens, 100);
        assert_eq!(r.usage.output_tokens, 43);
        assert_eq!(r.usage.reasoning_tokens, 40);
    }

    #[test]
    fn resource_exhausted_reads_retry_delay() {
        let body =
            br#"{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED",
            "details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[]},
                       {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"58s"}]}}"#;
        let e = classify_error(429, body);
        assert_eq!(e.class, ErrorClass::RateLimited);
        assert_eq!(e.retry_after, Some(Duration::from_secs(58)));
        let daily = br#"{"error":{"code":429,"message":"daily quota","status":"RESOURCE_EXHAUSTED",
            "details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"43200s"}]}}"#;
        let e = classify_error(429, daily);
        assert_eq!(e.class, ErrorClass::QuotaExceeded);
        assert!(!e.retryable);
        let unavailable =
            br#"{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}"#;
        assert!(classify_error(503, unavailable).retryable);
        let invalid = br#"{"error":{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}}"#;
        assert!(!classify_error(400, invalid).retryable);
        assert_eq!(
            classify_error(
                403,
                br#"{"error":{"code":403,"message":"no","status":"PERMISSION_DENIED"}}"#
            )
            .class,
            ErrorClass::Auth
        );
        assert_eq!(
            parse_success(b"{\"candidates\":[").unwrap_err().class,
            ErrorClass::BadResponse
        );
    }
}
