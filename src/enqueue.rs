//! Producing jobs: the Rust client API (`publish_jobs`), `switchyard enqueue
//! FILE.jsonl`, and waiting until jobs are terminal.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;

use crate::bus::Bus;
use crate::envelope::JobEnvelope;
use crate::store;

/// A job ready to publish: subject category, id and the exact bytes.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub category: String,
    pub id: String,
    pub payload: Vec<u8>,
}

impl Outgoing {
    /// Serialise an envelope; its id and category must be set.
    pub fn from_envelope(env: &JobEnvelope) -> Result<Self> {
        let id = env.id.clone().context("envelope has no id")?;
        let category = env.category.clone().context("envelope has no category")?;
        Ok(Self {
            category,
            id,
            payload: serde_json::to_vec(env)?,
        })
    }
}

pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len}  elapsed {elapsed}, eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Publish jobs to `<prefix>.jobs.<category>` with `Nats-Msg-Id` = job id,
/// up to 512 awaiting their JetStream ack at once. Returns how many were new
/// (not de-duplicated by JetStream).
pub async fn publish_jobs(
    bus: &Bus,
    jobs: &[Outgoing],
    progress: Option<&ProgressBar>,
) -> Result<usize> {
    let mut pending = FuturesUnordered::new();
    let mut fresh = 0;
    for job in jobs {
        if pending.len() >= 512 {
            if let Some(r) = pending.next().await {
                fresh += usize::from(r?);
            }
        }
        let subject = bus.names.job_subject(&job.category);
        pending.push(async move {
            let r = bus
                .publish_durable(subject, &job.id, job.payload.clone().into())
                .await;
            if let Some(pb) = progress {
                pb.inc(1);
            }
            r
        });
    }
    while let Some(r) = pending.next().await {
        fresh += usize::from(r?);
    }
    Ok(fresh)
}

/// Read a JSONL file of envelopes. Lines without an id get a random one; the
/// subject category is `--category` when given, else the line's `category`.
/// Returns the jobs and the errors of lines that cannot be published.
pub fn read_jsonl(path: &Path, category: Option<&str>) -> Result<(Vec<Outgoing>, Vec<String>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let mut value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("line {n}: not JSON: {e}"));
                continue;
            }
        };
        let Some(obj) = value.as_object_mut() else {
            errors.push(format!("line {n}: not a JSON object"));
            continue;
        };
        let id = match obj.get("id") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => {
                errors.push(format!("line {n}: `id` must be a string"));
                continue;
            }
            None => {
                let id = crate::ids::new_job_id();
                obj.insert("id".into(), id.clone().into());
                id
            }
        };
        let cat = match (category, obj.get("category").and_then(|c| c.as_str())) {
            (Some(c), _) => c.to_string(),
            (None, Some(c)) => c.to_string(),
            (None, None) => {
                errors.push(format!("line {n}: no `category` and no --category given"));
                continue;
            }
        };
        if cat.is_empty() || cat.contains(['.', '*', '>', ' ']) {
            errors.push(format!(
                "line {n}: category `{cat}` is not a valid subject token"
            ));
            continue;
        }
        jobs.push(Outgoing {
            category: cat,
            id,
            payload: serde_json::to_vec(&value)?,
        });
    }
    Ok((jobs, errors))
}

/// Jobs to wait for.
#[derive(Debug, Clone, Copy)]
pub enum Jobs<'a> {
    /// These ids (duplicates count once).
    Ids(&'a [String]),
    /// `count` jobs whose ids start with this prefix.
    Prefix(&'a str, usize),
}

/// Wait until every job of `ids` is terminal (or dead-lettered without a
/// jobs row); false on timeout.
pub async fn wait_finished(
    pool: &PgPool,
    ids: &[String],
    timeout: Duration,
    progress: Option<&ProgressBar>,
) -> Result<bool> {
    wait_jobs(
        pool,
        Jobs::Ids(ids),
        timeout,
        Duration::from_millis(200),
        progress,
    )
    .await
}

/// The one poll-until-terminal loop: look every `poll` until every job of
/// `jobs` is finished; false on timeout. The bench looks often, to time
/// the end of a run closely.
pub async fn wait_jobs(
    pool: &PgPool,
    jobs: Jobs<'_>,
    timeout: Duration,
    poll: Duration,
    progress: Option<&ProgressBar>,
) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Each id counts once.
    let mut unique: Vec<String> = match jobs {
        Jobs::Ids(ids) => ids.to_vec(),
        Jobs::Prefix(..) => Vec::new(),
    };
    unique.sort();
    unique.dedup();
    let want = match jobs {
        Jobs::Ids(_) => unique.len(),
        Jobs::Prefix(_, n) => n,
    };
    loop {
        let done = match jobs {
            Jobs::Ids(_) => store::count_finished(pool, &unique).await?,
            Jobs::Prefix(prefix, _) => store::count_finished_prefix(pool, prefix).await?,
        };
        if let Some(pb) = progress {
            pb.set_position(done as u64);
        }
        if done as usize >= want {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(poll).await;
    }
}
