//! HTTP: bearer-token authentication shared by every HTTP route the worker
//! serves (see [`auth`]), the jobs API ([`jobs`]), dead letters and reviews
//! ([`ops`]), completion webhooks' deliveries ([`webhooks`]) and the OpenAI
//! Batch-compatible front door ([`openai_batch`]).

pub mod auth;
pub mod jobs;
pub mod openai_batch;
pub mod ops;
pub mod webhooks;

use serde_json::{json, Map, Value};

/// The OpenAPI 3 document of `routes`, generated from the route table the
/// router is built from (so every route is described, and nothing else).
pub fn openapi(routes: &[auth::RouteSpec]) -> Value {
    let mut paths = Map::new();
    for r in routes {
        let params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| {
                json!({"name": name, "in": "path", "required": true,
                               "schema": {"type": "string"}})
            })
            .collect();
        let mut responses = json!({"200": {"description": "OK"}});
        let mut op = json!({"summary": r.summary, "parameters": params});
        if let Some(scope) = r.scope {
            op["security"] = json!([{"bearer": []}]);
            op["x-switchyard-scope"] = json!(scope.as_str());
            op["x-switchyard-own-jobs"] = json!(r.own);
            responses["401"] = json!({"description": "no token, or not a live one"});
            responses["403"] = json!({"description": "the token's scope does not allow this"});
            responses["429"] = json!({"description": "too many bad tokens from this address"});
        }
        if r.method == "POST" {
            // File uploads are multipart (OpenAI's `POST /v1/files`).
            let content = if r.path == "/v1/files" {
                "multipart/form-data"
            } else {
                "application/json"
            };
            op["requestBody"] = json!({"content": {content: {"schema": {}}}});
            responses["400"] =
                json!({"description": "the request is not valid; the body says why"});
        }
        op["responses"] = responses;
        let entry = paths
            .entry(r.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[r.method.to_ascii_lowercase()] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Switchyard", "version": env!("CARGO_PKG_VERSION")},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    })
}
