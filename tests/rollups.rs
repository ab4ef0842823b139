//! Hourly call rollups (migration 0022) against the calls they summarize:
//! real jobs through the pipeline (fallbacks, pipelines, consensus, retried
//! server errors, cached and reasoning tokens), then retention deleting some
//! of them; after each, every rollup figure must equal the aggregate over
//! `calls`, and the report's rollup-read figures the raw ones.

mod common;

use common::TestEnv;
use switchyard::sim::SimProfile;
use switchyard::store::report::{self, Scope};

async fn assert_exact(env: &TestEnv, when: &str) {
    let diff = switchyard::store::rollups::mismatches(&env.pool)
        .await
        .unwrap();
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
    assert_exact(&env, "after the run").await;

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
    env.cleanup().await;
}
