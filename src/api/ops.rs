//! Dead letters and the review queue over HTTP, with the CLI's semantics
//! (`switchyard dlq`, `switchyard review`):
//!
//! - `GET /v1/dead-letters?reason&include_replayed&limit` (read), `GET
//!   /v1/dead-letters/{id}` (read, with the payload as received), `POST
//!   /v1/dead-letters/replay` (admin; `{"ids": [..]}` or `{"all": true,
//!   "reason": ".."}`): each replayed exactly once, under its job id.
//! - `GET /v1/reviews?category` (read), `GET /v1/reviews/{job_id}` (read),
//!   `POST /v1/reviews/{job_id}/resolve` (admin; `{"output": ".."}` or
//!   `{"reject": "reason"}`), recorded as resolved by `api:<token name>`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::jobs::{error, JobsCtx};
use crate::ops::{dlq, review};

fn unavailable(e: &anyhow::Error) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"))
}

/// `GET /v1/dead-letters`.
pub async fn dead_letters<C: JobsCtx>(
    State(ctx): State<std::sync::Arc<C>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => 100,
        Some(Ok(l)) if (1..=1000).contains(&l) => l,
        Some(_) => return error(StatusCode::BAD_REQUEST, "limit: 1 to 1000"),
    };
    let include = q.get("include_replayed").is_some_and(|v| v == "true");
    match dlq::list(
        ctx.pool(),
        q.get("reason").map(String::as_str),
        include,
        limit,
    )
    .await
    {
        Ok(rows) => Json(json!({"dead_letters": rows})).into_response(),
        Err(e) => unavailable(&e),
    }
}

/// `GET /v1/dead-letters/{id}`.
pub async fn dead_letter<C: JobsCtx>(
    State(ctx): State<std::sync::Arc<C>>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return error(StatusCode::BAD_REQUEST, "a dead letter's id is a number");
    };
    match crate::store::dlq::get(ctx.pool(), id).await {
        Ok(Some(d)) => {
            let mut v = serde_json::to_value(&d).unwrap_or_default();
            v["payload"] = String::from_utf8_lossy(&d.payload).into_owned().into();
            Json(v).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no dead letter {id}")),
        Err(e) => unavailable(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    #[serde(default)]
    ids: Vec<i64>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /v1/dead-letters/replay`.
pub async fn replay<C: JobsCtx>(State(ctx): State<std::sync::Arc<C>>, body: Bytes) -> Response {
    let r: ReplayRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the request: {e}")),
    };
    let select = match (r.ids.is_empty(), r.all) {
        (false, false) => dlq::Select::Ids(r.ids),
        (true, true) => dlq::Select::All { reason: r.reason },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give either `ids` or `\"all\": true` (with an optional `reason`)",
            )
        }
    };
    match dlq::replay(ctx.pool(), ctx.bus(), select).await {
        Ok(done) => Json(json!({"replays": done})).into_response(),
        Err(e) => unavailable(&e),
    }
}

/// `GET /v1/reviews`.
pub async fn reviews<C: JobsCtx>(
    State(ctx): State<std::sync::Arc<C>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match review::list(ctx.pool(), q.get("category").map(String::as_str)).await {
        Ok(rows) => Json(json!({"reviews": rows})).into_response(),
        Err(e) => unavailable(&e),
    }
}

/// `GET /v1/reviews/{job_id}`.
pub async fn review_one<C: JobsCtx>(
    State(ctx): State<std::sync::Arc<C>>,
    Path(id): Path<String>,
) -> Response {
    match crate::store::review::job(ctx.pool(), &id).await {
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no job `{id}`")),
        Err(e) => return unavailable(&e),
        Ok(Some(_)) => {}
    }
    match review::show(ctx.pool(), &id).await {
        Ok(d) => Json(d).into_response(),
        Err(e) => unavailable(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveRequest {
    #[serde(default)]
    output: Option<String>,
    #[serde(default)]
    reject: Option<String>,
}

/// `POST /v1/reviews/{job_id}/resolve`.
pub async fn resolve<C: JobsCtx>(
    State(ctx): State<std::sync::Arc<C>>,
    caller: Option<axum::Extension<crate::api::auth::Caller>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let r: ResolveRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the request: {e}")),
    };
    let (how, status) = match (r.output, r.reject) {
        (Some(text), None) => (
            review::Resolution::Output(text),
            crate::store::JobStatus::Succeeded,
        ),
        (None, Some(reason)) => (
            review::Resolution::Reject(reason),
            crate::store::JobStatus::Failed,
        ),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give either `output` (the answer) or `reject` (the reason)",
            )
        }
    };
    let by = format!(
        "api:{}",
        caller.map_or_else(|| "unknown".to_string(), |c| c.0 .0)
    );
    match crate::store::review::job(ctx.pool(), &id).await {
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no job `{id}`")),
        Ok(Some(j)) if j.status != crate::store::JobStatus::NeedsReview => {
            return (
                StatusCode::CONFLICT,
                Json(json!({"job_id": id, "status": j.status.as_str(),
                            "error": "the job is not waiting for review"})),
            )
                .into_response()
        }
        Ok(Some(_)) => {}
        Err(e) => return unavailable(&e),
    }
    match review::resolve(ctx.pool(), &id, how, &by).await {
        Ok(category) => {
            ctx.bus()
                .publish_done(&crate::bus::DoneEvent {
                    job_id: id.clone(),
                    category,
                    status,
                })
                .await;
            Json(json!({"job_id": id, "status": status.as_str()})).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}
