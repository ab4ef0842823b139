//! `calls` partitioned by month of its job's creation (migration 0030):
//! an existing table keeps every row through the migration, each in its
//! job's month, with the rollups exact and an intent written before the
//! upgrade met by its final record after it; the writer files a call of an
//! older job in that job's month, however many times it is written; and
//! retention drops whole months whose jobs all ended, the rollups following;
//! a job's calls are read in its own month (migration 0033).

mod common;

use std::time::Duration;

use common::TestEnv;
use rust_decimal::Decimal;
use switchyard::store::{job_rollups, rollups, CallOutcome, CallRow, Row, Writer};
use tokio_util::sync::CancellationToken;

fn call(job: &str, attempt: i32, outcome: CallOutcome) -> CallRow {
    CallRow {
        latency_ms: 40,
        http_status: Some(200),
        ..common::call_row(job, attempt, outcome)
    }
}

fn intent(job: &str, attempt: i32) -> Row {
    Row::Intent {
        row: call(job, attempt, CallOutcome::Unknown),
        busy_for: Duration::from_secs(60),
    }
}

/// Roll both rollups over everything and check them against the raw rows.
async fn assert_rollups_exact(pool: &sqlx::PgPool, when: &str) {
    rollups::lower_settle(pool, "0").await.unwrap();
    let (_, tail) = rollups::roll_until_covered(pool, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(tail, 0, "{when}: calls left unrolled");
    let diff = rollups::mismatches(pool).await.unwrap();
    assert!(diff.is_empty(), "{when}: call rollups differ: {diff:#?}");
    job_rollups::roll(pool, 10_000, &CancellationToken::new())
        .await
        .unwrap();
    let diff = job_rollups::mismatches(pool).await.unwrap();
    assert!(diff.is_empty(), "{when}: job rollups differ: {diff:#?}");
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn partition_of(pool: &sqlx::PgPool, age: &str) -> String {
    sqlx::query_scalar("SELECT calls_month_partition(date_trunc('month', now() - $1::interval))")
        .bind(age)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Calls whose row is not in their job's month (or, without a job row, not
/// in the default partition), or whose key is not their job's creation time.
const MISPLACED: &str = "SELECT count(*) FROM calls c LEFT JOIN jobs j ON j.id = c.job_id
     WHERE c.job_created_at IS DISTINCT FROM COALESCE(j.created_at, '1970-01-01Z')
        OR c.tableoid::regclass::text <> CASE WHEN j.id IS NULL THEN 'calls_default'
                                              ELSE calls_month_partition(j.created_at) END";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioning_an_existing_calls_table_keeps_every_row() {
    let name = format!("sy_t_{}", &switchyard::ids::new_job_id()[..12]);
    let url = common::database_url_for(&name);
    let admin = sqlx::PgPool::connect(&common::database_url_for("postgres"))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    // The schema before 0030, as a database of the previous build has it.
    let mut before_0030 = sqlx::migrate!("./migrations");
    before_0030.migrations = std::borrow::Cow::Owned(
        switchyard::store::MIGRATOR
            .iter()
            .filter(|m| m.version < 30)
            .cloned()
            .collect(),
    );
    before_0030.run(&pool).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO jobs (id, category, status, created_at, finished_at)
         SELECT 'up-' || g, 'support', 'succeeded', now() - g * interval '9 days',
                now() - g * interval '9 days' + interval '2 minutes'
         FROM generate_series(1, 30) g;
         UPDATE jobs SET status = 'running', finished_at = NULL WHERE id = 'up-7';
         INSERT INTO calls (job_id, category, provider, model, step, attempt, input_tokens,
                            output_tokens, price_input_per_mtok, price_output_per_mtok,
                            price_cached_input_per_mtok, cost_usd, latency_ms, outcome, created_at)
         SELECT j.id, j.category, 'openai', 'gpt-4o-mini', s, 1, 10, 10, 1, 5, 0.1,
                CASE WHEN s = 2 THEN 0.5 ELSE 0.001 END, 30,
                CASE WHEN s = 2 AND j.id = 'up-7' THEN 'unknown' ELSE 'ok' END,
                j.created_at + interval '1 minute'
         FROM jobs j, generate_series(0, 2) s;
         -- a call whose job row is gone
         INSERT INTO calls (job_id, category, provider, model, step, attempt,
                            price_input_per_mtok, price_output_per_mtok,
                            price_cached_input_per_mtok, cost_usd, latency_ms, outcome)
         VALUES ('up-orphan', 'support', 'openai', 'gpt-4o-mini', 0, 1, 1, 5, 0.1, 0.002, 5, 'ok');",
    )
    .execute(&pool)
    .await
    .unwrap();
    // The old build's rollers have covered them.
    assert_rollups_exact(&pool, "before the migration").await;
    let totals = "SELECT count(*)::text || ' ' || sum(cost_usd)::text || ' ' || count(DISTINCT id)::text FROM calls";
    let before: String = sqlx::query_scalar(totals).fetch_one(&pool).await.unwrap();
    pool.close().await;

    let pool = switchyard::store::connect_and_migrate(&url, 2)
        .await
        .unwrap();
    let after: String = sqlx::query_scalar(totals).fetch_one(&pool).await.unwrap();
    assert_eq!(after, before, "count, cost and ids of the calls");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = 'calls'::regclass"
        )
        .await,
        1
    );
    assert_eq!(count(&pool, MISPLACED).await, 0);
    // 30 jobs 9 days apart span four or five months, each its own partition.
    assert!(
        count(
            &pool,
            "SELECT count(DISTINCT tableoid) FROM calls WHERE job_id <> 'up-orphan'"
        )
        .await
            >= 4
    );
    assert_rollups_exact(&pool, "after the migration").await;
    // The views over calls were moved onto the new table.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM job_costs WHERE calls = 3").await,
        30
    );

    // The final record of an intent written before the upgrade meets it,
    // through the writer; new calls of an older job land in its month.
    let tasks = switchyard::tasks::Tasks::new();
    let w = Writer::spawn(pool.clone(), 64, Duration::ZERO, 2, &tasks);
    let mut done = call("up-7", 1, CallOutcome::Ok);
    done.step = 2;
    w.write(vec![Row::Call(done)]).await.unwrap();
    let mut retry = call("up-7", 1, CallOutcome::Unknown);
    retry.step = 3;
    let claimed = w
        .write(vec![Row::Intent {
            row: retry,
            busy_for: Duration::from_secs(60),
        }])
        .await
        .unwrap();
    assert_eq!(claimed.attempts.get(&("up-7".to_string(), 3)), Some(&1));
    drop(w);
    assert!(tasks.stop(Duration::from_secs(10)).await);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM calls WHERE job_id = 'up-7' AND step = 2"
        )
        .await,
        1,
        "one row for the attempt: the intent, updated"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM calls WHERE job_id = 'up-7' AND outcome = 'ok'"
        )
        .await,
        3
    );
    assert_eq!(count(&pool, MISPLACED).await, 0);
    assert_rollups_exact(&pool, "after the writer").await;
    pool.close().await;
    admin.close().await;
    common::drop_database(&name).await;
}

