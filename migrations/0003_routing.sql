-- Multi-step routing: one row per finished step of a job (fallback target,
-- pipeline stage, consensus voter or judge, classifier), so a restarted
-- worker resumes at the first unfinished step and never re-runs (or re-pays
-- for) a recorded one.
CREATE TABLE IF NOT EXISTS steps (
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    step        INTEGER NOT NULL,
    model       TEXT NOT NULL,
    outcome     TEXT NOT NULL CHECK (outcome IN ('ok','failed','too_slow')),
    output      TEXT,
    reason      TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, step)
);

-- The A/B variant a job took (NULL: the category's main route), and why a
-- job waits for a person.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS variant TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS review_reason TEXT;
CREATE INDEX IF NOT EXISTS jobs_review_idx ON jobs (created_at) WHERE status = 'needs_review';
