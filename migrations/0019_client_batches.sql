-- The OpenAI Batch-compatible front door (`/v1/files`, `/v1/batches`):
-- files and batches that clients upload and create over HTTP. Not the
-- batches Switchyard sends to providers (`provider_batches`, `batch_items`).

-- Uploaded input files and the output and error files a batch produces.
CREATE TABLE IF NOT EXISTS client_files (
    id          TEXT PRIMARY KEY,             -- file-…
    purpose     TEXT NOT NULL,                -- batch | batch_output
    filename    TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    content     BYTEA NOT NULL,
    -- The token that uploaded it (or created the batch that produced it):
    -- a `submit` token reads only its own.
    token_name  TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS client_batches (
    id                  TEXT PRIMARY KEY,     -- batch_…
    input_file_id       TEXT NOT NULL REFERENCES client_files (id),
    endpoint            TEXT NOT NULL,
    completion_window   TEXT NOT NULL,
    metadata            JSONB,
    token_name          TEXT,
    -- Stored states only: validating (lines being published), in_progress,
    -- cancelling, finalizing (files being written), completed, cancelled,
    -- failed. Counts and the moment every job ended are derived from `jobs`.
    status              TEXT NOT NULL DEFAULT 'validating'
                        CHECK (status IN ('validating', 'in_progress', 'cancelling', 'finalizing',
                                          'completed', 'cancelled', 'failed', 'expired')),
    -- Where finalizing leads: completed, cancelled or expired.
    ending              TEXT,
    errors              JSONB,
    -- request_counts: total at creation; completed and failed written when
    -- the batch ends (derived from `jobs` until then).
    total               INT NOT NULL,
    completed           INT,
    failed              INT,
    output_file_id      TEXT REFERENCES client_files (id),
    error_file_id       TEXT REFERENCES client_files (id),
    -- Whoever finalizes holds the batch until then (a dead reader's claim lapses).
    claimed_until       TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    in_progress_at      TIMESTAMPTZ,
    cancelling_at       TIMESTAMPTZ,
    finalizing_at       TIMESTAMPTZ,
    completed_at        TIMESTAMPTZ,
    cancelled_at        TIMESTAMPTZ,
    failed_at           TIMESTAMPTZ,
    expired_at          TIMESTAMPTZ,
    expires_at          TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS client_batches_created_idx ON client_batches (created_at DESC, id DESC);

-- One row per input line: the job it became, or why it did not become one.
CREATE TABLE IF NOT EXISTS client_batch_lines (
    batch_id    TEXT NOT NULL REFERENCES client_batches (id),
    line        INT NOT NULL,                 -- 1-based line of the input file
    custom_id   TEXT NOT NULL,
    category    TEXT,
    job_id      TEXT,                         -- NULL: refused (see error_*)
    error_code  TEXT,
    error_message TEXT,
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX IF NOT EXISTS client_batch_lines_job_idx ON client_batch_lines (job_id);

-- Analysts see the batches and their lines (which job each line became);
-- not the files, which hold the clients' prompts and answers as uploaded.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'switchyard_analyst') THEN
        GRANT SELECT ON client_batches, client_batch_lines TO switchyard_analyst;
    END IF;
END
$$;
