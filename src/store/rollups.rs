//! The hourly call rollups (migrations 0022-0023): a check that they equal
//! the calls they summarize, for tests and the chaos bench's reconcile.

use anyhow::Result;
use sqlx::PgPool;

/// Rows where `call_rollups` (summed over shards) and an aggregate of
/// `calls` disagree, per (hour, category, provider, model, batched), on
/// every column including the latency histogram; then categories whose
/// `jobs` differ from `count(DISTINCT job_id)`. Empty when exact.
const DIFF: &str = r#"
WITH r AS (
    SELECT hour, category, provider, model, batched,
           sum(calls) AS calls, sum(ok_calls) AS ok, sum(retryable_calls) AS re,
           sum(terminal_calls) AS te, sum(unknown_calls) AS un, sum(cached_calls) AS ca,
           sum(retry_calls) AS rt, sum(input_tokens) AS i, sum(output_tokens) AS o,
           sum(cached_input_tokens) AS ci, sum(cache_write_input_tokens) AS cw,
           sum(reasoning_tokens) AS rs, sum(cost_usd) AS cost, sum(saved_usd) AS saved,
           sum(latency_ms_sum) AS ls,
           CASE WHEN sum(ok_calls) > 0 THEN latency_hist_sum(latency_hist) END AS h
    FROM call_rollups GROUP BY 1, 2, 3, 4, 5
    HAVING sum(calls) <> 0 OR sum(cost_usd) <> 0 OR sum(input_tokens) <> 0
        OR sum(output_tokens) <> 0 OR sum(latency_ms_sum) <> 0
), c AS (
    SELECT rollup_hour(created_at) AS hour, category, provider, model,
           batch_id IS NOT NULL AS batched, count(*)::numeric AS calls,
           count(*) FILTER (WHERE outcome = 'ok')::numeric AS ok,
           count(*) FILTER (WHERE outcome = 'retryable_error')::numeric AS re,
           count(*) FILTER (WHERE outcome = 'terminal_error')::numeric AS te,
           count(*) FILTER (WHERE outcome = 'unknown')::numeric AS un,
           count(*) FILTER (WHERE outcome = 'cached')::numeric AS ca,
           count(*) FILTER (WHERE attempt > 1)::numeric AS rt,
           sum(input_tokens) AS i, sum(output_tokens) AS o, sum(cached_input_tokens) AS ci,
           sum(cache_write_input_tokens) AS cw, sum(reasoning_tokens) AS rs,
           sum(cost_usd) AS cost, COALESCE(sum(saved_usd), 0) AS saved,
           COALESCE(sum(latency_ms) FILTER (WHERE outcome = 'ok'), 0) AS ls,
           latency_hist(CASE WHEN outcome = 'ok' THEN latency_bucket(latency_ms) END, 1) AS h
    FROM calls GROUP BY 1, 2, 3, 4, 5
)
SELECT format('rollup %s', r.*) FROM (SELECT * FROM r EXCEPT SELECT * FROM c) r
UNION ALL
SELECT format('calls %s', c.*) FROM (SELECT * FROM c EXCEPT SELECT * FROM r) c
UNION ALL
SELECT format('jobs %s', x.*) FROM (
    (SELECT category, sum(jobs) FROM call_rollups GROUP BY 1 HAVING sum(jobs) <> 0
     EXCEPT SELECT category, count(DISTINCT job_id) FROM calls GROUP BY 1)
    UNION ALL
    (SELECT category, count(DISTINCT job_id) FROM calls GROUP BY 1
     EXCEPT SELECT category, sum(jobs) FROM call_rollups GROUP BY 1 HAVING sum(jobs) <> 0)) x
"#;

/// Where the rollups differ from `calls` (one line per differing rollup
/// key, from each side); empty when they are exact. Reads every call: a
/// check, not a report.
pub async fn mismatches(pool: &PgPool) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(DIFF).fetch_all(pool).await?)
}
