//! The batched writer: many messages' rows in one transaction (UNNEST),
//! idempotent by the tables' keys, and the database's health. A message is
//! acked only after the transaction holding its rows committed.
//!
//! A batch is one round trip: the rows go as parallel arrays, one group per
//! kind of row, to `switchyard_write` (migration 0025), which runs one
//! statement per kind present in dependency order (step locks, jobs, dead
//! letters, reclassifications, intents, final cost records, steps,
//! results, statuses, parkings, schedules) and, called outside an explicit
//! transaction, commits when it returns. Sent as separate statements, a
//! batch was BEGIN, up to eleven statements and COMMIT, each waiting for
//! the one before it; at 1,000 jobs/s, where batches hold a few jobs,
//! sending one call instead cut the median added latency by a quarter
//! (docs/benchmarks.md, "One round trip per batch").

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use sqlx::{PgPool, Postgres};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, warn};

use super::{CallRow, Committed, JobRow, JobStatus, Row, StoreError};

/// How often a message held for an unreachable database is reported as in
/// progress to NATS (well within the shortest sensible ack wait).
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

/// What one transaction wrote that its requesters need to know.
#[derive(Default)]
struct Written {
    status: HashMap<String, JobStatus>,
    attempts: HashMap<(String, i32), i32>,
}

struct WriteReq {
    /// Shared with a caller that may have to send the same rows again.
    rows: Arc<Vec<Row>>,
    reply: oneshot::Sender<Result<Committed, StoreError>>,
}

/// Handle to the batched writer. Cloned into every task that writes.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<WriteReq>,
    health: Arc<Health>,
}

/// Whether Postgres answers. A failed write or read marks it down and
/// starts one probe that retries with backoff until it answers again.
struct Health {
    pool: PgPool,
    up: AtomicBool,
    probing: AtomicBool,
    back: Notify,
    /// Where the probe runs; it ends on this token.
    tasks: crate::tasks::Tasks,
}

