//! The providers' batch APIs on the simulator, in the shapes their official
//! SDKs read:
//!
//! - OpenAI: `POST /v1/files` (multipart, `purpose=batch`, a JSONL file of
//!   `{"custom_id","method","url","body"}` lines, one model per file),
//!   `GET /v1/files/{id}[/content]`, `POST /v1/batches`, `GET /v1/batches`,
//!   `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`;
//! - Anthropic Message Batches: `POST|GET /v1/messages/batches`,
//!   `GET|DELETE /v1/messages/batches/{id}`, `POST …/{id}/cancel`,
//!   `GET …/{id}/results` (JSONL, once ended; its `results_url`);
//! - Gemini Batch Mode: `POST /v1beta/models/{model}:batchGenerateContent`
//!   (inline requests), `GET /v1beta/batches[/{id}]`,
//!   `POST /v1beta/batches/{id}:cancel`, `DELETE /v1beta/batches/{id}`.
//!
//! A batch moves through its provider's states over `batch_ms` of the
//! format's profile (default 2 s). When it ends, every item is answered as
//! the real-time request would have been (the same text and usage, the
//! profile's error shares), recorded in the ledger with its batch id and
//! `custom_id`, and the results come back shuffled. Cancelling ends a batch
//! shortly after: the share of items processed by then is answered (and
//! billed), the rest cancelled. [`BatchFate::Expire`] makes a format's next
//! batch expire at its end: OpenAI delivers the answered half and lists the
//! rest as `batch_expired`, Anthropic reports them `expired`, Gemini
//! delivers nothing. [`BatchFate::Fail`] fails it (OpenAI `failed`, Gemini
//! `BATCH_STATE_FAILED`, Anthropic errors every item). An OpenAI file with a
//! line that is not a request, or more than one model, fails validation.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    answer_request, anthropic, gemini, has_auth, openai, random_error, usage_for, ErrKind, Format,
    LedgerEntry, SimRequest, SimState,
};

/// Default time from a batch's creation to its end, in milliseconds.
pub const DEFAULT_BATCH_MS: u64 = 2_000;

/// What happens to a format's next batch (queued with
/// [`super::SimServer::force_batch`] or `POST /control/force_batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchFate {
    /// Ends expired: half the items answered (none for Gemini).
    Expire,
    /// Ends failed, no item answered (Anthropic: every item errored).
    Fail,
    /// Completes, but its result file (OpenAI, Anthropic) also holds a cut
    /// line, a line that is not a result and one for an unknown `custom_id`.
    Garble,
}

/// The bad lines a [`BatchFate::Garble`] batch's results carry.
const GARBLE: &[u8] = b"{\"id\":\"batch_req_cut\",\"custom_id\":\"i0\",\"respo\n[1,2,3]\n{\"custom_id\":\"nobody-here\",\"result\":{\"type\":\"expired\"},\"response\":null,\"error\":{\"code\":\"batch_expired\"}}\n";

/// Which batch item a ledger entry answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct BatchTag {
    pub batch_id: String,
    pub custom_id: String,
}

/// Files and batches of all formats.
#[derive(Default)]
pub(super) struct Book {
    next: u64,
    files: HashMap<String, SimFile>,
    batches: BTreeMap<String, SimBatch>,
    fates: HashMap<Format, VecDeque<BatchFate>>,
    /// Status requests under way, per batch.
    polling: HashMap<String, u32>,
    /// Status requests answered, and the most seen at once for one batch.
    pub(super) polls: u64,
    pub(super) max_polls_at_once: u32,
}

impl Book {
    pub(super) fn force(&mut self, format: Format, fate: BatchFate) {
        self.fates.entry(format).or_default().push_back(fate);
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{:08x}{:04}", fastrand::u32(..), self.next)
    }
}

struct SimFile {
    id: String,
    filename: String,
    purpose: &'static str,
    bytes: Vec<u8>,
    created_at: u64,
}

