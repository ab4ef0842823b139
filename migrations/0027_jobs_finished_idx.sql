-- The dashboard's "finished in the last ten minutes" and "last minute"
-- (src/store/stats.rs) read jobs by `finished_at`, which had no index: a
-- scan of every job (0.6-0.9 s at 12 million jobs). Partial: jobs still
-- queued or running are not in it, and each job enters it once, when it
-- ends. Building it locks `jobs` against writes for its duration (seconds
-- per million jobs), as 0020's index did.
CREATE INDEX IF NOT EXISTS jobs_finished_idx ON jobs (finished_at) WHERE finished_at IS NOT NULL;
