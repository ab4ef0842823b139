//! `/v1/jobs`: submit jobs over HTTP and read them back.
//!
//! - `POST /v1/jobs` (scope `submit`): one envelope (JSON object), many
//!   (JSON array, or `application/x-ndjson`). Each is validated as the
//!   dispatcher validates it (a `category` is required: there is no
//!   subject), then published to `<prefix>.jobs.<category>` with
//!   `Nats-Msg-Id` = its id (one is made when it has none). A job whose id
//!   exists already is not published again: its state comes back.
//! - `GET /v1/jobs/{id}` (scope `read`): status, result (`output`,
//!   `output_json`), model, cost, timings, the decision log and its calls.
//! - `GET /v1/jobs` (scope `read`): newest first, filtered by `category`,
//!   `status`, `since`, `until` and `metadata.KEY=VALUE`, in pages of
//!   `limit` (≤ 500) with an opaque `cursor` (keyset on `(created_at, id)`:
//!   stable while jobs keep arriving).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Value};

use crate::bus::Bus;
use crate::config::Config;
use crate::envelope::{parse_job, Parsed};
use crate::store::jobs::{self, JobFilter};

/// What the jobs routes need.
pub trait JobsCtx: Send + Sync + 'static {
    fn pool(&self) -> &sqlx::PgPool;
    fn bus(&self) -> &Bus;
    fn cfg(&self) -> &Config;
}