impl SimFile {
    fn object(&self) -> Value {
        json!({"id": self.id, "object": "file", "bytes": self.bytes.len(),
               "created_at": self.created_at, "filename": self.filename,
               "purpose": self.purpose, "status": "processed", "expires_at": null})
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum End {
    Completed,
    Expired,
    Cancelled,
    Failed,
}

enum Outcome {
    Answered(Value),
    Errored(StatusCode, Value),
    Expired,
    Cancelled,
}

struct Ended {
    end: End,
    at: u64,
    /// Shuffled.
    results: Vec<(String, Outcome)>,
    output_file: Option<String>,
    error_file: Option<String>,
}

struct SimBatch {
    id: String,
    format: Format,
    created_ms: u64,
    created_at: u64,
    duration_ms: u64,
    model: String,
    metadata: Value,
    display_name: Option<String>,
    input_file_id: Option<String>,
    items: Vec<(String, Result<SimRequest, String>)>,
    /// OpenAI validation failure: message and line.
    invalid: Option<(String, usize)>,
    /// Its code (`invalid_request`, `token_limit_exceeded`).
    invalid_code: &'static str,
    cancel_at_ms: Option<u64>,
    fate: Option<BatchFate>,
    ended: Option<Ended>,
    deleted: bool,
    /// Whether the request that created it carried credentials.
    auth: bool,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

impl SimBatch {
    fn elapsed(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.created_ms)
    }

    /// Time from a cancel request to the batch's end: a fifth of its run.
    fn cancel_ms(&self) -> u64 {
        (self.duration_ms / 5).max(1)
    }

    /// When it ends (or ended), in the sim's milliseconds.
    fn end_ms(&self) -> u64 {
        if self.invalid.is_some() {
            return self.created_ms;
        }
        match self.cancel_at_ms {
            Some(c) => (c + self.cancel_ms()).min(self.created_ms + self.duration_ms),
            None => self.created_ms + self.duration_ms,
        }
    }

    fn running(&self) -> bool {
        self.ended.is_none()
    }
}

/// End `b` if its time has come: answer the items it processed, record them
/// in the ledger, build its result files.
fn settle(st: &SimState, book: &mut Book, id: &str) {
    let now_ms = st.started.elapsed().as_millis() as u64;
    let Some(b) = book.batches.get(id) else {
        return;
    };
    if !b.running() || now_ms < b.end_ms() {
        return;
    }
    let n = b.items.len();
    let (end, processed) = if b.invalid.is_some() {
        (End::Failed, 0)
    } else if let Some(c) = b.cancel_at_ms {
        if c + b.cancel_ms() >= b.created_ms + b.duration_ms {
            (End::Completed, n)
        } else {
            let share = b.elapsed(c) as f64 / b.duration_ms.max(1) as f64;
            (End::Cancelled, (n as f64 * share).floor() as usize)
        }
    } else {
        match b.fate {
            None | Some(BatchFate::Garble) => (End::Completed, n),
            Some(BatchFate::Expire) if b.format == Format::Gemini => (End::Expired, 0),
            Some(BatchFate::Expire) => (End::Expired, n.div_ceil(2)),
            Some(BatchFate::Fail) if b.format == Format::Anthropic => (End::Completed, 0),
            Some(BatchFate::Fail) => (End::Failed, 0),
        }
    };
    let p = st.profile.for_format(b.format);
    let mut results = Vec::with_capacity(n);
    let mut ledger = Vec::new();
    for (i, (custom_id, req)) in b.items.iter().enumerate() {
        let outcome = if i >= processed {
            match (end, b.fate) {
                (End::Cancelled, _) => Outcome::Cancelled,
                (End::Completed, Some(BatchFate::Fail)) => {
                    let (status, body) = error_body(b.format, ErrKind::Server, &b.model);
                    Outcome::Errored(status, body)
                }
                _ => Outcome::Expired,
            }
        } else {
            match req {
                Err(why) => {
                    let (status, mut body) = error_body(b.format, ErrKind::BadRequest, "");
                    if let Some(m) = body.pointer_mut("/error/message") {
                        *m = Value::String(format!("invalid request: {why}"));
                    }
                    Outcome::Errored(status, body)
                }
                Ok(r) => {
                    let s = answer_request(p, r);
                    let mut entry = LedgerEntry {
                        seq: 0,
                        format: b.format,
                        model: r.model.clone(),
                        status: 200,
                        prompt_tokens: s.prompt_tokens,
                        completion_tokens: 0,
                        max_tokens: u64::from(r.max_tokens),
                        cached_tokens: 0,
                        cache_write_tokens: 0,
                        reasoning_tokens: 0,
                        at_ms: now_ms,
                        has_auth: b.auth,
                        retry_after_ms: None,
                        in_flight: 0,
                        call: None,
                        batch: Some(BatchTag {
                            batch_id: b.id.clone(),
                            custom_id: custom_id.clone(),
                        }),
                        images: r.images,
                    };
                    let outcome = match random_error(p, &r.model) {
                        Some(kind) => {
                            let (status, body) = error_body(b.format, kind, &r.model);
                            entry.status = status.as_u16();
                            Outcome::Errored(status, body)
                        }
                        None => {
                            let u = usage_for(p, b.format, &s);
                            entry.completion_tokens = u.visible + u.reasoning;
                            entry.cached_tokens = u.cached;
                            entry.cache_write_tokens = u.cache_write;
                            entry.reasoning_tokens = u.reasoning;
                            Outcome::Answered(match b.format {
                                Format::Openai => openai::success(r, &s, &u, now_ms),
                                Format::Anthropic => anthropic::success(r, &s, &u, now_ms),
                                Format::Gemini => gemini::success(r, &s, &u),
                            })
                        }
                    };
                    ledger.push(entry);
                    outcome
                }
            }
        };
        results.push((custom_id.clone(), outcome));
    }
    fastrand::shuffle(&mut results);
    let (format, batch_id, garble) = (b.format, b.id.clone(), b.fate == Some(BatchFate::Garble));
    let mut ended = Ended {
        end,
        at: unix_now(),
        results,
        output_file: None,
        error_file: None,
    };
    if format == Format::Openai && end != End::Failed {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for (k, (custom_id, o)) in ended.results.iter().enumerate() {
            let req_id = format!("batch_req_{batch_id}_{k}");
            let line = match o {
                Outcome::Answered(body) => json!({"id": req_id, "custom_id": custom_id,
                    "response": {"status_code": 200, "request_id": format!("req_{k}"), "body": body},
                    "error": null}),
                Outcome::Errored(status, body) => json!({"id": req_id, "custom_id": custom_id,
                    "response": {"status_code": status.as_u16(), "request_id": format!("req_{k}"), "body": body},
                    "error": null}),
                Outcome::Expired => json!({"id": req_id, "custom_id": custom_id, "response": null,
                    "error": {"code": "batch_expired",
                              "message": "This request could not be executed before the completion window expired."}}),
                Outcome::Cancelled => {
                    json!({"id": req_id, "custom_id": custom_id, "response": null,
                    "error": {"code": "batch_cancelled",
                              "message": "This request was not executed because the batch was cancelled."}})
                }
            };
            let target = if matches!(o, Outcome::Answered(_)) {
                &mut out
            } else {
                &mut err
            };
            target.extend_from_slice(line.to_string().as_bytes());
            target.push(b'\n');
        }
        if garble {
            out.extend_from_slice(GARBLE);
        }
        for (bytes, slot) in [(out, &mut ended.output_file), (err, &mut ended.error_file)] {
            if !bytes.is_empty() {
                let id = book.id("file-");
                book.files.insert(
                    id.clone(),
                    SimFile {
                        id: id.clone(),
                        filename: format!("{batch_id}_output.jsonl"),
                        purpose: "batch_output",
                        bytes,
                        created_at: unix_now(),
                    },
                );
                *slot = Some(id);
            }
        }
    }
    if let Ok(mut l) = st.ledger.lock() {
        for mut e in ledger {
            e.seq = l.len() as u64 + 1;
            l.push(e);
        }
    }
    if let Some(b) = book.batches.get_mut(&batch_id) {
        b.ended = Some(ended);
    }
}

fn error_body(format: Format, kind: ErrKind, model: &str) -> (StatusCode, Value) {
    match format {
        Format::Openai => openai::error_body(kind, model),
        Format::Anthropic => anthropic::error_body(kind, model),
        Format::Gemini => gemini::error_body(kind, model),
    }
}

fn now_ms(st: &SimState) -> u64 {
    st.started.elapsed().as_millis() as u64
}

/// Create a batch of `items` and return its id.
fn create(
    st: &SimState,
    headers: &HeaderMap,
    format: Format,
    model: String,
    items: Vec<(String, Result<SimRequest, String>)>,
    setup: impl FnOnce(&mut SimBatch),
) -> String {
    let mut book = st.batches.lock().expect("batch book");
    let prefix = match format {
        Format::Openai => "batch_",
        Format::Anthropic => "msgbatch_",
        Format::Gemini => "",
    };
    let id = book.id(prefix);
    let fate = book.fates.get_mut(&format).and_then(VecDeque::pop_front);
    let mut b = SimBatch {
        id: id.clone(),
        format,
        created_ms: now_ms(st),
        created_at: unix_now(),
        duration_ms: st
            .profile
            .for_format(format)
            .batch_ms
            .unwrap_or(DEFAULT_BATCH_MS),
        model,
        metadata: Value::Null,
        display_name: None,
        input_file_id: None,
        items,
        invalid: None,
        invalid_code: "invalid_request",
        cancel_at_ms: None,
        fate,
        ended: None,
        deleted: false,
        auth: has_auth(headers),
    };
    setup(&mut b);
    book.batches.insert(id.clone(), b);
    id
}

/// A status request on a batch, counted while it lasts (so tests can see
/// whether two workers ever poll one batch at once); it takes the
/// profile's `batch_poll_ms`.
struct PollSpan<'a> {
    st: &'a SimState,
    id: String,
}

impl<'a> PollSpan<'a> {
    async fn start(st: &'a SimState, format: Format, id: &str) -> PollSpan<'a> {
        if let Ok(mut book) = st.batches.lock() {
            book.polls += 1;
            let n = book.polling.entry(id.to_string()).or_default();
            *n += 1;
            let n = *n;
            book.max_polls_at_once = book.max_polls_at_once.max(n);
        }
        let span = PollSpan {
            st,
            id: id.to_string(),
        };
        if let Some(ms) = st.profile.for_format(format).batch_poll_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        span
    }
}

impl Drop for PollSpan<'_> {
    fn drop(&mut self) {
        if let Ok(mut book) = self.st.batches.lock() {
            if let Some(n) = book.polling.get_mut(&self.id) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// Prompt tokens of a request, as the sim counts them.
fn prompt_tokens(r: &SimRequest) -> u64 {
    3 + r
        .messages
        .iter()
        .map(|m| super::count_tokens(&m.content) + 4)
        .sum::<u64>()
}

/// What waits in `format`'s unfinished batches (of `model`, if given):
/// prompt tokens and requests.
fn queued(st: &SimState, format: Format, model: Option<&str>) -> (u64, u64) {
    let mut book = st.batches.lock().expect("batch book");
    let ids: Vec<String> = book.batches.keys().cloned().collect();
    for id in &ids {
        settle(st, &mut book, id);
    }
    book.batches
        .values()
        .filter(|b| b.format == format && b.running() && b.invalid.is_none())
        .flat_map(|b| b.items.iter())
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter(|r| model.is_none_or(|m| r.model == m))
        .fold((0, 0), |(t, n), r| (t + prompt_tokens(r), n + 1))
}

/// Look at batch `id` of `format` after settling it.
fn with_batch<T>(
    st: &SimState,
    format: Format,
    id: &str,
    f: impl FnOnce(&mut SimBatch, u64) -> T,
) -> Option<T> {
    let mut book = st.batches.lock().expect("batch book");
    settle(st, &mut book, id);
    let now = now_ms(st);
    book.batches
        .get_mut(id)
        .filter(|b| b.format == format && !b.deleted)
        .map(|b| f(b, now))
}

fn not_found(format: Format, what: &str) -> Response {
    let body = match format {
        Format::Openai => json!({"error": {"message": format!("No such {what}"),
            "type": "invalid_request_error", "param": null, "code": null}}),
        Format::Anthropic => json!({"type": "error",
            "error": {"type": "not_found_error", "message": format!("{what} not found")}}),
        Format::Gemini => json!({"error": {"code": 404, "message": format!("{what} not found"),
            "status": "NOT_FOUND"}}),
    };
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

fn bad_request(format: Format, message: String) -> Response {
    let (status, mut body) = error_body(format, ErrKind::BadRequest, "");
    for ptr in ["/error/message"] {
        if let Some(m) = body.pointer_mut(ptr) {
            *m = Value::String(message.clone());
        }
    }
    (status, Json(body)).into_response()
}

// ---------------------------------------------------------------- OpenAI

/// One part of a `multipart/form-data` body: name, filename, content.
type Part = (String, Option<String>, Vec<u8>);

/// The parts of a `multipart/form-data` body.
fn multipart(content_type: &str, body: &[u8]) -> Option<Vec<Part>> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))?
        .trim_matches('"');
    let delim = format!("--{boundary}").into_bytes();
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let mut parts = Vec::new();
    let mut at = find(body, &delim, 0)? + delim.len();
    loop {
        if body.get(at..at + 2) == Some(b"--") {
            return Some(parts);
        }
        let start = at + 2; // CRLF after the delimiter
        let head_end = find(body, b"\r\n\r\n", start)?;
        let head = String::from_utf8_lossy(body.get(start..head_end)?).to_string();
        let mut next_delim = b"\r\n".to_vec();
        next_delim.extend_from_slice(&delim);
        let content_end = find(body, &next_delim, head_end + 4)?;
        let disposition = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))?;
        let field = |key: &str| {
            disposition.split(';').map(str::trim).find_map(|p| {
                p.strip_prefix(&format!("{key}="))
                    .map(|v| v.trim_matches('"').to_string())
            })
        };
        parts.push((
            field("name")?,
            field("filename"),
            body.get(head_end + 4..content_end)?.to_vec(),
        ));
        at = content_end + next_delim.len();
    }
}

