-- The call rollups taken off the writers' path (docs/analytics.md,
-- "Rollups"; src/store/rollups.rs has the long version).
--
-- Migration 0022 kept `call_rollups` exact with statement-level triggers in
-- every transaction that wrote calls: about 2.5 ms at p50 and 4 ms at p99
-- of a job's added latency at 1,000 jobs/s, and 7% of Postgres's time. Now:
--
--   * A roller (`call_rollups_step()`, run by every worker's rollup task,
--     one at a time) adds the calls created before `rolled_until` moves
--     on to their hour's rows, and `call_jobs` the (job, category) pairs
--     they open. `call_rollups` covers exactly the calls created before
--     `call_rollup_state.rolled_until`; readers add the rest from `calls`
--     (the view `call_rollups_live`).
--   * The roller moves `rolled_until` only to a time T such that no
--     transaction that began before T + 30 seconds is still open. A
--     change to a call made by a transaction that began within 30 s
--     of the call's creation ("young") has therefore committed before the
--     roll that covers the call, and the roll sees it. The writer's intent
--     rows, final records and results are young (a call longer than a
--     30 s is the exception).
--   * Any other change ("late": a call over 30 s old at the start of
--     the changing transaction, a delete, a bulk load of old rows) applies
--     its delta (new minus old) to the rows the roller has already covered
--     (created before `rolled_until`), as 0022's triggers did for every
--     change. It holds a shared advisory lock while it reads
--     `rolled_until` until it commits; the roller takes the lock
--     exclusively to roll, so neither a late change nor a roll slips
--     between the other's reading and writing.
--   * A young change costs the writer only a check of its statement's
--     rows against the clock.

