#!/usr/bin/env bash
# The analysts' queries at scale: fill a scratch database with ROWS `calls`
# rows (90 days, 4 categories, 7 models; ROWS*2/5 jobs, 90% with a result;
# each table in creation order, as a live system writes it),
# through the real schema (rollups rebuilt once after the bulk load, as the
# migration's backfill does), then time `switchyard report`,
# the dashboard's queries, the job rollups and the daily views (EXPLAIN
# ANALYZE execution times; wall time for the report). The job roller's
# backfill runs once after the load and is timed.
#   ROWS=1000000 ./scripts/explain-scale.sh      # database sy_explain_scale
#   ROWS=10000000 ./scripts/explain-scale.sh     # about 4 GB, ~10 minutes here
#   ROWS=100000000 KEEP=1 ./scripts/explain-scale.sh   # 51 GB; leave 60 GB free
#   TAIL='2 hours' SKIP_LOAD=1 KEEP=1 ./scripts/explain-scale.sh   # see TAIL below
# Prints one line per query: `<ms> <query>`; drops the database at the end
# unless KEEP=1 (then SKIP_LOAD=1 reruns the timings on it).
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${DB:-sy_explain_scale}
ROWS=${ROWS:-1000000}
PSQL=(psql -h "${PGHOST:-127.0.0.1}" -U "${PGUSER:-postgres}" -v ON_ERROR_STOP=1 -X -q)
BIN=${BIN:-./target/release/switchyard}
URL="postgres://${PGUSER:-postgres}@${PGHOST:-127.0.0.1}/$DB"
JOBS=$((ROWS * 2 / 5))
if [ "${SKIP_LOAD:-0}" != 1 ]; then
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
DATABASE_URL="$URL" "$BIN" migrate
start=$(date +%s)
"${PSQL[@]}" -d "$DB" <<SQL
SET synchronous_commit = off;
SET maintenance_work_mem = '512MB';
SET work_mem = '256MB';
SET max_parallel_maintenance_workers = 2;
CREATE TEMP TABLE t0 AS SELECT now() AS t;
-- A bulk load is faster into tables without indexes: keep the definitions
-- of the loaded tables' indexes (and of calls' keys, which nothing
-- references), drop them, load, and build them once, sorted, at the end.
CREATE TEMP TABLE kept AS
SELECT 1 AS ord, format('ALTER TABLE calls ADD CONSTRAINT %I %s', conname, pg_get_constraintdef(oid)) AS make,
       format('ALTER TABLE calls DROP CONSTRAINT %I', conname) AS drop
FROM pg_constraint WHERE conrelid = 'calls'::regclass AND contype IN ('p', 'u')
UNION ALL
SELECT 2, replace(pg_get_indexdef(i.indexrelid), ' ON ONLY ', ' ON '), format('DROP INDEX %s', i.indexrelid::regclass)
FROM pg_index i
WHERE i.indrelid IN ('jobs'::regclass, 'calls'::regclass, 'results'::regclass)
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid);
DO \$\$ DECLARE k RECORD; BEGIN
  FOR k IN SELECT drop FROM kept ORDER BY ord DESC LOOP EXECUTE k.drop; END LOOP;
END \$\$;
-- Nothing is rolled yet, so the job rollups' late-change marks are moot
-- during the load; the roller rolls every hour below.
ALTER TABLE jobs DISABLE TRIGGER job_rollups_job_insert;
ALTER TABLE calls DISABLE TRIGGER job_rollups_calls_insert;
ALTER TABLE results DISABLE TRIGGER job_rollups_results_insert;
INSERT INTO jobs (id, category, status, route_decision, created_at, finished_at)
SELECT 'j' || g, (ARRAY['support','sales','lookup','auto'])[1 + g % 4],
       CASE WHEN g % 10 = 0 THEN 'failed' WHEN g % 25 = 1 THEN 'needs_review' ELSE 'succeeded' END,
       jsonb_build_object('kind', (ARRAY['fallback','pipeline','consensus','single'])[1 + g % 4]),
       t - (g % 90) * interval '1 day' - (g % 86400) * interval '1 second',
       t - (g % 90) * interval '1 day' - (g % 86400) * interval '1 second' + interval '2 seconds'