pub(super) async fn openai_upload(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(parts) = multipart(ct, &body) else {
        return bad_request(Format::Openai, "expected multipart/form-data".into());
    };
    let purpose = parts
        .iter()
        .find(|p| p.0 == "purpose")
        .map(|p| String::from_utf8_lossy(&p.2).to_string());
    if purpose.as_deref() != Some("batch") {
        return bad_request(Format::Openai, "purpose must be `batch`".into());
    }
    let Some((_, filename, bytes)) = parts.into_iter().find(|p| p.0 == "file") else {
        return bad_request(Format::Openai, "missing `file`".into());
    };
    let mut book = st.batches.lock().expect("batch book");
    let id = book.id("file-");
    let file = SimFile {
        id: id.clone(),
        filename: filename.unwrap_or_else(|| "upload.jsonl".into()),
        purpose: "batch",
        bytes,
        created_at: unix_now(),
    };
    let object = file.object();
    book.files.insert(id, file);
    Json(object).into_response()
}

pub(super) async fn openai_file(
    State(st): State<Arc<SimState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let book = st.batches.lock().expect("batch book");
    match book.files.get(&id) {
        Some(f) => Json(f.object()).into_response(),
        None => not_found(Format::Openai, "file"),
    }
}

pub(super) async fn openai_file_content(
    State(st): State<Arc<SimState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let book = st.batches.lock().expect("batch book");
    match book.files.get(&id) {
        Some(f) => (
            StatusCode::OK,
            [("content-type", "application/octet-stream")],
            f.bytes.clone(),
        )
            .into_response(),
        None => not_found(Format::Openai, "file"),
    }
}

