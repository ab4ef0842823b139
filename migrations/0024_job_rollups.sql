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
    -- Their histogram (migration 0022's buckets), for percentiles.
    latency_hist                BIGINT[],
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
-- clause, evaluated without a function call) for jobs over an hour old;
-- an update that moves a job marks the hour it left too.
CREATE OR REPLACE FUNCTION job_rollups_job_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hs TIMESTAMPTZ[] := ARRAY[]::TIMESTAMPTZ[];
BEGIN
    IF NEW.created_at < now() - interval '1 hour' THEN
        hs := hs || rollup_hour(NEW.created_at);
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.created_at < now() - interval '1 hour' THEN
        hs := hs || rollup_hour(OLD.created_at);
    END IF;
    PERFORM job_rollups_mark(hs);
    RETURN NULL;
END
$$;

-- Jobs deleted (retention): statement-level, the deleted rows at hand.
CREATE OR REPLACE FUNCTION job_rollups_jobs_gone() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hs TIMESTAMPTZ[] := ARRAY(
        SELECT DISTINCT rollup_hour(created_at) FROM changed
        WHERE created_at < now() - interval '1 hour');
BEGIN
    IF cardinality(hs) > 0 THEN
        PERFORM job_rollups_mark(hs);
    END IF;
    RETURN NULL;
END
$$;

