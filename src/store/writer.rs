//! The batched writer: many messages' rows in one transaction (UNNEST),
//! idempotent by the tables' keys, and the database's health. A message is
//! acked only after the transaction holding its rows committed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, warn};

use super::{
    CallRow, Committed, DeadLetterRow, JobRow, JobStatus, ReclassRow, ResultRow, Row, StatusRow,
    StepRow, StoreError,
};

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

/// Write all rows in one transaction, in dependency order.
async fn write_rows(pool: &PgPool, rows: &[&Row]) -> Result<Written> {
    let mut tx = pool.begin().await?;
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
    let (mut steps, mut reclass, mut intents) = (vec![], vec![], vec![]);
    let mut parks: Vec<(String, bool)> = vec![];
    let mut schedules: Vec<(String, i64)> = vec![];
    // One final row per attempt: an upsert may not touch a row twice.
    let mut calls_by_key: HashMap<(&str, i32, i32), &CallRow> = HashMap::new();
    for r in rows {
        match r {
            Row::Job(_) => {}
            Row::DeadLetter(d) => dead.push(d),
            Row::Call(c) => {
                calls_by_key.insert((c.job_id.as_str(), c.step, c.attempt), c);
            }
            Row::Intent { row, busy_for } => intents.push((row, busy_for)),
            Row::Park { job_id, parked } => parks.push((job_id.clone(), *parked)),
            Row::Schedule {
                job_id,
                not_before_ms,
            } => schedules.push((job_id.clone(), *not_before_ms)),
            Row::Result(x) => results.push(x),
            Row::Status(st) => statuses.push(st),
            Row::Step(st) => steps.push(st),
            Row::Reclass(rc) => reclass.push(rc),
        }
    }
    let calls: Vec<&CallRow> = calls_by_key.into_values().collect();
    let mut status = HashMap::new();
    let mut attempts = HashMap::new();
    if !intents.is_empty() {
        // First, before any row lock: intents of the same step from two
        // processes take turns, so the second sees the first (which may
        // have another attempt number) and is refused.
        lock_steps(&mut tx, &intents).await?;
    }
    if !jobs.is_empty() {
        let found = insert_jobs(&mut tx, &jobs).await?;
        // The CHECK constraint allows only known statuses.
        status.extend(
            found
                .into_iter()
                .filter_map(|(id, s)| JobStatus::parse(&s).map(|s| (id, s))),
        );
    }
    if !dead.is_empty() {
        insert_dead_letters(&mut tx, &dead).await?;
    }
    if !reclass.is_empty() {
        update_reclass(&mut tx, &reclass).await?;
    }
    if !intents.is_empty() {
        attempts = insert_intents(&mut tx, &intents).await?;
    }
    if !calls.is_empty() {
        insert_calls(&mut tx, &calls).await?;
    }
    if !steps.is_empty() {
        insert_steps(&mut tx, &steps).await?;
    }
    if !results.is_empty() {
        insert_results(&mut tx, &results).await?;
    }
    if !statuses.is_empty() {
        update_statuses(&mut tx, &statuses).await?;
    }
    // After the statuses: a job parked as it is reclassified is `queued` again.
    if !parks.is_empty() {
        sqlx::query(
            "UPDATE jobs SET parked_at = CASE WHEN u.parked THEN COALESCE(jobs.parked_at, now()) END
             FROM UNNEST($1::text[], $2::bool[]) AS u(id, parked)
             WHERE jobs.id = u.id AND jobs.status = $3",
        )
        .bind(parks.iter().map(|(j, _)| j.clone()).collect::<Vec<_>>())
        .bind(parks.iter().map(|(_, p)| *p).collect::<Vec<_>>())
        .bind(JobStatus::Queued.as_str())
        .execute(&mut *tx)
        .await?;
    }
    if !schedules.is_empty() {
        sqlx::query(
            "UPDATE jobs SET parked_at = COALESCE(jobs.parked_at, now()),
                    not_before = to_timestamp(u.ms / 1000.0)
             FROM UNNEST($1::text[], $2::int8[]) AS u(id, ms)
             WHERE jobs.id = u.id AND jobs.status = $3",
        )
        .bind(schedules.iter().map(|(j, _)| j.clone()).collect::<Vec<_>>())
        .bind(schedules.iter().map(|(_, t)| *t).collect::<Vec<_>>())
        .bind(JobStatus::Queued.as_str())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Written { status, attempts })
}