-- Every call created before `rolled_until` is in call_rollups (NULL: none).
-- `settle` is the 30 s above: data, so that every session agrees. Tests
-- lower it (a change is then late sooner, which is always safe); raising
-- it while calls are written is not (a change the new value calls young
-- may be to a call already rolled under the old one).
CREATE TABLE IF NOT EXISTS call_rollup_state (
    one          BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    rolled_until TIMESTAMPTZ,
    settle       INTERVAL NOT NULL DEFAULT interval '30 seconds'
);
CREATE OR REPLACE FUNCTION call_rollups_settle() RETURNS INTERVAL
LANGUAGE sql STABLE AS $$ SELECT settle FROM call_rollup_state $$;
INSERT INTO call_rollup_state (one, rolled_until) VALUES (true, NULL) ON CONFLICT DO NOTHING;
-- One row, and the planner must know it (readers join it laterally to the
-- tail; an unanalyzed table is guessed at thousands of rows, which made
-- the view's plan expensive enough to JIT-compile: 300 ms).
ANALYZE call_rollup_state;

-- The figures of the calls created in [lo, hi) as call_rollups rows (shard
-- 0, jobs 0). Inlined into the queries that use it.
CREATE OR REPLACE FUNCTION call_figures_raw(lo TIMESTAMPTZ, hi TIMESTAMPTZ)
RETURNS SETOF call_rollups
LANGUAGE sql STABLE AS $$
    SELECT rollup_hour(created_at), category, provider, model, batch_id IS NOT NULL,
           0::smallint,
           count(*)::int8,
           (count(*) FILTER (WHERE outcome = 'ok'))::int8,
           (count(*) FILTER (WHERE outcome = 'retryable_error'))::int8,
           (count(*) FILTER (WHERE outcome = 'terminal_error'))::int8,
           (count(*) FILTER (WHERE outcome = 'unknown'))::int8,
           (count(*) FILTER (WHERE outcome = 'cached'))::int8,
           (count(*) FILTER (WHERE attempt > 1))::int8,
           0::int8,
           sum(input_tokens)::int8, sum(output_tokens)::int8, sum(cached_input_tokens)::int8,
           sum(cache_write_input_tokens)::int8, sum(reasoning_tokens)::int8,
           sum(cost_usd), COALESCE(sum(saved_usd), 0),
           COALESCE(sum(latency_ms) FILTER (WHERE outcome = 'ok'), 0)::int8,
           latency_hist(CASE WHEN outcome = 'ok' THEN latency_bucket(latency_ms) END, 1)
    FROM calls
    WHERE created_at >= lo AND created_at < hi
    GROUP BY 1, 2, 3, 4, 5
$$;

-- The (job, category) pairs with calls created in [lo, hi) that call_jobs
-- does not hold yet, counted under the key of each pair's first call there.
CREATE OR REPLACE FUNCTION call_jobs_raw(lo TIMESTAMPTZ, hi TIMESTAMPTZ)
RETURNS TABLE (hour TIMESTAMPTZ, category TEXT, provider TEXT, model TEXT, batched BOOLEAN,
               jobs BIGINT)
LANGUAGE sql STABLE AS $$
    SELECT p.hour, p.category, p.provider, p.model, p.batched, count(*)::int8
    FROM (SELECT DISTINCT ON (job_id, category)
                 job_id, category, rollup_hour(created_at) AS hour, provider, model,
                 batch_id IS NOT NULL AS batched
          FROM calls WHERE created_at >= lo AND created_at < hi
          ORDER BY job_id, category, step, attempt) p
    WHERE NOT EXISTS (SELECT 1 FROM call_jobs cj
                      WHERE cj.job_id = p.job_id AND cj.category = p.category)
    GROUP BY 1, 2, 3, 4, 5
$$;

-- Add rollup rows (one per key; their shard replaced by `s`).
CREATE OR REPLACE FUNCTION call_rollups_merge(rs call_rollups[], s SMALLINT) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO call_rollups AS r (hour, category, provider, model, batched, shard, calls, ok_calls,
        retryable_calls, terminal_calls, unknown_calls, cached_calls, retry_calls, jobs,
        input_tokens, output_tokens, cached_input_tokens, cache_write_input_tokens,
        reasoning_tokens, cost_usd, saved_usd, latency_ms_sum, latency_hist)
    SELECT x.hour, x.category, x.provider, x.model, x.batched, s, x.calls, x.ok_calls,
           x.retryable_calls, x.terminal_calls, x.unknown_calls, x.cached_calls, x.retry_calls,
           x.jobs, x.input_tokens, x.output_tokens, x.cached_input_tokens,
           x.cache_write_input_tokens, x.reasoning_tokens, x.cost_usd, x.saved_usd,
           x.latency_ms_sum, x.latency_hist
    FROM unnest(rs) x ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (hour, category, provider, model, batched, shard) DO UPDATE SET
        calls = r.calls + EXCLUDED.calls,
        ok_calls = r.ok_calls + EXCLUDED.ok_calls,
        retryable_calls = r.retryable_calls + EXCLUDED.retryable_calls,
        terminal_calls = r.terminal_calls + EXCLUDED.terminal_calls,
        unknown_calls = r.unknown_calls + EXCLUDED.unknown_calls,
        cached_calls = r.cached_calls + EXCLUDED.cached_calls,
        retry_calls = r.retry_calls + EXCLUDED.retry_calls,
        jobs = r.jobs + EXCLUDED.jobs,
        input_tokens = r.input_tokens + EXCLUDED.input_tokens,
        output_tokens = r.output_tokens + EXCLUDED.output_tokens,
        cached_input_tokens = r.cached_input_tokens + EXCLUDED.cached_input_tokens,
        cache_write_input_tokens = r.cache_write_input_tokens + EXCLUDED.cache_write_input_tokens,
        reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
        cost_usd = r.cost_usd + EXCLUDED.cost_usd,
        saved_usd = r.saved_usd + EXCLUDED.saved_usd,
        latency_ms_sum = r.latency_ms_sum + EXCLUDED.latency_ms_sum,
        latency_hist = latency_hist_add(r.latency_hist, EXCLUDED.latency_hist)
$$;

-- A late change's delta: the rows `news` added and `olds` taken away (both
-- already limited to calls created before `rolled_until`), to the figures
-- and to `jobs`: pairs that gain their first covered call are counted
-- under its key, pairs whose last call is gone (`gone`: the pairs the
-- change took calls from, covered or not) are uncounted where they were.
CREATE OR REPLACE FUNCTION call_rollups_apply(olds calls[], news calls[], gone calls[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    s SMALLINT := call_rollup_shard();
    rs call_rollups[];
BEGIN
    IF cardinality(olds) + cardinality(news) > 0 THEN
        PERFORM call_rollups_merge(ARRAY(
            SELECT ROW(rollup_hour(d.created_at), d.category, d.provider, d.model,
                       d.batch_id IS NOT NULL, 0,
                       sum(d.sg), COALESCE(sum(d.sg) FILTER (WHERE d.outcome = 'ok'), 0),
                       COALESCE(sum(d.sg) FILTER (WHERE d.outcome = 'retryable_error'), 0),
                       COALESCE(sum(d.sg) FILTER (WHERE d.outcome = 'terminal_error'), 0),
                       COALESCE(sum(d.sg) FILTER (WHERE d.outcome = 'unknown'), 0),
                       COALESCE(sum(d.sg) FILTER (WHERE d.outcome = 'cached'), 0),
                       COALESCE(sum(d.sg) FILTER (WHERE d.attempt > 1), 0),
                       0,
                       sum(d.sg * d.input_tokens), sum(d.sg * d.output_tokens),
                       sum(d.sg * d.cached_input_tokens), sum(d.sg * d.cache_write_input_tokens),
                       sum(d.sg * d.reasoning_tokens),
                       sum(d.sg * d.cost_usd), COALESCE(sum(d.sg * d.saved_usd), 0),
                       COALESCE(sum(d.sg * d.latency_ms) FILTER (WHERE d.outcome = 'ok'), 0),
                       latency_hist(CASE WHEN d.outcome = 'ok'
                                         THEN latency_bucket(d.latency_ms) END, d.sg))::call_rollups
            FROM (SELECT -1 AS sg, o.* FROM unnest(olds) o
                  UNION ALL SELECT 1 AS sg, n.* FROM unnest(news) n) d
            GROUP BY rollup_hour(d.created_at), d.category, d.provider, d.model,
                     d.batch_id IS NOT NULL), s);
    END IF;
    IF cardinality(news) > 0 THEN
        WITH j AS (
            INSERT INTO call_jobs (job_id, category, hour, provider, model, batched)
            SELECT DISTINCT ON (job_id, category)
                   job_id, category, rollup_hour(created_at), provider, model,
                   batch_id IS NOT NULL
            FROM unnest(news) ORDER BY job_id, category, step, attempt
            ON CONFLICT (job_id, category) DO NOTHING
            RETURNING hour, category, provider, model, batched)
        SELECT array_agg(x.r) INTO rs
        FROM (SELECT ROW(hour, category, provider, model, batched, 0, 0, 0, 0, 0, 0, 0, 0,
                         count(*), 0, 0, 0, 0, 0, 0, 0, 0, NULL)::call_rollups AS r
              FROM j GROUP BY hour, category, provider, model, batched) x;
        PERFORM call_rollups_merge(COALESCE(rs, '{}'), s);
    END IF;
    IF cardinality(gone) > 0 THEN
        WITH g AS (
            DELETE FROM call_jobs cj
            USING (SELECT DISTINCT job_id, category FROM unnest(gone)) o
            WHERE cj.job_id = o.job_id AND cj.category = o.category
              AND NOT EXISTS (SELECT 1 FROM calls c
                              WHERE c.job_id = o.job_id AND c.category = o.category)
            RETURNING cj.hour, cj.category, cj.provider, cj.model, cj.batched)
        SELECT array_agg(x.r) INTO rs
        FROM (SELECT ROW(hour, category, provider, model, batched, 0, 0, 0, 0, 0, 0, 0, 0,
                         -count(*), 0, 0, 0, 0, 0, 0, 0, 0, NULL)::call_rollups AS r
              FROM g GROUP BY hour, category, provider, model, batched) x;
        PERFORM call_rollups_merge(COALESCE(rs, '{}'), s);
    END IF;
END
$$;

-- A late change's view of `rolled_until`, under the lock that keeps the
-- roller from moving it until this transaction ends.
CREATE OR REPLACE FUNCTION call_rollups_late_watermark() RETURNS TIMESTAMPTZ
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(x'5359524352'::bigint);
    RETURN COALESCE((SELECT rolled_until FROM call_rollup_state), '-infinity'::timestamptz);
END
$$;

CREATE OR REPLACE FUNCTION call_rollups_on_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cut TIMESTAMPTZ := now() - call_rollups_settle();
    wm TIMESTAMPTZ;
    news calls[];
BEGIN
    IF NOT EXISTS (SELECT FROM new_rows WHERE created_at < cut) THEN
        RETURN NULL;
    END IF;
    wm := call_rollups_late_watermark();
    news := ARRAY(SELECT n FROM new_rows n WHERE n.created_at < wm);
    IF cardinality(news) > 0 THEN
        PERFORM call_rollups_apply('{}', news, '{}');
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION call_rollups_on_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cut TIMESTAMPTZ := now() - call_rollups_settle();
    wm TIMESTAMPTZ;
    olds calls[];
    news calls[];
    gone calls[] := '{}';
BEGIN
    IF NOT EXISTS (SELECT FROM new_rows WHERE created_at < cut)
       AND NOT EXISTS (SELECT FROM old_rows WHERE created_at < cut) THEN
        RETURN NULL;
    END IF;
    wm := call_rollups_late_watermark();
    olds := ARRAY(SELECT o FROM old_rows o WHERE o.created_at < wm);
    news := ARRAY(SELECT n FROM new_rows n WHERE n.created_at < wm);
    IF EXISTS (SELECT 1 FROM old_rows o JOIN new_rows n ON n.id = o.id
               WHERE o.job_id <> n.job_id OR o.category <> n.category) THEN
        gone := ARRAY(SELECT o FROM old_rows o);
    END IF;
    PERFORM call_rollups_apply(olds, news, gone);
    RETURN NULL;
END
$$;

-- Deletes are rare (retention, by hand): always handled.
CREATE OR REPLACE FUNCTION call_rollups_on_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    wm TIMESTAMPTZ;
    olds calls[];
    gone calls[];
BEGIN
    IF NOT EXISTS (SELECT FROM old_rows) THEN RETURN NULL; END IF;
    wm := call_rollups_late_watermark();
    olds := ARRAY(SELECT o FROM old_rows o WHERE o.created_at < wm);
    gone := ARRAY(SELECT o FROM old_rows o);
    PERFORM call_rollups_apply(olds, '{}', gone);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION call_rollups_on_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE call_rollups, call_jobs;
    UPDATE call_rollup_state SET rolled_until = NULL;
    RETURN NULL;
END
$$;

-- The latest time the roller may cover: `settle` before the start of the
-- oldest transaction still open in this database (or before now). The
-- roller must see the other sessions' `xact_start` (same role, or
-- pg_read_all_stats), as the job roller must.
CREATE OR REPLACE FUNCTION call_rollups_closable() RETURNS TIMESTAMPTZ
LANGUAGE sql STABLE AS $$
    SELECT LEAST(now(), COALESCE((SELECT min(xact_start) FROM pg_stat_activity
                                  WHERE datname = current_database()
                                    AND pid <> pg_backend_pid()
                                    AND xact_start IS NOT NULL), now()))
           - call_rollups_settle()
$$;

-- Add the calls created in [lo, hi) and the pairs they open.
CREATE OR REPLACE FUNCTION call_rollups_add_range(lo TIMESTAMPTZ, hi TIMESTAMPTZ) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    s SMALLINT := call_rollup_shard();
    rs call_rollups[];
BEGIN
    PERFORM call_rollups_merge(ARRAY(SELECT f FROM call_figures_raw(lo, hi) f), s);
    WITH j AS (
        INSERT INTO call_jobs (job_id, category, hour, provider, model, batched)
        SELECT DISTINCT ON (job_id, category)
               job_id, category, rollup_hour(created_at), provider, model, batch_id IS NOT NULL
        FROM calls WHERE created_at >= lo AND created_at < hi
        ORDER BY job_id, category, step, attempt
        ON CONFLICT (job_id, category) DO NOTHING
        RETURNING hour, category, provider, model, batched)
    SELECT array_agg(x.r) INTO rs
    FROM (SELECT ROW(hour, category, provider, model, batched, 0, 0, 0, 0, 0, 0, 0, 0, count(*),
                     0, 0, 0, 0, 0, 0, 0, 0, NULL)::call_rollups AS r
          FROM j GROUP BY hour, category, provider, model, batched) x;
    PERFORM call_rollups_merge(COALESCE(rs, '{}'), s);
END
$$;

-- One step of the roller: add the next calls that may be covered (five
-- minutes of them at most, up to the end of their hour) and return the new
-- `rolled_until`; or move
-- `rolled_until` over a stretch without calls and return NULL, as when
-- there is nothing to do or another roller is at work. `upto` caps how far
-- it goes (tests).
CREATE OR REPLACE FUNCTION call_rollups_step(upto TIMESTAMPTZ DEFAULT 'infinity')
RETURNS TIMESTAMPTZ
LANGUAGE plpgsql AS $$
DECLARE
    wm TIMESTAMPTZ;
    closable TIMESTAMPTZ;
    first_call TIMESTAMPTZ;
    hi TIMESTAMPTZ;
    was TEXT;
BEGIN
    IF NOT pg_try_advisory_xact_lock(x'5359524353'::bigint) THEN
        RETURN NULL;
    END IF;
    -- Waits for late changes in flight (later ones wait for this roll),
    -- but not for long: a bulk load of old calls in one transaction holds
    -- them off, and the worker's shutdown waits for this step.
    was := current_setting('lock_timeout');
    PERFORM set_config('lock_timeout', '2s', true);
    BEGIN
        PERFORM pg_advisory_xact_lock(x'5359524352'::bigint);
    EXCEPTION WHEN lock_not_available THEN
        RETURN NULL;
    END;
    PERFORM set_config('lock_timeout', was, true);
    SELECT rolled_until INTO wm FROM call_rollup_state FOR UPDATE;
    closable := LEAST(call_rollups_closable(), upto);
    IF wm IS NULL THEN
        SELECT rollup_hour(min(created_at)) INTO wm FROM calls;
        wm := LEAST(COALESCE(wm, closable), closable);
        UPDATE call_rollup_state SET rolled_until = wm;
    END IF;
    IF wm >= closable THEN
        RETURN NULL;
    END IF;
    SELECT min(created_at) INTO first_call FROM calls WHERE created_at >= wm;
    IF first_call IS NULL OR first_call >= closable THEN
        -- Nothing to add: the watermark moves on, and the step says
        -- there is nothing more to do.
        UPDATE call_rollup_state SET rolled_until = closable;
        RETURN NULL;
    END IF;
    -- At most five minutes of calls per step (one transaction), within
    -- their hour: a backlog (no worker for a while) proceeds in slices.
    hi := LEAST(rollup_hour(first_call) + interval '1 hour', first_call + interval '5 minutes',
                closable);
    PERFORM call_rollups_add_range(wm, hi);
    UPDATE call_rollup_state SET rolled_until = hi;
    RETURN hi;
END
$$;

-- Rebuild from `calls` (bulk loads done with the triggers disabled): the
-- calls up to what may be covered now, the rest left to the roller.
-- Takes a SHARE lock on calls for its transaction.
CREATE OR REPLACE FUNCTION call_rollups_rebuild() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    wm TIMESTAMPTZ;
BEGIN
    LOCK TABLE calls IN SHARE MODE;
    PERFORM pg_advisory_xact_lock(x'5359524352'::bigint);
    wm := call_rollups_closable();
    DELETE FROM call_rollups;
    DELETE FROM call_jobs;
    PERFORM call_rollups_add_range('-infinity', wm);
    UPDATE call_rollup_state SET rolled_until = wm;
END
$$;

-- The calls as rollup rows, exact at any moment: the rolled rows and the
-- calls since `rolled_until` aggregated the same way (without `jobs`,
-- which needs `call_jobs_raw` for the tail; see cost_per_job).
CREATE OR REPLACE VIEW call_rollups_live AS
SELECT hour, category, provider, model, batched, calls, ok_calls, retryable_calls,
       terminal_calls, unknown_calls, cached_calls, retry_calls, input_tokens, output_tokens,
       cached_input_tokens, cache_write_input_tokens, reasoning_tokens, cost_usd, saved_usd,
       latency_ms_sum, latency_hist
FROM call_rollups
UNION ALL
SELECT f.hour, f.category, f.provider, f.model, f.batched, f.calls, f.ok_calls,
       f.retryable_calls, f.terminal_calls, f.unknown_calls, f.cached_calls, f.retry_calls,
       f.input_tokens, f.output_tokens, f.cached_input_tokens, f.cache_write_input_tokens,
       f.reasoning_tokens, f.cost_usd, f.saved_usd, f.latency_ms_sum, f.latency_hist
FROM call_rollup_state s,
     LATERAL call_figures_raw(COALESCE(s.rolled_until, '-infinity'::timestamptz),
                              'infinity'::timestamptz) f;

-- The analysts' views of 0023 (category_rates and latency_by_category as
-- 0024 left them) over the live rows.
CREATE OR REPLACE VIEW cost_daily AS
SELECT (hour AT TIME ZONE 'UTC')::date AS day,
       category, provider, model,
       sum(calls)::int8 AS calls,
       sum(ok_calls)::int8 AS ok_calls,
       sum(retryable_calls + terminal_calls)::int8 AS error_calls,
       sum(unknown_calls)::int8 AS unknown_calls,
       sum(input_tokens) AS input_tokens,
       sum(cached_input_tokens) AS cached_input_tokens,
       sum(output_tokens) AS output_tokens,
       sum(cost_usd) AS cost_usd
