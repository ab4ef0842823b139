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
    tokio::time::sleep(switchyard::limits::budget::REFRESH + Duration::from_millis(500)).await;

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

/// Jobs published to `auto` that the classifier *model* moves to a category
/// meet that category's budget too: downgraded, or parked after the
/// classifier call (as the category, until the budget allows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_the_classifier_moves_meet_their_categorys_budget() {
    use switchyard::sim::{ScriptedAnswer, SimProfile};
    let answer = |marker: &str, category: &str| ScriptedAnswer {
        model: Some("gemini-2.5-flash-lite".into()),
        contains: Some(format!("{marker} ")),
        text: format!(r#"{{"category": "{category}", "confidence": 0.95}}"#),
    };
    let env = TestEnv::new(SimProfile {
        answers: vec![answer("SALESJOB", "sales"), answer("SUPPORTJOB", "support")],
        ..Default::default()
    })
    .await;
    // Both categories spent more than their caps today.
    sqlx::raw_sql(
        "INSERT INTO calls (job_id, category, provider, model, step, attempt, price_input_per_mtok,
                            price_output_per_mtok, price_cached_input_per_mtok, cost_usd, latency_ms, outcome)
         VALUES ('earlier-1', 'sales', 'openai', 'gpt-4.1', 0, 1, 2, 8, 0.5, 1.0, 100, 'ok'),
                ('earlier-2', 'support', 'anthropic', 'claude-sonnet-4-5', 0, 1, 3, 15, 0.3, 1.0, 100, 'ok')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let overrides: Vec<(String, String)> = vars(&env, CAP)
        .into_iter()
        .filter(|(k, _)| k.starts_with("SWITCHYARD_CATEGORIES"))
        .collect();
    let refs: Vec<(&str, &str)> = overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let worker = env.start_worker(env.config_with(&refs)).await;
    let auto = |marker: &str, i: usize| {
        let mut e = switchyard::envelope::JobEnvelope::prompt(
            format!("{}-{i}", marker.to_lowercase()),
            "auto",
            format!("{marker} {i}: could you help me with this"),
        );
        e.category = None;
        switchyard::enqueue::Outgoing {
            category: "auto".into(),
            id: e.id.clone().unwrap_or_default(),
            payload: serde_json::to_vec(&e).unwrap(),
        }
    };
    let js: Vec<_> = (0..3)
        .flat_map(|i| [auto("SALESJOB", i), auto("SUPPORTJOB", i)])
        .collect();
    publish_jobs(&env.bus, &js, None).await.unwrap();
    let support: Vec<String> = (0..3).map(|i| format!("supportjob-{i}")).collect();
    let sales: Vec<String> = (0..3).map(|i| format!("salesjob-{i}")).collect();
    assert!(
        wait_finished(&env.pool, &support, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    wait_until(
        Duration::from_secs(30),
        "the classified sales jobs parked",
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) AND category = 'sales'
               AND status = 'queued' AND parked_at IS NOT NULL",
            )
            .bind(&sales)
            .fetch_one(&env.pool)
            .await
            .unwrap();
            n == 3
        },
    )
    .await;
    for id in &support {
        let (model, action, by): (String, Option<String>, Option<String>) = sqlx::query_as(
            "SELECT r.model, j.route_decision->'budget'->>'action', j.route_decision->'classifier'->>'by'
             FROM results r JOIN jobs j ON j.id = r.job_id WHERE r.job_id = $1",
        )
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(
            (model.as_str(), action.as_deref(), by.as_deref()),
            ("gemini-2.5-flash-lite", Some("downgrade"), Some("model")),
            "{id}"
        );
    }
    for id in &sales {
        // Only the classifier was asked.
        let calls: Vec<(i32, String)> =
            sqlx::query_as("SELECT step, category FROM calls WHERE job_id = $1")
                .bind(id)
                .fetch_all(&env.pool)
                .await
                .unwrap();
        assert_eq!(calls, vec![(-1, "auto".to_string())], "{id}");
        let action: Option<String> = sqlx::query_scalar(
            "SELECT route_decision->'budget'->>'action' FROM jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(action.as_deref(), Some("pause"), "{id}");
    }
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// A parked job whose deadline passes while it waits for the budget ends
/// failed with the reason when the budget allows again (published again,
/// it would only be dead-lettered, and stay queued).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_job_whose_deadline_passed_fails_with_the_reason() {
    let env = TestEnv::new(Default::default()).await;
    sqlx::raw_sql(
        r#"INSERT INTO jobs (id, category, status, envelope, parked_at, created_at) VALUES
          ('parked-late', 'sales', 'queued',
           '{"id": "parked-late", "prompt": "x", "deadline": "2020-01-01T00:00:00Z"}',
           now() - interval '1 hour', now() - interval '1 hour'),
          ('parked-fine', 'sales', 'queued',
           '{"id": "parked-fine", "prompt": "x", "deadline": "2999-01-01T00:00:00Z"}',
           now() - interval '1 hour', now() - interval '1 hour')"#,
    )
    .execute(&env.pool)
    .await
    .unwrap();
    // A pausing cap the category is far from.
    let overrides = [(
        "SWITCHYARD_CATEGORIES__SALES__BUDGET",
        r#"{ daily_usd = "1000", on_exceed = "pause" }"#,
    )];
    let mut extra: Vec<(&str, &str)> = common::SINGLE_ROUTES.to_vec();
    extra.extend(overrides);
    let worker = env.start_worker(env.config_with(&extra)).await;
    assert!(wait_finished(
        &env.pool,
        &["parked-late".to_string(), "parked-fine".to_string()],
        Duration::from_secs(60),
        None
    )
    .await
    .unwrap());
    let (status, error): (String, Option<String>) =
        sqlx::query_as("SELECT status, error FROM jobs WHERE id = 'parked-late'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("passed while the job was parked")),
        "{error:?}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters").await,
        0,
        "not dead-lettered"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE id = 'parked-fine' AND status = 'succeeded'")
            .await,
        1
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}
