//! The provider conformance suite: every adapter (OpenAI, Anthropic, Gemini)
//! against the simulator speaking its format, case by case: success with
//! exact usage, every error class, retry delays, rate-limit headers,
//! timeouts, refused connections, and credentials sent only in the
//! provider's header.

use std::time::Duration;

use switchyard::envelope::{Message, Role};
use switchyard::providers::anthropic::AnthropicAdapter;
use switchyard::providers::gemini::GeminiAdapter;
use switchyard::providers::http::HttpClient;
use switchyard::providers::openai::OpenAiAdapter;
use switchyard::providers::{CallError, CallRequest, ErrorClass, Provider, Secret};
use switchyard::sim::{count_tokens, Forced, Format, SimProfile, SimServer};

const FORMATS: [Format; 3] = [Format::Openai, Format::Anthropic, Format::Gemini];
const KEY: &str = "sk-conformance-7d1e0b";

fn adapter(format: Format, base_url: &str, timeout: Duration) -> Provider {
    let http = HttpClient::new(
        &format!("{format:?}"),
        base_url,
        Some(Secret::new(KEY.to_string())),
        timeout,
        None,
    )
    .unwrap();
    match format {
        Format::Openai => Provider::OpenAi(OpenAiAdapter::new(http)),
        Format::Anthropic => Provider::Anthropic(AnthropicAdapter::new(http)),
        Format::Gemini => Provider::Gemini(GeminiAdapter::new(http)),
    }
}

fn request() -> CallRequest {
    CallRequest {
        model: "model-x".into(),
        messages: vec![
            Message {
                role: Role::System,
                content: "You answer briefly.".into(),
                parts: Vec::new(),
            },
            Message {
                role: Role::User,
                content: "What is the capital of France, and why is it famous?".into(),
                parts: Vec::new(),
            },
        ],
        max_tokens: 200,
        temperature: Some(0.2),
        tag: Some("job-1#0#1".into()),
        ..Default::default()
    }
}

async fn call_forced(
    format: Format,
    forced: Forced,
) -> (
    Result<switchyard::providers::CallResponse, CallError>,
    SimServer,
) {
    let sim = SimServer::start("127.0.0.1:0", SimProfile::default())
        .await
        .unwrap();
    sim.force(format, [forced]);
    let r = adapter(format, &sim.base_url(), Duration::from_secs(5))
        .call(&request())
        .await;
    (r, sim)
}