FROM call_rollups_live
GROUP BY 1, 2, 3, 4
HAVING sum(calls) > 0;

CREATE OR REPLACE VIEW latency_by_model AS
SELECT provider, model, calls,
       latency_hist_quantile(h, 0.5) AS p50_ms,
       latency_hist_quantile(h, 0.95) AS p95_ms,
       latency_hist_quantile(h, 0.99) AS p99_ms
FROM (SELECT provider, model, sum(ok_calls)::int8 AS calls, latency_hist_sum(latency_hist) AS h
      FROM call_rollups_live GROUP BY provider, model HAVING sum(ok_calls) > 0) t;

CREATE OR REPLACE VIEW latency_by_category AS
WITH c AS (
    SELECT category,
           latency_hist_quantile(h, 0.5) AS call_p50_ms,
           latency_hist_quantile(h, 0.95) AS call_p95_ms,
           latency_hist_quantile(h, 0.99) AS call_p99_ms
    FROM (SELECT category, latency_hist_sum(latency_hist) AS h
          FROM call_rollups_live GROUP BY category HAVING sum(ok_calls) > 0) t
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

CREATE OR REPLACE VIEW cost_per_job AS
SELECT category,
       sum(jobs)::int8 AS jobs,
       sum(cost_usd) AS cost_usd,
       round(sum(cost_usd) / NULLIF(sum(jobs), 0), 8) AS cost_per_job_usd
FROM (SELECT category, calls, cost_usd, 0::int8 AS jobs FROM call_rollups_live
      UNION ALL
      SELECT category, 0, 0, jobs FROM call_rollups
      UNION ALL
      SELECT j.category, 0, 0, j.jobs
      FROM call_rollup_state s,
           LATERAL call_jobs_raw(COALESCE(s.rolled_until, '-infinity'::timestamptz),
                                 'infinity'::timestamptz) j) t
GROUP BY category
HAVING sum(calls) > 0;

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
    FROM call_rollups_live GROUP BY category HAVING sum(calls) > 0
)
SELECT j.category, j.jobs, j.succeeded, j.failed, j.needs_review, j.dead,
       COALESCE(c.calls, 0) AS calls,
       round(j.fell_back::numeric / j.jobs, 4) AS fallback_rate,
       round(COALESCE(c.retries, 0)::numeric / NULLIF(c.calls, 0), 4) AS retry_rate,
       round(COALESCE(c.failed_calls, 0)::numeric / NULLIF(c.calls, 0), 4) AS error_rate,
       round(j.reviewed::numeric / j.jobs, 4) AS review_rate,
       j.cancelled
