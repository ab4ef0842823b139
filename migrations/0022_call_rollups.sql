-- Hourly rollups of `calls`, kept exact by statement-level triggers in the
-- transaction that changes the calls (docs/analytics.md, "Rollups").
--
-- One row per UTC hour (of the call's created_at) x category x provider x
-- model x batched (a batch call or not) x shard. The shard spreads the
-- writers of one hot key over rows: each writing transaction takes one of
-- 16 shards with a transaction-scoped advisory lock (call_rollup_shard), so
-- concurrent transactions never wait on each other's rollup rows (unless more
-- than 16 write at once: then they share one and Postgres orders them).
-- Readers sum over shards.
--
-- Triggers apply deltas: an INSERT adds the new rows, an UPDATE (the final
-- record upserting its intent) adds new minus old, a DELETE (prune)
-- subtracts. Per statement the deltas are aggregated per key and upserted
-- once per key, in key order.
--
-- `jobs` counts (job, category) pairs under the key of the pair's first
-- recorded call (call_jobs remembers which), so that
-- sum(jobs) = count(DISTINCT job_id) over calls per category (cost_per_job).
--
-- Latency (answered calls: outcome 'ok') as a sum and a log-scale histogram:
-- bucket k (1..100) holds latencies l with 1 + floor(4 * log2(1 + l)) = k,
-- i.e. four buckets per doubling (within about 9% of the true value), the
-- last one everything from 2^24.75 ms (about 8 hours) up.

CREATE TABLE IF NOT EXISTS call_rollups (
    hour                        TIMESTAMPTZ NOT NULL,
    category                    TEXT NOT NULL,
    provider                    TEXT NOT NULL,
    model                       TEXT NOT NULL,
    batched                     BOOLEAN NOT NULL,
    shard                       SMALLINT NOT NULL,
    calls                       BIGINT NOT NULL DEFAULT 0,
    ok_calls                    BIGINT NOT NULL DEFAULT 0,
    retryable_calls             BIGINT NOT NULL DEFAULT 0,
    terminal_calls              BIGINT NOT NULL DEFAULT 0,
    unknown_calls               BIGINT NOT NULL DEFAULT 0,
    cached_calls                BIGINT NOT NULL DEFAULT 0,
    retry_calls                 BIGINT NOT NULL DEFAULT 0,
    jobs                        BIGINT NOT NULL DEFAULT 0,
    input_tokens                BIGINT NOT NULL DEFAULT 0,
    output_tokens               BIGINT NOT NULL DEFAULT 0,
    cached_input_tokens         BIGINT NOT NULL DEFAULT 0,
    cache_write_input_tokens    BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens            BIGINT NOT NULL DEFAULT 0,
    cost_usd                    NUMERIC NOT NULL DEFAULT 0,
    saved_usd                   NUMERIC NOT NULL DEFAULT 0,
    latency_ms_sum              BIGINT NOT NULL DEFAULT 0,
    latency_hist                BIGINT[],
    PRIMARY KEY (hour, category, provider, model, batched, shard)
);

-- (job, category) pairs that have calls, and the rollup key they count under.
CREATE TABLE IF NOT EXISTS call_jobs (
    job_id      TEXT NOT NULL,
    category    TEXT NOT NULL,
    hour        TIMESTAMPTZ NOT NULL,
    provider    TEXT NOT NULL,
    model       TEXT NOT NULL,
    batched     BOOLEAN NOT NULL,
    PRIMARY KEY (job_id, category)
);

-- The rollup hour of a time: the UTC hour it falls in (time zone independent).
CREATE OR REPLACE FUNCTION rollup_hour(t TIMESTAMPTZ) RETURNS TIMESTAMPTZ
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT date_bin('1 hour', t, TIMESTAMPTZ '2000-01-01 00:00:00+00')
$$;

-- The histogram bucket (1..100) of a latency.
CREATE OR REPLACE FUNCTION latency_bucket(ms BIGINT) RETURNS INT
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT LEAST(100, 1 + floor(4 * ln((1 + GREATEST(ms, 0))::float8) / ln(2.0::float8))::int)
$$;

