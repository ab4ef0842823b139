//! A lane's step driven without NATS: a call message's bytes in, a
//! `Settlement` out (what to commit, publish and ack), against a real
//! Postgres and the simulator on loopback. Nothing here is acked: the step
//! decides, the settler (not used here) carries it out.

mod common;

use std::sync::Arc;
use std::time::Duration;

use switchyard::bus::CallMsg;
use switchyard::config::Config;
use switchyard::envelope::{Message, Role};
use switchyard::limits::budget::Book;
use switchyard::pipeline::lane::{Delivery, LaneShared, LaneStep};
use switchyard::pipeline::settle::{Hold, Settlement};
use switchyard::route::{Plan, Routes, Target};
use switchyard::sim::{Forced, Format, SimProfile, SimServer};
use switchyard::store::{CallOutcome, JobRow, JobStatus, Row, Writer};
use switchyard::tasks::Tasks;
use tokio_util::sync::CancellationToken;

/// Holds nothing: there is no NATS message behind the step.
struct NoHold;

impl Hold for NoHold {
    async fn progress(&self) {}
}

struct Env {
    db: String,
    pool: sqlx::PgPool,
    sim: SimServer,
    step: LaneStep,
    writer: Writer,
    tasks: Tasks,
}

async fn env() -> Env {
    let db = format!("sy_t_{}", &switchyard::ids::new_job_id()[..12]);
    let pool = switchyard::store::connect_and_migrate(&common::database_url_for(&db), 4)
        .await
        .unwrap();
    let sim = SimServer::start("127.0.0.1:0", SimProfile::default())
        .await
        .unwrap();
    let cfg = Config::from_toml_with_env(
        common::SHIPPED_CONFIG,
        &[
            (
                "SWITCHYARD_PROVIDERS__OPENAI__BASE_URL".into(),
                sim.base_url(),
            ),
            // Per-process limits: no KV bucket, so no NATS at all.
            ("SWITCHYARD_PROVIDERS__OPENAI__FLEET".into(), "false".into()),
        ],
    )
    .unwrap();
    let cfg = Arc::new(cfg);
    let tasks = Tasks::new();
    let writer = Writer::spawn(pool.clone(), 64, Duration::ZERO, 2, &tasks);
    let shared = LaneShared {
        fleet_store: None,
        budget: Arc::new(Book::new(&cfg, pool.clone())),
        routes: Arc::new(Routes::build(&cfg).unwrap()),
        services: tasks.clone(),
    };
    let step = LaneStep::new(
        "openai",
        cfg,
        writer.clone(),
        pool.clone(),
        CancellationToken::new(),
        &shared,
    )
    .unwrap();
    Env {
        db,
        pool,
        sim,
        step,
        writer,
        tasks,
    }
}

