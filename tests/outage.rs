//! Outages of the real services: Postgres stops mid-run and comes back; the
//! worker takes no new work meanwhile, holds what it has, and resumes by
//! itself. Nothing is lost and nothing is doubled: every answer the provider
//! gave has exactly one `calls` row and every job one result.
//!
//! The tests run their own PostgreSQL instance (initdb as the `postgres`
//! user) and their own NATS server, on free ports, so they can stop and
//! start them freely.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{have, wait_until, TestEnv};
use switchyard::pipeline::worker::{self, WorkerOptions};
use switchyard::sim::SimProfile;
use switchyard_servers::{nats_server_bin, pg_bin, PrivateNats, PrivatePg};

async fn private_pg() -> PrivatePg {
    tokio::task::spawn_blocking(PrivatePg::start)
        .await
        .unwrap()
        .expect("a private PostgreSQL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_mid_run_loses_and_doubles_nothing() {
    if !have("the PostgreSQL server (initdb, pg_ctl)", pg_bin().is_some()) {
        return;
    }
    let pg = private_pg().await;
    let env = TestEnv::new(SimProfile {
        latency_ms: 30,
        ..Default::default()
    })
    .await;
    let pool = switchyard::store::connect_and_migrate(&pg.url("switchyard"), 8)
        .await
        .unwrap();
    let cfg = Arc::new(env.config_with(&common::SINGLE_ROUTES));
    let w = worker::start(cfg, pool.clone(), env.bus.clone(), WorkerOptions::default())
        .await
        .unwrap();
    let n = 300;
    let js = common::jobs("pgdown", n);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    switchyard::enqueue::publish_jobs(&env.bus, &js, None)
        .await
        .unwrap();
    let p = pool.clone();
    wait_until(Duration::from_secs(60), "the first results", || {
        let p = p.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM results")
                .fetch_one(&p)
                .await
                .unwrap_or(0)
                >= 40
        }
    })
    .await;
    // Postgres goes away for 12 s: longer than a message's deliveries would
    // last if each failed commit gave it back (max_deliver 9, 1 s apart).
    let pg = tokio::task::spawn_blocking(move || {
        pg.ctl_stop().unwrap();
        pg
    })
    .await
    .unwrap();
    let stopped_at = env.sim.now_ms();
    tokio::time::sleep(Duration::from_secs(12)).await;
    // Calls already under way finish; then no new work is taken.
    let late = env
        .sim
        .ledger()
        .iter()
        .filter(|e| e.at_ms >= stopped_at + 2_000)
        .count();
    assert_eq!(late, 0, "new calls started 2-12 s into the outage");
    let pg = tokio::task::spawn_blocking(move || {
        pg.ctl_start().unwrap();
        pg
    })
    .await
    .unwrap();
    assert!(
        switchyard::enqueue::wait_finished(&pool, &ids, Duration::from_secs(120), None)
            .await
            .unwrap(),
        "every job finished after Postgres came back"
    );
    assert!(w.shutdown().await, "the worker drained");
    let count = |sql: &'static str| {
        let p = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&p)
                .await
                .unwrap()
        }
    };
    assert_eq!(count("SELECT count(*) FROM results").await, n as i64);
    assert_eq!(
        count("SELECT count(*) FROM jobs WHERE status = 'succeeded'").await,
        n as i64
    );
    // Every answer the provider gave is one `ok` row, no more, no less.
    let answered = env.sim.ledger().iter().filter(|e| e.status == 200).count() as i64;
    assert_eq!(
        count("SELECT count(*) FROM calls WHERE outcome = 'ok'").await,
        answered
    );
    assert_eq!(
        count("SELECT count(*) FROM (SELECT 1 FROM calls WHERE outcome = 'ok' GROUP BY job_id, step HAVING count(*) > 1) d").await,
        0
    );
    pool.close().await;
    drop(pg);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_run_loses_and_doubles_nothing() {
    if !have("nats-server", nats_server_bin().is_some()) {
        return;
    }
    let mut nats = PrivateNats::start().unwrap();
    let env = TestEnv::new(SimProfile {
        latency_ms: 30,
        ..Default::default()
    })
    .await;
    let bus = switchyard::bus::Bus::connect(&nats.url(), &env.name)
        .await
        .unwrap();
    // A short ack wait, so messages whose acks were lost come back soon.
    let mut overrides = common::SINGLE_ROUTES.to_vec();
    overrides.push(("SWITCHYARD_NATS__ACK_WAIT_SECS", "5"));
    let cfg = Arc::new(env.config_with(&overrides));
    bus.ensure_streams(&cfg).await.unwrap();
    let w = worker::start(cfg, env.pool.clone(), bus.clone(), WorkerOptions::default())
        .await
        .unwrap();
    let n = 300;
    let js = common::jobs("natsdown", n);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    switchyard::enqueue::publish_jobs(&bus, &js, None)
        .await
        .unwrap();
    wait_until(Duration::from_secs(60), "the first results", || async {
        env.count("SELECT count(*) FROM results").await >= 40
    })
    .await;
    // NATS dies (SIGKILL) and comes back 3 s later with its store.
    nats.kill();
    // A producer gets a clear error instead of losing the job.
    let late = common::jobs("natsdown-late", 1);
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        switchyard::enqueue::publish_jobs(&bus, &late, None),
    )
    .await
    .expect("publishing gives up in time")
    .expect_err("publishing with NATS down must fail");
    assert!(format!("{err:#}").contains("same id is safe"), "{err:#}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let nats = tokio::task::spawn_blocking(move || {
        nats.run().unwrap();
        nats
    })
    .await
    .unwrap();
    // The producer does what the error says: publishes the job again.
    switchyard::enqueue::publish_jobs(&bus, &late, None)
        .await
        .unwrap();
    let mut all = ids.clone();
    all.push(late[0].id.clone());
    assert!(
        switchyard::enqueue::wait_finished(&env.pool, &all, Duration::from_secs(120), None)
            .await
            .unwrap(),
        "every job finished after NATS came back"
    );
    assert!(w.shutdown().await, "the worker drained");
    assert_eq!(
        env.count("SELECT count(*) FROM results").await,
        n as i64 + 1
    );
    let answered = env.sim.ledger().iter().filter(|e| e.status == 200).count() as i64;
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE outcome = 'ok'")
            .await,
        answered,
        "every answer recorded once"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM (SELECT 1 FROM calls WHERE outcome = 'ok' GROUP BY job_id, step HAVING count(*) > 1) d").await,
        0
    );
    drop(nats);
    env.cleanup().await;
}