-- Rows naming a job (calls, results, steps) inserted, updated or deleted:
-- the job's hour, if the job is over an hour old. One primary-key probe
-- per job (a subquery per row: a join's plan, cached for the first
-- statement's size, may scan `jobs` whole).
CREATE OR REPLACE FUNCTION job_rollups_job_rows() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hs TIMESTAMPTZ[] := ARRAY(
        SELECT DISTINCT rollup_hour(t.created_at)
        FROM (SELECT (SELECT j.created_at FROM jobs j WHERE j.id = c.job_id) AS created_at
              FROM (SELECT DISTINCT job_id FROM changed) c) t
        WHERE t.created_at < now() - interval '1 hour');
BEGIN
    IF cardinality(hs) > 0 THEN
        PERFORM job_rollups_mark(hs);
    END IF;
    RETURN NULL;
END
$$;

-- The same for updates, which may also move rows to another job.
CREATE OR REPLACE FUNCTION job_rollups_job_rows_moved() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hs TIMESTAMPTZ[] := ARRAY(
        SELECT DISTINCT rollup_hour(t.created_at)
        FROM (SELECT (SELECT j.created_at FROM jobs j WHERE j.id = c.job_id) AS created_at
              FROM (SELECT job_id FROM changed UNION SELECT job_id FROM old_changed) c) t
        WHERE t.created_at < now() - interval '1 hour');
BEGIN
    IF cardinality(hs) > 0 THEN
        PERFORM job_rollups_mark(hs);
    END IF;
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
                            REFERENCING OLD TABLE AS old_changed NEW TABLE AS changed
                            FOR EACH STATEMENT EXECUTE FUNCTION job_rollups_job_rows_moved()', t);
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

-- The job rollup rows of the jobs created in [lo, hi) (whose id is LIKE
-- `id_like`, of category `cat` if given), aggregated from `job_costs`:
-- the one definition of every rolled figure. Planned on each call with
-- the bounds known, so a short range walks the indexes.
CREATE OR REPLACE FUNCTION job_figures_raw(lo TIMESTAMPTZ, hi TIMESTAMPTZ,
                                           id_like TEXT DEFAULT '%', cat TEXT DEFAULT NULL)
RETURNS TABLE (
    hour TIMESTAMPTZ, category TEXT, variant TEXT, route TEXT, status TEXT, outcome TEXT,
    answered_by TEXT, jobs BIGINT, fell_back BIGINT, reviewed BIGINT, calls BIGINT,
    cost_usd NUMERIC, answer_cost_usd NUMERIC, retries_cost_usd NUMERIC,
    classifier_cost_usd NUMERIC, fallback_cost_usd NUMERIC, stages_cost_usd NUMERIC,
    voters_cost_usd NUMERIC, judge_cost_usd NUMERIC, first_uncached_input_tokens NUMERIC,
    first_cached_input_tokens NUMERIC, answer_output_tokens NUMERIC, latency_jobs BIGINT,
    latency_sum_ms NUMERIC, latency_hist BIGINT[])
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF lo IS NULL OR hi IS NULL OR lo >= hi THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
    'SELECT rollup_hour(jc.created_at), jc.category, jc.variant, jc.route, jc.status, jc.outcome,
            COALESCE(jc.answered_by, ''''),
            count(*), count(*) FILTER (WHERE jc.fell_back), count(*) FILTER (WHERE jc.reviewed),
            sum(jc.calls)::int8, sum(jc.cost_usd), sum(jc.answer_cost_usd),
            sum(jc.retries_cost_usd), sum(jc.classifier_cost_usd), sum(jc.fallback_cost_usd),
            sum(jc.stages_cost_usd), sum(jc.voters_cost_usd), sum(jc.judge_cost_usd),
            sum(jc.first_uncached_input_tokens), sum(jc.first_cached_input_tokens),
            sum(jc.answer_output_tokens), count(r.latency_ms), COALESCE(sum(r.latency_ms), 0),
            latency_hist(CASE WHEN r.latency_ms IS NOT NULL
                              THEN latency_bucket(r.latency_ms) END, 1)
     FROM job_costs jc LEFT JOIN results r ON r.job_id = jc.job_id
     WHERE jc.created_at >= $1 AND jc.created_at < $2 AND jc.job_id LIKE $3
       AND ($4::text IS NULL OR jc.category = $4)
     GROUP BY 1, 2, 3, 4, 5, 6, 7'
    USING lo, hi, id_like, cat;
END
$$ ROWS 50;

-- Roll one hour: its rows replaced by a fresh aggregate, its dirty mark
-- cleared unless another came meanwhile. Each statement reads its own
-- snapshot, so the mark is read before the jobs are.
CREATE OR REPLACE FUNCTION job_rollups_roll_hour(h TIMESTAMPTZ) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    g BIGINT;
    n BIGINT;
BEGIN
    SELECT gen INTO g FROM job_rollup_dirty WHERE hour = h;
    DELETE FROM job_rollups WHERE hour = h;
    INSERT INTO job_rollups SELECT * FROM job_figures_raw(h, h + interval '1 hour');
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

-- Every job's figures per hour of creation, exact whatever the roller has
-- done: rolled hours from `job_rollups`, the rest (hours not rolled yet,
-- hours marked dirty) aggregated from `job_costs`. The views below read it.
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
       LATERAL job_figures_raw(d.hour, d.hour + interval '1 hour') f
WHERE d.hour < s.rolled_until;

-- The job halves of the analysts' views (migrations 0006, 0008, 0023)
-- and `model_usage` on `job_figures`: same columns and types, same numbers, except that
-- `latency_by_category`'s end-to-end percentiles now come from histograms
-- (the representative value of the bucket, within about 9%, as the call
-- percentiles already did) instead of sorting every result.
CREATE OR REPLACE VIEW category_rates AS
WITH j AS (
    SELECT category,
           sum(jobs)::int8 AS jobs,
           COALESCE(sum(jobs) FILTER (WHERE status = 'succeeded'), 0)::int8 AS succeeded,
           COALESCE(sum(jobs) FILTER (WHERE status = 'failed'), 0)::int8 AS failed,
           COALESCE(sum(jobs) FILTER (WHERE status = 'needs_review'), 0)::int8 AS needs_review,
           COALESCE(sum(jobs) FILTER (WHERE status = 'dead'), 0)::int8 AS dead,
           COALESCE(sum(jobs) FILTER (WHERE status = 'cancelled'), 0)::int8 AS cancelled,
           sum(fell_back)::int8 AS fell_back,
           sum(reviewed)::int8 AS reviewed
    FROM job_figures GROUP BY category
), c AS (
    SELECT category,
           sum(calls)::int8 AS calls,
           sum(retry_calls)::int8 AS retries,
           sum(calls - ok_calls)::int8 AS failed_calls
    FROM call_rollups GROUP BY category HAVING sum(calls) > 0
)
SELECT j.category, j.jobs, j.succeeded, j.failed, j.needs_review, j.dead,
       COALESCE(c.calls, 0) AS calls,
       round(j.fell_back::numeric / j.jobs, 4) AS fallback_rate,
       round(COALESCE(c.retries, 0)::numeric / NULLIF(c.calls, 0), 4) AS retry_rate,
       round(COALESCE(c.failed_calls, 0)::numeric / NULLIF(c.calls, 0), 4) AS error_rate,
       round(j.reviewed::numeric / j.jobs, 4) AS review_rate,
       j.cancelled
FROM j LEFT JOIN c ON c.category = j.category;

CREATE OR REPLACE VIEW latency_by_category AS
WITH c AS (
    SELECT category,
           latency_hist_quantile(h, 0.5) AS call_p50_ms,
           latency_hist_quantile(h, 0.95) AS call_p95_ms,
           latency_hist_quantile(h, 0.99) AS call_p99_ms
    FROM (SELECT category, latency_hist_sum(latency_hist) AS h
          FROM call_rollups GROUP BY category HAVING sum(ok_calls) > 0) t
), r AS (
    SELECT category, results,
           latency_hist_quantile(h, 0.5) AS e2e_p50_ms,
           latency_hist_quantile(h, 0.95) AS e2e_p95_ms,
           latency_hist_quantile(h, 0.99) AS e2e_p99_ms
    FROM (SELECT category, sum(latency_jobs)::int8 AS results,
                 latency_hist_sum(latency_hist) AS h
          FROM job_figures GROUP BY category HAVING sum(latency_jobs) > 0) t
)
SELECT COALESCE(c.category, r.category) AS category,
       c.call_p50_ms, c.call_p95_ms, c.call_p99_ms,
       COALESCE(r.results, 0) AS results, r.e2e_p50_ms, r.e2e_p95_ms, r.e2e_p99_ms
FROM c FULL JOIN r ON r.category = c.category;

CREATE OR REPLACE VIEW savings_by_category AS
WITH t AS (
    SELECT category,
           COALESCE(sum(jobs) FILTER (WHERE outcome = 'answered'), 0)::int8 AS jobs,
           COALESCE(sum(cost_usd) FILTER (WHERE outcome = 'answered'), 0) AS actual_cost_usd,
           COALESCE(sum(first_uncached_input_tokens) FILTER (WHERE outcome = 'answered'), 0)::int8
               AS uncached,
           COALESCE(sum(first_cached_input_tokens) FILTER (WHERE outcome = 'answered'), 0)::int8
               AS cached,
           COALESCE(sum(answer_output_tokens) FILTER (WHERE outcome = 'answered'), 0)::int8
               AS output,
           COALESCE(sum(answer_cost_usd) FILTER (WHERE outcome = 'answered'), 0) AS answer_cost_usd,
           COALESCE(sum(retries_cost_usd) FILTER (WHERE outcome = 'answered'), 0) AS retries_cost_usd,
           COALESCE(sum(classifier_cost_usd) FILTER (WHERE outcome = 'answered'), 0)
               AS classifier_cost_usd,
           COALESCE(sum(fallback_cost_usd) FILTER (WHERE outcome = 'answered'), 0)
               AS fallback_cost_usd,
           COALESCE(sum(stages_cost_usd) FILTER (WHERE outcome = 'answered'), 0) AS stages_cost_usd,
           COALESCE(sum(voters_cost_usd) FILTER (WHERE outcome = 'answered'), 0) AS voters_cost_usd,
           COALESCE(sum(judge_cost_usd) FILTER (WHERE outcome = 'answered'), 0) AS judge_cost_usd,
           COALESCE(sum(jobs) FILTER (WHERE outcome = 'person'), 0)::int8 AS person_jobs,
           COALESCE(sum(cost_usd) FILTER (WHERE outcome = 'person'), 0) AS person_cost_usd,
           COALESCE(sum(jobs) FILTER (WHERE outcome = 'no_result'), 0)::int8 AS no_result_jobs,
           COALESCE(sum(cost_usd) FILTER (WHERE outcome = 'no_result'), 0) AS no_result_cost_usd,
           sum(jobs) AS all_jobs, sum(fell_back) AS fell_back, sum(reviewed) AS reviewed
    FROM job_figures GROUP BY category
), fb AS (
    SELECT j.category, count(*) AS ratings, sum(f.score) AS score_sum
    FROM feedback f JOIN jobs j ON j.id = f.job_id GROUP BY j.category
)
SELECT t.category, b.model AS baseline_model,
       t.jobs,
       t.actual_cost_usd,
       one_call_usd(t.uncached, t.cached, t.output,
                    b.input_per_mtok, b.cached_input_per_mtok, b.output_per_mtok)
           AS baseline_cost_usd,
       one_call_usd(t.uncached, t.cached, t.output,
                    b.input_per_mtok, b.cached_input_per_mtok, b.output_per_mtok)
         - t.actual_cost_usd AS savings_usd,
       t.answer_cost_usd,
       t.actual_cost_usd - t.answer_cost_usd AS overhead_cost_usd,
       t.retries_cost_usd, t.classifier_cost_usd, t.fallback_cost_usd, t.stages_cost_usd,
       t.voters_cost_usd, t.judge_cost_usd,
       t.person_jobs, t.person_cost_usd, t.no_result_jobs, t.no_result_cost_usd,
       round(t.fell_back / t.all_jobs, 4) AS fallback_rate,
       round(t.reviewed / t.all_jobs, 4) AS review_rate,
       COALESCE(fb.ratings, 0)::numeric AS ratings,
       round(fb.score_sum::numeric / NULLIF(fb.ratings, 0), 3) AS avg_score
FROM t
LEFT JOIN fb ON fb.category = t.category
LEFT JOIN model_prices b ON b.is_baseline;

CREATE OR REPLACE VIEW model_usage AS
SELECT category, answered_by AS model,
       sum(jobs)::int8 AS results,
       round(sum(jobs) / sum(sum(jobs)) OVER (PARTITION BY category), 4) AS share
FROM job_figures
WHERE outcome <> 'no_result'
GROUP BY category, answered_by;

CREATE OR REPLACE VIEW what_if_by_model AS
WITH t AS (
    SELECT category, sum(jobs)::int8 AS jobs, sum(cost_usd) AS actual_cost_usd,
           sum(first_uncached_input_tokens)::int8 AS uncached,
           sum(first_cached_input_tokens)::int8 AS cached,
           sum(answer_output_tokens)::int8 AS output
    FROM job_figures WHERE outcome = 'answered' GROUP BY category
)
SELECT t.category, p.model, p.is_baseline, t.jobs, t.actual_cost_usd,
       one_call_usd(t.uncached, t.cached, t.output,
                    p.input_per_mtok, p.cached_input_per_mtok, p.output_per_mtok) AS cost_usd
FROM t CROSS JOIN model_prices p;

-- Statistics for the new, nearly empty tables from the start: without them
-- the planner guesses thousands of rows, and Postgres's JIT (on by default)
-- spends hundreds of milliseconds compiling plans that run in a few.
ANALYZE job_rollups, job_rollup_state, job_rollup_dirty;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'switchyard_analyst') THEN
        GRANT SELECT ON job_rollups, job_rollup_state, job_rollup_dirty, job_figures
            TO switchyard_analyst;
    END IF;
END
$$;
