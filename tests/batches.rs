//! Batch delivery end to end: jobs of `delivery = "batch"` categories go
//! through each provider's batch API (the simulator's) at half price and
//! finish like real-time ones; `auto` batches only jobs whose deadline
//! leaves time; items a batch did not answer go real-time.

mod common;

use std::str::FromStr;
use std::time::Duration;

use common::{wait_until, TestEnv};
use rust_decimal::Decimal;
use switchyard::enqueue::{publish_jobs, wait_finished, Outgoing};
use switchyard::envelope::JobEnvelope;
use switchyard::sim::{BatchFate, Format, SimProfile};

/// The shipped config plus one batch category per provider, a batched
/// pipeline and an `auto` category.
const EXTRA: &str = r#"
[categories.night_openai]
route = { kind = "single", target = "gpt-4o-mini" }
delivery = "batch"
batch = { flush_after = "300ms" }

[categories.night_anthropic]
route = { kind = "single", target = "claude-haiku-4-5" }
delivery = "batch"
batch = { flush_after = "300ms" }

[categories.night_gemini]
route = { kind = "single", target = "gemini-2.5-flash-lite" }
delivery = "batch"
batch = { flush_after = "300ms" }

[categories.night_pipeline]
route = { kind = "pipeline", stages = [
  { name = "draft", target = "gpt-4o-mini", prompt = "Draft: {{input}}" },
  { name = "polish", target = "claude-haiku-4-5", prompt = "Polish: {{previous}}" },
] }
delivery = "batch"
batch = { flush_after = "300ms" }

[categories.maybe]
route = { kind = "single", target = "gpt-4o-mini" }
delivery = "auto"
batch = { min_slack = "26h", flush_after = "300ms" }
"#;

async fn env() -> TestEnv {
    TestEnv::new(SimProfile {
        batch_ms: Some(400),
        cached_share: 0.25,
        ..Default::default()
    })
    .await
}

fn config(env: &TestEnv) -> switchyard::config::Config {
    env.config_from(&format!("{}\n{EXTRA}", common::SHIPPED_CONFIG))
}

fn job(id: &str, category: &str, deadline: Option<String>) -> Outgoing {
    let mut e = JobEnvelope::prompt(id, category, format!("Write a line about {id}."));
    e.deadline = deadline;
    Outgoing::from_envelope(&e).unwrap()
}

/// Publish `jobs`; their ids.
async fn publish(env: &TestEnv, jobs: &[Outgoing]) -> Vec<String> {
    publish_jobs(&env.bus, jobs, None).await.unwrap();
    jobs.iter().map(|j| j.id.clone()).collect()
}

/// Wait (up to `secs`) until `n` provider batches are in `state` (an SQL
/// condition on the column, such as `state = 'ended'`).
async fn wait_batches(env: &TestEnv, state: &str, n: i64, secs: u64) {
    let sql = format!("SELECT count(*) FROM provider_batches WHERE {state}");
    wait_until(
        Duration::from_secs(secs),
        &format!("{n} batches with {state}"),
        || async { env.count(&sql).await == n },
    )
    .await;
}

fn rfc3339_in(d: Duration) -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now() + d).to_string()
}

type CallLine = (
    String,
    String,
    Option<String>,
    String,
    Decimal,
    Decimal,
    i64,
    i64,
    i64,
);

