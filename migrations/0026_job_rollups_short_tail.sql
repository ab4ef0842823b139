-- The job rollups' raw tail shortened from one to two hours of jobs to a
-- few minutes (migration 0024 rolled only whole hours over an hour old).
--
--   * A late change is now a change to a job created more than five
--     minutes (not an hour) before the changing transaction began: such
--     changes mark the job's hour dirty, as before.
--   * The roller may stop inside an hour: `rolled_until` moves to the
--     minute once no transaction that began before it + 5 minutes is
--     still open, and the open hour's rows are added to as it goes
--     (`job_rollups_add_range`, figures are sums and histograms), so each
--     step reads only the jobs since the last one.
--   * The rows of the hour holding `rolled_until` cover [hour,
--     rolled_until); readers take the rest of that hour raw, and a dirty
--     mark on it re-rolls (or is read raw) only up to `rolled_until`.
-- See src/store/job_rollups.rs.

-- The one place the five minutes are set: a job's changes within it of
-- its creation are rolled with it; later ones mark its hour. IMMUTABLE, so
-- it folds into a constant where it is used (the triggers' WHEN clauses).
CREATE OR REPLACE FUNCTION job_rollups_settle() RETURNS INTERVAL
LANGUAGE sql IMMUTABLE AS $$ SELECT interval '5 minutes' $$;

-- Mark the hours of jobs over five minutes old.
CREATE OR REPLACE FUNCTION job_rollups_job_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hs TIMESTAMPTZ[] := ARRAY[]::TIMESTAMPTZ[];
BEGIN
    IF NEW.created_at < now() - job_rollups_settle() THEN
        hs := hs || rollup_hour(NEW.created_at);
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.created_at < now() - job_rollups_settle() THEN
        hs := hs || rollup_hour(OLD.created_at);
    END IF;
    PERFORM job_rollups_mark(hs);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION job_rollups_jobs_gone() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hs TIMESTAMPTZ[] := ARRAY(
        SELECT DISTINCT rollup_hour(created_at) FROM changed
        WHERE created_at < now() - job_rollups_settle());
BEGIN
    IF cardinality(hs) > 0 THEN
        PERFORM job_rollups_mark(hs);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION job_rollups_job_rows() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hs TIMESTAMPTZ[] := ARRAY(
        SELECT DISTINCT rollup_hour(t.created_at)
        FROM (SELECT (SELECT j.created_at FROM jobs j WHERE j.id = c.job_id) AS created_at
              FROM (SELECT DISTINCT job_id FROM changed) c) t
        WHERE t.created_at < now() - job_rollups_settle());
BEGIN
    IF cardinality(hs) > 0 THEN
        PERFORM job_rollups_mark(hs);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION job_rollups_job_rows_moved() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hs TIMESTAMPTZ[] := ARRAY(
        SELECT DISTINCT rollup_hour(t.created_at)
        FROM (SELECT (SELECT j.created_at FROM jobs j WHERE j.id = c.job_id) AS created_at
              FROM (SELECT job_id FROM changed UNION SELECT job_id FROM old_changed) c) t
        WHERE t.created_at < now() - job_rollups_settle());
BEGIN
    IF cardinality(hs) > 0 THEN
        PERFORM job_rollups_mark(hs);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS job_rollups_job_insert ON jobs;
CREATE TRIGGER job_rollups_job_insert AFTER INSERT ON jobs
    FOR EACH ROW WHEN (NEW.created_at < now() - job_rollups_settle())
    EXECUTE FUNCTION job_rollups_job_row();
DROP TRIGGER IF EXISTS job_rollups_job_update ON jobs;
CREATE TRIGGER job_rollups_job_update AFTER UPDATE ON jobs
    FOR EACH ROW WHEN (NEW.created_at < now() - job_rollups_settle()
                       OR OLD.created_at < now() - job_rollups_settle())
    EXECUTE FUNCTION job_rollups_job_row();

-- Re-roll a dirty hour: its rows replaced by a fresh aggregate of the jobs
-- created in it before `rolled_until`, its mark cleared unless another
-- came meanwhile. Each statement reads its own snapshot, so the mark is
-- read before the jobs are.
CREATE OR REPLACE FUNCTION job_rollups_roll_hour(h TIMESTAMPTZ) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    g BIGINT;
    n BIGINT;
    wm TIMESTAMPTZ;
BEGIN
    SELECT gen INTO g FROM job_rollup_dirty WHERE hour = h;
    SELECT rolled_until INTO wm FROM job_rollup_state;
    DELETE FROM job_rollups WHERE hour = h;
    INSERT INTO job_rollups
    SELECT * FROM job_figures_raw(h, LEAST(h + interval '1 hour', wm));
    SELECT COALESCE(sum(jobs), 0) INTO n FROM job_rollups WHERE hour = h;
    IF g IS NOT NULL THEN
        DELETE FROM job_rollup_dirty WHERE hour = h AND gen = g;
    END IF;
    RETURN n;
END
$$;

-- Add the jobs created in [lo, hi) (within one hour) to that hour's rows.
CREATE OR REPLACE FUNCTION job_rollups_add_range(lo TIMESTAMPTZ, hi TIMESTAMPTZ) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO job_rollups AS j SELECT * FROM job_figures_raw(lo, hi)
    ON CONFLICT (hour, category, variant, route, status, outcome, answered_by) DO UPDATE SET
        jobs = j.jobs + EXCLUDED.jobs,
        fell_back = j.fell_back + EXCLUDED.fell_back,
        reviewed = j.reviewed + EXCLUDED.reviewed,
        calls = j.calls + EXCLUDED.calls,
        cost_usd = j.cost_usd + EXCLUDED.cost_usd,
        answer_cost_usd = j.answer_cost_usd + EXCLUDED.answer_cost_usd,
        retries_cost_usd = j.retries_cost_usd + EXCLUDED.retries_cost_usd,
        classifier_cost_usd = j.classifier_cost_usd + EXCLUDED.classifier_cost_usd,
        fallback_cost_usd = j.fallback_cost_usd + EXCLUDED.fallback_cost_usd,
        stages_cost_usd = j.stages_cost_usd + EXCLUDED.stages_cost_usd,
        voters_cost_usd = j.voters_cost_usd + EXCLUDED.voters_cost_usd,
        judge_cost_usd = j.judge_cost_usd + EXCLUDED.judge_cost_usd,
        first_uncached_input_tokens = j.first_uncached_input_tokens
                                      + EXCLUDED.first_uncached_input_tokens,
        first_cached_input_tokens = j.first_cached_input_tokens
                                    + EXCLUDED.first_cached_input_tokens,
        answer_output_tokens = j.answer_output_tokens + EXCLUDED.answer_output_tokens,
        latency_jobs = j.latency_jobs + EXCLUDED.latency_jobs,
        latency_sum_ms = j.latency_sum_ms + EXCLUDED.latency_sum_ms,
        latency_hist = latency_hist_add(j.latency_hist, EXCLUDED.latency_hist)
$$;

-- One step of the roller: re-roll the oldest quiet dirty hour, else add
-- the next jobs that can close (up to the end of their hour), else move
-- `rolled_until` over a stretch without jobs. `upto` caps how far it may
-- go (tests stop inside an hour with it). Returns the hour re-rolled or
-- the new `rolled_until`; NULL when there is nothing to do or another
-- roller holds the lock. (0024's `job_rollups_step()` is replaced: with
-- the default, old callers get this one.)
DROP FUNCTION IF EXISTS job_rollups_step();
CREATE OR REPLACE FUNCTION job_rollups_step(upto TIMESTAMPTZ DEFAULT 'infinity')
RETURNS TIMESTAMPTZ
LANGUAGE plpgsql AS $$
DECLARE
    wm TIMESTAMPTZ;
    oldest TIMESTAMPTZ;
    closable TIMESTAMPTZ;
    h TIMESTAMPTZ;
    first_job TIMESTAMPTZ;
    lo TIMESTAMPTZ;
    hi TIMESTAMPTZ;
BEGIN
    IF NOT pg_try_advisory_xact_lock(x'5359524a52'::bigint) THEN
        RETURN NULL;
    END IF;
    SELECT rolled_until INTO wm FROM job_rollup_state FOR UPDATE;
    SELECT hour INTO h FROM job_rollup_dirty
    WHERE hour < wm AND touched_at < now() - interval '1 minute'
    ORDER BY hour LIMIT 1;
    IF h IS NOT NULL THEN
        PERFORM job_rollups_roll_hour(h);
        RETURN h;
    END IF;
    -- Jobs created before `closable` may be rolled: five minutes have
    -- passed since, and every transaction open since then has ended, so
    -- any later change to them marks their hour.
    SELECT min(xact_start) INTO oldest FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND xact_start IS NOT NULL;
    closable := LEAST(date_trunc('minute',
                                 LEAST(now(), COALESCE(oldest, now())) - job_rollups_settle()),
                      upto);
    IF wm IS NULL THEN
        SELECT rollup_hour(min(created_at)) INTO wm FROM jobs;
        wm := LEAST(COALESCE(wm, closable), closable);
    END IF;
    IF wm >= closable THEN
        UPDATE job_rollup_state SET rolled_until = wm WHERE rolled_until IS DISTINCT FROM wm;
        RETURN NULL;
    END IF;
    SELECT min(created_at) INTO first_job FROM jobs WHERE created_at >= wm;
    IF first_job IS NULL OR first_job >= closable THEN
        UPDATE job_rollup_state SET rolled_until = closable;
        RETURN closable;
    END IF;
    lo := GREATEST(wm, rollup_hour(first_job));
    hi := LEAST(rollup_hour(first_job) + interval '1 hour', closable);
    PERFORM job_rollups_add_range(lo, hi);
    UPDATE job_rollup_state SET rolled_until = hi;
    RETURN hi;
END
$$;

-- The view: a dirty hour is read raw up to `rolled_until` (the raw tail
-- reads the rest).
CREATE OR REPLACE VIEW job_figures AS
WITH s AS (
    SELECT COALESCE(rolled_until, '-infinity'::timestamptz) AS rolled_until FROM job_rollup_state
)
SELECT j.*
FROM job_rollups j
WHERE j.hour < (SELECT rolled_until FROM s)
  AND NOT EXISTS (SELECT 1 FROM job_rollup_dirty d WHERE d.hour = j.hour)
UNION ALL
SELECT f.* FROM s, LATERAL job_figures_raw(s.rolled_until, 'infinity') f
UNION ALL
SELECT f.* FROM s, job_rollup_dirty d,
       LATERAL job_figures_raw(d.hour, LEAST(d.hour + interval '1 hour', s.rolled_until)) f
WHERE d.hour < s.rolled_until;
