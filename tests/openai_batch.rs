//! The OpenAI Batch-compatible front door over real HTTP on loopback: the
//! official openai SDK uploads, creates, polls and downloads a batch whose
//! lines run as Switchyard jobs (through the providers' batch APIs, at half
//! price); a cancelled batch cancels its jobs and ends with what finished;
//! batches list in pages; an upload that is not JSONL is a clear 400; and
//! the output file is written once however many readers finish the batch.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::TestEnv;
use serde_json::{json, Value};
use switchyard::store::tokens::{self, Scope};

struct Front {
    base: String,
    http: reqwest::Client,
    submit: String,
    admin: String,
    _tasks: switchyard::tasks::Tasks,
}

async fn front(env: &TestEnv, cfg: &switchyard::config::Config) -> Front {
    env.bus.ensure_streams(cfg).await.unwrap();
    let (base, tasks) = env.serve_http(cfg).await;
    Front {
        base,
        http: reqwest::Client::new(),
        submit: tokens::create(&env.pool, "catalogue", Scope::Submit)
            .await
            .unwrap(),
        admin: tokens::create(&env.pool, "ops", Scope::Admin)
            .await
            .unwrap(),
        _tasks: tasks,
    }
}

const BOUNDARY: &str = "switchyard-test-boundary";

/// A `POST /v1/files` form, as the SDK sends it.
fn form(purpose: &str, content: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(content);
    b.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    b
}

fn line(custom_id: &str, model: &str) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": model, "max_tokens": 40,
                    "messages": [{"role": "user", "content": format!("Question {custom_id}?")}]}})
    .to_string()
}

impl Front {
    async fn send(&self, r: reqwest::RequestBuilder, token: &str) -> (u16, Value) {
        let r = r.bearer_auth(token).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn upload(&self, purpose: &str, content: &[u8]) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/files", self.base))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(form(purpose, content));
        self.send(r, &self.submit).await
    }