/// A worker killed after the provider answered but before it could record
/// the answer (Postgres was down, so the commit waited): the call is still
/// in `calls`, as `unknown` at the reserved cost, and the job runs again
/// under a new attempt number; every request the simulator answered has
/// its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_answered_but_never_recorded_is_an_unknown_row_at_the_reserved_cost() {
    if !have("the PostgreSQL server (initdb, pg_ctl)", pg_bin().is_some()) {
        return;
    }
    let pg = private_pg().await;
    let env = TestEnv::new(SimProfile {
        latency_ms: 1500,
        ..Default::default()
    })
    .await;
    let db_url = pg.url("switchyard");
    let pool = switchyard::store::connect_and_migrate(&db_url, 4)
        .await
        .unwrap();
    let mut child_env: Vec<(String, String)> = env
        .child_env()
        .into_iter()
        .filter(|(k, _)| k != "DATABASE_URL")
        .collect();
    child_env.push(("DATABASE_URL".into(), db_url.clone()));
    child_env.push(("SWITCHYARD_NATS__ACK_WAIT_SECS".into(), "3".into()));
    // A killed worker's call counts as under way for the provider's
    // timeout plus 10 s: keep that short here.
    for p in ["OPENAI", "ANTHROPIC", "GEMINI"] {
        child_env.push((
            format!("SWITCHYARD_PROVIDERS__{p}__TIMEOUT_SECS"),
            "4".into(),
        ));
    }
    for (k, v) in common::SINGLE_ROUTES {
        child_env.push((k.into(), v.into()));
    }
    let cfg = env.config_with(&common::SINGLE_ROUTES);
    env.bus.ensure_streams(&cfg).await.unwrap();
    let worker = common::spawn_worker(&child_env);
    let n = 6;
    let js = common::jobs("unrecorded", n);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    switchyard::enqueue::publish_jobs(&env.bus, &js, None)
        .await
        .unwrap();
    let count = |sql: &'static str| {
        let p = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&p).await }
    };
    // Every call has its intent recorded and is at the provider.
    wait_until(Duration::from_secs(30), "six calls under way", || async {
        count("SELECT count(*) FROM calls WHERE outcome = 'unknown'")
            .await
            .unwrap_or(0)
            == n as i64
    })
    .await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.ctl_stop().unwrap();
        pg
    })
    .await
    .unwrap();
    // The provider answers; the worker cannot record the answers.
    wait_until(Duration::from_secs(30), "the six answers", || async {
        env.sim.ledger().iter().filter(|e| e.status == 200).count() == n
    })
    .await;
    drop(worker); // SIGKILL while it waits for the database
    let pg = tokio::task::spawn_blocking(move || {
        pg.ctl_start().unwrap();
        pg
    })
    .await
    .unwrap();
    let worker = common::spawn_worker(&child_env);
    assert!(
        switchyard::enqueue::wait_finished(&pool, &ids, Duration::from_secs(120), None)
            .await
            .unwrap(),
        "every job finished after the restart"
    );
    drop(worker);

    let rows: Vec<(String, i32, i32, String)> =
        sqlx::query_as("SELECT job_id, step, attempt, outcome FROM calls")
            .fetch_all(&pool)
            .await
            .unwrap();
    let rec = switchyard::sim::reconcile(&env.sim.ledger(), &rows);
    assert_eq!(rec.untagged, 0, "every request carries its tag");
    assert_eq!(rec.unrecorded, 0, "every answered request has its row");
    assert_eq!(rec.phantom, 0);
    assert_eq!(rec.duplicate_answers, 0);
    // The six lost answers: attempt 1, unknown, at the reserved cost
    // (estimated input + max_tokens at the model's prices), which is more
    // than an answer of the same job really cost.
    let lost: Vec<(String, i32, i64, i64, rust_decimal::Decimal)> = sqlx::query_as(
        "SELECT job_id, attempt, input_tokens, output_tokens, cost_usd FROM calls
         WHERE outcome = 'unknown' ORDER BY job_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(lost.len(), n, "{lost:?}");
    for (job, attempt, input, output, cost) in &lost {
        assert_eq!(*attempt, 1, "{job}");
        assert!(*input > 0 && *output > 0, "{job}: reserved tokens recorded");
        let (ok_attempt, ok_cost): (i32, rust_decimal::Decimal) = sqlx::query_as(
            "SELECT attempt, cost_usd FROM calls WHERE job_id = $1 AND outcome = 'ok'",
        )
        .bind(job)
        .fetch_one(&pool)
        .await
        .unwrap();
        // A later attempt: its number is the delivery's, and a delivery
        // that found the intent standing went back to JetStream until it
        // stopped counting (it may have been the second or the third).
        assert!(
            (2..=4).contains(&ok_attempt),
            "{job}: the rerun is a new attempt, not {ok_attempt}"
        );
        assert!(*cost > ok_cost, "{job}: reserved {cost} > real {ok_cost}");
    }
    assert_eq!(
        count("SELECT count(*) FROM results").await.unwrap(),
        n as i64
    );
    pool.close().await;
    drop(pg);
    env.cleanup().await;
}
