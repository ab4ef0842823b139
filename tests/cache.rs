//! The response cache end to end: a re-run under new ids is answered without
//! a provider call (the simulator's ledger proves it) and recorded as
//! `cached` calls with what they saved; identical jobs in flight at once on
//! two workers make one call; invalid answers are never cached; a cached
//! batch item never goes into a batch; `switchyard cache` shows and clears.

mod common;

use std::time::Duration;

use common::TestEnv;
use rust_decimal::Decimal;
use switchyard::enqueue::{publish_jobs, wait_finished, Outgoing};
use switchyard::envelope::JobEnvelope;
use switchyard::sim::SimProfile;

const EXTRA: &str = r#"
[categories.faq]
route = { kind = "single", target = "gpt-4o-mini" }
cache = { ttl = "1h" }

[categories.faq_nocache]
route = { kind = "single", target = "gpt-4o-mini" }

[categories.tagging]
route = { kind = "single", target = "claude-haiku-4-5" }
cache = { ttl = "1h" }
response_format = { type = "json_schema", name = "tags", schema = { type = "object", additionalProperties = false, required = ["tags"], properties = { tags = { type = "array", items = { type = "string" } } } } }

[categories.night_cached]
route = { kind = "single", target = "gemini-2.5-flash-lite" }
delivery = "batch"
batch = { flush_after = "300ms" }
cache = { ttl = "1h" }
"#;

fn config(env: &TestEnv) -> switchyard::config::Config {
    env.config_from(&format!("{}\n{EXTRA}", common::SHIPPED_CONFIG))
}

/// `n` jobs of `category` with ids `<run>-<i>` and prompts that depend on
/// `i` only.
fn jobs(run: &str, category: &str, n: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| {
            let e = JobEnvelope::prompt(
                format!("{run}-{i}"),
                category,
                format!("Question number {i}: how do I reset my password?"),
            );
            Outgoing::from_envelope(&e).unwrap()
        })
        .collect()
}

async fn run(env: &TestEnv, jobs: &[Outgoing]) {
    publish_jobs(&env.bus, jobs, None).await.unwrap();
    let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(120), None)
            .await
            .unwrap(),
        "every job finished"
    );
}

async fn usd(env: &TestEnv, sql: &'static str) -> Decimal {
    sqlx::query_scalar(sql).fetch_one(&env.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_under_new_ids_is_answered_from_the_cache() {
    let env = TestEnv::new(SimProfile::default()).await;
    let worker = env.start_worker(config(&env)).await;
    const N: usize = 1000;
    run(&env, &jobs("first", "faq", N)).await;
    assert_eq!(
        env.sim.ledger().len(),
        N,
        "the first run calls the provider"
    );
    let paid = usd(
        &env,
        "SELECT sum(cost_usd) FROM calls WHERE job_id LIKE 'first-%'",
    )
    .await;
    assert!(paid > Decimal::ZERO);

    run(&env, &jobs("again", "faq", N)).await;
    assert_eq!(
        env.sim.ledger().len(),
        N,
        "the re-run made no provider call"
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM calls WHERE job_id LIKE 'again-%' AND outcome = 'cached' AND cost_usd = 0"
        )
        .await,
        N as i64
    );
    // Each cached row keeps the tokens and prices of the answer it reuses,
    // and says what it would have cost: exactly what the first run paid.
    let saved = usd(
        &env,
        "SELECT sum(saved_usd) FROM calls WHERE job_id LIKE 'again-%'",
    )
    .await;
    assert_eq!(saved, paid);
    assert_eq!(
        env.count(
            "SELECT count(*) FROM results a JOIN results f
               ON f.job_id = 'first-' || substr(a.job_id, 7)
             WHERE a.job_id LIKE 'again-%' AND a.output = f.output"
        )
        .await,
        N as i64,
        "the same answers"
    );
    assert_eq!(
        usd(
            &env,
            "SELECT saved_usd FROM cache_savings WHERE category = 'faq'"
        )
        .await,
        paid
    );

    // With the cache off, the same jobs are paid for again.
    run(&env, &jobs("off-1", "faq_nocache", N)).await;
    run(&env, &jobs("off-2", "faq_nocache", N)).await;
    assert_eq!(env.sim.ledger().len(), 3 * N);

    // The report shows what the cache saved.
    let out = common::switchyard(&env.child_env())
        .args(["report", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let faq = report["cache_by_category"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["category"] == "faq")
        .unwrap()
        .clone();
    assert_eq!(faq["cached_calls"], N as i64);
    assert_eq!(
        faq["saved_usd"]
            .as_str()
            .unwrap()
            .parse::<Decimal>()
            .unwrap(),
        paid
    );

    // `switchyard cache stats | clear`.
    let stats = common::switchyard(&env.child_env())
        .args(["cache", "stats", "--json"])
        .output()
        .unwrap();
    assert!(stats.status.success());
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    let s = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["category"] == "faq")
        .unwrap();
    assert_eq!(s["entries"], N as i64);
    assert_eq!(s["hits"], N as i64);
    let clear = common::switchyard(&env.child_env())
        .args(["cache", "clear", "--category", "faq"])
        .output()
        .unwrap();
    assert!(clear.status.success());
    assert!(String::from_utf8_lossy(&clear.stdout).contains(&format!("cleared {N} cache entries")));
    assert_eq!(env.count("SELECT count(*) FROM response_cache").await, 0);
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_jobs_in_flight_on_two_workers_make_one_call() {
    let env = TestEnv::new(SimProfile {
        latency_ms: 400,
        ..Default::default()
    })
    .await;
    let a = env.start_worker(config(&env)).await;
    let b = env.start_worker(config(&env)).await;
    let same: Vec<Outgoing> = (0..50)
        .map(|i| {
            let e = JobEnvelope::prompt(format!("same-{i}"), "faq", "What are your opening hours?");
            Outgoing::from_envelope(&e).unwrap()
        })
        .collect();
    run(&env, &same).await;
    assert_eq!(
        env.sim.ledger().len(),
        1,
        "one provider call for 50 identical jobs"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE outcome = 'cached'")
            .await,
        49
    );
    assert_eq!(
        env.count("SELECT count(DISTINCT output) FROM results")
            .await,
        1
    );
    assert!(a.shutdown().await);
    assert!(b.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_answers_are_never_cached_and_cached_items_skip_batches() {
    let mut profile = SimProfile {
        batch_ms: Some(300),
        ..Default::default()
    };
    profile
        .model_invalid_json
        .insert("claude-haiku-4-5".into(), 1.0);
    let env = TestEnv::new(profile).await;
    let worker = env.start_worker(config(&env)).await;
    run(&env, &jobs("bad-1", "tagging", 1)).await;
    run(&env, &jobs("bad-2", "tagging", 1)).await;
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE id LIKE 'bad-%' AND status = 'failed'")
            .await,
        2
    );
    assert_eq!(
        env.sim.ledger().len(),
        2,
        "the invalid answer was not served again"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM response_cache WHERE state = 'ready'")
            .await,
        0
    );

    // A batch category: the first job goes through a batch, the identical
    // second one is answered from the cache without a batch item.
    run(&env, &jobs("night-1", "night_cached", 1)).await;
    run(&env, &jobs("night-2", "night_cached", 1)).await;
    assert_eq!(env.count("SELECT count(*) FROM batch_items").await, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE job_id LIKE 'night-2%' AND outcome = 'cached'")
            .await,
        1
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}
