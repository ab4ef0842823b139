//! The durable pipeline end to end: jobs on NATS → provider lanes → results
//! and cost records in Postgres. Real NATS and Postgres, simulated provider.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{jobs, wait_until, TestEnv};
use rust_decimal::Decimal;
use switchyard::enqueue::{publish_jobs, wait_finished};
use switchyard::ops::report;
use switchyard::sim::{Format, SimProfile};

/// Overrides that make every lane send one request at a time, plus `extra`.
fn one_call_at_a_time<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = common::SINGLE_ROUTES.to_vec();
    v.extend([
        ("SWITCHYARD_PROVIDERS__OPENAI__MAX_CONCURRENCY", "1"),
        ("SWITCHYARD_PROVIDERS__ANTHROPIC__MAX_CONCURRENCY", "1"),
        ("SWITCHYARD_PROVIDERS__GEMINI__MAX_CONCURRENCY", "1"),
        // One slot per lane: a request that hangs must not hold it for a minute.
        ("SWITCHYARD_PROVIDERS__OPENAI__TIMEOUT_SECS", "5"),
        ("SWITCHYARD_PROVIDERS__ANTHROPIC__TIMEOUT_SECS", "5"),
        ("SWITCHYARD_PROVIDERS__GEMINI__TIMEOUT_SECS", "5"),
    ]);
    v.extend_from_slice(extra);
    v
}

