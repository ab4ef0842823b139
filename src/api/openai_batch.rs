//! The OpenAI Batch-compatible front door: `/v1/files` and `/v1/batches`
//! with OpenAI's shapes, so code written for OpenAI's Batch API runs
//! against Switchyard by changing its `base_url` (and using a Switchyard
//! token as the API key).
//!
//! - `POST /v1/files` (scope `submit`): multipart, `purpose=batch`, field
//!   `file`: a JSONL file (every non-blank line a JSON object; at most
//!   [`MAX_LINES`] lines and [`MAX_FILE_BYTES`] bytes). Anything else is a
//!   400 saying which line is wrong.
//! - `POST /v1/batches` (scope `submit`): each line of the input file
//!   becomes a job in the category `openai_batch.models` maps its
//!   `body.model` to (or the batch metadata's `switchyard_category`), with a
//!   deadline 24 h away (so categories with `delivery = "auto"` use the
//!   providers' batch APIs at half price) and metadata `client_batch_id`,
//!   `custom_id`. Jobs are published through the `POST /v1/jobs` path, with
//!   ids `<batch id>-<line>`: publishing a batch's lines again (an
//!   `Idempotency-Key` retry of the create) never makes a second job. A line
//!   that cannot be a job (malformed, an unmapped model, refused by
//!   validation) goes to the error file with its reason.
//! - `GET /v1/batches/{id}`, `GET /v1/batches` (scope `read`, or a `submit`
//!   token for its own): status and `request_counts` follow the jobs. The
//!   first read after every job ended finalizes the batch: one reader (a
//!   claim in Postgres) writes the output and error files, in OpenAI's line
//!   format, in the transaction that completes it.
//! - `POST /v1/batches/{id}/cancel` (scope `admin`, or the `submit` token
//!   that created it): `cancelling`; its unfinished jobs are cancelled
//!   through the jobs API's cancel path; the next read ends it `cancelled`
//!   with an output file of what had finished.
//! - `GET /v1/files/{id}`, `GET /v1/files/{id}/content` (scope `read`, or a
//!   `submit` token for its own).
//!
//! Errors have OpenAI's body: `{"error": {"message", "type", "param", "code"}}`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::auth::{Caller, OwnJobsOnly, Scope};
use super::jobs::{self, JobsCtx};
use crate::config::{Config, OpenAiBatchConfig};
use crate::store::client_batches::{self as store, BatchRow, LineOutcome, NewBatch, NewLine};

/// The largest file `POST /v1/files` takes (OpenAI's is 200 MB; a file is
/// held in memory while it is checked and stored in Postgres).
pub const MAX_FILE_BYTES: usize = 100 << 20;
/// The most lines a batch input file may hold (OpenAI's limit).
pub const MAX_LINES: usize = 50_000;
/// The one endpoint batch lines may name.
pub const ENDPOINT: &str = "/v1/chat/completions";
/// The one completion window, and the deadline each line's job gets.
pub const COMPLETION_WINDOW: &str = "24h";
const WINDOW: Duration = Duration::from_secs(24 * 3600);
/// How long a reader holds a batch it finalizes before another may.
const FINALIZE_LEASE: Duration = Duration::from_secs(120);
/// Lines published at once.
const PUBLISH_CONCURRENCY: usize = 16;
/// Body fields of a line that are read; [`IGNORED_FIELDS`] are accepted
/// and ignored; any other field refuses the line (its answer could not be
/// what the client asked for).
const READ_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "response_format",
];
const IGNORED_FIELDS: &[&str] = &["user", "store", "metadata", "service_tier"];

/// An OpenAI-shaped error.
fn oai_error(
    status: StatusCode,
    message: impl Into<String>,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    (
        status,
        Json(json!({"error": {"message": message.into(), "type": kind,
                              "param": param, "code": code}})),
    )
        .into_response()
}

fn unavailable(e: &anyhow::Error) -> Response {
    oai_error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{e:#}"),
        None,
        Some("unavailable"),
    )
}

fn not_found(what: &str, id: &str) -> Response {
    oai_error(
        StatusCode::NOT_FOUND,
        format!("No {what} with id '{id}'"),
        None,
        None,
    )
}

/// Whose rows a request may see: `Some(token)` for a `submit` token on a
/// read route (its own only), `None` for everything.
fn owner(own: &Option<Extension<OwnJobsOnly>>) -> Option<&str> {
    own.as_ref().map(|o| o.0 .0.as_str())
}

// ---- pure: files, lines, output ------------------------------------------

/// A line of an input file: its 1-based number and its JSON object.
pub type InputLine = (i32, Map<String, Value>);

