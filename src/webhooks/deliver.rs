//! The deliverer: a background task of `switchyard worker` that claims due
//! attempts from `webhook_deliveries`, POSTs each signed payload, and
//! records what happened (and the next attempt, after a backoff).
//!
//! It runs beside the pipeline, never in it: jobs end (and their messages
//! are acked) without waiting for any receiver; a slow receiver holds at
//! most `webhooks.concurrency` of this process's delivery slots for at most
//! `webhooks.timeout_secs` each. Retries live in Postgres (the next
//! attempt's row and its `due_at`), not in NATS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn, Instrument};

use super::{backoff_ms, check_url, signature, Payload, DELIVERY_HEADER, SIGNATURE_HEADER};
use crate::config::Config;
use crate::store::webhooks::{self as store, DeliveryState, Due, Outcome};
use crate::tasks::Tasks;

/// How often an idle deliverer looks for due attempts.
const POLL: Duration = Duration::from_millis(500);
/// How long a claimed attempt stays this deliverer's beyond its timeout
/// (recording it included); then another deliverer may send it again.
const LEASE_MARGIN: Duration = Duration::from_secs(30);

struct Deliverer {
    cfg: Arc<Config>,
    pool: PgPool,
    http: reqwest::Client,
}

/// Start the deliverer on `tasks`; it ends when their token is cancelled
/// (an attempt under way finishes first, within the timeout).
pub fn spawn(cfg: Arc<Config>, pool: PgPool, tasks: &Tasks) -> Result<()> {
    crate::providers::http::install_tls_provider();
    let http = reqwest::Client::builder()
        .timeout(cfg.webhooks.timeout())
        // A receiver's redirect could point anywhere: off the allowlist.
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let d = Arc::new(Deliverer { cfg, pool, http });
    tasks.spawn(run(d, tasks.clone()));
    Ok(())
}

async fn run(d: Arc<Deliverer>, tasks: Tasks) {
    let token = tasks.token().clone();
    let slots = Arc::new(Semaphore::new(d.cfg.webhooks.concurrency));
    let lease = d.cfg.webhooks.timeout() + LEASE_MARGIN;
    let mut failing = false;
    loop {
        // Claim as many attempts as there are free slots (at least one).
        let first = tokio::select! {
            _ = token.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("never closed"),
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let claimed = match store::claim(&d.pool, permits.len() as i64, lease).await {
            Ok(due) => {
                failing = false;
                due
            }
            Err(e) => {
                if !failing {
                    warn!(error = %format!("{e:#}"), "cannot read due webhook deliveries");
                    failing = true;
                }
                Vec::new()
            }
        };
        let idle = claimed.len() < permits.len();
        for (due, permit) in claimed.into_iter().zip(permits.drain(..)) {
            let d = d.clone();
            let span = tracing::info_span!("webhook", job_id = %due.job_id, delivery = due.series,
                                           attempt = due.attempt);
            tasks.spawn(
                async move {
                    d.attempt(due).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
        drop(permits);
        if idle {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
    info!("webhook deliverer stopped");
}

impl Deliverer {
    /// Send one attempt and record it.
    async fn attempt(&self, due: Due) {
        let hooks = &self.cfg.webhooks;
        let outcome = match self.send(&due).await {
            Ok(o) => o,
            Err(e) => {
                // Not recorded: the lease runs out and it is sent again.
                warn!(error = %format!("{e:#}"), "webhook attempt not made; retried after its lease");
                return;
            }
        };
        let outcome = Outcome {
            retry_in: (outcome.state == DeliveryState::Failed
                && (due.attempt as u32) < hooks.max_attempts)
                .then(|| {
                    Duration::from_millis(backoff_ms(
                        due.attempt as u32,
                        hooks.base_delay_ms,
                        hooks.max_delay_ms,
                    ))
                }),
            ..outcome
        };
        crate::metrics::global().inc(
            "switchyard_webhook_deliveries_total",
            &[("outcome", outcome.state.as_str())],
            1.0,
        );
        match outcome.state {
            DeliveryState::Ok => debug!(status = ?outcome.http_status, "webhook delivered"),
            _ => info!(state = outcome.state.as_str(), status = ?outcome.http_status,
                       error = outcome.error.as_deref().unwrap_or(""),
                       retry_in_ms = outcome.retry_in.map(|d| d.as_millis() as u64),
                       "webhook attempt did not deliver"),
        }
        if let Err(e) = store::record(&self.pool, due.id, &outcome).await {
            warn!(error = %format!("{e:#}"), "recording a webhook attempt failed; it is sent again after its lease");
        }
    }

    /// The attempt's outcome (without `retry_in`); an error only when the
    /// job could not be read (the attempt is left to its lease).
    async fn send(&self, due: &Due) -> Result<Outcome> {
        let refused = |why: String| Outcome {
            state: DeliveryState::Refused,
            http_status: None,
            error: Some(why),
            latency_ms: None,
            retry_in: None,
        };
        // The allowlist as configured now: a host removed since the job
        // was accepted is not called.
        if let Err(why) = check_url(&due.url, &self.cfg.webhooks.allow_hosts) {
            return Ok(refused(why));
        }
        let Some(secret) = &self.cfg.webhooks.secret else {
            return Ok(refused("webhooks.secret is not set".into()));
        };
        let Some(job) = crate::store::jobs::job_view(&self.pool, &due.job_id).await? else {
            return Ok(Outcome {
                state: DeliveryState::Failed,
                http_status: None,
                error: Some("the job no longer exists".into()),
                latency_ms: None,
                retry_in: None,
            });
        };
        let payload = Payload {
            job_id: job.id,
            category: job.category,
            status: job.status,
            cost_usd: job.cost_usd.unwrap_or_default(),
            output: job.output,
            output_json: job.output_json,
        };
        let body = serde_json::to_vec(&payload)?;
        let t = crate::clock::now_ms() / 1000;
        let started = Instant::now();
        let sent = self
            .http
            .post(&due.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                SIGNATURE_HEADER,
                signature(secret.expose().as_bytes(), t, &body),
            )
            .header(DELIVERY_HEADER, due.series.to_string())
            .body(body)
            .send()
            .await;
        let latency_ms = Some(started.elapsed().as_millis().min(i32::MAX as u128) as i32);
        Ok(match sent {
            Ok(r) if r.status().is_success() => Outcome {
                state: DeliveryState::Ok,
                http_status: Some(i32::from(r.status().as_u16())),
                error: None,
                latency_ms,
                retry_in: None,
            },
            Ok(r) => Outcome {
                state: DeliveryState::Failed,
                http_status: Some(i32::from(r.status().as_u16())),
                error: Some(format!("HTTP {}", r.status())),
                latency_ms,
                retry_in: None,
            },
            Err(e) => Outcome {
                state: DeliveryState::Failed,
                http_status: None,
                error: Some(if e.is_timeout() {
                    format!(
                        "no answer within webhooks.timeout_secs ({}s)",
                        self.cfg.webhooks.timeout_secs
                    )
                } else {
                    format!("{:#}", anyhow::Error::from(e.without_url()))
                }),
                latency_ms,
                retry_in: None,
            },
        })
    }
}