impl Env {
    async fn run(&self, payload: &[u8], delivered: i64) -> Settlement {
        let d = Delivery {
            stream: "TEST_CALLS".into(),
            seq: 1,
            delivered,
            subject: "test.calls.openai".into(),
        };
        let ticket = self.step.ready().await;
        self.step.step(&d, payload, &NoHold, ticket).await
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn cleanup(self) {
        self.sim.stop();
        drop((self.step, self.writer));
        self.tasks.stop(Duration::from_secs(10)).await;
        self.pool.close().await;
        common::drop_database(&self.db).await;
    }
}

fn single_call(job_id: &str) -> Vec<u8> {
    let target = Target {
        model: "gpt-4.1".into(),
        provider: "openai".into(),
    };
    let messages = vec![Message {
        role: Role::User,
        content: "What is two plus two?".into(),
        parts: Vec::new(),
    }];
    serde_json::to_vec(&CallMsg {
        format: switchyard::bus::CALL_FORMAT,
        job_id: job_id.into(),
        category: "sales".into(),
        provider: "openai".into(),
        model: "gpt-4.1".into(),
        step: 0,
        messages: messages.clone(),
        max_tokens: 64,
        temperature: None,
        enqueued_at_ms: 0,
        plan: Plan::Single { target },
        conv: vec![],
        history: vec![],
        job_max_tokens: None,
        attempt_base: 0,
        deadline_ms: None,
        batch: false,
        batch_result: None,
        response_format: None,
        expires_at_ms: None,
        priority: Default::default(),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_call_settles_as_its_cost_row_result_and_done_event() {
    let env = env().await;
    let s = env.run(&single_call("step-ok"), 1).await;
    let Settlement::Commit {
        effects,
        retry_in: None,
        ..
    } = s
    else {
        panic!("expected a commit without retry, got {s:?}");
    };
    assert!(effects.calls.is_empty(), "a single call has no follow-up");
    assert_eq!(
        effects.done.as_ref().map(|d| d.status),
        Some(JobStatus::Succeeded)
    );
    let call = effects
        .rows
        .iter()
        .find_map(|r| match r {
            Row::Call(c) => Some(c),
            _ => None,
        })
        .expect("the cost row is among the rows to commit");
    assert_eq!((call.outcome, call.attempt), (CallOutcome::Ok, 1));
    assert!(effects.rows.iter().any(|r| matches!(r, Row::Result(_))));
    // The intent was committed before the call; the final row is not yet.
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE job_id = 'step-ok' AND outcome = 'unknown'")
            .await,
        1
    );
    assert_eq!(env.sim.ledger().len(), 1, "one provider call");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_settles_as_a_retry_with_its_row() {
    let env = env().await;
    env.sim.force(Format::Openai, [Forced::ServerError]);
    let s = env.run(&single_call("step-retry"), 1).await;
    let Settlement::Commit {
        effects,
        retry_in: Some(delay),
        ..
    } = s
    else {
        panic!("expected a retry, got {s:?}");
    };
    assert!(delay > Duration::ZERO);
    assert!(effects
        .rows
        .iter()
        .any(|r| matches!(r, Row::Call(c) if c.outcome == CallOutcome::RetryableError)));
    assert!(effects.done.is_none());
    env.cleanup().await;
}

/// A redelivery that finds another attempt's intent standing (its worker
/// is calling the step, or died calling it) gives the message back until
/// that intent stops counting, instead of holding it in this worker: a
/// holder killed in turn would cost the message a delivery each time. On
/// its last deliveries it is held here instead, and called once the intent
/// has aged out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_another_attempts_intent_holds_is_given_back_until_the_intent_ends() {
    let env = env().await;
    let timeout = Config::from_toml_with_env(common::SHIPPED_CONFIG, &[])
        .unwrap()
        .providers["openai"]
        .timeout_secs;
    let busy_for = Duration::from_secs(timeout + 10);
    // A worker called the step and died before recording the answer: its
    // intent (`unknown`) is committed, its final row is not.
    let first = env.run(&single_call("step-busy"), 1).await;
    assert!(matches!(first, Settlement::Commit { .. }), "{first:?}");
    assert_eq!(env.sim.ledger().len(), 1);

    let s = env.run(&single_call("step-busy"), 2).await;
    let Settlement::Nak(Some(back_in)) = s else {
        panic!("expected the message given back with a delay, got {s:?}");
    };
    assert!(
        back_in > busy_for - Duration::from_secs(10)
            && back_in <= busy_for + Duration::from_secs(1),
        "given back for the rest of the intent's {busy_for:?}, not {back_in:?}"
    );
    assert_eq!(env.sim.ledger().len(), 1, "no second provider call");

    // The same redelivery as one of the message's last two: held here
    // until the intent ages out (2 s from now), then called.
    sqlx::query("UPDATE calls SET created_at = now() - make_interval(secs => $1)")
        .bind(busy_for.as_secs_f64() - 2.0)
        .execute(&env.pool)
        .await
        .unwrap();
    let s = env
        .run(&single_call("step-busy"), env.step.max_deliver() - 1)
        .await;
    let Settlement::Commit { effects, .. } = s else {
        panic!("expected the step called after the hold, got {s:?}");
    };
    assert!(effects
        .rows
        .iter()
        .any(|r| matches!(r, Row::Call(c) if c.outcome == CallOutcome::Ok && c.attempt > 1)));
    assert_eq!(env.sim.ledger().len(), 2);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_is_acked_without_a_provider_call() {
    let env = env().await;
    env.writer
        .write(vec![Row::Job(JobRow {
            id: "step-done".into(),
            category: "sales".into(),
            status: JobStatus::Succeeded,
            envelope: None,
            route_decision: None,
            error: None,
            enqueued_at_ms: 0,
            variant: None,
            callback_url: None,
        })])
        .await
        .unwrap();
    // A redelivery reads the job first; a first delivery (a cancelled job,
    // or a NATS server that forgot an ack) is refused by the intent's
    // insert, which checks the job in the same statement.
    for delivered in [2, 1] {
        let s = env.run(&single_call("step-done"), delivered).await;
        assert!(matches!(s, Settlement::Ack), "delivery {delivered}: {s:?}");
    }
    assert!(env.sim.ledger().is_empty());
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE job_id = 'step-done'")
            .await,
        0,
        "no intent recorded"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_no_call_message_settle_as_a_dead_letter() {
    let env = env().await;
    let s = env.run(b"{\"job_id\": 7}", 1).await;
    let Settlement::Commit { effects, .. } = s else {
        panic!("expected a dead letter, got {s:?}");
    };
    assert!(matches!(
        effects.rows.as_slice(),
        [Row::DeadLetter(d)] if d.reason.starts_with("not a valid call message")
    ));
    assert!(env.sim.ledger().is_empty());
    env.cleanup().await;
}

/// A call message of a newer format than this build (a rolling upgrade: a
/// newer worker wrote it) is never read as this build's: it goes back for
/// an upgraded worker, and on its last delivery becomes a dead letter
/// saying why; no provider is called either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_message_of_a_newer_format_waits_for_an_upgraded_worker() {
    let env = env().await;
    let mut newer: serde_json::Value = serde_json::from_slice(&single_call("step-newer")).unwrap();
    newer["format"] = (switchyard::bus::CALL_FORMAT + 1).into();
    newer["a_field_this_build_does_not_know"] = "changes the meaning".into();
    let payload = serde_json::to_vec(&newer).unwrap();
    let s = env.run(&payload, 1).await;
    assert!(matches!(s, Settlement::Nak(Some(_))), "{s:?}");
    // The last delivery JetStream makes (retry.max_attempts + 3): a dead letter.
    let last = i64::from(switchyard::config::RetryConfig::default().max_attempts) + 3;
    let s = env.run(&payload, last).await;
    let Settlement::Commit { effects, .. } = s else {
        panic!("expected a dead letter, got {s:?}");
    };
    let reason = effects
        .rows
        .iter()
        .find_map(|r| match r {
            Row::DeadLetter(d) => Some(d.reason.clone()),
            _ => None,
        })
        .expect("a dead letter");
    assert!(reason.contains("is newer than this worker's"), "{reason}");
    assert!(env.sim.ledger().is_empty(), "no provider call");
    // Messages written before formats were numbered read as format 1.
    let mut old: serde_json::Value = serde_json::from_slice(&single_call("step-old")).unwrap();
    old.as_object_mut().unwrap().remove("format");
    assert!(CallMsg::newer_format(&serde_json::to_vec(&old).unwrap()).is_none());
    env.cleanup().await;
}