/// The non-blank lines of a JSONL file, each a JSON object; or why the
/// file is not one.
pub fn parse_jsonl(content: &[u8]) -> Result<Vec<InputLine>, String> {
    let mut out = Vec::new();
    for (i, raw) in content.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if out.len() == MAX_LINES {
            return Err(format!("more than {MAX_LINES} lines"));
        }
        match serde_json::from_slice::<Value>(raw) {
            Ok(Value::Object(o)) => out.push((n as i32, o)),
            Ok(_) => return Err(format!("line {n} is not a JSON object")),
            Err(e) => return Err(format!("line {n} is not JSON: {e}")),
        }
    }
    if out.is_empty() {
        return Err("the file has no lines".into());
    }
    Ok(out)
}

/// Why a line does not become a job: (code, message).
type Refused = (&'static str, String);

/// The envelope of one input line (without `id`, `deadline` and
/// `metadata`), and its category; or why it cannot be a job.
/// `category_of` maps a model to its category.
pub fn line_envelope(
    line: &Map<String, Value>,
    category_of: impl Fn(&str) -> Option<String>,
) -> Result<(String, Map<String, Value>), Refused> {
    let bad = |m: String| Err(("invalid_request", m));
    if line.get("method").and_then(Value::as_str) != Some("POST") {
        return bad("`method` must be \"POST\"".into());
    }
    if line.get("url").and_then(Value::as_str) != Some(ENDPOINT) {
        return bad(format!(
            "`url` must be \"{ENDPOINT}\", the batch's endpoint"
        ));
    }
    let Some(body) = line.get("body").and_then(Value::as_object) else {
        return bad("`body` must be a chat completions request (an object)".into());
    };
    if let Some(k) = body
        .keys()
        .find(|k| !READ_FIELDS.contains(&k.as_str()) && !IGNORED_FIELDS.contains(&k.as_str()))
    {
        return bad(format!("body field `{k}` is not supported by Switchyard"));
    }
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return bad("`body.model` is required".into());
    };
    let Some(category) = category_of(model) else {
        return Err((
            "model_not_found",
            format!("model `{model}` is not mapped to a category (config `openai_batch.models`)"),
        ));
    };
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return bad("`body.messages` must be a list".into());
    };
    let mut msgs = Vec::with_capacity(messages.len());
    for m in messages {
        let role = match m.get("role").and_then(Value::as_str) {
            // Switchyard's system prompt role.
            Some("developer") => "system",
            Some(r) => r,
            None => return bad("every message needs a `role`".into()),
        };
        msgs.push(
            json!({"role": role, "content": m.get("content").cloned().unwrap_or(Value::Null)}),
        );
    }
    let mut env = Map::new();
    env.insert("category".into(), Value::String(category.clone()));
    env.insert("messages".into(), Value::Array(msgs));
    let mut params = Map::new();
    if let Some(t) = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .filter(|v| !v.is_null())
    {
        params.insert("max_tokens".into(), t.clone());
    }
    if let Some(t) = body.get("temperature").filter(|v| !v.is_null()) {
        params.insert("temperature".into(), t.clone());
    }
    if !params.is_empty() {
        env.insert("params".into(), Value::Object(params));
    }
    if let Some(rf) = body.get("response_format").filter(|v| !v.is_null()) {
        match rf.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                env.insert("response_format".into(), json!({"type": "json_object"}));
            }
            Some("json_schema") => {
                let Some(s) = rf.get("json_schema").and_then(Value::as_object) else {
                    return bad("`response_format.json_schema` must be an object".into());
                };
                let mut f = s.clone();
                f.retain(|k, _| k != "description");
                f.insert("type".into(), json!("json_schema"));
                env.insert("response_format".into(), Value::Object(f));
            }
            _ => return bad("`response_format.type`: text, json_object or json_schema".into()),
        }
    }
    Ok((category, env))
}

/// The job id of line `line` of batch `batch_id`.
pub fn job_id(batch_id: &str, line: i32) -> String {
    format!("{batch_id}-{line}")
}

