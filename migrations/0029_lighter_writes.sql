-- Lighter writes: every job inserts and updates a `jobs` row and a `calls`
-- row, and each non-HOT update writes a new entry into every index of its
-- table. Two indexes no query reads any more are dropped, and `calls`
-- leaves room in its pages so that a call's final record usually updates
-- its intent row in place (a HOT update: no new index entries at all).
--
-- * calls_model_idx (model): no statement filters calls by model alone;
--   figures by model read the rollups (call_rollups_live).
-- * calls_day_idx (UTC day, category, provider, model): it served the
--   daily views when they read raw calls (0006); since 0023 they read the
--   rollups, and the roller and the raw tail read calls by created_at
--   (calls_created_idx). Ad-hoc SQL over raw calls should filter on
--   created_at ranges, which that index serves.
-- (jobs_status_idx stays: `GET /v1/jobs?status=cancelled` finds a rare
-- status through it; scripts/explain-jobs-api.sh.)
--
-- fillfactor 80 on calls: measured on `switchyard-bench --json` (40,000
-- jobs; three interleaved pairs against this migration undone), HOT
-- updates went from 9% to 43% of the final records, WAL records per job
-- from 41.1 to 35.4 (bytes -11%), buffer hits per job -7%, Postgres CPU
-- per job -6%, and the table with its indexes ended 4% smaller, not
-- larger: fewer index entries outweigh the pages' free fifth. It applies
-- to pages written from now on; existing pages keep their layout until
-- rewritten.
--
-- Dropping an index locks its table for a moment (no scan).
DROP INDEX IF EXISTS calls_model_idx;
DROP INDEX IF EXISTS calls_day_idx;
ALTER TABLE calls SET (fillfactor = 80);
