//! Completion webhooks over HTTP, with the CLI's semantics (`switchyard
//! webhooks list | replay`):
//!
//! - `GET /v1/webhooks?job_id&limit` (read): delivery attempts, newest
//!   first, one row per attempt.
//! - `POST /v1/webhooks/{id}/replay` (admin): deliver again as a new series;
//!   `{id}` is a delivery id or, when no delivery has that id, a job id.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::jobs::{error, JobsCtx};
use crate::store::webhooks::{self, Replay};

/// `GET /v1/webhooks`.
pub async fn list<C: JobsCtx>(
    State(ctx): State<std::sync::Arc<C>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => 100,
        Some(Ok(l)) if (1..=1000).contains(&l) => l,
        Some(_) => return error(StatusCode::BAD_REQUEST, "limit: 1 to 1000"),
    };
    match webhooks::list(ctx.pool(), q.get("job_id").map(String::as_str), limit).await {
        Ok(rows) => Json(json!({"deliveries": rows})).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

/// `POST /v1/webhooks/{id}/replay`.
pub async fn replay<C: JobsCtx>(
    State(ctx): State<std::sync::Arc<C>>,
    Path(id): Path<String>,
) -> Response {
    match webhooks::replay(ctx.pool(), &id).await {
        Ok(r @ Replay::Started { .. }) => (StatusCode::ACCEPTED, Json(r)).into_response(),
        Ok(Replay::NotFound) => error(
            StatusCode::NOT_FOUND,
            format!("no webhook delivery or job `{id}`"),
        ),
        Ok(Replay::NotEnded { job_id, status }) => (
            StatusCode::CONFLICT,
            Json(json!({"job_id": job_id, "status": status,
                        "error": "the job has not ended: its webhook is sent when it does"})),
        )
            .into_response(),
        Ok(Replay::NoCallback { job_id }) => (
            StatusCode::CONFLICT,
            Json(json!({"job_id": job_id,
                        "error": "the job has no callback_url and was never called back"})),
        )
            .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}