/// What became of one submitted envelope.
#[derive(Debug, Serialize)]
pub struct Submitted {
    /// 1-based position in the request (bulk requests).
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `queued` (published now), `exists` (a job with this id exists: its
    /// status is `job_status`) or `rejected`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A JSON error body `{"error": message}` with `status`.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// The envelopes of a request body: one object, an array, or NDJSON lines.
fn envelopes(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Vec<Result<Value, String>>, bool), String> {
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/x-ndjson"));
    if ndjson {
        let lines = body
            .split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(|l| serde_json::from_slice::<Value>(l).map_err(|e| format!("not JSON: {e}")))
            .collect();
        return Ok((lines, true));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => Ok((items.into_iter().map(Ok).collect(), true)),
        Ok(v) => Ok((vec![Ok(v)], false)),
        Err(e) => Err(format!("the body is not JSON: {e}")),
    }
}

/// `POST /v1/jobs`.
pub async fn submit<C: JobsCtx>(
    State(ctx): State<std::sync::Arc<C>>,
    caller: Option<axum::Extension<crate::api::auth::Caller>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = caller.map(|c| c.0 .0);
    let (items, bulk) = match envelopes(&headers, &body) {
        Ok(x) => x,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if items.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no job in the request");
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        out.push(submit_one(&*ctx, caller.as_deref(), i + 1, item).await);
    }
    let rejected = out.iter().filter(|s| s.status == "rejected").count();
    let failed = out.iter().any(|s| s.status == "unavailable");
    let status = if failed {
        StatusCode::SERVICE_UNAVAILABLE
    } else if rejected > 0 {
        StatusCode::BAD_REQUEST
    } else if out.iter().all(|s| s.status == "exists") {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    if bulk {
        let accepted = out.iter().filter(|s| s.status != "rejected").count();
        (
            status,
            Json(json!({"accepted": accepted, "rejected": rejected, "jobs": out})),
        )
            .into_response()
    } else {
        (status, Json(json!(out.remove(0)))).into_response()
    }
}

/// Validate and publish one envelope as `POST /v1/jobs` does (the
/// OpenAI batch front door submits its lines through here too).
pub(crate) async fn submit_one<C: JobsCtx>(
    ctx: &C,
    caller: Option<&str>,
    line: usize,
    item: Result<Value, String>,
) -> Submitted {
    let refused = |status: &'static str, id: Option<String>, reason: String| Submitted {
        line,
        id,
        status,
        job_status: None,
        reason: Some(reason),
    };
    let rejected = |id: Option<String>, reason: String| refused("rejected", id, reason);
    let mut v = match item {
        Ok(v) => v,
        Err(e) => return rejected(None, e),
    };
    let Some(obj) = v.as_object_mut() else {
        return rejected(None, "not a JSON object".into());
    };
    let Some(category) = obj
        .get("category")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return rejected(
            obj.get("id").and_then(Value::as_str).map(str::to_string),
            "`category` is required over HTTP".into(),
        );
    };
    if !obj.contains_key("id") {
        obj.insert("id".into(), Value::String(crate::ids::new_job_id()));
    }
    let payload = serde_json::to_vec(&v).unwrap_or_default();
    let cfg = ctx.cfg();
    let parsed = parse_job(
        &payload,
        &category,
        "",
        &cfg.limits,
        |c| cfg.accepts_category(c),
        crate::clock::now_ms(),
        &cfg.webhooks.allow_hosts,
    );
    let job = match parsed {
        Parsed::Valid(job) => job,
        Parsed::Rejected { id, reason, .. } => return rejected(id, reason.to_string()),
    };
    if let Some(why) = job
        .envelope
        .response_format
        .as_ref()
        .and_then(|rf| cfg.format_unanswerable(&job.category, rf))
    {
        return rejected(Some(job.id), format!("invalid response_format: {why}"));
    }
    match jobs::job_status(ctx.pool(), &job.id).await {
        Ok(Some(s)) => {
            return Submitted {
                line,
                id: Some(job.id),
                status: "exists",
                job_status: Some(s.as_str().to_string()),
                reason: None,
            }
        }
        Ok(None) => {}
        Err(e) => {
            return refused(
                "unavailable",
                Some(job.id),
                format!("cannot read jobs: {e:#}"),
            )
        }
    }
    // Who submitted it, so a submit token can read it back (before the
    // job exists: a later read never misses it).
    if let Some(name) = caller {
        if let Err(e) = crate::store::tokens::record_submission(ctx.pool(), &job.id, name).await {
            return refused(
                "unavailable",
                Some(job.id),
                format!("cannot record the submission: {e:#}"),
            );
        }
    }
    let subject = ctx.bus().names.job_subject(&job.category);
    match ctx
        .bus()
        .publish_durable(subject, &job.id, payload.into())
        .await
    {
        Ok(_) => Submitted {
            line,
            id: Some(job.id),
            status: "queued",
            job_status: Some("queued".into()),
            reason: None,
        },
        Err(e) => refused("unavailable", Some(job.id), format!("{e:#}")),
    }
}

/// `GET /v1/jobs/{id}`: a `submit` token sees only the jobs it submitted
/// (any other id is "not found" to it).
pub async fn get<C: JobsCtx>(
    State(ctx): State<std::sync::Arc<C>>,
    own: Option<axum::Extension<crate::api::auth::OwnJobsOnly>>,
    Path(id): Path<String>,
) -> Response {
    if let Some(axum::Extension(crate::api::auth::OwnJobsOnly(name))) = own {
        match crate::store::tokens::submitted_by(ctx.pool(), &id, &name).await {
            Ok(true) => {}
            Ok(false) => return error(StatusCode::NOT_FOUND, format!("no job `{id}`")),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
        }
    }
    let job = match jobs::job_view(ctx.pool(), &id).await {
        Ok(Some(j)) => j,
        // Accepted over HTTP, not yet taken by a dispatcher: queued.
        Ok(None) => {
            return match crate::store::tokens::was_submitted(ctx.pool(), &id).await {
                Ok(true) => Json(json!({"id": id, "status": "queued"})).into_response(),
                Ok(false) => error(StatusCode::NOT_FOUND, format!("no job `{id}`")),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
            }
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    };
    let calls = match jobs::job_calls(ctx.pool(), &id).await {
        Ok(c) => c,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    };
    let mut v = serde_json::to_value(&job).unwrap_or_default();
    v["calls"] = serde_json::to_value(&calls).unwrap_or_default();
    Json(v).into_response()
}

fn encode_cursor(c: &(String, String)) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}\n{}", c.0, c.1))
}

fn decode_cursor(s: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (at, id) = text.split_once('\n')?;
    Some((at.to_string(), id.to_string()))
}