/// Every line of a batch: its row, and the envelope to publish when it
/// becomes a job.
fn plan_lines(
    batch_id: &str,
    content: &[u8],
    mapping: &OpenAiBatchConfig,
    category: Option<&str>,
    deadline: &str,
) -> Result<Vec<(NewLine, Option<Value>)>, String> {
    let parsed = parse_jsonl(content)?;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(parsed.len());
    for (n, line) in parsed {
        let custom_id = line
            .get("custom_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let refused = |code: &str, why: String| NewLine {
            line: n,
            custom_id: custom_id.clone(),
            error_code: Some(code.to_string()),
            error_message: Some(why),
            ..Default::default()
        };
        if custom_id.is_empty() {
            out.push((
                refused(
                    "invalid_request",
                    "`custom_id` must be a non-empty string".into(),
                ),
                None,
            ));
            continue;
        }
        if !seen.insert(custom_id.clone()) {
            out.push((
                refused(
                    "duplicate_custom_id",
                    format!("`custom_id` {custom_id:?} is used by an earlier line"),
                ),
                None,
            ));
            continue;
        }
        let category_of = |model: &str| {
            category
                .map(str::to_string)
                .or_else(|| mapping.models.get(model).cloned())
        };
        match line_envelope(&line, category_of) {
            Ok((cat, mut env)) => {
                let id = job_id(batch_id, n);
                env.insert("id".into(), Value::String(id.clone()));
                env.insert("deadline".into(), Value::String(deadline.to_string()));
                env.insert(
                    "metadata".into(),
                    json!({"client_batch_id": batch_id, "custom_id": custom_id}),
                );
                out.push((
                    NewLine {
                        line: n,
                        custom_id: custom_id.clone(),
                        category: Some(cat),
                        job_id: Some(id),
                        ..Default::default()
                    },
                    Some(Value::Object(env)),
                ));
            }
            Err((code, why)) => out.push((refused(code, why), None)),
        }
    }
    Ok(out)
}

/// OpenAI's `finish_reason` for a provider's own stop reason.
fn finish_reason(native: Option<&str>) -> &'static str {
    match native {
        Some("length" | "max_tokens" | "MAX_TOKENS") => "length",
        Some("content_filter" | "SAFETY" | "refusal" | "RECITATION" | "PROHIBITED_CONTENT") => {
            "content_filter"
        }
        _ => "stop",
    }
}

/// The output-file line (answered) or error-file line of one line of an
/// ended batch: `(true, line)` for the output file.
pub fn result_line(batch_id: &str, ending: &str, o: &LineOutcome) -> (bool, Value) {
    let req_id = format!(
        "batch_req_{}_{}",
        batch_id.trim_start_matches("batch_"),
        o.line
    );
    let custom_id = (!o.custom_id.is_empty()).then_some(o.custom_id.as_str());
    if let (Some(job), Some("succeeded"), Some(output)) =
        (&o.job_id, o.status.as_deref(), &o.output)
    {
        let (inp, out) = (o.input_tokens.unwrap_or(0), o.output_tokens.unwrap_or(0));
        let body = json!({
            "id": format!("chatcmpl-{job}"),
            "object": "chat.completion",
            "created": o.created,
            "model": o.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": output, "refusal": null},
                "logprobs": null,
                "finish_reason": finish_reason(o.finish_reason.as_deref()),
            }],
            "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out},
        });
        return (
            true,
            json!({"id": req_id, "custom_id": custom_id,
                   "response": {"status_code": 200, "request_id": job, "body": body},
                   "error": null}),
        );
    }
    let (code, message) = match (&o.error_code, o.status.as_deref()) {
        (Some(code), _) => (code.clone(), o.error_message.clone().unwrap_or_default()),
        (None, Some("cancelled")) if ending == "expired" => (
            "batch_expired".into(),
            "the batch expired before this request ended".into(),
        ),
        (None, Some("cancelled")) => (
            "batch_cancelled".into(),
            "the batch was cancelled before this request ended".into(),
        ),
        (None, Some("expired")) => (
            "batch_expired".into(),
            o.job_error.clone().unwrap_or_else(|| "expired".into()),
        ),
        (None, Some("needs_review")) => (
            "needs_review".into(),
            format!(
                "waiting for a person's review: {}",
                o.review_reason.clone().unwrap_or_default()
            ),
        ),
        (None, Some(s)) => (
            format!("job_{s}"),
            o.job_error
                .clone()
                .unwrap_or_else(|| format!("the job ended {s}")),
        ),
        (None, None) => ("unknown".into(), "the request has no job".into()),
    };
    (
        false,
        json!({"id": req_id, "custom_id": custom_id, "response": null,
               "error": {"code": code, "message": message}}),
    )
}

fn to_jsonl(lines: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

fn file_json(f: &store::FileMeta) -> Value {
    json!({
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at,
        "filename": f.filename, "purpose": f.purpose, "status": "processed",
        "expires_at": null, "status_details": null,
    })
}

fn batch_json(b: &BatchRow) -> Value {
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": b.errors,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "in_progress_at": b.in_progress_at,
        "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at,
        "failed_at": b.failed_at,
        "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at,
        "cancelled_at": b.cancelled_at,
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": b.metadata,
    })
}

// ---- files ---------------------------------------------------------------

