//! `switchyard demo`: the simulator plays every provider of the config, a
//! worker runs in-process, sample jobs over every category are published,
//! and once all are terminal the cost report of this run is printed.
//!
//! The demo never touches work it did not publish: it runs on a subject
//! prefix of its own (`demo_<run>`, whose streams it deletes at the end), so
//! its worker cannot take jobs waiting on a real deployment's prefix, and
//! the CLI gives it a database of its own ([`DEMO_DATABASE`]) unless
//! `DATABASE_URL` names one.

use rust_decimal::prelude::ToPrimitive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use sqlx::PgPool;

use crate::bus::Bus;
use crate::config::{Config, ProviderKind, AUTO_CATEGORY};
use crate::enqueue::{progress_bar, publish_jobs, wait_finished, Outgoing};
use crate::envelope::JobEnvelope;
use crate::ops::report::{self, Format, Report};
use crate::pipeline::worker::{self, WorkerOptions};
use crate::sim::{SimProfile, SimServer};

const PROMPTS: &[(&str, &[&str])] = &[
    (
        "support",
        &[
            "My order #{n} arrived damaged. What can I do?",
            "I was charged twice for invoice {n}; please help.",
            "How do I reset my password? Ticket {n}.",
            "The app crashes when I upload photo {n}.",
        ],
    ),
    (
        "sales",
        &[
            "Write a two-line pitch for our ergonomic chair, variant {n}.",
            "Draft a follow-up email to lead {n} who asked about pricing.",
            "Give three taglines for the spring sale, batch {n}.",
        ],
    ),
    (
        "lookup",
        &[
            "What is the capital of country number {n} in our list?",
            "Convert {n} kilometres to miles.",
            "When does store {n} open on Sundays?",
        ],
    ),
    (
        "overnight",
        &[
            "Write a product description for catalogue item {n}, a linen shirt.",
            "Describe garden tool {n} for the spring catalogue in three sentences.",
            "Write the back-cover blurb for book {n} in our autumn list.",
        ],
    ),
];

/// Prompts for jobs published to `auto` that no classifier rule matches.
const UNMATCHED: &[&str] = &[
    "Could you help me with request {n}?",
    "I have a question about account {n}.",
    "Please get back to me about ticket {n}.",
];

/// Sample jobs, spread round-robin over the config's categories; with a
/// classifier configured, every seventh job is published as `auto` instead.
pub fn sample_jobs(cfg: &Config, run_id: &str, n: usize) -> Result<Vec<Outgoing>> {
    sample_jobs_with(cfg, run_id, n, false)
}

/// [`sample_jobs`]; with `deadlines`, jobs of categories that may batch
/// (`delivery` `batch` or `auto`) carry a deadline: 12 hours away, or 30
/// minutes for every tenth (too close for a batch).
pub fn sample_jobs_with(
    cfg: &Config,
    run_id: &str,
    n: usize,
    deadlines: bool,
) -> Result<Vec<Outgoing>> {
    let deadline = |i: usize| {
        let ahead = if i.is_multiple_of(10) {
            1800
        } else {
            12 * 3600
        };
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(ahead))
            .to_string()
    };
    let cats: Vec<&String> = cfg.categories.keys().collect();
    let auto = cfg.classifier.is_some();
    (0..n)
        .map(|i| {
            if auto && i % 7 == 6 {
                let t = if i % 2 == 0 {
                    UNMATCHED[(i / 7) % UNMATCHED.len()].to_string()
                } else {
                    let cat = cats[(i / 7) % cats.len()];
                    PROMPTS
                        .iter()
                        .find(|(c, _)| c == cat)
                        .map_or("Please answer request {n}.", |(_, t)| t[(i / 7) % t.len()])
                        .to_string()
                };
                let mut env = JobEnvelope::prompt(
                    format!("{run_id}-{i:06}"),
                    AUTO_CATEGORY,
                    t.replace("{n}", &i.to_string()),
                );
                env.category = None;
                env.metadata.insert("run".into(), run_id.to_string());
                let payload = serde_json::to_vec(&env)?;
                return Ok(Outgoing {
                    category: AUTO_CATEGORY.into(),
                    id: format!("{run_id}-{i:06}"),
                    payload,
                });
            }
            let cat = cats[i % cats.len()];
            let templates = PROMPTS
                .iter()
                .find(|(c, _)| c == cat)
                .map(|(_, t)| *t)
                .unwrap_or(&["Please answer request {n} for this category."]);
            let prompt =
                templates[(i / cats.len()) % templates.len()].replace("{n}", &i.to_string());
            let mut env = JobEnvelope::prompt(format!("{run_id}-{i:06}"), cat.clone(), prompt);
            env.metadata.insert("run".into(), run_id.to_string());
            let batches = cfg
                .categories
                .get(cat.as_str())
                .is_some_and(|c| c.delivery != crate::config::Delivery::Realtime);
            if deadlines && batches {
                env.deadline = Some(deadline(i / cats.len()));
            }
            Outgoing::from_envelope(&env)
        })
        .collect()
}

