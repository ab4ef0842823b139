//! The worker's HTTP endpoint (`metrics.listen`, `--metrics-listen`):
//! `/metrics` (this process's Prometheus metrics), `/` (a live dashboard
//! page that refreshes itself) and `/api/stats` (the dashboard's figures:
//! fleet-wide, from Postgres and NATS), `/healthz`.
//!
//! Every route but `/healthz` and the page itself needs a bearer token
//! (scope `read` or `admin`; see [`crate::api::auth`]). The page carries no
//! figures: it shows a login form, keeps the token in the tab's session
//! storage, and fetches `/api/stats` with it.

use crate::tasks::Tasks;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use tracing::{info, warn};

use crate::api::auth::{RouteSpec, Scope as TokenScope};
use crate::bus::{Bus, QueueDepths};
use crate::config::Config;
use crate::metrics;
use crate::ops::report::{savings_lines, SavingsLine};
use crate::pricing::Prices;
use crate::store::report::{Scope, TimeBound, TimeUnit};
use crate::store::stats;
pub use crate::store::stats::ModelSpend;

struct Ctx {
    pool: PgPool,
    bus: Bus,
    cfg: Config,
    baseline: Option<(String, Prices)>,
    depths: tokio::sync::RwLock<QueueDepths>,
    /// The last day's savings and when they were read: they read every job
    /// of the day, so a page refreshing every 2 s reads them once a minute.
    savings: tokio::sync::Mutex<Option<(std::time::Instant, Vec<SavingsLine>)>>,
}

/// How long the dashboard reuses the savings it read.
const SAVINGS_FOR: Duration = Duration::from_secs(60);

/// What `/api/stats` returns.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Jobs that ended in the last minute, and per minute over the last 10.
    pub finished_last_minute: i64,
    pub finished_per_minute: Vec<i64>,
    /// Today's (UTC) jobs by status.
    pub jobs_today: Vec<(String, i64)>,
    pub queue: QueueDepths,
    /// Today's (UTC) calls and USD by model.
    pub spend_today: Vec<ModelSpend>,
    /// The last hour's calls and error rate by model.
    pub errors_last_hour: Vec<ModelErrors>,
    pub cost_today_usd: Decimal,
    /// The model savings are measured against (`report.baseline_model`).
    pub baseline_model: Option<String>,
    /// Jobs created in the last 24 hours measured as `switchyard report`
    /// measures them: per category, then `total`.
    pub savings_last_24h: Vec<SavingsLine>,
}

#[derive(Debug, Serialize)]
pub struct ModelErrors {
    pub model: String,
    pub calls: i64,
    pub errors: i64,
    pub error_rate: f64,
}