/// Job rows, new or (a dead-lettered job published again, fixed) replacing
/// a dead one; returns each job's status after the insert: the row written,
/// else the one already there (the statement's snapshot predates its own
/// writes, so a row it updated is taken from `ins` alone).
async fn insert_jobs(
    tx: &mut Transaction<'_, Postgres>,
    jobs: &[&JobRow],
) -> Result<Vec<(String, String)>> {
    let mut found: Vec<(String, String)> = sqlx::query_as(
        "WITH ins AS (
         INSERT INTO jobs (id, category, status, envelope, route_decision, error, enqueued_at, finished_at, variant,
                          callback_url)
         SELECT u.id, u.category, u.status, u.envelope, u.route_decision, u.error,
                to_timestamp(u.enqueued_ms / 1000.0),
                CASE WHEN u.status = ANY($9::text[]) THEN now() END,
                u.variant, u.callback_url
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[], $6::text[], $7::int8[], $8::text[],
                     $11::text[])
              AS u(id, category, status, envelope, route_decision, error, enqueued_ms, variant, callback_url)
         ON CONFLICT (id) DO UPDATE
             SET category = EXCLUDED.category, status = EXCLUDED.status,
                 envelope = EXCLUDED.envelope, route_decision = EXCLUDED.route_decision,
                 error = NULL, enqueued_at = EXCLUDED.enqueued_at, finished_at = NULL,
                 variant = EXCLUDED.variant, callback_url = EXCLUDED.callback_url
             -- A job first seen malformed may be published again, fixed, under its id.
             WHERE jobs.status = $10 AND EXCLUDED.status <> $10
         RETURNING id, status)
         SELECT id, status FROM ins
         UNION ALL
         SELECT j.id, j.status FROM jobs j
         WHERE j.id = ANY($1::text[]) AND NOT EXISTS (SELECT 1 FROM ins WHERE ins.id = j.id)",
    )
    .bind(jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.category.clone()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.status.to_string()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.envelope.clone()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.route_decision.clone()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.error.clone()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.enqueued_at_ms).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.variant.clone()).collect::<Vec<_>>())
    .bind(JobStatus::terminal_names())
    .bind(JobStatus::Dead.as_str())
    .bind(jobs.iter().map(|j| j.callback_url.clone()).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    // A row another transaction committed after this statement's snapshot
    // was taken stopped the insert but is not in that snapshot: read it
    // with a new one (rare: the same job written by two processes at once).
    if found.len() < jobs.len() {
        let seen: std::collections::HashSet<&str> =
            found.iter().map(|(id, _)| id.as_str()).collect();
        let missing: Vec<String> = jobs
            .iter()
            .filter(|j| !seen.contains(j.id.as_str()))
            .map(|j| j.id.clone())
            .collect();
        let more: Vec<(String, String)> =
            sqlx::query_as("SELECT id, status FROM jobs WHERE id = ANY($1)")
                .bind(&missing)
                .fetch_all(&mut **tx)
                .await?;
        found.extend(more);
    }
    Ok(found)
}

