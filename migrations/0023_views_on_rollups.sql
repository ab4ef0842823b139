-- The analysts' views that aggregate calls read call_rollups (migration
-- 0022) instead: same names, columns and types; sums, counts and the number
-- of jobs are exact, latency percentiles are read from the rollups'
-- histograms (the representative value of the bucket holding the
-- percentile: within about 9% of the exact one, not interpolated).
-- latency_by_model_exact keeps the exact (whole-table scan) percentiles.

CREATE INDEX IF NOT EXISTS call_rollups_day_idx
    ON call_rollups (((hour AT TIME ZONE 'UTC')::date), category, provider, model);

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
FROM call_rollups
GROUP BY 1, 2, 3, 4
HAVING sum(calls) > 0;

CREATE OR REPLACE VIEW latency_by_model_exact AS
SELECT provider, model,
       count(*) AS calls,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99_ms
FROM calls WHERE outcome = 'ok'
GROUP BY provider, model;

CREATE OR REPLACE VIEW latency_by_model AS
SELECT provider, model, calls,
       latency_hist_quantile(h, 0.5) AS p50_ms,
       latency_hist_quantile(h, 0.95) AS p95_ms,
       latency_hist_quantile(h, 0.99) AS p99_ms
FROM (SELECT provider, model, sum(ok_calls)::int8 AS calls, latency_hist_sum(latency_hist) AS h
      FROM call_rollups GROUP BY provider, model HAVING sum(ok_calls) > 0) t;

CREATE OR REPLACE VIEW latency_by_category AS
WITH c AS (
    SELECT category,
           latency_hist_quantile(h, 0.5) AS call_p50_ms,
           latency_hist_quantile(h, 0.95) AS call_p95_ms,
           latency_hist_quantile(h, 0.99) AS call_p99_ms
    FROM (SELECT category, latency_hist_sum(latency_hist) AS h
          FROM call_rollups GROUP BY category HAVING sum(ok_calls) > 0) t
), r AS (
    SELECT category, count(*) AS results,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS e2e_p50_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS e2e_p95_ms,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS e2e_p99_ms
    FROM results GROUP BY category
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
FROM call_rollups
GROUP BY category
HAVING sum(calls) > 0;

CREATE OR REPLACE VIEW category_rates AS
WITH j AS (
    SELECT category,
           count(*) AS jobs,
           count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'needs_review') AS needs_review,
           count(*) FILTER (WHERE status = 'dead') AS dead,
           count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
           count(*) FILTER (WHERE route_decision->>'kind' = 'fallback'
                              AND EXISTS (SELECT 1 FROM steps s WHERE s.job_id = jobs.id AND s.step > 0))
               AS fell_back,
           count(*) FILTER (WHERE status = 'needs_review' OR route_decision ? 'review') AS reviewed
    FROM jobs GROUP BY category
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

CREATE OR REPLACE VIEW cache_savings AS
SELECT category, provider, model,
       sum(calls)::int8 AS calls,
       sum(cached_calls)::int8 AS cached_calls,
       round(sum(cached_calls)::numeric / sum(calls), 4) AS cached_share,
       sum(saved_usd) AS saved_usd
FROM call_rollups
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
FROM call_rollups
GROUP BY category, provider, model
HAVING sum(calls) > 0;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'switchyard_analyst') THEN
        GRANT SELECT ON call_rollups, latency_by_model_exact TO switchyard_analyst;
    END IF;
END
$$;