/// Serve until `token` is cancelled; refreshes the queue-depth gauges every
/// two seconds.
pub async fn serve(
    listen: &str,
    pool: PgPool,
    bus: Bus,
    cfg: &Config,
    tasks: &Tasks,
) -> Result<()> {
    let token = tasks.token().clone();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("metrics.listen: cannot listen on {listen}"))?;
    info!(listen = %listener.local_addr()?, "metrics and dashboard on http://{}/", listener.local_addr()?);
    let ctx = Arc::new(Ctx {
        pool,
        bus,
        cfg: cfg.clone(),
        baseline: cfg
            .baseline(None)
            .ok()
            .flatten()
            .map(|(m, p)| (m.to_string(), p)),
        depths: Default::default(),
        savings: Default::default(),
    });
    let poll = ctx.clone();
    let stop = token.clone();
    tasks.spawn(async move {
        let mut logged = false;
        let providers: Vec<String> = poll.cfg.providers.keys().cloned().collect();
        let categories = poll.cfg.subject_categories();
        loop {
            match poll.bus.queue_depths(&providers).await {
                Ok(mut d) => {
                    // Every category has a depth, 0 when nothing waits.
                    for c in &categories {
                        d.jobs.entry(c.clone()).or_insert(0);
                    }
                    let m = metrics::global();
                    for (c, n) in &d.jobs {
                        m.set(
                            "switchyard_queue_depth",
                            &[("queue", "jobs"), ("category", c)],
                            *n as f64,
                        );
                    }
                    for (p, n) in &d.lanes {
                        m.set(
                            "switchyard_queue_depth",
                            &[("queue", "lane"), ("provider", p)],
                            *n as f64,
                        );
                    }
                    *poll.depths.write().await = d;
                    logged = false;
                }
                Err(e) if !logged => {
                    warn!(error = %format!("{e:#}"), "cannot read queue depths");
                    logged = true;
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    });
    let auth = crate::api::auth::Authenticator::new(ctx.pool.clone());
    let mut app = Router::new();
    for spec in ROUTES {
        use crate::api::{jobs, openai_batch, ops, webhooks};
        let route = match (spec.method, spec.path) {
            ("GET", "/") => get(page),
            ("GET", "/healthz") => get(|| async { "ok" }),
            ("GET", "/metrics") => get(prometheus),
            ("GET", "/api/stats") => get(stats),
            ("POST", "/v1/jobs") => axum::routing::post(jobs::submit::<Ctx>)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_SUBMIT_BYTES)),
            ("GET", "/v1/jobs") => get(jobs::list::<Ctx>),
            ("GET", "/v1/jobs/{id}") => get(jobs::get::<Ctx>),
            ("POST", "/v1/jobs/{id}/cancel") => axum::routing::post(jobs::cancel::<Ctx>),
            ("POST", "/v1/jobs/cancel") => axum::routing::post(jobs::cancel_where::<Ctx>),
            ("GET", "/v1/dead-letters") => get(ops::dead_letters::<Ctx>),
            ("GET", "/v1/dead-letters/{id}") => get(ops::dead_letter::<Ctx>),
            ("POST", "/v1/dead-letters/replay") => axum::routing::post(ops::replay::<Ctx>),
            ("GET", "/v1/reviews") => get(ops::reviews::<Ctx>),
            ("GET", "/v1/reviews/{id}") => get(ops::review_one::<Ctx>),
            ("POST", "/v1/reviews/{id}/resolve") => axum::routing::post(ops::resolve::<Ctx>),
            ("POST", "/v1/files") => axum::routing::post(openai_batch::upload::<Ctx>).layer(
                axum::extract::DefaultBodyLimit::max(openai_batch::MAX_FILE_BYTES + (1 << 20)),
            ),
            ("GET", "/v1/files/{id}") => get(openai_batch::get_file::<Ctx>),
            ("GET", "/v1/files/{id}/content") => get(openai_batch::file_content::<Ctx>),
            ("POST", "/v1/batches") => axum::routing::post(openai_batch::create::<Ctx>),
            ("GET", "/v1/batches") => get(openai_batch::list::<Ctx>),
            ("GET", "/v1/batches/{id}") => get(openai_batch::get::<Ctx>),
            ("POST", "/v1/batches/{id}/cancel") => axum::routing::post(openai_batch::cancel::<Ctx>),
            ("GET", "/v1/webhooks") => get(webhooks::list::<Ctx>),
            ("POST", "/v1/webhooks/{id}/replay") => axum::routing::post(webhooks::replay::<Ctx>),
            ("GET", "/openapi.json") => get(|| async { Json(crate::api::openapi(ROUTES)) }),
            (m, p) => unreachable!("ROUTES names {m} {p} without a handler"),
        };
        app = app.route(spec.path, crate::api::auth::guarded(route, spec, &auth));
    }
    let app = app.with_state(ctx);
    tasks.spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await;
    });
    Ok(())
}