#[derive(Deserialize)]
pub(super) struct OpenaiCreate {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

/// The requests of an OpenAI batch input file: (custom_id, request), the
/// model, or why the file fails validation (message, line).
type OpenaiInput = (Vec<(String, Result<SimRequest, String>)>, String);

fn openai_lines(bytes: &[u8]) -> Result<OpenaiInput, (String, usize)> {
    #[derive(Deserialize)]
    struct Line {
        custom_id: String,
        method: String,
        url: String,
        body: Value,
    }
    let mut items = Vec::new();
    let mut model: Option<String> = None;
    let mut seen = std::collections::HashSet::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line = i + 1;
        let l: Line = serde_json::from_slice(raw)
            .map_err(|e| (format!("line {line} is not a valid request: {e}"), line))?;
        if l.method != "POST" || l.url != "/v1/chat/completions" {
            return Err((
                format!("line {line}: only POST /v1/chat/completions is supported"),
                line,
            ));
        }
        if !seen.insert(l.custom_id.clone()) {
            return Err((
                format!("line {line}: duplicate custom_id `{}`", l.custom_id),
                line,
            ));
        }
        let req = openai::parse(l.body.to_string().as_bytes());
        if let Ok(r) = &req {
            match &model {
                None => model = Some(r.model.clone()),
                Some(m) if *m != r.model => {
                    return Err((
                        format!("line {line}: a batch file may use only one model (`{m}`)"),
                        line,
                    ))
                }
                Some(_) => {}
            }
        }
        items.push((l.custom_id, req));
    }
    if items.is_empty() {
        return Err(("the input file has no requests".into(), 0));
    }
    Ok((items, model.unwrap_or_default()))
}

