//! Hostile input through the real dispatcher: thousands of malformed job
//! messages (random bytes, invalid UTF-8, deep nesting, huge strings, wrong
//! types, control characters, SQL fragments, unknown fields, unknown
//! categories) interleaved with good jobs. Every bad one becomes exactly one
//! dead letter with a reason, every good one completes, nothing panics and
//! the stream ends empty.

mod common;

use std::time::Duration;

use common::{wait_until, TestEnv};
use switchyard::envelope::JobEnvelope;
use switchyard::sim::SimProfile;

const SQL: [&str; 4] = [
    "'; DROP TABLE jobs; --",
    "\" OR 1=1 --",
    "x'); DELETE FROM calls; --",
    "$1; TRUNCATE results",
];

/// One malformed job message, chosen by `rng`: (subject category, payload).
fn hostile(rng: &mut fastrand::Rng, i: usize, max_payload: usize) -> (String, Vec<u8>) {
    let cat = ["support", "sales", "lookup"][i % 3].to_string();
    let payload: Vec<u8> = match rng.usize(0..16) {
        0 => (0..rng.usize(0..400)).map(|_| rng.u8(..)).collect(),
        1 => {
            // Invalid UTF-8 inside a JSON string.
            let mut v = br#"{"id":"bad-utf8-"#.to_vec();
            v.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
            v.extend_from_slice(br#"","prompt":"x"}"#);
            v
        }
        2 => {
            let depth = rng.usize(200..5000);
            format!(
                r#"{{"prompt":{}1{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            )
            .into_bytes()
        }
        3 => format!(
            r#"{{"id":"huge-{i}","prompt":"{}"}}"#,
            "a".repeat(max_payload)
        )
        .into_bytes(),
        4 => format!(r#"{{"id":{i},"prompt":"wrong id type"}}"#).into_bytes(),
        5 => format!(r#"{{"id":"t-{i}","prompt":["not","a","string"]}}"#).into_bytes(),
        6 => format!("{{\"id\":\"ctl-{i}\u{1}\\u0007\",\"prompt\":\"x\"}}").into_bytes(),
        7 => format!(
            r#"{{"id":"sql-{i}","category":"{}","prompt":"x"}}"#,
            SQL[i % SQL.len()].replace('"', "\\\"")
        )
        .into_bytes(),
        8 => format!(r#"{{"id":"unk-{i}","prompt":"x","priority":"urgent"}}"#).into_bytes(),
        9 => format!(r#"{{"id":"both-{i}","prompt":"x","messages":[]}}"#).into_bytes(),
        10 => {
            format!(r#"{{"id":"temp-{i}","prompt":"x","params":{{"temperature":9}}}}"#).into_bytes()
        }
        11 => {
            let m = r#"{"role":"user","content":"hi"}"#;
            let many = vec![m; 300].join(",");
            format!(r#"{{"id":"many-{i}","messages":[{many}]}}"#).into_bytes()
        }
        12 => b"".to_vec(),
        13 => format!(r#"{{"id":"late-{i}","prompt":"x","deadline":"2020-01-01T00:00:00Z"}}"#)
            .into_bytes(),
        14 => format!(r#"{{"id":"when-{i}","prompt":"x","deadline":"next tuesday"}}"#).into_bytes(),
        _ => {
            // A category that does not exist, by subject.
            return (
                format!("nope{}", rng.u32(..)),
                format!(r#"{{"id":"cat-{i}","prompt":"x"}}"#).into_bytes(),
            );
        }
    };
    (cat, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_dead_lettered_and_good_jobs_still_complete() {
    let env = TestEnv::new(SimProfile::default()).await;
    let cfg = env.config_with(&common::SINGLE_ROUTES);
    let max_payload = cfg.limits.max_payload_bytes;
    let worker = env.start_worker(cfg).await;

    let mut rng = fastrand::Rng::with_seed(0x5eed_5a11);
    let (bad, good) = (1_500usize, 150usize);
    let mut good_ids = Vec::new();
    let mut published = Vec::new();
    for i in 0..bad {
        if i % 10 == 0 {
            let id = format!("good-{i:05}");
            let cat = ["support", "sales", "lookup"][(i / 10) % 3];
            // Good jobs carry hostile-looking text that must arrive intact.
            let mut env = JobEnvelope::prompt(
                &id,
                cat,
                format!("Answer this: {} \u{202e} ünïcödé", SQL[i % SQL.len()]),
            );
            // Some with a deadline far ahead: accepted and served.
            if i % 20 == 0 {
                env.deadline = Some("2999-01-01T00:00:00+02:00".into());
            }
            published.push((cat.to_string(), serde_json::to_vec(&env).unwrap(), None));
            good_ids.push(id);
        }
        let (cat, payload) = hostile(&mut rng, i, max_payload);
        published.push((cat, payload, Some(i)));
    }
    assert_eq!(good_ids.len(), good);
    for (cat, payload, i) in &published {
        let subject = format!("{}.jobs.{cat}", env.name);
        let mut headers = async_nats::HeaderMap::new();
        let msg_id = match i {
            Some(i) => format!("hostile-{i}"),
            None => String::from_utf8_lossy(&payload[..payload.len().min(40)]).to_string(),
        };
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        env.bus
            .js
            .publish_with_headers(subject, headers, payload.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    assert!(
        switchyard::enqueue::wait_finished(&env.pool, &good_ids, Duration::from_secs(120), None)
            .await
            .unwrap(),
        "good jobs finished among the hostile ones"
    );
    wait_until(
        Duration::from_secs(60),
        "every hostile message dead-lettered",
        || async { env.count("SELECT count(*) FROM dead_letters").await == bad as i64 },
    )
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters WHERE reason = '' OR reason IS NULL")
            .await,
        0
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE id LIKE 'good-%' AND status = 'succeeded'")
            .await,
        good as i64
    );
    // The hostile-looking text reached the provider as it was sent.
    let prompt: String =
        sqlx::query_scalar("SELECT envelope->>'prompt' FROM jobs WHERE id = 'good-00000'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(
        prompt.contains(SQL[0]) && prompt.contains("ünïcödé"),
        "{prompt}"
    );
    // The tables are all still there.
    assert!(env.count("SELECT count(*) FROM calls").await >= good as i64);
    // Nothing is left in the jobs stream.
    let jobs_stream = env.bus.names.jobs_stream();
    wait_until(
        Duration::from_secs(30),
        "the jobs stream is empty",
        || async {
            let mut st = env.bus.js.get_stream(&jobs_stream).await.unwrap();
            st.info().await.unwrap().state.messages == 0
        },
    )
    .await;
    // Each kind of rejection says what was wrong.
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT regexp_replace(reason, '[`0-9:].*', '') FROM dead_letters",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    eprintln!("{} kinds of rejection: {reasons:?}", reasons.len());
    for (like, why) in [
        (
            "late-%",
            "deadline 2020-01-01T00:00:00Z had already passed when the job arrived",
        ),
        (
            "when-%",
            "invalid deadline `next tuesday`: expected an RFC 3339 time",
        ),
    ] {
        let found: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT reason FROM dead_letters WHERE job_id LIKE $1")
                .bind(like)
                .fetch_all(&env.pool)
                .await
                .unwrap();
        assert!(
            !found.is_empty() && found.iter().all(|r| r.starts_with(why)),
            "{like}: {found:?}"
        );
    }
    assert!(reasons.len() >= 7, "{reasons:?}");
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

/// A call message whose plan cannot be run (here a pipeline with no
/// stages, published straight to a lane's subject) is dead-lettered with
/// the reason before any provider call; the lane keeps serving good jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_message_with_a_malformed_plan_is_dead_lettered_before_any_provider_call() {
    use switchyard::bus::CallMsg;
    use switchyard::envelope::{Message, Role};
    use switchyard::route::{Plan, Target};

    let env = TestEnv::new(SimProfile::default()).await;
    let cfg = env.config_with(&common::SINGLE_ROUTES);
    let (model, provider) = cfg
        .models
        .iter()
        .find(|(_, m)| cfg.providers.contains_key(&m.provider))
        .map(|(id, m)| (id.clone(), m.provider.clone()))
        .unwrap();
    let worker = env.start_worker(cfg).await;
    let messages = vec![Message {
        role: Role::User,
        content: "hello".into(),
        parts: Vec::new(),
    }];
    let bad = [
        (
            "no-stages",
            Plan::Pipeline { stages: vec![] },
            0,
            "no stages",
        ),
        (
            "step-out-of-plan",
            Plan::Single {
                target: Target {
                    model: model.clone(),
                    provider: provider.clone(),
                },
            },
            7,
            "not a step",
        ),
    ];
    for (id, plan, step, _) in &bad {
        let call = CallMsg {
            format: switchyard::bus::CALL_FORMAT,
            job_id: id.to_string(),
            category: "support".into(),
            provider: provider.clone(),
            model: model.clone(),
            step: *step,
            messages: messages.clone(),
            max_tokens: 64,
            temperature: None,
            enqueued_at_ms: 0,
            plan: plan.clone(),
            conv: messages.clone(),
            history: vec![],
            job_max_tokens: None,
            attempt_base: 0,
            deadline_ms: None,
            batch: false,
            batch_result: None,
            response_format: None,
            expires_at_ms: None,
            priority: Default::default(),
        };
        env.bus
            .publish_durable(
                env.bus.names.call_subject(&provider),
                &call.msg_id(),
                serde_json::to_vec(&call).unwrap().into(),
            )
            .await
            .unwrap();
    }
    wait_until(
        Duration::from_secs(30),
        "both call messages dead-lettered",
        || async { env.count("SELECT count(*) FROM dead_letters").await == bad.len() as i64 },
    )
    .await;
    for (id, _, _, why) in &bad {
        let reason: String =
            sqlx::query_scalar("SELECT reason FROM dead_letters WHERE job_id = $1")
                .bind(id)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        assert!(reason.contains(why), "{id}: {reason}");
    }
    assert!(
        env.sim.ledger().is_empty(),
        "no provider call was made for a malformed call message"
    );
    // The lane still serves good jobs.
    let good = common::jobs("after-bad-plan", 3);
    let ids: Vec<String> = good.iter().map(|j| j.id.clone()).collect();
    switchyard::enqueue::publish_jobs(&env.bus, &good, None)
        .await
        .unwrap();
    assert!(
        switchyard::enqueue::wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}
