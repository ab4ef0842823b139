-- `GET /v1/jobs?metadata.KEY=VALUE`: a rare value is found through this
-- index (then sorted), a common one by walking jobs_created_id_idx; the
-- list query is planned for its values each time (store::jobs::list_jobs).
CREATE INDEX IF NOT EXISTS jobs_metadata_idx ON jobs USING gin ((envelope->'metadata') jsonb_path_ops);
