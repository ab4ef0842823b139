//! The jobs API over real HTTP on loopback: submit one job or many, the
//! same id twice is one job, bad lines are reported by line while the good
//! ones run, a job reads back with its result and calls, and the list pages
//! stably while jobs keep arriving.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::TestEnv;
use serde_json::{json, Value};
use switchyard::store::tokens::{self, Scope};

struct Api {
    base: String,
    http: reqwest::Client,
    submit: String,
    read: String,
    _tasks: switchyard::tasks::Tasks,
}

async fn api(env: &TestEnv, cfg: &switchyard::config::Config) -> Api {
    let (base, tasks) = env.serve_http(cfg).await;
    Api {
        base,
        http: reqwest::Client::new(),
        submit: tokens::create(&env.pool, "backend", Scope::Submit)
            .await
            .unwrap(),
        read: tokens::create(&env.pool, "analyst", Scope::Read)
            .await
            .unwrap(),
        _tasks: tasks,
    }
}

impl Api {
    async fn post(&self, body: String, content_type: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .bearer_auth(&self.submit)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.read)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn wait_done(&self, ids: &[&str]) {
        for id in ids {
            common::wait_until(
                Duration::from_secs(30),
                &format!("{id} finished"),
                || async {
                    let (_, v) = self.get(&format!("/v1/jobs/{id}")).await;
                    matches!(
                        v["status"].as_str(),
                        Some("succeeded" | "failed" | "needs_review" | "dead")
                    )
                },
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_submitted_once_and_read_back_with_their_result() {
    let env = TestEnv::new(Default::default()).await;
    let worker = env.start_worker(env.config()).await;
    let api = api(&env, &env.config()).await;

    let job = json!({"id": "web-1", "category": "support", "prompt": "Where is my parcel?",
                     "metadata": {"customer": "c-9"}});
    let (status, v) = api.post(job.to_string(), "application/json").await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["id"], "web-1");
    assert_eq!(v["status"], "queued");
    api.wait_done(&["web-1"]).await;
    // The same id again: its state, never a second job.
    let (status, v) = api.post(job.to_string(), "application/json").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "exists");
    assert_eq!(v["job_status"], "succeeded");
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM results").await, 1);

    let (status, v) = api.get("/v1/jobs/web-1").await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "succeeded");
    assert!(!v["output"].as_str().unwrap().is_empty());
    assert!(v["model"].is_string());
    let cost: rust_decimal::Decimal = v["cost_usd"].as_str().unwrap().parse().unwrap();
    assert!(cost > rust_decimal::Decimal::ZERO);
    assert_eq!(v["metadata"]["customer"], "c-9");
    assert!(
        v["route_decision"]["kind"].is_string(),
        "the decision log: {v}"
    );
    assert!(!v["calls"].as_array().unwrap().is_empty());
    assert_eq!(api.get("/v1/jobs/nobody").await.0, 404);

    // A job without an id gets one, and says which.
    let (status, v) = api
        .post(
            json!({"category": "support", "prompt": "Hello"}).to_string(),
            "application/json",
        )
        .await;
    assert_eq!(status, 202);
    let made = v["id"].as_str().unwrap().to_string();
    api.wait_done(&[made.as_str()]).await;
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_request_reports_bad_lines_and_runs_the_good_ones() {
    let env = TestEnv::new(Default::default()).await;
    let worker = env.start_worker(env.config()).await;
    let api = api(&env, &env.config()).await;
    let lines = [
        json!({"id": "bulk-1", "category": "support", "prompt": "one"}).to_string(),
        "{not json".to_string(),
        json!({"id": "bulk-3", "category": "nowhere", "prompt": "three"}).to_string(),
        json!({"id": "bulk-4", "category": "support", "prompt": ""}).to_string(),
        json!({"id": "bulk-5", "prompt": "no category"}).to_string(),
        json!({"id": "bulk-6", "category": "sales", "promt": "typo"}).to_string(),
        json!({"id": "bulk-7", "category": "sales", "prompt": "seven"}).to_string(),
    ];
    let (status, v) = api.post(lines.join("\n"), "application/x-ndjson").await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["accepted"], 2);
    assert_eq!(v["rejected"], 5);
    let by_line = |n: u64| {
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["line"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by_line(1)["status"], "queued");
    assert!(by_line(2)["reason"].as_str().unwrap().contains("not JSON"));
    assert!(by_line(3)["reason"]
        .as_str()
        .unwrap()
        .contains("unknown category `nowhere`"));
    assert!(by_line(4)["reason"]
        .as_str()
        .unwrap()
        .contains("empty input"));
    assert!(by_line(5)["reason"]
        .as_str()
        .unwrap()
        .contains("`category` is required"));
    assert!(by_line(6)["reason"].as_str().unwrap().contains("promt"));
    assert_eq!(by_line(7)["status"], "queued");
    api.wait_done(&["bulk-1", "bulk-7"]).await;
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .await,
        2
    );
    // A JSON array works the same way.
    let (status, v) = api
        .post(
            json!([{"id": "arr-1", "category": "support", "prompt": "a"},
                   {"id": "arr-2", "category": "support", "prompt": "b"}])
            .to_string(),
            "application/json",
        )
        .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["accepted"], 2);
    api.wait_done(&["arr-1", "arr-2"]).await;
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_filters_and_pages_stably_while_jobs_arrive() {
    let env = TestEnv::new(Default::default()).await;
    let worker = env.start_worker(env.config()).await;
    let api = api(&env, &env.config()).await;
    let batch = |from: usize, n: usize, tag: &str| {
        (from..from + n)
            .map(|i| {
                json!({"id": format!("list-{i:03}"), "category": if i % 2 == 0 { "support" } else { "sales" },
                       "prompt": format!("question {i}"), "metadata": {"batch": tag}})
                .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        api.post(batch(0, 25, "a"), "application/x-ndjson").await.0,
        202
    );
    common::wait_until(Duration::from_secs(30), "25 jobs stored", || async {
        env.count("SELECT count(*) FROM jobs").await == 25
    })
    .await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?limit=10&metadata.batch=a&cursor={c}"),
            None => "/v1/jobs?limit=10&metadata.batch=a".to_string(),
        };
        let (status, v) = api.get(&path).await;
        assert_eq!(status, 200, "{v}");
        pages += 1;
        if pages == 1 {
            // Jobs arriving meanwhile sort before the cursor: no page shifts.
            assert_eq!(
                api.post(batch(100, 10, "a"), "application/x-ndjson")
                    .await
                    .0,
                202
            );
        }
        for j in v["jobs"].as_array().unwrap() {
            seen.push(j["id"].as_str().unwrap().to_string());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let first: HashSet<String> = (0..25).map(|i| format!("list-{i:03}")).collect();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no job twice: {seen:?}");
    assert!(
        first.iter().all(|id| unique.contains(id)),
        "no job skipped: {seen:?}"
    );

    let (_, v) = api.get("/v1/jobs?category=sales&limit=500").await;
    let sales = v["jobs"].as_array().unwrap();
    assert!(!sales.is_empty() && sales.iter().all(|j| j["category"] == "sales"));
    assert_eq!(api.get("/v1/jobs?status=bogus").await.0, 400);
    assert_eq!(api.get("/v1/jobs?limit=0").await.0, 400);
    assert_eq!(api.get("/v1/jobs?cursor=%%%").await.0, 400);
    assert_eq!(api.get("/v1/jobs?colour=red").await.0, 400);
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// Cancelling: a running multi-step job stops at its next step (the call
/// under way is recorded), queued jobs cancelled by a filter never call a
/// provider, a finished job says so and stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_jobs_stop_at_the_next_step_and_queued_ones_never_call() {
    let env = TestEnv::new(switchyard::sim::SimProfile {
        latency_ms: 1200,
        ..Default::default()
    })
    .await;
    let mut cfg = env.config_from(&format!(
        "{}\n[categories.slow]\nroute = {{ kind = \"single\", target = \"gpt-4o-mini\" }}\n\
         [categories.steps]\nroute = {{ kind = \"pipeline\", stages = [\
           {{ name = \"a\", target = \"claude-haiku-4-5\" }}, {{ name = \"b\", target = \"claude-haiku-4-5\" }}] }}\n",
        common::SHIPPED_CONFIG
    ));
    cfg.providers.get_mut("openai").unwrap().max_concurrency = 1;
    let worker = env.start_worker(cfg.clone()).await;
    let api = api(&env, &cfg).await;
    let admin = tokens::create(&env.pool, "ops", Scope::Admin)
        .await
        .unwrap();
    let post = |path: String, body: String| {
        let r = api
            .http
            .post(format!("{}{path}", api.base))
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body(body);
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let calls_of = |id: &'static str| {
        let ledger = env.sim.ledger();
        ledger
            .iter()
            .filter(|e| e.call.as_ref().is_some_and(|t| t.job_id == id))
            .count()
    };

    // A running two-stage job: cancelled while its first stage is called.
    let job = json!({"id": "two-steps", "category": "steps", "prompt": "draft then polish"});
    let (status, v) = api.post(job.to_string(), "application/json").await;
    assert_eq!(status, 202, "{v}");
    common::wait_until(
        Duration::from_secs(20),
        "the first stage under way",
        || async {
            env.count(
                "SELECT count(*) FROM calls WHERE job_id = 'two-steps' AND outcome = 'unknown'",
            )
            .await
                == 1
        },
    )
    .await;
    let (status, v) = post("/v1/jobs/two-steps/cancel".into(), String::new()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "cancelled");

    // Queued jobs behind one running call (the lane takes one at a time),
    // cancelled by their metadata.
    let line = |i: usize| {
        json!({"id": format!("q-{i}"), "category": "slow", "prompt": format!("question {i}"),
               "metadata": {"wave": if i == 0 { "first" } else { "rest" }}})
        .to_string()
    };
    assert_eq!(api.post(line(0), "application/json").await.0, 202);
    common::wait_until(Duration::from_secs(20), "q-0 under way", || async {
        env.count("SELECT count(*) FROM calls WHERE job_id = 'q-0' AND outcome = 'unknown'")
            .await
            == 1
    })
    .await;
    let lines: Vec<String> = (1..5).map(line).collect();
    assert_eq!(
        api.post(lines.join("\n"), "application/x-ndjson").await.0,
        202
    );
    common::wait_until(Duration::from_secs(20), "five jobs stored", || async {
        env.count("SELECT count(*) FROM jobs WHERE id LIKE 'q-%'")
            .await
            == 5
    })
    .await;
    let (status, v) = post(
        "/v1/jobs/cancel".into(),
        json!({"category": "slow", "metadata": {"wave": "rest"}}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["cancelled"], 4);

    // Everything settles: the first stage's call recorded, nothing else called.
    api.wait_done(&["q-0"]).await;
    common::wait_until(
        Duration::from_secs(20),
        "the stage under way recorded",
        || async {
            env.count("SELECT count(*) FROM calls WHERE job_id = 'two-steps' AND outcome = 'ok'")
                .await
                == 1
        },
    )
    .await;
    common::wait_until(Duration::from_secs(20), "the lanes drained", || async {
        let d = env
            .bus
            .queue_depths(&["openai".into(), "anthropic".into()])
            .await
            .unwrap();
        d.lanes.values().all(|n| *n == 0)
    })
    .await;
    assert_eq!(
        calls_of("two-steps"),
        1,
        "the second stage was never called"
    );
    for i in 1..5 {
        let id = format!("q-{i}");
        assert!(
            !env.sim
                .ledger()
                .iter()
                .any(|e| e.call.as_ref().is_some_and(|t| t.job_id == id)),
            "{id} never called a provider"
        );
    }
    let statuses: Vec<(String, String)> = sqlx::query_as("SELECT id, status FROM jobs ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    for (id, status) in &statuses {
        let want = if id == "q-0" {
            "succeeded"
        } else {
            "cancelled"
        };
        assert_eq!(status, want, "{id}");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM results WHERE job_id <> 'q-0'")
            .await,
        0,
        "a cancelled job keeps no result"
    );
    // A finished job: 409, unchanged.
    let (status, v) = post("/v1/jobs/q-0/cancel".into(), String::new()).await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["status"], "succeeded");
    assert_eq!(
        post("/v1/jobs/nobody/cancel".into(), String::new()).await.0,
        404
    );
    assert_eq!(post("/v1/jobs/cancel".into(), "{}".into()).await.0, 400);
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// A submit token reads back the jobs it submitted and no other; the Rust
/// client and the Python example (`examples/submit_and_wait.py`, with httpx
/// from the SDK environment `scripts/test.sh` installs) do a whole round
/// trip with one submit token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_tokens_read_their_own_jobs_and_the_clients_round_trip() {
    let env = TestEnv::new(Default::default()).await;
    let worker = env.start_worker(env.config()).await;
    let api = api(&env, &env.config()).await;
    let other = tokens::create(&env.pool, "other-team", Scope::Submit)
        .await
        .unwrap();

    let client = switchyard::client::Client::new(&api.base, &api.submit).unwrap();
    let id = client
        .submit(&json!({"id": "mine-1", "category": "support", "prompt": "Is it raining?"}))
        .await
        .unwrap();
    assert_eq!(id, "mine-1");
    let job = client.wait(&id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(!job["output"].as_str().unwrap().is_empty());
    // Another submit token does not see it; a read token does.
    let theirs = switchyard::client::Client::new(&api.base, &other).unwrap();
    assert!(theirs.get("mine-1").await.unwrap().is_none());
    assert_eq!(api.get("/v1/jobs/mine-1").await.0, 200);
    // The same id again is the same job.
    assert_eq!(
        client
            .submit(&json!({"id": "mine-1", "category": "support", "prompt": "Is it raining?"}))
            .await
            .unwrap(),
        "mine-1"
    );
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 1);

    let python = std::env::var("PROVIDER_SDK_PYTHON")
        .unwrap_or_else(|_| format!("{}/target/sdk-venv/bin/python", env!("CARGO_MANIFEST_DIR")));
    if common::have(
        "Python with httpx (./scripts/test.sh installs it in target/sdk-venv)",
        std::path::Path::new(&python).exists(),
    ) {
        let out = tokio::process::Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/submit_and_wait.py"
            ))
            .args(["support", "Where", "is", "my", "parcel?"])
            .env("SWITCHYARD_URL", &api.base)
            .env("SWITCHYARD_TOKEN", &api.submit)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["status"], "succeeded", "{v}");
        assert!(v["model"].is_string() && v["cost_usd"].is_string());
        assert_eq!(env.count("SELECT count(*) FROM jobs").await, 2);
    }
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// Dead letters and the review queue over HTTP, as the CLI has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_reviews_are_served_and_acted_on() {
    let mut profile = switchyard::sim::SimProfile::default();
    profile.model_errors.insert("gpt-4o-mini".into(), 1.0);
    let env = TestEnv::new(profile).await;
    let cfg = env.config_from(&format!(
        "{}\n[categories.esc]\nroute = {{ kind = \"fallback\", targets = [\"gpt-4o-mini\"] }}\n",
        common::SHIPPED_CONFIG
    ));
    let worker = env.start_worker(cfg.clone()).await;
    let api = api(&env, &cfg).await;
    let admin = tokens::create(&env.pool, "ops", Scope::Admin)
        .await
        .unwrap();
    let post = |path: &str, body: Value| {
        let r = api
            .http
            .post(format!("{}{path}", api.base))
            .bearer_auth(&admin)
            .json(&body);
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };

    // A message that is not a job: dead-lettered, listed, shown, replayed once.
    env.bus
        .publish_durable(
            env.bus.names.job_subject("support"),
            "junk-1",
            "not json".into(),
        )
        .await
        .unwrap();
    common::wait_until(Duration::from_secs(20), "a dead letter", || async {
        env.count("SELECT count(*) FROM dead_letters").await == 1
    })
    .await;
    let (status, v) = api.get("/v1/dead-letters").await;
    assert_eq!(status, 200);
    let d = &v["dead_letters"][0];
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("not a valid job envelope"),
        "{d}"
    );
    let id = d["id"].as_i64().unwrap();
    let (status, v) = api.get(&format!("/v1/dead-letters/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(v["payload"], "not json");
    let (status, v) = post("/v1/dead-letters/replay", json!({"ids": [id]})).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["replays"][0].get("Replayed").is_some(), "{v}");
    let (_, v) = post("/v1/dead-letters/replay", json!({"ids": [id]})).await;
    assert!(
        v["replays"][0].get("AlreadyReplayed").is_some(),
        "replayed once: {v}"
    );
    assert_eq!(post("/v1/dead-letters/replay", json!({})).await.0, 400);

    // A job whose every target failed waits for a person; one resolves it.
    assert_eq!(
        api.post(
            json!({"id": "hard-1", "category": "esc", "prompt": "A hard one"}).to_string(),
            "application/json"
        )
        .await
        .0,
        202
    );
    api.wait_done(&["hard-1"]).await;
    let (_, v) = api.get("/v1/reviews").await;
    assert_eq!(v["reviews"][0]["job_id"], "hard-1", "{v}");
    let (status, v) = api.get("/v1/reviews/hard-1").await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "needs_review");
    assert!(!v["steps"].as_array().unwrap().is_empty());
    let (status, v) = post(
        "/v1/reviews/hard-1/resolve",
        json!({"output": "Done by hand."}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "succeeded");
    let (_, job) = api.get("/v1/jobs/hard-1").await;
    assert_eq!(job["output"], "Done by hand.");
    assert_eq!(job["model"], "human");
    assert!(
        job["route_decision"].to_string().contains("api:ops"),
        "{job}"
    );
    assert_eq!(
        post("/v1/reviews/hard-1/resolve", json!({"output": "again"}))
            .await
            .0,
        409
    );
    assert_eq!(
        post("/v1/reviews/nobody/resolve", json!({"reject": "x"}))
            .await
            .0,
        404
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}
