-- What analysts read: ratings of results (feedback) and views over jobs,
-- calls, results and steps. Days are UTC days. Rates are fractions 0-1.

CREATE TABLE IF NOT EXISTS feedback (
    id          BIGSERIAL PRIMARY KEY,
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    score       SMALLINT NOT NULL CHECK (score BETWEEN 1 AND 5),
    comment     TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS feedback_job_idx ON feedback (job_id);

-- Per-day aggregates read a day's calls by this index (an index-only scan
-- over the day's range with the grouping columns at hand).
CREATE INDEX IF NOT EXISTS calls_day_idx
    ON calls (((created_at AT TIME ZONE 'UTC')::date), category, provider, model);
CREATE INDEX IF NOT EXISTS calls_category_created_idx ON calls (category, created_at);
CREATE INDEX IF NOT EXISTS results_category_created_idx ON results (category, created_at);

-- Cost, tokens and calls per UTC day, category, provider and model.
CREATE OR REPLACE VIEW cost_daily AS
SELECT (created_at AT TIME ZONE 'UTC')::date AS day,
       category, provider, model,
       count(*) AS calls,
       count(*) FILTER (WHERE outcome = 'ok') AS ok_calls,
       count(*) FILTER (WHERE outcome IN ('retryable_error', 'terminal_error')) AS error_calls,
       count(*) FILTER (WHERE outcome = 'unknown') AS unknown_calls,
       sum(input_tokens) AS input_tokens,
       sum(cached_input_tokens) AS cached_input_tokens,
       sum(output_tokens) AS output_tokens,
       sum(cost_usd) AS cost_usd
FROM calls
GROUP BY 1, 2, 3, 4;

-- Which models produced each category's results, and their share.
CREATE OR REPLACE VIEW model_usage AS
SELECT category, model,
       count(*) AS results,
       round(count(*)::numeric / sum(count(*)) OVER (PARTITION BY category), 4) AS share
FROM results
GROUP BY category, model;

-- Per category: how jobs ended, and how often they fell back, retried,
-- failed a call or went to a person.
CREATE OR REPLACE VIEW category_rates AS
WITH j AS (
    SELECT category,
           count(*) AS jobs,
           count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'needs_review') AS needs_review,
           count(*) FILTER (WHERE status = 'dead') AS dead,
           count(*) FILTER (WHERE route_decision->>'kind' = 'fallback'
                              AND EXISTS (SELECT 1 FROM steps s WHERE s.job_id = jobs.id AND s.step > 0))
               AS fell_back,
           count(*) FILTER (WHERE status = 'needs_review' OR route_decision ? 'review') AS reviewed
    FROM jobs GROUP BY category
), c AS (
    SELECT category,
           count(*) AS calls,
           count(*) FILTER (WHERE attempt > 1) AS retries,
           count(*) FILTER (WHERE outcome <> 'ok') AS failed_calls
    FROM calls GROUP BY category
)
SELECT j.category, j.jobs, j.succeeded, j.failed, j.needs_review, j.dead,
       COALESCE(c.calls, 0) AS calls,
       round(j.fell_back::numeric / j.jobs, 4) AS fallback_rate,
       round(COALESCE(c.retries, 0)::numeric / NULLIF(c.calls, 0), 4) AS retry_rate,
       round(COALESCE(c.failed_calls, 0)::numeric / NULLIF(c.calls, 0), 4) AS error_rate,
       round(j.reviewed::numeric / j.jobs, 4) AS review_rate
FROM j LEFT JOIN c ON c.category = j.category;

-- Provider latency (answered calls) per model.
CREATE OR REPLACE VIEW latency_by_model AS
SELECT provider, model,
       count(*) AS calls,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99_ms
FROM calls WHERE outcome = 'ok'
GROUP BY provider, model;

-- Per category: provider latency of answered calls, and end to end
-- (enqueue to result) of succeeded jobs.
CREATE OR REPLACE VIEW latency_by_category AS
WITH c AS (
    SELECT category,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS call_p50_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS call_p95_ms,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS call_p99_ms
    FROM calls WHERE outcome = 'ok' GROUP BY category
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

-- What a job costs, per category: every call of the job (retries, failed
-- attempts, fallbacks, pipeline stages, voters) over the jobs that made any.
CREATE OR REPLACE VIEW cost_per_job AS
SELECT category,
       count(DISTINCT job_id) AS jobs,
       sum(cost_usd) AS cost_usd,
       round(sum(cost_usd) / count(DISTINCT job_id), 8) AS cost_per_job_usd
FROM calls
GROUP BY category;

-- Ratings (switchyard feedback) by the model that produced the result.
CREATE OR REPLACE VIEW satisfaction_by_model AS
SELECT r.model,
       count(*) AS ratings,
       round(avg(f.score), 3) AS avg_score,
       count(*) FILTER (WHERE f.score >= 4) AS good,
       count(*) FILTER (WHERE f.score <= 2) AS bad
FROM feedback f JOIN results r ON r.job_id = f.job_id
GROUP BY r.model;

-- Ratings by category, A/B variant and route kind.
CREATE OR REPLACE VIEW satisfaction_by_route AS
SELECT j.category, COALESCE(j.variant, '-') AS variant,
       COALESCE(j.route_decision->>'kind', 'single') AS route,
       count(*) AS ratings,
       round(avg(f.score), 3) AS avg_score
FROM feedback f JOIN jobs j ON j.id = f.job_id
GROUP BY 1, 2, 3;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'switchyard_analyst') THEN
        GRANT SELECT ON feedback, cost_daily, model_usage, category_rates, latency_by_model,
            latency_by_category, cost_per_job, satisfaction_by_model, satisfaction_by_route
            TO switchyard_analyst;
    END IF;
END
$$;