/// `POST /v1/files`.
pub async fn upload<C: JobsCtx>(
    State(ctx): State<Arc<C>>,
    caller: Option<Extension<Caller>>,
    form: Result<Multipart, MultipartRejection>,
) -> Response {
    let mut form = match form {
        Ok(f) => f,
        Err(e) => {
            return oai_error(
                e.status(),
                format!(
                    "expected multipart/form-data with `purpose` and `file`: {}",
                    e.body_text()
                ),
                None,
                None,
            )
        }
    };
    let (mut purpose, mut file) = (None, None);
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return oai_error(e.status(), e.body_text(), None, None),
        };
        match field.name() {
            Some("purpose") => match field.text().await {
                Ok(t) => purpose = Some(t),
                Err(e) => return oai_error(e.status(), e.body_text(), Some("purpose"), None),
            },
            Some("file") => {
                let name = field.file_name().unwrap_or("input.jsonl").to_string();
                match field.bytes().await {
                    Ok(b) => file = Some((name, b)),
                    Err(e) => {
                        let msg = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                            format!("the file is larger than {MAX_FILE_BYTES} bytes")
                        } else {
                            e.body_text()
                        };
                        return oai_error(e.status(), msg, Some("file"), None);
                    }
                }
            }
            // OpenAI's optional fields (`expires_after[…]`): files here
            // do not expire.
            _ => {}
        }
    }
    match purpose.as_deref() {
        Some("batch") => {}
        Some(p) => {
            return oai_error(
                StatusCode::BAD_REQUEST,
                format!("purpose `{p}` is not supported here; use `batch`"),
                Some("purpose"),
                None,
            )
        }
        None => {
            return oai_error(
                StatusCode::BAD_REQUEST,
                "`purpose` is required",
                Some("purpose"),
                None,
            )
        }
    }
    let Some((filename, content)) = file else {
        return oai_error(
            StatusCode::BAD_REQUEST,
            "`file` is required",
            Some("file"),
            None,
        );
    };
    if let Err(why) = parse_jsonl(&content) {
        return oai_error(
            StatusCode::BAD_REQUEST,
            format!("the file is not a batch input file (JSONL, one request per line): {why}"),
            Some("file"),
            Some("invalid_file"),
        );
    }
    let id = format!("file-{}", crate::ids::new_job_id());
    let new = store::NewFile {
        id: &id,
        purpose: "batch",
        filename: &filename,
        content: &content,
        token_name: caller.as_ref().map(|c| c.0 .0.as_str()),
    };
    match store::insert_file(ctx.pool(), &new).await {
        Ok(f) => Json(file_json(&f)).into_response(),
        Err(e) => unavailable(&e),
    }
}

/// `GET /v1/files/{id}`.
pub async fn get_file<C: JobsCtx>(
    State(ctx): State<Arc<C>>,
    own: Option<Extension<OwnJobsOnly>>,
    Path(id): Path<String>,
) -> Response {
    match store::file(ctx.pool(), &id, owner(&own)).await {
        Ok(Some(f)) => Json(file_json(&f)).into_response(),
        Ok(None) => not_found("file", &id),
        Err(e) => unavailable(&e),
    }
}

/// `GET /v1/files/{id}/content`.
pub async fn file_content<C: JobsCtx>(
    State(ctx): State<Arc<C>>,
    own: Option<Extension<OwnJobsOnly>>,
    Path(id): Path<String>,
) -> Response {
    match store::file_content(ctx.pool(), &id, owner(&own)).await {
        Ok(Some((_, content))) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            content,
        )
            .into_response(),
        Ok(None) => not_found("file", &id),
        Err(e) => unavailable(&e),
    }
}

// ---- batches -------------------------------------------------------------

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    /// Accepted, not applied: files do not expire.
    #[serde(default)]
    #[allow(dead_code)]
    output_expires_after: Option<Value>,
}

/// The id of a new batch: fixed by the caller's `Idempotency-Key` when it
/// sends one (the same create again is the same batch), else random.
fn batch_id(headers: &HeaderMap, caller: Option<&str>) -> String {
    match headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
    {
        Some(key) => {
            let h = Sha256::digest(format!("{}\n{key}", caller.unwrap_or("")).as_bytes());
            format!("batch_{}", &format!("{h:x}")[..24])
        }
        None => format!("batch_{}", crate::ids::new_job_id()),
    }
}

