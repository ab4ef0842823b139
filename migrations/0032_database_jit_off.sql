-- JIT off for every session of this database, not only Switchyard's own
-- pool (which has always set it). Since `calls` is partitioned (0030) the
-- planner prices the raw tail of `call_rollups_live` (the calls after the
-- roller's watermark, which it cannot know when planning) across every
-- partition: at 10 million calls the estimate passes `jit_above_cost`, and
-- an analyst's `SELECT * FROM cost_daily` in psql spent 60-90 ms compiling
-- a plan that runs in 1 ms. Every query here is index probes and rollup
-- rows: JIT never pays. Needs the database's owner (the user that created
-- it, as `switchyard migrate` does); otherwise a notice, and analysts can
-- `SET jit = off` themselves.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET jit = off', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'not the owner of database %: jit stays as the server sets it', current_database();
END
$$;
