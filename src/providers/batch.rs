//! The providers' batch APIs (half price, answered within 24 hours): submit
//! a batch of calls, list recent batches (to find one again after a crash),
//! poll one, stream its results, cancel it. One client per provider kind,
//! on the same [`HttpClient`] as real-time calls (key, timeouts, redaction).
//!
//! Result files are read as they arrive, line by line (a 200 MB file costs
//! a line's memory, not the file's), and every line is normalised by the
//! provider's own real-time parser (`parse_success`, `classify_error`), so a
//! batch answer has exactly the usage fields a real-time one has. A line
//! that cannot be read is counted as malformed and skipped, never fatal.
//! Gemini returns inline results inside the batch object (its inline input
//! is limited to 20 MB); they are read from that object.
//!
//! Wire shapes: `../shared/PROVIDERS.md` ("Batch APIs") and the official
//! SDKs (the simulator's batch endpoints follow them, `sim::batch`).

use reqwest::Method;
use serde_json::{json, Value};

use super::http::HttpClient;
use super::{anthropic, gemini, openai, CallError, CallRequest, CallResponse, ErrorClass};
use crate::config::{ProviderConfig, ProviderKind};

/// The metadata key (OpenAI) under which a batch carries our own batch id.
pub const TAG_KEY: &str = "switchyard_batch";

/// One request of a batch, under its `custom_id` (1–64 characters of
/// `[A-Za-z0-9_-]`, unique in the batch: Anthropic's rule, the strictest).
#[derive(Debug, Clone, Copy)]
pub struct BatchItem<'a> {
    pub custom_id: &'a str,
    pub request: &'a CallRequest,
}

/// Where a batch is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchState {
    /// Validating, queued or running.
    Running,
    /// Cancelling (OpenAI and Anthropic cancel asynchronously).
    Cancelling,
    Ended(BatchEnd),
}

/// How a batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchEnd {
    Completed,
    /// Past its window: OpenAI and Anthropic deliver what was answered,
    /// Gemini nothing.
    Expired,
    Cancelled,
    /// Refused as a whole (OpenAI validation, Gemini failure), with why.
    Failed(String),
}

/// A batch's request counts, as the provider reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
}

/// A polled batch.
#[derive(Debug, Clone)]
pub struct BatchStatus {
    pub id: String,
    pub state: BatchState,
    pub counts: BatchCounts,
    results: Results,
}

#[derive(Debug, Clone)]
enum Results {
    None,
    /// OpenAI's output and error files.
    Files(Vec<String>),
    /// Anthropic's `results_url`.
    Url(String),
    /// Gemini's batch object, holding the inline responses.
    Inline(Value),
}

/// A batch in a listing of recent ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSummary {
    pub id: String,
    /// Our own batch id, where the provider keeps one (OpenAI metadata,
    /// Gemini display name).
    pub tag: Option<String>,
    pub total: u64,
}

/// What became of one item.
#[derive(Debug)]
pub enum ItemOutcome {
    Answered(CallResponse),
    Failed(CallError),
    Expired,
    Cancelled,
}

/// One result line.
#[derive(Debug)]
pub struct ItemResult {
    pub custom_id: String,
    pub outcome: ItemOutcome,
}

/// What reading a batch's results came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Items read.
    pub items: u64,
    /// Lines that were not a readable result (counted, skipped).
    pub malformed: u64,
}

/// The kinds of batch API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    OpenAi,
    Anthropic,
    Gemini,
}

/// A provider's batch API.
#[derive(Debug, Clone)]
pub struct BatchClient {
    kind: Kind,
    http: HttpClient,
}

/// Longest result line read (a longer one is counted malformed).
const MAX_LINE: usize = 16 << 20;

