-- Switchyard schema v1: jobs, calls (the cost record), results, dead_letters.

CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT PRIMARY KEY,
    category        TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued','running','succeeded','failed','needs_review','dead')),
    envelope        JSONB,
    route_decision  JSONB,
    error           TEXT,
    enqueued_at     TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at     TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS jobs_status_idx ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_category_created_idx ON jobs (category, created_at);

CREATE TABLE IF NOT EXISTS calls (
    id                          BIGSERIAL PRIMARY KEY,
    job_id                      TEXT NOT NULL,
    category                    TEXT NOT NULL,
    provider                    TEXT NOT NULL,
    model                       TEXT NOT NULL,
    step                        INTEGER NOT NULL,
    attempt                     INTEGER NOT NULL,
    input_tokens                BIGINT NOT NULL DEFAULT 0,
    output_tokens               BIGINT NOT NULL DEFAULT 0,
    cached_input_tokens         BIGINT NOT NULL DEFAULT 0,
    price_input_per_mtok        NUMERIC NOT NULL,
    price_output_per_mtok       NUMERIC NOT NULL,
    price_cached_input_per_mtok NUMERIC NOT NULL,
    cost_usd                    NUMERIC NOT NULL,
    latency_ms                  INTEGER NOT NULL,
    http_status                 INTEGER,
    outcome                     TEXT NOT NULL
                                CHECK (outcome IN ('ok','retryable_error','terminal_error','unknown')),
    error                       TEXT,
    created_at                  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (job_id, step, attempt)
);
CREATE INDEX IF NOT EXISTS calls_created_idx ON calls (created_at);
CREATE INDEX IF NOT EXISTS calls_model_idx ON calls (model);

CREATE TABLE IF NOT EXISTS results (
    job_id          TEXT PRIMARY KEY REFERENCES jobs (id),
    category        TEXT NOT NULL,
    output          TEXT NOT NULL,
    model           TEXT NOT NULL,
    finish_reason   TEXT,
    cost_usd        NUMERIC NOT NULL,
    input_tokens    BIGINT NOT NULL,
    output_tokens   BIGINT NOT NULL,
    latency_ms      BIGINT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS results_created_idx ON results (created_at);

CREATE TABLE IF NOT EXISTS dead_letters (
    id          BIGSERIAL PRIMARY KEY,
    -- "<stream>:<sequence>": a redelivered bad message is recorded once.
    source      TEXT UNIQUE,
    subject     TEXT NOT NULL,
    job_id      TEXT,
    payload     BYTEA NOT NULL,
    reason      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dead_letters_job_idx ON dead_letters (job_id);
