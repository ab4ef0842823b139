//! `switchyard-bench ingest`: the memory a batch's result file costs while
//! it is read. A loopback server plays OpenAI's batch API with one
//! completed batch whose output file is `--mb` megabytes of result lines
//! (generated as they are sent, so the server holds none of it); the
//! worker's batch client streams it into a channel drained in chunks, as
//! the batch lane does. The process's resident set is sampled every 10 ms.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use switchyard::config::ProviderConfig;
use switchyard::providers::batch::{BatchClient, ItemOutcome, ItemResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of answer text per result line.
const ANSWER_CHARS: usize = 3_600;

#[derive(Debug, Clone, Serialize)]
pub struct IngestFigures {
    pub file_mb: f64,
    pub lines: u64,
    pub answered: u64,
    pub malformed: u64,
    pub secs: f64,
    pub mb_per_sec: f64,
    pub rss_before_mb: f64,
    pub peak_rss_mb: f64,
    pub rss_growth_mb: f64,
}

impl IngestFigures {
    pub fn summary(&self) -> String {
        format!(
            "ingest: {:.0} MB result file, {} lines ({} answered, {} malformed) in {:.1} s ({:.0} MB/s)\n\
             resident set: {:.1} MiB before, {:.1} MiB at peak: +{:.1} MiB while reading",
            self.file_mb,
            self.lines,
            self.answered,
            self.malformed,
            self.secs,
            self.mb_per_sec,
            self.rss_before_mb,
            self.peak_rss_mb,
            self.rss_growth_mb
        )
    }
}

/// This process's resident set now (VmRSS), in MiB.
fn rss_mb() -> f64 {
    crate::throughput::proc_status_mb("VmRSS:")
}

/// Result line `i`, as OpenAI writes it (newline included).
fn line(i: u64, answer: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "id": format!("batch_req_{i}"), "custom_id": format!("i{i}"),
        "response": {"status_code": 200, "request_id": format!("req_{i}"), "body": {
            "id": format!("chatcmpl-{i}"), "object": "chat.completion", "created": 1_700_000_000,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 900, "total_tokens": 940,
                      "prompt_tokens_details": {"cached_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0}}}},
        "error": null});
    let mut v = serde_json::to_vec(&body).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Serve one HTTP/1.1 request on `sock`: the batch object, or the output
/// file of `lines` lines written as they are made.
async fn serve(mut sock: tokio::net::TcpStream, lines: u64, file_bytes: u64) -> Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&req);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    if path.starts_with("/v1/files/") {
        sock.write_all(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                 content-length: {file_bytes}\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let answer = "x".repeat(ANSWER_CHARS);
        let mut out = Vec::with_capacity(1 << 16);
        for i in 0..lines {
            out.extend_from_slice(&line(i, &answer));
            if out.len() >= 1 << 16 {
                sock.write_all(&out).await?;
                out.clear();
            }
        }
        sock.write_all(&out).await?;
    } else {
        let body = serde_json::json!({
            "id": "batch_big", "object": "batch", "endpoint": "/v1/chat/completions",
            "status": "completed", "output_file_id": "file-big", "error_file_id": null,
            "request_counts": {"total": lines, "completed": lines, "failed": 0},
            "created_at": 1_700_000_000, "metadata": {"switchyard_batch": "syb_bench"}})
        .to_string();
        sock.write_all(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
    }
    sock.shutdown().await?;
    Ok(())
}

/// Read a `mb`-megabyte result file through the batch client.
pub async fn run(mb: u64) -> Result<IngestFigures> {
    let answer = "x".repeat(ANSWER_CHARS);
    let per_line = (0..1000)
        .map(|i| line(i, &answer).len() as u64)
        .sum::<u64>()
        / 1000;
    let lines = (mb << 20) / per_line.max(1);
    let file_bytes: u64 = (0..lines).map(|i| line(i, &answer).len() as u64).sum();
    drop(answer);

    let tasks = switchyard::tasks::Tasks::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    {
        let conns = tasks.clone();
        tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = conns.token().cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((sock, _)) = accepted else { return };
                let token = conns.token().clone();
                conns.spawn(async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        r = serve(sock, lines, file_bytes) => if let Err(e) = r {
                            tracing::debug!(error = %e, "bench server connection ended");
                        }
                    }
                });
            }
        });
    }
    let pc: ProviderConfig = serde_json::from_value(serde_json::json!({
        "kind": "openai", "base_url": format!("http://{addr}"), "rpm": 1000, "tpm": 1_000_000,
        "max_response_bytes": 8 << 20}))
    .context("bench provider config")?;
    let client = BatchClient::from_config("bench", &pc)?.context("openai has a batch client")?;

    // Let the allocator settle, then sample the resident set while reading.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_mb();
    let peak = Arc::new(AtomicU64::new(before.to_bits()));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tasks.spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                let now = rss_mb();
                if now > f64::from_bits(peak.load(Ordering::Relaxed)) {
                    peak.store(now.to_bits(), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let started = Instant::now();
    let status = client.status("batch_big").await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ItemResult>(256);
    let read = async {
        let r = client.results(&status, &tx).await;
        drop(tx);
        r
    };
    let drain = async {
        let mut chunk = Vec::with_capacity(256);
        let mut answered = 0u64;
        while rx.recv_many(&mut chunk, 256).await > 0 {
            answered += chunk
                .drain(..)
                .filter(|r| matches!(r.outcome, ItemOutcome::Answered(_)))
                .count() as u64;
        }
        answered
    };
    let (tally, answered) = tokio::join!(read, drain);
    let tally = tally.map_err(|e| anyhow::anyhow!("reading the result file: {e}"))?;
    let secs = started.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    tasks.stop(Duration::from_secs(2)).await;
    let peak = f64::from_bits(peak.load(Ordering::Relaxed)).max(rss_mb());
    let file_mb = file_bytes as f64 / f64::from(1 << 20);
    Ok(IngestFigures {
        file_mb,
        lines: tally.items + tally.malformed,
        answered,
        malformed: tally.malformed,
        secs,
        mb_per_sec: file_mb / secs.max(1e-9),
        rss_before_mb: before,
        peak_rss_mb: peak,
        rss_growth_mb: peak - before,
    })
}