impl BatchClient {
    /// The batch API of a configured provider (`None` for kinds without
    /// one: the in-process stand-in).
    pub fn from_config(name: &str, cfg: &ProviderConfig) -> anyhow::Result<Option<Self>> {
        let kind = match cfg.kind {
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => Kind::OpenAi,
            ProviderKind::Anthropic => Kind::Anthropic,
            ProviderKind::Gemini => Kind::Gemini,
            ProviderKind::Inproc => return Ok(None),
        };
        let key = cfg
            .api_key_env
            .as_deref()
            .and_then(|var| std::env::var(var).ok())
            .filter(|k| !k.is_empty())
            .map(super::Secret::new);
        let http = HttpClient::new(
            name,
            &cfg.base_url,
            key,
            cfg.timeout(),
            cfg.http2.then_some(1),
        )?
        .with_body_limit(cfg.max_response_bytes);
        Ok(Some(Self { kind, http }))
    }

    pub fn new(kind: Kind, http: HttpClient) -> Self {
        Self { kind, http }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if let Some(k) = self.http.key() {
            h.push(match self.kind {
                Kind::OpenAi => ("authorization", format!("Bearer {}", k.expose())),
                Kind::Anthropic => ("x-api-key", k.expose().to_string()),
                Kind::Gemini => ("x-goog-api-key", k.expose().to_string()),
            });
        }
        if self.kind == Kind::Anthropic {
            h.push(("anthropic-version", anthropic::API_VERSION.to_string()));
        }
        h
    }

    /// The provider's error for a non-2xx answer, free of the key.
    fn error(&self, status: u16, body: &[u8]) -> CallError {
        let mut e = match self.kind {
            Kind::OpenAi => openai::classify_error(status, body),
            Kind::Anthropic => anthropic::classify_error(status, body),
            Kind::Gemini => gemini::classify_error(status, body),
        };
        e.message = self.http.redact(&e.message);
        e
    }

    /// A JSON exchange: the answer's JSON on 2xx, else the provider's error.
    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Value, CallError> {
        let raw = self.http.send(method, path, &self.headers(), body).await?;
        if !(200..300).contains(&raw.status) {
            return Err(self.error(raw.status, &raw.body));
        }
        if raw.body.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_slice(&raw.body).map_err(|e| {
            CallError::new(
                ErrorClass::BadResponse,
                Some(raw.status),
                format!("{}: not JSON: {e}", self.http.name),
            )
        })
    }

