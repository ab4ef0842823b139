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
