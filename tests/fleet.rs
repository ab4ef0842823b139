//! Fleet-wide limits against the real NATS: several independent connections
//! (as several worker processes would have) share one provider's budgets,
//! in-flight slots, pauses and learned limits through KV compare-and-set;
//! worker processes share a provider's limit with zero 429s, converge to a
//! lower limit the provider enforces, and take over a killed process's share.
// Tests spawn helper tasks freely; the rule is for runtime code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{spawn_worker, wait_until, TestEnv};
use switchyard::bus::Bus;
use switchyard::limits::fleet::{
    open_store, Correction, Doc, Limits, Need, ScopeLimits, Seen, SharedLimiter, LEASE_MS,
    REQUESTS, TOKENS,
};
use switchyard::pipeline::worker::{self, WorkerOptions};
use switchyard::sim::SimProfile;

/// `n` limiters of provider `openai` in KV under `prefix`, each on its own
/// NATS connection.
async fn limiters(prefix: &str, n: usize, lims: &ScopeLimits) -> Vec<SharedLimiter> {
    let mut out = Vec::new();
    for _ in 0..n {
        let client = async_nats::connect(common::nats_url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let store = open_store(&js, prefix).await.unwrap();
        out.push(SharedLimiter::fleet(
            "openai",
            store,
            lims.clone(),
            &switchyard::tasks::Tasks::new(),
        ));
    }
    out
}

async fn drop_kv(prefix: &str) {
    let client = async_nats::connect(common::nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let _ = js
        .delete_stream(format!("KV_{}_LIMITS", prefix.to_ascii_uppercase()))
        .await;
}

fn unique(tag: &str) -> String {
    format!("sy_{tag}_{}", &switchyard::ids::new_job_id()[..10])
}

fn limits(rpm: u32, tpm: u32, concurrency: Option<u32>) -> ScopeLimits {
    let mut per_min = BTreeMap::new();
    per_min.insert(REQUESTS, rpm);
    per_min.insert(TOKENS, tpm);
    ScopeLimits::new(
        Limits {
            per_min: per_min.clone(),
            concurrency,
            ..Limits::default()
        },
        Default::default(),
        per_min,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_processes_never_overdraw_shared_slots() {
    let prefix = unique("f");
    // 100 in-flight slots and budgets that do not bind.
    let lims = limits(10_000_000, 1_000_000_000, Some(100));
    let ls = limiters(&prefix, 3, &lims).await;
    let mut tasks = Vec::new();
    for l in ls.clone() {
        tasks.push(tokio::spawn(async move {
            let mut granted = 0;
            for _ in 0..60 {
                if l.try_admit("m", Need::default()).await.unwrap().is_ok() {
                    granted += 1;
                }
            }
            granted
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 100, "3 clients x 60 attempts on 100 slots");
    assert!(ls[1]
        .try_admit("m", Need::default())
        .await
        .unwrap()
        .is_err());
    // Two calls end: exactly two slots come back, to any process.
    ls[0].settle("m", Correction::default()).await;
    ls[0].settle("m", Correction::default()).await;
    assert!(ls[2].try_admit("m", Need::default()).await.unwrap().is_ok());
    assert!(ls[1].try_admit("m", Need::default()).await.unwrap().is_ok());
    assert!(ls[1]
        .try_admit("m", Need::default())
        .await
        .unwrap()
        .is_err());
    drop_kv(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_process_learns_holds_for_all() {
    // A pause the provider asked one process for holds the other.
    let prefix = unique("p");
    let ls = limiters(&prefix, 2, &limits(600, 1_000_000, None)).await;
    ls[0]
        .observe(
            "gpt-4o",
            Seen {
                pause: Some(Duration::from_secs(5)),
                ..Default::default()
            },
        )
        .await;
    let wait = ls[1]
        .try_admit("gpt-4o", Need::default())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        wait > Duration::from_secs(4) && wait <= Duration::from_secs(5),
        "{wait:?}"
    );
    drop_kv(&prefix).await;

    // A limit the provider states below the configured one binds everyone.
    let prefix = unique("l");
    let ls = limiters(&prefix, 2, &limits(600, 1_000_000, None)).await;
    ls[0]
        .observe(
            "gpt-4o",
            Seen {
                limits: vec![("requests".into(), 60)],
                ..Default::default()
            },
        )
        .await;
    let doc = ls[1].snapshot().await.unwrap();
    let learned = doc.models["gpt-4o"].learned["requests"];
    assert_eq!((learned.per_min, learned.from_header), (60.0, true));
    // 60 a minute: one now, the next a second later (not 10 a second).
    assert!(ls[1]
        .try_admit("gpt-4o", Need::default())
        .await
        .unwrap()
        .is_ok());
    let wait = ls[0]
        .try_admit("gpt-4o", Need::default())
        .await
        .unwrap()
        .unwrap_err();
    assert!(wait > Duration::from_millis(800), "{wait:?}");
    // Another model of the provider keeps the configured rate: the
    // provider's 600 a minute hold 5 at once, one of which gpt-4o took.
    for _ in 0..4 {
        assert!(ls[0]
            .try_admit("gpt-4.1", Need::default())
            .await
            .unwrap()
            .is_ok());
    }
    assert!(ls[0]
        .try_admit("gpt-4.1", Need::default())
        .await
        .unwrap()
        .is_err());
    drop_kv(&prefix).await;

    // A 429 that no stated limit explains cuts the rate once per burst.
    let prefix = unique("b");
    let ls = limiters(&prefix, 2, &limits(600, 1_000_000, None)).await;
    for l in &ls {
        l.observe(
            "m",
            Seen {
                rate_limited: true,
                ..Default::default()
            },
        )
        .await;
    }
    let doc = ls[0].snapshot().await.unwrap();
    let learned = doc.models["m"].learned["requests"];
    assert_eq!(
        (learned.per_min, learned.from_header),
        (600.0 * switchyard::limits::fleet::BACKOFF, false)
    );
    drop_kv(&prefix).await;
}

/// Config overrides: every category to `gpt-4o-mini` on `openai`, with
/// these limits, fleet-wide.
fn one_model(rpm: &str, concurrency: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    for c in ["SUPPORT", "SALES", "LOOKUP"] {
        v.push((
            format!("SWITCHYARD_CATEGORIES__{c}__ROUTE"),
            r#"{ kind = "single", target = "gpt-4o-mini" }"#.into(),
        ));
    }
    v.push((
        "SWITCHYARD_CATEGORIES__SUPPORT__VARIANT__PERCENT".into(),
        "0".into(),
    ));
    for (k, val) in [
        ("RPM", rpm),
        ("FLEET", "true"),
        ("MAX_CONCURRENCY", concurrency),
    ] {
        v.push((format!("SWITCHYARD_PROVIDERS__OPENAI__{k}"), val.into()));
    }
    v.push(("SWITCHYARD_RETRY__MAX_ATTEMPTS".into(), "20".into()));
    v
}

/// Three workers, each with its own NATS connection, run `n` jobs; returns
/// the simulator's ledger.
async fn three_workers(
    env: &TestEnv,
    overrides: &[(String, String)],
    n: usize,
) -> Vec<switchyard::sim::LedgerEntry> {
    let pairs: Vec<(&str, &str)> = overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    three_workers_with(env, env.config_with(&pairs), n).await
}

async fn three_workers_with(
    env: &TestEnv,
    cfg: switchyard::config::Config,
    n: usize,
) -> Vec<switchyard::sim::LedgerEntry> {
    let cfg = Arc::new(cfg);
    let mut workers = Vec::new();
    for _ in 0..3 {
        let bus = Bus::connect(&common::nats_url(), &env.name).await.unwrap();
        workers.push(
            worker::start(cfg.clone(), env.pool.clone(), bus, WorkerOptions::default())
                .await
                .unwrap(),
        );
    }
    let js = common::jobs("fleet", n);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    switchyard::enqueue::publish_jobs(&env.bus, &js, None)
        .await
        .unwrap();
    let done = switchyard::enqueue::wait_finished(&env.pool, &ids, Duration::from_secs(90), None)
        .await
        .unwrap();
    for w in workers {
        w.shutdown().await;
    }
    assert!(
        done,
        "jobs did not finish; ledger: {:?}",
        env.sim.ledger().len()
    );
    let succeeded = env
        .count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
        .await as usize;
    assert_eq!(succeeded, n);
    env.sim.ledger()
}

fn count_429(ledger: &[switchyard::sim::LedgerEntry]) -> usize {
    ledger.iter().filter(|e| e.status == 429).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_limits_hold_across_workers_where_per_process_limits_do_not() {
    // The provider allows 2 requests a second per model and sends no headers.
    let profile = SimProfile {
        rpm: 120,
        rate_headers: false,
        ..Default::default()
    };
    // Per process, each of the three workers thinks it may send 120 a minute:
    // together they overrun the provider.
    let env = TestEnv::new(profile.clone()).await;
    let mut per_process = one_model("120", "4");
    for (k, v) in per_process.iter_mut() {
        if k.ends_with("__FLEET") {
            *v = "false".into();
        }
    }
    let ledger = three_workers(&env, &per_process, 18).await;
    let times: Vec<(u64, u16)> = ledger.iter().map(|e| (e.at_ms, e.status)).collect();
    assert!(
        count_429(&ledger) > 0,
        "per-process limits collected no 429s: {times:?}"
    );
    env.cleanup().await;
    // Fleet-wide, the three share one budget: no 429 at all.
    let env = TestEnv::new(profile).await;
    let ledger = three_workers(&env, &one_model("120", "4"), 18).await;
    let times: Vec<(u64, u16)> = ledger.iter().map(|e| (e.at_ms, e.status)).collect();
    assert_eq!(
        count_429(&ledger),
        0,
        "fleet-wide limits still collected 429s: {times:?}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_converge_to_a_lower_limit_the_provider_enforces() {
    // Configured for 3000 a minute; the provider allows 300 (5 a second).
    // With its headers, the first answers state the real limit.
    let env = TestEnv::new(SimProfile {
        rpm: 300,
        ..Default::default()
    })
    .await;
    let ledger = three_workers(&env, &one_model("3000", "4"), 60).await;
    let with_headers = count_429(&ledger);
    env.cleanup().await;
    // Without headers, only the 429s tell: the rate backs off.
    let env = TestEnv::new(SimProfile {
        rpm: 300,
        rate_headers: false,
        ..Default::default()
    })
    .await;
    let ledger = three_workers(&env, &one_model("3000", "4"), 60).await;
    let without_headers = count_429(&ledger);
    env.cleanup().await;
    eprintln!("429s converging to 300 RPM from 3000: {with_headers} with headers, {without_headers} without");
    assert!(with_headers <= 4, "{with_headers} 429s with headers");
    assert!(
        without_headers <= 15,
        "{without_headers} 429s without headers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_gives_its_share_back_when_its_lease_expires() {
    // Three worker processes share 3 in-flight slots to a slow provider
    // that also enforces 600 RPM; one is killed with SIGKILL mid-run.
    let env = TestEnv::new(SimProfile {
        latency_ms: 600,
        rpm: 600,
        ..Default::default()
    })
    .await;
    let mut child_env = env.child_env();
    child_env.extend(one_model("600", "3"));
    child_env.push(("SWITCHYARD_NATS__ACK_WAIT_SECS".into(), "20".into()));
    env.bus.ensure_streams(&env.config()).await.unwrap();
    let mut workers: Vec<_> = (0..3).map(|_| spawn_worker(&child_env)).collect();
    let n = 150;
    let js = common::jobs("kill", n);
    let ids: Vec<String> = js.iter().map(|j| j.id.clone()).collect();
    switchyard::enqueue::publish_jobs(&env.bus, &js, None)
        .await
        .unwrap();
    // Kill a worker while it holds in-flight slots in the shared state.
    let client = async_nats::connect(common::nats_url()).await.unwrap();
    let store = open_store(&async_nats::jetstream::new(client), &env.name)
        .await
        .unwrap();
    let victim = format!("{}-", workers[0].0.id());
    let dead_slots = || async {
        let doc: Doc = match store.entry("openai").await.unwrap() {
            Some(e) => serde_json::from_slice(&e.value).unwrap(),
            None => Doc::default(),
        };
        doc.provider
            .leases
            .iter()
            .filter(|(h, _)| h.starts_with(&victim))
            .map(|(_, l)| l.n)
            .sum::<u32>()
    };
    wait_until(
        Duration::from_secs(30),
        "the victim holds a slot",
        || async { env.sim.ledger().len() >= 10 && dead_slots().await > 0 },
    )
    .await;
    workers[0].0.kill().unwrap();
    let killed_at = env.sim.now_ms();
    let _ = workers[0].0.wait();
    let held = dead_slots().await;
    // Its slots stay taken (fail closed) until its lease expires.
    wait_until(
        Duration::from_millis(LEASE_MS as u64 + 5_000),
        "the dead process's lease expires",
        || async { dead_slots().await == 0 },
    )
    .await;
    let freed_at = env.sim.now_ms();
    let done = switchyard::enqueue::wait_finished(&env.pool, &ids, Duration::from_secs(120), None)
        .await
        .unwrap();
    let ledger = env.sim.ledger();
    drop(workers);
    assert!(done, "jobs did not finish after a worker was killed");
    assert_eq!(count_429(&ledger), 0, "429s with a process killed");
    let peak = |from: u64, to: u64| {
        ledger
            .iter()
            .filter(|e| e.at_ms >= from && e.at_ms < to)
            .map(|e| e.in_flight)
            .max()
            .unwrap_or(0)
    };
    let overall = peak(0, u64::MAX);
    // (We notice the expiry a poll later than the survivors do.)
    let during = peak(killed_at + 1_000, freed_at - 1_000);
    let after = peak(freed_at + 1_000, u64::MAX);
    eprintln!(
        "killed holding {held} slot(s); lease gone {:.1}s after the kill; in flight: peak {overall}, \
         while the lease lived {during}, after it expired {after}",
        (freed_at - killed_at) as f64 / 1000.0
    );
    assert!(overall <= 3, "{overall} requests in flight, limit 3");
    assert!(held > 0);
    assert!(
        during <= 3 - u64::from(held),
        "the dead process's slots were reused before its lease expired"
    );
    // (Seen through polling KV on a loaded machine: allow a few seconds.)
    assert!(
        freed_at - killed_at <= LEASE_MS as u64 + 4_000,
        "the lease outlived its expiry: gone {} ms after the kill",
        freed_at - killed_at
    );
    assert_eq!(after, 3, "survivors did not take the share over");
    let results = env.count("SELECT count(*) FROM results").await as usize;
    assert_eq!(results, n, "one result per job");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_limiter_holds_calls_back_until_it_returns() {
    let prefix = unique("u");
    let ls = limiters(&prefix, 1, &limits(600, 1_000_000, None)).await;
    // The limits bucket disappears (as when its stream is lost).
    drop_kv(&prefix).await;
    assert!(
        ls[0].try_admit("m", Need::default()).await.is_err(),
        "an unreachable limiter is an error, never an admission"
    );
    let l = ls[0].clone();
    let admit = tokio::spawn(async move { l.admit("m", Need::default()).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!admit.is_finished(), "admitted without its limiter");
    // It comes back: the waiting call goes on.
    let client = async_nats::connect(common::nats_url()).await.unwrap();
    open_store(&async_nats::jetstream::new(client), &prefix)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), admit)
        .await
        .expect("admitted once the limiter is back")
        .unwrap();
    drop_kv(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_own_limit_holds_across_workers() {
    // The provider allows 120 requests a minute per model and says nothing
    // else; the account's provider-wide limit (5000) would let bursts through.
    let env = TestEnv::new(SimProfile {
        rpm: 120,
        rate_headers: false,
        ..Default::default()
    })
    .await;
    let text = common::SHIPPED_CONFIG
        .replace(
            "[models.\"gpt-4o-mini\"]\n",
            "[models.\"gpt-4o-mini\"]\nrpm = 120\n",
        )
        .replace(
            "[models.\"gpt-4.1\"]\n",
            "[models.\"gpt-4.1\"]\nrpm = 120\n",
        );
    let mut cfg = env.config_from(&text);
    for (cat, model) in [
        ("support", "gpt-4o-mini"),
        ("sales", "gpt-4.1"),
        ("lookup", "gpt-4o-mini"),
    ] {
        let c = cfg.categories.get_mut(cat).unwrap();
        c.route = switchyard::config::RouteConfig::Single {
            target: model.into(),
        };
        c.variant = None;
    }
    cfg.retry.max_attempts = 20;
    let ledger = three_workers_with(&env, cfg, 24).await;
    let models: std::collections::BTreeSet<&str> =
        ledger.iter().map(|e| e.model.as_str()).collect();
    assert_eq!(models.len(), 2, "{models:?}");
    assert_eq!(count_429(&ledger), 0, "the models' own limits did not hold");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_without_budget_leaves_its_messages_in_nats() {
    // One request a minute: the first call goes, the rest must wait.
    let env = TestEnv::new(SimProfile::default()).await;
    let worker = env
        .start_worker(env.config_with(&[
            (
                "SWITCHYARD_CATEGORIES__SUPPORT__ROUTE",
                r#"{ kind = "single", target = "gpt-4o-mini" }"#,
            ),
            ("SWITCHYARD_CATEGORIES__SUPPORT__VARIANT__PERCENT", "0"),
            ("SWITCHYARD_PROVIDERS__OPENAI__RPM", "1"),
        ]))
        .await;
    let js: Vec<_> = common::jobs("bp", 90)
        .into_iter()
        .step_by(3) // the support jobs
        .collect();
    switchyard::enqueue::publish_jobs(&env.bus, &js, None)
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "the first call", || async {
        env.sim.ledger().len() == 1
    })
    .await;
    // Every job but the answered one is still in NATS: its call in the calls
    // stream, or (a direct call waiting in the lane for the budget) its job
    // message unacked in the jobs stream.
    let calls_stream = env.bus.names.calls_stream();
    let jobs_stream = env.bus.names.jobs_stream();
    wait_until(Duration::from_secs(30), "every call published", || async {
        let calls = env.stream_state(&calls_stream).await.messages;
        let jobs = env.stream_state(&jobs_stream).await.messages;
        calls >= 28 && calls + jobs >= 29
    })
    .await;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = env
        .bus
        .js
        .get_stream(&calls_stream)
        .await
        .unwrap()
        .get_consumer(&env.bus.names.lane_consumer("openai"))
        .await
        .unwrap();
    let i = consumer.info().await.unwrap();
    assert!(
        i.num_ack_pending <= 6,
        "the lane holds {} messages it has no budget for",
        i.num_ack_pending
    );
    assert!(i.num_pending >= 24, "{} left in NATS", i.num_pending);
    assert_eq!(env.sim.ledger().len(), 1, "nothing sent over the limit");
    worker.token().cancel();
    worker.shutdown().await;
    env.cleanup().await;
}

/// An unreadable limits document, or one in a newer format than this
/// worker knows, holds calls back: it is never replaced by a fresh one
/// (full buckets, no leases, no pause). Once it is readable, calls go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_or_newer_limits_document_fails_closed() {
    let prefix = unique("c");
    let ls = limiters(&prefix, 1, &limits(600, 1_000_000, None)).await;
    let client = async_nats::connect(common::nats_url()).await.unwrap();
    let store = open_store(&async_nats::jetstream::new(client), &prefix)
        .await
        .unwrap();
    let newer = format!(
        r#"{{"format":{},"provider":{{}}}}"#,
        switchyard::limits::fleet::DOC_FORMAT + 1
    );
    for stored in [b"{not json".to_vec(), newer.into_bytes()] {
        store.put("openai", stored.clone().into()).await.unwrap();
        assert!(
            ls[0].try_admit("m", Need::default()).await.is_err(),
            "admitted against a document it cannot read: {}",
            String::from_utf8_lossy(&stored)
        );
        let now = store.get("openai").await.unwrap().unwrap();
        assert_eq!(now.to_vec(), stored, "the document was overwritten");
    }
    // Repaired (here: removed), the limiter admits again and writes its format.
    store.purge("openai").await.unwrap();
    assert!(ls[0].try_admit("m", Need::default()).await.unwrap().is_ok());
    let doc = store.get("openai").await.unwrap().unwrap();
    let doc: Doc = serde_json::from_slice(&doc).unwrap();
    assert_eq!(doc.format, switchyard::limits::fleet::DOC_FORMAT);
    drop_kv(&prefix).await;
}
