//! Bearer tokens on every HTTP route but a health check and the
//! dashboard's login page (which carries no figures).
//!
//! A route is declared once, in a [`RouteSpec`] table with the scope it
//! needs; the router is built from the table, so a route cannot exist
//! without its scope, and the tests walk the same table. A request's
//! `Authorization: Bearer <token>` is hashed and looked up in `api_tokens`
//! (a live token's hash is remembered for 10 s). Refusals are logged with
//! the client's address and the reason, never the token; an address that
//! keeps presenting bad tokens gets 429 instead of 401 for them, while a
//! valid token is always let through.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use tracing::warn;

pub use crate::store::tokens::Scope;

/// One HTTP route: method, path, and the scope it needs (`None`: open,
/// for the health check and the login page only). With `own`, a `submit`
/// token may use a `read` route for the jobs it submitted (the handler
/// checks, given [`OwnJobsOnly`]).
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub scope: Option<Scope>,
    pub own: bool,
    /// One line for the OpenAPI document.
    pub summary: &'static str,
}

/// The name of the token a request came with (set on every guarded route).
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// Set on a request a `submit` token makes to an `own` route: the handler
/// serves only the jobs this token (by name) submitted.
#[derive(Debug, Clone)]
pub struct OwnJobsOnly(pub String);

/// How long a valid token's hash is trusted without asking Postgres.
const KNOWN_FOR: Duration = Duration::from_secs(10);
/// Bad attempts an address may make at once, and per minute after that.
const BAD_BURST: f64 = 20.0;
const BAD_PER_MINUTE: f64 = 20.0;

/// Checks bearer tokens.
pub struct Authenticator {
    pool: PgPool,
    known: Mutex<HashMap<String, (String, Scope, Instant)>>,
    /// Per address: bad attempts it may still make (a token bucket).
    bad: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No bearer token.
    Missing,
    /// Not a live token (unknown, revoked).
    Invalid,
    /// A live token without the scope.
    Forbidden,
    /// Too many bad attempts from this address.
    Limited,
    /// Tokens cannot be checked (Postgres unreachable).
    Unavailable,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            Refusal::Missing => (StatusCode::UNAUTHORIZED, "a bearer token is required"),
            Refusal::Invalid => (StatusCode::UNAUTHORIZED, "the token is not valid"),
            Refusal::Forbidden => (
                StatusCode::FORBIDDEN,
                "the token's scope does not allow this",
            ),
            Refusal::Limited => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many bad tokens from this address; try again later",
            ),
            Refusal::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "tokens cannot be checked right now",
            ),
        };
        let mut r = (status, text).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

impl Authenticator {
    pub fn new(pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            known: Mutex::default(),
            bad: Mutex::default(),
        })
    }

    /// The name and scope of the live token `headers` carry.
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        from: IpAddr,
    ) -> Result<(String, Scope), Refusal> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(self.bad_attempt(from, Refusal::Missing));
        };
        let hash = crate::store::tokens::hash(token);
        let cached = self.known.lock().ok().and_then(|k| {
            k.get(&hash)
                .filter(|(_, _, at)| at.elapsed() < KNOWN_FOR)
                .map(|(n, s, _)| (n.clone(), *s))
        });
        let found = match cached {
            Some(f) => Some(f),
            None => {
                let f = crate::store::tokens::find(&self.pool, &hash)
                    .await
                    .map_err(|e| {
                        warn!(error = %format!("{e:#}"), "cannot check a token");
                        Refusal::Unavailable
                    })?;
                if let (Some((n, s)), Ok(mut k)) = (&f, self.known.lock()) {
                    if k.len() > 10_000 {
                        k.clear();
                    }
                    k.insert(hash, (n.clone(), *s, Instant::now()));
                }
                f
            }
        };
        found.ok_or_else(|| self.bad_attempt(from, Refusal::Invalid))
    }

    /// Count a bad attempt from `from`; `why`, or `Limited` once it made
    /// too many.
    fn bad_attempt(&self, from: IpAddr, why: Refusal) -> Refusal {
        let limited = self.bad.lock().is_ok_and(|mut b| {
            if b.len() > 10_000 {
                b.clear();
            }
            let (left, at) = b.entry(from).or_insert((BAD_BURST, Instant::now()));
            *left = (*left + at.elapsed().as_secs_f64() * BAD_PER_MINUTE / 60.0).min(BAD_BURST);
            *at = Instant::now();
            if *left >= 1.0 {
                *left -= 1.0;
                false
            } else {
                true
            }
        });
        let why = if limited { Refusal::Limited } else { why };
        warn!(%from, reason = ?why, "request refused");
        why
    }
}

/// Middleware: let the request through if it carries a token allowing
/// `need` (or, on an `own` route, a `submit` token, marked [`OwnJobsOnly`]).
pub async fn guard(
    State((auth, need, own)): State<(Arc<Authenticator>, Scope, bool)>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let (name, scope) = match auth.identify(req.headers(), addr.ip()).await {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    // The token's own scope too, for handlers whose answer depends on it.
    req.extensions_mut().insert(scope);
    if scope.allows(need) {
        req.extensions_mut().insert(Caller(name));
        return next.run(req).await;
    }
    if own && scope == Scope::Submit {
        req.extensions_mut().insert(Caller(name.clone()));
        req.extensions_mut().insert(OwnJobsOnly(name));
        return next.run(req).await;
    }
    warn!(%addr, token_name = %name, need = need.as_str(), "token refused: scope");
    Refusal::Forbidden.into_response()
}

/// `route`, guarded by `spec`'s scope (open when it has none).
pub fn guarded<S: Clone + Send + Sync + 'static>(
    route: axum::routing::MethodRouter<S>,
    spec: &RouteSpec,
    auth: &Arc<Authenticator>,
) -> axum::routing::MethodRouter<S> {
    match spec.scope {
        None => route,
        Some(need) => route.route_layer(axum::middleware::from_fn_with_state(
            (auth.clone(), need, spec.own),
            guard,
        )),
    }
}
