//! Structured outputs end to end: jobs that ask for JSON get it from each
//! provider's native mechanism (the simulator answers only requests that
//! carry the provider's schema fields with JSON), the parsed answer lands in
//! `results.output_json`, an answer that breaks the schema is a failed step
//! the route handles (here: the next fallback target), and a format a model
//! cannot honour is refused before any call.

mod common;

use std::time::Duration;

use common::TestEnv;
use serde_json::{json, Value};
use switchyard::config::StructuredMode;
use switchyard::enqueue::{publish_jobs, wait_finished, Outgoing};
use switchyard::envelope::JobEnvelope;
use switchyard::sim::SimProfile;
use switchyard::structured::ResponseFormat;

const SCHEMA: &str = r#"{ type = "object", additionalProperties = false, required = ["sentiment", "score", "tags"], properties = { sentiment = { type = "string", enum = ["positive", "negative", "neutral"] }, score = { type = "number", minimum = 0, maximum = 1 }, tags = { type = "array", items = { type = "string" }, maxItems = 3 } } }"#;

fn extra() -> String {
    let rf = format!(r#"{{ type = "json_schema", name = "review", schema = {SCHEMA} }}"#);
    format!(
        r#"
[categories.rate_openai]
route = {{ kind = "single", target = "gpt-4o-mini" }}
response_format = {rf}

[categories.rate_anthropic]
route = {{ kind = "single", target = "claude-sonnet-4-5" }}
response_format = {rf}

[categories.rate_anthropic_tool]
route = {{ kind = "single", target = "claude-haiku-4-5" }}
response_format = {rf}

[categories.rate_gemini]
route = {{ kind = "single", target = "gemini-2.5-flash" }}
response_format = {rf}

[categories.rate_gemini_batch]
route = {{ kind = "single", target = "gemini-2.5-flash-lite" }}
response_format = {rf}
delivery = "batch"
batch = {{ flush_after = "300ms" }}

[categories.rate_fallback]
route = {{ kind = "fallback", targets = ["gpt-4o-mini", "claude-sonnet-4-5"] }}
response_format = {rf}

[categories.rate_fallback_anthropic]
route = {{ kind = "fallback", targets = ["claude-haiku-4-5", "gemini-2.5-flash"] }}
response_format = {rf}

[categories.rate_fallback_gemini]
route = {{ kind = "fallback", targets = ["gemini-2.5-flash-lite", "gpt-4.1"] }}
response_format = {rf}

[categories.plain]
route = {{ kind = "single", target = "gpt-4o-mini" }}
"#
    )
}

fn schema() -> Value {
    let v: toml::Value = toml::from_str(&format!("s = {SCHEMA}")).unwrap();
    serde_json::to_value(&v["s"]).unwrap()
}

fn config(env: &TestEnv) -> switchyard::config::Config {
    let mut cfg = env.config_from(&format!("{}\n{}", common::SHIPPED_CONFIG, extra()));
    cfg.models
        .get_mut("claude-haiku-4-5")
        .unwrap()
        .structured_output = StructuredMode::Tool;
    cfg
}

fn job(id: &str, category: &str) -> JobEnvelope {
    JobEnvelope::prompt(id, category, format!("Review {id}: the kettle boils fast."))
}

async fn run(env: &TestEnv, jobs: &[JobEnvelope]) -> Vec<String> {
    let out: Vec<Outgoing> = jobs
        .iter()
        .map(|e| Outgoing::from_envelope(e).unwrap())
        .collect();
    publish_jobs(&env.bus, &out, None).await.unwrap();
    let ids: Vec<String> = out.iter().map(|j| j.id.clone()).collect();
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap(),
        "every job finished"
    );
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provider_answers_in_json_that_lands_in_output_json() {
    let env = TestEnv::new(SimProfile {
        batch_ms: Some(400),
        ..Default::default()
    })
    .await;
    let worker = env.start_worker(config(&env)).await;
    let cats = [
        "rate_openai",
        "rate_anthropic",
        "rate_anthropic_tool",
        "rate_gemini",
        "rate_gemini_batch",
    ];
    let mut jobs: Vec<JobEnvelope> = cats
        .iter()
        .flat_map(|c| (0..4).map(move |i| job(&format!("{c}-{i}"), c)))
        .collect();
    // A job of a category without a format asks for JSON itself.
    let mut own = job("plain-own", "plain");
    own.response_format = Some(ResponseFormat::JsonObject {});
    jobs.push(own);
    run(&env, &jobs).await;

    let rows: Vec<(String, String, Option<Value>)> =
        sqlx::query_as("SELECT j.id, j.status, r.output_json FROM jobs j LEFT JOIN results r ON r.job_id = j.id ORDER BY j.id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 21);
    let schema = schema();
    for (id, status, json) in &rows {
        assert_eq!(status, "succeeded", "{id}");
        let json = json
            .as_ref()
            .unwrap_or_else(|| panic!("{id}: no output_json"));
        if id == "plain-own" {
            assert!(json.is_object(), "{id}: {json}");
        } else {
            switchyard::structured::validate(&schema, json)
                .unwrap_or_else(|e| panic!("{id}: {json}: {e}"));
        }
    }
    // Analysts query the fields.
    let by_sentiment: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT output_json->>'sentiment', count(*) FROM results
         WHERE category <> 'plain' GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(by_sentiment.iter().map(|r| r.1).sum::<i64>(), 20);
    assert!(by_sentiment.iter().all(|r| r.0.is_some()));
    // The batch category went through Gemini's batch API.
    assert_eq!(
        env.count("SELECT count(*) FROM calls WHERE category = 'rate_gemini_batch' AND batch_id IS NOT NULL")
            .await,
        4
    );
    // Jobs without a format keep `output_json` empty.
    assert_eq!(
        env.count("SELECT count(*) FROM results WHERE output_json IS NULL")
            .await,
        0
    );
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_breaks_the_schema_falls_back_and_the_log_says_why() {
    // Each provider's first target breaks the schema every time.
    let mut profile = SimProfile::default();
    for m in ["gpt-4o-mini", "claude-haiku-4-5", "gemini-2.5-flash-lite"] {
        profile.model_invalid_json.insert(m.into(), 1.0);
    }
    let env = TestEnv::new(profile).await;
    let worker = env.start_worker(config(&env)).await;
    let cases = [
        ("rate_fallback", "gpt-4o-mini", "claude-sonnet-4-5"),
        (
            "rate_fallback_anthropic",
            "claude-haiku-4-5",
            "gemini-2.5-flash",
        ),
        ("rate_fallback_gemini", "gemini-2.5-flash-lite", "gpt-4.1"),
    ];
    let jobs: Vec<JobEnvelope> = cases
        .iter()
        .flat_map(|(c, _, _)| (0..2).map(move |i| job(&format!("fb-{c}-{i}"), c)))
        .collect();
    run(&env, &jobs).await;
    for (cat, broken, answered) in cases {
        let rows: Vec<(String, String, Value, Value)> = sqlx::query_as(
            "SELECT j.status, r.model, r.output_json, j.route_decision
             FROM jobs j JOIN results r ON r.job_id = j.id WHERE j.category = $1",
        )
        .bind(cat)
        .fetch_all(&env.pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 2, "{cat}");
        for (status, model, json, log) in rows {
            assert_eq!(status, "succeeded", "{cat}");
            assert_eq!(model, answered, "{cat}: the second target answered");
            assert!(switchyard::structured::validate(&schema(), &json).is_ok());
            let first = &log["tried"][0];
            assert_eq!(first["model"], broken, "{cat}");
            assert_eq!(first["outcome"], "failed");
            let why = first["reason"].as_str().unwrap();
            assert!(
                why.starts_with("invalid output:") && why.contains("sentiment"),
                "{cat}: {why}"
            );
        }
        // The broken answers were paid for: recorded with the error.
        assert_eq!(
            env.count(&format!(
                "SELECT count(*) FROM calls WHERE category = '{cat}' AND model = '{broken}'
                   AND outcome = 'ok' AND error LIKE 'invalid output:%' AND cost_usd > 0"
            ))
            .await,
            2,
            "{cat}"
        );
    }
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formats_no_model_can_honour_are_refused_before_any_call() {
    let env = TestEnv::new(SimProfile::default()).await;
    let worker = env.start_worker(config(&env)).await;
    // OpenAI's strict mode needs closed objects with every property required.
    let mut open = job("open-schema", "plain");
    open.response_format = Some(ResponseFormat::JsonSchema {
        name: "x".into(),
        schema: json!({"type": "object", "properties": {"a": {"type": "string"}}}),
        strict: true,
    });
    let mut array = job("array-schema", "plain");
    array.response_format = Some(ResponseFormat::JsonSchema {
        name: "x".into(),
        schema: json!({"type": "array"}),
        strict: false,
    });
    run(&env, &[open, array]).await;
    let reasons: Vec<(String, String)> =
        sqlx::query_as("SELECT job_id, reason FROM dead_letters ORDER BY job_id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].1.contains("top level"), "{:?}", reasons[0]);
    assert!(
        reasons[1].1.contains("OpenAI strict mode") && reasons[1].1.contains("gpt-4o-mini"),
        "{:?}",
        reasons[1]
    );
    assert!(env.sim.ledger().is_empty(), "no provider was called");
    assert_eq!(env.count("SELECT count(*) FROM calls").await, 0);
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[test]
fn a_category_format_a_model_cannot_honour_is_a_config_error_naming_the_key() {
    let text = format!(
        "{}\n[categories.loose]\nroute = {{ kind = \"fallback\", targets = [\"gemini-2.5-flash\", \"gpt-4o-mini\"] }}\n\
         response_format = {{ type = \"json_schema\", name = \"loose\", schema = {{ type = \"object\", properties = {{ a = {{ type = \"string\" }} }} }} }}\n",
        common::SHIPPED_CONFIG
    );
    let e = switchyard::config::Config::from_toml(&text)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("categories.loose.response_format") && e.contains("gpt-4o-mini"),
        "{e}"
    );
    // Without strict mode, the same schema is fine (answers are validated anyway).
    let lax = text.replace("name = \"loose\",", "name = \"loose\", strict = false,");
    assert!(switchyard::config::Config::from_toml(&lax).is_ok());
}