/// `POST /v1/batches`.
pub async fn create<C: JobsCtx>(
    State(ctx): State<Arc<C>>,
    caller: Option<Extension<Caller>>,
    scope: Option<Extension<Scope>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let caller = caller.map(|c| c.0 .0);
    let req: CreateBatch = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return oai_error(
                StatusCode::BAD_REQUEST,
                format!("the request body: {e}"),
                None,
                None,
            )
        }
    };
    if req.endpoint != ENDPOINT {
        return oai_error(
            StatusCode::BAD_REQUEST,
            format!(
                "endpoint `{}` is not supported; use `{ENDPOINT}`",
                req.endpoint
            ),
            Some("endpoint"),
            None,
        );
    }
    if req.completion_window != COMPLETION_WINDOW {
        return oai_error(
            StatusCode::BAD_REQUEST,
            format!("completion_window must be `{COMPLETION_WINDOW}`"),
            Some("completion_window"),
            None,
        );
    }
    let metadata = req.metadata.unwrap_or_default();
    if metadata.len() > 16 {
        return oai_error(
            StatusCode::BAD_REQUEST,
            "metadata holds at most 16 pairs",
            Some("metadata"),
            None,
        );
    }
    let cfg: &Config = ctx.cfg();
    let category = metadata.get(OpenAiBatchConfig::CATEGORY_KEY).cloned();
    if let Some(c) = &category {
        if !cfg.accepts_category(c) {
            return oai_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "metadata `{}`: unknown category `{c}`",
                    OpenAiBatchConfig::CATEGORY_KEY
                ),
                Some("metadata"),
                None,
            );
        }
    }
    // A submit token creates batches from its own files only.
    let file_owner = match scope {
        Some(Extension(Scope::Admin)) => None,
        _ => caller.as_deref(),
    };
    let file = match store::file(ctx.pool(), &req.input_file_id, file_owner).await {
        Ok(Some(f)) => f,
        Ok(None) => {
            return oai_error(
                StatusCode::NOT_FOUND,
                format!("No file with id '{}'", req.input_file_id),
                Some("input_file_id"),
                None,
            )
        }
        Err(e) => return unavailable(&e),
    };
    if file.purpose != "batch" {
        return oai_error(
            StatusCode::BAD_REQUEST,
            format!(
                "file `{}` has purpose `{}`, not `batch`",
                file.id, file.purpose
            ),
            Some("input_file_id"),
            None,
        );
    }
    let id = batch_id(&headers, caller.as_deref());
    let meta = (!metadata.is_empty()).then(|| json!(metadata));
    let new = NewBatch {
        id: &id,
        input_file_id: &file.id,
        endpoint: ENDPOINT,
        completion_window: COMPLETION_WINDOW,
        metadata: meta.as_ref(),
        token_name: caller.as_deref(),
        window: WINDOW,
    };
    let content = match store::file_content(ctx.pool(), &file.id, None).await {
        Ok(Some((_, c))) => c,
        Ok(None) => return not_found("file", &file.id),
        Err(e) => return unavailable(&e),
    };
    // The deadline is fixed by the batch's creation, so its lines are the
    // same envelopes whenever they are published.
    let deadline = crate::clock::fmt_rfc3339(std::time::SystemTime::now() + WINDOW);
    let planned = match plan_lines(
        &id,
        &content,
        &cfg.openai_batch,
        category.as_deref(),
        &deadline,
    ) {
        Ok(p) => p,
        Err(why) => {
            return oai_error(
                StatusCode::BAD_REQUEST,
                format!("the input file: {why}"),
                Some("input_file_id"),
                Some("invalid_file"),
            )
        }
    };
    let rows: Vec<NewLine> = planned.iter().map(|(l, _)| l.clone()).collect();
    if let Err(e) = store::create_batch(ctx.pool(), &new, &rows).await {
        return unavailable(&e);
    }
    let row = match store::batch(ctx.pool(), &id, None).await {
        Ok(Some(b)) => b,
        Ok(None) => return not_found("batch", &id),
        Err(e) => return unavailable(&e),
    };
    if row.status != "validating" {
        // The same create again (its Idempotency-Key): the batch as it is.
        return Json(batch_json(&row)).into_response();
    }
    // Publish the planned lines (again, for a create retried while the
    // first was publishing: the job ids make that harmless). The stored
    // deadline wins over this request's: recompute the envelopes with it.
    let deadline = crate::clock::fmt_rfc3339(
        std::time::UNIX_EPOCH + Duration::from_secs(row.expires_at.max(0) as u64),
    );
    let envelopes: Vec<(i32, Value)> = planned
        .into_iter()
        .filter_map(|(l, env)| {
            let mut env = env?;
            env["deadline"] = Value::String(deadline.clone());
            Some((l.line, env))
        })
        .collect();
    if let Err(e) = publish(&*ctx, &id, caller.as_deref(), envelopes).await {
        let errors = json!({"object": "list", "data": [
            {"code": "unavailable", "message": format!("{e:#}"), "param": null, "line": null}]});
        let _ = store::fail_batch(ctx.pool(), &id, &errors).await;
        // What was published already must not run for a failed batch.
        let _ = end_jobs(&*ctx, &id, "its batch failed to start").await;
        return unavailable(&e);
    }
    match store::mark_in_progress(ctx.pool(), &id).await {
        Ok(()) => {}
        Err(e) => return unavailable(&e),
    }
    // Cancelled while its lines were being published: cancel what was
    // published after the cancel looked.
    match store::batch(ctx.pool(), &id, None).await {
        Ok(Some(b)) if b.status == "cancelling" => {
            if let Err(e) = end_jobs(&*ctx, &id, "cancelled with its batch").await {
                return unavailable(&e);
            }
            Json(batch_json(&b)).into_response()
        }
        Ok(Some(b)) => Json(batch_json(&b)).into_response(),
        Ok(None) => not_found("batch", &id),
        Err(e) => unavailable(&e),
    }
}