/// `GET /v1/jobs`.
pub async fn list<C: JobsCtx>(
    State(ctx): State<std::sync::Arc<C>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => 100,
        Some(Ok(l)) if (1..=500).contains(&l) => l,
        Some(_) => return error(StatusCode::BAD_REQUEST, "limit: 1 to 500"),
    };
    let after = match q.get("cursor") {
        None => None,
        Some(c) => match decode_cursor(c) {
            Some(a) => Some(a),
            None => return error(StatusCode::BAD_REQUEST, "cursor: not one this API gave"),
        },
    };
    for k in ["since", "until"] {
        if let Some(t) = q.get(k) {
            if crate::envelope::parse_deadline(t).is_none() {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{k}: an RFC 3339 time such as 2026-11-30T06:00:00Z"),
                );
            }
        }
    }
    if let Some(s) = q.get("status") {
        if crate::store::JobStatus::parse(s).is_none() {
            return error(StatusCode::BAD_REQUEST, format!("status: unknown `{s}`"));
        }
    }
    let mut metadata: Vec<(String, String)> = q
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("metadata.")?.to_string(), v.clone())))
        .collect();
    metadata.sort();
    let known = ["limit", "cursor", "since", "until", "status", "category"];
    if let Some(k) = q
        .keys()
        .find(|k| !known.contains(&k.as_str()) && !k.starts_with("metadata."))
    {
        return error(StatusCode::BAD_REQUEST, format!("unknown parameter `{k}`"));
    }
    let f = JobFilter {
        category: q.get("category").cloned(),
        status: q.get("status").cloned(),
        since: q.get("since").cloned(),
        until: q.get("until").cloned(),
        metadata,
        after,
        limit,
    };
    match jobs::list_jobs(ctx.pool(), &f).await {
        Ok((page, last)) => {
            let next = (page.len() as i64 == limit)
                .then(|| last.as_ref().map(encode_cursor))
                .flatten();
            Json(json!({"jobs": page, "next_cursor": next})).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

/// Announce a cancelled job on `<prefix>.done.<category>` (best effort, as
/// every job's end is).
async fn announce_cancelled<C: JobsCtx>(ctx: &C, id: &str, category: &str) {
    ctx.bus()
        .publish_done(&crate::bus::DoneEvent {
            job_id: id.to_string(),
            category: category.to_string(),
            status: crate::store::JobStatus::Cancelled,
        })
        .await;
}

/// Cancel job `id` unless it has ended, and announce it if it was
/// cancelled now.
pub(crate) async fn cancel_job<C: JobsCtx>(ctx: &C, id: &str) -> anyhow::Result<jobs::Cancelled> {
    let c = jobs::cancel(ctx.pool(), id).await?;
    if let jobs::Cancelled::Now { category } = &c {
        announce_cancelled(ctx, id, category).await;
    }
    Ok(c)
}

/// `POST /v1/jobs/{id}/cancel` (scope `admin`): a queued job never calls a
/// provider; a running one stops at its next step (calls under way are
/// recorded); a job that ended already stays as it is (409).
pub async fn cancel<C: JobsCtx>(
    State(ctx): State<std::sync::Arc<C>>,
    Path(id): Path<String>,
) -> Response {
    match cancel_job(&*ctx, &id).await {
        Ok(jobs::Cancelled::Now { .. }) => {
            Json(json!({"id": id, "status": "cancelled"})).into_response()
        }
        Ok(jobs::Cancelled::AlreadyEnded(s)) => (
            StatusCode::CONFLICT,
            Json(json!({"id": id, "status": s.as_str(),
                        "error": format!("the job had ended already ({s}); nothing changed")})),
        )
            .into_response(),
        Ok(jobs::Cancelled::NotFound) => error(StatusCode::NOT_FOUND, format!("no job `{id}`")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

/// `POST /v1/jobs/cancel` (scope `admin`) with `{"category", "metadata":
/// {…}, "created_before"}` (at least one): cancel every unfinished job that
/// matches.
pub async fn cancel_where<C: JobsCtx>(
    State(ctx): State<std::sync::Arc<C>>,
    body: Bytes,
) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Filter {
        #[serde(default)]
        category: Option<String>,
        #[serde(default)]
        metadata: std::collections::BTreeMap<String, String>,
        #[serde(default)]
        created_before: Option<String>,
    }
    let f: Filter = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the filter: {e}")),
    };
    if f.category.is_none() && f.metadata.is_empty() && f.created_before.is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "give at least one of category, metadata, created_before",
        );
    }
    if let Some(t) = &f.created_before {
        if crate::envelope::parse_deadline(t).is_none() {
            return error(StatusCode::BAD_REQUEST, "created_before: an RFC 3339 time");
        }
    }
    let filter = jobs::CancelFilter {
        category: f.category,
        metadata: f.metadata.into_iter().collect(),
        created_before: f.created_before,
    };
    match jobs::cancel_where(ctx.pool(), &filter).await {
        Ok(done) => {
            for (id, category) in &done {
                announce_cancelled(&*ctx, id, category).await;
            }
            let ids: Vec<&String> = done.iter().map(|(id, _)| id).collect();
            Json(json!({"cancelled": ids.len(), "ids": ids})).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}