/// A job created last month: its intent and its final record (written
/// twice, as a redelivered commit would) are one row in last month's
/// partition, and its result sums that row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_of_an_older_job_is_filed_in_its_month_once() {
    let env = TestEnv::new(Default::default()).await;
    let p = &env.pool;
    sqlx::query(
        "INSERT INTO jobs (id, category, status, created_at)
         VALUES ('old-1', 'support', 'running', date_trunc('month', now()) - interval '3 days')",
    )
    .execute(p)
    .await
    .unwrap();
    let last_month = partition_of(p, "1 month").await;
    let tasks = switchyard::tasks::Tasks::new();
    let w = Writer::spawn(p.clone(), 64, Duration::ZERO, 2, &tasks);
    let claimed = w.write(vec![intent("old-1", 1)]).await.unwrap();
    assert_eq!(claimed.attempts.get(&("old-1".to_string(), 0)), Some(&1));
    // A second claim while the first is young is refused (the check probes
    // the job's partition).
    let again = w.write(vec![intent("old-1", 2)]).await.unwrap();
    assert!(again.attempts.is_empty(), "{again:?}");
    for _ in 0..2 {
        w.write(vec![
            Row::Call(call("old-1", 1, CallOutcome::Ok)),
            Row::Result(switchyard::store::ResultRow {
                job_id: "old-1".into(),
                category: "support".into(),
                output: "done".into(),
                output_json: None,
                model: "gpt-4o-mini".into(),
                answer_step: Some(0),
                finish_reason: Some("stop".into()),
                latency_ms: 40,
            }),
        ])
        .await
        .unwrap();
    }
    drop(w);
    assert!(tasks.stop(Duration::from_secs(10)).await);
    assert_eq!(
        count(
            p,
            &format!("SELECT count(*) FROM {last_month} WHERE job_id = 'old-1' AND outcome = 'ok'")
        )
        .await,
        1
    );
    assert_eq!(
        count(p, "SELECT count(*) FROM calls WHERE job_id = 'old-1'").await,
        1
    );
    assert_eq!(count(p, MISPLACED).await, 0);
    let (cost, result_cost): (Decimal, Decimal) = sqlx::query_as(
        "SELECT (SELECT cost_usd FROM calls WHERE job_id = 'old-1'),
                (SELECT cost_usd FROM results WHERE job_id = 'old-1')",
    )
    .fetch_one(p)
    .await
    .unwrap();
    assert!(cost > Decimal::ZERO);
    assert_eq!(result_cost, cost, "the result sums the job's calls");
    env.cleanup().await;
}