/// Publish each `(line, envelope)` of batch `id` through the jobs API's
/// submit path; a line it refuses is recorded as refused. Fails when NATS
/// or Postgres does.
async fn publish<C: JobsCtx>(
    ctx: &C,
    id: &str,
    caller: Option<&str>,
    envelopes: Vec<(i32, Value)>,
) -> anyhow::Result<()> {
    use futures::stream::{self, StreamExt};
    let results: Vec<(i32, jobs::Submitted)> = stream::iter(envelopes)
        .map(|(line, env)| async move {
            (
                line,
                jobs::submit_one(ctx, caller, line as usize, Ok(env)).await,
            )
        })
        .buffer_unordered(PUBLISH_CONCURRENCY)
        .collect()
        .await;
    for (line, s) in results {
        match s.status {
            "queued" | "exists" => {}
            "rejected" => {
                let why = s.reason.unwrap_or_default();
                store::refuse_line(ctx.pool(), id, line, "invalid_request", &why).await?;
            }
            _ => anyhow::bail!(
                "line {line} could not be submitted: {}",
                s.reason.unwrap_or_default()
            ),
        }
    }
    Ok(())
}

/// Cancel every job of batch `id` that has not ended: those no dispatcher
/// has stored yet get a `cancelled` row (so they never run), the others go
/// through the jobs API's cancel.
async fn end_jobs<C: JobsCtx>(ctx: &C, id: &str, reason: &str) -> anyhow::Result<()> {
    store::cancel_undispatched(ctx.pool(), id, reason).await?;
    for job in store::unended_jobs(ctx.pool(), id).await? {
        jobs::cancel_job(ctx, &job).await?;
    }
    Ok(())
}

/// Batch `id` brought up to date: expired when past its window, finalized
/// (files written, end state) once every job ended.
async fn refresh<C: JobsCtx>(ctx: &C, row: BatchRow) -> anyhow::Result<BatchRow> {
    if !matches!(
        row.status.as_str(),
        "in_progress" | "cancelling" | "finalizing"
    ) {
        return Ok(row);
    }
    let pool = ctx.pool();
    if row.status == "in_progress"
        && row.expires_at <= crate::clock::now_ms() / 1000
        && store::begin_expiry(pool, &row.id).await?
    {
        end_jobs(ctx, &row.id, "its batch expired").await?;
    }
    if row.status == "cancelling" {
        // Again, in case the cancel was cut short (each step is idempotent).
        end_jobs(ctx, &row.id, "cancelled with its batch").await?;
    }
    if store::claim_finalize(pool, &row.id, FINALIZE_LEASE).await? {
        finalize(ctx, &row.id, row.token_name.as_deref()).await?;
    }
    Ok(store::batch(pool, &row.id, None).await?.unwrap_or(row))
}

/// Write the output and error files of batch `id`, which this reader
/// claimed, and end it.
async fn finalize<C: JobsCtx>(ctx: &C, id: &str, token: Option<&str>) -> anyhow::Result<()> {
    let pool = ctx.pool();
    let ending = store::batch(pool, id, None)
        .await?
        .and_then(|b| b.ending)
        .unwrap_or_else(|| "completed".into());
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for o in store::outcomes(pool, id).await? {
        match result_line(id, &ending, &o) {
            (true, l) => ok.push(l),
            (false, l) => failed.push(l),
        }
    }
    let short = id.trim_start_matches("batch_");
    let (out_id, err_id) = (
        format!("file-{short}-output"),
        format!("file-{short}-errors"),
    );
    let (out_body, err_body) = (to_jsonl(&ok), to_jsonl(&failed));
    let (out_name, err_name) = (format!("{id}_output.jsonl"), format!("{id}_error.jsonl"));
    let output = (!ok.is_empty()).then(|| store::NewFile {
        id: &out_id,
        purpose: "batch_output",
        filename: &out_name,
        content: &out_body,
        token_name: token,
    });
    let errors = (!failed.is_empty()).then(|| store::NewFile {
        id: &err_id,
        purpose: "batch_output",
        filename: &err_name,
        content: &err_body,
        token_name: token,
    });
    store::finish(
        pool,
        id,
        output.as_ref(),
        errors.as_ref(),
        (ok.len() as i64, failed.len() as i64),
    )
    .await?;
    Ok(())
}

