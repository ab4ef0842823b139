//! The HTTP plumbing every adapter shares: the reqwest clients of a
//! provider, posting JSON, mapping transport failures to [`CallError`]s, and
//! keeping the API key out of every error text.
//!
//! Over HTTP/1.1 (the default) one client keeps a pool of connections, one
//! per call in flight: at 1,000 calls in flight that is 1,000 connections,
//! each with hyper's read and write buffers, dispatch channel and task
//! (about 15 KiB; see docs/benchmarks.md). With `providers.<name>.http2`
//! calls are streams on shared connections. hyper's HTTP/2 client keeps one
//! connection per client and queues streams beyond the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` on it, so a lane holds
//! `max_concurrency / http2_streams_per_connection` clients (rounded up)
//! and hands calls to them in turn: each connection carries at most its
//! share, and a server's stream limit does not cap the lane.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::Serialize;

use super::headers::retry_after;
use super::{CallError, CallResponse, ErrorClass, RateInfo, Secret};

/// An adapter's pure reading of an HTTP answer.
pub type Interpret = fn(&RawResponse, std::time::SystemTime) -> Result<CallResponse, CallError>;

/// Install the process-wide TLS crypto provider (ring) once.
pub fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A raw HTTP answer, before the adapter interprets it.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

#[derive(Debug, Clone)]
pub struct HttpClient {
    /// Provider name, for messages.
    pub name: String,
    /// One client (HTTP/1.1) or one per HTTP/2 connection, used in turn.
    clients: Arc<[reqwest::Client]>,
    next: Arc<AtomicUsize>,
    base_url: String,
    key: Option<Secret>,
    /// Largest response body read; see `providers.<name>.max_response_bytes`.
    body_limit: usize,
}

/// The default of `providers.<name>.max_response_bytes`.
pub const DEFAULT_BODY_LIMIT: usize = 8 << 20;

impl HttpClient {
    /// A client: HTTP/1.1 (keeping up to 256 idle connections) when
    /// `http2_connections` is None, else HTTP/2 over that many connections
    /// (at least one).
    pub fn new(
        name: &str,
        base_url: &str,
        key: Option<Secret>,
        timeout: Duration,
        http2_connections: Option<usize>,
    ) -> anyhow::Result<Self> {
        Self::build(name, base_url, key, timeout, http2_connections, 256)
    }

    /// A provider's client as its config says (`http2`, `timeout_secs`,
    /// `max_response_bytes`). Over HTTP/1.1 it keeps as many idle
    /// connections as `max_concurrency`: a lane whose calls in flight ebb
    /// and flow reuses its connections instead of closing the ones over a
    /// fixed idle cap and opening (for https, handshaking) new ones when
    /// the calls come back.
    pub fn for_provider(
        name: &str,
        cfg: &crate::config::ProviderConfig,
        key: Option<Secret>,
    ) -> anyhow::Result<Self> {
        Ok(Self::build(
            name,
            &cfg.base_url,
            key,
            cfg.timeout(),
            cfg.http2_connections(),
            cfg.max_concurrency.max(1),
        )?
        .with_body_limit(cfg.max_response_bytes))
    }

