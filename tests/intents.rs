//! The intent row is the check-and-claim before every provider call: two
//! workers that take the same step at the same moment (with different
//! attempt numbers: one a redelivery, one a first delivery from a NATS
//! server that forgot the ack) never both get to call the provider.

mod common;

use std::time::Duration;

use switchyard::store::{CallOutcome, Row, Writer};

fn intent(job: &str, attempt: i32) -> Row {
    Row::Intent {
        row: common::call_row(job, attempt, CallOutcome::Unknown),
        busy_for: Duration::from_secs(60),
    }
}

fn running_job(id: &str) -> Row {
    Row::Job(switchyard::store::JobRow {
        id: id.into(),
        category: "support".into(),
        status: switchyard::store::JobStatus::Running,
        envelope: None,
        route_decision: None,
        error: None,
        enqueued_at_ms: 0,
        variant: None,
        callback_url: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_claiming_one_step_at_once_get_one_claim() {
    let env = common::TestEnv::new(Default::default()).await;
    let tasks = switchyard::tasks::Tasks::new();
    // Two processes: two pools, two writers.
    let other = switchyard::store::connect_and_migrate(&env.db_url, 4)
        .await
        .unwrap();
    let a = Writer::spawn(env.pool.clone(), 64, Duration::ZERO, 2, &tasks);
    let b = Writer::spawn(other.clone(), 64, Duration::ZERO, 2, &tasks);
    let rounds = 200;
    let mut both = 0;
    for i in 0..rounds {
        let job = format!("race-{i}");
        let (ra, rb) = tokio::join!(
            a.write(vec![intent(&job, 1)]),
            b.write(vec![intent(&job, 2)])
        );
        let got = |c: switchyard::store::Committed| c.attempts.contains_key(&(job.clone(), 0));
        let (ga, gb) = (got(ra.unwrap()), got(rb.unwrap()));
        assert!(ga || gb, "{job}: one of them claims the step");
        if ga && gb {
            both += 1;
        }
    }
    assert_eq!(both, 0, "steps claimed twice in {rounds} rounds");
    assert_eq!(
        env.count("SELECT count(*) FROM calls").await,
        rounds,
        "one intent row per step"
    );
    // A later attempt (the claim is older than its busy window: the worker
    // died) gets the next number after the highest.
    sqlx::query("UPDATE calls SET created_at = now() - interval '2 minutes'")
        .execute(&env.pool)
        .await
        .unwrap();
    let c = a.write(vec![intent("race-0", 1)]).await.unwrap();
    let first: i64 = env
        .count("SELECT max(attempt)::int8 FROM calls WHERE job_id = 'race-0'")
        .await;
    assert_eq!(
        c.attempts.get(&("race-0".to_string(), 0)),
        Some(&(first as i32))
    );
    assert!(first >= 2, "attempt numbers are not reused");
    drop((a, b));
    assert!(
        tasks.stop(Duration::from_secs(10)).await,
        "the writers stopped"
    );
    other.close().await;
    env.cleanup().await;
}

/// Group commit: rows that arrive while a commit runs join the next one, so
/// under load a transaction carries many messages' rows with no timer
/// (`writer.flush_interval_ms = 0`), and every write still commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_arriving_during_a_commit_share_the_next_one() {
    let env = common::TestEnv::new(Default::default()).await;
    let tasks = switchyard::tasks::Tasks::new();
    let w = Writer::spawn(env.pool.clone(), 512, Duration::ZERO, 1, &tasks);
    let n = 300;
    let writes = (0..n).map(|i| {
        let w = w.clone();
        async move { w.write(vec![running_job(&format!("group-{i}"))]).await }
    });
    let results = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(writes))
        .await
        .expect("every write commits");
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, n);
    // Each transaction stamps its rows with its own id.
    let transactions = env
        .count("SELECT count(DISTINCT xmin::text) FROM jobs")
        .await;
    assert!(
        transactions <= 30,
        "{n} concurrent writes took {transactions} transactions: rows queued during a commit \
         should have joined the next one"
    );
    drop(w);
    assert!(
        tasks.stop(Duration::from_secs(10)).await,
        "the writer stops"
    );
    env.cleanup().await;
}