/// Point every provider at the simulator, with no key and the HTTP adapter.
pub fn on_simulator(cfg: &mut Config, base_url: &str) {
    for p in cfg.providers.values_mut() {
        p.base_url = base_url.to_string();
        p.api_key_env = None;
        if p.kind == ProviderKind::Inproc {
            p.kind = ProviderKind::OpenaiCompatible;
        }
    }
}

/// The database the demo uses when `DATABASE_URL` is left at its default.
pub const DEMO_DATABASE: &str = "switchyard_demo";

pub struct DemoOutcome {
    pub report: Report,
    pub elapsed: Duration,
    pub finished: bool,
}

pub async fn run(
    mut cfg: Config,
    pool: PgPool,
    nats_url: &str,
    jobs: usize,
    profile: SimProfile,
    timeout: Duration,
) -> Result<DemoOutcome> {
    let run_id = format!("demo-{}", &crate::ids::new_job_id()[..8]);
    cfg.nats.prefix = run_id.replace('-', "_");
    let bus = Bus::connect_configured(nats_url, &cfg.nats).await?;
    let sim = SimServer::start("127.0.0.1:0", profile).await?;
    on_simulator(&mut cfg, &sim.base_url());
    let cfg = Arc::new(cfg);
    eprintln!(
        "simulator on {}; {} jobs over categories {:?}",
        sim.base_url(),
        jobs,
        cfg.categories.keys().collect::<Vec<_>>()
    );
    let handle = worker::start(
        cfg.clone(),
        pool.clone(),
        bus.clone(),
        WorkerOptions::default(),
    )
    .await?;
    let outgoing = sample_jobs_with(&cfg, &run_id, jobs, true)?;
    let ids: Vec<String> = outgoing.iter().map(|j| j.id.clone()).collect();
    let started = Instant::now();
    let pb = progress_bar(jobs as u64, "published");
    publish_jobs(&bus, &outgoing, Some(&pb)).await?;
    pb.finish();
    let pb = progress_bar(jobs as u64, "finished");
    let finished = wait_finished(&pool, &ids, timeout, Some(&pb)).await?;
    pb.finish();
    let elapsed = started.elapsed();
    handle.shutdown().await;
    sim.stop();
    bus.delete_streams().await;
    let filter = report::Filter {
        job_prefix: Some(run_id),
        ..Default::default()
    };
    let report = report::build(&pool, &filter, &cfg, None).await?;
    Ok(DemoOutcome {
        report,
        elapsed,
        finished,
    })
}

/// Print the outcome; returns whether the run met the demo's bar (all jobs
/// terminal, at least 95% succeeded).
pub fn print(outcome: &DemoOutcome, jobs: usize) -> bool {
    println!("{}", outcome.report.render(Format::Table));
    let ok = outcome.report.jobs_with_status("succeeded");
    let pct = 100.0 * ok as f64 / jobs.max(1) as f64;
    println!(
        "{ok} of {jobs} jobs succeeded ({pct:.1}%) in {:.1}s; total cost ${}",
        outcome.elapsed.as_secs_f64(),
        outcome.report.total.cost_usd.round_dp(6)
    );
    if let Some(line) = summary(&outcome.report) {
        println!("{line}");
    }
    if !outcome.finished {
        eprintln!("demo timed out before every job was terminal");
    }
    outcome.finished && pct >= 95.0
}

/// The savings in one sentence, both ways: against the baseline, and
/// against the cheapest single model.
fn summary(r: &report::Report) -> Option<String> {
    let model = r.baseline_model.as_deref()?;
    let (base, saved) = (r.baseline_cost_usd?, r.savings_usd?);
    let actual = r.actual_cost_usd?;
    let pct = if base.is_zero() {
        0.0
    } else {
        (saved / base).to_f64().unwrap_or(0.0) * 100.0
    };
    let mut line = format!(
        "The routes spent ${} on the {} answered jobs; one {model} call per job would have cost ${} ({} {:.1}%).",
        actual.round_dp(6),
        r.savings_total.jobs,
        base.round_dp(6),
        if saved >= rust_decimal::Decimal::ZERO {
            "saved"
        } else {
            "routing cost more by"
        },
        pct.abs()
    );
    if let Some(cheapest) = r.what_if.iter().find(|w| w.category == "total") {
        line.push_str(&format!(
            " The cheapest model alone, {}, would have cost ${}: what routing buys beyond that is quality (see the overhead and what-if tables).",
            cheapest.model,
            cheapest.cost_usd.round_dp(6)
        ));
    }
    Some(line)
}
