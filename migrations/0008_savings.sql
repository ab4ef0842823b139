-- Savings you can defend: what each job cost, split into the call whose
-- answer became its result and the overhead around it, and what the same job
-- would have cost as one call on one model (the counterfactual baseline).
-- docs/analytics.md, "Savings", explains every column.

-- The step whose answer became the result (NULL: a person resolved the job).
ALTER TABLE results ADD COLUMN IF NOT EXISTS answer_step INTEGER;

-- Results written before this column: the highest answered step of the
-- result's model whose recorded output is the result (single routes record
-- no steps: their step 0).
UPDATE results r SET answer_step = (
    SELECT c.step FROM calls c
    LEFT JOIN steps s ON s.job_id = c.job_id AND s.step = c.step
    WHERE c.job_id = r.job_id AND c.outcome = 'ok' AND c.step >= 0 AND c.model = r.model
      AND (s.job_id IS NULL OR s.output = r.output)
    ORDER BY c.step DESC LIMIT 1)
WHERE r.answer_step IS NULL AND r.model <> 'human';

-- The report and the dashboard select jobs by their creation time.
CREATE INDEX IF NOT EXISTS jobs_created_idx ON jobs (created_at);

-- The configured models' prices (USD per 1M tokens), written by every worker
-- at start from its configuration; `is_baseline` marks `report.baseline_model`.
CREATE TABLE IF NOT EXISTS model_prices (
    model                   TEXT PRIMARY KEY,
    provider                TEXT NOT NULL,
    input_per_mtok          NUMERIC NOT NULL,
    output_per_mtok         NUMERIC NOT NULL,
    cached_input_per_mtok   NUMERIC NOT NULL,
    cache_write_per_mtok    NUMERIC NOT NULL,
    is_baseline             BOOLEAN NOT NULL DEFAULT false,
    synced_at               TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One call's USD at a model's prices: uncached input, cached input reads and
-- output tokens (the formula of `Prices::cost`, without cache writes: the
-- baseline counts them as uncached input).
CREATE OR REPLACE FUNCTION one_call_usd(
    uncached_input BIGINT, cached_input BIGINT, output BIGINT,
    input_per_mtok NUMERIC, cached_input_per_mtok NUMERIC, output_per_mtok NUMERIC)
RETURNS NUMERIC LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT trim_scale((uncached_input * input_per_mtok + cached_input * cached_input_per_mtok
                       + output * output_per_mtok) / 1000000)
$$;

-- Per job: how it ended, what all its calls cost, the answer call's cost and
-- the overhead by kind, and the tokens a one-call baseline is priced on.
--   outcome: 'answered' (a model's answer is the result), 'person' (resolved
--            in review), 'no_result' (failed, dead, waiting, running).
--   first_*: the first answered call at step >= 0 (the classifier is step
--            -1), its input split into uncached (cache writes included) and
--            cached reads; answer_output_tokens: the answer call's output.
--   overhead: retries (every call that did not answer: errors, `unknown`),
--            classifier, fallback (earlier targets' rejected answers),
--            stages (earlier pipeline stages), voters (consensus voters
--            other than the answer), judge (the consensus judge).
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
    WHERE calls.job_id = j.id AND calls.step = r.answer_step AND calls.outcome = 'ok'
    ORDER BY attempt DESC LIMIT 1) a ON true
LEFT JOIN LATERAL (
    SELECT input_tokens, cached_input_tokens FROM calls
    WHERE calls.job_id = j.id AND calls.step >= 0 AND calls.outcome = 'ok'
    ORDER BY step, attempt LIMIT 1) f ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS calls, sum(cost_usd) AS cost_usd,
           sum(cost_usd) FILTER (WHERE id = a.id) AS answer_usd,
           sum(cost_usd) FILTER (WHERE outcome <> 'ok') AS retries_usd,
           sum(cost_usd) FILTER (WHERE outcome = 'ok' AND step < 0) AS classifier_usd,
           sum(cost_usd) FILTER (WHERE x.extra AND x.kind NOT IN ('pipeline', 'consensus'))
               AS fallback_usd,
           sum(cost_usd) FILTER (WHERE x.extra AND x.kind = 'pipeline') AS stages_usd,
           sum(cost_usd) FILTER (WHERE x.extra AND x.kind = 'consensus' AND step < x.voters)
               AS voters_usd,
           sum(cost_usd) FILTER (WHERE x.extra AND x.kind = 'consensus' AND step >= x.voters)
               AS judge_usd
    FROM calls
    CROSS JOIN LATERAL (SELECT
        calls.outcome = 'ok' AND calls.step >= 0 AND calls.id IS DISTINCT FROM a.id AS extra,
        COALESCE(j.route_decision->>'kind', 'single') AS kind,
        COALESCE(jsonb_array_length(j.route_decision->'plan'->'voters'), 0) AS voters) x
    WHERE calls.job_id = j.id) c ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS ratings, sum(score) AS score_sum FROM feedback WHERE feedback.job_id = j.id
) fb ON true;

