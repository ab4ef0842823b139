//! The intent row is the check-and-claim before every provider call: two
//! workers that take the same step at the same moment (with different
//! attempt numbers: one a redelivery, one a first delivery from a NATS
//! server that forgot the ack) never both get to call the provider.

mod common;

use std::time::Duration;

use rust_decimal::Decimal;
use switchyard::pricing::{Prices, Usage};
use switchyard::store::{CallOutcome, CallRow, Row, Writer};

fn intent(job: &str, attempt: i32) -> Row {
    Row::Intent {
        row: CallRow {
            job_id: job.into(),
            category: "support".into(),
            provider: "openai".into(),
            model: "gpt-4o-mini".into(),
            step: 0,
            attempt,
            usage: Usage {
                input_tokens: 100,
                output_tokens: 50,
                ..Usage::default()
            },
            prices: Prices {
                input_per_mtok: Decimal::new(15, 2),
                output_per_mtok: Decimal::new(60, 2),
                cached_input_per_mtok: Decimal::ZERO,
                cache_write_per_mtok: Decimal::ZERO,
            },
            latency_ms: 0,
            http_status: None,
            outcome: CallOutcome::Unknown,
            error: None,
            batch_id: None,
        },
        busy_for: Duration::from_secs(60),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_claiming_one_step_at_once_get_one_claim() {
    let env = common::TestEnv::new(Default::default()).await;
    let tasks = switchyard::tasks::Tasks::new();
    // Two processes: two pools, two writers.
    let other = switchyard::store::connect_and_migrate(&env.db_url, 4)
        .await
        .unwrap();
    let a = Writer::spawn(env.pool.clone(), 64, Duration::ZERO, 2, &tasks);
    let b = Writer::spawn(other.clone(), 64, Duration::ZERO, 2, &tasks);
    let rounds = 200;
    let mut both = 0;
    for i in 0..rounds {
        let job = format!("race-{i}");
        let (ra, rb) = tokio::join!(
            a.write(vec![intent(&job, 1)]),
            b.write(vec![intent(&job, 2)])
        );
        let got = |c: switchyard::store::Committed| c.attempts.contains_key(&(job.clone(), 0));
        let (ga, gb) = (got(ra.unwrap()), got(rb.unwrap()));
        assert!(ga || gb, "{job}: one of them claims the step");
        if ga && gb {
            both += 1;
        }
    }
    assert_eq!(both, 0, "steps claimed twice in {rounds} rounds");
    assert_eq!(
        env.count("SELECT count(*) FROM calls").await,
        rounds,
        "one intent row per step"
    );
    // A later attempt (the claim is older than its busy window: the worker
    // died) gets the next number after the highest.
    sqlx::query("UPDATE calls SET created_at = now() - interval '2 minutes'")
        .execute(&env.pool)
        .await
        .unwrap();
    let c = a.write(vec![intent("race-0", 1)]).await.unwrap();
    let first: i64 = env
        .count("SELECT max(attempt)::int8 FROM calls WHERE job_id = 'race-0'")
        .await;
    assert_eq!(
        c.attempts.get(&("race-0".to_string(), 0)),
        Some(&(first as i32))
    );
    assert!(first >= 2, "attempt numbers are not reused");
    drop((a, b));
    assert!(
        tasks.stop(Duration::from_secs(10)).await,
        "the writers stopped"
    );
    other.close().await;
    env.cleanup().await;
}

/// Group commit: rows that arrive while a commit runs join the next one, so
/// under load a transaction carries many messages' rows with no timer
/// (`writer.flush_interval_ms = 0`), and every write still commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_arriving_during_a_commit_share_the_next_one() {
    let env = common::TestEnv::new(Default::default()).await;
    let tasks = switchyard::tasks::Tasks::new();
    let w = Writer::spawn(env.pool.clone(), 512, Duration::ZERO, 1, &tasks);
    let n = 300;
    let writes = (0..n).map(|i| {
        let w = w.clone();
        async move {
            w.write(vec![Row::Job(switchyard::store::JobRow {
                id: format!("group-{i}"),
                category: "support".into(),
                status: switchyard::store::JobStatus::Running,
                envelope: None,
                route_decision: None,
                error: None,
                enqueued_at_ms: 0,
                variant: None,
                callback_url: None,
            })])
            .await
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(writes))
        .await
        .expect("every write commits");
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, n);
    // Each transaction stamps its rows with its own id.
    let transactions = env
        .count("SELECT count(DISTINCT xmin::text) FROM jobs")
        .await;
    assert!(
        transactions <= 30,
        "{n} concurrent writes took {transactions} transactions: rows queued during a commit \
         should have joined the next one"
    );
    drop(w);
    assert!(
        tasks.stop(Duration::from_secs(10)).await,
        "the writer stops"
    );
    env.cleanup().await;
}
