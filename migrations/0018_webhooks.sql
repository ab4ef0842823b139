-- Completion webhooks. A job's effective callback URL (its envelope's
-- `callback_url`, else its category's default) is stored on its row when
-- the row is written. When the job's status becomes final, a trigger (in
-- the same transaction as the status change, so every path that ends a
-- job is covered: lane settle, dead letters, cancel, expiry, review
-- resolve) inserts the first attempt of a delivery series. The worker's
-- deliverer claims due attempts, POSTs, and records each one here: one
-- row per attempt, the next attempt of a series a new row.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS callback_url TEXT;

CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id           BIGSERIAL PRIMARY KEY,
    -- The id of the series' first attempt: one series per job ending (or replay).
    series       BIGINT NOT NULL,
    attempt      INT NOT NULL CHECK (attempt >= 1),
    job_id       TEXT NOT NULL,
    url          TEXT NOT NULL,
    -- pending: due at `due_at`; ok: accepted (2xx); failed: an HTTP error
    -- status or a transport error (timeout, refused connection); refused:
    -- not sent (the URL is not on `webhooks.allow_hosts`, or no secret).
    state        TEXT NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'ok', 'failed', 'refused')),
    http_status  INT,
    error        TEXT,
    latency_ms   INT,
    due_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A deliverer holds a claimed attempt until then; after it (the
    -- deliverer died), another one sends it again: at least once.
    leased_until TIMESTAMPTZ,
    attempted_at TIMESTAMPTZ,
    -- The series this one replays (`switchyard webhooks replay`).
    replay_of    BIGINT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (series, attempt)
);
-- The deliverers' claim (`state = $1 AND due_at <= now()`; not a partial
-- index: the state is a bound parameter).
CREATE INDEX IF NOT EXISTS webhook_deliveries_due_idx ON webhook_deliveries (state, due_at);
CREATE INDEX IF NOT EXISTS webhook_deliveries_job_idx ON webhook_deliveries (job_id, id);

-- The final statuses: `store::JobStatus::is_final` (a test checks that
-- this list and that function agree). `needs_review` is not final: the
-- review's resolve ends the job, and that is when the webhook is sent.
CREATE OR REPLACE FUNCTION webhook_on_job_end() RETURNS trigger AS $$
DECLARE
    first_id BIGINT;
BEGIN
    IF NEW.callback_url IS NOT NULL
       AND NEW.status IN ('succeeded', 'failed', 'dead', 'cancelled', 'expired')
       AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status) THEN
        first_id := nextval(pg_get_serial_sequence('webhook_deliveries', 'id'));
        INSERT INTO webhook_deliveries (id, series, attempt, job_id, url)
        VALUES (first_id, first_id, 1, NEW.id, NEW.callback_url);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS jobs_webhook ON jobs;
CREATE TRIGGER jobs_webhook AFTER INSERT OR UPDATE OF status ON jobs
    FOR EACH ROW EXECUTE FUNCTION webhook_on_job_end();

-- Not granted to switchyard_analyst: delivery bookkeeping is the
-- operators' (`switchyard webhooks list`, `GET /v1/webhooks`).
