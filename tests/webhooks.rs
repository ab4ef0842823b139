//! Completion webhooks against a real HTTP receiver on loopback, with jobs
//! run by a real worker (NATS, Postgres, the simulator): the signature
//! verifies (in Rust and with the documented Python lines), a receiver that
//! fails twice gets exactly one accepted delivery after retries, an address
//! off the allowlist is refused and recorded, a replay delivers again, and
//! a receiver slower than the timeout holds up no job.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::TestEnv;
use serde_json::Value;
use switchyard::config::Config;
use switchyard::enqueue::{publish_jobs, wait_finished, Outgoing};
use switchyard::envelope::JobEnvelope;
use switchyard::store::JobStatus;
use switchyard::tasks::Tasks;

const SECRET: &str = "whsec-test-3f9a";

/// What the receiver does with the next request.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Status(u16),
    /// 307 to this same receiver's `/hook`.
    Redirect,
    /// Answer 200 after this long (or when the receiver stops).
    Slow(Duration),
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Got {
    signature: String,
    delivery: String,
    body: Bytes,
    answered: u16,
}

#[derive(Default)]
struct Book {
    plan: VecDeque<Answer>,
    got: Vec<Got>,
    /// Requests answered so far (a slow one counts once it answers).
    answered: usize,
}

/// A real HTTP server on loopback that records what it is sent and answers
/// as planned (200 once the plan is used up).
struct Receiver {
    port: u16,
    book: Arc<Mutex<Book>>,
    tasks: Tasks,
}

impl Receiver {
    async fn start(plan: &[Answer]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let book = Arc::new(Mutex::new(Book {
            plan: plan.iter().copied().collect(),
            ..Default::default()
        }));
        let tasks = Tasks::new();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state((book.clone(), tasks.token().clone()));
        let stop = tasks.token().clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = axum::serve(listener, app) => {}
            }
        });
        Self { port, book, tasks }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn got(&self) -> Vec<Got> {
        self.book.lock().unwrap().got.clone()
    }

    fn answered(&self) -> usize {
        self.book.lock().unwrap().answered
    }

    /// Accepted (2xx) deliveries of `job`.
    fn accepted(&self, job: &str) -> Vec<Got> {
        self.got()
            .into_iter()
            .filter(|g| (200..300).contains(&g.answered) && body_json(g)["job_id"] == job)
            .collect()
    }

    async fn stop(self) {
        self.tasks.stop(Duration::from_secs(5)).await;
    }
}

type ReceiverState = (Arc<Mutex<Book>>, tokio_util::sync::CancellationToken);

async fn receive(
    State((book, stop)): State<ReceiverState>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let answer = book
        .lock()
        .unwrap()
        .plan
        .pop_front()
        .unwrap_or(Answer::Status(200));
    let status = match answer {
        Answer::Status(s) => s,
        Answer::Redirect => 307,
        Answer::Slow(_) => 200,
    };
    book.lock().unwrap().got.push(Got {
        signature: header("switchyard-signature"),
        delivery: header("switchyard-delivery"),
        body,
        answered: status,
    });
    if let Answer::Slow(d) = answer {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }
    book.lock().unwrap().answered += 1;
    let status = StatusCode::from_u16(status).unwrap();
    match answer {
        Answer::Redirect => (status, [(axum::http::header::LOCATION, "/hook")]).into_response(),
        _ => status.into_response(),
    }
}

fn body_json(g: &Got) -> Value {
    serde_json::from_slice(&g.body).unwrap()
}

/// The shipped config, one model per category, webhooks allowed to
/// `allow` with the test secret, short backoff and timeout, and `extra`.
fn config(env: &TestEnv, allow: &[String], extra: &[(&str, &str)]) -> Config {
    let hosts = serde_json::to_string(allow).unwrap();
    let mut pairs: Vec<(&str, &str)> = common::SINGLE_ROUTES.to_vec();
    pairs.extend([
        ("SWITCHYARD_WEBHOOKS__ALLOW_HOSTS", hosts.as_str()),
        ("SWITCHYARD_WEBHOOKS__SECRET", SECRET),
        ("SWITCHYARD_WEBHOOKS__BASE_DELAY_MS", "100"),
        ("SWITCHYARD_WEBHOOKS__MAX_DELAY_MS", "400"),
        ("SWITCHYARD_WEBHOOKS__TIMEOUT_SECS", "1"),
    ]);
    pairs.extend(extra.iter().copied());
    env.config_with(&pairs)
}