/// The endpoint's routes and the scope each needs (`read` also lets
/// `admin` tokens in). The page and the health check are open: neither
/// shows a figure.
pub const ROUTES: &[RouteSpec] = &[
    RouteSpec {
        method: "GET",
        path: "/",
        scope: None,
        own: false,
        summary: "The dashboard page (a login form until a token is given; no figures)",
    },
    RouteSpec {
        method: "GET",
        path: "/healthz",
        scope: None,
        own: false,
        summary: "Liveness: `ok`",
    },
    RouteSpec {
        method: "GET",
        path: "/metrics",
        scope: Some(TokenScope::Read),
        own: false,
        summary: "This process's Prometheus metrics",
    },
    RouteSpec {
        method: "GET",
        path: "/api/stats",
        scope: Some(TokenScope::Read),
        own: false,
        summary: "The dashboard's figures (fleet-wide)",
    },
    RouteSpec {
        method: "POST",
        path: "/v1/jobs",
        scope: Some(TokenScope::Submit),
        own: false,
        summary: "Submit one job envelope, a JSON array of them, or NDJSON",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/jobs",
        scope: Some(TokenScope::Read),
        own: false,
        summary: "Jobs newest first, filtered, in keyset pages",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/jobs/{id}",
        scope: Some(TokenScope::Read),
        own: true,
        summary: "One job: status, result, cost, decision log, calls",
    },
    RouteSpec {
        method: "POST",
        path: "/v1/jobs/{id}/cancel",
        scope: Some(TokenScope::Admin),
        own: false,
        summary: "Cancel a job",
    },
    RouteSpec {
        method: "POST",
        path: "/v1/jobs/cancel",
        scope: Some(TokenScope::Admin),
        own: false,
        summary: "Cancel every unfinished job matching a filter",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/dead-letters",
        scope: Some(TokenScope::Read),
        own: false,
        summary: "Dead letters, newest first",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/dead-letters/{id}",
        scope: Some(TokenScope::Read),
        own: false,
        summary: "One dead letter with its payload",
    },
    RouteSpec {
        method: "POST",
        path: "/v1/dead-letters/replay",
        scope: Some(TokenScope::Admin),
        own: false,
        summary: "Replay dead letters, each exactly once",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/reviews",
        scope: Some(TokenScope::Read),
        own: false,
        summary: "Jobs waiting for a person",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/reviews/{id}",
        scope: Some(TokenScope::Read),
        own: false,
        summary: "What a reviewer needs about one job",
    },
    RouteSpec {
        method: "POST",
        path: "/v1/reviews/{id}/resolve",
        scope: Some(TokenScope::Admin),
        own: false,
        summary: "Resolve a job waiting for review",
    },
    RouteSpec {
        method: "POST",
        path: "/v1/files",
        scope: Some(TokenScope::Submit),
        own: false,
        summary: "OpenAI Batch: upload a JSONL input file (multipart, purpose=batch)",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/files/{id}",
        scope: Some(TokenScope::Read),
        own: true,
        summary: "OpenAI Batch: a file object",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/files/{id}/content",
        scope: Some(TokenScope::Read),
        own: true,
        summary: "OpenAI Batch: a file's content (input, output or error JSONL)",
    },
    RouteSpec {
        method: "POST",
        path: "/v1/batches",
        scope: Some(TokenScope::Submit),
        own: false,
        summary: "OpenAI Batch: create a batch; each input line becomes a job",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/batches",
        scope: Some(TokenScope::Read),
        own: true,
        summary: "OpenAI Batch: batches newest first (after, limit)",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/batches/{id}",
        scope: Some(TokenScope::Read),
        own: true,
        summary: "OpenAI Batch: a batch, its status and request counts (finalizes it once every job ended)",
    },
    RouteSpec {
        method: "POST",
        path: "/v1/batches/{id}/cancel",
        scope: Some(TokenScope::Admin),
        own: true,
        summary: "OpenAI Batch: cancel a batch's unfinished jobs (admin, or the submit token that created it)",
    },
    RouteSpec {
        method: "GET",
        path: "/v1/webhooks",
        scope: Some(TokenScope::Read),
        own: false,
        summary: "Completion webhook attempts, newest first (`job_id` filters)",
    },
    RouteSpec {
        method: "POST",
        path: "/v1/webhooks/{id}/replay",
        scope: Some(TokenScope::Admin),
        own: false,
        summary: "Deliver a job's webhook again (by delivery id or job id)",
    },
    RouteSpec {
        method: "GET",
        path: "/openapi.json",
        scope: Some(TokenScope::Read),
        own: true,
        summary: "This document",
    },
];

/// The largest `POST /v1/jobs` body (a bulk request of many envelopes).
const MAX_SUBMIT_BYTES: usize = 64 << 20;

impl crate::api::jobs::JobsCtx for Ctx {
    fn pool(&self) -> &PgPool {
        &self.pool
    }
    fn bus(&self) -> &Bus {
        &self.bus
    }
    fn cfg(&self) -> &Config {
        &self.cfg
    }
}

async fn prometheus() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::global().render(),
    )
        .into_response()
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn stats(State(ctx): State<Arc<Ctx>>) -> Response {
    match read_stats(&ctx).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stats unavailable: {e:#}"),
        )
            .into_response(),
    }
}