/// Retention drops a whole month of calls when every job created in it
/// ended before the cut-off: the rollups lose exactly its calls; a month
/// still holding an unfinished job stays and is pruned row by row; rows the
/// default partition holds for a month are moved into it when it is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_drops_whole_months_and_the_rollups_follow() {
    let env = TestEnv::new(Default::default()).await;
    let p = &env.pool;
    sqlx::raw_sql(
        "SELECT calls_ensure_partitions(now() - interval '200 days', 3);
         INSERT INTO jobs (id, category, status, created_at, finished_at)
         SELECT 'ru-old-' || g, 'support', 'succeeded',
                date_trunc('month', now() - interval '150 days') + g * interval '1 hour',
                date_trunc('month', now() - interval '150 days') + g * interval '1 hour' + interval '1 minute'
         FROM generate_series(1, 20) g;
         INSERT INTO jobs (id, category, status, created_at)
         VALUES ('ru-waiting', 'sales', 'needs_review', date_trunc('month', now() - interval '100 days'));
         INSERT INTO jobs (id, category, status, created_at, finished_at)
         VALUES ('ru-done', 'sales', 'succeeded', date_trunc('month', now() - interval '100 days'),
                 date_trunc('month', now() - interval '100 days'));
         INSERT INTO jobs (id, category, status, created_at, finished_at)
         VALUES ('ru-new', 'sales', 'succeeded', now(), now());
         INSERT INTO calls (job_id, category, provider, model, step, attempt, input_tokens,
                            output_tokens, price_input_per_mtok, price_output_per_mtok,
                            price_cached_input_per_mtok, cost_usd, latency_ms, outcome,
                            created_at, job_created_at)
         SELECT j.id, j.category, 'openai', 'gpt-4o-mini', s, 1, 100 * s, 10, 1, 5, 0.1,
                0.001 * s, 40 * s, CASE WHEN s = 1 THEN 'retryable_error' ELSE 'ok' END,
                j.created_at + s * interval '1 second', j.created_at
         FROM jobs j, generate_series(1, 3) s WHERE j.id LIKE 'ru-%';",
    )
    .execute(p)
    .await
    .unwrap();
    assert_rollups_exact(p, "after the load").await;
    let old_month = partition_of(p, "150 days").await;
    let kept_month = partition_of(p, "100 days").await;
    assert_eq!(
        count(p, &format!("SELECT count(*) FROM {old_month}")).await,
        60
    );

    let said = common::switchyard_ok(
        &env.child_env(),
        &["prune", "--older-than-days", "30", "--dry-run"],
    );
    assert!(
        said.starts_with("would delete 21 jobs, 63 calls,"),
        "{said}"
    );
    assert!(!said.contains("; 0 monthly calls partitions"), "{said}");

    let said = common::switchyard_ok(&env.child_env(), &["prune", "--older-than-days", "30"]);
    // The old month's 20 jobs and the finished one of the kept month; 60
    // calls in the dropped month, 3 deleted row by row.
    assert!(said.starts_with("deleted 21 jobs, 63 calls,"), "{said}");
    assert!(!said.contains("; 0 monthly calls partitions"), "{said}");
    assert!(
        sqlx::query_scalar::<_, Option<String>>("SELECT to_regclass($1)::text")
            .bind(&old_month)
            .fetch_one(p)
            .await
            .unwrap()
            .is_none(),
        "{old_month} dropped"
    );
    assert_eq!(
        count(p, &format!("SELECT count(*) FROM {kept_month}")).await,
        3,
        "the waiting job's month stays, its finished job's calls deleted"
    );
    assert_eq!(count(p, "SELECT count(*) FROM calls").await, 6);
    assert_rollups_exact(p, "after the prune").await;
    assert_eq!(
        count(p, "SELECT COALESCE(sum(calls), 0)::int8 FROM call_rollups").await,
        6
    );

    // A call filed in the default partition (its month had no partition)
    // moves into its month when the partition is made.
    sqlx::raw_sql(
        "INSERT INTO jobs (id, category, status, created_at)
         VALUES ('ru-future', 'sales', 'queued', now() + interval '200 days');
         INSERT INTO calls (job_id, category, provider, model, step, attempt,
                            price_input_per_mtok, price_output_per_mtok,
                            price_cached_input_per_mtok, cost_usd, latency_ms, outcome,
                            job_created_at)
         VALUES ('ru-future', 'sales', 'openai', 'gpt-4o-mini', 0, 1, 1, 5, 0.1, 0.002, 5, 'ok',
                 now() + interval '200 days');",
    )
    .execute(p)
    .await
    .unwrap();
    assert_eq!(
        count(p, "SELECT count(*) FROM calls_default").await,
        1,
        "no partition that far ahead yet"
    );
    let made: i32 = sqlx::query_scalar("SELECT calls_ensure_partitions(now(), 8)")
        .fetch_one(p)
        .await
        .unwrap();
    assert!(made >= 4, "{made}");
    assert_eq!(count(p, "SELECT count(*) FROM calls_default").await, 0);
    assert_eq!(count(p, MISPLACED).await, 0);
    assert_rollups_exact(p, "after moving a row out of the default partition").await;
    env.cleanup().await;
}