#[tokio::test]
async fn success_reports_text_and_exact_usage_for_every_format() {
    let sim = SimServer::start(
        "127.0.0.1:0",
        SimProfile {
            cached_share: 0.5,
            cache_write_share: 0.25,
            reasoning_tokens: 11,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for format in FORMATS {
        let r = adapter(format, &sim.base_url(), Duration::from_secs(5))
            .call(&request())
            .await
            .unwrap_or_else(|e| panic!("{format:?}: {e}"));
        let led = sim.ledger().pop().unwrap();
        assert_eq!(led.format, format);
        assert!(led.has_auth, "{format:?} sent its key");
        // The attempt's tag travels with the request, so the provider's
        // ledger can be matched to the `calls` row.
        assert_eq!(
            led.call,
            Some(switchyard::sim::CallTag {
                job_id: "job-1".into(),
                step: 0,
                attempt: 1
            }),
            "{format:?}"
        );
        assert!(!r.text.is_empty());
        assert!(r.finish_reason.is_some());
        // The system prompt reached the provider in its own place: the sim
        // counts it in the prompt.
        let req = request();
        let expected: u64 = 3 + req
            .messages
            .iter()
            .map(|m| count_tokens(&m.content) + 4)
            .sum::<u64>();
        assert_eq!(led.prompt_tokens, expected, "{format:?}");
        assert_eq!(r.usage.input_tokens, led.prompt_tokens, "{format:?}");
        assert_eq!(r.usage.output_tokens, led.completion_tokens, "{format:?}");
        assert_eq!(r.usage.cached_input_tokens, led.cached_tokens, "{format:?}");
        assert_eq!(
            r.usage.cache_write_input_tokens, led.cache_write_tokens,
            "{format:?}"
        );
        assert_eq!(led.cached_tokens, expected / 2);
        assert_eq!(
            led.cache_write_tokens,
            if format == Format::Anthropic {
                expected / 4
            } else {
                0
            }
        );
        assert_eq!(led.reasoning_tokens, 11);
        if format != Format::Anthropic {
            // Anthropic bills thinking inside output_tokens without a split.
            assert_eq!(r.usage.reasoning_tokens, 11, "{format:?}");
        }
    }
}

fn assert_class(
    format: Format,
    r: &Result<switchyard::providers::CallResponse, CallError>,
    class: ErrorClass,
    retryable: bool,
) -> CallError {
    let e = r
        .as_ref()
        .err()
        .unwrap_or_else(|| panic!("{format:?}: expected {class:?}, got success"))
        .clone();
    assert_eq!(e.class, class, "{format:?}: {e}");
    assert_eq!(e.retryable, retryable, "{format:?}: {e}");
    assert!(!e.message.contains(KEY));
    e
}

#[tokio::test]
async fn rate_limits_are_retryable_with_the_advertised_delay() {
    for format in FORMATS {
        let (r, _sim) = call_forced(
            format,
            Forced::RateLimited {
                retry_after_ms: 3000,
            },
        )
        .await;
        let e = assert_class(format, &r, ErrorClass::RateLimited, true);
        assert_eq!(e.http_status, Some(429));
        assert_eq!(e.retry_after, Some(Duration::from_secs(3)), "{format:?}");
    }
}

#[tokio::test]
async fn quota_and_spend_limits_are_terminal() {
    for format in FORMATS {
        let (r, _sim) = call_forced(format, Forced::Quota).await;
        let e = assert_class(format, &r, ErrorClass::QuotaExceeded, false);
        assert_eq!(e.http_status, Some(429), "{format:?}");
    }
}

#[tokio::test]
async fn overload_and_server_errors_are_retryable() {
    for format in FORMATS {
        let (r, _sim) = call_forced(format, Forced::Overloaded).await;
        let e = assert_class(format, &r, ErrorClass::Server, true);
        let want = if format == Format::Anthropic {
            529
        } else {
            503
        };
        assert_eq!(e.http_status, Some(want), "{format:?}");
        let (r, _sim) = call_forced(format, Forced::ServerError).await;
        assert_class(format, &r, ErrorClass::Server, true);
    }
}

#[tokio::test]
async fn bad_requests_and_bad_keys_are_terminal() {
    for format in FORMATS {
        let (r, _sim) = call_forced(format, Forced::BadRequest).await;
        assert_class(format, &r, ErrorClass::BadRequest, false);
        let (r, _sim) = call_forced(format, Forced::Unauthorized).await;
        assert_class(format, &r, ErrorClass::Auth, false);
    }
}

#[tokio::test]
async fn malformed_and_truncated_answers_are_errors_not_panics() {
    for format in FORMATS {
        for forced in [Forced::Malformed, Forced::Truncated] {
            let (r, _sim) = call_forced(format, forced.clone()).await;
            let e = assert_class(format, &r, ErrorClass::BadResponse, true);
            assert_eq!(e.http_status, Some(200), "{format:?} {forced:?}");
        }
    }
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_retryable() {
    for format in FORMATS {
        let sim = SimServer::start("127.0.0.1:0", SimProfile::default())
            .await
            .unwrap();
        sim.force(format, [Forced::Slow { ms: 1500 }]);
        let r = adapter(format, &sim.base_url(), Duration::from_millis(300))
            .call(&request())
            .await;
        assert_class(format, &r, ErrorClass::Timeout, true);
    }
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for format in FORMATS {
        let r = adapter(
            format,
            &format!("http://127.0.0.1:{port}"),
            Duration::from_secs(2),
        )
        .call(&request())
        .await;
        assert_class(format, &r, ErrorClass::Connection, true);
    }
}

#[tokio::test]
async fn exhausted_budgets_in_headers_tell_the_lane_to_wait() {
    // Gemini sends no rate-limit headers; OpenAI (Go durations) and
    // Anthropic (RFC 3339 resets, whole seconds) do.
    for (format, min, max) in [
        (
            Format::Openai,
            Duration::from_millis(2400),
            Duration::from_millis(2500),
        ),
        (
            Format::Anthropic,
            Duration::from_millis(1500),
            Duration::from_millis(3600),
        ),
    ] {
        let (r, _sim) = call_forced(format, Forced::Exhausted { reset_ms: 2500 }).await;
        let r = r.unwrap();
        let wait = r
            .rate
            .exhausted_for()
            .unwrap_or_else(|| panic!("{format:?}: {:?}", r.rate));
        assert!(wait >= min && wait <= max, "{format:?}: {wait:?}");
    }
    let sim = SimServer::start(
        "127.0.0.1:0",
        SimProfile {
            rpm: 6000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let r = adapter(Format::Openai, &sim.base_url(), Duration::from_secs(5))
        .call(&request())
        .await
        .unwrap();
    let b = r.rate.budget("requests").expect("requests budget");
    assert_eq!(b.remaining, 99);
    assert_eq!(r.rate.exhausted_for(), None);
}

#[tokio::test]
async fn failures_can_be_forced_over_http_and_the_ledger_read_back() {
    let sim = SimServer::start("127.0.0.1:0", SimProfile::default())
        .await
        .unwrap();
    switchyard::providers::http::install_tls_provider();
    let http = reqwest::Client::new();
    let status = http
        .post(format!("{}/control/force", sim.base_url()))
        .json(&serde_json::json!({"format": "anthropic", "kind": "overloaded", "count": 2}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 204);
    let a = adapter(Format::Anthropic, &sim.base_url(), Duration::from_secs(5));
    for _ in 0..2 {
        let r = a.call(&request()).await;
        assert_class(Format::Anthropic, &r, ErrorClass::Server, true);
    }
    assert!(a.call(&request()).await.is_ok(), "only two were forced");
    let ledger: Vec<serde_json::Value> = http
        .get(format!("{}/ledger", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let statuses: Vec<u64> = ledger
        .iter()
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![529, 529, 200]);
    assert_eq!(ledger[0]["format"], "anthropic");
}

/// A server on loopback that answers every request with a 200 whose body
/// is `len` bytes, with or without a `content-length`.
async fn endless_server(len: usize, with_length: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tasks = switchyard::tasks::Tasks::new();
    let inner = tasks.clone();
    tasks.spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            inner.spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = sock.read(&mut buf).await;
                let head = if with_length {
                    format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n")
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
                        .to_string()
                };
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b' '; 16 * 1024];
                let mut sent = 0;
                while sent < len {
                    let n = chunk.len().min(len - sent);
                    if sock.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    sent += n;
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_oversized_answer_is_a_terminal_error_not_unbounded_memory() {
    for with_length in [true, false] {
        let base = endless_server(4 << 20, with_length).await;
        for format in FORMATS {
            let http = HttpClient::new("big", &base, None, Duration::from_secs(10), None)
                .unwrap()
                .with_body_limit(64 * 1024);
            let p = match format {
                Format::Openai => Provider::OpenAi(OpenAiAdapter::new(http)),
                Format::Anthropic => Provider::Anthropic(AnthropicAdapter::new(http)),
                Format::Gemini => Provider::Gemini(GeminiAdapter::new(http)),
            };
            let r = p.call(&request()).await;
            let e = assert_class(format, &r, ErrorClass::BadResponse, false);
            assert!(
                e.message.contains("max_response_bytes"),
                "{format:?}: the error names the setting: {}",
                e.message
            );
        }
    }
}

/// `waves` rounds of `calls` requests at once through a provider built from
/// config (`http2`, `max_concurrency = calls`,
/// `http2_streams_per_connection = 10`) to a simulator answering after
/// 300 ms; returns the TCP connections it accepted.
async fn connections_for(format: Format, http2: bool, calls: usize, waves: usize) -> u64 {
    let sim = SimServer::start(
        "127.0.0.1:0",
        SimProfile {
            latency_ms: 300,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let kind = match format {
        Format::Openai => "openai_compatible",
        Format::Anthropic => "anthropic",
        Format::Gemini => "gemini",
    };
    let cfg: switchyard::config::ProviderConfig = toml::from_str(&format!(
        "kind = \"{kind}\"\nbase_url = \"{}\"\nrpm = 1000\ntpm = 1000000\n\
         max_concurrency = {calls}\nhttp2 = {http2}\nhttp2_streams_per_connection = 10\n",
        sim.base_url()
    ))
    .unwrap();
    let provider = Provider::from_config("p", &cfg).unwrap();
    let req = request();
    for wave in 0..waves {
        if wave > 0 {
            // The ebb between two waves: no call in flight for a moment.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let answers = futures::future::join_all((0..calls).map(|_| provider.call(&req))).await;
        for a in answers {
            a.unwrap_or_else(|e| panic!("{format:?} http2={http2}: {e}"));
        }
    }
    assert_eq!(sim.ledger().len(), calls * waves);
    sim.connections()
}

#[tokio::test]
async fn http2_carries_a_lanes_calls_on_a_few_connections() {
    for format in FORMATS {
        // HTTP/1.1: a connection per call in flight.
        let h1 = connections_for(format, false, 40, 1).await;
        assert!(h1 >= 40, "{format:?}: HTTP/1.1 used {h1} connections");
        // HTTP/2 (h2c to an http:// server): 40 calls at 10 per connection
        // share 4 connections.
        let h2 = connections_for(format, true, 40, 1).await;
        assert!(
            (1..=4).contains(&h2),
            "{format:?}: HTTP/2 used {h2} connections"
        );
    }
}

#[tokio::test]
async fn http1_keeps_a_lanes_connections_for_its_next_calls() {
    // Two waves of 300 calls (more than any fixed idle cap of 256): the
    // second finds the first's connections idle and opens none.
    let n = connections_for(Format::Openai, false, 300, 2).await;
    assert!(
        (300..=320).contains(&n),
        "two waves of 300 calls opened {n} connections"
    );
}

#[test]
fn http2_streams_per_connection_of_zero_is_a_config_error_naming_the_key() {
    let text = std::fs::read_to_string("config/switchyard.toml").unwrap();
    let provider = text
        .lines()
        .find_map(|l| l.strip_prefix("[providers.")?.strip_suffix(']'))
        .unwrap()
        .to_string();
    let env = [(
        format!(
            "SWITCHYARD_PROVIDERS__{}__HTTP2_STREAMS_PER_CONNECTION",
            provider.to_uppercase()
        ),
        "0".to_string(),
    )];
    let err = switchyard::config::Config::from_toml_with_env(&text, &env).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "providers.{provider}.http2_streams_per_connection"
        )),
        "{err}"
    );
}
