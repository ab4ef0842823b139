//! The batch clients (`providers::batch`) against the simulator's batch
//! APIs: submit, poll, stream results with exact usage, find a batch again
//! by its tag, cancellation and expiry as each provider has them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use switchyard::envelope::{Message, Role};
use switchyard::providers::batch::{
    BatchClient, BatchEnd, BatchItem, BatchState, BatchStatus, ItemOutcome, Kind,
};
use switchyard::providers::http::HttpClient;
use switchyard::providers::{CallRequest, Secret};
use switchyard::sim::{BatchFate, Format, LedgerEntry, SimProfile, SimServer};

const MODEL: [(Kind, Format, &str); 3] = [
    (Kind::OpenAi, Format::Openai, "gpt-4o-mini"),
    (Kind::Anthropic, Format::Anthropic, "claude-haiku-4-5"),
    (Kind::Gemini, Format::Gemini, "gemini-2.5-flash-lite"),
];

async fn sim() -> SimServer {
    let profile = SimProfile {
        batch_ms: Some(300),
        cached_share: 0.2,
        ..Default::default()
    };
    SimServer::start("127.0.0.1:0", profile).await.unwrap()
}

fn client(sim: &SimServer, kind: Kind) -> BatchClient {
    let http = HttpClient::new(
        "test",
        &sim.base_url(),
        Some(Secret::new("sk-test-key".into())),
        Duration::from_secs(10),
        None,
    )
    .unwrap();
    BatchClient::new(kind, http)
}

fn requests(model: &str, n: usize) -> Vec<(String, CallRequest)> {
    (0..n)
        .map(|i| {
            (
                format!("item-{i}"),
                CallRequest {
                    model: model.into(),
                    messages: vec![
                        Message {
                            role: Role::System,
                            content: "Be brief.".into(),
                            parts: Vec::new(),
                        },
                        Message {
                            role: Role::User,
                            content: format!("Question number {i}?"),
                            parts: Vec::new(),
                        },
                    ],
                    max_tokens: 40,
                    temperature: None,
                    tag: None,
                    ..Default::default()
                },
            )
        })
        .collect()
}

async fn submit(c: &BatchClient, model: &str, tag: &str, n: usize) -> String {
    let reqs = requests(model, n);
    let items: Vec<BatchItem<'_>> = reqs
        .iter()
        .map(|(id, r)| BatchItem {
            custom_id: id,
            request: r,
        })
        .collect();
    c.submit(model, tag, &items).await.unwrap()
}

