//! Recorded provider exchanges (`tests/fixtures/<provider>/*.json`, shaped
//! exactly like the providers' wire formats) run through each adapter's pure
//! request builder and response interpreter. Costs are checked against a
//! hand computation from the price table.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use rust_decimal::Decimal;
use serde_json::Value;
use switchyard::pricing::Prices;
use switchyard::providers::headers::parse_rfc3339;
use switchyard::providers::http::RawResponse;
use switchyard::providers::{anthropic, gemini, openai, CallError, CallRequest, CallResponse};

type Interpret = fn(&RawResponse, SystemTime) -> Result<CallResponse, CallError>;
type Build = fn(&CallRequest) -> Value;

fn adapter(provider: &str) -> (Build, Interpret) {
    match provider {
        "openai" => (openai::build_request, openai::interpret),
        "anthropic" => (anthropic::build_request, anthropic::interpret),
        "gemini" => (gemini::build_request, gemini::interpret),
        other => panic!("no adapter for fixture folder {other}"),
    }
}

fn decimal(v: &Value) -> Decimal {
    Decimal::from_str(v.as_str().expect("decimal as string")).unwrap()
}

fn call_request(v: &Value) -> CallRequest {
    CallRequest {
        model: v["model"].as_str().unwrap().into(),
        max_tokens: v["max_tokens"].as_u64().unwrap() as u32,
        temperature: v["temperature"].as_f64(),
        tag: None,
        messages: serde_json::from_value(v["messages"].clone()).unwrap(),
        response_format: v
            .get("response_format")
            .map(|f| serde_json::from_value(f.clone()).unwrap()),
        structured: v
            .get("structured")
            .map(|f| serde_json::from_value(f.clone()).unwrap())
            .unwrap_or_default(),
    }
}

fn raw_response(v: &Value) -> RawResponse {
    let mut headers = HeaderMap::new();
    for (k, val) in v["headers"].as_object().unwrap() {
        headers.insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(val.as_str().unwrap()).unwrap(),
        );
    }
    let body = match v.get("body_text") {
        Some(t) => t.as_str().unwrap().as_bytes().to_vec(),
        None => serde_json::to_vec(&v["body"]).unwrap(),
    };
    RawResponse {
        status: v["status"].as_u64().unwrap() as u16,
        headers,
        body: body.into(),
    }
}

fn ms(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| Value::from(d.as_millis() as u64))
}

fn check(provider: &str, name: &str, fx: &Value) {
    let (mut build, interpret) = adapter(provider);
    let ctx = format!("{provider}/{name}");
    if fx.get("batch") == Some(&Value::Bool(true)) {
        assert_eq!(
            provider, "gemini",
            "{ctx}: only Gemini builds batch items apart"
        );
        build = gemini::build_batch_request;
    }
    if let Some(call) = fx.get("call") {
        assert_eq!(
            build(&call_request(call)),
            fx["request_body"],
            "{ctx}: request body"
        );
        return;
    }
    let now = fx
        .get("now")
        .and_then(|n| n.as_str())
        .map(|n| parse_rfc3339(n).unwrap())
        .unwrap_or_else(SystemTime::now);
    let got = interpret(&raw_response(&fx["response"]), now);
    let want = &fx["expect"];
    if want["ok"].as_bool().unwrap() {
        let r = got.unwrap_or_else(|e| panic!("{ctx}: expected success, got {e}"));
        assert_eq!(r.text, want["text"].as_str().unwrap(), "{ctx}");
        assert_eq!(
            r.finish_reason.as_deref(),
            want["finish_reason"].as_str(),
            "{ctx}"
        );
        assert_eq!(
            serde_json::to_value(r.usage).unwrap(),
            want["usage"],
            "{ctx}: usage"
        );
        let p = &fx["prices"];
        let prices = Prices {
            input_per_mtok: decimal(&p["input"]),
            output_per_mtok: decimal(&p["output"]),
            cached_input_per_mtok: decimal(&p["cached_input"]),
            cache_write_per_mtok: p.get("cache_write").map_or(decimal(&p["input"]), decimal),
        };
        assert_eq!(
            prices.cost(&r.usage),
            decimal(&want["cost_usd"]),
            "{ctx}: cost"
        );
        if let Some(e) = want.get("exhausted_for_ms") {
            assert_eq!(&ms(r.rate.exhausted_for()), e, "{ctx}: exhausted_for");
        }
    } else {
        let e = match got {
            Ok(r) => panic!("{ctx}: expected an error, got {r:?}"),
            Err(e) => e,
        };
        assert_eq!(
            format!("{:?}", e.class),
            want["class"].as_str().unwrap(),
            "{ctx}: {e}"
        );
        assert_eq!(e.retryable, want["retryable"].as_bool().unwrap(), "{ctx}");
        if let Some(r) = want.get("retry_after_ms") {
            assert_eq!(&ms(e.retry_after), r, "{ctx}: retry_after");
        }
        if let Some(x) = want.get("exhausted_for_ms") {
            assert_eq!(&ms(e.rate.exhausted_for()), x, "{ctx}: exhausted_for");
        }
    }
}

#[test]
fn every_fixture_matches_its_expectation() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut seen = 0;
    for provider in ["openai", "anthropic", "gemini"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(provider))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        assert!(files.len() >= 4, "{provider} has fixtures");
        for f in files {
            let fx: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            check(provider, &f.file_name().unwrap().to_string_lossy(), &fx);
            seen += 1;
        }
    }
    assert_eq!(seen, 26);
}