fn job(id: &str, category: &str, callback: Option<String>) -> Outgoing {
    let mut e = JobEnvelope::prompt(id, category, format!("Question {id}: where is my parcel?"));
    e.callback_url = callback;
    Outgoing::from_envelope(&e).unwrap()
}

async fn run(env: &TestEnv, jobs: &[Outgoing]) {
    publish_jobs(&env.bus, jobs, None).await.unwrap();
    let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap(),
        "the jobs finished"
    );
}

type Attempt = (i32, String, Option<i32>, Option<String>);

/// `(attempt, state, http_status, error)` of job `id`'s attempts, oldest first.
async fn attempts(env: &TestEnv, id: &str) -> Vec<Attempt> {
    let mut rows = switchyard::store::webhooks::list(&env.pool, Some(id), 100)
        .await
        .unwrap();
    rows.reverse();
    rows.into_iter()
        .map(|r| (r.attempt, r.state, r.http_status, r.error))
        .collect()
}

/// An attempt as [`attempts`] lists it.
fn att(n: i32, state: &str, http: Option<i32>, error: Option<&str>) -> Attempt {
    (n, state.to_string(), http, error.map(str::to_string))
}

async fn wait_state(env: &TestEnv, id: &str, state: &str) {
    common::wait_until(
        Duration::from_secs(30),
        &format!("a `{state}` attempt for {id}"),
        || async { attempts(env, id).await.iter().any(|a| a.1 == state) },
    )
    .await;
}