async fn read_stats(ctx: &Ctx) -> Result<Stats> {
    let p = &ctx.pool;
    let per_minute = stats::finished_by_minutes_ago(p).await?;
    let mut finished_per_minute = vec![0i64; 10];
    for (ago, n) in per_minute {
        if let Some(slot) = usize::try_from(9 - ago.clamp(0, 9))
            .ok()
            .and_then(|i| finished_per_minute.get_mut(i))
        {
            *slot += n;
        }
    }
    let finished_last_minute = stats::finished_last_minute(p).await?;
    let jobs_today = stats::jobs_today(p).await?;
    let spend = stats::spend_today(p).await?;
    let errors = stats::errors_last_hour(p).await?;
    let cost_today_usd = spend
        .iter()
        .map(|s| s.cost_usd)
        .sum::<Decimal>()
        .normalize();
    let savings_last_24h = last_day_savings(ctx).await?;
    Ok(Stats {
        baseline_model: ctx.baseline.as_ref().map(|(m, _)| m.clone()),
        savings_last_24h,
        finished_last_minute,
        finished_per_minute,
        jobs_today,
        queue: ctx.depths.read().await.clone(),
        spend_today: spend
            .into_iter()
            .map(|s| ModelSpend {
                cost_usd: s.cost_usd.normalize(),
                ..s
            })
            .collect(),
        errors_last_hour: errors
            .into_iter()
            .map(|e| ModelErrors {
                error_rate: if e.calls == 0 {
                    0.0
                } else {
                    e.errors as f64 / e.calls as f64
                },
                model: e.model,
                calls: e.calls,
                errors: e.errors,
            })
            .collect(),
        cost_today_usd,
    })
}

/// The savings of the jobs created in the last 24 hours, per category then
/// `total`, read at most once per [`SAVINGS_FOR`].
async fn last_day_savings(ctx: &Ctx) -> Result<Vec<SavingsLine>> {
    let mut cached = ctx.savings.lock().await;
    if let Some((at, lines)) = cached.as_ref() {
        if at.elapsed() < SAVINGS_FOR {
            return Ok(lines.clone());
        }
    }
    let day = Scope {
        since: TimeBound::Ago(24, TimeUnit::Hours),
        ..Default::default()
    };
    let costs = crate::store::report::job_costs_by_category(&ctx.pool, &day).await?;
    let (mut lines, total) = savings_lines(&costs, ctx.baseline.as_ref().map(|(_, p)| p));
    lines.push(total);
    *cached = Some((std::time::Instant::now(), lines.clone()));
    Ok(lines)
}

