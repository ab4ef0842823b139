//! Rolling upgrades: an older build keeps starting against a database a
//! newer build has migrated further.

mod common;

use common::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_build_starts_against_a_database_migrated_further() {
    let env = TestEnv::new(Default::default()).await;
    // What a newer build's extra migration leaves behind.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99990101000000, 'from a newer build', true, '\\x00'::bytea, 1)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let again = switchyard::store::connect_and_migrate(&env.db_url, 2)
        .await
        .expect("this build starts beside the newer one");
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&again)
            .await
            .unwrap(),
        switchyard::store::MIGRATOR.iter().count() as i64 + 1
    );
    again.close().await;
    env.cleanup().await;
}
