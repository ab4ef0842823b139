//! Poison messages: a message no worker manages to finish reaches its
//! consumer's `max_deliver`; the worker turns it into a dead letter with the
//! attempts' errors, marks the job dead and removes it from the stream.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, TestEnv};
use switchyard::pipeline::worker::{self, WorkerOptions};
use switchyard::sim::SimProfile;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_failing_is_dead_lettered_and_leaves_the_stream() {
    let env = TestEnv::new(SimProfile::default()).await;
    let cfg = env.config_with(&common::SINGLE_ROUTES);
    env.bus.ensure_streams(&cfg).await.unwrap();
    // The openai lane's consumer, as a worker that crashes on every message
    // would see it: delivered twice, never acked.
    let consumer = env
        .bus
        .pull_consumer(
            &env.bus.names.calls_stream(),
            &env.bus.names.lane_consumer("openai"),
            &env.bus.names.call_subject("openai"),
            Duration::from_secs(1),
            2,
            16,
        )
        .await
        .unwrap();
    // A worker with the dispatcher and the other lanes (and the advisory listener).
    let w = worker::start(
        Arc::new(cfg),
        env.pool.clone(),
        env.bus.clone(),
        WorkerOptions {
            lanes: Some(vec!["anthropic".into(), "gemini".into()]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // Job 1 is a sales job: routed to gpt-4.1 on openai.
    let js: Vec<_> = common::jobs("poison", 2).into_iter().skip(1).collect();
    let id = js[0].id.clone();
    switchyard::enqueue::publish_jobs(&env.bus, &js, None)
        .await
        .unwrap();
    for delivery in 1..=2 {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(10))
            .messages()
            .await
            .unwrap();
        use futures::StreamExt;
        let m = batch.next().await.expect("a delivery").unwrap();
        assert_eq!(m.info().unwrap().delivered, delivery);
        // ...and the worker handling it dies: no ack.
    }
    // A consumer still pulling: JetStream does not deliver it a third time.
    {
        use futures::StreamExt;
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(3))
            .messages()
            .await
            .unwrap();
        assert!(batch.next().await.is_none(), "delivered past max_deliver");
    }
    wait_until(Duration::from_secs(30), "the job is dead", || async {
        env.count(&format!(
            "SELECT count(*) FROM jobs WHERE id = '{id}' AND status = 'dead'"
        ))
        .await
            == 1
    })
    .await;
    let reason: String = sqlx::query_scalar("SELECT reason FROM dead_letters WHERE job_id = $1")
        .bind(&id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(reason.contains("2 deliveries"), "{reason}");
    assert!(reason.contains("lane-openai"), "{reason}");
    let payload: Vec<u8> = sqlx::query_scalar("SELECT payload FROM dead_letters WHERE job_id = $1")
        .bind(&id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let call: switchyard::bus::CallMsg = serde_json::from_slice(&payload).unwrap();
    assert_eq!(call.model, "gpt-4.1");
    let calls_stream = env.bus.names.calls_stream();
    wait_until(
        Duration::from_secs(10),
        "the message left the stream",
        || async {
            let mut st = env.bus.js.get_stream(&calls_stream).await.unwrap();
            st.info().await.unwrap().state.messages == 0
        },
    )
    .await;
    w.shutdown().await;

    // `switchyard dlq`: listed, replayed once under the same job id, done.
    let w = env
        .start_worker(env.config_with(&common::SINGLE_ROUTES))
        .await;
    let dl_id: i64 = sqlx::query_scalar("SELECT id FROM dead_letters WHERE job_id = $1")
        .bind(&id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let run = |args: Vec<String>| {
        let vars = env.child_env();
        tokio::task::spawn_blocking(move || common::switchyard(&vars).args(args).output().unwrap())
    };
    let out = run(vec!["dlq".into(), "list".into()]).await.unwrap();
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && listed.contains(&id), "{listed}");
    let out = run(vec!["dlq".into(), "replay".into(), dl_id.to_string()])
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && said.contains("replayed"), "{said}");
    wait_until(
        Duration::from_secs(30),
        "the replayed job succeeds",
        || async {
            env.count(&format!(
                "SELECT count(*) FROM jobs WHERE id = '{id}' AND status = 'succeeded'"
            ))
            .await
                == 1
        },
    )
    .await;
    let out = run(vec!["dlq".into(), "replay".into(), dl_id.to_string()])
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("already replayed"), "{said}");
    let out = run(vec!["dlq".into(), "list".into()]).await.unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&id));
    let out = run(vec!["dlq".into(), "show".into(), dl_id.to_string()])
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        shown.contains("2 deliveries") && shown.contains("replayed   20"),
        "{shown}"
    );
    w.shutdown().await;
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM results WHERE job_id = '{id}'"
        ))
        .await,
        1
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM calls WHERE job_id = '{id}' AND outcome = 'ok'"
        ))
        .await,
        1,
        "exactly one answered call"
    );
    env.cleanup().await;
}

/// `dlq list --reason` and `dlq replay --all --reason` match the text
/// literally and case-insensitively: `%` and `_` in it are not wildcards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_filter_by_reason_text_literally() {
    use switchyard::store::{dlq, DeadLetterRow, Row};
    let env = TestEnv::new(SimProfile::default()).await;
    let tasks = switchyard::tasks::Tasks::new();
    let writer = switchyard::store::Writer::spawn(env.pool.clone(), 16, Duration::ZERO, 2, &tasks);
    let reasons = [
        "amount 100% wrong",
        "Amount 1000 wrong",
        "bad under_score",
        "bad underXscore",
    ];
    let rows = reasons
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Row::DeadLetter(DeadLetterRow {
                source: format!("TEST:{i}"),
                subject: "t.jobs.x".into(),
                job_id: None,
                payload: b"{}".to_vec(),
                reason: r.to_string(),
            })
        })
        .collect();
    writer.write(rows).await.unwrap();
    let listed = |filter: &'static str| {
        let pool = env.pool.clone();
        async move {
            let mut r: Vec<String> = dlq::list(&pool, Some(filter), false, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|d| d.reason)
                .collect();
            r.sort();
            let ids = dlq::unreplayed_ids(&pool, Some(filter)).await.unwrap();
            assert_eq!(ids.len(), r.len(), "replay --all picks what list shows");
            r
        }
    };
    assert_eq!(listed("100%").await, ["amount 100% wrong"]);
    assert_eq!(
        listed("AMOUNT").await,
        ["Amount 1000 wrong", "amount 100% wrong"]
    );
    assert_eq!(listed("under_score").await, ["bad under_score"]);
    assert!(listed("%").await.len() == 1, "only the reason with a %");
    drop(writer);
    tasks.stop(Duration::from_secs(10)).await;
    env.cleanup().await;
}