    /// Submit `items` (all for `model`) as one batch tagged with our own id
    /// `tag`; returns the provider's batch id. OpenAI: the JSONL file is
    /// uploaded first, then the batch created with `metadata.switchyard_batch`;
    /// Gemini: inline requests under `displayName` = `tag`.
    pub async fn submit(
        &self,
        model: &str,
        tag: &str,
        items: &[BatchItem<'_>],
    ) -> Result<String, CallError> {
        match self.kind {
            Kind::OpenAi => {
                let mut jsonl = Vec::new();
                for it in items {
                    let line = json!({"custom_id": it.custom_id, "method": "POST",
                                      "url": "/v1/chat/completions",
                                      "body": openai::build_request(it.request)});
                    jsonl.extend_from_slice(line.to_string().as_bytes());
                    jsonl.push(b'\n');
                }
                let boundary = format!("switchyard-{:016x}", fastrand::u64(..));
                let mut form = Vec::with_capacity(jsonl.len() + 512);
                form.extend_from_slice(
                    format!(
                        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
                         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{tag}.jsonl\"\r\n\
                         Content-Type: application/jsonl\r\n\r\n"
                    )
                    .as_bytes(),
                );
                form.extend_from_slice(&jsonl);
                form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
                let ct = format!("multipart/form-data; boundary={boundary}");
                let file = self
                    .json(Method::POST, "/v1/files", Some((&ct, form)))
                    .await?;
                let file_id = str_at(&file, "/id").ok_or_else(|| bad(&file, "a file id"))?;
                let body = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                  "completion_window": "24h", "metadata": {TAG_KEY: tag}});
                let b = self.post(Method::POST, "/v1/batches", &body).await?;
                str_at(&b, "/id").ok_or_else(|| bad(&b, "a batch id"))
            }
            Kind::Anthropic => {
                let requests: Vec<Value> = items
                    .iter()
                    .map(|it| {
                        json!({"custom_id": it.custom_id,
                               "params": anthropic::build_request(it.request)})
                    })
                    .collect();
                let b = self
                    .post(
                        Method::POST,
                        "/v1/messages/batches",
                        &json!({"requests": requests}),
                    )
                    .await?;
                str_at(&b, "/id").ok_or_else(|| bad(&b, "a batch id"))
            }
            Kind::Gemini => {
                let requests: Vec<Value> = items
                    .iter()
                    .map(|it| {
                        json!({"request": gemini::build_batch_request(it.request),
                               "metadata": {"key": it.custom_id}})
                    })
                    .collect();
                let body = json!({"batch": {"displayName": tag,
                    "inputConfig": {"requests": {"requests": requests}}}});
                let path = format!("/v1beta/models/{model}:batchGenerateContent");
                let op = self.post(Method::POST, &path, &body).await?;
                let name = str_at(&op, "/name").ok_or_else(|| bad(&op, "a batch name"))?;
                Ok(name.trim_start_matches("batches/").to_string())
            }
        }
    }

    async fn post(&self, method: Method, path: &str, body: &Value) -> Result<Value, CallError> {
        self.json(
            method,
            path,
            Some(("application/json", body.to_string().into_bytes())),
        )
        .await
    }

    /// The most recent batches (newest first, up to `limit`), to find one
    /// submitted before a crash by its tag (OpenAI, Gemini) or by its size
    /// and age (Anthropic, which keeps no tag).
    pub async fn recent(&self, limit: usize) -> Result<Vec<BatchSummary>, CallError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        while out.len() < limit {
            let n = (limit - out.len()).min(100);
            let (path, list_ptr, cursor_ptr) = match self.kind {
                Kind::OpenAi => (
                    format!(
                        "/v1/batches?limit={n}{}",
                        after
                            .as_ref()
                            .map_or(String::new(), |a| format!("&after={a}"))
                    ),
                    "/data",
                    "/last_id",
                ),
                Kind::Anthropic => (
                    format!(
                        "/v1/messages/batches?limit={n}{}",
                        after
                            .as_ref()
                            .map_or(String::new(), |a| format!("&after_id={a}"))
                    ),
                    "/data",
                    "/last_id",
                ),
                Kind::Gemini => (
                    format!(
                        "/v1beta/batches?pageSize={n}{}",
                        after
                            .as_ref()
                            .map_or(String::new(), |a| format!("&pageToken={a}"))
                    ),
                    "/operations",
                    "/nextPageToken",
                ),
            };
            let page = self.json(Method::GET, &path, None).await?;
            let Some(items) = page.pointer(list_ptr).and_then(Value::as_array) else {
                break;
            };
            for b in items {
                out.push(self.summary(b));
            }
            let more = match self.kind {
                Kind::Gemini => page.pointer(cursor_ptr).is_some(),
                _ => page.pointer("/has_more").and_then(Value::as_bool) == Some(true),
            };
            after = str_at(&page, cursor_ptr);
            if !more || after.is_none() || items.is_empty() {
                break;
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    fn summary(&self, b: &Value) -> BatchSummary {
        let num = |p: &str| {
            b.pointer(p)
                .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
                .unwrap_or(0)
        };
        match self.kind {
            Kind::OpenAi => BatchSummary {
                id: str_at(b, "/id").unwrap_or_default(),
                tag: str_at(b, &format!("/metadata/{TAG_KEY}")),
                total: num("/request_counts/total"),
            },
            Kind::Anthropic => {
                let total = ["processing", "succeeded", "errored", "canceled", "expired"]
                    .iter()
                    .map(|k| num(&format!("/request_counts/{k}")))
                    .sum();
                BatchSummary {
                    id: str_at(b, "/id").unwrap_or_default(),
                    tag: None,
                    total,
                }
            }
            Kind::Gemini => BatchSummary {
                id: str_at(b, "/name")
                    .unwrap_or_default()
                    .trim_start_matches("batches/")
                    .to_string(),
                tag: str_at(b, "/metadata/displayName").filter(|s| !s.is_empty()),
                total: num("/metadata/batchStats/requestCount"),
            },
        }
    }

    /// Poll batch `id`.
    pub async fn status(&self, id: &str) -> Result<BatchStatus, CallError> {
        let path = match self.kind {
            Kind::OpenAi => format!("/v1/batches/{id}"),
            Kind::Anthropic => format!("/v1/messages/batches/{id}"),
            Kind::Gemini => format!("/v1beta/batches/{id}"),
        };
        let b = self.json(Method::GET, &path, None).await?;
        Ok(self.read_status(id, b))
    }

    fn read_status(&self, id: &str, b: Value) -> BatchStatus {
        let num = |p: &str| {
            b.pointer(p)
                .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
                .unwrap_or(0)
        };
        match self.kind {
            Kind::OpenAi => {
                let state = match b.pointer("/status").and_then(Value::as_str) {
                    Some("completed") => BatchState::Ended(BatchEnd::Completed),
                    Some("expired") => BatchState::Ended(BatchEnd::Expired),
                    Some("cancelled") => BatchState::Ended(BatchEnd::Cancelled),
                    Some("failed") => BatchState::Ended(BatchEnd::Failed(
                        str_at(&b, "/errors/data/0/message")
                            .unwrap_or_else(|| "the batch failed".into()),
                    )),
                    Some("cancelling") => BatchState::Cancelling,
                    _ => BatchState::Running,
                };
                let files = ["/output_file_id", "/error_file_id"]
                    .iter()
                    .filter_map(|p| str_at(&b, p))
                    .collect();
                BatchStatus {
                    id: id.to_string(),
                    counts: BatchCounts {
                        total: num("/request_counts/total"),
                        succeeded: num("/request_counts/completed"),
                        failed: num("/request_counts/failed"),
                    },
                    state,
                    results: Results::Files(files),
                }
            }
            Kind::Anthropic => {
                let ended =
                    b.pointer("/processing_status").and_then(Value::as_str) == Some("ended");
                let state = match b.pointer("/processing_status").and_then(Value::as_str) {
                    Some("ended")
                        if b.pointer("/cancel_initiated_at")
                            .is_some_and(|v| !v.is_null()) =>
                    {
                        BatchState::Ended(BatchEnd::Cancelled)
                    }
                    Some("ended") if num("/request_counts/expired") > 0 => {
                        BatchState::Ended(BatchEnd::Expired)
                    }
                    Some("ended") => BatchState::Ended(BatchEnd::Completed),
                    Some("canceling") => BatchState::Cancelling,
                    _ => BatchState::Running,
                };
                let failed = ["errored", "canceled", "expired"]
                    .iter()
                    .map(|k| num(&format!("/request_counts/{k}")))
                    .sum();
                let succeeded = num("/request_counts/succeeded");
                BatchStatus {
                    id: id.to_string(),
                    counts: BatchCounts {
                        total: succeeded + failed + num("/request_counts/processing"),
                        succeeded,
                        failed,
                    },
                    state,
                    results: match str_at(&b, "/results_url") {
                        Some(u) if ended => Results::Url(u),
                        _ => Results::None,
                    },
                }
            }
            Kind::Gemini => {
                let st = str_at(&b, "/metadata/state").unwrap_or_default();
                let st = st
                    .trim_start_matches("BATCH_STATE_")
                    .trim_start_matches("JOB_STATE_");
                let state = match st {
                    "SUCCEEDED" => BatchState::Ended(BatchEnd::Completed),
                    "EXPIRED" => BatchState::Ended(BatchEnd::Expired),
                    "CANCELLED" => BatchState::Ended(BatchEnd::Cancelled),
                    "FAILED" => BatchState::Ended(BatchEnd::Failed(
                        str_at(&b, "/error/message").unwrap_or_else(|| "the batch failed".into()),
                    )),
                    _ => BatchState::Running,
                };
                let total = num("/metadata/batchStats/requestCount");
                let counts = BatchCounts {
                    total,
                    succeeded: num("/metadata/batchStats/successfulRequestCount"),
                    failed: num("/metadata/batchStats/failedRequestCount"),
                };
                BatchStatus {
                    id: id.to_string(),
                    state,
                    counts,
                    results: Results::Inline(b),
                }
            }
        }
    }

    /// Ask the provider to cancel batch `id` (it ends later, cancelled, with
    /// what was answered by then).
    pub async fn cancel(&self, id: &str) -> Result<(), CallError> {
        let path = match self.kind {
            Kind::OpenAi => format!("/v1/batches/{id}/cancel"),
            Kind::Anthropic => format!("/v1/messages/batches/{id}/cancel"),
            Kind::Gemini => format!("/v1beta/batches/{id}:cancel"),
        };
        self.json(Method::POST, &path, None).await.map(|_| ())
    }

    /// Read the results of an ended batch, sending each item to `tx` as it
    /// is read (the receiver paces the reading; a dropped receiver stops it).
    pub async fn results(
        &self,
        status: &BatchStatus,
        tx: &tokio::sync::mpsc::Sender<ItemResult>,
    ) -> Result<Ingested, CallError> {
        let mut tally = Ingested::default();
        match &status.results {
            Results::None => {}
            Results::Inline(b) => {
                let empty = Vec::new();
                let items = b
                    .pointer("/metadata/output/inlinedResponses/inlinedResponses")
                    .and_then(Value::as_array)
                    .unwrap_or(&empty);
                for it in items {
                    match parse_line(self.kind, it) {
                        Some(r) => {
                            tally.items += 1;
                            if tx.send(r).await.is_err() {
                                break;
                            }
                        }
                        None => tally.malformed += 1,
                    }
                }
            }
            Results::Files(ids) => {
                for id in ids {
                    let path = format!("/v1/files/{id}/content");
                    self.stream_lines(&path, &mut tally, tx).await?;
                }
            }
            Results::Url(url) => {
                // The key goes only to the provider's own origin.
                let path = if self.http.same_origin(url) {
                    url.clone()
                } else {
                    format!("/v1/messages/batches/{}/results", status.id)
                };
                self.stream_lines(&path, &mut tally, tx).await?;
            }
        }
        Ok(tally)
    }

    async fn stream_lines(
        &self,
        path: &str,
        tally: &mut Ingested,
        tx: &tokio::sync::mpsc::Sender<ItemResult>,
    ) -> Result<(), CallError> {
        let mut resp = self
            .http
            .open_raw(Method::GET, path, &self.headers(), None)
            .await?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(self.error(status, &body));
        }
        let kind = self.kind;
        let read = |bytes: &[u8], tally: &mut Ingested, out: &mut Vec<ItemResult>| {
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return;
            }
            match serde_json::from_slice::<Value>(bytes)
                .ok()
                .and_then(|v| parse_line(kind, &v))
            {
                Some(r) => {
                    tally.items += 1;
                    out.push(r);
                }
                None => tally.malformed += 1,
            }
        };
        let mut buf: Vec<u8> = Vec::new();
        let mut skipping = false;
        let mut ready = Vec::new();
        loop {
            let chunk = resp
                .chunk()
                .await
                .map_err(|e| self.http.transport_error(&e, Some(status)))?;
            let Some(chunk) = chunk else { break };
            buf.extend_from_slice(&chunk);
            let Some(last) = buf.iter().rposition(|b| *b == b'\n') else {
                if buf.len() > MAX_LINE {
                    // A line longer than any answer: count it once, drop it.
                    if !skipping {
                        tally.malformed += 1;
                        skipping = true;
                    }
                    buf.clear();
                }
                continue;
            };
            for l in buf[..last].split(|b| *b == b'\n') {
                if skipping {
                    skipping = false;
                    continue;
                }
                read(l, tally, &mut ready);
            }
            buf.drain(..=last);
            for r in ready.drain(..) {
                if tx.send(r).await.is_err() {
                    return Ok(());
                }
            }
        }
        if !skipping {
            read(&buf, tally, &mut ready);
        }
        for r in ready {
            if tx.send(r).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}

fn str_at(v: &Value, p: &str) -> Option<String> {
    v.pointer(p).and_then(Value::as_str).map(str::to_string)
}

fn bad(v: &Value, what: &str) -> CallError {
    let text = v.to_string();
    CallError::new(
        ErrorClass::BadResponse,
        None,
        format!(
            "expected {what} in {}",
            &text[..text.floor_char_boundary(200)]
        ),
    )
}

/// The HTTP status an Anthropic error type stands for.
fn anthropic_status(kind: &str) -> u16 {
    match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => 500,
    }
}

