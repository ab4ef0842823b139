-- Job control: a job can be cancelled (a new terminal status). A cancelled
-- queued job never calls a provider; a running one stops at its next step
-- boundary (calls under way are recorded, as always).
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'needs_review', 'dead', 'cancelled'));

-- category_rates gains the cancelled jobs (a last column).
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
       round(j.reviewed::numeric / j.jobs, 4) AS review_rate,
       j.cancelled
FROM j LEFT JOIN c ON c.category = j.category;