pub(super) async fn openai_create(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    Json(req): Json<OpenaiCreate>,
) -> Response {
    if req.endpoint != "/v1/chat/completions" || req.completion_window != "24h" {
        return bad_request(
            Format::Openai,
            "endpoint must be /v1/chat/completions and completion_window 24h".into(),
        );
    }
    let bytes = {
        let book = st.batches.lock().expect("batch book");
        match book.files.get(&req.input_file_id) {
            Some(f) if f.purpose == "batch" => f.bytes.clone(),
            _ => return not_found(Format::Openai, "input file"),
        }
    };
    let parsed = openai_lines(&bytes);
    let (items, model, mut invalid) = match parsed {
        Ok((items, model)) => (items, model, None),
        Err(e) => (Vec::new(), String::new(), Some(e)),
    };
    let mut code = "invalid_request";
    if let (None, Some(cap)) = (
        &invalid,
        st.profile
            .for_format(Format::Openai)
            .batch_queue_tokens
            .filter(|c| *c > 0),
    ) {
        let (waiting, _) = queued(&st, Format::Openai, Some(&model));
        let this: u64 = items
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .map(prompt_tokens)
            .sum();
        if waiting + this > cap {
            code = "token_limit_exceeded";
            invalid = Some((
                format!(
                    "Enqueued token limit reached for {model} in organization org-sim. \
                     Limit: {cap} enqueued tokens. Please try again once some in_progress \
                     batches have been completed."
                ),
                0,
            ));
        }
    }
    let id = create(&st, &headers, Format::Openai, model, items, |b| {
        b.input_file_id = Some(req.input_file_id.clone());
        b.metadata = req.metadata.as_ref().map_or(Value::Null, |m| json!(m));
        b.invalid = invalid;
        b.invalid_code = code;
    });
    openai_show(&st, &id)
}

fn openai_object(b: &SimBatch, now: u64) -> Value {
    let share = b.elapsed(now) as f64 / b.duration_ms.max(1) as f64;
    let status = match (&b.ended, b.cancel_at_ms) {
        (Some(e), _) => match e.end {
            End::Completed => "completed",
            End::Expired => "expired",
            End::Cancelled => "cancelled",
            End::Failed => "failed",
        },
        (None, Some(_)) => "cancelling",
        (None, None) if share < 0.1 => "validating",
        (None, None) if share < 0.9 => "in_progress",
        (None, None) => "finalizing",
    };
    let (completed, failed) = b.ended.as_ref().map_or((0, 0), |e| {
        let ok = e
            .results
            .iter()
            .filter(|r| matches!(r.1, Outcome::Answered(_)))
            .count();
        (ok, e.results.len() - ok)
    });
    let at = |end: End| {
        b.ended
            .as_ref()
            .filter(|e| e.end == end)
            .map(|e| json!(e.at))
            .unwrap_or(Value::Null)
    };
    let errors = b.invalid.as_ref().map_or(Value::Null, |(message, line)| {
        json!({"object": "list", "data": [{"code": b.invalid_code, "line": line,
                                            "message": message, "param": null}]})
    });
    json!({
        "id": b.id, "object": "batch", "endpoint": "/v1/chat/completions",
        "model": if b.model.is_empty() { Value::Null } else { json!(b.model) },
        "errors": errors, "input_file_id": b.input_file_id, "completion_window": "24h",
        "status": status,
        "output_file_id": b.ended.as_ref().and_then(|e| e.output_file.clone()),
        "error_file_id": b.ended.as_ref().and_then(|e| e.error_file.clone()),
        "created_at": b.created_at,
        "in_progress_at": (b.invalid.is_none() && share >= 0.1).then_some(b.created_at),
        "expires_at": b.created_at + 86_400,
        "finalizing_at": null,
        "completed_at": at(End::Completed), "failed_at": at(End::Failed),
        "expired_at": at(End::Expired), "cancelled_at": at(End::Cancelled),
        "cancelling_at": b.cancel_at_ms.map(|_| b.created_at),
        "request_counts": {"total": b.items.len(), "completed": completed, "failed": failed},
        "metadata": b.metadata,
    })
}

fn openai_show(st: &SimState, id: &str) -> Response {
    with_batch(st, Format::Openai, id, |b, now| {
        Json(openai_object(b, now)).into_response()
    })
    .unwrap_or_else(|| not_found(Format::Openai, "batch"))
}

pub(super) async fn openai_get(
    State(st): State<Arc<SimState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let _span = PollSpan::start(&st, Format::Openai, &id).await;
    openai_show(&st, &id)
}

pub(super) async fn openai_cancel(
    State(st): State<Arc<SimState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    with_batch(&st, Format::Openai, &id, |b, now| {
        if b.running() && b.cancel_at_ms.is_none() {
            b.cancel_at_ms = Some(now);
        }
        Json(openai_object(b, now)).into_response()
    })
    .unwrap_or_else(|| not_found(Format::Openai, "batch"))
}

#[derive(Deserialize)]
pub(super) struct Page {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    after_id: Option<String>,
    #[serde(default)]
    before_id: Option<String>,
    #[serde(default, rename = "pageSize")]
    page_size: Option<usize>,
    #[serde(default, rename = "pageToken")]
    page_token: Option<String>,
}

/// The ids of `format`'s batches, newest first, settled.
fn ids_newest_first(st: &SimState, format: Format) -> Vec<String> {
    let mut book = st.batches.lock().expect("batch book");
    let mut ids: Vec<(u64, String)> = book
        .batches
        .values()
        .filter(|b| b.format == format && !b.deleted)
        .map(|b| (b.created_ms, b.id.clone()))
        .collect();
    ids.sort_by(|a, b| b.cmp(a));
    for (_, id) in &ids {
        settle(st, &mut book, id);
    }
    ids.into_iter().map(|(_, id)| id).collect()
}

/// The page of `ids` after `after` (exclusive), `limit` long, and whether more follow.
fn page(ids: &[String], after: Option<&str>, limit: usize) -> (Vec<String>, bool) {
    let start = after
        .and_then(|a| ids.iter().position(|i| i == a).map(|p| p + 1))
        .unwrap_or(0);
    let rest = ids.get(start..).unwrap_or(&[]);
    let n = limit.clamp(1, 1000);
    (rest.iter().take(n).cloned().collect(), rest.len() > n)
}

