-- Hourly job rollups: the per-job figures of the report (jobs by status,
-- routes, served-by, the savings' cost split) summed per hour of the jobs'
-- creation × category × variant × route × status × outcome × answering
-- model, so a window of months reads a few thousand rows, not every job.
--
-- How it stays exact (see src/store/job_rollups.rs for the long version):
--   * A background roller (any worker; one at a time) snapshots whole
--     hours from `job_costs` once they are over an hour old, and advances
--     `job_rollup_state.rolled_until`.
--   * Any later change to a job created more than an hour before the
--     changing transaction began (its row, its calls, results or steps)
--     marks the job's hour in `job_rollup_dirty`, in that transaction.
--     Readers read dirty hours raw; the roller re-rolls them when quiet.
--   * The roller only closes hour H once no transaction that began before
--     H + 2 hours is still open: a change that was too young to mark has
--     then committed, and the roll sees it.
-- Ratings are not rolled (feedback arrives late and often): readers count
-- them from `feedback`, which is small.

CREATE TABLE IF NOT EXISTS job_rollups (
    hour                        TIMESTAMPTZ NOT NULL,
    category                    TEXT NOT NULL,
    variant                     TEXT NOT NULL,
    route                       TEXT NOT NULL,
    status                      TEXT NOT NULL,
    outcome                     TEXT NOT NULL,
    -- The result's model; '' for jobs without a result.
    answered_by                 TEXT NOT NULL,
    jobs                        BIGINT NOT NULL,
    fell_back                   BIGINT NOT NULL,
    reviewed                    BIGINT NOT NULL,
    calls                       BIGINT NOT NULL,
    cost_usd                    NUMERIC NOT NULL,
    answer_cost_usd             NUMERIC NOT NULL,
    retries_cost_usd            NUMERIC NOT NULL,
    classifier_cost_usd         NUMERIC NOT NULL,
    fallback_cost_usd           NUMERIC NOT NULL,
    stages_cost_usd             NUMERIC NOT NULL,
    voters_cost_usd             NUMERIC NOT NULL,
    judge_cost_usd              NUMERIC NOT NULL,
    first_uncached_input_tokens NUMERIC NOT NULL,
    first_cached_input_tokens   NUMERIC NOT NULL,
    answer_output_tokens        NUMERIC NOT NULL,
    -- Results' enqueue-to-result latency: how many and their sum.
    latency_jobs                BIGINT NOT NULL,
    latency_sum_ms              NUMERIC NOT NULL,
    PRIMARY KEY (hour, category, variant, route, status, outcome, answered_by)
);

-- Every hour before `rolled_until` has been rolled (NULL: none yet).
CREATE TABLE IF NOT EXISTS job_rollup_state (
    one          BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    rolled_until TIMESTAMPTZ
);
INSERT INTO job_rollup_state (one, rolled_until) VALUES (true, NULL) ON CONFLICT DO NOTHING;

-- Hours changed since they were rolled. `gen` counts the marks: the
-- roller clears a mark only if no other came while it rolled.
CREATE TABLE IF NOT EXISTS job_rollup_dirty (
    hour       TIMESTAMPTZ PRIMARY KEY,
    gen        BIGINT NOT NULL DEFAULT 1,
    touched_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Mark the hours of `hours` (already filtered to old jobs).
CREATE OR REPLACE FUNCTION job_rollups_mark(hours TIMESTAMPTZ[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO job_rollup_dirty AS d (hour)
    SELECT DISTINCT h FROM unnest(hours) h ORDER BY 1
    ON CONFLICT (hour) DO UPDATE SET gen = d.gen + 1, touched_at = now()
$$;

-- A job row inserted or updated: row-level, and only called (the WHEN
-- clause, evaluated without a function call) for jobs over an hour old.
CREATE OR REPLACE FUNCTION job_rollups_job_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM job_rollups_mark(ARRAY[rollup_hour(NEW.created_at)]);
    RETURN NULL;
END
$$;

-- Jobs deleted (retention): statement-level, the deleted rows at hand.
CREATE OR REPLACE FUNCTION job_rollups_jobs_gone() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM job_rollups_mark(ARRAY(
        SELECT DISTINCT rollup_hour(created_at) FROM changed
        WHERE created_at < now() - interval '1 hour'));
    RETURN NULL;
END
$$;

-- Rows naming a job (calls, results, steps) inserted, updated or deleted:
-- the job's hour, if the job is over an hour old.
CREATE OR REPLACE FUNCTION job_rollups_job_rows() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM job_rollups_mark(ARRAY(
        SELECT DISTINCT rollup_hour(j.created_at)
        FROM (SELECT DISTINCT job_id FROM changed) c JOIN jobs j ON j.id = c.job_id
        WHERE j.created_at < now() - interval '1 hour'));
    RETURN NULL;
END
$$;

-- Any of them truncated: nothing rolled stays true.
CREATE OR REPLACE FUNCTION job_rollups_reset() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_rollups;
    DELETE FROM job_rollup_dirty;
    UPDATE job_rollup_state SET rolled_until = NULL;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS job_rollups_job_insert ON jobs;
CREATE TRIGGER job_rollups_job_insert AFTER INSERT ON jobs
    FOR EACH ROW WHEN (NEW.created_at < now() - interval '1 hour')
    EXECUTE FUNCTION job_rollups_job_row();
DROP TRIGGER IF EXISTS job_rollups_job_update ON jobs;
CREATE TRIGGER job_rollups_job_update AFTER UPDATE ON jobs
    FOR EACH ROW WHEN (NEW.created_at < now() - interval '1 hour'
                       OR OLD.created_at < now() - interval '1 hour')
    EXECUTE FUNCTION job_rollups_job_row();
DROP TRIGGER IF EXISTS job_rollups_jobs_delete ON jobs;
CREATE TRIGGER job_rollups_jobs_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION job_rollups_jobs_gone();

DO $$
DECLARE
    t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['calls', 'results', 'steps'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS job_rollups_%1$s_insert ON %1$I', t);
        EXECUTE format('CREATE TRIGGER job_rollups_%1$s_insert AFTER INSERT ON %1$I
                            REFERENCING NEW TABLE AS changed
                            FOR EACH STATEMENT EXECUTE FUNCTION job_rollups_job_rows()', t);
        EXECUTE format('DROP TRIGGER IF EXISTS job_rollups_%1$s_update ON %1$I', t);
        EXECUTE format('CREATE TRIGGER job_rollups_%1$s_update AFTER UPDATE ON %1$I
                            REFERENCING NEW TABLE AS changed
                            FOR EACH STATEMENT EXECUTE FUNCTION job_rollups_job_rows()', t);
        EXECUTE format('DROP TRIGGER IF EXISTS job_rollups_%1$s_delete ON %1$I', t);
        EXECUTE format('CREATE TRIGGER job_rollups_%1$s_delete AFTER DELETE ON %1$I
                            REFERENCING OLD TABLE AS changed
                            FOR EACH STATEMENT EXECUTE FUNCTION job_rollups_job_rows()', t);
    END LOOP;
    FOREACH t IN ARRAY ARRAY['jobs', 'calls', 'results', 'steps'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS job_rollups_%1$s_truncate ON %1$I', t);
        EXECUTE format('CREATE TRIGGER job_rollups_%1$s_truncate AFTER TRUNCATE ON %1$I
                            FOR EACH STATEMENT EXECUTE FUNCTION job_rollups_reset()', t);
    END LOOP;
END
$$;

-- Roll one hour: its rows replaced by a fresh aggregate of `job_costs`,
-- its dirty mark cleared unless another came meanwhile. Each statement
-- reads its own snapshot, so the mark is read before the jobs are.
CREATE OR REPLACE FUNCTION job_rollups_roll_hour(h TIMESTAMPTZ) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    g BIGINT;
    n BIGINT;
BEGIN
    SELECT gen INTO g FROM job_rollup_dirty WHERE hour = h;
    DELETE FROM job_rollups WHERE hour = h;
    INSERT INTO job_rollups
    SELECT h, jc.category, jc.variant, jc.route, jc.status, jc.outcome,
           COALESCE(jc.answered_by, ''),
           count(*), count(*) FILTER (WHERE jc.fell_back), count(*) FILTER (WHERE jc.reviewed),
           sum(jc.calls), sum(jc.cost_usd), sum(jc.answer_cost_usd), sum(jc.retries_cost_usd),
           sum(jc.classifier_cost_usd), sum(jc.fallback_cost_usd), sum(jc.stages_cost_usd),
           sum(jc.voters_cost_usd), sum(jc.judge_cost_usd), sum(jc.first_uncached_input_tokens),
           sum(jc.first_cached_input_tokens), sum(jc.answer_output_tokens),
           count(r.latency_ms), COALESCE(sum(r.latency_ms), 0)
    FROM job_costs jc LEFT JOIN results r ON r.job_id = jc.job_id
    WHERE jc.created_at >= h AND jc.created_at < h + interval '1 hour'
    GROUP BY 2, 3, 4, 5, 6, 7;
    SELECT COALESCE(sum(jobs), 0) INTO n FROM job_rollups WHERE hour = h;
    IF g IS NOT NULL THEN
        DELETE FROM job_rollup_dirty WHERE hour = h AND gen = g;
    END IF;
    RETURN n;
END
$$;

-- One step of the roller: re-roll the oldest quiet dirty hour, else roll
-- the next hour that can close, else move `rolled_until` over empty hours.
-- Returns the hour rolled (or the new `rolled_until`), NULL when there is
-- nothing to do or another roller holds the lock.
CREATE OR REPLACE FUNCTION job_rollups_step() RETURNS TIMESTAMPTZ
LANGUAGE plpgsql AS $$
DECLARE
    wm TIMESTAMPTZ;
    oldest TIMESTAMPTZ;
    closable TIMESTAMPTZ;
    h TIMESTAMPTZ;
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
    -- Hours before `closable` may close: an hour after their end has
    -- passed, and every transaction open since then has ended.
    SELECT min(xact_start) INTO oldest FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND xact_start IS NOT NULL;
    closable := rollup_hour(LEAST(now(), COALESCE(oldest, now())) - interval '1 hour');
    IF wm IS NULL THEN
        SELECT rollup_hour(min(created_at)) INTO wm FROM jobs;
        wm := LEAST(COALESCE(wm, closable), closable);
    END IF;
    IF wm >= closable THEN
        UPDATE job_rollup_state SET rolled_until = wm WHERE rolled_until IS DISTINCT FROM wm;
        RETURN NULL;
    END IF;
    SELECT rollup_hour(min(created_at)) INTO h FROM jobs WHERE created_at >= wm;
    IF h IS NULL OR h >= closable THEN
        UPDATE job_rollup_state SET rolled_until = closable;
        RETURN closable;
    END IF;
    PERFORM job_rollups_roll_hour(h);
    UPDATE job_rollup_state SET rolled_until = h + interval '1 hour';
    RETURN h;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'switchyard_analyst') THEN
        GRANT SELECT ON job_rollups, job_rollup_state, job_rollup_dirty TO switchyard_analyst;
    END IF;
END
$$;
