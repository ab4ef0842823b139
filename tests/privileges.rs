//! Least privilege: the read-only analyst role, and migrations of several
//! databases at once (roles are cluster-wide).

mod common;

use common::TestEnv;
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;
use switchyard::sim::SimProfile;

async fn admin() -> sqlx::PgPool {
    sqlx::PgPool::connect(&common::database_url_for("postgres"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_databases_migrate_at_once_and_share_the_analyst_role() {
    let names: Vec<String> = (0..4)
        .map(|i| format!("sy_t_mig{i}_{}", &switchyard::ids::new_job_id()[..8]))
        .collect();
    let runs = names.iter().map(|n| {
        let url = common::database_url_for(n);
        async move { switchyard::store::connect_and_migrate(&url, 2).await }
    });
    let pools = futures::future::join_all(runs).await;
    for (pool, name) in pools.into_iter().zip(&names) {
        let pool = pool.unwrap_or_else(|e| panic!("migrating {name}: {e:#}"));
        let can: bool = sqlx::query_scalar(
            "SELECT has_table_privilege('switchyard_analyst', 'calls', 'SELECT')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(can, "{name}: the analyst cannot read calls");
        pool.close().await;
        common::drop_database(name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analyst_role_reads_results_and_costs_and_cannot_write() {
    let env = TestEnv::new(SimProfile::default()).await;
    let worker = env.start_worker(env.config()).await;
    let js = common::jobs("priv", 6);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    switchyard::enqueue::publish_jobs(&env.bus, &js, None)
        .await
        .unwrap();
    assert!(switchyard::enqueue::wait_finished(
        &env.pool,
        &ids,
        std::time::Duration::from_secs(60),
        None
    )
    .await
    .unwrap());
    worker.shutdown().await;

    // A person's login role, member of switchyard_analyst.
    let login = format!("sy_analyst_{}", &switchyard::ids::new_job_id()[..8]);
    let admin = admin().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE \"{login}\" LOGIN IN ROLE switchyard_analyst"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let url: PgConnectOptions = common::database_url_for(&env.name).parse().unwrap();
    let mut conn = url.username(&login).connect().await.unwrap();

    let results: i64 = sqlx::query_scalar("SELECT count(*) FROM results")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(results, 6);
    let cost: rust_decimal::Decimal = sqlx::query_scalar("SELECT sum(cost_usd) FROM calls")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(cost > rust_decimal::Decimal::ZERO);
    // Every analysts' view, and the ratings.
    for view in [
        "cost_daily",
        "model_usage",
        "category_rates",
        "latency_by_model",
        "latency_by_category",
        "cost_per_job",
        "satisfaction_by_model",
        "satisfaction_by_route",
        "feedback",
        "model_prices",
        "job_costs",
        "savings_by_category",
        "what_if_by_model",
        "provider_batches",
        "batch_savings",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("SELECT * FROM {view} LIMIT 1")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("the analyst cannot read {view}: {e}"));
    }
    let per_day: i64 = sqlx::query_scalar("SELECT sum(calls)::int8 FROM cost_daily")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(per_day >= 6);
    for sql in [
        "INSERT INTO feedback (job_id, score) VALUES ('priv-00000', 5)",
        "DELETE FROM results",
        "UPDATE calls SET cost_usd = 0",
        "UPDATE model_prices SET input_per_mtok = 0",
        "INSERT INTO jobs (id, category) VALUES ('x', 'y')",
        "SELECT count(*) FROM dead_letters",
        "SELECT count(*) FROM _sqlx_migrations",
    ] {
        let err = sqlx::query(sql).execute(&mut conn).await.unwrap_err();
        assert!(
            err.to_string().contains("permission denied"),
            "{sql}: {err}"
        );
    }
    drop(conn);
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE \"{login}\"")))
        .execute(&admin)
        .await;
    env.cleanup().await;
}
