//! Job control in the envelope: `not_before` (the job waits in Postgres,
//! holding no NATS delivery, and runs when due, across a worker restart)
//! and `expires_at` (a job not started by then ends `expired` without a
//! provider call, whether it expired before arriving, while scheduled, or
//! while waiting in a busy lane).

mod common;

use std::time::{Duration, SystemTime};

use common::TestEnv;
use switchyard::enqueue::{publish_jobs, wait_finished, Outgoing};
use switchyard::envelope::JobEnvelope;
use switchyard::sim::SimProfile;

fn at(from_now_ms: i64) -> String {
    let t = if from_now_ms >= 0 {
        SystemTime::now() + Duration::from_millis(from_now_ms as u64)
    } else {
        SystemTime::now() - Duration::from_millis((-from_now_ms) as u64)
    };
    humantime::format_rfc3339_millis(t).to_string()
}

fn job(
    id: &str,
    category: &str,
    not_before: Option<String>,
    expires_at: Option<String>,
) -> Outgoing {
    let mut e = JobEnvelope::prompt(id, category, format!("Question {id}"));
    e.not_before = not_before;
    e.expires_at = expires_at;
    Outgoing::from_envelope(&e).unwrap()
}

async fn status(env: &TestEnv, id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(&env.pool)
        .await
        .unwrap()
        .unwrap_or_default()
}

fn called(env: &TestEnv, id: &str) -> bool {
    env.sim
        .ledger()
        .iter()
        .any(|e| e.call.as_ref().is_some_and(|t| t.job_id == id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_job_waits_in_postgres_and_runs_when_due_across_a_restart() {
    let env = TestEnv::new(SimProfile::default()).await;
    let first = env.start_worker(env.config()).await;
    let not_before = at(4000);
    let due = humantime::parse_rfc3339(&not_before).unwrap();
    publish_jobs(
        &env.bus,
        &[job("later-1", "support", Some(not_before.clone()), None)],
        None,
    )
    .await
    .unwrap();
    common::wait_until(Duration::from_secs(10), "the job stored and parked", || async {
        env.count("SELECT count(*) FROM jobs WHERE id = 'later-1' AND parked_at IS NOT NULL AND not_before IS NOT NULL")
            .await
            == 1
    })
    .await;
    // It holds no NATS delivery: the jobs stream's consumer has nothing pending.
    let depths = env.bus.queue_depths(&[]).await.unwrap();
    assert!(depths.jobs.values().all(|n| *n == 0), "{depths:?}");
    assert!(first.shutdown().await);
    assert!(!called(&env, "later-1"), "not before its time");

    // Another worker takes over and runs it once it is due.
    let second = env.start_worker(env.config()).await;
    assert!(wait_finished(
        &env.pool,
        &["later-1".to_string()],
        Duration::from_secs(30),
        None
    )
    .await
    .unwrap());
    assert_eq!(status(&env, "later-1").await, "succeeded");
    let first_call: SystemTime = {
        let ms: f64 = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM min(created_at))::float8 * 1000 FROM calls WHERE job_id = 'later-1'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64)
    };
    assert!(
        first_call + Duration::from_millis(5) >= due,
        "called before not_before"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE id = 'later-1' AND parked_at IS NULL")
            .await,
        1
    );
    assert!(second.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_not_started_by_expires_at_end_expired_without_a_call() {
    let env = TestEnv::new(SimProfile {
        latency_ms: 1500,
        ..Default::default()
    })
    .await;
    let mut cfg = env.config_from(&format!(
        "{}\n[categories.slow]\nroute = {{ kind = \"single\", target = \"gpt-4o-mini\" }}\n",
        common::SHIPPED_CONFIG
    ));
    cfg.providers.get_mut("openai").unwrap().max_concurrency = 1;
    let worker = env.start_worker(cfg).await;
    publish_jobs(
        &env.bus,
        &[
            // Expired before it arrived.
            job("gone", "slow", None, Some(at(-1000))),
            // Expires while it waits for its time.
            job("sched", "slow", Some(at(2500)), Some(at(1200))),
            // Occupies the lane's only slot for 1.5 s ...
            job("busy", "slow", None, None),
        ],
        None,
    )
    .await
    .unwrap();
    common::wait_until(Duration::from_secs(10), "busy under way", || async {
        env.count("SELECT count(*) FROM calls WHERE job_id = 'busy'")
            .await
            == 1
    })
    .await;
    // ... so this one, behind it, expires in the lane.
    publish_jobs(
        &env.bus,
        &[job("behind", "slow", None, Some(at(500)))],
        None,
    )
    .await
    .unwrap();
    let ids: Vec<String> = ["gone", "sched", "busy", "behind"]
        .map(String::from)
        .to_vec();
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(30), None)
            .await
            .unwrap()
    );
    assert_eq!(status(&env, "busy").await, "succeeded");
    for id in ["gone", "sched", "behind"] {
        assert_eq!(status(&env, id).await, "expired", "{id}");
        assert!(!called(&env, id), "{id} called a provider");
        let error: String = sqlx::query_scalar("SELECT error FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert!(error.contains("expires_at"), "{id}: {error}");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE job_id <> 'busy'")
            .await,
        0
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// `switchyard cancel`: by id or by filter, a scheduled job is cancelled
/// while it waits and never runs when its time comes; a second cancel says
/// it had ended; an unknown id fails the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_cancels_scheduled_jobs_by_id_and_by_filter() {
    let env = TestEnv::new(SimProfile::default()).await;
    let worker = env.start_worker(env.config()).await;
    let when = at(3000);
    let mut tagged = JobEnvelope::prompt("later-m", "support", "Question later-m");
    tagged.not_before = Some(when.clone());
    tagged.metadata.insert("team".into(), "payments".into());
    publish_jobs(
        &env.bus,
        &[
            job("later-c", "support", Some(when.clone()), None),
            Outgoing::from_envelope(&tagged).unwrap(),
            job("later-ok", "support", Some(when), None),
        ],
        None,
    )
    .await
    .unwrap();
    common::wait_until(Duration::from_secs(10), "three jobs parked", || async {
        env.count("SELECT count(*) FROM jobs WHERE parked_at IS NOT NULL")
            .await
            == 3
    })
    .await;
    let cli = |args: &[&str]| {
        let out = common::switchyard(&env.child_env())
            .arg("cancel")
            .args(args)
            .output()
            .unwrap();
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    assert_eq!(cli(&["later-c"]), (Some(0), "later-c\tcancelled\n".into()));
    let (code, out) = cli(&["later-c", "nobody"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("later-c\talready ended (cancelled)"), "{out}");
    assert!(out.contains("nobody\tno such job"), "{out}");
    assert_eq!(
        cli(&["--metadata", "team=payments"]),
        (Some(0), "later-m\tcancelled\n".into())
    );
    assert_eq!(
        cli(&["--metadata", "team"]).0,
        Some(1),
        "KEY=VALUE required"
    );
    // When their time comes, only the job left scheduled runs.
    assert!(wait_finished(
        &env.pool,
        &["later-ok".to_string()],
        Duration::from_secs(30),
        None
    )
    .await
    .unwrap());
    assert_eq!(status(&env, "later-ok").await, "succeeded");
    for id in ["later-c", "later-m"] {
        assert_eq!(status(&env, id).await, "cancelled", "{id}");
        assert!(!called(&env, id), "{id} never called a provider");
    }
    assert!(worker.shutdown().await);
    env.cleanup().await;
}
