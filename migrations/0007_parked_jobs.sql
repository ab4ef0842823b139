-- Jobs of a category whose budget is paused wait here (status `queued`,
-- `parked_at` set, message acked) until the next period; a worker then
-- publishes them again.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS parked_at TIMESTAMPTZ;
CREATE INDEX IF NOT EXISTS jobs_parked_idx ON jobs (category, parked_at) WHERE parked_at IS NOT NULL;
