//! Category budgets across two worker processes: once a category's calls
//! reach its daily cap, new support jobs are downgraded to a cheaper model
//! and new sales jobs are parked (not lost, not blocking other categories);
//! parked jobs run when the budget allows again.

mod common;

use std::time::Duration;

use common::{jobs, spawn_worker, wait_until, TestEnv};
use switchyard::enqueue::{publish_jobs, wait_finished};

const CAP: &str = "0.001";

fn vars(env: &TestEnv, sales_cap: &str) -> Vec<(String, String)> {
    let mut v = env.child_env();
    for (k, val) in common::SINGLE_ROUTES {
        v.push((k.into(), val.into()));
    }
    v.push((
        "SWITCHYARD_CATEGORIES__SUPPORT__BUDGET".into(),
        format!(
            r#"{{ daily_usd = "{CAP}", on_exceed = "downgrade", downgrade_to = "gemini-2.5-flash-lite" }}"#
        ),
    ));
    v.push((
        "SWITCHYARD_CATEGORIES__SALES__BUDGET".into(),
        format!(r#"{{ daily_usd = "{sales_cap}", on_exceed = "pause" }}"#),
    ));
    v
}

fn of(all: &[switchyard::enqueue::Outgoing], cat: &str) -> Vec<switchyard::enqueue::Outgoing> {
    all.iter().filter(|j| j.category == cat).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reached_budget_downgrades_or_parks_across_two_processes() {
    let env = TestEnv::new(Default::default()).await;
    env.bus.ensure_streams(&env.config()).await.unwrap();
    let v = vars(&env, CAP);
    let workers = (spawn_worker(&v), spawn_worker(&v));

    // Phase 1: within budget; these calls spend more than the caps.
    let p1 = jobs("p1", 12);
    let first: Vec<_> = [of(&p1, "support"), of(&p1, "sales")].concat();
    let ids1: Vec<String> = first.iter().map(|j| j.id.clone()).collect();
    publish_jobs(&env.bus, &first, None).await.unwrap();
    assert!(
        wait_finished(&env.pool, &ids1, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    for cat in ["support", "sales"] {
        let spent: rust_decimal::Decimal =
            sqlx::query_scalar("SELECT sum(cost_usd) FROM calls WHERE category = $1")
                .bind(cat)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        assert!(
            spent >= CAP.parse().unwrap(),
            "{cat} spent {spent}: the cap is reached"
        );
    }
    // Each process sees the spend within budget::REFRESH.
    tokio::time::sleep(switchyard::budget::REFRESH + Duration::from_millis(500)).await;

    // Phase 2: over budget.
    let p2 = jobs("p2", 18);
    publish_jobs(&env.bus, &p2, None).await.unwrap();
    let ids = |cat: &str| -> Vec<String> { of(&p2, cat).iter().map(|j| j.id.clone()).collect() };
    let (support2, sales2, lookup2) = (ids("support"), ids("sales"), ids("lookup"));
    // Other categories are not blocked; support runs downgraded.
    assert!(wait_finished(
        &env.pool,
        &[support2.clone(), lookup2.clone()].concat(),
        Duration::from_secs(60),
        None
    )
    .await
    .unwrap());
    // Sales jobs are parked: stored, acked, no calls.
    wait_until(Duration::from_secs(30), "the sales jobs parked", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status = 'queued' AND parked_at IS NOT NULL",
        )
        .bind(&sales2)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        n == sales2.len() as i64
    })
    .await;
    let sales_calls: i64 = sqlx::query_scalar("SELECT count(*) FROM calls WHERE job_id = ANY($1)")
        .bind(&sales2)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(sales_calls, 0, "parked jobs cost nothing");
    let models: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT r.job_id, r.model, j.route_decision->'budget'->>'action'
         FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.category = 'support' ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    for (job, model, action) in &models {
        if job.starts_with("p1") {
            assert_eq!(
                (model.as_str(), action.as_deref()),
                ("claude-sonnet-4-5", None),
                "{job}"
            );
        } else {
            assert_eq!(
                (model.as_str(), action.as_deref()),
                ("gemini-2.5-flash-lite", Some("downgrade")),
                "{job}"
            );
        }
    }
    assert_eq!(models.len(), 4 + 6);
    let lookups: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = ANY($1) AND status = 'succeeded'")
            .bind(&lookup2)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(lookups, 6);

    // The budget allows again (here: a higher cap; a new day does the same):
    // the parked jobs run, once each.
    drop(workers);
    let v = vars(&env, "100");
    let _workers = (spawn_worker(&v), spawn_worker(&v));
    assert!(
        wait_finished(&env.pool, &sales2, Duration::from_secs(90), None)
            .await
            .unwrap(),
        "parked jobs ran when the budget allowed"
    );
    let once: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE c.outcome = 'ok') FROM jobs j LEFT JOIN calls c ON c.job_id = j.id
         WHERE j.id = ANY($1) GROUP BY j.id",
    )
    .bind(&sales2)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(once, vec![1; 6], "each parked job answered once");
    let still_parked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE parked_at IS NOT NULL")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(still_parked, 0);
    env.cleanup().await;
}