/// `GET /v1/batches/{id}`.
pub async fn get<C: JobsCtx>(
    State(ctx): State<Arc<C>>,
    own: Option<Extension<OwnJobsOnly>>,
    Path(id): Path<String>,
) -> Response {
    let row = match store::batch(ctx.pool(), &id, owner(&own)).await {
        Ok(Some(b)) => b,
        Ok(None) => return not_found("batch", &id),
        Err(e) => return unavailable(&e),
    };
    match refresh(&*ctx, row).await {
        Ok(b) => Json(batch_json(&b)).into_response(),
        Err(e) => unavailable(&e),
    }
}

/// `GET /v1/batches?after&limit`: newest first, OpenAI's list object.
pub async fn list<C: JobsCtx>(
    State(ctx): State<Arc<C>>,
    own: Option<Extension<OwnJobsOnly>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => 20,
        Some(Ok(l)) if (1..=100).contains(&l) => l,
        Some(_) => {
            return oai_error(
                StatusCode::BAD_REQUEST,
                "limit must be 1 to 100",
                Some("limit"),
                None,
            )
        }
    };
    if let Some(k) = q.keys().find(|k| !["after", "limit"].contains(&k.as_str())) {
        return oai_error(
            StatusCode::BAD_REQUEST,
            format!("unknown parameter `{k}`"),
            Some(k),
            None,
        );
    }
    let after = q.get("after").map(String::as_str);
    if let Some(a) = after {
        match store::exists(ctx.pool(), a, owner(&own)).await {
            Ok(true) => {}
            Ok(false) => {
                return oai_error(
                    StatusCode::BAD_REQUEST,
                    format!("after: no batch with id '{a}'"),
                    Some("after"),
                    None,
                )
            }
            Err(e) => return unavailable(&e),
        }
    }
    let mut rows = match store::list(ctx.pool(), owner(&own), after, limit + 1).await {
        Ok(r) => r,
        Err(e) => return unavailable(&e),
    };
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let mut data = Vec::with_capacity(rows.len());
    for row in rows {
        match refresh(&*ctx, row).await {
            Ok(b) => data.push(batch_json(&b)),
            Err(e) => return unavailable(&e),
        }
    }
    let first = data.first().map(|b| b["id"].clone());
    let last = data.last().map(|b| b["id"].clone());
    Json(
        json!({"object": "list", "data": data, "first_id": first, "last_id": last,
                "has_more": has_more}),
    )
    .into_response()
}