/// Dropping a month locks `calls` exclusively for a moment. Behind a long
/// query (an analyst's open transaction) prune does not queue every writer
/// behind its lock request: after a few seconds it leaves the month to the
/// row deletes, and the rollups follow those as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_calls_table_leaves_the_month_to_the_row_deletes() {
    let env = TestEnv::new(Default::default()).await;
    let p = &env.pool;
    sqlx::raw_sql(
        "SELECT calls_ensure_partitions(now() - interval '200 days', 1);
         INSERT INTO jobs (id, category, status, created_at, finished_at)
         SELECT 'busy-' || g, 'support', 'succeeded',
                date_trunc('month', now() - interval '150 days') + g * interval '1 hour',
                date_trunc('month', now() - interval '150 days') + g * interval '1 hour' + interval '1 minute'
         FROM generate_series(1, 10) g;
         INSERT INTO calls (job_id, category, provider, model, step, attempt, input_tokens,
                            output_tokens, price_input_per_mtok, price_output_per_mtok,
                            price_cached_input_per_mtok, cost_usd, latency_ms, outcome,
                            created_at, job_created_at)
         SELECT j.id, j.category, 'openai', 'gpt-4o-mini', 0, 1, 100, 10, 1, 5, 0.1, 0.001, 40,
                'ok', j.created_at + interval '1 second', j.created_at
         FROM jobs j;",
    )
    .execute(p)
    .await
    .unwrap();
    assert_rollups_exact(p, "after the load").await;
    let month = partition_of(p, "150 days").await;

    // An analyst's transaction that has read `calls` and stays open.
    let mut analyst = p.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM calls")
        .execute(&mut *analyst)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let said = common::switchyard_ok(&env.child_env(), &["prune", "--older-than-days", "30"]);
    // One lock wait (5 s), not one per month.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "prune waited {:?}",
        started.elapsed()
    );
    assert!(said.starts_with("deleted 10 jobs, 10 calls,"), "{said}");
    assert!(
        said.contains("; 0 monthly calls partitions dropped"),
        "{said}"
    );
    analyst.rollback().await.unwrap();
    assert!(
        sqlx::query_scalar::<_, Option<String>>("SELECT to_regclass($1)::text")
            .bind(&month)
            .fetch_one(p)
            .await
            .unwrap()
            .is_some(),
        "{month} stays, emptied"
    );
    assert_eq!(count(p, "SELECT count(*) FROM calls").await, 0);
    assert_rollups_exact(p, "after the row deletes").await;
    env.cleanup().await;
}

/// A session that is not Switchyard's (an analyst's psql) runs without JIT:
/// the views over the partitioned `calls` are priced high enough to be
/// compiled for longer than they run (migration 0032).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analysts_session_runs_without_jit() {
    use sqlx::Connection;
    let env = TestEnv::new(Default::default()).await;
    let mut plain = sqlx::PgConnection::connect(&env.db_url).await.unwrap();
    let jit: String = sqlx::query_scalar("SHOW jit")
        .fetch_one(&mut plain)
        .await
        .unwrap();
    assert_eq!(jit, "off");
    plain.close().await.unwrap();
    env.cleanup().await;
}

