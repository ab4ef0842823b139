-- jobs_created_id_idx (created_at DESC, id DESC, migration 0014) serves
-- every range scan on jobs.created_at that jobs_created_idx (0008) did, in
-- either direction; one index fewer to maintain on every job insert.
DROP INDEX IF EXISTS jobs_created_idx;