-- The representative latency of bucket k: the geometric middle of its range.
CREATE OR REPLACE FUNCTION latency_bucket_ms(k INT) RETURNS FLOAT8
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN k <= 1 THEN 0 ELSE power(2.0::float8, (k - 0.5) / 4.0) - 1 END
$$;

-- Histogram arithmetic: add `n` to bucket `k` (NULL k: unchanged), add two
-- histograms (NULL is empty).
CREATE OR REPLACE FUNCTION latency_hist_step(h BIGINT[], k INT, n BIGINT) RETURNS BIGINT[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF k IS NULL THEN RETURN h; END IF;
    IF h IS NULL THEN h := array_fill(0::int8, ARRAY[100]); END IF;
    h[k] := h[k] + n;
    RETURN h;
END
$$;

CREATE OR REPLACE FUNCTION latency_hist_add(a BIGINT[], b BIGINT[]) RETURNS BIGINT[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF b IS NULL THEN RETURN a; END IF;
    IF a IS NULL THEN RETURN b; END IF;
    FOR i IN 1..100 LOOP
        a[i] := a[i] + b[i];
    END LOOP;
    RETURN a;
END
$$;

-- latency_hist(bucket, n): the histogram of rows' buckets (with weights n).
CREATE OR REPLACE AGGREGATE latency_hist(INT, BIGINT) (
    SFUNC = latency_hist_step, STYPE = BIGINT[], COMBINEFUNC = latency_hist_add,
    PARALLEL = SAFE
);
-- latency_hist_sum(hist): histograms added up.
CREATE OR REPLACE AGGREGATE latency_hist_sum(BIGINT[]) (
    SFUNC = latency_hist_add, STYPE = BIGINT[], COMBINEFUNC = latency_hist_add,
    PARALLEL = SAFE
);

-- The q-quantile (0-1) of a histogram, as its bucket's representative
-- latency; NULL when empty.
CREATE OR REPLACE FUNCTION latency_hist_quantile(h BIGINT[], q FLOAT8) RETURNS FLOAT8
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    total BIGINT := 0;
    seen BIGINT := 0;
    target FLOAT8;
BEGIN
    IF h IS NULL THEN RETURN NULL; END IF;
    FOR i IN 1..array_length(h, 1) LOOP total := total + h[i]; END LOOP;
    IF total <= 0 THEN RETURN NULL; END IF;
    target := GREATEST(q * total, 1);
    FOR i IN 1..array_length(h, 1) LOOP
        seen := seen + h[i];
        IF seen >= target THEN RETURN round(latency_bucket_ms(i)::numeric, 1)::float8; END IF;
    END LOOP;
    RETURN round(latency_bucket_ms(array_length(h, 1))::numeric, 1)::float8;
END
$$;

-- The shard this transaction writes rollups to: the first of 16 whose
-- transaction-scoped advisory lock (single 64-bit keys 0x5359525f00..0f,
-- a key space apart from the two-key locks elsewhere) it gets, starting at
-- the backend's own; remembered for the transaction.
CREATE OR REPLACE FUNCTION call_rollup_shard() RETURNS SMALLINT
LANGUAGE plpgsql AS $$
DECLARE
    s TEXT := current_setting('switchyard.rollup_shard', true);
    first INT := pg_backend_pid() % 16;
    k INT;
BEGIN
    IF s IS NOT NULL AND s <> '' THEN RETURN s::smallint; END IF;
    FOR i IN 0..15 LOOP
        k := (first + i) % 16;
        IF pg_try_advisory_xact_lock(x'5359525f00'::bigint + k) THEN
            PERFORM set_config('switchyard.rollup_shard', k::text, true);
            RETURN k;
        END IF;
    END LOOP;
    PERFORM set_config('switchyard.rollup_shard', first::text, true);
    RETURN first;
END
$$;

CREATE OR REPLACE FUNCTION call_rollups_on_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    s SMALLINT;
BEGIN
    IF NOT EXISTS (SELECT FROM new_rows) THEN RETURN NULL; END IF;
    s := call_rollup_shard();
    WITH j AS (
        INSERT INTO call_jobs (job_id, category, hour, provider, model, batched)
        SELECT DISTINCT ON (job_id, category)
               job_id, category, rollup_hour(created_at), provider, model, batch_id IS NOT NULL
        FROM new_rows ORDER BY job_id, category, step, attempt
        ON CONFLICT (job_id, category) DO NOTHING
        RETURNING hour, category, provider, model, batched
    ), jn AS (
        SELECT hour, category, provider, model, batched, count(*) AS n
        FROM j GROUP BY 1, 2, 3, 4, 5
    ), a AS (
        SELECT rollup_hour(created_at) AS hour, category, provider, model,
               batch_id IS NOT NULL AS batched,
               count(*) AS calls,
               count(*) FILTER (WHERE outcome = 'ok') AS ok_calls,
               count(*) FILTER (WHERE outcome = 'retryable_error') AS retryable_calls,
               count(*) FILTER (WHERE outcome = 'terminal_error') AS terminal_calls,
               count(*) FILTER (WHERE outcome = 'unknown') AS unknown_calls,
               count(*) FILTER (WHERE outcome = 'cached') AS cached_calls,
               count(*) FILTER (WHERE attempt > 1) AS retry_calls,
               sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
               sum(cached_input_tokens) AS cached_input_tokens,
               sum(cache_write_input_tokens) AS cache_write_input_tokens,
               sum(reasoning_tokens) AS reasoning_tokens,
               sum(cost_usd) AS cost_usd, COALESCE(sum(saved_usd), 0) AS saved_usd,
               COALESCE(sum(latency_ms) FILTER (WHERE outcome = 'ok'), 0) AS latency_ms_sum,
               latency_hist(CASE WHEN outcome = 'ok' THEN latency_bucket(latency_ms) END, 1)
                   AS latency_hist
        FROM new_rows GROUP BY 1, 2, 3, 4, 5
    )
    INSERT INTO call_rollups AS r (hour, category, provider, model, batched, shard, calls, ok_calls,
        retryable_calls, terminal_calls, unknown_calls, cached_calls, retry_calls, jobs,
        input_tokens, output_tokens, cached_input_tokens, cache_write_input_tokens,
        reasoning_tokens, cost_usd, saved_usd, latency_ms_sum, latency_hist)
    SELECT a.hour, a.category, a.provider, a.model, a.batched, s, a.calls, a.ok_calls,
           a.retryable_calls, a.terminal_calls, a.unknown_calls, a.cached_calls, a.retry_calls,
           COALESCE(jn.n, 0), a.input_tokens, a.output_tokens, a.cached_input_tokens,
           a.cache_write_input_tokens, a.reasoning_tokens, a.cost_usd, a.saved_usd,
           a.latency_ms_sum, a.latency_hist
    FROM a LEFT JOIN jn USING (hour, category, provider, model, batched)
    ORDER BY 1, 2, 3, 4, 5
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
        latency_hist = latency_hist_add(r.latency_hist, EXCLUDED.latency_hist);
    RETURN NULL;
END
$$;

-- Add n to the jobs of one rollup key (the rare paths below).
CREATE OR REPLACE FUNCTION call_rollups_add_jobs(h TIMESTAMPTZ, c TEXT, p TEXT, m TEXT, b BOOLEAN,
                                                 s SMALLINT, n BIGINT) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO call_rollups AS r (hour, category, provider, model, batched, shard, jobs)
    VALUES (h, c, p, m, b, s, n)
    ON CONFLICT (hour, category, provider, model, batched, shard) DO UPDATE SET jobs = r.jobs + n
$$;

-- UPDATE: new rows minus old rows. The writer's upserts keep a call's job and
-- category; an update that moves calls between (job, category) pairs also
-- keeps call_jobs (and so `jobs`) exact, on a slower path.
CREATE OR REPLACE FUNCTION call_rollups_on_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    s SMALLINT;
    rec RECORD;
BEGIN
    IF NOT EXISTS (SELECT FROM new_rows) THEN RETURN NULL; END IF;
    s := call_rollup_shard();
    WITH d AS (SELECT -1 AS sg, o.* FROM old_rows o UNION ALL SELECT 1 AS sg, n.* FROM new_rows n), a AS (
        SELECT rollup_hour(created_at) AS hour, category, provider, model,
               batch_id IS NOT NULL AS batched,
               sum(sg) AS calls,
               COALESCE(sum(sg) FILTER (WHERE outcome = 'ok'), 0) AS ok_calls,
               COALESCE(sum(sg) FILTER (WHERE outcome = 'retryable_error'), 0) AS retryable_calls,
               COALESCE(sum(sg) FILTER (WHERE outcome = 'terminal_error'), 0) AS terminal_calls,
               COALESCE(sum(sg) FILTER (WHERE outcome = 'unknown'), 0) AS unknown_calls,
               COALESCE(sum(sg) FILTER (WHERE outcome = 'cached'), 0) AS cached_calls,
               COALESCE(sum(sg) FILTER (WHERE attempt > 1), 0) AS retry_calls,
               sum(sg * input_tokens) AS input_tokens, sum(sg * output_tokens) AS output_tokens,
               sum(sg * cached_input_tokens) AS cached_input_tokens,
               sum(sg * cache_write_input_tokens) AS cache_write_input_tokens,
               sum(sg * reasoning_tokens) AS reasoning_tokens,
               sum(sg * cost_usd) AS cost_usd, COALESCE(sum(sg * saved_usd), 0) AS saved_usd,
               COALESCE(sum(sg * latency_ms) FILTER (WHERE outcome = 'ok'), 0) AS latency_ms_sum,
               latency_hist(CASE WHEN outcome = 'ok' THEN latency_bucket(latency_ms) END, sg)
                   AS latency_hist
        FROM d GROUP BY 1, 2, 3, 4, 5
    )
    INSERT INTO call_rollups AS r (hour, category, provider, model, batched, shard, calls, ok_calls,
        retryable_calls, terminal_calls, unknown_calls, cached_calls, retry_calls, jobs,
        input_tokens, output_tokens, cached_input_tokens, cache_write_input_tokens,
        reasoning_tokens, cost_usd, saved_usd, latency_ms_sum, latency_hist)
    SELECT a.hour, a.category, a.provider, a.model, a.batched, s, a.calls, a.ok_calls,
           a.retryable_calls, a.terminal_calls, a.unknown_calls, a.cached_calls, a.retry_calls, 0,
           a.input_tokens, a.output_tokens, a.cached_input_tokens, a.cache_write_input_tokens,
           a.reasoning_tokens, a.cost_usd, a.saved_usd, a.latency_ms_sum, a.latency_hist
    FROM a ORDER BY 1, 2, 3, 4, 5
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
        latency_hist = latency_hist_add(r.latency_hist, EXCLUDED.latency_hist);
    IF EXISTS (SELECT 1 FROM old_rows o JOIN new_rows n ON n.id = o.id
               WHERE o.job_id <> n.job_id OR o.category <> n.category) THEN
        FOR rec IN
            WITH j AS (
                INSERT INTO call_jobs (job_id, category, hour, provider, model, batched)
                SELECT DISTINCT ON (job_id, category)
                       job_id, category, rollup_hour(created_at), provider, model,
                       batch_id IS NOT NULL
                FROM new_rows ORDER BY job_id, category, step, attempt
                ON CONFLICT (job_id, category) DO NOTHING
                RETURNING hour, category, provider, model, batched)
            SELECT hour, category, provider, model, batched, count(*) AS n
            FROM j GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
        LOOP
            PERFORM call_rollups_add_jobs(rec.hour, rec.category, rec.provider, rec.model,
                                          rec.batched, s, rec.n);
        END LOOP;
    -- Pairs that lost their last call: uncounted where they were counted.
        FOR rec IN
            WITH gone AS (
                DELETE FROM call_jobs cj
                USING (SELECT DISTINCT job_id, category FROM old_rows) o
                WHERE cj.job_id = o.job_id AND cj.category = o.category
                  AND NOT EXISTS (SELECT 1 FROM calls c
                                  WHERE c.job_id = o.job_id AND c.category = o.category)
                RETURNING cj.hour, cj.category, cj.provider, cj.model, cj.batched)
            SELECT hour, category, provider, model, batched, count(*) AS n
            FROM gone GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
        LOOP
            PERFORM call_rollups_add_jobs(rec.hour, rec.category, rec.provider, rec.model,
                                          rec.batched, s, -rec.n);
        END LOOP;
    END IF;
    RETURN NULL;
END
$$;

-- DELETE (prune, or by hand): the old rows subtracted.
CREATE OR REPLACE FUNCTION call_rollups_on_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    s SMALLINT;
    rec RECORD;
BEGIN
    IF NOT EXISTS (SELECT FROM old_rows) THEN RETURN NULL; END IF;
    s := call_rollup_shard();
    WITH d AS (SELECT -1 AS sg, o.* FROM old_rows o), a AS (
        SELECT rollup_hour(created_at) AS hour, category, provider, model,
               batch_id IS NOT NULL AS batched,
               sum(sg) AS calls,
               COALESCE(sum(sg) FILTER (WHERE outcome = 'ok'), 0) AS ok_calls,
               COALESCE(sum(sg) FILTER (WHERE outcome = 'retryable_error'), 0) AS retryable_calls,
               COALESCE(sum(sg) FILTER (WHERE outcome = 'terminal_error'), 0) AS terminal_calls,
               COALESCE(sum(sg) FILTER (WHERE outcome = 'unknown'), 0) AS unknown_calls,
               COALESCE(sum(sg) FILTER (WHERE outcome = 'cached'), 0) AS cached_calls,
               COALESCE(sum(sg) FILTER (WHERE attempt > 1), 0) AS retry_calls,
               sum(sg * input_tokens) AS input_tokens, sum(sg * output_tokens) AS output_tokens,
               sum(sg * cached_input_tokens) AS cached_input_tokens,
               sum(sg * cache_write_input_tokens) AS cache_write_input_tokens,
               sum(sg * reasoning_tokens) AS reasoning_tokens,
               sum(sg * cost_usd) AS cost_usd, COALESCE(sum(sg * saved_usd), 0) AS saved_usd,
               COALESCE(sum(sg * latency_ms) FILTER (WHERE outcome = 'ok'), 0) AS latency_ms_sum,
               latency_hist(CASE WHEN outcome = 'ok' THEN latency_bucket(latency_ms) END, sg)
                   AS latency_hist
        FROM d GROUP BY 1, 2, 3, 4, 5
    )
    INSERT INTO call_rollups AS r (hour, category, provider, model, batched, shard, calls, ok_calls,
        retryable_calls, terminal_calls, unknown_calls, cached_calls, retry_calls, jobs,
        input_tokens, output_tokens, cached_input_tokens, cache_write_input_tokens,
        reasoning_tokens, cost_usd, saved_usd, latency_ms_sum, latency_hist)
    SELECT a.hour, a.category, a.provider, a.model, a.batched, s, a.calls, a.ok_calls,
           a.retryable_calls, a.terminal_calls, a.unknown_calls, a.cached_calls, a.retry_calls, 0,
           a.input_tokens, a.output_tokens, a.cached_input_tokens, a.cache_write_input_tokens,
           a.reasoning_tokens, a.cost_usd, a.saved_usd, a.latency_ms_sum, a.latency_hist
    FROM a ORDER BY 1, 2, 3, 4, 5
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
        latency_hist = latency_hist_add(r.latency_hist, EXCLUDED.latency_hist);
    -- Pairs that lost their last call: uncounted where they were counted.
    FOR rec IN
        WITH gone AS (
            DELETE FROM call_jobs cj
            USING (SELECT DISTINCT job_id, category FROM old_rows) o
            WHERE cj.job_id = o.job_id AND cj.category = o.category
              AND NOT EXISTS (SELECT 1 FROM calls c
                              WHERE c.job_id = o.job_id AND c.category = o.category)
            RETURNING cj.hour, cj.category, cj.provider, cj.model, cj.batched)
        SELECT hour, category, provider, model, batched, count(*) AS n
        FROM gone GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
    LOOP
        PERFORM call_rollups_add_jobs(rec.hour, rec.category, rec.provider, rec.model,
                                      rec.batched, s, -rec.n);
    END LOOP;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS call_rollups_insert ON calls;
CREATE TRIGGER call_rollups_insert AFTER INSERT ON calls
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION call_rollups_on_insert();
DROP TRIGGER IF EXISTS call_rollups_update ON calls;
CREATE TRIGGER call_rollups_update AFTER UPDATE ON calls
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION call_rollups_on_update();
DROP TRIGGER IF EXISTS call_rollups_delete ON calls;
CREATE TRIGGER call_rollups_delete AFTER DELETE ON calls
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION call_rollups_on_delete();
-- TRUNCATE calls: the rollups go too.
CREATE OR REPLACE FUNCTION call_rollups_on_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE call_rollups, call_jobs;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS call_rollups_truncate ON calls;
CREATE TRIGGER call_rollups_truncate AFTER TRUNCATE ON calls
    FOR EACH STATEMENT EXECUTE FUNCTION call_rollups_on_truncate();

-- Rebuild the rollups from `calls` (the migration's backfill; also for
-- bulk loads done with the triggers disabled). Takes a SHARE lock on calls
-- for its transaction, so no call changes meanwhile.
CREATE OR REPLACE FUNCTION call_rollups_rebuild() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE calls IN SHARE MODE;
    DELETE FROM call_rollups;
    DELETE FROM call_jobs;
    INSERT INTO call_jobs (job_id, category, hour, provider, model, batched)
    SELECT DISTINCT ON (job_id, category)
           job_id, category, rollup_hour(created_at), provider, model, batch_id IS NOT NULL
    FROM calls ORDER BY job_id, category, step, attempt;
    WITH jn AS (
        SELECT hour, category, provider, model, batched, count(*) AS n
        FROM call_jobs GROUP BY 1, 2, 3, 4, 5
    ), a AS (
        SELECT rollup_hour(created_at) AS hour, category, provider, model,
               batch_id IS NOT NULL AS batched,
               count(*) AS calls,
               count(*) FILTER (WHERE outcome = 'ok') AS ok_calls,
               count(*) FILTER (WHERE outcome = 'retryable_error') AS retryable_calls,
               count(*) FILTER (WHERE outcome = 'terminal_error') AS terminal_calls,
               count(*) FILTER (WHERE outcome = 'unknown') AS unknown_calls,
               count(*) FILTER (WHERE outcome = 'cached') AS cached_calls,
               count(*) FILTER (WHERE attempt > 1) AS retry_calls,
               sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
               sum(cached_input_tokens) AS cached_input_tokens,
               sum(cache_write_input_tokens) AS cache_write_input_tokens,
               sum(reasoning_tokens) AS reasoning_tokens,
               sum(cost_usd) AS cost_usd, COALESCE(sum(saved_usd), 0) AS saved_usd,
               COALESCE(sum(latency_ms) FILTER (WHERE outcome = 'ok'), 0) AS latency_ms_sum,
               latency_hist(CASE WHEN outcome = 'ok' THEN latency_bucket(latency_ms) END, 1)
                   AS latency_hist
        FROM calls GROUP BY 1, 2, 3, 4, 5
    )
    INSERT INTO call_rollups (hour, category, provider, model, batched, shard, calls, ok_calls,
        retryable_calls, terminal_calls, unknown_calls, cached_calls, retry_calls, jobs,
        input_tokens, output_tokens, cached_input_tokens, cache_write_input_tokens,
        reasoning_tokens, cost_usd, saved_usd, latency_ms_sum, latency_hist)
    SELECT a.hour, a.category, a.provider, a.model, a.batched, 0, a.calls, a.ok_calls,
           a.retryable_calls, a.terminal_calls, a.unknown_calls, a.cached_calls, a.retry_calls,
           COALESCE(jn.n, 0), a.input_tokens, a.output_tokens, a.cached_input_tokens,
           a.cache_write_input_tokens, a.reasoning_tokens, a.cost_usd, a.saved_usd,
           a.latency_ms_sum, a.latency_hist
    FROM a LEFT JOIN jn USING (hour, category, provider, model, batched);
END
$$;

-- Backfill from the calls already there (the triggers above see only later
-- changes; the lock holds calls still until this migration commits).
SELECT call_rollups_rebuild();

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'switchyard_analyst') THEN
        GRANT SELECT ON call_rollups TO switchyard_analyst;
    END IF;
END
$$;