    /// Upload `lines` and create a batch of them; the batch object.
    async fn batch(&self, lines: &[String]) -> Value {
        let (s, f) = self.upload("batch", lines.join("\n").as_bytes()).await;
        assert_eq!(s, 200, "{f}");
        let (s, b) = self
            .post(
                "/v1/batches",
                json!({"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                       "completion_window": "24h"}),
                &self.submit,
            )
            .await;
        assert_eq!(s, 200, "{b}");
        b
    }

    async fn post(&self, path: &str, body: Value, token: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        self.send(r, token).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{path}", self.base));
        self.send(r, &self.submit).await
    }

    async fn content(&self, file_id: &Value) -> Vec<Value> {
        let Some(id) = file_id.as_str() else {
            return Vec::new();
        };
        let r = self
            .http
            .get(format!("{}/v1/files/{id}/content", self.base))
            .bearer_auth(&self.submit)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text()
            .await
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Poll batch `id` until its status is `want`.
    async fn until(&self, id: &str, want: &str) -> Value {
        let mut last = Value::Null;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (s, b) = self.get(&format!("/v1/batches/{id}")).await;
            assert_eq!(s, 200, "{b}");
            if b["status"] == want {
                return b;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "batch {id} never became {want}: {last}"
            );
            last = b;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn custom_ids(lines: &[Value]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_runs_a_batch_through_switchyard_at_batch_prices() {
    let python = std::env::var("PROVIDER_SDK_PYTHON")
        .unwrap_or_else(|_| format!("{}/target/sdk-venv/bin/python", env!("CARGO_MANIFEST_DIR")));
    if !common::have(
        "the openai Python SDK (./scripts/test.sh installs it in target/sdk-venv)",
        std::path::Path::new(&python).exists(),
    ) {
        return;
    }
    let env = TestEnv::new(switchyard::sim::SimProfile {
        batch_ms: Some(200),
        ..Default::default()
    })
    .await;
    // The shipped mapping: every model to `overnight` (delivery = "auto"),
    // whose batches are sent a second after their first item here.
    let cfg = env.config_with(&[(
        "SWITCHYARD_CATEGORIES__OVERNIGHT__BATCH",
        r#"{ min_slack = "2h", flush_after = "1s" }"#,
    )]);
    let worker = env.start_worker(cfg.clone()).await;
    let api = front(&env, &cfg).await;

    let out = tokio::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/openai_batch_front_door.py"
        ))
        .arg(format!("{}/v1", api.base))
        .arg(&api.submit)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(
        v["request_counts"],
        json!({"total": 4, "completed": 3, "failed": 1}),
        "{v}"
    );
    let statuses: Vec<&str> = v["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(statuses.last(), Some(&"completed"), "{v}");
    assert!(!statuses.contains(&"failed"), "{v}");
    let output = v["output"].as_array().unwrap();
    assert_eq!(
        custom_ids(output),
        ["q-1", "q-2", "q-3"].map(String::from).into()
    );
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{v}");
    assert_eq!(errors[0]["custom_id"], "q-unmapped");
    assert_eq!(errors[0]["code"], "model_not_found");
    let why = errors[0]["message"].as_str().unwrap();
    assert!(
        why.contains("gpt-9-imaginary") && why.contains("openai_batch.models"),
        "{why}"
    );

    // Each answered line is a job of `overnight`, answered through the
    // provider's batch API, carrying its batch and custom_id, with the
    // usage its output line reports.
    let batch_id = v["batch_id"].as_str().unwrap();
    for l in output {
        let job = l["job_id"].as_str().unwrap();
        let (category, meta, deadline): (String, Value, Option<String>) = sqlx::query_as(
            "SELECT category, envelope->'metadata', envelope->>'deadline' FROM jobs WHERE id = $1",
        )
        .bind(job)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(category, "overnight");
        assert_eq!(
            meta,
            json!({"client_batch_id": batch_id, "custom_id": l["custom_id"]})
        );
        assert!(deadline.is_some());
        let (batched, inp, outp): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE c.batch_id IS NOT NULL), r.input_tokens, r.output_tokens
             FROM results r JOIN calls c ON c.job_id = r.job_id WHERE r.job_id = $1
             GROUP BY r.input_tokens, r.output_tokens",
        )
        .bind(job)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(batched, 1, "{job} went through a provider batch");
        assert_eq!(l["usage"]["prompt_tokens"], inp);
        assert_eq!(l["usage"]["completion_tokens"], outp);
    }
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE id LIKE 'batch_%'")
            .await,
        3
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// `fast` lines run at once; `slow` ones wait in a provider batch that is
/// not sent for an hour, until the client cancels.
fn cancel_config(env: &TestEnv) -> switchyard::config::Config {
    let mut overrides = common::SINGLE_ROUTES.to_vec();
    overrides.extend([
        (
            "SWITCHYARD_OPENAI_BATCH__MODELS",
            r#"{ "fast" = "support", "slow" = "overnight" }"#,
        ),
        (
            "SWITCHYARD_CATEGORIES__OVERNIGHT__BATCH",
            r#"{ min_slack = "2h", flush_after = "1h" }"#,
        ),
    ]);
    env.config_with(&overrides)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_batch_cancels_its_unfinished_jobs_and_keeps_what_finished() {
    let env = TestEnv::new(Default::default()).await;
    let cfg = cancel_config(&env);
    let worker = env.start_worker(cfg.clone()).await;
    let api = front(&env, &cfg).await;
    let b = api
        .batch(&[
            line("f-1", "fast"),
            line("f-2", "fast"),
            line("s-1", "slow"),
            line("s-2", "slow"),
        ])
        .await;
    let id = b["id"].as_str().unwrap();
    assert_eq!(b["status"], "in_progress", "{b}");
    common::wait_until(
        Duration::from_secs(30),
        "the fast lines answered, the slow ones waiting",
        || async {
            let done = env
                .count(&format!(
                    "SELECT count(*) FROM jobs WHERE id LIKE '{id}-%' AND status = 'succeeded'"
                ))
                .await;
            let waiting = env
                .count(&format!(
                    "SELECT count(*) FROM jobs WHERE id LIKE '{id}-%' AND status IN ('queued', 'running')"
                ))
                .await;
            done == 2 && waiting == 2
        },
    )
    .await;
    let (s, b) = api.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(b["status"], "in_progress");
    assert_eq!(
        b["request_counts"],
        json!({"total": 4, "completed": 2, "failed": 0})
    );

    // A read token may not cancel; the submit token that created it may.
    let reader = tokens::create(&env.pool, "analyst", Scope::Read)
        .await
        .unwrap();
    let (s, _) = api
        .post(&format!("/v1/batches/{id}/cancel"), json!({}), &reader)
        .await;
    assert_eq!(s, 403);
    let (s, b) = api
        .post(&format!("/v1/batches/{id}/cancel"), json!({}), &api.submit)
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["status"], "cancelling");
    assert!(b["cancelling_at"].is_i64());
    let b = api.until(id, "cancelled").await;
    assert_eq!(
        b["request_counts"],
        json!({"total": 4, "completed": 2, "failed": 2})
    );
    assert!(b["cancelled_at"].is_i64());
    let output = api.content(&b["output_file_id"]).await;
    assert_eq!(custom_ids(&output), ["f-1", "f-2"].map(String::from).into());
    let errors = api.content(&b["error_file_id"]).await;
    assert_eq!(custom_ids(&errors), ["s-1", "s-2"].map(String::from).into());
    assert!(errors
        .iter()
        .all(|l| l["error"]["code"] == "batch_cancelled"));
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM jobs WHERE id LIKE '{id}-%' AND status = 'cancelled'"
        ))
        .await,
        2
    );
    // Cancelling again changes nothing; a finished batch cannot be cancelled.
    let (s, again) = api
        .post(&format!("/v1/batches/{id}/cancel"), json!({}), &api.admin)
        .await;
    assert_eq!((s, &again["status"]), (200, &json!("cancelled")));
    let done = api.batch(&[line("f-3", "fast")]).await;
    let done_id = done["id"].as_str().unwrap();
    api.until(done_id, "completed").await;
    let (s, e) = api
        .post(
            &format!("/v1/batches/{done_id}/cancel"),
            json!({}),
            &api.admin,
        )
        .await;
    assert_eq!(s, 409, "{e}");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("completed"));
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cancelled_before_any_worker_took_its_jobs_calls_nothing() {
    let env = TestEnv::new(Default::default()).await;
    let cfg = cancel_config(&env);
    let api = front(&env, &cfg).await;
    let b = api
        .batch(&[line("a", "fast"), line("b", "fast"), line("c", "slow")])
        .await;
    let id = b["id"].as_str().unwrap();
    let (s, b) = api
        .post(&format!("/v1/batches/{id}/cancel"), json!({}), &api.submit)
        .await;
    assert_eq!((s, &b["status"]), (200, &json!("cancelling")), "{b}");
    let b = api.until(id, "cancelled").await;
    assert_eq!(
        b["request_counts"],
        json!({"total": 3, "completed": 0, "failed": 3})
    );
    assert!(b["output_file_id"].is_null());
    // The dispatcher takes the jobs later: they stay cancelled, and no
    // provider is called.
    let worker = env.start_worker(cfg.clone()).await;
    common::wait_until(
        Duration::from_secs(30),
        "the jobs stream drained",
        || async {
            env.bus
                .queue_depths(&[])
                .await
                .is_ok_and(|d| d.jobs.values().all(|n| *n == 0))
        },
    )
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'cancelled'")
            .await,
        3
    );
    assert_eq!(env.count("SELECT count(*) FROM calls").await, 0);
    assert_eq!(env.sim.ledger().len(), 0);
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_list_newest_first_in_pages_and_each_token_sees_its_own() {
    let env = TestEnv::new(Default::default()).await;
    let cfg = cancel_config(&env);
    let api = front(&env, &cfg).await;
    let mut made = Vec::new();
    for i in 0..5 {
        let b = api.batch(&[line(&format!("l-{i}"), "fast")]).await;
        made.push(b["id"].as_str().unwrap().to_string());
    }
    made.reverse(); // newest first
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &after {
            Some(a) => format!("/v1/batches?limit=2&after={a}"),
            None => "/v1/batches?limit=2".to_string(),
        };
        let (s, page) = api.get(&q).await;
        assert_eq!(s, 200, "{page}");
        assert_eq!(page["object"], "list");
        pages += 1;
        let data = page["data"].as_array().unwrap();
        seen.extend(data.iter().map(|b| b["id"].as_str().unwrap().to_string()));
        assert_eq!(page["first_id"], data[0]["id"]);
        assert_eq!(page["last_id"], data[data.len() - 1]["id"]);
        if page["has_more"] == false {
            break;
        }
        after = page["last_id"].as_str().map(String::from);
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, made);
    // Another submit token sees none of them; an admin sees them all.
    let other = tokens::create(&env.pool, "someone-else", Scope::Submit)
        .await
        .unwrap();
    let r = api
        .http
        .get(format!("{}/v1/batches", api.base))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["data"], json!([]));
    let r = api
        .http
        .get(format!("{}/v1/batches/{}", api.base, made[0]))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = api
        .http
        .get(format!("{}/v1/batches?limit=100", api.base))
        .bearer_auth(&api.admin)
        .send()
        .await
        .unwrap();
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 5);
    let (s, e) = api.get("/v1/batches?limit=0").await;
    assert_eq!((s, &e["error"]["param"]), (400, &json!("limit")));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_is_not_jsonl_is_refused_with_the_line_at_fault() {
    let env = TestEnv::new(Default::default()).await;
    let cfg = env.config();
    let api = front(&env, &cfg).await;
    let content = format!("{}\nthis is not json\n", line("a", "gpt-4o"));
    let (s, e) = api.upload("batch", content.as_bytes()).await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["param"], "file");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("line 2") && msg.contains("JSONL"), "{msg}");
    let (s, e) = api.upload("batch", b"").await;
    assert_eq!(s, 400, "{e}");
    let (s, e) = api
        .upload("fine-tune", line("a", "gpt-4o").as_bytes())
        .await;
    assert_eq!((s, &e["error"]["param"]), (400, &json!("purpose")), "{e}");
    // Not a form at all.
    let (s, e) = api
        .post("/v1/files", json!({"file": "x"}), &api.submit)
        .await;
    assert_eq!(s, 400, "{e}");
    assert!(e["error"]["message"].is_string(), "{e}");
    // A batch of a good file with the wrong endpoint or window.
    let (_, f) = api.upload("batch", line("a", "gpt-4o").as_bytes()).await;
    for (body, param) in [
        (
            json!({"input_file_id": f["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}),
            "endpoint",
        ),
        (
            json!({"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "1h"}),
            "completion_window",
        ),
    ] {
        let (s, e) = api.post("/v1/batches", body, &api.submit).await;
        assert_eq!((s, &e["error"]["param"]), (400, &json!(param)), "{e}");
    }
    assert_eq!(env.count("SELECT count(*) FROM client_batches").await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_batch_gets_one_output_file_however_many_read_it_at_once() {
    let env = TestEnv::new(Default::default()).await;
    let cfg = cancel_config(&env);
    let worker = env.start_worker(cfg.clone()).await;
    let api = front(&env, &cfg).await;
    let lines: Vec<String> = (0..6).map(|i| line(&format!("c-{i}"), "fast")).collect();
    let mut lines = lines;
    lines.push(line("bad", "gpt-unknown"));
    let b = api.batch(&lines).await;
    let id = b["id"].as_str().unwrap().to_string();
    // Wait for the jobs themselves (not through the batch), so that the
    // concurrent reads below are the first to find them all ended.
    common::wait_until(Duration::from_secs(30), "every job ended", || async {
        env.count(&format!(
            "SELECT count(*) FROM jobs WHERE id LIKE '{id}-%' AND status = 'succeeded'"
        ))
        .await
            == 6
    })
    .await;
    let path = format!("/v1/batches/{id}");
    let reads = (0..8).map(|_| api.get(&path));
    let results = futures::future::join_all(reads).await;
    let mut finished_files = BTreeSet::new();
    for (s, b) in &results {
        assert_eq!(*s, 200, "{b}");
        assert!(
            ["finalizing", "completed"].contains(&b["status"].as_str().unwrap()),
            "{b}"
        );
        if b["status"] == "completed" {
            finished_files.insert((
                b["output_file_id"].to_string(),
                b["error_file_id"].to_string(),
            ));
        }
    }
    let b = api.until(&id, "completed").await;
    finished_files.insert((
        b["output_file_id"].to_string(),
        b["error_file_id"].to_string(),
    ));
    assert_eq!(finished_files.len(), 1, "{finished_files:?}");
    assert_eq!(
        env.count("SELECT count(*) FROM client_files WHERE purpose = 'batch_output'")
            .await,
        2
    );
    assert_eq!(
        b["request_counts"],
        json!({"total": 7, "completed": 6, "failed": 1})
    );
    assert_eq!(api.content(&b["output_file_id"]).await.len(), 6);
    // Reading again changes nothing.
    let (_, again) = api.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(again["output_file_id"], b["output_file_id"]);
    assert_eq!(again["completed_at"], b["completed_at"]);
    assert!(
        !switchyard::store::client_batches::claim_finalize(&env.pool, &id, Duration::ZERO)
            .await
            .unwrap()
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_create_with_its_idempotency_key_is_one_batch_and_one_job_per_line() {
    let env = TestEnv::new(Default::default()).await;
    let cfg = cancel_config(&env);
    let api = front(&env, &cfg).await;
    let content = [line("a", "fast"), line("b", "slow")].join("\n");
    let (_, f) = api.upload("batch", content.as_bytes()).await;
    let create = || {
        let r = api
            .http
            .post(format!("{}/v1/batches", api.base))
            .header("content-type", "application/json")
            .header("idempotency-key", "nightly-2026-11-29")
            .body(
                json!({"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                       "completion_window": "24h"})
                .to_string(),
            );
        api.send(r, &api.submit)
    };
    let (s1, b1) = create().await;
    let (s2, b2) = create().await;
    assert_eq!((s1, s2), (200, 200), "{b1} {b2}");
    assert_eq!(b1["id"], b2["id"]);
    assert_eq!(env.count("SELECT count(*) FROM client_batches").await, 1);
    // One message per line on the jobs stream: nothing was published twice.
    let depths = env.bus.queue_depths(&[]).await.unwrap();
    assert_eq!(depths.jobs.values().sum::<u64>(), 2, "{depths:?}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_past_its_window_expires_and_its_unfinished_lines_say_so() {
    let env = TestEnv::new(Default::default()).await;
    let cfg = cancel_config(&env);
    let api = front(&env, &cfg).await;
    let b = api.batch(&[line("a", "fast"), line("b", "slow")]).await;
    let id = b["id"].as_str().unwrap();
    // 24 hours later (no worker ran).
    sqlx::query("UPDATE client_batches SET expires_at = now() - interval '1 second'")
        .execute(&env.pool)
        .await
        .unwrap();
    let b = api.until(id, "expired").await;
    assert!(b["expired_at"].is_i64());
    assert_eq!(
        b["request_counts"],
        json!({"total": 2, "completed": 0, "failed": 2})
    );
    let errors = api.content(&b["error_file_id"]).await;
    assert_eq!(errors.len(), 2);
    assert!(errors.iter().all(|l| l["error"]["code"] == "batch_expired"));
    env.cleanup().await;
}
