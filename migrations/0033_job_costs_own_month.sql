-- `job_costs` reads a job's calls in its own month only. Since migration
-- 0030 `calls` is partitioned by its job's creation time, and every call
-- of a job carries that time (`job_created_at`, set by the writer from
-- jobs.created_at) or 1970-01-01 (the default partition: a call whose job
-- row was missing when it was written). The view's three per-job lookups
-- said only `calls.job_id = j.id`, so each probed the job-id index of every
-- partition: one probe per month kept, three times per job, in every
-- report's raw edge, the job roller's every roll and the dashboard. Naming
-- the two keys a job's calls can have lets Postgres prune the rest while
-- it runs (a parameterised nested loop's run-time pruning). Switchyard's
-- own per-job reads of `calls` (the API's job, the review's totals, the
-- attempt numbers) say the same (`calls_of_job_1!` in src/store/mod.rs).
--
-- A call inserted by hand without `job_created_at` now gets 1970-01-01
-- (the default partition), not now(): the view still finds it, where a
-- now() that is not the job's creation time would have hidden it.

ALTER TABLE calls ALTER COLUMN job_created_at SET DEFAULT TIMESTAMPTZ '1970-01-01 00:00:00+00';

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
    WHERE calls.job_id = j.id
      AND calls.job_created_at IN (j.created_at, TIMESTAMPTZ '1970-01-01 00:00:00+00')
      AND calls.step = r.answer_step AND calls.outcome IN ('ok', 'cached')
    ORDER BY attempt DESC LIMIT 1) a ON true
LEFT JOIN LATERAL (
    SELECT input_tokens, cached_input_tokens FROM calls
    WHERE calls.job_id = j.id
      AND calls.job_created_at IN (j.created_at, TIMESTAMPTZ '1970-01-01 00:00:00+00')
      AND calls.step >= 0 AND calls.outcome IN ('ok', 'cached')
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
    WHERE calls.job_id = j.id
      AND calls.job_created_at IN (j.created_at, TIMESTAMPTZ '1970-01-01 00:00:00+00')) c ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS ratings, sum(score) AS score_sum FROM feedback WHERE feedback.job_id = j.id
) fb ON true;