pub(super) async fn openai_list(
    State(st): State<Arc<SimState>>,
    Query(q): Query<Page>,
) -> Response {
    let ids = ids_newest_first(&st, Format::Openai);
    let (ids, has_more) = page(&ids, q.after.as_deref(), q.limit.unwrap_or(20));
    let data: Vec<Value> = ids
        .iter()
        .filter_map(|id| with_batch(&st, Format::Openai, id, |b, now| openai_object(b, now)))
        .collect();
    Json(
        json!({"object": "list", "first_id": ids.first(), "last_id": ids.last(),
                "has_more": has_more, "data": data}),
    )
    .into_response()
}

// ------------------------------------------------------------- Anthropic

#[derive(Deserialize)]
pub(super) struct AnthropicCreate {
    requests: Vec<AnthropicItem>,
}

#[derive(Deserialize)]
struct AnthropicItem {
    custom_id: String,
    params: Value,
}

fn valid_custom_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub(super) async fn anthropic_create(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let req: AnthropicCreate = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(Format::Anthropic, format!("requests: {e}")),
    };
    if req.requests.is_empty() || req.requests.len() > 100_000 {
        return bad_request(Format::Anthropic, "requests: 1 to 100,000 requests".into());
    }
    let mut seen = std::collections::HashSet::new();
    for r in &req.requests {
        if !valid_custom_id(&r.custom_id) || !seen.insert(r.custom_id.as_str()) {
            return bad_request(
                Format::Anthropic,
                format!(
                    "custom_id `{}`: 1-64 characters of [A-Za-z0-9_-], unique in the batch",
                    r.custom_id
                ),
            );
        }
    }
    if let Some(cap) = st
        .profile
        .for_format(Format::Anthropic)
        .batch_queue_requests
        .filter(|c| *c > 0)
    {
        let (_, waiting) = queued(&st, Format::Anthropic, None);
        if waiting + req.requests.len() as u64 > cap {
            let (status, mut body) = error_body(
                Format::Anthropic,
                ErrKind::RateLimited {
                    wait: Duration::from_secs(30),
                },
                "",
            );
            if let Some(m) = body.pointer_mut("/error/message") {
                *m = Value::String(format!(
                    "Number of batch requests queued ({waiting}) plus this batch exceeds \
                     your limit of {cap}."
                ));
            }
            return (status, Json(body)).into_response();
        }
    }
    let items = req
        .requests
        .into_iter()
        .map(|r| {
            let parsed = anthropic::parse(r.params.to_string().as_bytes());
            (r.custom_id, parsed)
        })
        .collect();
    let id = create(
        &st,
        &headers,
        Format::Anthropic,
        String::new(),
        items,
        |_| {},
    );
    anthropic_show(&st, &id, &headers)
}

