//! Job priority: urgent work submitted behind an overnight dump is served
//! first by the provider lane it waits in, and the dump still moves.

mod common;

use std::time::Duration;

use common::TestEnv;
use switchyard::enqueue::{publish_jobs, Outgoing};
use switchyard::envelope::{JobEnvelope, Priority};
use switchyard::sim::SimProfile;

fn jobs(tag: &str, n: usize, priority: Priority) -> Vec<Outgoing> {
    (0..n)
        .map(|i| {
            // No deadline: the overnight category serves these in real time.
            let mut e = JobEnvelope::prompt(
                format!("{tag}-{i:05}"),
                "overnight",
                format!("Describe product {i}"),
            );
            e.priority = priority;
            Outgoing::from_envelope(&e).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_jobs_overtake_a_backlog_of_twenty_thousand_low_ones() {
    // A slow provider: two calls at a time, 50 ms each (about 40 calls/s).
    let env = TestEnv::new(SimProfile {
        latency_ms: 50,
        ..SimProfile::default()
    })
    .await;
    let cfg = env.config_with(&[("SWITCHYARD_PROVIDERS__GEMINI__MAX_CONCURRENCY", "2")]);
    let worker = env.start_worker(cfg).await;

    let low = jobs("low", 20_000, Priority::Low);
    publish_jobs(&env.bus, &low, None).await.unwrap();
    // The dispatcher drains the jobs stream far faster than the lane serves
    // calls: the backlog waits in the lane's low-priority queue.
    common::wait_until(
        Duration::from_secs(180),
        "the 20,000 low-priority jobs dispatched",
        || async { env.count("SELECT count(*) FROM jobs").await == 20_000 },
    )
    .await;
    let low_done = "SELECT count(*) FROM jobs WHERE id LIKE 'low-%' AND status = 'succeeded'";
    let before = env.count(low_done).await;
    assert!(
        before < 15_000,
        "the backlog is still there ({before} done)"
    );

    let high = jobs("high", 50, Priority::High);
    publish_jobs(&env.bus, &high, None).await.unwrap();
    common::wait_until(
        Duration::from_secs(120),
        "the 50 high-priority jobs succeeded",
        || async {
            env.count("SELECT count(*) FROM jobs WHERE id LIKE 'high-%' AND status = 'succeeded'")
                .await
                == 50
        },
    )
    .await;
    let during = env.count(low_done).await - before;
    eprintln!("low done before the high jobs: {before}; while they were served: {during}");
    assert!(
        during < 1_000,
        "{during} low-priority jobs finished while the 50 high ones were served"
    );

    // Low work keeps moving afterwards (and never lost its place).
    let after_high = env.count(low_done).await;
    common::wait_until(
        Duration::from_secs(60),
        "low-priority jobs still being served",
        || async { env.count(low_done).await >= after_high + 20 },
    )
    .await;
    // The rest of the backlog still waits, counted in the lane's depth.
    let depths = env.bus.queue_depths(&["gemini".to_string()]).await.unwrap();
    assert!(depths.lanes["gemini"] > 0, "{depths:?}");
    assert!(worker.shutdown().await);
    env.cleanup().await;
}
