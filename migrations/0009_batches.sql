-- Provider batch APIs (half price, answered within 24 hours). A batch is
-- ours first (`open`, filling per provider and model), then submitted, then
-- polled by one worker at a time (a lease), then ended; its items map the
-- provider's `custom_id` back to the call (job, step, attempt). A batch
-- call's cost record is a `calls` row with `batch_id` set.
CREATE TABLE IF NOT EXISTS provider_batches (
    id                  TEXT PRIMARY KEY,
    provider            TEXT NOT NULL,
    model               TEXT NOT NULL,
    state               TEXT NOT NULL DEFAULT 'open'
                        CHECK (state IN ('open', 'submitting', 'submitted', 'ended')),
    provider_batch_id   TEXT,
    provider_state      TEXT,
    items               INTEGER NOT NULL DEFAULT 0,
    bytes               BIGINT NOT NULL DEFAULT 0,
    succeeded           INTEGER NOT NULL DEFAULT 0,
    failed              INTEGER NOT NULL DEFAULT 0,
    -- Result lines that could not be read, and lines naming no item of the
    -- batch: counted at ingest, skipped.
    malformed_lines     INTEGER NOT NULL DEFAULT 0,
    unknown_lines       INTEGER NOT NULL DEFAULT 0,
    flush_at            TIMESTAMPTZ NOT NULL,
    next_poll_at        TIMESTAMPTZ,
    lease_owner         TEXT,
    lease_until         TIMESTAMPTZ,
    error               TEXT,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    submitted_at        TIMESTAMPTZ,
    ended_at            TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS provider_batches_state_idx ON provider_batches (provider, state);
CREATE UNIQUE INDEX IF NOT EXISTS provider_batches_provider_id_idx
    ON provider_batches (provider, provider_batch_id) WHERE provider_batch_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS batch_items (
    batch_id    TEXT NOT NULL REFERENCES provider_batches (id),
    custom_id   TEXT NOT NULL,
    job_id      TEXT NOT NULL,
    step        INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    -- The call message, to go on with the job when the result is in.
    call        JSONB NOT NULL,
    -- pending: in its batch; handed_off: sent real-time because its job's
    -- deadline drew near (the batch's answer, if any, is still recorded);
    -- done: its result handed on.
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'handed_off', 'done')),
    PRIMARY KEY (batch_id, custom_id),
    UNIQUE (job_id, step, attempt)
);
CREATE INDEX IF NOT EXISTS batch_items_pending_idx ON batch_items (job_id, step) WHERE state = 'pending';
-- The deadline guard looks for pending items whose job's deadline draws near.
CREATE INDEX IF NOT EXISTS batch_items_deadline_idx
    ON batch_items (((call->>'deadline_ms')::int8)) WHERE state = 'pending';

ALTER TABLE calls ADD COLUMN IF NOT EXISTS batch_id TEXT;
CREATE INDEX IF NOT EXISTS calls_batch_idx ON calls (batch_id) WHERE batch_id IS NOT NULL;

-- Per category and model: calls through batches, their share, and what
-- batching saved (batch prices are half the real-time ones).
CREATE OR REPLACE VIEW batch_savings AS
SELECT category, provider, model,
       count(*) AS calls,
       count(*) FILTER (WHERE batch_id IS NOT NULL) AS batched_calls,
       round(count(*) FILTER (WHERE batch_id IS NOT NULL)::numeric / count(*), 4) AS batched_share,
       COALESCE(sum(cost_usd) FILTER (WHERE batch_id IS NOT NULL), 0) AS batched_cost_usd,
       COALESCE(sum(cost_usd * 2) FILTER (WHERE batch_id IS NOT NULL), 0) AS realtime_equivalent_usd,
       COALESCE(sum(cost_usd) FILTER (WHERE batch_id IS NOT NULL), 0) AS saved_usd
FROM calls
GROUP BY category, provider, model;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'switchyard_analyst') THEN
        GRANT SELECT ON provider_batches, batch_savings TO switchyard_analyst;
    END IF;
END
$$;