/// Wait for the jobs; on timeout, fail with what the database and the
/// simulator saw (statuses, attempts, ledger), to diagnose a stall.
async fn finish_or_explain(env: &TestEnv, js: &[switchyard::enqueue::Outgoing]) {
    if wait_finished(&env.pool, &ids(js), Duration::from_secs(120), None)
        .await
        .unwrap()
    {
        return;
    }
    let statuses: Vec<(String, String)> = sqlx::query_as("SELECT id, status FROM jobs ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    let calls: Vec<(String, i32, String, Option<i32>)> = sqlx::query_as(
        "SELECT job_id, attempt, outcome, http_status FROM calls ORDER BY created_at",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let ledger: Vec<(u64, String, u16)> = env
        .sim
        .ledger()
        .iter()
        .map(|e| (e.at_ms, e.model.clone(), e.status))
        .collect();
    panic!("jobs did not finish in 120 s\njobs {statuses:?}\ncalls {calls:?}\nledger {ledger:?}");
}

fn ids(jobs: &[switchyard::enqueue::Outgoing]) -> Vec<String> {
    jobs.iter().map(|j| j.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_jobs_end_to_end_with_exact_costs() {
    let env = TestEnv::new(SimProfile {
        cached_share: 0.3,
        cache_write_share: 0.2,
        reasoning_tokens: 7,
        ..Default::default()
    })
    .await;
    let cfg = env.config();
    let worker = env.start_worker(cfg.clone()).await;
    let js = jobs("e2e", 1000);
    publish_jobs(&env.bus, &js, None).await.unwrap();
    assert!(
        wait_finished(&env.pool, &ids(&js), Duration::from_secs(180), None)
            .await
            .unwrap(),
        "all 1,000 jobs terminal"
    );

    assert_eq!(env.count("SELECT count(*) FROM results").await, 1000);
    assert_eq!(
        env.count("SELECT count(DISTINCT job_id) FROM results")
            .await,
        1000
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM jobs WHERE status = 'succeeded' AND finished_at IS NOT NULL"
        )
        .await,
        1000
    );
    // Every cost record is tokens × the unit prices stored with it.
    assert_eq!(
        env.count(
            "SELECT count(*) FROM calls WHERE cost_usd <>
               ((input_tokens - cached_input_tokens - cache_write_input_tokens) * price_input_per_mtok
                + cached_input_tokens * price_cached_input_per_mtok
                + cache_write_input_tokens * price_cache_write_per_mtok
                + output_tokens * price_output_per_mtok) / 1000000"
        )
        .await,
        0
    );
    assert!(
        env.count("SELECT count(*) FROM calls WHERE cached_input_tokens > 0")
            .await
            > 0
    );
    // ... and the stored unit prices are the configured ones.
    for (name, model) in &cfg.models {
        let p = model.prices();
        let wrong: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM calls WHERE model = $1 AND (price_input_per_mtok <> $2
             OR price_output_per_mtok <> $3 OR price_cached_input_per_mtok <> $4
             OR price_cache_write_per_mtok <> $5)",
        )
        .bind(name)
        .bind(p.input_per_mtok)
        .bind(p.output_per_mtok)
        .bind(p.cached_input_per_mtok)
        .bind(p.cache_write_per_mtok)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(wrong, 0, "prices of {name}");
    }
    // A result's cost is the sum of its job's calls.
    assert_eq!(
        env.count(
            "SELECT count(*) FROM results r WHERE r.cost_usd <>
               (SELECT sum(cost_usd) FROM calls c WHERE c.job_id = r.job_id)"
        )
        .await,
        0
    );

    // What the provider was asked equals what Switchyard recorded.
    let ledger = env.sim.ledger();
    let answered: Vec<_> = ledger.iter().filter(|e| e.status == 200).collect();
    assert_eq!(
        answered.len() as i64,
        env.count("SELECT count(*) FROM calls WHERE outcome = 'ok'")
            .await
    );
    let sum =
        |f: fn(&&switchyard::sim::LedgerEntry) -> u64| answered.iter().map(f).sum::<u64>() as i64;
    assert_eq!(
        sum(|e| e.prompt_tokens),
        env.count("SELECT sum(input_tokens)::int8 FROM calls WHERE outcome = 'ok'")
            .await
    );
    assert_eq!(
        sum(|e| e.completion_tokens),
        env.count("SELECT sum(output_tokens)::int8 FROM calls WHERE outcome = 'ok'")
            .await
    );
    assert_eq!(
        sum(|e| e.cached_tokens),
        env.count("SELECT sum(cached_input_tokens)::int8 FROM calls WHERE outcome = 'ok'")
            .await
    );

    // The report's totals match SQL sums.
    let r = report::build(&env.pool, &Default::default(), &env.config(), None)
        .await
        .unwrap();
    assert_eq!(r.jobs_with_status("succeeded"), 1000);
    let total: Decimal = sqlx::query_scalar("SELECT sum(cost_usd) FROM calls")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(r.total.cost_usd, total);
    assert_eq!(r.total.calls, env.count("SELECT count(*) FROM calls").await);
    let by_cat: Vec<(String, i64, Decimal)> = sqlx::query_as(
        "SELECT category, sum(output_tokens)::int8, sum(cost_usd) FROM calls GROUP BY category ORDER BY category",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(by_cat.len(), 3);
    for (line, (cat, out, cost)) in r.by_category.iter().zip(&by_cat) {
        assert_eq!(
            (&line.key, line.output_tokens, line.cost_usd),
            (cat, *out, *cost)
        );
    }
    let model_cost: Decimal = r.by_model.iter().map(|l| l.cost_usd).sum();
    assert_eq!(model_cost, total);

    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_job_id_twice_yields_one_job_and_one_result() {
    let env = TestEnv::new(SimProfile::default()).await;
    let worker = env.start_worker(env.config()).await;
    let job = jobs("dup", 1).remove(0);
    // Twice with the same Nats-Msg-Id (JetStream de-duplicates) ...
    let fresh = publish_jobs(&env.bus, &[job.clone(), job.clone()], None)
        .await
        .unwrap();
    assert_eq!(fresh, 1);
    // ... and once more under another message id, as after the duplicate window.
    env.bus
        .publish_durable(
            env.bus.names.job_subject(&job.category),
            "another-message-id",
            job.payload.clone().into(),
        )
        .await
        .unwrap();
    assert!(wait_finished(
        &env.pool,
        std::slice::from_ref(&job.id),
        Duration::from_secs(60),
        None
    )
    .await
    .unwrap());
    // Wait until both copies have been consumed and acked.
    let js = env.bus.js.clone();
    let jobs_stream = env.bus.names.jobs_stream();
    let calls_stream = env.bus.names.calls_stream();
    wait_until(
        Duration::from_secs(30),
        "job and call streams drained",
        || {
            let js = js.clone();
            let (a, b) = (jobs_stream.clone(), calls_stream.clone());
            async move {
                let mut n = 0;
                for s in [a, b] {
                    n += js
                        .get_stream(s)
                        .await
                        .unwrap()
                        .info()
                        .await
                        .unwrap()
                        .state
                        .messages;
                }
                n == 0
            }
        },
    )
    .await;
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM results").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM calls").await, 1);
    assert_eq!(env.sim.ledger().len(), 1, "the provider was asked once");
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_become_dead_letters_and_good_jobs_still_run() {
    let env = TestEnv::new(SimProfile::default()).await;
    let worker = env
        .start_worker(env.config_with(&[("SWITCHYARD_LIMITS__MAX_PAYLOAD_BYTES", "4096")]))
        .await;
    let big = format!(r#"{{"id":"big","prompt":"{}"}}"#, "x".repeat(5000));
    let bad: Vec<(&str, String, &str)> = vec![
        (
            "support",
            "this is not json".into(),
            "not a valid job envelope",
        ),
        (
            "support",
            r#"{"id":"types","prompt":42}"#.into(),
            "invalid type",
        ),
        (
            "billing",
            r#"{"id":"nocat","prompt":"hi"}"#.into(),
            "unknown category `billing`",
        ),
        ("support", big, "exceeds the limit of 4096 bytes"),
        (
            "support",
            r#"{"id":"mismatch","category":"sales","prompt":"hi"}"#.into(),
            "contradicts",
        ),
        (
            "support",
            r#"{"id":"v2","version":2,"prompt":"hi"}"#.into(),
            "unsupported envelope version 2",
        ),
        (
            "lookup",
            r#"{"id":"empty","messages":[]}"#.into(),
            "empty input",
        ),
    ];
    let good = jobs("good", 20);
    // Interleave: bad, good, bad, good ...
    for (i, (cat, payload, _)) in bad.iter().enumerate() {
        env.bus
            .publish_durable(
                env.bus.names.job_subject(cat),
                &format!("bad-{i}"),
                payload.clone().into_bytes().into(),
            )
            .await
            .unwrap();
        publish_jobs(&env.bus, &good[i * 2..i * 2 + 2], None)
            .await
            .unwrap();
    }
    publish_jobs(&env.bus, &good[14..], None).await.unwrap();

    let pool = env.pool.clone();
    wait_until(Duration::from_secs(60), "dead letters and results", || {
        let pool = pool.clone();
        async move {
            let (d, r): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM dead_letters), (SELECT count(*) FROM results)",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            d == 7 && r == 20
        }
    })
    .await;
    let rows: Vec<(String, Vec<u8>, String)> =
        sqlx::query_as("SELECT subject, payload, reason FROM dead_letters ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    for (cat, payload, why) in &bad {
        let row = rows
            .iter()
            .find(|(_, p, _)| p == payload.as_bytes())
            .unwrap_or_else(|| panic!("payload stored as received: {why}"));
        assert!(
            row.2.contains(why),
            "reason {:?} should mention {why:?}",
            row.2
        );
        assert_eq!(row.0, env.bus.names.job_subject(cat));
    }
    // Jobs whose id could be read are recorded as dead, with the reason.
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'dead' AND error IS NOT NULL")
            .await,
        5
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .await,
        20
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_calls_wait_the_advertised_delay_and_complete() {
    // The sim allows one request per second per model and, like many
    // OpenAI-compatible servers, sends no rate-limit headers: its only signal
    // is the 429 with `retry-after`. Each lane sends one request at a time.
    let env = TestEnv::new(SimProfile {
        rpm: 60,
        rate_headers: false,
        ..Default::default()
    })
    .await;
    let cfg = env.config_with(&one_call_at_a_time(&[(
        "SWITCHYARD_RETRY__MAX_ATTEMPTS",
        "20",
    )]));
    let worker = env.start_worker(cfg).await;
    let js = jobs("rl", 12);
    publish_jobs(&env.bus, &js, None).await.unwrap();
    finish_or_explain(&env, &js).await;
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .await,
        12
    );

    let ledger = env.sim.ledger();
    let limited = ledger.iter().filter(|e| e.status == 429).count();
    assert!(limited > 0, "the sim enforced its limit");
    assert_eq!(
        env.count(
            "SELECT count(*) FROM calls WHERE http_status = 429 AND outcome = 'retryable_error'"
        )
        .await,
        limited as i64
    );
    // After a 429, the next request for that model came no sooner than the
    // advertised retry-after.
    let mut by_model: HashMap<&str, Vec<&switchyard::sim::LedgerEntry>> = HashMap::new();
    for e in &ledger {
        by_model.entry(e.model.as_str()).or_default().push(e);
    }
    for entries in by_model.values() {
        for pair in entries.windows(2) {
            if let Some(wait) = pair[0].retry_after_ms {
                let gap = pair[1].at_ms - pair[0].at_ms;
                assert!(
                    gap + 25 >= wait,
                    "request {} came {gap} ms after a 429 asking for {wait} ms",
                    pair[1].seq
                );
            }
        }
    }
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_obey_rate_limit_headers_instead_of_collecting_429s() {
    // Same limit, but the sim reports `x-ratelimit-remaining-requests` and its
    // reset: a lane that reads them waits before it would be refused.
    let env = TestEnv::new(SimProfile {
        rpm: 120,
        ..Default::default()
    })
    .await;
    let cfg = env.config_with(&one_call_at_a_time(&[]));
    let worker = env.start_worker(cfg).await;
    let js = jobs("hdr", 15);
    publish_jobs(&env.bus, &js, None).await.unwrap();
    finish_or_explain(&env, &js).await;
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .await,
        15
    );
    // OpenAI and Anthropic send rate-limit headers: no request of theirs was
    // refused. (Gemini sends none; its lane learns from 429s and retryDelay.)
    let ledger = env.sim.ledger();
    let with_headers: Vec<_> = ledger
        .iter()
        .filter(|e| matches!(e.format, Format::Openai | Format::Anthropic))
        .collect();
    assert_eq!(with_headers.len(), 10, "{with_headers:?}");
    assert!(
        with_headers.iter().all(|e| e.status == 200),
        "{with_headers:?}"
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// Messages the run's calls stream has ever stored.
async fn calls_published(env: &TestEnv) -> u64 {
    env.stream_state(&env.bus.names.calls_stream())
        .await
        .last_sequence
}

/// A job's first call goes straight to an idle lane of the dispatcher's own
/// process: no calls-stream message, and the job's row is committed in the
/// same transaction as the call's intent (both rows carry that
/// transaction's start time). With `dispatcher.direct_calls = 0` every call
/// goes through the stream, in transactions of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_lane_here_takes_first_calls_without_the_calls_stream() {
    for direct in [true, false] {
        let env = TestEnv::new(SimProfile::default()).await;
        let mut overrides = common::SINGLE_ROUTES.to_vec();
        if !direct {
            overrides.push(("SWITCHYARD_DISPATCHER__DIRECT_CALLS", "0"));
        }
        let worker = env.start_worker(env.config_with(&overrides)).await;
        // One at a time, so the lane is idle when each job arrives.
        let js = jobs(if direct { "direct" } else { "stream" }, 6);
        for j in &js {
            publish_jobs(&env.bus, std::slice::from_ref(j), None)
                .await
                .unwrap();
            assert!(wait_finished(
                &env.pool,
                std::slice::from_ref(&j.id),
                Duration::from_secs(30),
                None
            )
            .await
            .unwrap());
        }
        let n = js.len() as i64;
        assert_eq!(
            env.count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
                .await,
            n
        );
        assert_eq!(env.count("SELECT count(*) FROM results").await, n);
        assert_eq!(
            env.count("SELECT count(*) FROM calls WHERE outcome = 'ok' AND attempt = 1")
                .await,
            n
        );
        assert_eq!(env.sim.ledger().len(), js.len(), "one request per job");
        let together = env
            .count(
                "SELECT count(*) FROM jobs j JOIN calls c ON c.job_id = j.id \
                 WHERE c.created_at = j.created_at",
            )
            .await;
        let published = calls_published(&env).await;
        if direct {
            assert_eq!(published, 0, "no call went through the stream");
            assert_eq!(together, n, "each job's row committed with its intent");
        } else {
            assert_eq!(published, js.len() as u64);
            assert_eq!(together, 0);
        }
        // Every job message acked once its call was recorded.
        let left = env
            .stream_state(&env.bus.names.jobs_stream())
            .await
            .messages;
        assert_eq!(left, 0);
        assert!(worker.shutdown().await);
        env.cleanup().await;
    }
}

/// A direct call that fails retryably gives its job message back for the
/// retry's delay; the job is dispatched again and its next attempts go
/// through the calls stream, numbered on from the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_call_that_fails_is_retried_through_the_stream() {
    let env = TestEnv::new(SimProfile {
        error_rate: 1.0,
        ..SimProfile::default()
    })
    .await;
    let mut overrides = common::SINGLE_ROUTES.to_vec();
    overrides.extend([
        ("SWITCHYARD_RETRY__MAX_ATTEMPTS", "3"),
        ("SWITCHYARD_RETRY__BASE_DELAY_MS", "50"),
        ("SWITCHYARD_RETRY__MAX_DELAY_MS", "100"),
    ]);
    let worker = env.start_worker(env.config_with(&overrides)).await;
    let js = jobs("retried", 2);
    publish_jobs(&env.bus, &js, None).await.unwrap();
    finish_or_explain(&env, &js).await;
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'failed'")
            .await,
        2
    );
    let attempts: Vec<(String, Vec<i32>)> = sqlx::query_as(
        "SELECT job_id, array_agg(attempt ORDER BY attempt) FROM calls \
         WHERE outcome = 'retryable_error' GROUP BY job_id ORDER BY job_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    for (job, a) in &attempts {
        assert_eq!(a, &[1, 2, 3], "{job}");
    }
    assert_eq!(attempts.len(), 2);
    // The first attempts were direct: their intents committed with the job rows.
    assert_eq!(
        env.count(
            "SELECT count(*) FROM jobs j JOIN calls c ON c.job_id = j.id \
             WHERE c.created_at = j.created_at AND c.attempt = 1"
        )
        .await,
        2
    );
    assert_eq!(env.count("SELECT count(*) FROM calls").await, 6);
    assert_eq!(env.sim.ledger().len(), 6, "every attempt asked once");
    assert!(
        calls_published(&env).await >= 2,
        "the retries went through the stream"
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}
