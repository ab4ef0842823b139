#!/usr/bin/env bash
# Fill a scratch database with 10 million `calls` rows (90 days, 4 categories,
# 7 models; 4 million jobs, 3.6 million results) and time the analysts' views
# and the report's windowed queries with EXPLAIN ANALYZE.
#   ./scripts/explain-10m.sh            # database sy_explain on $PGHOST/127.0.0.1
# Takes several minutes and about 5 GB of disk; drops the database at the end
# unless KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${DB:-sy_explain}
ROWS=${ROWS:-10000000}
PSQL=(psql -h "${PGHOST:-127.0.0.1}" -U "${PGUSER:-postgres}" -v ON_ERROR_STOP=1 -X -q)
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
DATABASE_URL="postgres://${PGUSER:-postgres}@${PGHOST:-127.0.0.1}/$DB" ./target/release/switchyard migrate
JOBS=$((ROWS * 2 / 5))
time "${PSQL[@]}" -d "$DB" <<SQL
SET synchronous_commit = off;
SELECT calls_ensure_partitions(now() - interval '91 days', 3);
INSERT INTO jobs (id, category, status, route_decision, created_at)
SELECT 'j' || g, (ARRAY['support','sales','lookup','auto'])[1 + g % 4],
       CASE WHEN g % 10 = 0 THEN 'failed' WHEN g % 25 = 1 THEN 'needs_review' ELSE 'succeeded' END,
       jsonb_build_object('kind', (ARRAY['fallback','pipeline','consensus','single'])[1 + g % 4]),
       now() - (g % 90) * interval '1 day' - (g % 86400) * interval '1 second'
FROM generate_series(1, $JOBS) g;
INSERT INTO calls (job_id, category, provider, model, step, attempt, input_tokens, output_tokens,
                   cached_input_tokens, price_input_per_mtok, price_output_per_mtok,
                   price_cached_input_per_mtok, cost_usd, latency_ms, outcome, created_at,
                   job_created_at)
SELECT 'j' || (g % $JOBS + 1), (ARRAY['support','sales','lookup','auto'])[1 + (g % $JOBS + 1) % 4],
       (ARRAY['openai','openai','openai','anthropic','anthropic','gemini','gemini'])[1 + g % 7],
       (ARRAY['gpt-4o-mini','gpt-4o','gpt-4.1','claude-haiku-4-5','claude-sonnet-4-5','gemini-2.5-flash','gemini-2.5-flash-lite'])[1 + g % 7],
       g / $JOBS, 1, 200 + g % 800, 50 + g % 400, g % 100, 1, 5, 0.1,
       (200 + g % 800) * 0.000001 + (50 + g % 400) * 0.000005, 20 + g % 2000,
       CASE WHEN g % 17 = 0 THEN 'retryable_error' WHEN g % 53 = 0 THEN 'terminal_error' ELSE 'ok' END,
       now() - ((g % $JOBS + 1) % 90) * interval '1 day' - (g % 86400) * interval '1 second',
       now() - ((g % $JOBS + 1) % 90) * interval '1 day' - ((g % $JOBS + 1) % 86400) * interval '1 second'
FROM generate_series(0, $ROWS - 1) g;
INSERT INTO results (job_id, category, output, model, cost_usd, input_tokens, output_tokens, latency_ms, created_at, answer_step)
SELECT id, category, 'answer', 'gpt-4o-mini', 0.001, 500, 200, 500 + length(id) * 37 % 5000, created_at, 0
FROM jobs WHERE status = 'succeeded';
VACUUM ANALYZE jobs; VACUUM ANALYZE calls; VACUUM ANALYZE results;
SQL
"${PSQL[@]}" -d "$DB" -c "SELECT count(*) AS calls FROM calls" -c "SELECT pg_size_pretty(sum(pg_total_relation_size(relid))) AS calls_size FROM pg_partition_tree('calls')"
run() {
  echo "== $1"
  local plan
  plan=$("${PSQL[@]}" -d "$DB" -c "EXPLAIN (ANALYZE, BUFFERS, SUMMARY) $1")
  grep -E "Index|Seq Scan" <<<"$plan" | head -4
  grep -E "Planning Time|Execution Time" <<<"$plan"
}
run "SELECT * FROM cost_daily WHERE day = (now() AT TIME ZONE 'UTC')::date - 1"
run "SELECT day, sum(cost_usd) FROM cost_daily WHERE day >= (now() AT TIME ZONE 'UTC')::date - 7 GROUP BY day"
run "SELECT model, sum(cost_usd) FROM calls WHERE created_at >= now() - interval '1 day' GROUP BY model"
run "SELECT category, sum(cost_usd) FROM calls WHERE category = 'sales' AND created_at >= now() - interval '7 days' GROUP BY category"
run "SELECT * FROM cost_per_job"
run "SELECT * FROM category_rates"
run "SELECT * FROM latency_by_model"
run "SELECT * FROM model_usage"
"${PSQL[@]}" -d "$DB" -c "INSERT INTO model_prices (model, provider, input_per_mtok, output_per_mtok, cached_input_per_mtok, cache_write_per_mtok, is_baseline) VALUES ('gpt-4o', 'openai', 2.5, 10, 1.25, 2.5, true), ('gpt-4o-mini', 'openai', 0.15, 0.6, 0.075, 0.15, false)"
run "SELECT * FROM savings_by_category"
run "SELECT category, sum(cost_usd), sum(first_uncached_input_tokens) FROM job_costs WHERE created_at >= now() - interval '1 day' GROUP BY category"
echo "== switchyard report --since 1d"
( time DATABASE_URL="postgres://${PGUSER:-postgres}@${PGHOST:-127.0.0.1}/$DB" ./target/release/switchyard report --since 1d >/dev/null ) 2>&1 | grep real
echo "== switchyard report --since 7d --category sales"
( time DATABASE_URL="postgres://${PGUSER:-postgres}@${PGHOST:-127.0.0.1}/$DB" ./target/release/switchyard report --since 7d --category sales >/dev/null ) 2>&1 | grep real
[ "${KEEP:-0}" = 1 ] || "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