FROM j LEFT JOIN c ON c.category = j.category;

CREATE OR REPLACE VIEW cache_savings AS
SELECT category, provider, model,
       sum(calls)::int8 AS calls,
       sum(cached_calls)::int8 AS cached_calls,
       round(sum(cached_calls)::numeric / sum(calls), 4) AS cached_share,
       sum(saved_usd) AS saved_usd
FROM call_rollups_live
GROUP BY category, provider, model
HAVING sum(calls) > 0;

CREATE OR REPLACE VIEW batch_savings AS
SELECT category, provider, model,
       sum(calls)::int8 AS calls,
       (COALESCE(sum(calls) FILTER (WHERE batched), 0))::int8 AS batched_calls,
       round(COALESCE(sum(calls) FILTER (WHERE batched), 0)::numeric / sum(calls), 4) AS batched_share,
       COALESCE(sum(cost_usd) FILTER (WHERE batched), 0) AS batched_cost_usd,
       COALESCE(sum(cost_usd * 2) FILTER (WHERE batched), 0) AS realtime_equivalent_usd,
       COALESCE(sum(cost_usd) FILTER (WHERE batched), 0) AS saved_usd
FROM call_rollups_live
GROUP BY category, provider, model
HAVING sum(calls) > 0;

-- The triggers of 0022 (same names) now run the functions above. Rebuild
-- once: the rolled rows must cover exactly the calls before the watermark.
SELECT call_rollups_rebuild();

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'switchyard_analyst') THEN
        GRANT SELECT ON call_rollups_live, call_rollup_state, call_jobs TO switchyard_analyst;
    END IF;
END
$$;