/// The Python lines of docs/api.md, run on a delivery: "True" or "False".
fn python_verifies(secret: &str, g: &Got) -> Option<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    let after = doc
        .split("<!-- webhook-verify")
        .nth(1)
        .expect("docs/api.md marks the verification snippet");
    let snippet = after
        .split("```python\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a python block after the marker");
    assert_eq!(snippet.lines().count(), 5, "five lines:\n{snippet}");
    let python = std::env::var("PROVIDER_SDK_PYTHON").unwrap_or_else(|_| "python3".into());
    let found = std::process::Command::new(&python)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !common::have(&python, found) {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("sy-hook-{}", switchyard::ids::new_job_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body = dir.join("body");
    std::fs::write(&body, &g.body).unwrap();
    let script = format!(
        "{snippet}\nimport sys\nprint(verify(sys.argv[1].encode(), sys.argv[2], open(sys.argv[3], 'rb').read()))\n"
    );
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(secret)
        .arg(&g.signature)
        .arg(&body)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_calls_back_with_a_signed_payload_that_verifies_in_rust_and_python() {
    let env = TestEnv::new(Default::default()).await;
    let rx = Receiver::start(&[]).await;
    let worker = env.start_worker(config(&env, &[rx.host()], &[])).await;
    run(&env, &[job("hook-1", "support", Some(rx.url()))]).await;
    wait_state(&env, "hook-1", "ok").await;

    let got = rx.accepted("hook-1");
    assert_eq!(got.len(), 1, "one delivery: {got:?}");
    let g = &got[0];
    assert!(
        switchyard::webhooks::verify(SECRET.as_bytes(), &g.signature, &g.body),
        "the signature verifies: {}",
        g.signature
    );
    assert!(!switchyard::webhooks::verify(
        b"another secret",
        &g.signature,
        &g.body
    ));
    let v = body_json(g);
    let view = switchyard::store::jobs::job_view(&env.pool, "hook-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v["job_id"], "hook-1");
    assert_eq!(v["category"], "support");
    assert_eq!(v["status"], "succeeded");
    // Money as GET /v1/jobs/{id} reports it: a decimal string.
    assert_eq!(
        v["cost_usd"].as_str().unwrap(),
        view.cost_usd.unwrap().to_string()
    );
    assert_eq!(v["output"].as_str(), view.output.as_deref());
    assert!(!v["output"].as_str().unwrap().is_empty());
    assert!(v["output_json"].is_null());
    let series: i64 = g.delivery.parse().unwrap();
    assert_eq!(
        attempts(&env, "hook-1").await,
        [att(1, "ok", Some(200), None)]
    );
    assert_eq!(
        switchyard::store::webhooks::list(&env.pool, Some("hook-1"), 10)
            .await
            .unwrap()[0]
            .series,
        series
    );

    // The receiver's five lines of Python (docs/api.md) agree.
    if let Some(ok) = python_verifies(SECRET, g) {
        assert_eq!(ok, "True");
        assert_eq!(python_verifies("not the secret", g).unwrap(), "False");
    }
    assert!(worker.shutdown().await);
    rx.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_twice_gets_one_accepted_delivery_after_retries_and_a_replay_delivers_again(
) {
    let env = TestEnv::new(Default::default()).await;
    let rx = Receiver::start(&[Answer::Status(500), Answer::Status(500)]).await;
    let worker = env.start_worker(config(&env, &[rx.host()], &[])).await;
    run(&env, &[job("retry-1", "sales", Some(rx.url()))]).await;
    wait_state(&env, "retry-1", "ok").await;
    let got = rx.got();
    assert_eq!(
        got.iter().map(|g| g.answered).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    // One series: the same delivery id on every attempt.
    assert!(got.iter().all(|g| g.delivery == got[0].delivery));
    assert_eq!(rx.accepted("retry-1").len(), 1);
    assert_eq!(
        attempts(&env, "retry-1").await,
        [
            att(
                1,
                "failed",
                Some(500),
                Some("HTTP 500 Internal Server Error")
            ),
            att(
                2,
                "failed",
                Some(500),
                Some("HTTP 500 Internal Server Error")
            ),
            att(3, "ok", Some(200), None),
        ]
    );
    assert_eq!(
        env.count("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
            .await,
        0,
        "nothing more to send"
    );

    // Replay over HTTP (admin), by the delivery id: a second accepted delivery.
    let cfg = config(&env, &[rx.host()], &[]);
    let (base, api_tasks) = env.serve_http(&cfg).await;
    let admin = switchyard::store::tokens::create(
        &env.pool,
        "ops",
        switchyard::store::tokens::Scope::Admin,
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let first: i64 = got[0].delivery.parse().unwrap();
    let r = http
        .post(format!("{base}/v1/webhooks/{first}/replay"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["outcome"], "started");
    assert_eq!(v["job_id"], "retry-1");
    common::wait_until(Duration::from_secs(30), "the replay delivered", || async {
        rx.accepted("retry-1").len() == 2
    })
    .await;
    let replayed = rx.accepted("retry-1")[1].clone();
    assert_ne!(replayed.delivery, got[0].delivery, "a new series");
    assert!(switchyard::webhooks::verify(
        SECRET.as_bytes(),
        &replayed.signature,
        &replayed.body
    ));
    // The list over HTTP shows the four attempts, the replay's first.
    let v: Value = http
        .get(format!("{base}/v1/webhooks?job_id=retry-1"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows = v["deliveries"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{v}");
    assert_eq!(rows[0]["replay_of"], first);
    assert_eq!(rows[0]["state"], "ok");

    // Counted by outcome (other tests of this binary count too: at least).
    let metrics = http
        .get(format!("{base}/metrics"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = |outcome: &str| -> f64 {
        let prefix = format!("switchyard_webhook_deliveries_total{{outcome=\"{outcome}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str())?.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        counted("failed") >= 2.0 && counted("ok") >= 2.0,
        "{metrics}"
    );

    // And from the CLI, by job id: a third.
    let out = common::switchyard(&env.child_env())
        .args(["webhooks", "replay", "retry-1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::wait_until(
        Duration::from_secs(30),
        "the CLI's replay delivered",
        || async { rx.accepted("retry-1").len() == 3 },
    )
    .await;
    let out = common::switchyard(&env.child_env())
        .args(["webhooks", "list", "--job", "retry-1", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 5);
    // A job that is not ended, or unknown, is not replayed.
    let out = common::switchyard(&env.child_env())
        .args(["webhooks", "replay", "nobody"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no webhook delivery or job `nobody`"));

    assert!(worker.shutdown().await);
    api_tasks.stop(Duration::from_secs(5)).await;
    rx.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_failed_attempt_never_followed() {
    let env = TestEnv::new(Default::default()).await;
    let rx = Receiver::start(&[Answer::Redirect]).await;
    let worker = env.start_worker(config(&env, &[rx.host()], &[])).await;
    run(&env, &[job("moved-1", "lookup", Some(rx.url()))]).await;
    wait_state(&env, "moved-1", "ok").await;
    // Followed, the first attempt would have succeeded on its second request.
    assert_eq!(
        attempts(&env, "moved-1").await,
        [
            att(1, "failed", Some(307), Some("HTTP 307 Temporary Redirect")),
            att(2, "ok", Some(200), None),
        ]
    );
    assert_eq!(rx.got().len(), 2);
    assert!(worker.shutdown().await);
    rx.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_off_the_allowlist_is_refused_and_recorded() {
    let env = TestEnv::new(Default::default()).await;
    let rx = Receiver::start(&[]).await;
    let off_list = "http://169.254.169.254/latest/meta-data";

    // A job naming a URL off the list is rejected with the reason: over
    // NATS a dead letter, over HTTP a 400, as any invalid envelope.
    let cfg = config(
        &env,
        &[rx.host()],
        &[("SWITCHYARD_CATEGORIES__SUPPORT__CALLBACK_URL", &rx.url())],
    );
    let worker = switchyard::pipeline::worker::start(
        Arc::new(cfg.clone()),
        env.pool.clone(),
        env.bus.clone(),
        // This worker delivers nothing: the deliverer below, with a later
        // config, does.
        switchyard::pipeline::worker::WorkerOptions {
            webhooks: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    run(&env, &[job("bad-hook", "sales", Some(off_list.into()))]).await;
    let (status, reason): (String, String) =
        sqlx::query_as("SELECT j.status, d.reason FROM jobs j JOIN dead_letters d ON d.job_id = j.id WHERE j.id = 'bad-hook'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(status, "dead");
    assert_eq!(
        reason,
        "invalid callback_url: host `169.254.169.254` is not on webhooks.allow_hosts"
    );

    let (base, api_tasks) = env.serve_http(&cfg).await;
    let submit = switchyard::store::tokens::create(
        &env.pool,
        "backend",
        switchyard::store::tokens::Scope::Submit,
    )
    .await
    .unwrap();
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&submit)
        .header("content-type", "application/json")
        .body(
            serde_json::json!({"id": "bad-hook-http", "category": "sales", "prompt": "hi",
                               "callback_url": "http://127.0.0.1:1/hook"})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v.to_string()
            .contains("invalid callback_url: host `127.0.0.1:1` is not on webhooks.allow_hosts"),
        "{v}"
    );
    api_tasks.stop(Duration::from_secs(5)).await;

    // A category default allowed when the job ended, no longer allowed when
    // its attempt is due (the config changed): refused, recorded, not sent.
    // An `auto` job the classifier model places takes its new category's.
    run(
        &env,
        &[
            job("default-hook", "support", None),
            job("auto-hook", "auto", None),
        ],
    )
    .await;
    for id in ["default-hook", "auto-hook"] {
        let (category, stored): (String, Option<String>) =
            sqlx::query_as("SELECT category, callback_url FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        assert_ne!(category, "auto");
        if id == "auto-hook" {
            // Placed by the classifier model (no rule matches), as a reclassification.
            let by: Option<String> = sqlx::query_scalar(
                "SELECT route_decision->'classifier'->>'by' FROM jobs WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
            assert_ne!(by.as_deref(), Some("rule"));
            assert!(by.is_some());
        }
        assert_eq!(
            stored,
            Some(rx.url()),
            "{id}: the category's default is the job's"
        );
        assert_eq!(attempts(&env, id).await, [att(1, "pending", None, None)]);
    }
    let later = config(&env, &["hooks.example.com".to_string()], &[]);
    let deliverer = Tasks::new();
    switchyard::webhooks::deliver::spawn(Arc::new(later), env.pool.clone(), &deliverer).unwrap();
    for id in ["default-hook", "auto-hook"] {
        wait_state(&env, id, "refused").await;
        let a = attempts(&env, id).await;
        assert_eq!(a.len(), 1, "refused once, never retried: {a:?}");
        assert_eq!(
            a[0].3.as_deref(),
            Some(format!("host `{}` is not on webhooks.allow_hosts", rx.host()).as_str())
        );
    }
    assert!(rx.got().is_empty(), "no request reached the receiver");
    // The dead-lettered job had no valid callback: nothing for it.
    assert!(attempts(&env, "bad-hook").await.is_empty());

    deliverer.stop(Duration::from_secs(5)).await;
    assert!(worker.shutdown().await);
    rx.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_slower_than_the_timeout_holds_up_no_job() {
    let env = TestEnv::new(Default::default()).await;
    // Every request is answered only after 60 s; the timeout is 1 s.
    let slow = [Answer::Slow(Duration::from_secs(60)); 64];
    let rx = Receiver::start(&slow).await;
    let worker = env
        .start_worker(config(
            &env,
            &[rx.host()],
            &[
                ("SWITCHYARD_WEBHOOKS__CONCURRENCY", "2"),
                ("SWITCHYARD_WEBHOOKS__MAX_ATTEMPTS", "2"),
            ],
        ))
        .await;
    let first: Vec<Outgoing> = (0..4)
        .map(|i| job(&format!("slow-{i}"), "lookup", Some(rx.url())))
        .collect();
    run(&env, &first).await;
    // The deliverer's slots are taken by requests the receiver sits on ...
    common::wait_until(
        Duration::from_secs(30),
        "the receiver holds requests",
        || async { !rx.got().is_empty() },
    )
    .await;
    // ... and jobs keep finishing meanwhile, with and without callbacks.
    let more: Vec<Outgoing> = (0..30)
        .map(|i| {
            let cb = (i % 2 == 0).then(|| rx.url());
            job(
                &format!("more-{i}"),
                ["support", "sales", "lookup"][i % 3],
                cb,
            )
        })
        .collect();
    run(&env, &more).await;
    assert_eq!(
        rx.answered(),
        0,
        "every job ended while no request was answered"
    );
    let succeeded = env
        .count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
        .await;
    assert_eq!(succeeded, 34);
    // The attempts that ran out of time are recorded as such.
    common::wait_until(Duration::from_secs(30), "a timed-out attempt recorded", || async {
        env.count("SELECT count(*) FROM webhook_deliveries WHERE state = 'failed' AND error LIKE 'no answer within webhooks.timeout_secs%'")
            .await
            > 0
    })
    .await;
    // Stopping the worker waits for attempts under way, each within the timeout.
    assert!(worker.shutdown().await);
    rx.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trigger_calls_back_exactly_the_final_statuses() {
    let env = TestEnv::new(Default::default()).await;
    for s in JobStatus::ALL {
        let id = format!("st-{s}");
        sqlx::query("INSERT INTO jobs (id, category, status, callback_url) VALUES ($1, 'support', 'queued', 'http://127.0.0.1:9/hook')")
            .bind(&id)
            .execute(&env.pool)
            .await
            .unwrap();
        sqlx::query("UPDATE jobs SET status = $2 WHERE id = $1")
            .bind(&id)
            .bind(s.as_str())
            .execute(&env.pool)
            .await
            .unwrap();
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE job_id = $1")
                .bind(&id)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        assert_eq!(n, i64::from(s.is_final()), "status {s}");
    }
    // needs_review is not the end: its resolve is.
    sqlx::query("UPDATE jobs SET status = 'failed' WHERE id = 'st-needs_review'")
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        attempts(&env, "st-needs_review").await,
        [att(1, "pending", None, None)]
    );
    // A job without a callback URL has none.
    sqlx::query("INSERT INTO jobs (id, category, status) VALUES ('no-cb', 'support', 'succeeded')")
        .execute(&env.pool)
        .await
        .unwrap();
    assert!(attempts(&env, "no-cb").await.is_empty());
    env.cleanup().await;
}
