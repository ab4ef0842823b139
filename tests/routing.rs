//! Each routing pattern end to end on the simulator: the path in `calls`,
//! `steps` and `jobs.route_decision`, the final result and its total cost.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::TestEnv;
use futures::StreamExt;
use rust_decimal::Decimal;
use serde_json::Value;
use switchyard::enqueue::{publish_jobs, wait_finished, Outgoing};
use switchyard::envelope::{JobEnvelope, Message, Role};
use switchyard::sim::{ScriptedAnswer, SimProfile};

const CONFIG: &str = r#"
[retry]
max_attempts = 2
base_delay_ms = 10
max_delay_ms = 50

[providers.openai]
kind = "openai"
base_url = "http://127.0.0.1:1"
rpm = 60000
tpm = 100000000
max_concurrency = 16

[providers.anthropic]
kind = "anthropic"
base_url = "http://127.0.0.1:1"
rpm = 60000
tpm = 100000000
max_concurrency = 16

[providers.gemini]
kind = "gemini"
base_url = "http://127.0.0.1:1"
rpm = 60000
tpm = 100000000
max_concurrency = 16

[models."gemini-2.5-flash-lite"]
provider = "gemini"
input_per_mtok = "0.10"
output_per_mtok = "0.40"
cached_input_per_mtok = "0.01"

[models."gpt-4o-mini"]
provider = "openai"
input_per_mtok = "0.15"
output_per_mtok = "0.60"
cached_input_per_mtok = "0.075"

[models."claude-sonnet-4-5"]
provider = "anthropic"
input_per_mtok = "3.00"
output_per_mtok = "15.00"
cached_input_per_mtok = "0.30"
cache_write_input_per_mtok = "3.75"

[models."gpt-4.1"]
provider = "openai"
input_per_mtok = "2.00"
output_per_mtok = "8.00"

[categories.fb]
route = { kind = "fallback", targets = ["gemini-2.5-flash-lite", "gpt-4o-mini", "claude-sonnet-4-5"] }
system = "Be helpful."
max_tokens = 100

[categories.fbcheck]
route = { kind = "fallback", targets = ["gemini-2.5-flash-lite", "gpt-4o-mini"], check = { kind = "json_schema", schema = { type = "object", required = ["answer"] } } }

[categories.pipe]
route = { kind = "pipeline", stages = [
  { name = "draft", target = "gemini-2.5-flash-lite", prompt = "Draft: {{input}}" },
  { name = "refine", target = "gpt-4o-mini", prompt = "Refine: {{previous}}" },
  { name = "final", target = "claude-sonnet-4-5", prompt = "Final for {{input}}: {{stages.draft}} | {{stages.refine}}" },
] }
system = "House style."
max_tokens = 80

[categories.vote]
route = { kind = "consensus", targets = ["gemini-2.5-flash-lite", "gpt-4o-mini", "claude-sonnet-4-5"], min_agree = 2 }

[categories.votej]
route = { kind = "consensus", targets = ["gemini-2.5-flash-lite", "gpt-4o-mini", "claude-sonnet-4-5"], judge = "gpt-4.1" }

[categories.ab]
route = { kind = "single", target = "gemini-2.5-flash-lite" }
variant = { name = "mini", percent = 50, route = { kind = "single", target = "gpt-4o-mini" } }

[classifier]
default_category = "fb"
model = "gemini-2.5-flash-lite"
threshold = 0.8
rules = [ { category = "vote", keywords = ["refund"] } ]
"#;

fn job(id: &str, category: &str, prompt: &str) -> Outgoing {
    let mut env = JobEnvelope::prompt(id, category, prompt);
    if category == "auto" {
        env.category = None;
    }
    Outgoing {
        category: category.into(),
        id: id.into(),
        payload: serde_json::to_vec(&env).unwrap(),
    }
}

fn jobs(tag: &str, category: &str, n: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| {
            job(
                &format!("{tag}-{i:03}"),
                category,
                &format!("Question {i} about {tag}?"),
            )
        })
        .collect()
}

