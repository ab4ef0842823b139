-- The response cache (opt-in per category): an answer already paid for is
-- served again for an identical provider request, without a call. A hit is
-- a `calls` row with outcome `cached`, cost 0, the tokens and prices of the
-- answer it reuses, and `saved_usd`, what it would have cost.
ALTER TABLE calls DROP CONSTRAINT IF EXISTS calls_outcome_check;
ALTER TABLE calls ADD CONSTRAINT calls_outcome_check
    CHECK (outcome IN ('ok', 'retryable_error', 'terminal_error', 'unknown', 'cached'));
ALTER TABLE calls ADD COLUMN IF NOT EXISTS saved_usd NUMERIC GENERATED ALWAYS AS (
    CASE WHEN outcome = 'cached' THEN trim_scale((
        GREATEST(input_tokens - cached_input_tokens - cache_write_input_tokens, 0) * price_input_per_mtok
        + cached_input_tokens * price_cached_input_per_mtok
        + cache_write_input_tokens * price_cache_write_per_mtok
        + output_tokens * price_output_per_mtok) / 1000000) END) STORED;

-- One entry per normalised provider request (a SHA-256 of provider, model,
-- messages with image digests, parameters and answer format; with scope
-- `category`, of the category too). `pending`: one worker is calling the
-- provider for it and the others wait (coalescing), until `pending_until`.
CREATE TABLE IF NOT EXISTS response_cache (
    key                         TEXT PRIMARY KEY,
    category                    TEXT NOT NULL,
    provider                    TEXT NOT NULL,
    model                       TEXT NOT NULL,
    state                       TEXT NOT NULL CHECK (state IN ('pending', 'ready')),
    owner                       TEXT,
    pending_until               TIMESTAMPTZ,
    output                      TEXT,
    finish_reason               TEXT,
    input_tokens                BIGINT NOT NULL DEFAULT 0,
    output_tokens               BIGINT NOT NULL DEFAULT 0,
    cached_input_tokens         BIGINT NOT NULL DEFAULT 0,
    cache_write_input_tokens    BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens            BIGINT NOT NULL DEFAULT 0,
    cost_usd                    NUMERIC NOT NULL DEFAULT 0,
    hits                        BIGINT NOT NULL DEFAULT 0,
    created_at                  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at                  TIMESTAMPTZ NOT NULL,
    last_hit_at                 TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS response_cache_expires_idx ON response_cache (expires_at);
CREATE INDEX IF NOT EXISTS response_cache_category_idx ON response_cache (category);

-- Per category and model: answers served from the cache and what they saved.
CREATE OR REPLACE VIEW cache_savings AS
SELECT category, provider, model,
       count(*) AS calls,
       count(*) FILTER (WHERE outcome = 'cached') AS cached_calls,
       round(count(*) FILTER (WHERE outcome = 'cached')::numeric / count(*), 4) AS cached_share,
       COALESCE(sum(saved_usd), 0) AS saved_usd
FROM calls
GROUP BY category, provider, model;

-- Savings: a cached answer is the job's answer like a paid one.
CREATE OR REPLACE VIEW job_costs AS
SELECT j.id AS job_id, j.category, j.status,
       COALESCE(j.route_decision->>'kind', 'single') AS route,
       COALESCE(j.variant, '-') AS variant,
       j.created_at,
       CASE WHEN a.id IS NOT NULL THEN 'answered'
            WHEN r.job_id IS NOT NULL THEN 'person'
            ELSE 'no_result' END AS outcome,
       r.model AS answered_by,
       r.answer_step,
       COALESCE(GREATEST(f.input_tokens - f.cached_input_tokens, 0), 0)::int8
           AS first_uncached_input_tokens,
       COALESCE(LEAST(f.cached_input_tokens, f.input_tokens), 0)::int8 AS first_cached_input_tokens,
       COALESCE(a.output_tokens, 0)::int8 AS answer_output_tokens,
       COALESCE(c.calls, 0)::int8 AS calls,
       COALESCE(c.cost_usd, 0) AS cost_usd,
       COALESCE(c.answer_usd, 0) AS answer_cost_usd,
       COALESCE(c.cost_usd, 0) - COALESCE(c.answer_usd, 0) AS overhead_cost_usd,
       COALESCE(c.retries_usd, 0) AS retries_cost_usd,
       COALESCE(c.classifier_usd, 0) AS classifier_cost_usd,
       COALESCE(c.fallback_usd, 0) AS fallback_cost_usd,
       COALESCE(c.stages_usd, 0) AS stages_cost_usd,
       COALESCE(c.voters_usd, 0) AS voters_cost_usd,
       COALESCE(c.judge_usd, 0) AS judge_cost_usd,
       (j.route_decision->>'kind' = 'fallback'
        AND EXISTS (SELECT 1 FROM steps s WHERE s.job_id = j.id AND s.step > 0)) AS fell_back,
       (j.status = 'needs_review' OR j.route_decision ? 'review') AS reviewed,
       COALESCE(fb.ratings, 0)::int8 AS ratings,
       fb.score_sum::int8 AS score_sum
FROM jobs j
LEFT JOIN results r ON r.job_id = j.id
LEFT JOIN LATERAL (
    SELECT id, output_tokens FROM calls
    WHERE calls.job_id = j.id AND calls.step = r.answer_step AND calls.outcome IN ('ok', 'cached')
    ORDER BY attempt DESC LIMIT 1) a ON true
LEFT JOIN LATERAL (
    SELECT input_tokens, cached_input_tokens FROM calls
    WHERE calls.job_id = j.id AND calls.step >= 0 AND calls.outcome IN ('ok', 'cached')
    ORDER BY step, attempt LIMIT 1) f ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS calls, sum(cost_usd) AS cost_usd,
           sum(cost_usd) FILTER (WHERE id = a.id) AS answer_usd,
           sum(cost_usd) FILTER (WHERE outcome NOT IN ('ok', 'cached')) AS retries_usd,
           sum(cost_usd) FILTER (WHERE outcome IN ('ok', 'cached') AND step < 0) AS classifier_usd,
           sum(cost_usd) FILTER (WHERE x.extra AND x.kind NOT IN ('pipeline', 'consensus'))
               AS fallback_usd,
           sum(cost_usd) FILTER (WHERE x.extra AND x.kind = 'pipeline') AS stages_usd,
           sum(cost_usd) FILTER (WHERE x.extra AND x.kind = 'consensus' AND step < x.voters)
               AS voters_usd,
           sum(cost_usd) FILTER (WHERE x.extra AND x.kind = 'consensus' AND step >= x.voters)
               AS judge_usd
    FROM calls
    CROSS JOIN LATERAL (SELECT
        calls.outcome IN ('ok', 'cached') AND calls.step >= 0 AND calls.id IS DISTINCT FROM a.id AS extra,
        COALESCE(j.route_decision->>'kind', 'single') AS kind,
        COALESCE(jsonb_array_length(j.route_decision->'plan'->'voters'), 0) AS voters) x
    WHERE calls.job_id = j.id) c ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS ratings, sum(score) AS score_sum FROM feedback WHERE feedback.job_id = j.id
) fb ON true;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'switchyard_analyst') THEN
        GRANT SELECT ON response_cache, cache_savings TO switchyard_analyst;
    END IF;
END
$$;