fn anthropic_object(b: &SimBatch, headers: &HeaderMap) -> Value {
    let status = match (&b.ended, b.cancel_at_ms) {
        (Some(_), _) => "ended",
        (None, Some(_)) => "canceling",
        (None, None) => "in_progress",
    };
    let mut counts =
        json!({"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0});
    match &b.ended {
        None => counts["processing"] = json!(b.items.len()),
        Some(e) => {
            for (_, o) in &e.results {
                let k = match o {
                    Outcome::Answered(_) => "succeeded",
                    Outcome::Errored(..) => "errored",
                    Outcome::Cancelled => "canceled",
                    Outcome::Expired => "expired",
                };
                counts[k] = json!(counts[k].as_u64().unwrap_or(0) + 1);
            }
        }
    }
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    json!({
        "id": b.id, "type": "message_batch", "processing_status": status,
        "request_counts": counts,
        "created_at": rfc3339(b.created_at), "expires_at": rfc3339(b.created_at + 86_400),
        "ended_at": b.ended.as_ref().map(|e| rfc3339(e.at)),
        "cancel_initiated_at": b.cancel_at_ms.map(|_| rfc3339(b.created_at)),
        "archived_at": null,
        "results_url": b.ended.as_ref().map(|_| format!("http://{host}/v1/messages/batches/{}/results", b.id)),
    })
}

fn anthropic_show(st: &SimState, id: &str, headers: &HeaderMap) -> Response {
    with_batch(st, Format::Anthropic, id, |b, _| {
        Json(anthropic_object(b, headers)).into_response()
    })
    .unwrap_or_else(|| not_found(Format::Anthropic, "batch"))
}

pub(super) async fn anthropic_get(
    State(st): State<Arc<SimState>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let _span = PollSpan::start(&st, Format::Anthropic, &id).await;
    anthropic_show(&st, &id, &headers)
}

pub(super) async fn anthropic_cancel(
    State(st): State<Arc<SimState>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    with_batch(&st, Format::Anthropic, &id, |b, now| {
        if b.running() && b.cancel_at_ms.is_none() {
            b.cancel_at_ms = Some(now);
        }
        Json(anthropic_object(b, &headers)).into_response()
    })
    .unwrap_or_else(|| not_found(Format::Anthropic, "batch"))
}

pub(super) async fn anthropic_delete(
    State(st): State<Arc<SimState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    with_batch(&st, Format::Anthropic, &id, |b, _| {
        if b.running() {
            return bad_request(
                Format::Anthropic,
                "a batch must end before it can be deleted".into(),
            );
        }
        b.deleted = true;
        Json(json!({"id": b.id, "type": "message_batch_deleted"})).into_response()
    })
    .unwrap_or_else(|| not_found(Format::Anthropic, "batch"))
}

pub(super) async fn anthropic_results(
    State(st): State<Arc<SimState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    with_batch(&st, Format::Anthropic, &id, |b, _| {
        let Some(e) = &b.ended else {
            return bad_request(
                Format::Anthropic,
                "results are available once the batch has ended".into(),
            );
        };
        let mut out = Vec::new();
        for (custom_id, o) in &e.results {
            let result = match o {
                Outcome::Answered(message) => json!({"type": "succeeded", "message": message}),
                Outcome::Errored(_, body) => json!({"type": "errored", "error": body}),
                Outcome::Cancelled => json!({"type": "canceled"}),
                Outcome::Expired => json!({"type": "expired"}),
            };
            out.extend_from_slice(
                json!({"custom_id": custom_id, "result": result})
                    .to_string()
                    .as_bytes(),
            );
            out.push(b'\n');
        }
        if b.fate == Some(BatchFate::Garble) {
            out.extend_from_slice(GARBLE);
        }
        (
            StatusCode::OK,
            [("content-type", "application/binary")],
            out,
        )
            .into_response()
    })
    .unwrap_or_else(|| not_found(Format::Anthropic, "batch"))
}

pub(super) async fn anthropic_list(
    State(st): State<Arc<SimState>>,
    Query(q): Query<Page>,
    headers: HeaderMap,
) -> Response {
    let mut ids = ids_newest_first(&st, Format::Anthropic);
    if let Some(before) = q.before_id.as_deref() {
        // Newer than `before`: the ids ahead of it, nearest first.
        let upto = ids.iter().position(|i| i == before).unwrap_or(0);
        ids.truncate(upto);
        ids.reverse();
    }
    let (ids, has_more) = page(&ids, q.after_id.as_deref(), q.limit.unwrap_or(20));
    let data: Vec<Value> = ids
        .iter()
        .filter_map(|id| {
            with_batch(&st, Format::Anthropic, id, |b, _| {
                anthropic_object(b, &headers)
            })
        })
        .collect();
    Json(
        json!({"data": data, "has_more": has_more, "first_id": ids.first(), "last_id": ids.last()}),
    )
    .into_response()
}

// ------------------------------------------------- shared `/v1/batches`

/// Whether a request under `/v1/batches` is Gemini's (its SDK now calls
/// `/v1/batches/{id}` too): it carries Gemini's key header, or names a
/// batch that is not OpenAI's.
fn is_gemini(headers: &HeaderMap, id: Option<&str>) -> bool {
    headers.contains_key("x-goog-api-key") || id.is_some_and(|i| !i.starts_with("batch_"))
}

pub(super) async fn v1_list(
    st: State<Arc<SimState>>,
    q: Query<Page>,
    headers: HeaderMap,
) -> Response {
    if is_gemini(&headers, None) {
        gemini_list(st, q).await
    } else {
        openai_list(st, q).await
    }
}

pub(super) async fn v1_get(
    st: State<Arc<SimState>>,
    id: UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if is_gemini(&headers, Some(&id.0)) {
        gemini_get(st, id).await
    } else {
        openai_get(st, id).await
    }
}

// ---------------------------------------------------------------- Gemini

/// `POST /v1beta/models/{model}:batchGenerateContent` with inline requests.
pub(super) fn gemini_create(
    st: &SimState,
    model: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_request(Format::Gemini, format!("invalid JSON: {e}")),
    };
    let Some(requests) = v
        .pointer("/batch/inputConfig/requests/requests")
        .and_then(Value::as_array)
    else {
        return bad_request(
            Format::Gemini,
            "batch.inputConfig.requests.requests is required (inline requests)".into(),
        );
    };
    let model = model.strip_prefix("models/").unwrap_or(model).to_string();
    let items: Vec<(String, Result<SimRequest, String>)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let key = r
                .pointer("/metadata/key")
                .and_then(Value::as_str)
                .map_or_else(|| i.to_string(), str::to_string);
            let req = match r.get("request") {
                Some(body) => gemini::parse(&model, body.to_string().as_bytes()),
                None => Err("missing `request`".into()),
            };
            (key, req)
        })
        .collect();
    if items.is_empty() {
        return bad_request(Format::Gemini, "a batch needs at least one request".into());
    }
    let display = v
        .pointer("/batch/displayName")
        .and_then(Value::as_str)
        .map(str::to_string);
    let id = create(st, headers, Format::Gemini, model, items, |b| {
        b.display_name = display
    });
    with_batch(st, Format::Gemini, &id, |b, now| {
        Json(gemini_object(b, now)).into_response()
    })
    .unwrap_or_else(|| not_found(Format::Gemini, "batch"))
}

