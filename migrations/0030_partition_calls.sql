-- Partition `calls` by month of its job's creation (`job_created_at`), so
-- that retention drops whole months instead of deleting rows one by one
-- (docs/operations.md, "Retention"; docs/analytics.md, "Partitions").
--
-- The partition key is the job's creation time: the same for every attempt
-- and every redelivery of a call, because `switchyard_write` sets it from
-- jobs.created_at in the insert itself (as `call_partition_key`; a call whose
-- job row is missing gets 1970-01-01, the default partition). So the
-- unique key (job_id, step, attempt, job_created_at) that Postgres requires
-- of a partitioned table is as unique as (job_id, step, attempt) was, and a
-- final record keeps meeting its intent row. The writer's statements live
-- in `switchyard_write`, redefined below: a worker of an older build calls
-- the new function, so a fleet upgrades one process at a time.
--
-- Monthly partitions calls_pYYYYMM (UTC months) from the oldest existing
-- call's month to next month, and calls_default for anything else:
-- an insert never fails for want of a partition. calls_ensure_partitions()
-- (run by every migrating start, by the workers' rollup task once an hour
-- and by `switchyard prune`) creates the months ahead and moves the rows
-- the default partition holds for them.
--
-- This migration copies every existing call into the new table, under an
-- exclusive lock on `calls` (writers wait; readers of `calls` too): 9 s
-- for a million calls on a 2-core machine (docs/operations.md says how to
-- plan it).

-- A call's partition key: its job's creation time. (switchyard_write
-- spells it out: a SQL function that is not inlined plans its query on
-- every call, 70 us.)
CREATE OR REPLACE FUNCTION call_partition_key(job TEXT) RETURNS TIMESTAMPTZ
LANGUAGE sql STABLE AS $$
    SELECT COALESCE((SELECT j.created_at FROM jobs j WHERE j.id = job),
                    TIMESTAMPTZ '1970-01-01 00:00:00+00')
$$;

CREATE OR REPLACE FUNCTION calls_month_partition(m TIMESTAMPTZ) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
    SELECT 'calls_p' || to_char(m AT TIME ZONE 'UTC', 'YYYYMM')
$$;

