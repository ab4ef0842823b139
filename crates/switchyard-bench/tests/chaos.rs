//! The chaos run in small (`switchyard-bench chaos` is the full one): three
//! worker processes, one killed with SIGKILL every 1-2.5 s and restarted,
//! nats-server killed and restarted once, PostgreSQL stopped the hard way
//! and restarted once; its own PostgreSQL and nats-server. Every job ends
//! exactly once and every request the simulator answered has its `calls`
//! row (matched by the job, step and attempt each request carries).

use std::path::Path;
use std::time::Duration;

use switchyard::config::Config;
use switchyard_bench::chaos::{self, ChaosOptions};
use switchyard_servers::{have, nats_server_bin, pg_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_server_restarts_lose_double_and_leave_unrecorded_nothing() {
    if !have("the PostgreSQL server (initdb, pg_ctl)", pg_bin().is_some())
        || !have("nats-server", nats_server_bin().is_some())
    {
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/switchyard.toml");
    let cfg = Config::from_toml_with_env(switchyard::config::SHIPPED_CONFIG, &[]).unwrap();
    let opts = ChaosOptions {
        jobs: 1500,
        processes: 3,
        publish_rate: Some(100.0),
        kill_every: (Duration::from_millis(1000), Duration::from_millis(2500)),
        nats_down: Duration::from_secs(2),
        pg_down: Duration::from_secs(4),
        ack_wait_secs: 5,
        timeout: Duration::from_secs(300),
        worker_exe: switchyard_bench::switchyard_exe().unwrap(),
        batch: false,
    };
    let f = chaos::run(cfg, Some(&path), &opts).await.unwrap();
    eprintln!("{}", f.summary());
    assert!(f.kills >= 5, "workers were killed mid-run: {}", f.kills);
    assert_eq!((f.nats_restarts, f.pg_restarts), (1, 1));
    assert_eq!(f.published, 1500);
    assert_eq!(f.terminal, 1500, "every job ended");
    assert_eq!(f.lost, 0);
    assert_eq!(f.duplicated_results, 0, "no job ended twice");
    assert_eq!(f.inconsistent, 0, "every ending is recorded");
    assert_eq!(f.unrecorded_calls, 0, "every answered request has its row");
    assert_eq!(f.phantom_calls, 0);
    assert_eq!(f.rollup_mismatches, 0, "the rollups equal the calls");
    assert_eq!(
        f.rolled_calls as usize, f.calls_rows,
        "every call was rolled"
    );
    assert_eq!(f.dead, 0, "no job ran out of deliveries");
    assert!(f.answered > 1500);
}
