//! Hourly job rollups (migration 0024) against the jobs they summarize:
//! real jobs through the pipeline (fallbacks, pipelines, consensus, retried
//! errors, reviews), moved a few hours back and rolled; then late changes
//! to rolled hours (a status, a late call, a job moved to another hour, a
//! rating, retention) and a re-roll. After each, the report's per-job
//! sections and the views read through the rollups must equal the same
//! read raw, and every rolled hour not marked dirty a fresh aggregate.
//! The roller also stops inside an hour and adds to it later (migration
//! 0026), so its raw tail is minutes long.

mod common;

use common::TestEnv;
use switchyard::sim::SimProfile;
use switchyard::store::job_rollups;
use switchyard::store::report::{self, Scope, TimeBound, TimeUnit};
use tokio_util::sync::CancellationToken;

/// Every per-job section of the report, rolled (no job prefix) and raw
/// (`prefix`, which every job of the test has), over several windows: equal.
async fn assert_exact(env: &TestEnv, prefix: &str, when: &str) {
    let diff = job_rollups::mismatches(&env.pool).await.unwrap();
    assert!(diff.is_empty(), "job rollups differ {when}: {diff:#?}");
    let windows = [
        Scope::default(),
        Scope {
            since: TimeBound::Ago(4, TimeUnit::Hours),
            ..Default::default()
        },
        Scope {
            since: TimeBound::Ago(330, TimeUnit::Minutes),
            until: TimeBound::Ago(150, TimeUnit::Minutes),
            ..Default::default()
        },
        Scope {
            category: Some("support".into()),
            ..Default::default()
        },
    ];
    // The views on `job_figures`, and the same with nothing rolled (inside
    // a transaction rolled back): equal.
    let mut tx = env.pool.begin().await.unwrap();
    let through_rollups = view_rows(&mut tx).await;
    assert!(through_rollups.len() >= 5, "{through_rollups:?}");
    sqlx::query("UPDATE job_rollup_state SET rolled_until = NULL")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(through_rollups, view_rows(&mut tx).await, "views {when}");
    tx.rollback().await.unwrap();
    for rolled in windows {
        let raw = Scope {
            job_prefix: Some(prefix.into()),
            ..rolled.clone()
        };
        let w = format!("{when}, {rolled:?}");
        assert_eq!(
            report::jobs_by_status(&env.pool, &rolled).await.unwrap(),
            report::jobs_by_status(&env.pool, &raw).await.unwrap(),
            "jobs by status {w}"
        );
        assert_eq!(
            report::routes(&env.pool, &rolled).await.unwrap(),
            report::routes(&env.pool, &raw).await.unwrap(),
            "routes {w}"
        );
        assert_eq!(
            report::served_by(&env.pool, &rolled).await.unwrap(),
            report::served_by(&env.pool, &raw).await.unwrap(),
            "served by {w}"
        );
        assert_eq!(
            report::job_costs_by_category(&env.pool, &rolled)
                .await
                .unwrap(),
            report::job_costs_by_category(&env.pool, &raw)
                .await
                .unwrap(),
            "cost split {w}"
        );
    }
}

/// Every row of the views on `job_figures`, as text.
async fn view_rows(tx: &mut sqlx::PgConnection) -> Vec<String> {
    let mut rows = Vec::new();
    for v in [
        "category_rates",
        "latency_by_category",
        "model_usage",
        "savings_by_category",
        "what_if_by_model",
    ] {
        let sql = format!("SELECT format('{v} %s', t.*) FROM {v} t ORDER BY 1");
        let r: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        rows.extend(r);
    }
    rows
}

async fn roll(env: &TestEnv) {
    job_rollups::roll(&env.pool, 10_000, &CancellationToken::new())
        .await
        .unwrap();
}

/// The roller re-rolls a dirty hour once nothing has touched it for a
/// minute: here the minute is set back instead of waited for.
async fn quiet(env: &TestEnv) {
    sqlx::query("UPDATE job_rollup_dirty SET touched_at = now() - interval '2 minutes'")
        .execute(&env.pool)
        .await
        .unwrap();
}

