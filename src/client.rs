//! A Rust client of the HTTP API: submit, get, wait, cancel, with a bearer
//! token (`SWITCHYARD_TOKEN`) against a base URL (`SWITCHYARD_URL`, default
//! `http://127.0.0.1:9187`).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let c = switchyard::client::Client::from_env()?;
//! let id = c.submit(&serde_json::json!({"category": "support", "prompt": "Hi"})).await?;
//! let job = c.wait(&id, std::time::Duration::from_secs(60)).await?;
//! println!("{} {}", job["status"], job["output"]);
//! # Ok(()) }
//! ```

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The statuses a job ends in.
const TERMINAL: &[&str] = &["succeeded", "failed", "needs_review", "dead", "cancelled"];

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base_url: &str, token: &str) -> Result<Self> {
        crate::providers::http::install_tls_provider();
        Ok(Self {
            base: base_url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .context("building the HTTP client")?,
        })
    }

    /// From `SWITCHYARD_URL` (default `http://127.0.0.1:9187`) and
    /// `SWITCHYARD_TOKEN`.
    pub fn from_env() -> Result<Self> {
        let token = std::env::var("SWITCHYARD_TOKEN")
            .context("SWITCHYARD_TOKEN is not set (switchyard token create prints one)")?;
        let base =
            std::env::var("SWITCHYARD_URL").unwrap_or_else(|_| "http://127.0.0.1:9187".to_string());
        Self::new(&base, &token)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<(u16, Value)> {
        let r = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("requesting {}", self.base))?;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Submit one envelope (it must name its `category`); its job id. A job
    /// whose id exists already is not submitted again: its id comes back.
    pub async fn submit(&self, envelope: &Value) -> Result<String> {
        let (status, v) = self
            .send(
                self.http
                    .post(format!("{}/v1/jobs", self.base))
                    .json(envelope),
            )
            .await?;
        match status {
            200 | 202 => v["id"]
                .as_str()
                .map(str::to_string)
                .context("the answer names no job id"),
            _ => bail!(
                "submitting failed ({status}): {}",
                v["reason"].as_str().or(v["error"].as_str()).unwrap_or("")
            ),
        }
    }

    /// The job (status, result, cost, decision log, calls), if it exists.
    pub async fn get(&self, id: &str) -> Result<Option<Value>> {
        let (status, v) = self
            .send(
                self.http
                    .get(format!("{}/v1/jobs/{}", self.base, urlencode(id))),
            )
            .await?;
        match status {
            200 => Ok(Some(v)),
            404 => Ok(None),
            _ => bail!("reading job {id} failed ({status}): {}", v["error"]),
        }
    }

    /// Poll the job until it ends, up to `timeout`.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Value> {
        let until = Instant::now() + timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            if let Some(job) = self.get(id).await? {
                if job["status"]
                    .as_str()
                    .is_some_and(|s| TERMINAL.contains(&s))
                {
                    return Ok(job);
                }
            }
            if Instant::now() >= until {
                bail!("job {id} had not ended after {timeout:?}");
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Cancel the job (an admin token); its status after the request.
    pub async fn cancel(&self, id: &str) -> Result<String> {
        let (status, v) = self
            .send(
                self.http
                    .post(format!("{}/v1/jobs/{}/cancel", self.base, urlencode(id))),
            )
            .await?;
        match status {
            200 | 409 => Ok(v["status"].as_str().unwrap_or("").to_string()),
            _ => bail!("cancelling job {id} failed ({status}): {}", v["error"]),
        }
    }
}

/// A job id as one path segment.
fn urlencode(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