-- Per category: the jobs a model answered, what they cost, what one call
-- per job on the baseline model would have cost, and the overhead split;
-- apart, what jobs resolved by a person and jobs without a result cost;
-- what the routes bought (fallback and review rates over all the
-- category's jobs, ratings of its results).
CREATE OR REPLACE VIEW savings_by_category AS
SELECT jc.category, b.model AS baseline_model,
       count(*) FILTER (WHERE jc.outcome = 'answered') AS jobs,
       COALESCE(sum(jc.cost_usd) FILTER (WHERE jc.outcome = 'answered'), 0) AS actual_cost_usd,
       one_call_usd(
           COALESCE(sum(jc.first_uncached_input_tokens) FILTER (WHERE jc.outcome = 'answered'), 0)::int8,
           COALESCE(sum(jc.first_cached_input_tokens) FILTER (WHERE jc.outcome = 'answered'), 0)::int8,
           COALESCE(sum(jc.answer_output_tokens) FILTER (WHERE jc.outcome = 'answered'), 0)::int8,
           b.input_per_mtok, b.cached_input_per_mtok, b.output_per_mtok) AS baseline_cost_usd,
       one_call_usd(
           COALESCE(sum(jc.first_uncached_input_tokens) FILTER (WHERE jc.outcome = 'answered'), 0)::int8,
           COALESCE(sum(jc.first_cached_input_tokens) FILTER (WHERE jc.outcome = 'answered'), 0)::int8,
           COALESCE(sum(jc.answer_output_tokens) FILTER (WHERE jc.outcome = 'answered'), 0)::int8,
           b.input_per_mtok, b.cached_input_per_mtok, b.output_per_mtok)
         - COALESCE(sum(jc.cost_usd) FILTER (WHERE jc.outcome = 'answered'), 0) AS savings_usd,
       COALESCE(sum(jc.answer_cost_usd) FILTER (WHERE jc.outcome = 'answered'), 0) AS answer_cost_usd,
       COALESCE(sum(jc.overhead_cost_usd) FILTER (WHERE jc.outcome = 'answered'), 0) AS overhead_cost_usd,
       COALESCE(sum(jc.retries_cost_usd) FILTER (WHERE jc.outcome = 'answered'), 0) AS retries_cost_usd,
       COALESCE(sum(jc.classifier_cost_usd) FILTER (WHERE jc.outcome = 'answered'), 0) AS classifier_cost_usd,
       COALESCE(sum(jc.fallback_cost_usd) FILTER (WHERE jc.outcome = 'answered'), 0) AS fallback_cost_usd,
       COALESCE(sum(jc.stages_cost_usd) FILTER (WHERE jc.outcome = 'answered'), 0) AS stages_cost_usd,
       COALESCE(sum(jc.voters_cost_usd) FILTER (WHERE jc.outcome = 'answered'), 0) AS voters_cost_usd,
       COALESCE(sum(jc.judge_cost_usd) FILTER (WHERE jc.outcome = 'answered'), 0) AS judge_cost_usd,
       count(*) FILTER (WHERE jc.outcome = 'person') AS person_jobs,
       COALESCE(sum(jc.cost_usd) FILTER (WHERE jc.outcome = 'person'), 0) AS person_cost_usd,
       count(*) FILTER (WHERE jc.outcome = 'no_result') AS no_result_jobs,
       COALESCE(sum(jc.cost_usd) FILTER (WHERE jc.outcome = 'no_result'), 0) AS no_result_cost_usd,
       round(count(*) FILTER (WHERE jc.fell_back)::numeric / count(*), 4) AS fallback_rate,
       round(count(*) FILTER (WHERE jc.reviewed)::numeric / count(*), 4) AS review_rate,
       sum(jc.ratings) AS ratings,
       round(sum(jc.score_sum)::numeric / NULLIF(sum(jc.ratings), 0), 3) AS avg_score
FROM job_costs jc
LEFT JOIN model_prices b ON b.is_baseline
GROUP BY jc.category, b.model, b.input_per_mtok, b.cached_input_per_mtok, b.output_per_mtok;

-- Per category and configured model: what the category's answered jobs
-- would have cost served by that model alone (one call per job, as above),
-- next to what they cost.
CREATE OR REPLACE VIEW what_if_by_model AS
WITH t AS (
    SELECT category, count(*) AS jobs, sum(cost_usd) AS actual_cost_usd,
           sum(first_uncached_input_tokens)::int8 AS uncached,
           sum(first_cached_input_tokens)::int8 AS cached,
           sum(answer_output_tokens)::int8 AS output
    FROM job_costs WHERE outcome = 'answered' GROUP BY category
)
SELECT t.category, p.model, p.is_baseline, t.jobs, t.actual_cost_usd,
       one_call_usd(t.uncached, t.cached, t.output,
                    p.input_per_mtok, p.cached_input_per_mtok, p.output_per_mtok) AS cost_usd
FROM t CROSS JOIN model_prices p;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'switchyard_analyst') THEN
        GRANT SELECT ON model_prices, job_costs, savings_by_category, what_if_by_model
            TO switchyard_analyst;
    END IF;
END
$$;