/// The dashboard: static HTML whose script polls `/api/stats` every two
/// seconds (same origin, no external resource).
const PAGE: &str = r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Switchyard</title><style>
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 12px}h2{font-size:16px;margin:22px 0 6px}
.kpis{display:flex;gap:28px;flex-wrap:wrap}.kpi b{display:block;font-size:26px}
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #e4e4e4;text-align:right}
td:first-child,th:first-child{text-align:left}.bar{background:#4269d0;height:10px;display:inline-block}
#spark{display:flex;align-items:flex-end;gap:3px;height:60px}#spark div{background:#3ca951;width:18px}
#status{color:#888}</style></head><body>
<h1>Switchyard</h1>
<form id="login" hidden><p>Sign in with an API token (scope <code>read</code> or <code>admin</code>;
<code>switchyard token create --name me --scope read</code>).</p>
<input id="token" type="password" autocomplete="current-password" size="50" placeholder="sy_…" aria-label="API token">
<button type="submit">Sign in</button> <span id="login-error"></span></form>
<div id="board" hidden><div id="status">loading…</div> <button id="logout" type="button">Sign out</button>
<div class="kpis">
<div class="kpi">jobs finished, last minute<b id="finished-last-minute">–</b></div>
<div class="kpi">jobs today<b id="jobs-today">–</b></div>
<div class="kpi">waiting in queues<b id="queued">–</b></div>
<div class="kpi">spent today<b id="cost-today">–</b></div>
</div>
<h2>Jobs finished per minute (last 10)</h2><div id="spark"></div>
<h2>Queue depths</h2><table id="queues"></table>
<h2 id="savings-title">Savings, jobs of the last 24 hours</h2><table id="savings"></table>
<h2>Spend by model today (UTC)</h2><table id="spend"></table>
<h2>Errors by model, last hour</h2><table id="errors"></table></div>
<script>
const KEY='switchyard.token';
function signedIn(){return sessionStorage.getItem(KEY)}
function show(){const t=signedIn();document.getElementById('login').hidden=!!t;document.getElementById('board').hidden=!t;if(t)tick()}
document.getElementById('login').addEventListener('submit',async e=>{e.preventDefault();
 const t=document.getElementById('token').value.trim();
 const r=await fetch('/api/stats',{headers:{Authorization:'Bearer '+t}});
 if(r.ok){sessionStorage.setItem(KEY,t);document.getElementById('token').value='';document.getElementById('login-error').textContent='';show()}
 else{document.getElementById('login-error').textContent=r.status==403?'this token may not read the dashboard':'the token was refused'}});
document.getElementById('logout').addEventListener('click',()=>{sessionStorage.removeItem(KEY);show()});
function cell(t){const td=document.createElement('td');td.textContent=t;return td}
function fill(id,head,rows){const t=document.getElementById(id);t.replaceChildren();
 const h=document.createElement('tr');head.forEach(x=>{const th=document.createElement('th');th.textContent=x;h.appendChild(th)});t.appendChild(h);
 rows.forEach(r=>{const tr=document.createElement('tr');r.forEach(c=>tr.appendChild(c instanceof Node?c:cell(c)));t.appendChild(tr)})}
function bar(frac){const s=document.createElement('span');s.className='bar';s.style.width=Math.round(160*Math.min(1,frac))+'px';const td=document.createElement('td');td.appendChild(s);return td}
async function tick(){
 const t=signedIn();if(!t)return;
 try{const r=await fetch('/api/stats',{headers:{Authorization:'Bearer '+t}});
  if(r.status==401||r.status==403){sessionStorage.removeItem(KEY);show();return}
  if(!r.ok)throw new Error(await r.text());const s=await r.json();
  document.getElementById('finished-last-minute').textContent=s.finished_last_minute;
  document.getElementById('jobs-today').textContent=s.jobs_today.reduce((a,x)=>a+x[1],0);
  const q=Object.values(s.queue.jobs).reduce((a,b)=>a+b,0)+Object.values(s.queue.lanes).reduce((a,b)=>a+b,0);
  document.getElementById('queued').textContent=q;
  document.getElementById('cost-today').textContent='$'+s.cost_today_usd;
  const max=Math.max(1,...s.finished_per_minute);const sp=document.getElementById('spark');sp.replaceChildren();
  s.finished_per_minute.forEach(n=>{const d=document.createElement('div');d.style.height=Math.max(2,Math.round(60*n/max))+'px';d.title=n+' jobs';sp.appendChild(d)});
  fill('queues',['queue','messages'],Object.entries(s.queue.jobs).map(([k,v])=>['jobs: '+k,v]).concat(Object.entries(s.queue.lanes).map(([k,v])=>['lane: '+k,v])));
  const top=Math.max(1e-12,...s.spend_today.map(m=>Number(m.cost_usd)));
  fill('spend',['model','calls','USD',''],s.spend_today.map(m=>[m.model,m.calls,'$'+m.cost_usd,bar(Number(m.cost_usd)/top)]));
  document.getElementById('savings-title').textContent='Savings, jobs of the last 24 hours'+(s.baseline_model?', against one '+s.baseline_model+' call per answered job':'');
  const opt=v=>v==null?'-':String(v).startsWith('-')?'−$'+String(v).slice(1):'$'+v;
  fill('savings',['category','answered jobs','actual','baseline','saved','cost ×','overhead','no result','spent on them'],s.savings_last_24h.map(l=>[l.category,l.jobs,'$'+l.actual_cost_usd,opt(l.baseline_cost_usd),opt(l.savings_usd),l.cost_ratio==null?'-':Number(l.cost_ratio).toFixed(2),'$'+l.overhead_cost_usd,l.no_result_jobs,'$'+l.no_result_cost_usd]));
  fill('errors',['model','calls','errors','error rate'],s.errors_last_hour.map(m=>[m.model,m.calls,m.errors,(100*m.error_rate).toFixed(1)+'%']));
  document.getElementById('status').textContent='updated '+new Date().toLocaleTimeString();
 }catch(e){document.getElementById('status').textContent='cannot load figures: '+e.message}
}
show();setInterval(tick,2000);
</script></body></html>"#;
