-- Which token submitted a job over HTTP: a `submit` token may read back the
-- jobs it submitted (and only those).
CREATE TABLE IF NOT EXISTS api_submissions (
    job_id      TEXT PRIMARY KEY,
    token_name  TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