async fn run(env: &TestEnv, js: &[Outgoing]) {
    publish_jobs(&env.bus, js, None).await.unwrap();
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap(),
        "jobs finished"
    );
}

async fn decision(env: &TestEnv, id: &str) -> Value {
    sqlx::query_scalar::<_, Value>("SELECT route_decision FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn result(env: &TestEnv, id: &str) -> (String, String, Decimal) {
    sqlx::query_as("SELECT output, model, cost_usd FROM results WHERE job_id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn call_cost(env: &TestEnv, id: &str) -> Decimal {
    sqlx::query_scalar("SELECT COALESCE(sum(cost_usd), 0) FROM calls WHERE job_id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// (step, model, outcome) of every call of a job, in step order.
async fn call_path(env: &TestEnv, id: &str) -> Vec<(i32, String, String)> {
    sqlx::query_as(
        "SELECT step, model, outcome FROM calls WHERE job_id = $1 ORDER BY step, attempt",
    )
    .bind(id)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

fn tried(d: &Value) -> Vec<(String, String)> {
    d["tried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["model"].as_str().unwrap().to_string(),
                t["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_moves_past_a_failing_model_and_pays_for_both() {
    let mut profile = SimProfile::default();
    profile
        .model_errors
        .insert("gemini-2.5-flash-lite".into(), 1.0);
    let env = TestEnv::new(profile).await;
    let worker = env.start_worker(env.config_from(CONFIG)).await;
    let js = jobs("fb", "fb", 6);
    run(&env, &js).await;
    for j in &js {
        let (_, model, cost) = result(&env, &j.id).await;
        assert_eq!(model, "gpt-4o-mini");
        assert_eq!(cost, call_cost(&env, &j.id).await);
        assert_eq!(
            call_path(&env, &j.id).await,
            vec![
                (0, "gemini-2.5-flash-lite".into(), "terminal_error".into()),
                (1, "gpt-4o-mini".into(), "ok".into())
            ]
        );
        let d = decision(&env, &j.id).await;
        assert_eq!(d["kind"], "fallback");
        assert_eq!(
            tried(&d),
            vec![
                ("gemini-2.5-flash-lite".into(), "failed".into()),
                ("gpt-4o-mini".into(), "ok".into())
            ]
        );
        assert!(
            d["tried"][0]["reason"].as_str().unwrap().contains("400"),
            "{d}"
        );
    }
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_rejects_answers_that_fail_the_schema() {
    let profile = SimProfile {
        answers: vec![ScriptedAnswer {
            model: Some("gpt-4o-mini".into()),
            contains: None,
            text: r#"{"answer": "42"}"#.into(),
        }],
        ..Default::default()
    };
    let env = TestEnv::new(profile).await;
    let worker = env.start_worker(env.config_from(CONFIG)).await;
    let js = jobs("chk", "fbcheck", 3);
    run(&env, &js).await;
    for j in &js {
        let (output, model, _) = result(&env, &j.id).await;
        assert_eq!(
            (output.as_str(), model.as_str()),
            (r#"{"answer": "42"}"#, "gpt-4o-mini")
        );
        let d = decision(&env, &j.id).await;
        assert_eq!(
            tried(&d)[0],
            ("gemini-2.5-flash-lite".into(), "rejected".into())
        );
        assert!(d["tried"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("not JSON"));
        // Both answers were paid for.
        let path = call_path(&env, &j.id).await;
        assert_eq!(path.len(), 2);
        assert!(path.iter().all(|p| p.2 == "ok"));
    }
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_skips_a_lane_that_would_wait_too_long() {
    let env = TestEnv::new(SimProfile::default()).await;
    // The gemini lane may send 600 tokens a minute; each call reserves ~120.
    let text = CONFIG
        .replace(
            "[providers.gemini]\nkind = \"gemini\"\nbase_url = \"http://127.0.0.1:1\"\nrpm = 60000\ntpm = 100000000",
            "[providers.gemini]\nkind = \"gemini\"\nbase_url = \"http://127.0.0.1:1\"\nrpm = 60000\ntpm = 600",
        )
        .replace(
            "targets = [\"gemini-2.5-flash-lite\", \"gpt-4o-mini\", \"claude-sonnet-4-5\"] }\nsystem",
            "targets = [\"gemini-2.5-flash-lite\", \"gpt-4o-mini\", \"claude-sonnet-4-5\"], max_wait_secs = 2 }\nsystem",
        );
    let worker = env.start_worker(env.config_from(&text)).await;
    let js = jobs("slow", "fb", 12);
    run(&env, &js).await;
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .await,
        12
    );
    let skipped = env
        .count("SELECT count(*) FROM steps WHERE outcome = 'too_slow'")
        .await;
    let on_gemini = env
        .count("SELECT count(*) FROM results WHERE model = 'gemini-2.5-flash-lite'")
        .await;
    assert!(
        skipped > 0 && on_gemini > 0,
        "skipped {skipped}, served by the first target {on_gemini}"
    );
    assert_eq!(skipped + on_gemini, 12);
    let d: Value = sqlx::query_scalar(
        "SELECT route_decision FROM jobs j JOIN steps s ON s.job_id = j.id AND s.outcome = 'too_slow' LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(tried(&d)[0].1, "too_slow");
    assert!(
        d["tried"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("max_wait"),
        "{d}"
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_fallback_goes_to_review_and_a_person_finishes_it() {
    let mut profile = SimProfile::default();
    for m in ["gemini-2.5-flash-lite", "gpt-4o-mini", "claude-sonnet-4-5"] {
        profile.model_errors.insert(m.into(), 1.0);
    }
    let env = TestEnv::new(profile).await;
    let mut events = env
        .bus
        .client
        .subscribe(env.bus.names.review_subject("fb"))
        .await
        .unwrap();
    env.bus.client.flush().await.unwrap();
    let worker = env.start_worker(env.config_from(CONFIG)).await;
    let js = jobs("rev", "fb", 2);
    run(&env, &js).await;
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'needs_review'")
            .await,
        2
    );
    assert_eq!(env.count("SELECT count(*) FROM results").await, 0);
    let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap();
    let ev: Value = serde_json::from_slice(&ev.payload).unwrap();
    assert!(ev["reason"]
        .as_str()
        .unwrap()
        .contains("all 3 fallback targets"));

    let items = switchyard::ops::review::list(&env.pool, Some("fb"))
        .await
        .unwrap();
    assert_eq!(items.len(), 2);
    let detail = switchyard::ops::review::show(&env.pool, &js[0].id)
        .await
        .unwrap();
    assert_eq!(detail.steps.len(), 3);
    assert!(detail.render().contains("all 3 fallback targets"));

    // A person answers one and rejects the other, through the CLI.
    let cli = |args: Vec<String>| {
        let vars = env.child_env();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
                c.current_dir(env!("CARGO_MANIFEST_DIR"))
                    .env("RUST_LOG", "warn");
                for (k, v) in vars {
                    c.env(k, v);
                }
                c.args(args).output().unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = cli(vec![
        "review".into(),
        "resolve".into(),
        js[0].id.clone(),
        "--output".into(),
        "Refund issued.".into(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(vec![
        "review".into(),
        "resolve".into(),
        js[1].id.clone(),
        "--reject".into(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = cli(vec![
        "review".into(),
        "resolve".into(),
        js[1].id.clone(),
        "--output".into(),
        "x".into(),
    ])
    .await;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not waiting for review"));

    let (output, model, cost) = result(&env, &js[0].id).await;
    assert_eq!(
        (output.as_str(), model.as_str()),
        ("Refund issued.", "human")
    );
    assert_eq!(cost, call_cost(&env, &js[0].id).await);
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'failed'")
            .await,
        1
    );
    assert!(switchyard::ops::review::list(&env.pool, None)
        .await
        .unwrap()
        .is_empty());
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_runs_each_stage_on_its_own_lane_with_templates() {
    let profile = SimProfile::default();
    let env = TestEnv::new(profile.clone()).await;
    let worker = env.start_worker(env.config_from(CONFIG)).await;
    let js = jobs("pipe", "pipe", 4);
    run(&env, &js).await;
    for (i, j) in js.iter().enumerate() {
        let path = call_path(&env, &j.id).await;
        assert_eq!(
            path,
            vec![
                (0, "gemini-2.5-flash-lite".into(), "ok".into()),
                (1, "gpt-4o-mini".into(), "ok".into()),
                (2, "claude-sonnet-4-5".into(), "ok".into())
            ]
        );
        let steps: Vec<(i32, String)> =
            sqlx::query_as("SELECT step, output FROM steps WHERE job_id = $1 ORDER BY step")
                .bind(&j.id)
                .fetch_all(&env.pool)
                .await
                .unwrap();
        // The final stage saw the rendered template: recompute its answer.
        let input = format!("Question {i} about pipe?");
        let messages = vec![
            Message {
                role: Role::System,
                content: "House style.".into(),
                parts: Vec::new(),
            },
            Message {
                role: Role::User,
                content: format!("Final for {input}: {} | {}", steps[0].1, steps[1].1),
                parts: Vec::new(),
            },
        ];
        let expected = switchyard::sim::answer(&profile, "claude-sonnet-4-5", &messages, 80).text;
        let (output, model, cost) = result(&env, &j.id).await;
        assert_eq!(output, expected);
        assert_eq!(model, "claude-sonnet-4-5");
        assert_eq!(cost, call_cost(&env, &j.id).await);
        assert_eq!(decision(&env, &j.id).await["kind"], "pipeline");
    }
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consensus_majority_with_one_failed_voter() {
    let mut profile = SimProfile {
        agreement: 1.0,
        ..Default::default()
    };
    profile.model_errors.insert("claude-sonnet-4-5".into(), 1.0);
    let env = TestEnv::new(profile).await;
    let worker = env.start_worker(env.config_from(CONFIG)).await;
    let js = jobs("vote", "vote", 4);
    run(&env, &js).await;
    for j in &js {
        let path = call_path(&env, &j.id).await;
        assert_eq!(path.len(), 3, "{path:?}");
        assert_eq!(path.iter().filter(|p| p.2 == "ok").count(), 2);
        let (_, model, cost) = result(&env, &j.id).await;
        assert_eq!(model, "gemini-2.5-flash-lite", "the first agreeing voter");
        assert_eq!(
            cost,
            call_cost(&env, &j.id).await,
            "cost is the sum of all votes"
        );
        let d = decision(&env, &j.id).await;
        assert_eq!(d["kind"], "consensus");
        assert_eq!(tried(&d).len(), 3);
    }
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disagreement_goes_to_the_judge_or_to_review() {
    let env = TestEnv::new(SimProfile::default()).await; // voters never agree
    let worker = env.start_worker(env.config_from(CONFIG)).await;
    let mut js = jobs("judged", "votej", 3);
    js.extend(jobs("split", "vote", 2));
    run(&env, &js).await;
    for j in &js[..3] {
        let path = call_path(&env, &j.id).await;
        assert_eq!(path.len(), 4);
        assert_eq!(
            path[3],
            (3, "gpt-4.1".into(), "ok".into()),
            "the judge is step 3"
        );
        let (output, model, cost) = result(&env, &j.id).await;
        let votes: BTreeMap<String, String> = sqlx::query_as::<_, (String, String)>(
            "SELECT model, output FROM steps WHERE job_id = $1 AND step < 3",
        )
        .bind(&j.id)
        .fetch_all(&env.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
        assert_eq!(
            votes.get(&model),
            Some(&output),
            "the judge picked one voter's answer"
        );
        assert_eq!(cost, call_cost(&env, &j.id).await);
    }
    for j in &js[3..] {
        let status: String = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
            .bind(&j.id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(status, "needs_review");
    }
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_jobs_are_classified_by_rules_then_the_model_with_a_safe_default() {
    let env = TestEnv::new(SimProfile::default()).await;
    let worker = env.start_worker(env.config_from(CONFIG)).await;
    let mut js = vec![job("auto-rule", "auto", "I want a refund for my order")];
    js.extend((0..12).map(|i| {
        job(
            &format!("auto-{i:02}"),
            "auto",
            &format!("Some request number {i}"),
        )
    }));
    run(&env, &js).await;
    let d = decision(&env, "auto-rule").await;
    assert_eq!(d["classifier"]["by"], "rule");
    assert_eq!(d["category"], "vote");
    let mut by_model = 0;
    let mut by_default = 0;
    for j in &js[1..] {
        let d = decision(&env, &j.id).await;
        let c = &d["classifier"];
        let conf = c["confidence"].as_f64().unwrap();
        let category: String = sqlx::query_scalar("SELECT category FROM jobs WHERE id = $1")
            .bind(&j.id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(c["category"].as_str().unwrap(), category);
        match c["by"].as_str().unwrap() {
            "model" => {
                by_model += 1;
                assert!(conf >= 0.8);
            }
            "default" => {
                by_default += 1;
                assert!(conf < 0.8);
                assert_eq!(category, "fb");
            }
            other => panic!("{other}"),
        }
        // One classifier call, step -1, billed to `auto`.
        let (step, cat): (i32, String) = sqlx::query_as(
            "SELECT step, category FROM calls WHERE job_id = $1 ORDER BY created_at, step LIMIT 1",
        )
        .bind(&j.id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!((step, cat.as_str()), (-1, "auto"));
    }
    assert!(
        by_model > 0 && by_default > 0,
        "model {by_model}, default {by_default}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE category = 'auto'")
            .await,
        0
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparseable_classifier_answer_is_low_confidence() {
    let profile = SimProfile {
        answers: vec![ScriptedAnswer {
            model: None,
            contains: Some("Classify the request".into()),
            text: "I think it is sales, probably".into(),
        }],
        ..Default::default()
    };
    let env = TestEnv::new(profile).await;
    let worker = env.start_worker(env.config_from(CONFIG)).await;
    let js = vec![job("garbled", "auto", "hello there")];
    run(&env, &js).await;
    let d = decision(&env, "garbled").await;
    assert_eq!(d["classifier"]["by"], "default");
    assert_eq!(d["category"], "fb");
    assert_eq!(env.count("SELECT count(*) FROM results").await, 1);
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_split_is_deterministic_per_job_and_recorded() {
    let env = TestEnv::new(SimProfile::default()).await;
    let worker = env.start_worker(env.config_from(CONFIG)).await;
    let js = jobs("ab", "ab", 40);
    run(&env, &js).await;
    let mut variants = 0;
    for j in &js {
        let variant: Option<String> = sqlx::query_scalar("SELECT variant FROM jobs WHERE id = $1")
            .bind(&j.id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
        let expect_variant = switchyard::route::bucket(&j.id) < 50;
        assert_eq!(variant.is_some(), expect_variant, "{}", j.id);
        let (_, model, _) = result(&env, &j.id).await;
        assert_eq!(
            model,
            if expect_variant {
                "gpt-4o-mini"
            } else {
                "gemini-2.5-flash-lite"
            }
        );
        if expect_variant {
            variants += 1;
            assert_eq!(decision(&env, &j.id).await["variant"], "mini");
        }
    }
    assert!((8..=32).contains(&variants), "{variants} of 40");
    // The report puts the variants side by side.
    let r = switchyard::ops::report::build(&env.pool, &Default::default(), &env.config(), None)
        .await
        .unwrap();
    let lines: Vec<(&str, i64)> = r
        .routes
        .iter()
        .map(|l| (l.variant.as_str(), l.jobs))
        .collect();
    assert_eq!(lines, vec![("-", 40 - variants), ("mini", variants)]);
    assert!(worker.shutdown().await);
    env.cleanup().await;
}
