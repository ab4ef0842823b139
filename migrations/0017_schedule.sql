-- Job control: `not_before` (the job waits in Postgres until then, parked
-- like a paused budget's jobs) and `expires_at` (a job not started by then
-- ends `expired`, with no provider call).
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'needs_review', 'dead',
                      'cancelled', 'expired'));
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS not_before TIMESTAMPTZ;
CREATE INDEX IF NOT EXISTS jobs_not_before_idx ON jobs (not_before)
    WHERE parked_at IS NOT NULL AND not_before IS NOT NULL;