-- The monthly partitions of [from_time's month, now + ahead_months],
-- created when missing; rows of such a month found in calls_default are
-- moved into it (partition to partition, beside the parent's statement
-- triggers: the rollups, which count them already, stay). Returns how many
-- partitions it created.
CREATE OR REPLACE FUNCTION calls_ensure_partitions(from_time TIMESTAMPTZ, ahead_months INT)
RETURNS INT LANGUAGE plpgsql AS $$
DECLARE
    m TIMESTAMPTZ;
    last TIMESTAMPTZ;
    name TEXT;
    cols TEXT;
    created INT := 0;
BEGIN
    m := date_trunc('month', from_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    last := date_trunc('month', (now() AT TIME ZONE 'UTC') + make_interval(months => ahead_months))
            AT TIME ZONE 'UTC';
    WHILE m <= last LOOP
        name := calls_month_partition(m);
        IF to_regclass(name) IS NULL THEN
            PERFORM pg_advisory_xact_lock(hashtext('switchyard.calls_partitions'));
            IF to_regclass(name) IS NULL THEN
                SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO cols
                FROM pg_attribute WHERE attrelid = 'calls'::regclass AND attnum > 0
                  AND NOT attisdropped AND attgenerated = '';
                EXECUTE format('CREATE TEMP TABLE calls_moving ON COMMIT DROP AS
                                WITH d AS (DELETE FROM calls_default
                                           WHERE job_created_at >= %L AND job_created_at < %L
                                           RETURNING *)
                                SELECT %s FROM d',
                               m, m + interval '1 month', cols);
                -- fillfactor 80: a final record updates its intent in place (0029).
                EXECUTE format('CREATE TABLE %I PARTITION OF calls FOR VALUES FROM (%L) TO (%L)
                                WITH (fillfactor = 80)',
                               name, m, m + interval '1 month');
                EXECUTE format('INSERT INTO %I (%s) SELECT %s FROM calls_moving', name, cols, cols);
                DROP TABLE calls_moving;
                created := created + 1;
            END IF;
        END IF;
        m := m + interval '1 month';
    END LOOP;
    RETURN created;
END
$$;

CREATE TABLE calls_partitioned (
    LIKE calls INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING CONSTRAINTS,
    job_created_at TIMESTAMPTZ NOT NULL DEFAULT now()
) PARTITION BY RANGE (job_created_at);
CREATE TABLE calls_default PARTITION OF calls_partitioned DEFAULT WITH (fillfactor = 80);

LOCK TABLE calls IN ACCESS EXCLUSIVE MODE;
ALTER TABLE calls RENAME TO calls_unpartitioned;
ALTER TABLE calls_partitioned RENAME TO calls;
ALTER TABLE calls_unpartitioned RENAME CONSTRAINT calls_outcome_check TO calls_unpartitioned_outcome_check;

-- Months from the oldest job that has calls to the next one.
SELECT calls_ensure_partitions(
    COALESCE(LEAST((SELECT min(j.created_at) FROM jobs j
                    WHERE j.id IN (SELECT job_id FROM calls_unpartitioned)),
                   (SELECT min(created_at) FROM calls_unpartitioned)),
             now()),
    1);

-- Every row, under its job's creation time, before the keys, indexes and
-- triggers (the rollups count these rows already).
DO $$
DECLARE
    cols TEXT;
BEGIN
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO cols
    FROM pg_attribute WHERE attrelid = 'calls_unpartitioned'::regclass AND attnum > 0
      AND NOT attisdropped AND attgenerated = '';
    EXECUTE format('INSERT INTO calls (%s, job_created_at)
                    SELECT %s, COALESCE(j.created_at, TIMESTAMPTZ ''1970-01-01 00:00:00+00'')
                    FROM calls_unpartitioned c LEFT JOIN jobs j ON j.id = c.job_id',
                   cols, (SELECT string_agg('c.' || x, ', ') FROM unnest(string_to_array(cols, ', ')) x));
END
$$;

-- What named the old table moves to the new one: the views over it (by
-- their own text), its statement triggers (rollups and job-rollup marks),
-- its grants, and the one function whose arguments are its row type.
DO $$
DECLARE
    r RECORD;
    def TEXT;
BEGIN
    FOR r IN SELECT DISTINCT v.oid, v.oid::regclass::text AS name
             FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid
             JOIN pg_class v ON v.oid = w.ev_class
             WHERE d.refobjid = 'calls_unpartitioned'::regclass
               AND v.oid <> 'calls_unpartitioned'::regclass LOOP
        EXECUTE format('CREATE OR REPLACE VIEW %s AS %s', r.name,
                       replace(pg_get_viewdef(r.oid), 'calls_unpartitioned', 'calls'));
    END LOOP;
    FOR r IN SELECT t.oid, t.tgenabled, t.tgname FROM pg_trigger t
             WHERE t.tgrelid = 'calls_unpartitioned'::regclass AND NOT t.tgisinternal LOOP
        EXECUTE regexp_replace(pg_get_triggerdef(r.oid),
                               ' ON (public\.)?calls_unpartitioned ', ' ON calls ');
        IF r.tgenabled = 'D' THEN
            EXECUTE format('ALTER TABLE calls DISABLE TRIGGER %I', r.tgname);
        END IF;
    END LOOP;
    FOR r IN SELECT g.grantee, g.privilege_type FROM information_schema.role_table_grants g
             WHERE g.table_schema = current_schema() AND g.table_name = 'calls_unpartitioned'
               AND g.grantee <> (SELECT pg_get_userbyid(relowner) FROM pg_class
                                 WHERE oid = 'calls_unpartitioned'::regclass) LOOP
        EXECUTE format('GRANT %s ON calls TO %s', r.privilege_type,
                       CASE WHEN r.grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(r.grantee) END);
    END LOOP;
    SELECT pg_get_functiondef(p.oid) INTO def FROM pg_proc p
    WHERE p.oid = 'call_rollups_apply(calls_unpartitioned[], calls_unpartitioned[], calls_unpartitioned[])'::regprocedure;
    DROP FUNCTION call_rollups_apply(calls_unpartitioned[], calls_unpartitioned[], calls_unpartitioned[]);
    EXECUTE replace(def, 'calls_unpartitioned', 'calls');
END
$$;

ALTER SEQUENCE calls_id_seq OWNED BY calls.id;
DROP TABLE calls_unpartitioned;

-- The keys and indexes (the old names), built once over the copied rows.
ALTER TABLE calls ADD CONSTRAINT calls_pkey PRIMARY KEY (id, job_created_at);
ALTER TABLE calls ADD CONSTRAINT calls_job_id_step_attempt_key
    UNIQUE (job_id, step, attempt, job_created_at);
CREATE INDEX calls_created_idx ON calls (created_at);
CREATE INDEX calls_category_created_idx ON calls (category, created_at);
CREATE INDEX calls_batch_idx ON calls (batch_id) WHERE batch_id IS NOT NULL;
ANALYZE calls;

-- Drop one monthly partition (retention): its calls leave the rollups and
-- call_jobs as a DELETE of them would (migration 0028: the rolled calls'
-- figures are taken away, the pairs uncounted), without deleting row by
-- row. Every call of a job is in its job's month, so the partition's jobs
-- lose all their calls. Returns the calls dropped.
CREATE OR REPLACE FUNCTION calls_drop_partition(part TEXT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    s SMALLINT;
    wm TIMESTAMPTZ;
    rs call_rollups[];
    hs TIMESTAMPTZ[];
    n BIGINT;
BEGIN
    IF part !~ '^calls_p[0-9]{6}$' OR to_regclass(part) IS NULL THEN
        RAISE EXCEPTION 'no calls partition %', part;
    END IF;
    EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', part);
    wm := call_rollups_late_watermark();
    s := call_rollup_shard();
    EXECUTE format($q$
        SELECT ARRAY(
            SELECT ROW(rollup_hour(created_at), category, provider, model,
                       batch_id IS NOT NULL, 0,
                       -count(*),
                       -count(*) FILTER (WHERE outcome = 'ok'),
                       -count(*) FILTER (WHERE outcome = 'retryable_error'),
                       -count(*) FILTER (WHERE outcome = 'terminal_error'),
                       -count(*) FILTER (WHERE outcome = 'unknown'),
                       -count(*) FILTER (WHERE outcome = 'cached'),
                       -count(*) FILTER (WHERE attempt > 1),
                       0,
                       -sum(input_tokens), -sum(output_tokens), -sum(cached_input_tokens),
                       -sum(cache_write_input_tokens), -sum(reasoning_tokens),
                       -sum(cost_usd), -COALESCE(sum(saved_usd), 0),
                       -COALESCE(sum(latency_ms) FILTER (WHERE outcome = 'ok'), 0),
                       latency_hist(CASE WHEN outcome = 'ok' THEN latency_bucket(latency_ms) END,
                                    -1))::call_rollups
            FROM %I WHERE created_at < $1
            GROUP BY rollup_hour(created_at), category, provider, model, batch_id IS NOT NULL)
    $q$, part) INTO rs USING wm;
    PERFORM call_rollups_merge(rs, s);
    EXECUTE format($q$
        WITH g AS (
            DELETE FROM call_jobs cj
            WHERE cj.job_id IN (SELECT DISTINCT job_id FROM %I)
            RETURNING cj.hour, cj.category, cj.provider, cj.model, cj.batched)
        SELECT array_agg(x.r)
        FROM (SELECT ROW(hour, category, provider, model, batched, 0, 0, 0, 0, 0, 0, 0, 0,
                         -count(*), 0, 0, 0, 0, 0, 0, 0, 0, NULL)::call_rollups AS r
              FROM g GROUP BY hour, category, provider, model, batched) x
    $q$, part) INTO rs;
    PERFORM call_rollups_merge(COALESCE(rs, '{}'), s);
    -- The job rollups' hours of these jobs, as the calls' delete trigger
    -- would mark them (0026).
    EXECUTE format('SELECT ARRAY(SELECT DISTINCT rollup_hour(job_created_at) FROM %I
                                 WHERE job_created_at < now() - job_rollups_settle())', part)
        INTO hs;
    IF cardinality(hs) > 0 THEN
        PERFORM job_rollups_mark(hs);
    END IF;
    EXECUTE format('SELECT count(*) FROM %I', part) INTO n;
    EXECUTE format('DROP TABLE %I', part);
    RETURN n;
END
$$;

-- The writer (0025's switchyard_write): the calls statements name the
-- partition key, so each upsert meets its row's partition and each check
-- probes one partition. Everything else is as 0025 wrote it.
CREATE OR REPLACE FUNCTION switchyard_write(
    terminal TEXT[], st_dead TEXT, st_cancelled TEXT, st_queued TEXT,
    j_id TEXT[] = '{}', j_category TEXT[] = '{}', j_status TEXT[] = '{}',
    j_envelope JSONB[] = '{}', j_route JSONB[] = '{}', j_error TEXT[] = '{}',
    j_enqueued_ms INT8[] = '{}', j_variant TEXT[] = '{}', j_callback TEXT[] = '{}',
    d_source TEXT[] = '{}', d_subject TEXT[] = '{}', d_job TEXT[] = '{}', d_payload BYTEA[] = '{}',
    d_reason TEXT[] = '{}',
    r_id TEXT[] = '{}', r_category TEXT[] = '{}', r_variant TEXT[] = '{}', r_route JSONB[] = '{}',
    r_callback_default TEXT[] = '{}',
    c_job TEXT[] = '{}', c_category TEXT[] = '{}', c_provider TEXT[] = '{}', c_model TEXT[] = '{}',
    c_step INT4[] = '{}', c_attempt INT4[] = '{}', c_input_tokens INT8[] = '{}',
    c_output_tokens INT8[] = '{}', c_cached_input_tokens INT8[] = '{}',
    c_price_input NUMERIC[] = '{}', c_price_output NUMERIC[] = '{}',
    c_price_cached_input NUMERIC[] = '{}', c_cost_usd NUMERIC[] = '{}', c_latency_ms INT4[] = '{}',
    c_http_status INT4[] = '{}', c_outcome TEXT[] = '{}', c_error TEXT[] = '{}',
    c_cache_write_input_tokens INT8[] = '{}', c_reasoning_tokens INT8[] = '{}',
    c_price_cache_write NUMERIC[] = '{}', c_batch_id TEXT[] = '{}', c_intent BOOLEAN[] = '{}',
    c_busy_secs FLOAT8[] = '{}',
    s_job TEXT[] = '{}', s_step INT4[] = '{}', s_model TEXT[] = '{}', s_outcome TEXT[] = '{}',
    s_output TEXT[] = '{}', s_reason TEXT[] = '{}',
    x_job TEXT[] = '{}', x_category TEXT[] = '{}', x_output TEXT[] = '{}', x_model TEXT[] = '{}',
    x_finish_reason TEXT[] = '{}', x_latency_ms INT8[] = '{}', x_answer_step INT4[] = '{}',
    x_output_json TEXT[] = '{}',
    u_id TEXT[] = '{}', u_status TEXT[] = '{}', u_error TEXT[] = '{}',
    u_review_reason TEXT[] = '{}', u_tried JSONB[] = '{}',
    p_id TEXT[] = '{}', p_parked BOOLEAN[] = '{}',
    w_id TEXT[] = '{}', w_ms INT8[] = '{}'
) RETURNS TABLE (out_job TEXT, out_step INT4, out_attempt INT4, out_status TEXT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    ids TEXT[];
    statuses TEXT[];
    missing TEXT[];
    has_intents BOOLEAN := COALESCE(true = ANY(c_intent), false);
    has_finals BOOLEAN := COALESCE(false = ANY(c_intent), false);
    lo TIMESTAMPTZ;
    hi TIMESTAMPTZ;
BEGIN
    IF has_intents THEN
        -- First, before any row lock: intents of the same step from two
        -- processes take turns, so the second sees the first (which may
        -- have another attempt number) and is refused. Locks in a fixed
        -- order: no deadlock between two batches.
        PERFORM count(pg_advisory_xact_lock(k, s))
        FROM (SELECT DISTINCT hashtext(t.j) AS k, t.s
              FROM UNNEST(c_job, c_step, c_intent) AS t(j, s, i)
              WHERE t.i ORDER BY 1, 2) o;
    END IF;

    IF cardinality(j_id) > 0 THEN
        -- New job rows, or (a dead-lettered job published again, fixed)
        -- replacing a dead one; each job's status after it: the row
        -- written, else the one already there (the statement's snapshot
        -- predates its own writes, so an updated row comes from `ins`).
        -- `created_at` stays: it is the job's calls' partition key.
        WITH ins AS (
            INSERT INTO jobs (id, category, status, envelope, route_decision, error, enqueued_at,
                              finished_at, variant, callback_url)
            SELECT u.id, u.category, u.status, u.envelope, u.route_decision, u.error,
                   to_timestamp(u.enqueued_ms / 1000.0),
                   CASE WHEN u.status = ANY(terminal) THEN now() END,
                   u.variant, u.callback_url
            FROM UNNEST(j_id, j_category, j_status, j_envelope, j_route, j_error, j_enqueued_ms,
                        j_variant, j_callback)
                 AS u(id, category, status, envelope, route_decision, error, enqueued_ms, variant,
                      callback_url)
            ON CONFLICT (id) DO UPDATE
                SET category = EXCLUDED.category, status = EXCLUDED.status,
                    envelope = EXCLUDED.envelope, route_decision = EXCLUDED.route_decision,
                    error = NULL, enqueued_at = EXCLUDED.enqueued_at, finished_at = NULL,
                    variant = EXCLUDED.variant, callback_url = EXCLUDED.callback_url
                -- A job first seen malformed may be published again, fixed, under its id.
                WHERE jobs.status = st_dead AND EXCLUDED.status <> st_dead
            RETURNING jobs.id, jobs.status),
        found AS (
            SELECT ins.id, ins.status FROM ins
            UNION ALL
            SELECT j.id, j.status FROM jobs j
            WHERE j.id = ANY(j_id) AND NOT EXISTS (SELECT 1 FROM ins WHERE ins.id = j.id))
        SELECT array_agg(found.id), array_agg(found.status) INTO ids, statuses FROM found;
        ids := COALESCE(ids, '{}');
        statuses := COALESCE(statuses, '{}');
        RETURN QUERY SELECT t.id, NULL::INT4, NULL::INT4, t.st FROM UNNEST(ids, statuses) AS t(id, st);
        -- A row another transaction committed after that statement's
        -- snapshot was taken stopped the insert but is not in the
        -- snapshot: this statement's (newer) one has it (rare: the same
        -- job written by two processes at once).
        SELECT array_agg(DISTINCT m) INTO missing FROM UNNEST(j_id) AS m WHERE m <> ALL(ids);
        IF missing IS NOT NULL THEN
            RETURN QUERY SELECT j.id, NULL::INT4, NULL::INT4, j.status FROM jobs j WHERE j.id = ANY(missing);
        END IF;
    END IF;

    IF cardinality(d_source) > 0 THEN
        INSERT INTO dead_letters (source, subject, job_id, payload, reason)
        SELECT * FROM UNNEST(d_source, d_subject, d_job, d_payload, d_reason)
        ON CONFLICT (source) DO NOTHING;
    END IF;

    IF cardinality(r_id) > 0 THEN
        UPDATE jobs SET category = u.category, variant = u.variant, route_decision = u.route_decision,
               callback_url = COALESCE(jobs.envelope->>'callback_url', u.callback_default)
        FROM UNNEST(r_id, r_category, r_variant, r_route, r_callback_default)
             AS u(id, category, variant, route_decision, callback_default)
        WHERE jobs.id = u.id AND jobs.status <> ALL(terminal);
    END IF;

    IF cardinality(c_job) + cardinality(x_job) > 0 THEN
        -- The partition keys of the batch's calls lie in [lo, hi] (one
        -- month, as a rule). The probes of `calls` below name these
        -- bounds, which are parameters of their plans: the executor prunes
        -- every other partition as it starts, instead of setting up an
        -- index scan on each and pruning per row.
        SELECT min(k.jc), max(k.jc) INTO lo, hi
        FROM UNNEST(c_job || x_job) AS t(id)
        CROSS JOIN LATERAL (SELECT COALESCE((SELECT j.created_at FROM jobs j WHERE j.id = t.id),
                                            TIMESTAMPTZ '1970-01-01 00:00:00+00') AS jc) k;
    END IF;

    IF has_intents THEN
        -- Intent rows (outcome `unknown`, the reserved usage), each the
        -- check-and-claim before a provider call: none if the step is
        -- answered, the job finished, or another attempt is `unknown` and
        -- younger than busy_secs. The attempt is the row's, or one past
        -- the step's highest if that is taken.
        RETURN QUERY
        WITH ins AS (
            INSERT INTO calls (job_id, category, provider, model, step, attempt,
                               input_tokens, output_tokens, cached_input_tokens,
                               price_input_per_mtok, price_output_per_mtok, price_cached_input_per_mtok,
                               cost_usd, latency_ms, http_status, outcome, error,
                               cache_write_input_tokens, reasoning_tokens, price_cache_write_per_mtok,
                               batch_id, job_created_at)
            SELECT u.job_id, u.category, u.provider, u.model, u.step,
                   GREATEST(u.attempt, COALESCE((SELECT max(c.attempt) FROM calls c
                                                 WHERE c.job_id = u.job_id AND c.step = u.step
                                                   AND c.job_created_at = k.jc
                                                   AND c.job_created_at BETWEEN lo AND hi), 0) + 1),
                   u.input_tokens, u.output_tokens, u.cached_input_tokens,
                   u.price_input, u.price_output, u.price_cached_input,
                   u.cost_usd, u.latency_ms, u.http_status, u.outcome, u.error,
                   u.cache_write_input_tokens, u.reasoning_tokens, u.price_cache_write, u.batch_id,
                   k.jc
            FROM UNNEST(c_job, c_category, c_provider, c_model, c_step, c_attempt,
                        c_input_tokens, c_output_tokens, c_cached_input_tokens,
                        c_price_input, c_price_output, c_price_cached_input,
                        c_cost_usd, c_latency_ms, c_http_status, c_outcome, c_error,
                        c_cache_write_input_tokens, c_reasoning_tokens, c_price_cache_write,
                        c_batch_id, c_intent, c_busy_secs)
                 AS u(job_id, category, provider, model, step, attempt,
                      input_tokens, output_tokens, cached_input_tokens,
                      price_input, price_output, price_cached_input,
                      cost_usd, latency_ms, http_status, outcome, error,
                      cache_write_input_tokens, reasoning_tokens, price_cache_write,
                      batch_id, intent, busy_secs)
            CROSS JOIN LATERAL (SELECT COALESCE((SELECT j.created_at FROM jobs j WHERE j.id = u.job_id),
                                                TIMESTAMPTZ '1970-01-01 00:00:00+00') AS jc) k
            WHERE u.intent
              AND NOT EXISTS (SELECT 1 FROM calls c
                              WHERE c.job_id = u.job_id AND c.step = u.step
                                AND c.job_created_at = k.jc
                                AND c.job_created_at BETWEEN lo AND hi
                                AND (c.outcome IN ('ok', 'cached')
                                     OR (c.outcome = 'unknown'
                                         AND c.created_at > now() - make_interval(secs => u.busy_secs)))
                              OFFSET 0)
              AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.job_id = u.job_id AND s.step = u.step
                              OFFSET 0)
              AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = u.job_id
                              AND j.status = ANY(terminal) OFFSET 0)
            ON CONFLICT (job_id, step, attempt, job_created_at) DO NOTHING
            RETURNING calls.job_id, calls.step, calls.attempt)
        SELECT ins.job_id, ins.step, ins.attempt, NULL::TEXT FROM ins;
    END IF;

    IF has_finals THEN
        -- Final cost records. Each replaces its attempt's intent
        -- (`unknown`) row; a final row already there stays (a redelivered
        -- commit changes nothing).
        INSERT INTO calls AS cl (job_id, category, provider, model, step, attempt,
                                 input_tokens, output_tokens, cached_input_tokens,
                                 price_input_per_mtok, price_output_per_mtok, price_cached_input_per_mtok,
                                 cost_usd, latency_ms, http_status, outcome, error,
                                 cache_write_input_tokens, reasoning_tokens, price_cache_write_per_mtok,
                                 batch_id, job_created_at)
        SELECT u.job_id, u.category, u.provider, u.model, u.step, u.attempt,
               u.input_tokens, u.output_tokens, u.cached_input_tokens,
               u.price_input, u.price_output, u.price_cached_input,
               u.cost_usd, u.latency_ms, u.http_status, u.outcome, u.error,
               u.cache_write_input_tokens, u.reasoning_tokens, u.price_cache_write, u.batch_id,
               COALESCE((SELECT j.created_at FROM jobs j WHERE j.id = u.job_id),
                        TIMESTAMPTZ '1970-01-01 00:00:00+00')
        FROM UNNEST(c_job, c_category, c_provider, c_model, c_step, c_attempt,
                    c_input_tokens, c_output_tokens, c_cached_input_tokens,
                    c_price_input, c_price_output, c_price_cached_input,
                    c_cost_usd, c_latency_ms, c_http_status, c_outcome, c_error,
                    c_cache_write_input_tokens, c_reasoning_tokens, c_price_cache_write,
                    c_batch_id, c_intent)
             AS u(job_id, category, provider, model, step, attempt,
                  input_tokens, output_tokens, cached_input_tokens,
                  price_input, price_output, price_cached_input,
                  cost_usd, latency_ms, http_status, outcome, error,
                  cache_write_input_tokens, reasoning_tokens, price_cache_write,
                  batch_id, intent)
        WHERE NOT u.intent
        ON CONFLICT (job_id, step, attempt, job_created_at) DO UPDATE SET
            category = EXCLUDED.category, provider = EXCLUDED.provider, model = EXCLUDED.model,
            input_tokens = EXCLUDED.input_tokens, output_tokens = EXCLUDED.output_tokens,
            cached_input_tokens = EXCLUDED.cached_input_tokens,
            price_input_per_mtok = EXCLUDED.price_input_per_mtok,
            price_output_per_mtok = EXCLUDED.price_output_per_mtok,
            price_cached_input_per_mtok = EXCLUDED.price_cached_input_per_mtok,
            cost_usd = EXCLUDED.cost_usd, latency_ms = EXCLUDED.latency_ms,
            http_status = EXCLUDED.http_status, outcome = EXCLUDED.outcome,
            error = EXCLUDED.error,
            cache_write_input_tokens = EXCLUDED.cache_write_input_tokens,
            reasoning_tokens = EXCLUDED.reasoning_tokens,
            price_cache_write_per_mtok = EXCLUDED.price_cache_write_per_mtok,
            batch_id = EXCLUDED.batch_id
        WHERE cl.outcome = 'unknown';
    END IF;

    IF cardinality(s_job) > 0 THEN
        INSERT INTO steps (job_id, step, model, outcome, output, reason)
        SELECT * FROM UNNEST(s_job, s_step, s_model, s_outcome, s_output, s_reason)
        ON CONFLICT (job_id, step) DO NOTHING;
    END IF;

    IF cardinality(x_job) > 0 THEN
        -- Cost and tokens are the sums over all the job's calls, written
        -- above or in earlier transactions. A cancelled job keeps no
        -- result (its last call is recorded).
        INSERT INTO results (job_id, category, output, model, finish_reason, cost_usd,
                             input_tokens, output_tokens, latency_ms, answer_step, output_json)
        SELECT r.job_id, r.category, r.output, r.model, r.finish_reason,
               COALESCE(c.cost, 0), COALESCE(c.inp, 0), COALESCE(c.outp, 0), r.latency_ms,
               r.answer_step, r.output_json::jsonb
        FROM UNNEST(x_job, x_category, x_output, x_model, x_finish_reason, x_latency_ms,
                    x_answer_step, x_output_json)
             AS r(job_id, category, output, model, finish_reason, latency_ms, answer_step,
                  output_json)
        CROSS JOIN LATERAL (SELECT COALESCE((SELECT j.created_at FROM jobs j WHERE j.id = r.job_id),
                                            TIMESTAMPTZ '1970-01-01 00:00:00+00') AS jc) k
        LEFT JOIN LATERAL (
            SELECT sum(calls.cost_usd) AS cost, sum(calls.input_tokens)::int8 AS inp,
                   sum(calls.output_tokens)::int8 AS outp
            FROM calls WHERE calls.job_id = r.job_id AND calls.job_created_at = k.jc
                         AND calls.job_created_at BETWEEN lo AND hi
        ) c ON true
        WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = r.job_id AND j.status = st_cancelled
                          OFFSET 0)
        ON CONFLICT (job_id) DO NOTHING;
    END IF;

    IF cardinality(u_id) > 0 THEN
        -- A terminal status is final: never overwrite one.
        UPDATE jobs SET status = u.status, error = COALESCE(u.error, jobs.error),
               review_reason = COALESCE(u.review_reason, jobs.review_reason),
               route_decision = CASE WHEN u.tried IS NULL THEN jobs.route_decision
                   ELSE jsonb_set(COALESCE(jobs.route_decision, '{}'::jsonb), '{tried}', u.tried) END,
               finished_at = CASE WHEN u.status = ANY(terminal) THEN now() ELSE jobs.finished_at END
        FROM UNNEST(u_id, u_status, u_error, u_review_reason, u_tried)
             AS u(id, status, error, review_reason, tried)
        WHERE jobs.id = u.id AND jobs.status <> ALL(terminal);
    END IF;

    -- After the statuses: a job parked as it is reclassified is `queued` again.
    IF cardinality(p_id) > 0 THEN
        UPDATE jobs SET parked_at = CASE WHEN u.parked THEN COALESCE(jobs.parked_at, now()) END
        FROM UNNEST(p_id, p_parked) AS u(id, parked)
        WHERE jobs.id = u.id AND jobs.status = st_queued;
    END IF;

    IF cardinality(w_id) > 0 THEN
        UPDATE jobs SET parked_at = COALESCE(jobs.parked_at, now()),
               not_before = to_timestamp(u.ms / 1000.0)
        FROM UNNEST(w_id, w_ms) AS u(id, ms)
        WHERE jobs.id = u.id AND jobs.status = st_queued;
    END IF;
END
$$;