/// Hours marked dirty.
async fn dirty(env: &TestEnv) -> i64 {
    env.count("SELECT count(*) FROM job_rollup_dirty").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_rollups_equal_the_jobs_through_late_changes_and_rerolls() {
    let (env, ids) = common::mixed_run("jr", 60, SimProfile::default()).await;
    // Several routes, outcomes and statuses: what the rollup keys split.
    assert!(
        env.count("SELECT count(DISTINCT route_decision->>'kind') FROM jobs")
            .await
            >= 3
    );
    assert!(env.count("SELECT count(*) FROM results").await > 0);

    // Nothing is over five minutes old yet: nothing rolls but the empty past.
    roll(&env).await;
    assert_eq!(env.count("SELECT count(*) FROM job_rollups").await, 0);

    // The jobs move 3 to 5 hours back, into hours already rolled (empty):
    // that marks them, and once quiet they are re-rolled.
    sqlx::query(
        "UPDATE jobs SET created_at = created_at - (3 + (hashtext(id) & 3) % 3) * interval '1 hour'
                                                 - (hashtext(id) & 63) * interval '1 minute'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    assert!(dirty(&env).await > 0, "moving old jobs marks their hours");
    assert_exact(&env, "jr-", "with the moved hours dirty").await;
    quiet(&env).await;
    roll(&env).await;
    assert_eq!(dirty(&env).await, 0, "rolled hours are clean");
    assert!(env.count("SELECT count(*) FROM job_rollups").await > 0);
    let (until, _, _) = job_rollups::state(&env.pool).await.unwrap();
    assert!(until.is_some());
    assert_exact(&env, "jr-", "after the first roll").await;

    // A late status change, a late call and a rating on rolled jobs: their
    // hours go dirty and are read raw until re-rolled.
    sqlx::query(
        "UPDATE jobs SET status = 'failed' WHERE id = (SELECT min(id) FROM jobs WHERE status = 'succeeded')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO calls (job_id, category, provider, model, step, attempt, input_tokens,
                            output_tokens, cached_input_tokens, price_input_per_mtok,
                            price_output_per_mtok, price_cached_input_per_mtok, cost_usd,
                            latency_ms, outcome)
         SELECT id, category, 'openai', 'gpt-4o', 7, 1, 100, 10, 0, 2.5, 10, 1.25, 0.00035, 120, 'ok'
         FROM jobs WHERE id = (SELECT max(id) FROM jobs)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    // A job moved from one rolled hour to another: both hours change.
    sqlx::query("UPDATE jobs SET created_at = created_at - interval '1 hour' WHERE id = $1")
        .bind(&ids[5])
        .execute(&env.pool)
        .await
        .unwrap();
    switchyard::store::feedback::insert(&env.pool, &ids[1], 4, None)
        .await
        .unwrap();
    assert!(dirty(&env).await > 0, "late changes mark their hours");
    // What the gauges an operator watches are set to says the same.
    let (lag, marked) = job_rollups::observe(&env.pool).await.unwrap();
    assert_eq!(marked, dirty(&env).await);
    // The roller stays five to six minutes behind (minute steps, nothing
    // else open): the raw tail is minutes of jobs, not hours.
    let lag = lag.unwrap();
    assert!((300.0..420.0).contains(&lag), "{lag}");
    assert_exact(&env, "jr-", "after late changes").await;

    quiet(&env).await;
    roll(&env).await;
    assert_eq!(dirty(&env).await, 0);
    assert_exact(&env, "jr-", "after the re-roll").await;

    // Retention deletes ended jobs with their rows: their hours go dirty,
    // and re-rolled they hold only what is left.
    let pruned = switchyard::store::retention::delete_jobs_older_than(&env.pool, 0, 25)
        .await
        .unwrap();
    assert!(pruned.jobs > 0, "{pruned:?}");
    assert!(dirty(&env).await > 0);
    assert_exact(&env, "jr-", "after a prune").await;
    quiet(&env).await;
    roll(&env).await;
    assert_eq!(dirty(&env).await, 0);
    assert_exact(&env, "jr-", "after the prune's re-roll").await;
    env.cleanup().await;
}

/// Roller steps (as `job_rollups::roll`) that go no further than `upto`.
async fn roll_upto(env: &TestEnv, upto: &str) {
    for _ in 0..10_000 {
        let r: Option<String> =
            sqlx::query_scalar("SELECT job_rollups_step($1::timestamptz)::text")
                .bind(upto)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        if r.is_none() {
            return;
        }
    }
    panic!("the roller did not settle");
}

/// Jobs rolled into hour `h` (text), dirty or not.
async fn rolled_jobs(env: &TestEnv, h: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(jobs), 0)::int8 FROM job_rollups WHERE hour = $1::timestamptz",
    )
    .bind(h)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// A late change (to `status`) of one succeeded early job of
/// `the_roller_stops_inside_an_hour_and_adds_the_rest_later`: its hour is
/// marked, and the figures stay exact.
async fn late_change(env: &TestEnv, status: &str, when: &str) {
    sqlx::query(
        "UPDATE jobs SET status = $1
         WHERE id = (SELECT min(id) FROM jobs WHERE status = 'succeeded' AND hashtext(id) & 1 = 0)",
    )
    .bind(status)
    .execute(&env.pool)
    .await
    .unwrap();
    assert_eq!(dirty(env).await, 1, "{when}");
    assert_exact(
        env,
        "jt-",
        &format!("{when}, then a late change to {status}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_roller_stops_inside_an_hour_and_adds_the_rest_later() {
    let (env, _ids) = common::mixed_run("jt", 40, SimProfile::default()).await;
    let h: String = sqlx::query_scalar("SELECT rollup_hour(now() - interval '3 hours')::text")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    // Two groups in one hour: minutes 10-17 and 40-47.
    sqlx::query(
        "UPDATE jobs SET created_at = $1::timestamptz
             + CASE WHEN hashtext(id) & 1 = 0 THEN interval '10 minutes' ELSE interval '40 minutes' END
             + (hashtext(id) >> 1 & 7) * interval '1 minute'",
    )
    .bind(&h)
    .execute(&env.pool)
    .await
    .unwrap();
    // As if the roller had never run (the worker's may have rolled the
    // empty past before the jobs came).
    for sql in [
        "UPDATE job_rollup_state SET rolled_until = NULL",
        "DELETE FROM job_rollups",
        "DELETE FROM job_rollup_dirty",
    ] {
        sqlx::query(sql).execute(&env.pool).await.unwrap();
    }
    let early = env
        .count("SELECT count(*) FROM jobs WHERE hashtext(id) & 1 = 0")
        .await;
    let all = env.count("SELECT count(*) FROM jobs").await;
    assert!(early > 0 && early < all, "{early} of {all}");
    let half: String = sqlx::query_scalar("SELECT ($1::timestamptz + interval '30 minutes')::text")
        .bind(&h)
        .fetch_one(&env.pool)
        .await
        .unwrap();

    // Rolled to the half hour: the hour's rows hold the early jobs only,
    // and the rest of the hour is read raw.
    roll_upto(&env, &half).await;
    let (until, _, _) = job_rollups::state(&env.pool).await.unwrap();
    let at_half: bool = sqlx::query_scalar("SELECT $1::timestamptz = $2::timestamptz")
        .bind(until.as_deref())
        .bind(&half)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(at_half, "rolled until {until:?}, not {half}");
    assert_exact(&env, "jt-", "rolled to the half hour").await;
    // A late change to an early job marks the hour: read raw up to the
    // half hour until re-rolled, and re-rolled only up to it.
    late_change(&env, "cancelled", "rolled to the half hour").await;
    quiet(&env).await;
    roll_upto(&env, &half).await;
    assert_eq!(dirty(&env).await, 0);
    assert_eq!(rolled_jobs(&env, &h).await, early);
    assert_exact(&env, "jt-", "re-rolled to the half hour").await;

    // Rolled on: the late jobs are added to the same hour's rows, with no
    // mark (they were not rolled before), and the roller ends minutes
    // behind now.
    roll(&env).await;
    assert_eq!(dirty(&env).await, 0);
    assert_eq!(rolled_jobs(&env, &h).await, all);
    let (lag, _) = job_rollups::observe(&env.pool).await.unwrap();
    let lag = lag.unwrap();
    assert!((300.0..420.0).contains(&lag), "{lag}");
    assert_exact(&env, "jt-", "with the rest added").await;

    // A late change to an early job: the hour is read raw until re-rolled.
    late_change(&env, "failed", "rolled on").await;
    quiet(&env).await;
    roll(&env).await;
    assert_eq!(dirty(&env).await, 0);
    assert_eq!(rolled_jobs(&env, &h).await, all);
    assert_exact(&env, "jt-", "after its re-roll").await;
    env.cleanup().await;
}