async fn calls_of(env: &TestEnv, like: &str) -> Vec<CallLine> {
    sqlx::query_as(
        "SELECT job_id, model, batch_id, outcome, price_input_per_mtok, cost_usd,
                input_tokens, cached_input_tokens, output_tokens
         FROM calls WHERE job_id LIKE $1 ORDER BY job_id, step, attempt",
    )
    .bind(like)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_categories_go_through_each_providers_batch_api_at_half_price() {
    let env = env().await;
    let cfg = config(&env);
    let worker = env.start_worker(cfg.clone()).await;
    let mut jobs = Vec::new();
    for cat in [
        "night_openai",
        "night_anthropic",
        "night_gemini",
        "night_pipeline",
    ] {
        for i in 0..6 {
            jobs.push(job(&format!("{cat}-{i}"), cat, None));
        }
    }
    let ids = publish(&env, &jobs).await;
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(90), None)
            .await
            .unwrap(),
        "every batched job finished"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE id LIKE 'night_%' AND status = 'succeeded'")
            .await,
        24
    );
    // Every call went in a batch, at half the model's price, its cost exact.
    let calls = calls_of(&env, "night_%").await;
    assert_eq!(
        calls.len(),
        6 * 3 + 6 * 2,
        "one call per job and stage: {calls:?}"
    );
    for (job, model, batch, outcome, price_in, cost, input, cached, output) in &calls {
        assert_eq!(outcome, "ok", "{job}");
        assert!(batch.is_some(), "{job}: not batched");
        let full = cfg.models[model].prices();
        let half = full.batch();
        assert_eq!(*price_in, half.input_per_mtok, "{job}: half price");
        let usage = switchyard::pricing::Usage {
            input_tokens: *input as u64,
            cached_input_tokens: *cached as u64,
            output_tokens: *output as u64,
            ..Default::default()
        };
        assert_eq!(*cost, half.cost(&usage), "{job}");
        assert_eq!(half.cost(&usage) * Decimal::from(2), full.cost(&usage));
    }
    // The simulator processed exactly the recorded batch calls.
    let ledger: Vec<_> = env
        .sim
        .ledger()
        .into_iter()
        .filter(|e| e.batch.is_some())
        .collect();
    assert_eq!(ledger.len(), calls.len());
    let items: i64 = env
        .count("SELECT count(*) FROM batch_items WHERE state = 'done'")
        .await;
    assert_eq!(items as usize, calls.len());
    assert_eq!(
        env.count("SELECT count(*) FROM provider_batches WHERE state <> 'ended'")
            .await,
        0
    );
    // The report and the view show the batch share and what it saved.
    let r = switchyard::ops::report::build(&env.pool, &Default::default(), &cfg, None)
        .await
        .unwrap();
    let line = r
        .batch_by_category
        .iter()
        .find(|l| l.key == "night_openai")
        .expect("a batch line");
    assert_eq!(
        (line.calls, line.batched_calls, line.batched_share),
        (6, 6, 1.0)
    );
    assert_eq!(line.saved_usd, line.batched_cost_usd);
    assert_eq!(
        line.realtime_equivalent_usd,
        line.batched_cost_usd * Decimal::from(2)
    );
    let saved: Decimal = sqlx::query_scalar(
        "SELECT sum(saved_usd) FROM batch_savings WHERE category = 'night_openai'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(saved.normalize(), line.saved_usd);
    assert!(r
        .render(switchyard::ops::report::Format::Table)
        .contains("Through the providers' batch APIs"));
    // The pipeline's second stage was batched again after the first.
    let stages = env
        .count("SELECT count(*) FROM steps WHERE job_id LIKE 'night_pipeline-%' AND outcome = 'ok'")
        .await;
    assert_eq!(stages, 12);
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_batches_only_far_deadlines_and_unanswered_items_go_real_time() {
    let env = env().await;
    let worker = env.start_worker(config(&env)).await;
    // Near deadline: real time. Far: batch. None: real time.
    let jobs = vec![
        job(
            "maybe-near",
            "maybe",
            Some(rfc3339_in(Duration::from_secs(3600))),
        ),
        job(
            "maybe-far",
            "maybe",
            Some(rfc3339_in(Duration::from_secs(48 * 3600))),
        ),
        job("maybe-none", "maybe", None),
    ];
    let ids = publish(&env, &jobs).await;
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    let batched: Vec<(String, bool)> = sqlx::query_as(
        "SELECT job_id, batch_id IS NOT NULL FROM calls WHERE job_id LIKE 'maybe-%' ORDER BY job_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        batched,
        vec![
            ("maybe-far".into(), true),
            ("maybe-near".into(), false),
            ("maybe-none".into(), false)
        ]
    );

    // An expiring OpenAI batch: the answered half stays batched, the rest
    // is sent real-time as the next attempt; an expired Gemini batch
    // answers nothing, so all of it goes real-time.
    env.sim.force_batch(Format::Openai, BatchFate::Expire);
    env.sim.force_batch(Format::Gemini, BatchFate::Expire);
    let mut jobs = Vec::new();
    for i in 0..6 {
        jobs.push(job(&format!("exp-o-{i}"), "night_openai", None));
        jobs.push(job(&format!("exp-g-{i}"), "night_gemini", None));
    }
    let ids = publish(&env, &jobs).await;
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(90), None)
            .await
            .unwrap()
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE id LIKE 'exp-%' AND status = 'succeeded'")
            .await,
        12
    );
    let o = calls_of(&env, "exp-o-%").await;
    let batched_ok = o.iter().filter(|c| c.2.is_some() && c.3 == "ok").count();
    let expired = o
        .iter()
        .filter(|c| c.2.is_some() && c.3 == "retryable_error")
        .count();
    let realtime_ok = o.iter().filter(|c| c.2.is_none() && c.3 == "ok").count();
    assert_eq!((batched_ok, expired, realtime_ok), (3, 3, 3), "{o:?}");
    // Real-time answers at full price; expired items cost nothing.
    for c in &o {
        if c.2.is_none() {
            assert_eq!(c.4, Decimal::from_str("0.15").unwrap());
        } else if c.3 != "ok" {
            assert_eq!(c.5, Decimal::ZERO);
        }
    }
    let g = calls_of(&env, "exp-g-%").await;
    assert_eq!(g.iter().filter(|c| c.2.is_none() && c.3 == "ok").count(), 6);
    assert_eq!(g.iter().filter(|c| c.2.is_some() && c.3 == "ok").count(), 0);
    wait_batches(&env, "state <> 'ended'", 0, 10).await;
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// `switchyard batch list | show | cancel`: a long batch is listed with its
/// state and counts, shown by either id, and cancelled at its provider;
/// its jobs then finish real-time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_command_lists_shows_and_cancels_a_batch() {
    let env = TestEnv::new(SimProfile {
        batch_ms: Some(20_000),
        ..Default::default()
    })
    .await;
    let worker = env.start_worker(config(&env)).await;
    let jobs: Vec<Outgoing> = (0..4)
        .map(|i| job(&format!("cli-{i}"), "night_openai", None))
        .collect();
    let ids = publish(&env, &jobs).await;
    wait_batches(&env, "state = 'submitted'", 1, 20).await;
    let vars = env.child_env();
    let run = |args: Vec<&str>| {
        let out = common::switchyard(&vars).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let listed: serde_json::Value =
        serde_json::from_slice(&run(vec!["batch", "list", "--json"]).stdout).unwrap();
    let b = &listed[0];
    assert_eq!(
        (
            b["provider"].as_str(),
            b["state"].as_str(),
            b["items"].as_i64()
        ),
        (Some("openai"), Some("submitted"), Some(4)),
        "{listed}"
    );
    let pid = b["provider_batch_id"].as_str().unwrap().to_string();
    let shown = String::from_utf8(run(vec!["batch", "show", &pid]).stdout).unwrap();
    assert!(shown.contains(b["id"].as_str().unwrap()), "{shown}");
    assert!(shown.contains("items          4"), "{shown}");
    run(vec!["batch", "cancel", b["id"].as_str().unwrap()]);
    // Cancelled early: nothing answered in the batch; every job real-time.
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    let calls = calls_of(&env, "cli-%").await;
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.2.is_none() && c.3 == "ok")
            .count(),
        4
    );
    let state: (String, Option<String>) =
        sqlx::query_as("SELECT state, provider_state FROM provider_batches")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(state, ("ended".into(), Some("cancelled".into())));
    // Cancelling an ended batch says so.
    let out = common::switchyard(&vars)
        .args(["batch", "cancel", &pid])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has ended already"));
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// The deadline guard: a batched job whose deadline draws near goes
/// real-time; if the batch answers it too, that call is recorded (it was
/// paid for) and the job keeps one result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_deadline_takes_the_job_out_of_its_batch() {
    let env = env().await;
    let worker = env.start_worker(config(&env)).await;
    // The sim's providers time out after 60 s: a deadline 2 minutes away is
    // inside the guard's margin (2 x 60 s + 60 s) at once.
    let near = job(
        "guard-near",
        "night_openai",
        Some(rfc3339_in(Duration::from_secs(120))),
    );
    let far = job(
        "guard-far",
        "night_openai",
        Some(rfc3339_in(Duration::from_secs(3 * 3600))),
    );
    let ids = vec![near.id.clone(), far.id.clone()];
    publish_jobs(&env.bus, &[near, far], None).await.unwrap();
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    wait_batches(&env, "state <> 'ended'", 0, 20).await;
    let near_calls = calls_of(&env, "guard-near").await;
    assert_eq!(
        near_calls
            .iter()
            .filter(|c| c.2.is_none() && c.3 == "ok")
            .count(),
        1,
        "answered real-time: {near_calls:?}"
    );
    // Whatever the batch answered for it is recorded too, never a result.
    let batch_answers = env
        .sim
        .ledger()
        .iter()
        .filter(|e| e.batch.is_some())
        .count();
    let batch_rows = env
        .count("SELECT count(*) FROM calls WHERE batch_id IS NOT NULL")
        .await;
    assert_eq!(
        batch_rows as usize, batch_answers,
        "every batch answer recorded"
    );
    assert_eq!(env.count("SELECT count(*) FROM results").await, 2);
    let far_calls = calls_of(&env, "guard-far").await;
    assert!(
        far_calls.iter().all(|c| c.2.is_some()),
        "the far job stayed batched: {far_calls:?}"
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// A result file with a cut line, a line that is not a result and one for
/// an unknown `custom_id`: counted and shown, and every known item still
/// ends exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_result_lines_are_counted_and_every_item_still_ends_once() {
    let env = env().await;
    let worker = env.start_worker(config(&env)).await;
    env.sim.force_batch(Format::Openai, BatchFate::Garble);
    env.sim.force_batch(Format::Anthropic, BatchFate::Garble);
    let mut jobs = Vec::new();
    for i in 0..5 {
        jobs.push(job(&format!("garble-o-{i}"), "night_openai", None));
        jobs.push(job(&format!("garble-a-{i}"), "night_anthropic", None));
    }
    let ids = publish(&env, &jobs).await;
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    wait_batches(&env, "state = 'ended'", 2, 20).await;
    let counts: Vec<(String, i32, i32)> = sqlx::query_as(
        "SELECT provider, malformed_lines, unknown_lines FROM provider_batches ORDER BY provider",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        counts,
        vec![("anthropic".into(), 2, 1), ("openai".into(), 2, 1)]
    );
    assert_eq!(
        env.count("SELECT count(*) FROM results WHERE job_id LIKE 'garble-%'")
            .await,
        10
    );
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE job_id LIKE 'garble-%'")
            .await,
        10,
        "one call per job: nothing doubled"
    );
    let shown = common::switchyard(&env.child_env())
        .args(["batch", "list", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["malformed_lines"] == 2 && b["unknown_lines"] == 1));
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// Recovery: a worker that died between submitting a batch and recording
/// it leaves the batch `submitting` with a dead lease; the next worker finds
/// it at the provider by its tag (OpenAI) or its size (Anthropic) instead of
/// submitting it again. A worker that died mid-ingest leaves items pending;
/// reading the results again gives no second result and no second call row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_submitter_or_ingester_is_taken_over_without_doubling() {
    use switchyard::providers::batch::{BatchClient, BatchItem, Kind};
    use switchyard::providers::CallRequest;
    let env = env().await;
    // Worker A collects the calls into open batches that are not due yet.
    let slow = EXTRA.replace("flush_after = \"300ms\"", "flush_after = \"1h\"");
    let cfg = env.config_from(&format!("{}\n{slow}", common::SHIPPED_CONFIG));
    let a = env.start_worker(cfg).await;
    let mut jobs = Vec::new();
    for i in 0..4 {
        jobs.push(job(&format!("rec-o-{i}"), "night_openai", None));
        jobs.push(job(&format!("rec-a-{i}"), "night_anthropic", None));
    }
    let ids = publish(&env, &jobs).await;
    wait_until(Duration::from_secs(20), "8 items collected", || async {
        env.count("SELECT count(*) FROM batch_items").await == 8
    })
    .await;
    assert!(a.shutdown().await);
    // What the dead worker did: claimed each batch, submitted it with its
    // tag, and died before recording the provider's id.
    let batches: Vec<(String, String)> =
        sqlx::query_as("SELECT id, provider FROM provider_batches ORDER BY provider")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(batches.len(), 2);
    for (id, provider) in &batches {
        let kind = if provider == "openai" {
            Kind::OpenAi
        } else {
            Kind::Anthropic
        };
        let http = switchyard::providers::http::HttpClient::new(
            provider,
            &env.sim.base_url(),
            None,
            Duration::from_secs(10),
            None,
        )
        .unwrap();
        let items: Vec<(String, serde_json::Value)> =
            sqlx::query_as("SELECT custom_id, call FROM batch_items WHERE batch_id = $1")
                .bind(id)
                .fetch_all(&env.pool)
                .await
                .unwrap();
        let reqs: Vec<(String, CallRequest)> = items
            .into_iter()
            .map(|(cid, call)| {
                let c: switchyard::bus::CallMsg = serde_json::from_value(call).unwrap();
                (
                    cid,
                    CallRequest {
                        model: c.model,
                        messages: c.messages,
                        max_tokens: c.max_tokens,
                        temperature: c.temperature,
                        tag: None,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let model = reqs[0].1.model.clone();
        let batch_items: Vec<BatchItem<'_>> = reqs
            .iter()
            .map(|(cid, r)| BatchItem {
                custom_id: cid,
                request: r,
            })
            .collect();
        BatchClient::new(kind, http)
            .submit(&model, id, &batch_items)
            .await
            .unwrap();
    }
    sqlx::query(
        "UPDATE provider_batches SET state = 'submitting', lease_owner = 'dead',
                lease_until = now() - interval '1 second', submitted_at = now()",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    // Worker B takes over: the same batches, found, not submitted again.
    let b = env.start_worker(config(&env)).await;
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    let ledger = env.sim.ledger();
    let batch_entries = ledger.iter().filter(|e| e.batch.is_some()).count();
    assert_eq!(
        batch_entries, 8,
        "each item processed once: no second batch"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE job_id LIKE 'rec-%'")
            .await,
        8
    );
    wait_batches(&env, "state = 'ended'", 2, 10).await;

    // A dead ingester: half the items back to pending, the batch due again.
    sqlx::raw_sql(
        "UPDATE batch_items SET state = 'pending' WHERE custom_id IN ('i0', 'i1');
         UPDATE provider_batches SET state = 'submitted', next_poll_at = now(),
                lease_owner = NULL, lease_until = NULL",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    wait_until(Duration::from_secs(20), "re-ingested", || async {
        env.count("SELECT count(*) FROM batch_items WHERE state = 'pending'")
            .await
            == 0
            && env
                .count("SELECT count(*) FROM provider_batches WHERE state = 'ended'")
                .await
                == 2
    })
    .await;
    // Give the lane a moment to settle what was re-published, then check
    // nothing doubled (a duplicate would add rows, never remove them).
    wait_until(Duration::from_secs(10), "the lane is idle", || async {
        let q = env
            .bus
            .queue_depths(&["openai".into(), "anthropic".into()])
            .await;
        q.map(|d| d.lanes.values().all(|v| *v == 0))
            .unwrap_or(false)
    })
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE job_id LIKE 'rec-%'")
            .await,
        8
    );
    assert_eq!(
        env.count("SELECT count(*) FROM results WHERE job_id LIKE 'rec-%'")
            .await,
        8
    );
    assert!(b.shutdown().await);
    env.cleanup().await;
}

/// A worker that died while it held a batch's lease: the next worker takes
/// the batch over once the lease has run out, not before, and finishes its
/// jobs once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pollers_batch_passes_on_when_its_lease_runs_out() {
    let env = TestEnv::new(SimProfile {
        batch_ms: Some(1500),
        ..Default::default()
    })
    .await;
    let a = env.start_worker(config(&env)).await;
    let jobs: Vec<Outgoing> = (0..6)
        .map(|i| job(&format!("lease-{i}"), "night_openai", None))
        .collect();
    let ids = publish(&env, &jobs).await;
    wait_batches(&env, "state = 'submitted'", 1, 20).await;
    assert!(a.shutdown().await);
    // As if worker A had died mid-poll: its lease still runs for 3 s.
    let (set_at,): (f64,) = sqlx::query_as(
        "UPDATE provider_batches SET lease_owner = 'dead', lease_until = now() + interval '3 seconds'
         RETURNING EXTRACT(EPOCH FROM now())::float8",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let b = env.start_worker(config(&env)).await;
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    let (ended_at,): (f64,) =
        sqlx::query_as("SELECT EXTRACT(EPOCH FROM ended_at)::float8 FROM provider_batches")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(
        ended_at >= set_at + 3.0,
        "taken over only after the lease ran out ({:.1} s after)",
        ended_at - set_at
    );
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE job_id LIKE 'lease-%'")
            .await,
        6
    );
    assert!(b.shutdown().await);
    env.cleanup().await;
}

/// Two workers share the batch lanes: each batch is polled by one of them
/// at a time (the simulator counts status requests under way per batch;
/// each takes 250 ms, so two pollers without the lease would overlap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_never_poll_one_batch_at_once() {
    let env = TestEnv::new(SimProfile {
        batch_ms: Some(3000),
        batch_poll_ms: Some(250),
        ..Default::default()
    })
    .await;
    let a = env.start_worker(config(&env)).await;
    let b = env.start_worker(config(&env)).await;
    let mut jobs = Vec::new();
    for cat in ["night_openai", "night_anthropic", "night_gemini"] {
        for i in 0..4 {
            jobs.push(job(&format!("pair-{cat}-{i}"), cat, None));
        }
    }
    let ids = publish(&env, &jobs).await;
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    let (polls, at_once) = env.sim.batch_polls();
    assert!(
        polls >= 9,
        "each batch was polled while it ran ({polls} polls)"
    );
    assert_eq!(
        at_once, 1,
        "no batch was ever polled by two workers at once"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE job_id LIKE 'pair-%' AND batch_id IS NOT NULL")
            .await,
        12,
        "one batch call per job"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM results WHERE job_id LIKE 'pair-%'")
            .await,
        12
    );
    assert!(a.shutdown().await);
    assert!(b.shutdown().await);
    env.cleanup().await;
}

