//! Hourly call rollups (migrations 0022, 0028) against the calls they
//! summarize: real jobs through the pipeline (fallbacks, pipelines,
//! consensus, retried server errors, cached and reasoning tokens), read
//! from the raw tail, then rolled, then changed late (a long call's final
//! record, retention, a move); and a roller racing a worker. After each,
//! every rolled figure must equal the aggregate over the calls it covers,
//! and the report's rollup-read figures the raw ones.

mod common;

use std::time::Duration;

use common::TestEnv;
use switchyard::sim::SimProfile;
use switchyard::store::report::{self, Scope};
use switchyard::store::rollups;
use tokio_util::sync::CancellationToken;

async fn set_settle(env: &TestEnv, settle: &str) {
    rollups::lower_settle(&env.pool, settle).await.unwrap();
}

/// Roll until every call is covered; how many calls the rolled rows then
/// cover.
async fn roll_all(env: &TestEnv) -> i64 {
    let (rolled, tail) = rollups::roll_until_covered(&env.pool, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(tail, 0, "{tail} calls still unrolled after 30 s");
    rolled
}

async fn assert_exact(env: &TestEnv, when: &str) {
    let diff = rollups::mismatches(&env.pool).await.unwrap();
    assert!(
        diff.is_empty(),
        "rollups differ from calls {when}: {diff:#?}"
    );
    // The report reads rollups for whole hours when no job prefix is given,
    // raw calls when one is: both must agree (every job here is `ru-`).
    let all = Scope::default();
    let raw = Scope {
        job_prefix: Some("ru-".into()),
        ..Default::default()
    };
    assert_eq!(
        report::cost_total(&env.pool, &all).await.unwrap(),
        report::cost_total(&env.pool, &raw).await.unwrap(),
        "{when}"
    );
    assert_eq!(
        report::costs_by_model(&env.pool, &all).await.unwrap(),
        report::costs_by_model(&env.pool, &raw).await.unwrap(),
        "{when}"
    );
    assert_eq!(
        report::costs_by_category(&env.pool, &all).await.unwrap(),
        report::costs_by_category(&env.pool, &raw).await.unwrap(),
        "{when}"
    );
    assert_eq!(
        report::latency_by_model(&env.pool, &all).await.unwrap(),
        report::latency_by_model(&env.pool, &raw).await.unwrap(),
        "{when}"
    );
    let per_job: Vec<(String, i64)> =
        sqlx::query_as("SELECT category, jobs FROM cost_per_job ORDER BY 1")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let distinct: Vec<(String, i64)> =
        sqlx::query_as("SELECT category, count(DISTINCT job_id) FROM calls GROUP BY 1 ORDER BY 1")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(per_job, distinct, "cost_per_job's jobs {when}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_the_calls_after_real_jobs_and_a_prune() {
    let extra = SimProfile {
        cache_write_share: 0.1,
        reasoning_tokens: 7,
        ..Default::default()
    };
    let (env, _) = common::mixed_run("ru", 60, extra).await;

    // What ran is what this test is about: retries, fallbacks, several
    // steps per job, answered calls with latency.
    assert!(env.count("SELECT count(*) FROM calls").await > 60);
    assert!(
        env.count("SELECT count(*) FROM calls WHERE outcome = 'retryable_error'")
            .await
            > 0
    );
    assert!(
        env.count("SELECT count(*) FROM calls WHERE attempt > 1")
            .await
            > 0
    );
    assert!(env.count("SELECT count(*) FROM calls WHERE step > 0").await > 0);
    assert!(
        env.count("SELECT count(*) FROM calls WHERE outcome = 'ok'")
            .await
            > 0
    );
    // The worker's roller leaves calls under 30 s old to the raw tail.
    let calls = env.count("SELECT count(*) FROM calls").await;
    assert_exact(&env, "after the run, read from the raw tail").await;

    // Rolled: the rolled rows cover every call, and equal them.
    set_settle(&env, "0").await;
    assert_eq!(roll_all(&env).await, calls);
    assert_exact(&env, "after rolling").await;

    // A late final record (a call over the settle time answered) applies
    // its delta to the rolled rows.
    sqlx::query(
        "UPDATE calls SET outcome = 'ok', cost_usd = cost_usd + 0.25, output_tokens = 99,
                latency_ms = 70000
         WHERE id = (SELECT min(id) FROM calls WHERE outcome <> 'ok')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    assert_exact(&env, "after a late final record").await;

    // Retention deletes the calls of ended jobs: the rollups follow.
    let pruned = switchyard::store::retention::delete_jobs_older_than(&env.pool, 0, 20)
        .await
        .unwrap();
    assert!(pruned.calls > 0, "{pruned:?}");
    assert_exact(&env, "after a prune").await;

    // An update that moves calls to another category keeps them exact too.
    sqlx::query(
        "UPDATE calls SET category = 'moved' WHERE job_id IN (SELECT min(job_id) FROM calls)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    assert_exact(&env, "after moving a job's calls").await;
    let (rolled, tail) = rollups::coverage(&env.pool).await.unwrap();
    assert_eq!(
        (rolled, tail),
        (env.count("SELECT count(*) FROM calls").await, 0)
    );
    env.cleanup().await;
}

/// A roller stepping every few milliseconds while a worker writes, with
/// changes late after 150 ms: some of each call's rows are the roll's, some
/// apply deltas, and some arrive while a roll runs. Once everything is
/// rolled, the rollups equal the calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roller_racing_the_writer_keeps_the_rollups_exact() {
    let env = TestEnv::new(common::mixed_profile(SimProfile {
        latency_ms: 140,
        ..Default::default()
    }))
    .await;
    set_settle(&env, "150 milliseconds").await;
    let token = CancellationToken::new();
    let roller = async {
        let mut steps = 0;
        while !token.is_cancelled() {
            steps += rollups::roll(&env.pool, 1000, &token).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        steps
    };
    let writer = async {
        common::run_jobs(&env, "ru", 120).await;
        token.cancel();
    };
    let (steps, ()) = tokio::join!(roller, writer);
    assert!(steps > 0, "the roller rolled while the worker wrote");
    let late = env
        .count("SELECT count(*) FROM calls WHERE outcome = 'ok' AND latency_ms > 150")
        .await;
    assert!(late > 0, "some calls were answered after the settle time");
    let calls = env.count("SELECT count(*) FROM calls").await;
    assert_eq!(roll_all(&env).await, calls);
    assert_exact(&env, "after racing the writer").await;
    env.cleanup().await;
}

/// A late change still open holds the roller off, but only for the lock's
/// two seconds: the step gives up (so a worker's shutdown never waits on
/// it) and rolls once the change commits, which it sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_late_change_holds_the_roller_off_without_hanging_it() {
    let env = TestEnv::new(SimProfile::default()).await;
    set_settle(&env, "0").await;
    let insert = |job: &'static str| {
        sqlx::query(
            "INSERT INTO calls (job_id, category, provider, model, step, attempt, input_tokens,
                                output_tokens, price_input_per_mtok, price_output_per_mtok,
                                price_cached_input_per_mtok, cost_usd, latency_ms, outcome)
             VALUES ($1, 'support', 'sim', 'm', 0, 1, 10, 5, 1, 1, 1, 0.5, 40, 'ok')",
        )
        .bind(job)
        .execute(&env.pool)
    };
    insert("ru-a").await.unwrap();
    assert_eq!(roll_all(&env).await, 1);
    insert("ru-b").await.unwrap();

    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE calls SET cost_usd = 2.5, outcome = 'terminal_error' WHERE job_id = 'ru-a'",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let held = tokio::time::timeout(Duration::from_secs(20), rollups::step(&env.pool))
        .await
        .expect("the roller gave up instead of waiting for the open change")
        .unwrap();
    assert_eq!(held, None, "no roll while a late change is open");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    tx.commit().await.unwrap();

    assert!(rollups::step(&env.pool).await.unwrap().is_some());
    assert_eq!(rollups::coverage(&env.pool).await.unwrap(), (2, 0));
    assert_exact(&env, "after a late change the roller waited for").await;
    env.cleanup().await;
}