fn gemini_object(b: &SimBatch, now: u64) -> Value {
    let share = b.elapsed(now) as f64 / b.duration_ms.max(1) as f64;
    let state = match (&b.ended, share < 0.1) {
        (Some(e), _) => match e.end {
            End::Completed => "BATCH_STATE_SUCCEEDED",
            End::Expired => "BATCH_STATE_EXPIRED",
            End::Cancelled => "BATCH_STATE_CANCELLED",
            End::Failed => "BATCH_STATE_FAILED",
        },
        (None, true) => "BATCH_STATE_PENDING",
        (None, false) => "BATCH_STATE_RUNNING",
    };
    let mut meta = json!({
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
        "model": format!("models/{}", b.model),
        "displayName": b.display_name.clone().unwrap_or_default(),
        "state": state,
        "createTime": rfc3339(b.created_at),
        "updateTime": rfc3339(b.ended.as_ref().map_or(b.created_at, |e| e.at)),
        "batchStats": {"requestCount": b.items.len().to_string(),
                        "pendingRequestCount": if b.ended.is_some() { "0".to_string() } else { b.items.len().to_string() }},
    });
    if let Some(e) = &b.ended {
        meta["endTime"] = json!(rfc3339(e.at));
        let ok = e
            .results
            .iter()
            .filter(|r| matches!(r.1, Outcome::Answered(_)))
            .count();
        meta["batchStats"]["successfulRequestCount"] = json!(ok.to_string());
        meta["batchStats"]["failedRequestCount"] = json!((e.results.len() - ok).to_string());
        // Only a succeeded batch carries output; an expired, cancelled or
        // failed one delivers nothing.
        if e.end == End::Completed {
            let responses: Vec<Value> = e
                .results
                .iter()
                .filter_map(|(key, o)| match o {
                    Outcome::Answered(r) => {
                        Some(json!({"response": r, "metadata": {"key": key}}))
                    }
                    Outcome::Errored(_, body) => Some(json!({
                        "error": {"code": body.pointer("/error/code").cloned().unwrap_or(json!(500)),
                                  "message": body.pointer("/error/message").cloned().unwrap_or(json!("error"))},
                        "metadata": {"key": key}})),
                    _ => None,
                })
                .collect();
            meta["output"] = json!({"inlinedResponses": {"inlinedResponses": responses}});
        }
    }
    json!({"name": format!("batches/{}", b.id), "metadata": meta, "done": b.ended.is_some()})
}

pub(super) async fn gemini_get(
    State(st): State<Arc<SimState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let _span = PollSpan::start(&st, Format::Gemini, &id).await;
    with_batch(&st, Format::Gemini, &id, |b, now| {
        Json(gemini_object(b, now)).into_response()
    })
    .unwrap_or_else(|| not_found(Format::Gemini, "batch"))
}

/// `POST /v1beta/batches/{id}:cancel`.
pub(super) async fn gemini_action(
    State(st): State<Arc<SimState>>,
    UrlPath(action): UrlPath<String>,
) -> Response {
    let Some(id) = action.strip_suffix(":cancel") else {
        return not_found(Format::Gemini, "method");
    };
    with_batch(&st, Format::Gemini, id, |b, now| {
        if b.running() && b.cancel_at_ms.is_none() {
            b.cancel_at_ms = Some(now);
        }
        Json(json!({})).into_response()
    })
    .unwrap_or_else(|| not_found(Format::Gemini, "batch"))
}

pub(super) async fn gemini_delete(
    State(st): State<Arc<SimState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    with_batch(&st, Format::Gemini, &id, |b, _| {
        b.deleted = true;
        Json(json!({})).into_response()
    })
    .unwrap_or_else(|| not_found(Format::Gemini, "batch"))
}

pub(super) async fn gemini_list(
    State(st): State<Arc<SimState>>,
    Query(q): Query<Page>,
) -> Response {
    let ids = ids_newest_first(&st, Format::Gemini);
    let (ids, has_more) = page(&ids, q.page_token.as_deref(), q.page_size.unwrap_or(50));
    let ops: Vec<Value> = ids
        .iter()
        .filter_map(|id| with_batch(&st, Format::Gemini, id, |b, now| gemini_object(b, now)))
        .collect();
    let mut out = json!({"operations": ops});
    if has_more {
        out["nextPageToken"] = json!(ids.last());
    }
    Json(out).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_are_split_into_named_parts() {
        let body = b"--xyz\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{\"a\":1}\n{\"b\":2}\n\r\n--xyz--\r\n";
        let parts = multipart("multipart/form-data; boundary=xyz", body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], ("purpose".into(), None, b"batch".to_vec()));
        assert_eq!(parts[1].1.as_deref(), Some("in.jsonl"));
        assert_eq!(parts[1].2, b"{\"a\":1}\n{\"b\":2}\n".to_vec());
        // Cut anywhere, it is refused, never a panic.
        for cut in 0..body.len() {
            let _ = multipart("multipart/form-data; boundary=xyz", &body[..cut]);
        }
        assert!(multipart("application/json", body).is_none());
    }

    #[test]
    fn openai_input_files_are_validated_like_the_provider_does() {
        let line = |id: &str, model: &str| {
            format!(
                r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}}}"#
            )
        };
        let ok = format!("{}\n{}\n", line("a", "m"), line("b", "m"));
        let (items, model) = openai_lines(ok.as_bytes()).unwrap();
        assert_eq!((items.len(), model.as_str()), (2, "m"));
        let two_models = format!("{}\n{}\n", line("a", "m"), line("b", "n"));
        assert_eq!(openai_lines(two_models.as_bytes()).unwrap_err().1, 2);
        let dup = format!("{}\n{}\n", line("a", "m"), line("a", "m"));
        assert!(openai_lines(dup.as_bytes())
            .unwrap_err()
            .0
            .contains("duplicate"));
        assert_eq!(openai_lines(b"{\"custom_id\":").unwrap_err().1, 1);
        assert!(openai_lines(b"\n\n").is_err());
    }

    #[test]
    fn pages_follow_the_cursor() {
        let ids: Vec<String> = (0..5).map(|i| i.to_string()).collect();
        assert_eq!(page(&ids, None, 2), (vec!["0".into(), "1".into()], true));
        assert_eq!(
            page(&ids, Some("1"), 2),
            (vec!["2".into(), "3".into()], true)
        );
        assert_eq!(page(&ids, Some("3"), 2), (vec!["4".into()], false));
        assert_eq!(page(&ids, Some("4"), 2), (vec![], false));
        assert!(valid_custom_id("a-b_C9") && !valid_custom_id("a.b") && !valid_custom_id(""));
        assert!(!valid_custom_id(&"x".repeat(65)));
    }
}