impl Health {
    fn failed(self: &Arc<Self>, error: &str) {
        self.up.store(false, Ordering::SeqCst);
        if self.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        warn!(%error, "database unreachable; taking no new work until it answers");
        let me = self.clone();
        self.tasks.spawn(async move {
            let mut delay = Duration::from_millis(250);
            loop {
                tokio::select! {
                    _ = me.tasks.token().cancelled() => {
                        me.probing.store(false, Ordering::SeqCst);
                        return;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                let ok = tokio::time::timeout(
                    Duration::from_secs(5),
                    sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&me.pool),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                if ok {
                    me.up.store(true, Ordering::SeqCst);
                    me.probing.store(false, Ordering::SeqCst);
                    me.back.notify_waiters();
                    tracing::info!("database answers again; resuming");
                    return;
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
    }
}

impl Writer {
    /// Start the writer task. It ends when every `Writer` clone is dropped,
    /// after committing what it holds.
    pub fn spawn(
        pool: PgPool,
        batch_size: usize,
        linger: Duration,
        slots: usize,
        tasks: &crate::tasks::Tasks,
    ) -> Self {
        let (tx, rx) = mpsc::channel(batch_size * 4);
        let health = Arc::new(Health {
            pool: pool.clone(),
            up: AtomicBool::new(true),
            probing: AtomicBool::new(false),
            back: Notify::new(),
            tasks: tasks.clone(),
        });
        tasks.spawn(writer_loop(
            write_pool(&pool, slots),
            rx,
            batch_size,
            linger,
            slots,
        ));
        Self { tx, health }
    }

    /// Whether the database answered the last write or probe.
    pub fn is_up(&self) -> bool {
        self.health.up.load(Ordering::SeqCst)
    }

    /// Wait until the database answers (at once if it does).
    pub async fn wait_up(&self) {
        loop {
            let back = self.health.back.notified();
            tokio::pin!(back);
            back.as_mut().enable();
            if self.is_up() {
                return;
            }
            back.await;
        }
    }

    /// A read failed: if the database is unavailable (by its SQLSTATE or
    /// a lost connection), stop taking work until it answers.
    pub fn report_failure(&self, error: &anyhow::Error) {
        let e = StoreError::from_anyhow(error);
        if e.is_unavailable() {
            self.health.failed(&e.to_string());
        }
    }

    /// [`write`](Self::write), retried while the database is unreachable:
    /// `keepalive` runs between tries (tell NATS the message is still being
    /// worked on) until the rows commit or `stop` is cancelled.
    pub async fn write_holding<K, KF>(
        &self,
        rows: Vec<Row>,
        mut keepalive: K,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Committed>
    where
        K: FnMut() -> KF,
        KF: std::future::Future<Output = ()>,
    {
        let rows = Arc::new(rows);
        loop {
            match self.send(rows.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) if stop.is_cancelled() => return Err(e.into()),
                // Refused rows, or a writer that stopped: holding won't help.
                Err(e @ (StoreError::Rejected { .. } | StoreError::Stopped)) => {
                    return Err(e.into())
                }
                // The writer already retried the conflict; try the whole write again.
                Err(StoreError::Conflict { .. }) => keepalive().await,
                Err(StoreError::Unavailable(_)) => {
                    // Keep telling NATS the message is being worked on while
                    // the database is away.
                    keepalive().await;
                    loop {
                        tokio::select! {
                            _ = self.wait_up() => break,
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(KEEPALIVE_EVERY) => keepalive().await,
                        }
                    }
                    keepalive().await;
                }
            }
        }
    }

    /// Queue rows and wait until they are committed.
    pub async fn write(&self, rows: Vec<Row>) -> Result<Committed, StoreError> {
        self.send(Arc::new(rows)).await
    }

    async fn send(&self, rows: Arc<Vec<Row>>) -> Result<Committed, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(WriteReq { rows, reply })
            .await
            .map_err(|_| StoreError::Stopped)?;
        let res = rx.await.map_err(|_| StoreError::Stopped)?;
        if let Err(e @ StoreError::Unavailable(_)) = &res {
            self.health.failed(&e.to_string());
        }
        res
    }
}

/// The writer's own connections, one per commit slot and one spare, with
/// settings that make its plans independent of table statistics. Its
/// statements are prepared once per connection and run thousands of times
/// a second; Postgres caches a generic plan for each after five runs,
/// costed on the statistics of that moment. On a new database (or where
/// autovacuum is off or behind) those say the tables are empty, and the
/// cached plans scan `calls` and `jobs` sequentially, or build a bitmap of
/// every finished job, for each batch, ever after: at 1,000 jobs/s the
/// intent insert alone took 3.8 ms at p50 and grew with the tables
/// (docs/benchmarks.md, "Where the added latency goes"). Every lookup the
/// writer makes is by a key, so an index is always right: sequential scans
/// only where nothing else can do, and one generic plan per statement
/// (no planning per batch).
fn write_pool(pool: &PgPool, slots: usize) -> PgPool {
    let opts = (*pool.connect_options()).clone().options([
        ("enable_seqscan", "off"),
        ("plan_cache_mode", "force_generic_plan"),
    ]);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(u32::try_from(slots.max(1) + 1).unwrap_or(u32::MAX))
        .acquire_timeout(Duration::from_secs(30))
        .connect_lazy_with(opts)
}

/// Group commit: a batch is committed as soon as a commit slot is free
/// (after lingering up to `linger` for more rows; none by default); while
/// `slots` commits are in flight, requests queue and the next commit takes
/// them all (up to `batch_size` messages). Under light load a message waits
/// for one commit; under heavy load batches grow by themselves.
async fn writer_loop(
    pool: PgPool,
    mut rx: mpsc::Receiver<WriteReq>,
    batch_size: usize,
    linger: Duration,
    slots: usize,
) {
    use futures::stream::{FuturesUnordered, StreamExt};
    let slots = slots.max(1);
    let mut batch: Vec<WriteReq> = Vec::with_capacity(batch_size);
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    // When the batch being filled is committed at the latest.
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        // Take whatever is already queued without waiting.
        while open && batch.len() < batch_size {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if batch.is_empty() {
            due = None;
        } else {
            let now = tokio::time::Instant::now();
            let at = *due.get_or_insert(now + linger);
            let full = batch.len() >= batch_size || !open || at <= now;
            if full && in_flight.len() < slots {
                let take = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
                in_flight.push(commit_batch(&pool, take));
                due = None;
                continue;
            }
        }
        if !open && batch.is_empty() && in_flight.is_empty() {
            break;
        }
        let lingering = due.filter(|_| in_flight.len() < slots);
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            r = rx.recv(), if open && batch.len() < batch_size => match r {
                Some(r) => batch.push(r),
                None => open = false,
            },
            _ = tokio::time::sleep_until(lingering.unwrap_or_else(tokio::time::Instant::now)),
                if lingering.is_some() => {}
        }
    }
    pool.close().await;
    debug!("writer stopped");
}

async fn commit_batch(pool: &PgPool, batch: Vec<WriteReq>) {
    let n = batch.len();
    let mut attempt = 0u32;
    let failure = loop {
        attempt += 1;
        let rows: Vec<&Row> = batch.iter().flat_map(|r| r.rows.iter()).collect();
        match write_rows(pool, &rows).await {
            Ok(written) => {
                debug!(requests = n, rows = rows.len(), "batch committed");
                for req in batch {
                    let _ = req.reply.send(Ok(committed_for(&req.rows, &written)));
                }
                return;
            }
            Err(e) => {
                let e = StoreError::from_anyhow(&e);
                warn!(attempt, requests = n, error = %e, "batch commit failed");
                match e {
                    StoreError::Conflict { .. } if attempt < 3 => {
                        tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                    }
                    e => break e,
                }
            }
        }
    };
    if failure.is_unavailable() {
        // Every request would fail alike: their senders hold and retry.
        for req in batch {
            let _ = req.reply.send(Err(failure.clone()));
        }
        return;
    }
    // Isolate a poisoned request: commit each on its own.
    for req in batch {
        let rows: Vec<&Row> = req.rows.iter().collect();
        let res = write_rows(pool, &rows)
            .await
            .map(|written| committed_for(&req.rows, &written))
            .map_err(|e| StoreError::from_anyhow(&e));
        let _ = req.reply.send(res);
    }
}

fn committed_for(rows: &[Row], written: &Written) -> Committed {
    let mut c = Committed::default();
    for r in rows {
        match r {
            Row::Job(j) => {
                if let Some(s) = written.status.get(&j.id) {
                    c.job_status.insert(j.id.clone(), *s);
                }
            }
            Row::Intent { row: i, .. } => {
                let key = (i.job_id.clone(), i.step);
                if let Some(a) = written.attempts.get(&key) {
                    c.attempts.insert(key, *a);
                }
            }
            _ => {}
        }
    }
    c
}

/// The call of `switchyard_write` (migration 0025) with its 69 arguments,
/// bound in [`write_rows`]' order.
static WRITE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let args: Vec<String> = (1..=69).map(|i| format!("${i}")).collect();
    format!(
        "SELECT out_job, out_step, out_attempt, out_status FROM switchyard_write({})",
        args.join(", ")
    )
});

/// Write all rows in one transaction: one round trip, `switchyard_write`
/// (migration 0025), which runs a statement per kind of row, in
/// dependency order, and commits when it returns.
async fn write_rows(pool: &PgPool, rows: &[&Row]) -> Result<Written> {
    // One row per job id (a batch can hold the same job twice); a valid job
    // wins over a dead-lettered copy.
    let mut by_id: HashMap<&str, &JobRow> = HashMap::new();
    for r in rows {
        if let Row::Job(j) = r {
            let keep = by_id
                .get(j.id.as_str())
                .is_some_and(|k| k.status != JobStatus::Dead);
            if !keep {
                by_id.insert(j.id.as_str(), j);
            }
        }
    }
    let jobs: Vec<&JobRow> = by_id.into_values().collect();
    let (mut dead, mut results, mut statuses) = (vec![], vec![], vec![]);
    let (mut steps, mut reclass) = (vec![], vec![]);
    let mut parks: Vec<(&str, bool)> = vec![];
    let mut schedules: Vec<(&str, i64)> = vec![];
    // Intents first, then the final rows, one per attempt (an upsert may
    // not touch a row twice); `intent` and `busy` run alongside.
    let mut calls: Vec<&CallRow> = vec![];
    let mut busy: Vec<f64> = vec![];
    let mut finals: HashMap<(&str, i32, i32), &CallRow> = HashMap::new();
    for r in rows {
        match r {
            Row::Job(_) => {}
            Row::DeadLetter(d) => dead.push(d),
            Row::Call(c) => {
                finals.insert((c.job_id.as_str(), c.step, c.attempt), c);
            }
            Row::Intent { row, busy_for } => {
                calls.push(row);
                busy.push(busy_for.as_secs_f64());
            }
            Row::Park { job_id, parked } => parks.push((job_id, *parked)),
            Row::Schedule {
                job_id,
                not_before_ms,
            } => schedules.push((job_id, *not_before_ms)),
            Row::Result(x) => results.push(x),
            Row::Status(st) => statuses.push(st),
            Row::Step(st) => steps.push(st),
            Row::Reclass(rc) => reclass.push(rc),
        }
    }
    let mut intent = vec![true; calls.len()];
    for c in finals.into_values() {
        calls.push(c);
        intent.push(false);
        busy.push(0.0);
    }
    let q = sqlx::query(sqlx::AssertSqlSafe(WRITE_SQL.as_str()))
        .bind(JobStatus::terminal_names())
        .bind(JobStatus::Dead.as_str())
        .bind(JobStatus::Cancelled.as_str())
        .bind(JobStatus::Queued.as_str())
        // j_*
        .bind(jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.category.clone()).collect::<Vec<_>>())
        .bind(
            jobs.iter()
                .map(|j| j.status.to_string())
                .collect::<Vec<_>>(),
        )
        .bind(jobs.iter().map(|j| j.envelope.clone()).collect::<Vec<_>>())
        .bind(
            jobs.iter()
                .map(|j| j.route_decision.clone())
                .collect::<Vec<_>>(),
        )
        .bind(jobs.iter().map(|j| j.error.clone()).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.enqueued_at_ms).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.variant.clone()).collect::<Vec<_>>())
        .bind(
            jobs.iter()
                .map(|j| j.callback_url.clone())
                .collect::<Vec<_>>(),
        )
        // d_*
        .bind(dead.iter().map(|d| d.source.clone()).collect::<Vec<_>>())
        .bind(dead.iter().map(|d| d.subject.clone()).collect::<Vec<_>>())
        .bind(dead.iter().map(|d| d.job_id.clone()).collect::<Vec<_>>())
        .bind(dead.iter().map(|d| d.payload.clone()).collect::<Vec<_>>())
        .bind(dead.iter().map(|d| d.reason.clone()).collect::<Vec<_>>())
        // r_*
        .bind(reclass.iter().map(|r| r.job_id.clone()).collect::<Vec<_>>())
        .bind(
            reclass
                .iter()
                .map(|r| r.category.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            reclass
                .iter()
                .map(|r| r.variant.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            reclass
                .iter()
                .map(|r| r.route_decision.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            reclass
                .iter()
                .map(|r| r.callback_default.clone())
                .collect::<Vec<_>>(),
        );
    // c_*
    let q = bind_calls(q, &calls).bind(intent).bind(busy);
    let q = q
        // s_*
        .bind(steps.iter().map(|r| r.job_id.clone()).collect::<Vec<_>>())
        .bind(steps.iter().map(|r| r.record.step).collect::<Vec<_>>())
        .bind(
            steps
                .iter()
                .map(|r| r.record.model.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            steps
                .iter()
                .map(|r| super::jobs::outcome_str(r.record.outcome).to_string())
                .collect::<Vec<_>>(),
        )
        .bind(
            steps
                .iter()
                .map(|r| r.record.output.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            steps
                .iter()
                .map(|r| r.record.reason.clone())
                .collect::<Vec<_>>(),
        )
        // x_*
        .bind(results.iter().map(|r| r.job_id.clone()).collect::<Vec<_>>())
        .bind(
            results
                .iter()
                .map(|r| r.category.clone())
                .collect::<Vec<_>>(),
        )
        .bind(results.iter().map(|r| r.output.clone()).collect::<Vec<_>>())
        .bind(results.iter().map(|r| r.model.clone()).collect::<Vec<_>>())
        .bind(
            results
                .iter()
                .map(|r| r.finish_reason.clone())
                .collect::<Vec<_>>(),
        )
        .bind(results.iter().map(|r| r.latency_ms).collect::<Vec<_>>())
        .bind(results.iter().map(|r| r.answer_step).collect::<Vec<_>>())
        .bind(
            results
                .iter()
                .map(|r| r.output_json.as_ref().map(ToString::to_string))
                .collect::<Vec<_>>(),
        )
        // u_*
        .bind(
            statuses
                .iter()
                .map(|r| r.job_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            statuses
                .iter()
                .map(|r| r.status.to_string())
                .collect::<Vec<_>>(),
        )
        .bind(statuses.iter().map(|r| r.error.clone()).collect::<Vec<_>>())
        .bind(
            statuses
                .iter()
                .map(|r| r.review_reason.clone())
                .collect::<Vec<_>>(),
        )
        .bind(statuses.iter().map(|r| r.tried.clone()).collect::<Vec<_>>())
        // p_*, w_*
        .bind(parks.iter().map(|(j, _)| j.to_string()).collect::<Vec<_>>())
        .bind(parks.iter().map(|(_, p)| *p).collect::<Vec<_>>())
        .bind(
            schedules
                .iter()
                .map(|(j, _)| j.to_string())
                .collect::<Vec<_>>(),
        )
        .bind(schedules.iter().map(|(_, t)| *t).collect::<Vec<_>>());
    type Out = (Option<String>, Option<i32>, Option<i32>, Option<String>);
    let out: Vec<Out> = q
        .try_map(|r: sqlx::postgres::PgRow| {
            use sqlx::Row as _;
            Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?))
        })
        .fetch_all(pool)
        .await?;
    let mut written = Written::default();
    for (job, step, attempt, status) in out {
        let Some(job) = job else { continue };
        match (step, attempt, status) {
            (Some(step), Some(attempt), _) => {
                written.attempts.insert((job, step), attempt);
            }
            // The CHECK constraint allows only known statuses.
            (_, _, Some(s)) => {
                if let Some(s) = JobStatus::parse(&s) {
                    written.status.insert(job, s);
                }
            }
            _ => {}
        }
    }
    Ok(written)
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

fn bind_calls<'q>(q: PgQuery<'q>, calls: &[&CallRow]) -> PgQuery<'q> {
    q.bind(calls.iter().map(|c| c.job_id.clone()).collect::<Vec<_>>())
        .bind(calls.iter().map(|c| c.category.clone()).collect::<Vec<_>>())
        .bind(calls.iter().map(|c| c.provider.clone()).collect::<Vec<_>>())
        .bind(calls.iter().map(|c| c.model.clone()).collect::<Vec<_>>())
        .bind(calls.iter().map(|c| c.step).collect::<Vec<_>>())
        .bind(calls.iter().map(|c| c.attempt).collect::<Vec<_>>())
        .bind(
            calls
                .iter()
                .map(|c| c.usage.input_tokens as i64)
                .collect::<Vec<_>>(),
        )
        .bind(
            calls
                .iter()
                .map(|c| c.usage.output_tokens as i64)
                .collect::<Vec<_>>(),
        )
        .bind(
            calls
                .iter()
                .map(|c| c.usage.cached_input_tokens as i64)
                .collect::<Vec<_>>(),
        )
        .bind(
            calls
                .iter()
                .map(|c| c.prices.input_per_mtok)
                .collect::<Vec<_>>(),
        )
        .bind(
            calls
                .iter()
                .map(|c| c.prices.output_per_mtok)
                .collect::<Vec<_>>(),
        )
        .bind(
            calls
                .iter()
                .map(|c| c.prices.cached_input_per_mtok)
                .collect::<Vec<_>>(),
        )
        .bind(calls.iter().map(|c| c.cost()).collect::<Vec<_>>())
        .bind(calls.iter().map(|c| c.latency_ms).collect::<Vec<_>>())
        .bind(calls.iter().map(|c| c.http_status).collect::<Vec<_>>())
        .bind(
            calls
                .iter()
                .map(|c| c.outcome.as_str().to_string())
                .collect::<Vec<_>>(),
        )
        .bind(calls.iter().map(|c| c.error.clone()).collect::<Vec<_>>())
        .bind(
            calls
                .iter()
                .map(|c| c.usage.cache_write_input_tokens as i64)
                .collect::<Vec<_>>(),
        )
        .bind(
            calls
                .iter()
                .map(|c| c.usage.reasoning_tokens as i64)
                .collect::<Vec<_>>(),
        )
        .bind(
            calls
                .iter()
                .map(|c| c.prices.cache_write_per_mtok)
                .collect::<Vec<_>>(),
        )
        .bind(calls.iter().map(|c| c.batch_id.clone()).collect::<Vec<_>>())
}