/// The providers' batch queue limits (OpenAI: prompt tokens enqueued per
/// model; Anthropic: requests queued) are held: the simulator enforces the
/// same limits (a batch over them fails `token_limit_exceeded`, or gets a
/// 429), and every job still goes through a batch, because batches wait
/// to be submitted until earlier ones end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_wait_for_room_in_the_providers_batch_queue() {
    let mut profile = SimProfile {
        batch_ms: Some(1200),
        ..Default::default()
    };
    profile.formats.insert(
        Format::Openai,
        SimProfile {
            batch_ms: Some(1200),
            batch_queue_tokens: Some(100),
            ..Default::default()
        },
    );
    profile.formats.insert(
        Format::Anthropic,
        SimProfile {
            batch_ms: Some(1200),
            batch_queue_requests: Some(4),
            ..Default::default()
        },
    );
    let env = TestEnv::new(profile).await;
    let mut cfg = config(&env);
    cfg.models
        .get_mut("gpt-4o-mini")
        .unwrap()
        .batch_queue_tokens = Some(100);
    cfg.providers
        .get_mut("anthropic")
        .unwrap()
        .batch_queue_requests = Some(4);
    let worker = env.start_worker(cfg).await;
    let mut jobs = Vec::new();
    for cat in ["night_openai", "night_anthropic"] {
        for i in 0..12 {
            jobs.push(job(&format!("queue-{cat}-{i}"), cat, None));
        }
    }
    let ids = publish(&env, &jobs).await;
    // While the first batches run, the others wait and say why.
    wait_until(
        Duration::from_secs(20),
        "a batch waiting for queue room",
        || async {
            env.count(
                "SELECT count(*) FROM provider_batches
             WHERE state = 'open' AND error LIKE 'waiting for the provider''s batch queue%'",
            )
            .await
                > 0
        },
    )
    .await;
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(90), None)
            .await
            .unwrap()
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM provider_batches WHERE provider_state IS DISTINCT FROM 'completed'"
        )
        .await,
        0,
        "no batch was refused or failed for the queue limit"
    );
    for provider in ["openai", "anthropic"] {
        assert!(
            env.count(&format!(
                "SELECT count(*) FROM provider_batches WHERE provider = '{provider}'"
            ))
            .await
                >= 3,
            "{provider}: the limit split the work into several batches"
        );
    }
    assert_eq!(
        env.count(
            "SELECT count(*) FROM calls WHERE job_id LIKE 'queue-%' AND batch_id IS NOT NULL"
        )
        .await,
        24,
        "every job went through a batch, at batch prices"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE job_id LIKE 'queue-%'")
            .await,
        24
    );
    // At no time were two of a provider's batches with it at once.
    assert_eq!(
        env.count(
            "SELECT count(*) FROM provider_batches a JOIN provider_batches b
               ON a.provider = b.provider AND a.id < b.id
             WHERE a.submitted_at < b.ended_at AND b.submitted_at < a.ended_at"
        )
        .await,
        0
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// A call larger than its model's whole batch queue can never be batched:
/// it goes real-time at once (and is answered), never waits forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_larger_than_the_batch_queue_goes_real_time() {
    let env = env().await;
    let mut cfg = config(&env);
    cfg.models
        .get_mut("gpt-4o-mini")
        .unwrap()
        .batch_queue_tokens = Some(5);
    let worker = env.start_worker(cfg).await;
    let jobs: Vec<Outgoing> = (0..3)
        .map(|i| job(&format!("big-{i}"), "night_openai", None))
        .collect();
    let ids = publish(&env, &jobs).await;
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(30), None)
            .await
            .unwrap()
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE id LIKE 'big-%' AND status = 'succeeded'")
            .await,
        3
    );
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE job_id LIKE 'big-%' AND batch_id IS NULL")
            .await,
        3,
        "real-time calls"
    );
    assert_eq!(env.count("SELECT count(*) FROM batch_items").await, 0);
    assert!(worker.shutdown().await);
    env.cleanup().await;
}