FROM generate_series(1, $JOBS) g, t0
ORDER BY 5;
-- Bulk load without the per-statement rollup trigger; rollups are rebuilt
-- from the loaded rows below (call_rollups_rebuild, the migration's backfill).
ALTER TABLE calls DISABLE TRIGGER call_rollups_insert;
-- The monthly partitions of the 90 days (migration 0030); each call under
-- its job's creation time, as the writer files it.
SELECT calls_ensure_partitions(t - interval '91 days', 3) FROM t0;
-- Day by day, oldest first, each day in creation order (the whole table in
-- one sorted statement needed twice its size in temporary files).
DO \$\$ DECLARE d INT; BEGIN
FOR d IN REVERSE 89..0 LOOP
INSERT INTO calls (job_id, category, provider, model, step, attempt, input_tokens, output_tokens,
                   cached_input_tokens, price_input_per_mtok, price_output_per_mtok,
                   price_cached_input_per_mtok, cost_usd, latency_ms, outcome, created_at,
                   job_created_at)
SELECT 'j' || jn, (ARRAY['support','sales','lookup','auto'])[1 + jn % 4],
       (ARRAY['openai','openai','openai','anthropic','anthropic','gemini','gemini'])[1 + g % 7],
       (ARRAY['gpt-4o-mini','gpt-4o','gpt-4.1','claude-haiku-4-5','claude-sonnet-4-5','gemini-2.5-flash','gemini-2.5-flash-lite'])[1 + g % 7],
       g / $JOBS, 1, 200 + g % 800, 50 + g % 400, g % 100, 1, 5, 0.1,
       (200 + g % 800) * 0.000001 + (50 + g % 400) * 0.000005, 20 + g % 2000,
       CASE WHEN g % 17 = 0 THEN 'retryable_error' WHEN g % 53 = 0 THEN 'terminal_error' ELSE 'ok' END,
       jc + (g / $JOBS) * interval '1 second', jc
FROM (SELECT jn, s * $JOBS + jn - 1 AS g,
             t - (jn % 90) * interval '1 day' - (jn % 86400) * interval '1 second' AS jc
      FROM generate_series(CASE WHEN d = 0 THEN 90 ELSE d END, $JOBS, 90) jn,
           generate_series(0, ($ROWS - 1) / $JOBS) s, t0
      WHERE s * $JOBS + jn - 1 < $ROWS) x
ORDER BY jc;
END LOOP;
END \$\$;
ALTER TABLE calls ENABLE TRIGGER call_rollups_insert;
SELECT call_rollups_rebuild();
INSERT INTO results (job_id, category, output, model, cost_usd, input_tokens, output_tokens, latency_ms, created_at, answer_step)
SELECT id, category, 'answer', 'gpt-4o-mini', 0.001, 500, 200, 500 + length(id) * 37 % 5000, created_at + interval '2 seconds', 0
FROM jobs WHERE status = 'succeeded' ORDER BY created_at;
DO \$\$ DECLARE k RECORD; BEGIN
  FOR k IN SELECT make FROM kept ORDER BY ord LOOP EXECUTE k.make; END LOOP;
END \$\$;
ALTER TABLE jobs ENABLE TRIGGER job_rollups_job_insert;
ALTER TABLE calls ENABLE TRIGGER job_rollups_calls_insert;
ALTER TABLE results ENABLE TRIGGER job_rollups_results_insert;
VACUUM ANALYZE jobs; VACUUM ANALYZE calls; VACUUM ANALYZE results; VACUUM ANALYZE call_rollups;
VACUUM ANALYZE call_jobs;
INSERT INTO model_prices (model, provider, input_per_mtok, output_per_mtok, cached_input_per_mtok, cache_write_per_mtok, is_baseline)
VALUES ('gpt-4o', 'openai', 2.5, 10, 1.25, 2.5, true), ('gpt-4o-mini', 'openai', 0.15, 0.6, 0.075, 0.15, false)
ON CONFLICT (model) DO NOTHING;
SQL
echo "loaded in $(( $(date +%s) - start )) s"
# The job roller's backfill, as the workers run it (one hour per step),
# here in one session until nothing is left to roll.
start=$(date +%s)
"${PSQL[@]}" -d "$DB" -c "DO \$\$ BEGIN LOOP EXIT WHEN job_rollups_step() IS NULL; END LOOP; END \$\$"
"${PSQL[@]}" -d "$DB" -c "VACUUM ANALYZE job_rollups"
echo "job rollups rolled in $(( $(date +%s) - start )) s"
fi
# The loaded jobs end at the load's start, so the roller has rolled them
# all; a live fleet's roller trails now by TAIL (five to six minutes since
# migration 0026, one to two hours before it). Put it there: rolled back
# to the hour, then rolled on to the newest job minus TAIL.
"${PSQL[@]}" -d "$DB" <<SQL
CREATE TEMP TABLE x AS SELECT max(created_at) - interval '${TAIL:-6 minutes}' AS x FROM jobs;
DELETE FROM job_rollups WHERE hour >= rollup_hour((SELECT x FROM x));
UPDATE job_rollup_state SET rolled_until = rollup_hour((SELECT x FROM x))
WHERE rolled_until > rollup_hour((SELECT x FROM x));
DO \$\$ BEGIN LOOP EXIT WHEN job_rollups_step((SELECT x FROM x)) IS NULL; END LOOP; END \$\$;
SELECT 'raw tail: ' || count(*) || ' jobs since ' || (SELECT rolled_until FROM job_rollup_state)
FROM jobs WHERE created_at >= (SELECT rolled_until FROM job_rollup_state);
SQL
"${PSQL[@]}" -d "$DB" -c "SELECT (SELECT count(*) FROM calls) AS calls, (SELECT count(*) FROM call_rollups) AS rollup_rows,
  (SELECT count(*) FROM job_rollups) AS job_rollup_rows,
  pg_size_pretty(pg_database_size(current_database())) AS db_size"
run() {
  local plan ms
  plan=$("${PSQL[@]}" -d "$DB" -c "EXPLAIN (ANALYZE, SUMMARY) $1")
  ms=$(grep -E "Execution Time" <<<"$plan" | grep -oE "[0-9.]+")
  printf '%10.1f ms  %s\n' "$ms" "$1"
}
wall() {
  local s e
  s=$(date +%s%N)
  DATABASE_URL="$URL" "$BIN" "$@" >/dev/null
  e=$(date +%s%N)
  printf '%10.1f ms  switchyard %s (wall, whole command)\n' "$(( (e - s) / 100000 ))e-1" "$*"
}
echo "== report (wall time: process start, connect, migrate check, every query, rendering)"
wall report --since 1d
wall report --since 7d
wall report --since 30d
wall report --since 7d --category sales
echo "== dashboard (src/store/stats.rs, spend.rs)"
run "SELECT model, sum(calls)::int8, sum(cost_usd) FROM call_rollups_live WHERE hour >= (now() AT TIME ZONE 'UTC')::date::timestamp AT TIME ZONE 'UTC' GROUP BY 1 HAVING sum(calls) > 0 ORDER BY 3 DESC"
# Jobs today by status: through the job rollups since 0027's build (the
# report's jobs_by_status from midnight; job_figures is the same split).
run "SELECT status, sum(jobs)::int8 FROM job_figures WHERE hour >= (now() AT TIME ZONE 'UTC')::date::timestamp AT TIME ZONE 'UTC' GROUP BY 1 ORDER BY 1"
run "SELECT (EXTRACT(EPOCH FROM now() - finished_at) / 60)::int4 AS ago, count(*)::int8 FROM jobs WHERE finished_at > now() - interval '10 minutes' GROUP BY 1"
run "SELECT model, sum(c)::int8, sum(e)::int8 FROM (SELECT model, calls AS c, retryable_calls + terminal_calls AS e FROM call_rollups_live WHERE hour >= date_bin('1 hour', now() - interval '1 hour', '2000-01-01Z') + interval '1 hour' UNION ALL SELECT model, count(*), count(*) FILTER (WHERE outcome IN ('retryable_error', 'terminal_error')) FROM calls WHERE created_at >= now() - interval '1 hour' AND created_at < date_bin('1 hour', now() - interval '1 hour', '2000-01-01Z') + interval '1 hour' GROUP BY 1) s GROUP BY 1"
run "SELECT category, sum(cost_usd) FROM call_rollups_live WHERE hour >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' GROUP BY 1"
run "SELECT category, count(*), sum(cost_usd) FROM job_costs WHERE created_at >= now() - interval '1 day' GROUP BY category"
echo "== job rollups (job_figures: rolled hours + the rest raw)"
run "SELECT category, sum(jobs), sum(cost_usd) FROM job_figures WHERE hour >= now() - interval '1 day' GROUP BY category"
run "SELECT category, status, sum(jobs) FROM job_figures GROUP BY 1, 2"
echo "== views"
run "SELECT * FROM cost_daily WHERE day = (now() AT TIME ZONE 'UTC')::date - 1"
run "SELECT day, sum(cost_usd) FROM cost_daily WHERE day >= (now() AT TIME ZONE 'UTC')::date - 7 GROUP BY day"
run "SELECT * FROM cost_daily"
run "SELECT * FROM cost_per_job"
run "SELECT * FROM category_rates"
run "SELECT * FROM latency_by_model"
run "SELECT * FROM latency_by_category"
run "SELECT * FROM model_usage"
run "SELECT * FROM cache_savings"
run "SELECT * FROM batch_savings"
run "SELECT * FROM savings_by_category"
run "SELECT category, sum(cost_usd), sum(first_uncached_input_tokens) FROM job_costs WHERE created_at >= now() - interval '1 day' GROUP BY category"
if [ "${KEEP:-0}" != 1 ]; then
  "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
fi