async fn until_ended(c: &BatchClient, id: &str) -> BatchStatus {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.status(id).await.unwrap();
        if matches!(s.state, BatchState::Ended(_)) {
            return s;
        }
        assert!(Instant::now() < until, "batch {id} never ended: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn outcomes(c: &BatchClient, s: &BatchStatus) -> BTreeMap<String, ItemOutcome> {
    let mut out = BTreeMap::new();
    // A small channel: the reading waits for the receiver.
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let read = async {
        let tally = c.results(s, &tx).await;
        drop(tx);
        tally
    };
    let collect = async {
        while let Some(r) = rx.recv().await {
            assert!(
                out.insert(r.custom_id.clone(), r.outcome).is_none(),
                "one line per item"
            );
        }
    };
    let (tally, ()) = tokio::join!(read, collect);
    let tally = tally.unwrap();
    assert_eq!(tally.malformed, 0);
    assert_eq!(tally.items as usize, out.len());
    out
}

fn ledger_of(sim: &SimServer, batch: &str) -> BTreeMap<String, LedgerEntry> {
    sim.ledger()
        .into_iter()
        .filter_map(|e| {
            let b = e.batch.clone()?;
            (b.batch_id == batch).then_some((b.custom_id, e))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provider_batch_is_submitted_polled_and_read_with_exact_usage() {
    let sim = sim().await;
    for (kind, format, model) in MODEL {
        let c = client(&sim, kind);
        let tag = format!("syb-test-{format:?}");
        let id = submit(&c, model, &tag, 10).await;
        let s = until_ended(&c, &id).await;
        assert_eq!(s.state, BatchState::Ended(BatchEnd::Completed), "{kind:?}");
        assert_eq!((s.counts.total, s.counts.succeeded), (10, 10), "{kind:?}");
        let got = outcomes(&c, &s).await;
        let ledger = ledger_of(&sim, &id);
        assert_eq!(got.len(), 10, "{kind:?}");
        assert_eq!(ledger.len(), 10, "{kind:?}");
        for (custom_id, o) in &got {
            let ItemOutcome::Answered(r) = o else {
                panic!("{kind:?} {custom_id}: {o:?}")
            };
            let e = &ledger[custom_id];
            assert_eq!(e.format, format);
            assert_eq!(r.usage.input_tokens, e.prompt_tokens, "{kind:?}");
            assert_eq!(r.usage.output_tokens, e.completion_tokens, "{kind:?}");
            assert_eq!(r.usage.cached_input_tokens, e.cached_tokens, "{kind:?}");
            assert!(!r.text.is_empty());
        }
        // Found again by its tag (OpenAI, Gemini) or its size (Anthropic).
        let recent = c.recent(50).await.unwrap();
        let mine = recent.iter().find(|b| b.id == id).expect("listed");
        assert_eq!(mine.total, 10, "{kind:?}");
        if kind != Kind::Anthropic {
            assert_eq!(mine.tag.as_deref(), Some(tag.as_str()), "{kind:?}");
        }
    }
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_cancelled_batches_account_for_every_item() {
    let sim = sim().await;
    for (kind, format, model) in MODEL {
        let c = client(&sim, kind);
        sim.force_batch(format, BatchFate::Expire);
        let id = submit(&c, model, "expiring", 8).await;
        let s = until_ended(&c, &id).await;
        assert_eq!(s.state, BatchState::Ended(BatchEnd::Expired), "{kind:?}");
        let got = outcomes(&c, &s).await;
        let answered = got
            .values()
            .filter(|o| matches!(o, ItemOutcome::Answered(_)))
            .count();
        let expired = got
            .values()
            .filter(|o| matches!(o, ItemOutcome::Expired))
            .count();
        if kind == Kind::Gemini {
            // An expired Gemini batch delivers nothing, and bills nothing.
            assert!(got.is_empty());
        } else {
            assert_eq!((answered, expired), (4, 4), "{kind:?}");
        }
        assert_eq!(
            ledger_of(&sim, &id).len(),
            answered,
            "{kind:?}: billed = answered"
        );

        let id = submit(&c, model, "cancelled", 8).await;
        c.cancel(&id).await.unwrap();
        let s = until_ended(&c, &id).await;
        assert_eq!(s.state, BatchState::Ended(BatchEnd::Cancelled), "{kind:?}");
        let got = outcomes(&c, &s).await;
        let answered = got
            .values()
            .filter(|o| matches!(o, ItemOutcome::Answered(_)))
            .count();
        if kind != Kind::Gemini {
            assert_eq!(got.len(), 8, "{kind:?}: every item has a line");
        }
        assert_eq!(ledger_of(&sim, &id).len(), answered, "{kind:?}");
    }
    // A batch the provider refuses as a whole: OpenAI validation.
    let c = client(&sim, Kind::OpenAi);
    let mut reqs = requests("gpt-4o-mini", 2);
    reqs[1].1.model = "gpt-4o".into();
    let items: Vec<BatchItem<'_>> = reqs
        .iter()
        .map(|(id, r)| BatchItem {
            custom_id: id,
            request: r,
        })
        .collect();
    let id = c.submit("gpt-4o-mini", "mixed", &items).await.unwrap();
    let s = until_ended(&c, &id).await;
    let BatchState::Ended(BatchEnd::Failed(why)) = &s.state else {
        panic!("{s:?}")
    };
    assert!(why.contains("one model"), "{why}");
    sim.stop();
}

#[test]
fn the_key_only_goes_to_the_providers_own_origin() {
    let http = HttpClient::new(
        "p",
        "https://api.example.com",
        None,
        Duration::from_secs(1),
        None,
    )
    .unwrap();
    assert!(http.same_origin("https://api.example.com/v1/messages/batches/x/results"));
    assert!(!http.same_origin("https://evil.example.net/v1/messages/batches/x/results"));
    assert!(!http.same_origin("http://api.example.com/v1/x"));
    assert!(!http.same_origin("not a url"));
}