/// `POST /v1/batches/{id}/cancel`: `cancelling` now, `cancelled` (with the
/// files of what finished) on the next read. A batch that ended is left as
/// it is (409).
pub async fn cancel<C: JobsCtx>(
    State(ctx): State<Arc<C>>,
    own: Option<Extension<OwnJobsOnly>>,
    Path(id): Path<String>,
) -> Response {
    let pool = ctx.pool();
    match store::exists(pool, &id, owner(&own)).await {
        Ok(true) => {}
        Ok(false) => return not_found("batch", &id),
        Err(e) => return unavailable(&e),
    }
    let started = match store::begin_cancel(pool, &id).await {
        Ok(s) => s,
        Err(e) => return unavailable(&e),
    };
    let row = match store::batch(pool, &id, None).await {
        Ok(Some(b)) => b,
        Ok(None) => return not_found("batch", &id),
        Err(e) => return unavailable(&e),
    };
    if !started && !matches!(row.status.as_str(), "cancelling" | "cancelled") {
        return oai_error(
            StatusCode::CONFLICT,
            format!("batch '{id}' is {}: it cannot be cancelled", row.status),
            None,
            None,
        );
    }
    if row.status == "cancelling" {
        if let Err(e) = end_jobs(&*ctx, &id, "cancelled with its batch").await {
            return unavailable(&e);
        }
    }
    Json(batch_json(&row)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_line_becomes_an_envelope_of_its_mapped_category() {
        let l = line(json!({"custom_id": "a", "method": "POST", "url": ENDPOINT,
            "body": {"model": "gpt-4o-mini", "max_completion_tokens": 30, "temperature": 0.2,
                     "messages": [{"role": "developer", "content": "Be brief."},
                                  {"role": "user", "content": "Hi"}],
                     "response_format": {"type": "json_schema",
                         "json_schema": {"name": "r", "schema": {"type": "object"}, "strict": true}}}}));
        let (cat, env) =
            line_envelope(&l, |m| (m == "gpt-4o-mini").then(|| "support".into())).unwrap();
        assert_eq!(cat, "support");
        assert_eq!(env["messages"][0]["role"], "system");
        assert_eq!(env["params"], json!({"max_tokens": 30, "temperature": 0.2}));
        assert_eq!(
            env["response_format"],
            json!({"type": "json_schema", "name": "r", "schema": {"type": "object"}, "strict": true})
        );
        // It parses as an envelope.
        let mut env = env;
        env.insert("id".into(), json!("x-1"));
        let _: crate::envelope::JobEnvelope = serde_json::from_value(Value::Object(env)).unwrap();
    }

    #[test]
    fn unmapped_models_unsupported_fields_and_wrong_urls_are_refused_with_reasons() {
        let base = json!({"custom_id": "a", "method": "POST", "url": ENDPOINT,
            "body": {"model": "gpt-9", "messages": [{"role": "user", "content": "Hi"}]}});
        let (code, why) = line_envelope(&line(base.clone()), |_| None).unwrap_err();
        assert_eq!(code, "model_not_found");
        assert!(
            why.contains("gpt-9") && why.contains("openai_batch.models"),
            "{why}"
        );
        let mut tools = base.clone();
        tools["body"]["tools"] = json!([]);
        let (_, why) = line_envelope(&line(tools), |_| Some("s".into())).unwrap_err();
        assert!(why.contains("tools"), "{why}");
        let mut url = base;
        url["url"] = json!("/v1/embeddings");
        let (_, why) = line_envelope(&line(url), |_| Some("s".into())).unwrap_err();
        assert!(why.contains("url"), "{why}");
    }

    #[test]
    fn a_file_that_is_not_jsonl_says_which_line() {
        assert!(parse_jsonl(b"{\"a\":1}\n\n{\"b\":2}\n").unwrap().len() == 2);
        let e = parse_jsonl(b"{\"a\":1}\nnot json\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = parse_jsonl(b"[1,2]\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("object"), "{e}");
        assert!(parse_jsonl(b"\n \n").is_err());
    }

    #[test]
    fn plan_refuses_duplicate_custom_ids_and_ids_jobs_by_line() {
        let cfg = OpenAiBatchConfig {
            models: [("m".to_string(), "support".to_string())].into(),
        };
        let l = |id: &str| {
            json!({"custom_id": id, "method": "POST", "url": ENDPOINT,
                   "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}})
            .to_string()
        };
        let content = format!("{}\n{}\n{}\n", l("a"), l("a"), l("b"));
        let p = plan_lines(
            "batch_1",
            content.as_bytes(),
            &cfg,
            None,
            "2030-01-01T00:00:00Z",
        )
        .unwrap();
        assert_eq!(p[0].0.job_id.as_deref(), Some("batch_1-1"));
        assert_eq!(p[1].0.error_code.as_deref(), Some("duplicate_custom_id"));
        assert_eq!(p[2].0.job_id.as_deref(), Some("batch_1-3"));
        let env = p[2].1.as_ref().unwrap();
        assert_eq!(
            env["metadata"],
            json!({"client_batch_id": "batch_1", "custom_id": "b"})
        );
        assert_eq!(env["deadline"], "2030-01-01T00:00:00Z");
    }

    #[test]
    fn an_answered_line_has_openais_output_shape_and_others_an_error() {
        let o = LineOutcome {
            line: 3,
            custom_id: "q".into(),
            job_id: Some("batch_x-3".into()),
            error_code: None,
            error_message: None,
            status: Some("succeeded".into()),
            job_error: None,
            review_reason: None,
            output: Some("hello".into()),
            model: Some("gpt-4o-mini".into()),
            finish_reason: Some("end_turn".into()),
            input_tokens: Some(7),
            output_tokens: Some(2),
            created: 1_700_000_000,
        };
        let (ok, l) = result_line("batch_x", "completed", &o);
        assert!(ok);
        assert_eq!(l["response"]["status_code"], 200);
        let body = &l["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"]["content"], "hello");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["total_tokens"], 9);
        assert!(l["error"].is_null());
        let cancelled = LineOutcome {
            status: Some("cancelled".into()),
            output: None,
            ..o
        };
        let (ok, l) = result_line("batch_x", "cancelled", &cancelled);
        assert!(!ok);
        assert!(l["response"].is_null());
        assert_eq!(l["error"]["code"], "batch_cancelled");
    }
}
