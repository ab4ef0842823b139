//! Images in messages end to end: each adapter sends them in its provider's
//! format (the simulator parses each format's image parts strictly and
//! counts them in its ledger), their tokens are paid for, and bad images
//! are dead-lettered with the reason before any provider is called.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::TestEnv;
use serde_json::{json, Value};
use switchyard::enqueue::{publish_jobs, wait_finished, Outgoing};
use switchyard::sim::SimProfile;

const EXTRA: &str = r#"
[categories.look_openai]
route = { kind = "single", target = "gpt-4o-mini" }

[categories.look_anthropic]
route = { kind = "single", target = "claude-haiku-4-5" }

[categories.look_gemini]
route = { kind = "single", target = "gemini-2.5-flash" }

[categories.look_pipeline]
route = { kind = "pipeline", stages = [
  { name = "describe", target = "gpt-4o-mini", prompt = "Describe: {{input}}" },
  { name = "title", target = "claude-haiku-4-5", prompt = "A title for: {{previous}}" },
] }
"#;

/// A 1×1 PNG.
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

fn image_job(id: &str, category: &str, parts: Value) -> Outgoing {
    let env = json!({"id": id, "category": category,
                     "messages": [{"role": "user", "content": parts}]});
    Outgoing {
        category: category.into(),
        id: id.into(),
        payload: serde_json::to_vec(&env).unwrap(),
    }
}

fn two_images() -> Value {
    json!([
        {"type": "text", "text": "What is in these pictures?"},
        {"type": "image", "data": PNG, "media_type": "image/png"},
        {"type": "image", "url": "https://example.com/kettle.jpg"}
    ])
}

async fn run(env: &TestEnv, jobs: &[Outgoing]) {
    publish_jobs(&env.bus, jobs, None).await.unwrap();
    let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    assert!(
        wait_finished(&env.pool, &ids, Duration::from_secs(60), None)
            .await
            .unwrap(),
        "every job finished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_reach_each_provider_in_its_format_and_are_paid_for() {
    let env = TestEnv::new(SimProfile::default()).await;
    let cfg = env.config_from(&format!("{}\n{EXTRA}", common::SHIPPED_CONFIG));
    let worker = env.start_worker(cfg).await;
    let jobs: Vec<Outgoing> = [
        "look_openai",
        "look_anthropic",
        "look_gemini",
        "look_pipeline",
    ]
    .iter()
    .map(|c| image_job(&format!("{c}-1"), c, two_images()))
    .collect();
    run(&env, &jobs).await;
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .await,
        4
    );
    let ledger = env.sim.ledger();
    for c in ["look_openai", "look_anthropic", "look_gemini"] {
        let e = ledger
            .iter()
            .find(|e| {
                e.call
                    .as_ref()
                    .is_some_and(|t| t.job_id == format!("{c}-1"))
            })
            .unwrap_or_else(|| panic!("{c}: no request"));
        assert_eq!(e.status, 200, "{c}");
        assert_eq!(e.images, 2, "{c}: both images in the provider's format");
        // The images' tokens are in the usage, and so in the cost record.
        let input: i64 = sqlx::query_scalar("SELECT input_tokens FROM calls WHERE job_id = $1")
            .bind(format!("{c}-1"))
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(input as u64, e.prompt_tokens, "{c}");
        assert!(
            e.prompt_tokens > 2 * switchyard::sim::SIM_IMAGE_TOKENS,
            "{c}"
        );
    }
    // A pipeline sends the images with the input: to its first stage only.
    let stages: Vec<u32> = ledger
        .iter()
        .filter(|e| {
            e.call
                .as_ref()
                .is_some_and(|t| t.job_id == "look_pipeline-1")
        })
        .map(|e| e.images)
        .collect();
    assert_eq!(stages, [2, 0]);
    assert!(worker.shutdown().await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_are_dead_lettered_before_any_call() {
    let env = TestEnv::new(SimProfile::default()).await;
    let mut cfg = env.config_from(&format!("{}\n{EXTRA}", common::SHIPPED_CONFIG));
    cfg.limits.max_image_bytes = 2048;
    cfg.limits.max_images_per_job = 3;
    // Big enough for the job below, too big to travel twice in a call message.
    cfg.limits.max_payload_bytes = 900 * 1024;
    let worker = env.start_worker(cfg).await;
    let img = |v: Value| json!([{"type": "text", "text": "look"}, v]);
    let big = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 4096]);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "not-base64",
            img(json!({"type": "image", "data": "%%%", "media_type": "image/png"})),
            "not base64",
        ),
        (
            "bmp",
            img(json!({"type": "image", "data": PNG, "media_type": "image/bmp"})),
            "media_type `image/bmp`",
        ),
        (
            "oversize",
            img(json!({"type": "image", "data": big, "media_type": "image/png"})),
            "limits.max_image_bytes",
        ),
        (
            "ftp",
            img(json!({"type": "image", "url": "ftp://example.com/a.png"})),
            "http(s)",
        ),
        (
            "both",
            img(
                json!({"type": "image", "url": "https://x/a.png", "data": PNG, "media_type": "image/png"}),
            ),
            "exactly one of `url` and `data`",
        ),
        (
            "many",
            json!([
                {"type": "image", "url": "https://x/1.png"}, {"type": "image", "url": "https://x/2.png"},
                {"type": "image", "url": "https://x/3.png"}, {"type": "image", "url": "https://x/4.png"}
            ]),
            "limits.max_images_per_job",
        ),
        (
            "video",
            img(json!({"type": "video", "url": "https://x/a.mp4"})),
            "content[1]",
        ),
        (
            "huge-text",
            json!([{"type": "text", "text": "x".repeat(600 * 1024)}]),
            "max_payload",
        ),
    ];
    let jobs: Vec<Outgoing> = cases
        .iter()
        .map(|(id, parts, _)| image_job(id, "look_openai", parts.clone()))
        .collect();
    publish_jobs(&env.bus, &jobs, None).await.unwrap();
    common::wait_until(
        Duration::from_secs(30),
        "every bad job dead-lettered",
        || async { env.count("SELECT count(*) FROM dead_letters").await == cases.len() as i64 },
    )
    .await;
    let reasons: Vec<(Option<String>, String)> =
        sqlx::query_as("SELECT job_id, reason FROM dead_letters")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    for (id, _, want) in &cases {
        let (_, reason) = reasons
            .iter()
            .find(|(j, r)| {
                j.as_deref() == Some(*id)
                    || (j.is_none() && *id == "video" && r.contains("content[1]"))
            })
            .unwrap_or_else(|| panic!("{id}: not dead-lettered: {reasons:?}"));
        assert!(reason.contains(want), "{id}: {reason}");
    }
    assert!(env.sim.ledger().is_empty(), "no provider was called");
    assert_eq!(env.count("SELECT count(*) FROM calls").await, 0);
    assert!(worker.shutdown().await);
    env.cleanup().await;
}