    fn build(
        name: &str,
        base_url: &str,
        key: Option<Secret>,
        timeout: Duration,
        http2_connections: Option<usize>,
        max_idle: usize,
    ) -> anyhow::Result<Self> {
        install_tls_provider();
        let base_url = base_url.trim_end_matches('/').to_string();
        let build = |http2: bool| {
            let b = reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(max_idle);
            let b = if !http2 {
                b.http1_only()
            } else {
                // A dead connection fails every call on it: find out early.
                let b = b
                    .http2_keep_alive_interval(Duration::from_secs(20))
                    .http2_keep_alive_timeout(Duration::from_secs(10));
                if base_url.starts_with("https://") {
                    b
                } else {
                    b.http2_prior_knowledge()
                }
            };
            b.build()
        };
        let clients: Vec<reqwest::Client> = match http2_connections {
            None => vec![build(false)?],
            Some(n) => (0..n.max(1))
                .map(|_| build(true))
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            name: name.to_string(),
            clients: clients.into(),
            next: Arc::new(AtomicUsize::new(0)),
            base_url,
            key,
            body_limit: DEFAULT_BODY_LIMIT,
        })
    }

    /// Read at most `bytes` of a response body (a longer one is a terminal
    /// `BadResponse` error).
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes.max(1);
        self
    }

    /// The next client in turn.
    fn client(&self) -> &reqwest::Client {
        let i = match self.clients.len() {
            1 => 0,
            n => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        &self.clients[i]
    }

    pub fn key(&self) -> Option<&Secret> {
        self.key.as_ref()
    }

    /// `base_url` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Remove the key from `text`.
    pub fn redact(&self, text: &str) -> String {
        match &self.key {
            Some(k) => k.redact(text),
            None => text.to_string(),
        }
    }

    /// `method` on `path` (or on an absolute URL of the provider's that
    /// [`Self::same_origin`] accepted), with `headers` and an optional body
    /// (content type, bytes); any status is an `Ok`, the body read up to
    /// the limit.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&'static str, String)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<RawResponse, CallError> {
        let resp = self.open_raw(method, path, headers, body).await?;
        self.read_limited(resp).await
    }

    /// Like [`Self::send`], but the response is returned unread, to be
    /// streamed (a batch's result file can be far over the body limit).
    pub async fn open_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&'static str, String)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<reqwest::Response, CallError> {
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            self.url(path)
        };
        let mut rb = self.client().request(method, url);
        if let Some((content_type, bytes)) = body {
            rb = rb.header("content-type", content_type).body(bytes);
        }
        self.open(rb, headers).await
    }

    /// Whether `url` is on the provider's own origin (scheme, host, port):
    /// the key is only ever sent there.
    pub fn same_origin(&self, url: &str) -> bool {
        match (url::Url::parse(url), url::Url::parse(&self.base_url)) {
            (Ok(a), Ok(b)) => a.origin() == b.origin(),
            _ => false,
        }
    }

    async fn open(
        &self,
        mut rb: reqwest::RequestBuilder,
        headers: &[(&'static str, String)],
    ) -> Result<reqwest::Response, CallError> {
        for (k, v) in headers {
            rb = rb.header(*k, v);
        }
        rb.send().await.map_err(|e| self.transport_error(&e, None))
    }

    /// Read a response's body, up to the limit.
    async fn read_limited(&self, mut resp: reqwest::Response) -> Result<RawResponse, CallError> {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        // Terminal: the same request would get the same answer again.
        let too_long = || {
            let mut e = CallError::new(
                ErrorClass::BadResponse,
                Some(status),
                format!(
                    "{}: response body exceeds {} bytes (providers.{}.max_response_bytes)",
                    self.name, self.body_limit, self.name
                ),
            );
            e.retryable = false;
            e
        };
        if resp
            .content_length()
            .is_some_and(|n| n > self.body_limit as u64)
        {
            return Err(too_long());
        }
        // Read chunk by chunk so a body without a (truthful) length cannot
        // grow past the limit either.
        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| self.transport_error(&e, Some(status)))?
        {
            if body.len() + chunk.len() > self.body_limit {
                return Err(too_long());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(RawResponse {
            status,
            headers,
            body: body.freeze(),
        })
    }

    /// POST `body` to `path`, sending the key (if any) only in the header
    /// `auth` makes of it, and interpret the answer; errors never carry the key.
    ///
    /// The request is built (and `body` encoded) before the future is
    /// returned, so a caller that builds `body` in the call's own statement
    /// drops it at once instead of holding it for the call's whole flight
    /// (a thousand calls in flight held 3.6 MiB of request trees; issue 18's
    /// RSS target).
    pub fn exchange<B: Serialize + ?Sized>(
        &self,
        path: &str,
        auth: fn(&Secret) -> (&'static str, String),
        mut headers: Vec<(&'static str, String)>,
        body: &B,
        tag: Option<&str>,
        interpret: Interpret,
    ) -> impl std::future::Future<Output = Result<CallResponse, CallError>> + '_ {
        if let Some(k) = &self.key {
            headers.push(auth(k));
        }
        if let Some(t) = tag {
            headers.push((crate::ids::CALL_TAG_HEADER, t.to_string()));
        }
        let request = self.client().post(self.url(path)).json(body);
        async move {
            let resp = self.open(request, &headers).await?;
            let raw = self.read_limited(resp).await?;
            interpret(&raw, std::time::SystemTime::now()).map_err(|mut e| {
                e.message = self.redact(&e.message);
                e
            })
        }
    }

    pub(crate) fn transport_error(&self, e: &reqwest::Error, status: Option<u16>) -> CallError {
        // reqwest errors carry the URL (a key travels in a header, never in the
        // URL we build); redact anyway in case a user put one in the base URL.
        let msg = self.redact(&format!("{}: {e}", self.name));
        let class = if e.is_timeout() {
            ErrorClass::Timeout
        } else if e.is_decode() || (e.is_body() && status.is_some()) {
            ErrorClass::BadResponse
        } else {
            ErrorClass::Connection
        };
        CallError::new(class, status, msg)
    }
}

/// Text of an error body for messages: at most 300 bytes, lossy UTF-8.
pub fn body_snippet(body: &[u8]) -> String {
    if body.is_empty() {
        return "no error body".into();
    }
    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
}

/// The interpretation every adapter shares: a 200 is parsed with `parse`;
/// anything else is classified, gets the header `retry-after` unless the
/// body already gave a delay, and carries the rate-limit state `rate`.
pub fn interpret_with(
    raw: &RawResponse,
    now: std::time::SystemTime,
    rate: RateInfo,
    parse: fn(&[u8]) -> Result<CallResponse, CallError>,
    classify: fn(u16, &[u8]) -> CallError,
) -> Result<CallResponse, CallError> {
    let result = if raw.status == 200 {
        parse(&raw.body)
    } else {
        let mut err = classify(raw.status, &raw.body);
        if err.retryable && err.retry_after.is_none() {
            err.retry_after = retry_after(&raw.headers, now);
        }
        Err(err)
    };
    match result {
        Ok(mut r) => {
            r.rate = rate;
            Ok(r)
        }
        Err(mut e) => {
            e.rate = rate;
            Err(e)
        }
    }
}
