//! Fleet-wide buckets against the real NATS: several independent
//! connections (as several worker processes would have) share one budget
//! through KV compare-and-set, and never take more than it holds.

mod common;

use switchyard::fleet::{open_store, FleetBucket, Shape};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_never_overdraw_a_shared_bucket() {
    let prefix = format!("sy_f_{}", &switchyard::enqueue::new_job_id()[..10]);
    // A bucket of 100 that (for the length of the test) does not refill.
    let shape = Shape {
        capacity: 100.0,
        per_ms: 1e-9,
    };
    let mut tasks = Vec::new();
    let mut contexts = Vec::new();
    for _ in 0..3 {
        let client = async_nats::connect(common::nats_url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let store = open_store(&js, &prefix).await.unwrap();
        contexts.push(js);
        let bucket = FleetBucket::new(store, "openai.rpm", shape);
        tasks.push(tokio::spawn(async move {
            let mut granted = 0;
            for _ in 0..60 {
                if bucket.try_take(1.0).await.unwrap().is_ok() {
                    granted += 1;
                }
            }
            granted
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 100, "3 clients x 60 attempts on a bucket of 100");

    // A refund makes exactly that much available again.
    let store = open_store(&contexts[0], &prefix).await.unwrap();
    let bucket = FleetBucket::new(store, "openai.rpm", shape);
    assert!(bucket.try_take(1.0).await.unwrap().is_err());
    bucket.refund(2.0).await.unwrap();
    assert!(bucket.try_take(1.0).await.unwrap().is_ok());
    assert!(bucket.try_take(1.0).await.unwrap().is_ok());
    assert!(bucket.try_take(1.0).await.unwrap().is_err());

    let bucket_name = format!("KV_{}_LIMITS", prefix.to_ascii_uppercase());
    let _ = contexts[0].delete_stream(bucket_name).await;
}

/// Three workers (each with its own NATS connection, as separate processes
/// would have) against a provider that allows 2 requests a second per model
/// and sends no rate-limit headers.
async fn run_three_workers(fleet: bool) -> (usize, usize) {
    use std::sync::Arc;
    use std::time::Duration;
    use switchyard::bus::Bus;
    use switchyard::sim::SimProfile;
    use switchyard::worker::{self, WorkerOptions};

    let env = common::TestEnv::new(SimProfile {
        rpm: 120,
        rate_headers: false,
        ..Default::default()
    })
    .await;
    let fleet_flag = if fleet { "true" } else { "false" };
    let mut overrides: Vec<(&str, &str)> = common::SINGLE_ROUTES.to_vec();
    for p in ["OPENAI", "ANTHROPIC", "GEMINI"] {
        overrides.push((
            Box::leak(format!("SWITCHYARD_PROVIDERS__{p}__RPM").into_boxed_str()),
            "120",
        ));
        overrides.push((
            Box::leak(format!("SWITCHYARD_PROVIDERS__{p}__FLEET").into_boxed_str()),
            fleet_flag,
        ));
        overrides.push((
            Box::leak(format!("SWITCHYARD_PROVIDERS__{p}__MAX_CONCURRENCY").into_boxed_str()),
            "4",
        ));
    }
    overrides.push(("SWITCHYARD_RETRY__MAX_ATTEMPTS", "20"));
    let cfg = Arc::new(env.config_with(&overrides));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let bus = Bus::connect(&common::nats_url(), &env.name).await.unwrap();
        workers.push(
            worker::start(cfg.clone(), env.pool.clone(), bus, WorkerOptions::default())
                .await
                .unwrap(),
        );
    }
    let js = common::jobs("fleet", 18);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    switchyard::enqueue::publish_jobs(&env.bus, &js, None)
        .await
        .unwrap();
    assert!(
        switchyard::enqueue::wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    let succeeded = env
        .count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
        .await as usize;
    let limited = env.sim.ledger().iter().filter(|e| e.status == 429).count();
    for w in workers {
        w.shutdown().await;
    }
    env.cleanup().await;
    (succeeded, limited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_limits_hold_across_workers_where_per_process_limits_do_not() {
    // Per process, each of the three workers thinks it may send 120 a minute:
    // together they overrun the provider.
    let (ok, limited) = run_three_workers(false).await;
    assert_eq!(ok, 18);
    assert!(limited > 0, "per-process limits collected no 429s");
    // Fleet-wide, the three share one budget: no 429 at all.
    let (ok, limited) = run_three_workers(true).await;
    assert_eq!(ok, 18);
    assert_eq!(limited, 0, "fleet-wide limits still collected 429s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_learned_by_one_process_holds_for_all() {
    use switchyard::fleet::FleetPause;
    let prefix = format!("sy_p_{}", &switchyard::enqueue::new_job_id()[..10]);
    let mut pauses = Vec::new();
    let mut contexts = Vec::new();
    for _ in 0..2 {
        let client = async_nats::connect(common::nats_url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        pauses.push(FleetPause::new(
            open_store(&js, &prefix).await.unwrap(),
            "openai.pause",
        ));
        contexts.push(js);
    }
    assert_eq!(pauses[1].until_ms().await.unwrap(), 0);
    pauses[0].extend(5_000).await.unwrap();
    assert_eq!(
        pauses[1].until_ms().await.unwrap(),
        5_000,
        "the other process sees it"
    );
    pauses[1].extend(3_000).await.unwrap();
    assert_eq!(
        pauses[0].until_ms().await.unwrap(),
        5_000,
        "a pause is never shortened"
    );
    pauses[1].extend(9_000).await.unwrap();
    assert_eq!(pauses[0].until_ms().await.unwrap(), 9_000);
    let _ = contexts[0]
        .delete_stream(format!("KV_{}_LIMITS", prefix.to_ascii_uppercase()))
        .await;
}