/// The `calls` partitions a plan's nodes actually ran on (EXPLAIN ANALYZE
/// in JSON: scans Postgres pruned while running have no loops).
async fn partitions_read(pool: &sqlx::PgPool, query: &str) -> std::collections::BTreeSet<String> {
    fn walk(node: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
        if let (Some(rel), Some(loops)) = (
            node.get("Relation Name").and_then(|v| v.as_str()),
            node.get("Actual Loops").and_then(|v| v.as_i64()),
        ) {
            if rel.starts_with("calls_") && loops > 0 {
                out.insert(rel.to_string());
            }
        }
        for child in node
            .get("Plans")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            walk(child, out);
        }
    }
    let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, FORMAT JSON) {query}"
    )))
    .fetch_one(pool)
    .await
    .unwrap();
    let mut out = std::collections::BTreeSet::new();
    walk(&plan[0]["Plan"], &mut out);
    out
}

/// A job's costs and its calls (the API's, the review's) are read in the
/// job's month and the default partition only, however many months are
/// kept, and a call inserted by hand without its partition key (filed in
/// the default partition since 0033) still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_calls_are_read_in_its_own_month() {
    let env = TestEnv::new(Default::default()).await;
    let p = &env.pool;
    sqlx::raw_sql(
        "SELECT calls_ensure_partitions(now() - interval '200 days', 3);
         INSERT INTO jobs (id, category, status, created_at, finished_at)
         SELECT 'own-' || g, 'support', 'succeeded', now() - g * interval '30 days',
                now() - g * interval '30 days' + interval '1 minute'
         FROM generate_series(0, 6) g;
         INSERT INTO calls (job_id, category, provider, model, step, attempt, input_tokens,
                            output_tokens, price_input_per_mtok, price_output_per_mtok,
                            price_cached_input_per_mtok, cost_usd, latency_ms, outcome,
                            job_created_at)
         SELECT j.id, j.category, 'openai', 'gpt-4o-mini', 0, a, 100, 10, 1, 5, 0.1,
                0.001 * a, 40, CASE WHEN a = 1 THEN 'retryable_error' ELSE 'ok' END, j.created_at
         FROM jobs j, generate_series(1, 2) a;
         -- by hand, without the key
         INSERT INTO calls (job_id, category, provider, model, step, attempt,
                            price_input_per_mtok, price_output_per_mtok,
                            price_cached_input_per_mtok, cost_usd, latency_ms, outcome)
         VALUES ('own-3', 'support', 'openai', 'gpt-4o-mini', 1, 1, 1, 5, 0.1, 0.5, 5, 'ok');
         INSERT INTO results (job_id, category, output, model, cost_usd, input_tokens,
                              output_tokens, latency_ms, answer_step)
         SELECT id, category, 'x', 'gpt-4o-mini', 0.002, 100, 10, 40, 0 FROM jobs;
         ANALYZE calls; ANALYZE jobs;",
    )
    .execute(p)
    .await
    .unwrap();
    assert_eq!(
        count(
            p,
            "SELECT count(*) FROM calls_default WHERE job_id = 'own-3'"
        )
        .await,
        1,
        "a call inserted without its key is filed in the default partition"
    );
    let kept = count(
        p,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'calls'::regclass",
    )
    .await;
    assert!(
        kept >= 8,
        "{kept} partitions: the test needs several months"
    );
    let (calls, cost): (i64, Decimal) =
        sqlx::query_as("SELECT calls, cost_usd FROM job_costs WHERE job_id = 'own-3'")
            .fetch_one(p)
            .await
            .unwrap();
    assert_eq!((calls, cost), (3, Decimal::new(503, 3)));
    let shown = switchyard::store::jobs::job_calls(p, "own-3")
        .await
        .unwrap();
    assert_eq!(
        shown
            .iter()
            .map(|c| (c.step, c.attempt))
            .collect::<Vec<_>>(),
        [(0, 1), (0, 2), (1, 1)]
    );
    let totals = switchyard::store::review::call_totals(p, "own-3")
        .await
        .unwrap();
    assert_eq!((totals.calls, totals.cost_usd), (3, Decimal::new(503, 3)));

    let month = partition_of(p, "90 days").await;
    let own = std::collections::BTreeSet::from([month, "calls_default".to_string()]);
    assert_eq!(
        partitions_read(p, "SELECT * FROM job_costs WHERE job_id = 'own-3'").await,
        own
    );
    let old = count(
        p,
        "SELECT count(*) FROM job_costs WHERE created_at < now() - interval '80 days'",
    )
    .await;
    assert_eq!(old, 4);
    let read = partitions_read(
        p,
        "SELECT category, sum(cost_usd) FROM job_costs WHERE created_at >= now() - interval '1 day' GROUP BY 1",
    )
    .await;
    assert_eq!(
        read,
        std::collections::BTreeSet::from([
            partition_of(p, "0 days").await,
            "calls_default".to_string()
        ])
    );
    env.cleanup().await;
}