/// The writer's plans do not depend on table statistics: with `jobs`,
/// `calls`, `results` and `steps` analyzed while empty (what a new database
/// gets from `VACUUM ANALYZE`, and the cheapest plan for an empty table is
/// a sequential scan), a job's whole life through the writer (job row,
/// intent, final cost record, step, result, status) looks every row up by
/// key: the tables' sequential-scan counters do not move. Each such scan
/// reads the whole table, once per batch, ever after (docs/benchmarks.md,
/// "Where the added latency goes").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_never_scans_a_table_analyzed_while_empty() {
    use switchyard::store::{JobStatus, ResultRow, StatusRow, StepRow};
    let env = common::TestEnv::new(Default::default()).await;
    // Only this test's connections from here on: the migration's backends
    // end (and so report their counters) before the baseline is read.
    env.pool.close().await;
    // One connection: every other backend on this database is someone else's.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&env.db_url)
        .await
        .unwrap();
    sqlx::raw_sql("VACUUM ANALYZE jobs, calls, results, steps")
        .execute(&pool)
        .await
        .unwrap();
    let others = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND backend_type = 'client backend'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        n
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while others().await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the migration's connections end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    type Counters = Vec<(String, i64, i64, i64, i64)>;
    let counters = || async {
        let rows: Counters = sqlx::query_as(
            // `calls` is partitioned (migration 0030): its partitions' counters, summed.
            "SELECT t, sum(seq_scan)::int8, sum(COALESCE(idx_scan, 0))::int8,
                    sum(n_tup_ins)::int8, sum(n_tup_upd)::int8
             FROM (SELECT CASE WHEN relid IN (SELECT inhrelid FROM pg_inherits
                                              WHERE inhparent = 'calls'::regclass)
                               THEN 'calls' ELSE relname::text END AS t, *
                   FROM pg_stat_user_tables) s
             WHERE t IN ('jobs', 'calls', 'results', 'steps') GROUP BY t ORDER BY t",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        rows
    };
    let before = counters().await;

    let tasks = switchyard::tasks::Tasks::new();
    let w = Writer::spawn(pool.clone(), 64, Duration::ZERO, 2, &tasks);
    let n = 40;
    let job = |i: usize| format!("plan-{i}");
    for round in 0..4 {
        let writes = (0..n).map(|i| {
            let w = w.clone();
            let id = job(i);
            async move {
                let rows = match round {
                    0 => vec![running_job(&id)],
                    1 => vec![intent(&id, 1)],
                    // A second claim of the same step while the first is
                    // young: refused, by the same lookups.
                    2 => vec![intent(&id, 2)],
                    _ => {
                        let Row::Intent { row: mut call, .. } = intent(&id, 1) else {
                            unreachable!()
                        };
                        call.outcome = CallOutcome::Ok;
                        call.latency_ms = 5;
                        vec![
                            Row::Call(call),
                            Row::Step(StepRow {
                                job_id: id.clone(),
                                record: switchyard::route::StepRecord {
                                    step: 0,
                                    model: "gpt-4o-mini".into(),
                                    outcome: switchyard::route::StepOutcome::Ok,
                                    output: Some("done".into()),
                                    reason: None,
                                },
                            }),
                            Row::Result(ResultRow {
                                job_id: id.clone(),
                                category: "support".into(),
                                output: "done".into(),
                                output_json: None,
                                model: "gpt-4o-mini".into(),
                                answer_step: Some(0),
                                finish_reason: Some("stop".into()),
                                latency_ms: 5,
                            }),
                            Row::Status(StatusRow {
                                job_id: id,
                                status: JobStatus::Succeeded,
                                ..StatusRow::default()
                            }),
                        ]
                    }
                };
                w.write(rows).await
            }
        });
        let res = futures::future::join_all(writes).await;
        assert!(res.iter().all(|r| r.is_ok()), "round {round}: {res:?}");
        if round == 2 {
            assert!(
                res.iter().all(|r| r.as_ref().unwrap().attempts.is_empty()),
                "a young claim refuses a second one"
            );
        }
    }
    drop(w);
    assert!(
        tasks.stop(Duration::from_secs(10)).await,
        "the writer stops"
    );
    // The writer's connections have ended: their counters are reported.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        let c = counters().await;
        let calls = c.iter().find(|r| r.0 == "calls").unwrap();
        let calls_before = before.iter().find(|r| r.0 == "calls").unwrap();
        if others().await == 0
            && calls.3 - calls_before.3 >= n as i64
            && calls.4 - calls_before.4 >= n as i64
        {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writer's counters arrive: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        env_count(&pool, "SELECT count(*) FROM results").await,
        n as i64
    );
    assert_eq!(
        env_count(
            &pool,
            "SELECT count(*) FROM jobs WHERE status = 'succeeded'"
        )
        .await,
        n as i64
    );
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            a.1 - b.1,
            0,
            "{}: sequential scans by the writer (before {b:?}, after {a:?})",
            a.0
        );
    }
    let looked_up = |t: &str| {
        let (b, a) = (
            before.iter().find(|r| r.0 == t).unwrap(),
            after.iter().find(|r| r.0 == t).unwrap(),
        );
        a.2 - b.2
    };
    assert!(looked_up("calls") > 0 && looked_up("jobs") > 0, "{after:?}");
    pool.close().await;
    env.cleanup().await;
}

async fn env_count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap()
}