async fn insert_dead_letters(
    tx: &mut Transaction<'_, Postgres>,
    dead: &[&DeadLetterRow],
) -> Result<()> {
    sqlx::query(
        "INSERT INTO dead_letters (source, subject, job_id, payload, reason)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[])
         ON CONFLICT (source) DO NOTHING",
    )
    .bind(dead.iter().map(|d| d.source.clone()).collect::<Vec<_>>())
    .bind(dead.iter().map(|d| d.subject.clone()).collect::<Vec<_>>())
    .bind(dead.iter().map(|d| d.job_id.clone()).collect::<Vec<_>>())
    .bind(dead.iter().map(|d| d.payload.clone()).collect::<Vec<_>>())
    .bind(dead.iter().map(|d| d.reason.clone()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The columns of `calls` a cost record fills, in [`bind_calls`]' order.
const CALL_COLUMNS: &str = "job_id, category, provider, model, step, attempt,
    input_tokens, output_tokens, cached_input_tokens,
    price_input_per_mtok, price_output_per_mtok, price_cached_input_per_mtok,
    cost_usd, latency_ms, http_status, outcome, error,
    cache_write_input_tokens, reasoning_tokens, price_cache_write_per_mtok, batch_id";

/// `UNNEST` of [`bind_calls`]' parameters as `u(<CALL_COLUMNS>)`, plus
/// `extra` (more arrays and their names, after the 21 of a call).
fn call_unnest(extra: (&str, &str)) -> String {
    format!(
        "UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::int4[],
                 $7::int8[], $8::int8[], $9::int8[],
                 $10::numeric[], $11::numeric[], $12::numeric[],
                 $13::numeric[], $14::int4[], $15::int4[], $16::text[], $17::text[],
                 $18::int8[], $19::int8[], $20::numeric[], $21::text[]{})
    AS u(job_id, category, provider, model, step, attempt,
         input_tokens, output_tokens, cached_input_tokens,
         price_input_per_mtok, price_output_per_mtok, price_cached_input_per_mtok,
         cost_usd, latency_ms, http_status, outcome, error,
         cache_write_input_tokens, reasoning_tokens, price_cache_write_per_mtok, batch_id{})",
        extra.0, extra.1
    )
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

/// Final cost records. Each replaces its attempt's intent (`unknown`) row;
/// a final row already there stays (a redelivered commit changes nothing).
async fn insert_calls(tx: &mut Transaction<'_, Postgres>, calls: &[&CallRow]) -> Result<()> {
    let sql = format!(
        "INSERT INTO calls ({CALL_COLUMNS}) SELECT * FROM {}
         ON CONFLICT (job_id, step, attempt) DO UPDATE SET
             category = EXCLUDED.category, provider = EXCLUDED.provider, model = EXCLUDED.model,
             input_tokens = EXCLUDED.input_tokens, output_tokens = EXCLUDED.output_tokens,
             cached_input_tokens = EXCLUDED.cached_input_tokens,
             price_input_per_mtok = EXCLUDED.price_input_per_mtok,
             price_output_per_mtok = EXCLUDED.price_output_per_mtok,
             price_cached_input_per_mtok = EXCLUDED.price_cached_input_per_mtok,
             cost_usd = EXCLUDED.cost_usd, latency_ms = EXCLUDED.latency_ms,
             http_status = EXCLUDED.http_status, outcome = EXCLUDED.outcome,
             error = EXCLUDED.error,
             cache_write_input_tokens = EXCLUDED.cache_write_input_tokens,
             reasoning_tokens = EXCLUDED.reasoning_tokens,
             price_cache_write_per_mtok = EXCLUDED.price_cache_write_per_mtok,
             batch_id = EXCLUDED.batch_id
         WHERE calls.outcome = 'unknown'",
        call_unnest(("", ""))
    );
    // Constant SQL: the format! only joins the constants above.
    bind_calls(sqlx::query(sqlx::AssertSqlSafe(sql)), calls)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Transaction-scoped advisory locks on the intents' steps, in a fixed
/// order (no deadlock between two batches).
async fn lock_steps(
    tx: &mut Transaction<'_, Postgres>,
    intents: &[(&CallRow, &Duration)],
) -> Result<()> {
    sqlx::query(
        "SELECT count(pg_advisory_xact_lock(k, s))
         FROM (SELECT DISTINCT hashtext(j) AS k, s
               FROM UNNEST($1::text[], $2::int4[]) AS t(j, s) ORDER BY 1, 2) o",
    )
    .bind(
        intents
            .iter()
            .map(|(c, _)| c.job_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(intents.iter().map(|(c, _)| c.step).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Intent rows; returns the attempt each one holds (see [`Row::Intent`]).
async fn insert_intents(
    tx: &mut Transaction<'_, Postgres>,
    intents: &[(&CallRow, &Duration)],
) -> Result<HashMap<(String, i32), i32>> {
    let sql = format!(
        "INSERT INTO calls ({CALL_COLUMNS})
         SELECT u.job_id, u.category, u.provider, u.model, u.step,
                GREATEST(u.attempt, COALESCE((SELECT max(c.attempt) FROM calls c
                                              WHERE c.job_id = u.job_id AND c.step = u.step), 0) + 1),
                u.input_tokens, u.output_tokens, u.cached_input_tokens,
                u.price_input_per_mtok, u.price_output_per_mtok, u.price_cached_input_per_mtok,
                u.cost_usd, u.latency_ms, u.http_status, u.outcome, u.error,
                u.cache_write_input_tokens, u.reasoning_tokens, u.price_cache_write_per_mtok,
                u.batch_id
         FROM {}
         -- Each check is a lookup by key per row: OFFSET 0 keeps Postgres
         -- from turning them into joins that scan the tables (see write_pool).
         WHERE NOT EXISTS (SELECT 1 FROM calls c
                           WHERE c.job_id = u.job_id AND c.step = u.step
                             AND (c.outcome IN ('ok', 'cached')
                                  OR (c.outcome = 'unknown'
                                      AND c.created_at > now() - make_interval(secs => u.busy_secs)))
                           OFFSET 0)
           AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.job_id = u.job_id AND s.step = u.step
                           OFFSET 0)
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = u.job_id
                           AND j.status = ANY($23::text[]) OFFSET 0)
         ON CONFLICT (job_id, step, attempt) DO NOTHING
         RETURNING job_id, step, attempt",
        call_unnest((", $22::float8[]", ", busy_secs"))
    );
    let rows: Vec<&CallRow> = intents.iter().map(|(r, _)| *r).collect();
    let busy: Vec<f64> = intents.iter().map(|(_, d)| d.as_secs_f64()).collect();
    let rows: Vec<(String, i32, i32)> = bind_calls(sqlx::query(sqlx::AssertSqlSafe(sql)), &rows)
        .bind(busy)
        .bind(JobStatus::terminal_names())
        .try_map(|r: sqlx::postgres::PgRow| {
            use sqlx::Row as _;
            Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))
        })
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows.into_iter().map(|(j, s, a)| ((j, s), a)).collect())
}

async fn insert_results(tx: &mut Transaction<'_, Postgres>, results: &[&ResultRow]) -> Result<()> {
    // Cost and tokens are the sums over all the job's calls, committed earlier
    // in this same transaction or in earlier ones.
    sqlx::query(
        "INSERT INTO results (job_id, category, output, model, finish_reason, cost_usd,
                              input_tokens, output_tokens, latency_ms, answer_step, output_json)
         SELECT r.job_id, r.category, r.output, r.model, r.finish_reason,
                COALESCE(c.cost, 0), COALESCE(c.inp, 0), COALESCE(c.outp, 0), r.latency_ms,
                r.answer_step, r.output_json::jsonb
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
                     $7::int4[], $8::text[])
              AS r(job_id, category, output, model, finish_reason, latency_ms, answer_step,
                   output_json)
         LEFT JOIN LATERAL (
             SELECT sum(cost_usd) AS cost, sum(input_tokens)::int8 AS inp,
                    sum(output_tokens)::int8 AS outp
             FROM calls WHERE calls.job_id = r.job_id
         ) c ON true
         -- A cancelled job keeps no result (its last call is recorded).
         WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = r.job_id AND j.status = $9 OFFSET 0)
         ON CONFLICT (job_id) DO NOTHING",
    )
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
    .bind(JobStatus::Cancelled.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn update_statuses(tx: &mut Transaction<'_, Postgres>, rows: &[&StatusRow]) -> Result<()> {
    // A terminal status is final: never overwrite one.
    sqlx::query(
        "UPDATE jobs SET status = u.status, error = COALESCE(u.error, jobs.error),
                review_reason = COALESCE(u.review_reason, jobs.review_reason),
                route_decision = CASE WHEN u.tried IS NULL THEN jobs.route_decision
                    ELSE jsonb_set(COALESCE(jobs.route_decision, '{}'::jsonb), '{tried}', u.tried) END,
                finished_at = CASE WHEN u.status = ANY($6::text[])
                                   THEN now() ELSE jobs.finished_at END
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[])
              AS u(id, status, error, review_reason, tried)
         WHERE jobs.id = u.id
           AND jobs.status <> ALL($6::text[])",
    )
    .bind(rows.iter().map(|r| r.job_id.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.status.to_string()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.error.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.review_reason.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.tried.clone()).collect::<Vec<_>>())
    .bind(JobStatus::terminal_names())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn insert_steps(tx: &mut Transaction<'_, Postgres>, rows: &[&StepRow]) -> Result<()> {
    sqlx::query(
        "INSERT INTO steps (job_id, step, model, outcome, output, reason)
         SELECT * FROM UNNEST($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::text[])
         ON CONFLICT (job_id, step) DO NOTHING",
    )
    .bind(rows.iter().map(|r| r.job_id.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.record.step).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.record.model.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| super::jobs::outcome_str(r.record.outcome).to_string()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.record.output.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.record.reason.clone()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn update_reclass(tx: &mut Transaction<'_, Postgres>, rows: &[&ReclassRow]) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET category = u.category, variant = u.variant, route_decision = u.route_decision,
                callback_url = COALESCE(jobs.envelope->>'callback_url', u.callback_default)
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::jsonb[], $6::text[])
              AS u(id, category, variant, route_decision, callback_default)
         WHERE jobs.id = u.id AND jobs.status <> ALL($5::text[])",
    )
    .bind(rows.iter().map(|r| r.job_id.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.category.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.variant.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.route_decision.clone()).collect::<Vec<_>>())
    .bind(JobStatus::terminal_names())
    .bind(rows.iter().map(|r| r.callback_default.clone()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
