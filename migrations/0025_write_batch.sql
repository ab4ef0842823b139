-- One batch of the writer in one round trip (see src/store/writer.rs).
--
-- The writer used to send a batch as BEGIN, up to eleven statements and
-- COMMIT, each waiting for the one before it: at 1,000 jobs/s the round
-- trips, not the statements, were most of a transaction's time, and every
-- commit waits for the one before it in its slot. `switchyard_write` runs
-- the same statements, in the same order, inside Postgres; called outside
-- an explicit transaction it is one transaction, committed when it
-- returns. Each argument group is one kind of row as parallel arrays
-- (empty when the batch holds none):
--   j_*  job rows                 d_*  dead letters
--   r_*  reclassifications        c_*  cost records: intents (c_intent)
--   s_*  step records                   and final rows, `calls` columns
--   x_*  results                  u_*  status changes
--   p_*  parkings                 w_*  schedules (not before)
-- and the job statuses it needs by name (`terminal`: the final ones), bound
-- from `JobStatus` like every status the code writes.
-- It returns one row per job row (its status after the insert: the row
-- written, else the one already there) and one per intent written (the
-- attempt it holds); see `Committed` in src/store/rows.rs.
--
-- Plans: every lookup is by key. The writer's connections run with
-- `enable_seqscan = off` and `plan_cache_mode = force_generic_plan`, which
-- PL/pgSQL's cached plans follow; `OFFSET 0` keeps the per-row checks
-- per-row probes instead of joins that scan (see write_pool).

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
                               batch_id)
            SELECT u.job_id, u.category, u.provider, u.model, u.step,
                   GREATEST(u.attempt, COALESCE((SELECT max(c.attempt) FROM calls c
                                                 WHERE c.job_id = u.job_id AND c.step = u.step), 0) + 1),
                   u.input_tokens, u.output_tokens, u.cached_input_tokens,
                   u.price_input, u.price_output, u.price_cached_input,
                   u.cost_usd, u.latency_ms, u.http_status, u.outcome, u.error,
                   u.cache_write_input_tokens, u.reasoning_tokens, u.price_cache_write, u.batch_id
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
            WHERE u.intent
              AND NOT EXISTS (SELECT 1 FROM calls c
                              WHERE c.job_id = u.job_id AND c.step = u.step
                                AND (c.outcome IN ('ok', 'cached')
                                     OR (c.outcome = 'unknown'
                                         AND c.created_at > now() - make_interval(secs => u.busy_secs)))
                              OFFSET 0)
              AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.job_id = u.job_id AND s.step = u.step
                              OFFSET 0)
              AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = u.job_id
                              AND j.status = ANY(terminal) OFFSET 0)
            ON CONFLICT (job_id, step, attempt) DO NOTHING
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
                                 batch_id)
        SELECT u.job_id, u.category, u.provider, u.model, u.step, u.attempt,
               u.input_tokens, u.output_tokens, u.cached_input_tokens,
               u.price_input, u.price_output, u.price_cached_input,
               u.cost_usd, u.latency_ms, u.http_status, u.outcome, u.error,
               u.cache_write_input_tokens, u.reasoning_tokens, u.price_cache_write, u.batch_id
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
        ON CONFLICT (job_id, step, attempt) DO UPDATE SET
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
        LEFT JOIN LATERAL (
            SELECT sum(calls.cost_usd) AS cost, sum(calls.input_tokens)::int8 AS inp,
                   sum(calls.output_tokens)::int8 AS outp
            FROM calls WHERE calls.job_id = r.job_id
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
