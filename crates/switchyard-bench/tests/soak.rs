//! The soak in small (`switchyard-bench soak` is the million-job night):
//! 3,000 single-call jobs through two worker processes and the simulator,
//! on the NATS and Postgres of `NATS_URL` and `DATABASE_URL` (default
//! loopback), in a database and subject prefix of its own. Every job ends
//! once, every answered request is recorded, and the JSON carries the
//! figures the full run reports. A second run withholds three jobs it
//! counts as published: the reconciliation must call them lost.

use std::path::Path;
use std::time::Duration;

use switchyard::config::Config;
use switchyard_bench::soak::{self, SoakOptions};

fn urls() -> (String, String) {
    (
        std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/switchyard".into()),
        std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
    )
}

fn config() -> (Config, std::path::PathBuf) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/switchyard.toml");
    let cfg = Config::from_toml_with_env(switchyard::config::SHIPPED_CONFIG, &[]).unwrap();
    (cfg, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_soak_loses_and_doubles_nothing_and_reports_every_figure() {
    let (db, nats) = urls();
    let (cfg, path) = config();
    let opts = SoakOptions {
        workers: 2,
        latency_ms: 20,
        jitter_ms: 40,
        backlog: 1000,
        max_concurrency: 200,
        // A run this short is all ramp-up: the tenths and the memory are
        // reported, not judged.
        min_tenth_ratio: None,
        max_rss_drift: None,
        timeout: Duration::from_secs(45),
        ..SoakOptions::soak(3000, &db, &nats).unwrap()
    };
    let f = soak::run(cfg, Some(&path), &opts).await.unwrap();
    eprintln!("{}", f.summary());
    assert_eq!((f.published, f.terminal, f.lost), (3000, 3000, 0));
    assert_eq!(f.succeeded, 3000, "single calls to an error-free simulator");
    assert_eq!(f.duplicated_results, 0, "no job ended twice");
    assert_eq!(f.inconsistent, 0, "every ending is recorded");
    assert_eq!(f.unrecorded_calls, 0, "every answered request has its row");
    assert_eq!(f.phantom_calls, 0);
    assert_eq!(f.duplicate_answers, 0);
    assert_eq!(f.answered, 3000, "one call per job");
    assert!(f.passed(), "{:?}", f.missed);

    let json = serde_json::to_value(&f).unwrap();
    for key in [
        "tenth_jobs_per_sec",
        "last_to_first_tenth_ratio",
        "worker_rss",
        "worker_peak_rss_mb",
        "calls_in_flight",
        "pg_bytes_per_job",
        "pg_bytes_by_table",
        "nats_stream_bytes",
        "nats_streams",
        "lost",
        "duplicated_results",
        "elapsed_s",
    ] {
        assert!(json.get(key).is_some(), "the JSON has {key}");
    }
    let tenths = json["tenth_jobs_per_sec"].as_array().unwrap();
    assert_eq!(tenths.len(), 10);
    assert!(tenths.iter().all(|t| t.as_f64().unwrap() > 0.0));
    assert!(f.last_to_first_tenth_ratio > 0.0);
    assert_eq!(f.worker_rss.len(), 2);
    for w in &f.worker_rss {
        assert!(w.rss_mb_at_10pct > 0.0 && w.rss_mb_at_90pct > 0.0 && w.peak_rss_mb > 0.0);
    }
    assert!(f.pg_bytes_per_job > 0.0);
    for t in ["jobs", "calls", "results"] {
        assert!(f.pg_bytes_by_table.contains_key(t), "{t} is reported");
    }
    assert_eq!(f.nats_streams.len(), 3, "jobs, calls and the limits bucket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_never_end_are_reported_lost() {
    let (db, nats) = urls();
    let (cfg, path) = config();
    let opts = SoakOptions {
        workers: 1,
        latency_ms: 5,
        jitter_ms: 5,
        min_tenth_ratio: None,
        max_rss_drift: None,
        timeout: Duration::from_secs(8),
        withhold: 3,
        ..SoakOptions::soak(300, &db, &nats).unwrap()
    };
    let f = soak::run(cfg, Some(&path), &opts).await.unwrap();
    eprintln!("{}", f.summary());
    assert_eq!((f.published, f.terminal, f.lost), (300, 297, 3));
    assert!(!f.passed());
    assert!(
        f.missed.iter().any(|m| m.contains("did not end")),
        "{:?}",
        f.missed
    );
}
