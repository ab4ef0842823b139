//! The simulator's batch APIs, as each provider's: items answered at the
//! batch's end exactly as in real time, results shuffled, the ledger holding
//! every processed item; expiry, cancellation and validation failures as
//! the provider has them; and the providers' official Python SDKs driving
//! all of it (`tests/sdk/batch_sdks.py`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard::sim::{BatchFate, Format, LedgerEntry, SimProfile, SimServer};

async fn sim() -> SimServer {
    let profile = SimProfile {
        batch_ms: Some(300),
        cached_share: 0.25,
        ..Default::default()
    };
    SimServer::start("127.0.0.1:0", profile).await.unwrap()
}

fn http() -> reqwest::Client {
    switchyard::providers::http::install_tls_provider();
    reqwest::Client::new()
}

/// Poll `url` until `done` holds for its JSON (a deadline of 20 s).
async fn poll(
    c: &reqwest::Client,
    url: &str,
    key: (&str, &str),
    done: impl Fn(&Value) -> bool,
) -> Value {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = c
            .get(url)
            .header(key.0, key.1)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < until, "{url} never ended: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POST `body` as JSON to `url` with `key`; the answer's JSON.
async fn post_json(c: &reqwest::Client, url: String, key: (&str, &str), body: Value) -> Value {
    c.post(url)
        .header(key.0, key.1)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The ledger's entries of one batch, by custom id.
fn items_of(ledger: &[LedgerEntry], batch_id: &str) -> BTreeMap<String, LedgerEntry> {
    ledger
        .iter()
        .filter_map(|e| {
            let b = e.batch.as_ref()?;
            (b.batch_id == batch_id).then(|| (b.custom_id.clone(), e.clone()))
        })
        .collect()
}

fn jsonl(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const OPENAI_KEY: (&str, &str) = ("authorization", "Bearer sk-test");

async fn openai_batch(c: &reqwest::Client, base: &str, lines: &[Value]) -> Value {
    let jsonl: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let body = format!(
        "--sybound\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --sybound\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{jsonl}\r\n--sybound--\r\n"
    );
    let file: Value = c
        .post(format!("{base}/v1/files"))
        .header(OPENAI_KEY.0, OPENAI_KEY.1)
        .header("content-type", "multipart/form-data; boundary=sybound")
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(file["purpose"], "batch", "{file}");
    c.post(format!("{base}/v1/batches"))
        .header(OPENAI_KEY.0, OPENAI_KEY.1)
        .json(
            &json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                      "completion_window": "24h", "metadata": {"ours": "b1"}}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn openai_line(id: &str, model: &str) -> Value {
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": model, "max_tokens": 30,
                    "messages": [{"role": "user", "content": format!("question {id}")}]}})
}

async fn file_lines(c: &reqwest::Client, base: &str, id: &Value) -> Vec<Value> {
    let Some(id) = id.as_str() else {
        return Vec::new();
    };
    let text = c
        .get(format!("{base}/v1/files/{id}/content"))
        .header(OPENAI_KEY.0, OPENAI_KEY.1)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    jsonl(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_batches_answer_every_line_shuffled_and_expire_as_openai_does() {
    let sim = sim().await;
    let (c, base) = (http(), sim.base_url());
    let ids: Vec<String> = (0..12).map(|i| format!("o{i:02}")).collect();
    let lines: Vec<Value> = ids.iter().map(|i| openai_line(i, "gpt-4o-mini")).collect();
    let b = openai_batch(&c, &base, &lines).await;
    assert_eq!(b["status"], "validating", "{b}");
    assert_eq!(b["metadata"]["ours"], "b1");
    let url = format!("{base}/v1/batches/{}", b["id"].as_str().unwrap());
    let b = poll(&c, &url, OPENAI_KEY, |v| v["status"] == "completed").await;
    assert_eq!(
        b["request_counts"],
        json!({"total": 12, "completed": 12, "failed": 0})
    );
    let out = file_lines(&c, &base, &b["output_file_id"]).await;
    let got: Vec<String> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    assert_ne!(got, ids, "results come back shuffled");
    assert_eq!(
        got.iter().cloned().collect::<BTreeSet<_>>(),
        ids.iter().cloned().collect()
    );
    // Each answer's usage is the ledger's entry for that item.
    let ledger = items_of(&sim.ledger(), b["id"].as_str().unwrap());
    assert_eq!(ledger.len(), 12);
    for l in &out {
        let e = &ledger[l["custom_id"].as_str().unwrap()];
        let usage = &l["response"]["body"]["usage"];
        assert_eq!(usage["prompt_tokens"], e.prompt_tokens);
        assert_eq!(usage["completion_tokens"], e.completion_tokens);
        assert_eq!(
            usage["prompt_tokens_details"]["cached_tokens"],
            e.cached_tokens
        );
        assert!(e.cached_tokens > 0 && e.format == Format::Openai);
    }

    // Expired: the answered half is delivered (and billed), the rest listed
    // as batch_expired in the error file.
    sim.force_batch(Format::Openai, BatchFate::Expire);
    let b = openai_batch(&c, &base, &lines[..6]).await;
    let url = format!("{base}/v1/batches/{}", b["id"].as_str().unwrap());
    let b = poll(&c, &url, OPENAI_KEY, |v| v["status"] == "expired").await;
    assert_eq!(file_lines(&c, &base, &b["output_file_id"]).await.len(), 3);
    let errors = file_lines(&c, &base, &b["error_file_id"]).await;
    assert_eq!(errors.len(), 3);
    assert!(errors.iter().all(|e| e["error"]["code"] == "batch_expired"));
    assert_eq!(items_of(&sim.ledger(), b["id"].as_str().unwrap()).len(), 3);

    // A file with two models fails validation: nothing is processed.
    let mixed = vec![
        openai_line("m1", "gpt-4o-mini"),
        openai_line("m2", "gpt-4o"),
    ];
    let b = openai_batch(&c, &base, &mixed).await;
    let url = format!("{base}/v1/batches/{}", b["id"].as_str().unwrap());
    let b = poll(&c, &url, OPENAI_KEY, |v| v["status"] == "failed").await;
    assert_eq!(b["errors"]["data"][0]["line"], 2, "{b}");
    assert!(items_of(&sim.ledger(), b["id"].as_str().unwrap()).is_empty());

    // Cancelled right away: ends `cancelled`, nothing left unaccounted.
    let b = openai_batch(&c, &base, &lines).await;
    let id = b["id"].as_str().unwrap().to_string();
    let b: Value = c
        .post(format!("{base}/v1/batches/{id}/cancel"))
        .header(OPENAI_KEY.0, OPENAI_KEY.1)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(b["status"], "cancelling");
    let b = poll(&c, &format!("{base}/v1/batches/{id}"), OPENAI_KEY, |v| {
        v["status"] == "cancelled"
    })
    .await;
    let answered = file_lines(&c, &base, &b["output_file_id"]).await.len();
    let cancelled = file_lines(&c, &base, &b["error_file_id"]).await;
    assert_eq!(answered + cancelled.len(), 12);
    assert!(cancelled
        .iter()
        .all(|e| e["error"]["code"] == "batch_cancelled"));
    assert_eq!(items_of(&sim.ledger(), &id).len(), answered);
    sim.stop();
}

const ANTHROPIC_KEY: (&str, &str) = ("x-api-key", "sk-ant-test");

async fn anthropic_batch(c: &reqwest::Client, base: &str, n: usize) -> Value {
    let requests: Vec<Value> = (0..n)
        .map(|i| {
            json!({"custom_id": format!("a-{i}"), "params": {"model": "claude-haiku-4-5",
                   "max_tokens": 30, "messages": [{"role": "user", "content": format!("q {i}")}]}})
        })
        .collect();
    post_json(
        c,
        format!("{base}/v1/messages/batches"),
        ANTHROPIC_KEY,
        json!({"requests": requests}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_message_batches_end_with_every_item_accounted_for() {
    let sim = sim().await;
    let (c, base) = (http(), sim.base_url());
    let b = anthropic_batch(&c, &base, 10).await;
    assert_eq!(b["processing_status"], "in_progress", "{b}");
    assert_eq!(b["request_counts"]["processing"], 10);
    let id = b["id"].as_str().unwrap().to_string();
    let early = c
        .get(format!("{base}/v1/messages/batches/{id}/results"))
        .header(ANTHROPIC_KEY.0, ANTHROPIC_KEY.1)
        .send()
        .await
        .unwrap();
    assert_eq!(early.status(), 400, "no results before the batch ends");
    let url = format!("{base}/v1/messages/batches/{id}");
    let b = poll(&c, &url, ANTHROPIC_KEY, |v| {
        v["processing_status"] == "ended"
    })
    .await;
    assert_eq!(b["request_counts"]["succeeded"], 10);
    let results = jsonl(
        &c.get(b["results_url"].as_str().unwrap())
            .header(ANTHROPIC_KEY.0, ANTHROPIC_KEY.1)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let ledger = items_of(&sim.ledger(), &id);
    assert_eq!((results.len(), ledger.len()), (10, 10));
    for r in &results {
        assert_eq!(r["result"]["type"], "succeeded");
        let e = &ledger[r["custom_id"].as_str().unwrap()];
        let u = &r["result"]["message"]["usage"];
        let input = u["input_tokens"].as_u64().unwrap()
            + u["cache_read_input_tokens"].as_u64().unwrap()
            + u["cache_creation_input_tokens"].as_u64().unwrap();
        assert_eq!(input, e.prompt_tokens);
        assert_eq!(u["output_tokens"], e.completion_tokens);
    }

    // Expired: the unprocessed half comes back `expired`, unbilled.
    sim.force_batch(Format::Anthropic, BatchFate::Expire);
    let b = anthropic_batch(&c, &base, 10).await;
    let id = b["id"].as_str().unwrap().to_string();
    let b = poll(
        &c,
        &format!("{base}/v1/messages/batches/{id}"),
        ANTHROPIC_KEY,
        |v| v["processing_status"] == "ended",
    )
    .await;
    assert_eq!(b["request_counts"]["succeeded"], 5);
    assert_eq!(b["request_counts"]["expired"], 5);
    assert_eq!(items_of(&sim.ledger(), &id).len(), 5);

    // A custom_id Anthropic would refuse.
    let r = c
        .post(format!("{base}/v1/messages/batches"))
        .header(ANTHROPIC_KEY.0, ANTHROPIC_KEY.1)
        .json(&json!({"requests": [{"custom_id": "job#1#1", "params": {}}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    sim.stop();
}

const GEMINI_KEY: (&str, &str) = ("x-goog-api-key", "test-key");

async fn gemini_batch(c: &reqwest::Client, base: &str, version: &str, n: usize) -> Value {
    let requests: Vec<Value> = (0..n)
        .map(|i| {
            json!({"request": {"contents": [{"role": "user", "parts": [{"text": format!("q {i}")}]}]},
                   "metadata": {"key": format!("g-{i}")}})
        })
        .collect();
    post_json(
        c,
        format!("{base}/{version}/models/gemini-2.5-flash-lite:batchGenerateContent"),
        GEMINI_KEY,
        json!({"batch": {"displayName": "t", "inputConfig": {"requests": {"requests": requests}}}}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_batches_answer_inline_and_an_expired_one_delivers_nothing() {
    let sim = sim().await;
    let (c, base) = (http(), sim.base_url());
    for version in ["v1beta", "v1"] {
        let op = gemini_batch(&c, &base, version, 8).await;
        let name = op["name"].as_str().unwrap().to_string();
        assert!(name.starts_with("batches/"), "{op}");
        let url = format!("{base}/{version}/{name}");
        let op = poll(&c, &url, GEMINI_KEY, |v| v["done"] == true).await;
        assert_eq!(op["metadata"]["state"], "BATCH_STATE_SUCCEEDED", "{op}");
        let items = op["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
            .as_array()
            .unwrap();
        let ledger = items_of(&sim.ledger(), name.trim_start_matches("batches/"));
        assert_eq!((items.len(), ledger.len()), (8, 8));
        for it in items {
            let e = &ledger[it["metadata"]["key"].as_str().unwrap()];
            assert_eq!(
                it["response"]["usageMetadata"]["promptTokenCount"],
                e.prompt_tokens
            );
        }
    }
    // Real time on the v1 path too.
    let r = c
        .post(format!("{base}/v1/models/gemini-2.5-flash:generateContent"))
        .header(GEMINI_KEY.0, GEMINI_KEY.1)
        .json(&json!({"contents": [{"parts": [{"text": "hello"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    sim.force_batch(Format::Gemini, BatchFate::Expire);
    let op = gemini_batch(&c, &base, "v1beta", 4).await;
    let name = op["name"].as_str().unwrap().to_string();
    let op = poll(&c, &format!("{base}/v1beta/{name}"), GEMINI_KEY, |v| {
        v["done"] == true
    })
    .await;
    assert_eq!(op["metadata"]["state"], "BATCH_STATE_EXPIRED");
    assert!(op["metadata"].get("output").is_none(), "{op}");
    assert!(items_of(&sim.ledger(), name.trim_start_matches("batches/")).is_empty());
    sim.stop();
}

/// The providers' official SDKs (openai, anthropic, google-genai; Python,
/// installed by `./scripts/test.sh` in `target/sdk-venv`) drive the batch
/// endpoints end to end, OpenAI's and Anthropic's with strict validation of
/// every response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdks_drive_the_batch_endpoints() {
    let python = std::env::var("PROVIDER_SDK_PYTHON")
        .unwrap_or_else(|_| format!("{}/target/sdk-venv/bin/python", env!("CARGO_MANIFEST_DIR")));
    if !switchyard_servers::have(
        "the providers' Python SDKs (./scripts/test.sh installs them in target/sdk-venv)",
        std::path::Path::new(&python).exists(),
    ) {
        return;
    }
    let sim = sim().await;
    let base = sim.base_url();
    let script = format!("{}/tests/sdk/batch_sdks.py", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&base)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    let ledger = sim.ledger();
    for (sdk, prefix) in [("openai", "o"), ("anthropic", "a"), ("gemini", "g")] {
        let answered: Vec<&str> = v[sdk]["answered"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        let expect: Vec<String> = (0..4).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(answered, expect, "{sdk}");
        let first = v[sdk]["batches"][0].as_str().unwrap();
        let items = items_of(&ledger, first.trim_start_matches("batches/"));
        assert_eq!(
            items.keys().cloned().collect::<Vec<_>>(),
            expect,
            "{sdk}: the ledger holds every answered item"
        );
    }
    sim.stop();
}