/// One result line (or Gemini inline response) of a `kind` batch; `None`
/// when it is not a result. Pure.
pub fn parse_line(kind: Kind, v: &Value) -> Option<ItemResult> {
    let body_of = |v: &Value| v.to_string().into_bytes();
    match kind {
        Kind::OpenAi => {
            let custom_id = str_at(v, "/custom_id")?;
            let outcome = match (v.get("response"), v.get("error")) {
                (Some(r), _) if r.is_object() => {
                    let status = r.get("status_code")?.as_u64()? as u16;
                    let body = body_of(r.get("body")?);
                    if status == 200 {
                        match openai::parse_success(&body) {
                            Ok(resp) => ItemOutcome::Answered(CallResponse {
                                http_status: 200,
                                ..resp
                            }),
                            Err(e) => ItemOutcome::Failed(e),
                        }
                    } else {
                        ItemOutcome::Failed(openai::classify_error(status, &body))
                    }
                }
                (_, Some(e)) if e.is_object() => match str_at(e, "/code").as_deref() {
                    Some("batch_expired") => ItemOutcome::Expired,
                    Some("batch_cancelled") => ItemOutcome::Cancelled,
                    code => ItemOutcome::Failed(CallError::new(
                        if code == Some("request_timeout") {
                            ErrorClass::Timeout
                        } else {
                            ErrorClass::Server
                        },
                        None,
                        str_at(e, "/message").unwrap_or_else(|| "batch item failed".into()),
                    )),
                },
                _ => return None,
            };
            Some(ItemResult { custom_id, outcome })
        }
        Kind::Anthropic => {
            let custom_id = str_at(v, "/custom_id")?;
            let r = v.get("result")?;
            let outcome = match str_at(r, "/type")?.as_str() {
                "succeeded" => match anthropic::parse_success(&body_of(r.get("message")?)) {
                    Ok(resp) => ItemOutcome::Answered(CallResponse {
                        http_status: 200,
                        ..resp
                    }),
                    Err(e) => ItemOutcome::Failed(e),
                },
                "errored" => {
                    let err = r.get("error")?;
                    let kind = str_at(err, "/error/type").unwrap_or_default();
                    ItemOutcome::Failed(anthropic::classify_error(
                        anthropic_status(&kind),
                        &body_of(err),
                    ))
                }
                "expired" => ItemOutcome::Expired,
                "canceled" => ItemOutcome::Cancelled,
                _ => return None,
            };
            Some(ItemResult { custom_id, outcome })
        }
        Kind::Gemini => {
            let custom_id = str_at(v, "/metadata/key").or_else(|| str_at(v, "/key"))?;
            let outcome = if let Some(r) = v.get("response") {
                match gemini::parse_success(&body_of(r)) {
                    Ok(resp) => ItemOutcome::Answered(CallResponse {
                        http_status: 200,
                        ..resp
                    }),
                    Err(e) => ItemOutcome::Failed(e),
                }
            } else if let Some(e) = v.get("error") {
                let code = e.get("code").and_then(Value::as_u64).unwrap_or(500) as u16;
                ItemOutcome::Failed(gemini::classify_error(code, &body_of(&json!({"error": e}))))
            } else {
                return None;
            };
            Some(ItemResult { custom_id, outcome })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(r: Option<ItemResult>) -> (String, CallResponse) {
        match r {
            Some(ItemResult {
                custom_id,
                outcome: ItemOutcome::Answered(resp),
            }) => (custom_id, resp),
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn openai_lines_carry_real_time_usage_and_item_errors() {
        let ok = json!({"id": "r1", "custom_id": "c1", "error": null, "response": {"status_code": 200,
            "body": {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 4,
                               "prompt_tokens_details": {"cached_tokens": 6},
                               "completion_tokens_details": {"reasoning_tokens": 1}}}}});
        let (id, r) = answered(parse_line(Kind::OpenAi, &ok));
        assert_eq!((id.as_str(), r.text.as_str()), ("c1", "hi"));
        assert_eq!(
            (
                r.usage.input_tokens,
                r.usage.cached_input_tokens,
                r.usage.output_tokens
            ),
            (10, 6, 4)
        );
        assert_eq!(r.usage.reasoning_tokens, 1);
        let limited = json!({"custom_id": "c2", "response": {"status_code": 429,
            "body": {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}}});
        let Some(ItemResult {
            outcome: ItemOutcome::Failed(e),
            ..
        }) = parse_line(Kind::OpenAi, &limited)
        else {
            panic!()
        };
        assert!(e.retryable && e.class == ErrorClass::RateLimited);
        let expired = json!({"custom_id": "c3", "response": null, "error": {"code": "batch_expired", "message": "x"}});
        assert!(matches!(
            parse_line(Kind::OpenAi, &expired).unwrap().outcome,
            ItemOutcome::Expired
        ));
        let cancelled =
            json!({"custom_id": "c4", "response": null, "error": {"code": "batch_cancelled"}});
        assert!(matches!(
            parse_line(Kind::OpenAi, &cancelled).unwrap().outcome,
            ItemOutcome::Cancelled
        ));
        for junk in [
            json!({}),
            json!({"custom_id": "c5"}),
            json!([1]),
            json!({"custom_id": 7, "response": {}}),
        ] {
            assert!(parse_line(Kind::OpenAi, &junk).is_none(), "{junk}");
        }
    }

    #[test]
    fn anthropic_and_gemini_results_read_like_their_real_time_answers() {
        let ok = json!({"custom_id": "a1", "result": {"type": "succeeded", "message": {
            "id": "m", "type": "message", "role": "assistant", "model": "claude",
            "content": [{"type": "text", "text": "yes"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "cache_read_input_tokens": 5,
                      "cache_creation_input_tokens": 2, "output_tokens": 7}}}});
        let (_, r) = answered(parse_line(Kind::Anthropic, &ok));
        assert_eq!(r.usage.input_tokens, 10);
        assert_eq!(
            (
                r.usage.cached_input_tokens,
                r.usage.cache_write_input_tokens
            ),
            (5, 2)
        );
        let overloaded = json!({"custom_id": "a2", "result": {"type": "errored", "error": {
            "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}}});
        let Some(ItemResult {
            outcome: ItemOutcome::Failed(e),
            ..
        }) = parse_line(Kind::Anthropic, &overloaded)
        else {
            panic!()
        };
        assert!(e.retryable, "{e}");
        let bad = json!({"custom_id": "a3", "result": {"type": "errored", "error": {
            "type": "error", "error": {"type": "invalid_request_error", "message": "no"}}}});
        let Some(ItemResult {
            outcome: ItemOutcome::Failed(e),
            ..
        }) = parse_line(Kind::Anthropic, &bad)
        else {
            panic!()
        };
        assert!(!e.retryable);
        assert!(matches!(
            parse_line(
                Kind::Anthropic,
                &json!({"custom_id": "a4", "result": {"type": "expired"}})
            )
            .unwrap()
            .outcome,
            ItemOutcome::Expired
        ));
        let g = json!({"metadata": {"key": "g1"}, "response": {"candidates": [{"content": {"parts": [{"text": "ok"}]},
            "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 2,
            "thoughtsTokenCount": 3, "cachedContentTokenCount": 4}}});
        let (id, r) = answered(parse_line(Kind::Gemini, &g));
        assert_eq!(id, "g1");
        assert_eq!(
            (
                r.usage.input_tokens,
                r.usage.output_tokens,
                r.usage.cached_input_tokens
            ),
            (8, 5, 4)
        );
        let ge = json!({"metadata": {"key": "g2"}, "error": {"code": 400, "message": "bad"}});
        assert!(matches!(
            parse_line(Kind::Gemini, &ge).unwrap().outcome,
            ItemOutcome::Failed(_)
        ));
        assert!(parse_line(Kind::Gemini, &json!({"metadata": {"key": "g3"}})).is_none());
    }
}
