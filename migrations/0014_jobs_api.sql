-- `GET /v1/jobs` pages jobs newest first by (created_at, id).
CREATE INDEX IF NOT EXISTS jobs_created_id_idx ON jobs (created_at DESC, id DESC);
