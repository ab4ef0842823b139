#!/usr/bin/env bash
# Fill a scratch database with ROWS jobs (default 10 million: 90 days, 4
# categories, 5 statuses, metadata on every job) and time `GET /v1/jobs` as
# the API runs it: EXPLAIN ANALYZE of its query for each kind of filter
# (planned for its values, as the API's unnamed statement is), then real
# requests to `switchyard serve` with a read token (first page, 100 pages
# deep by cursor, filtered pages).
#   ./scripts/explain-jobs-api.sh          # database sy_explain_jobs on $PGHOST/127.0.0.1
#   ROWS=1000000 ./scripts/explain-jobs-api.sh
# Takes several minutes and about 4 GB of disk at 10 million; drops the
# database at the end unless KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${DB:-sy_explain_jobs}
ROWS=${ROWS:-10000000}
BIN=${BIN:-./target/release/switchyard}
[ -x "$BIN" ] || BIN=./target/debug/switchyard
PSQL=(psql -h "${PGHOST:-127.0.0.1}" -U "${PGUSER:-postgres}" -v ON_ERROR_STOP=1 -X -q)
export DATABASE_URL="postgres://${PGUSER:-postgres}@${PGHOST:-127.0.0.1}/$DB"
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
"$BIN" migrate >/dev/null
echo "== filling $ROWS jobs"
time "${PSQL[@]}" -d "$DB" <<SQL
SET synchronous_commit = off;
INSERT INTO jobs (id, category, status, route_decision, envelope, created_at)
SELECT 'j' || g, (ARRAY['support','sales','lookup','overnight'])[1 + (g / 3) % 4],
       CASE WHEN g % 10 = 0 THEN 'failed' WHEN g % 25 = 1 THEN 'needs_review'
            WHEN g % 1000 = 7 THEN 'cancelled' ELSE 'succeeded' END,
       '{"kind": "single"}'::jsonb,
       jsonb_build_object('version', 1, 'id', 'j' || g, 'prompt', 'Question ' || g,
         'metadata', CASE WHEN g % 1000000 = 5 THEN jsonb_build_object('customer', 'c' || (g % 1000), 'trace', 'rare')
                          ELSE jsonb_build_object('customer', 'c' || (g % 1000), 'batch', 'b' || (g % 10)) END),
       now() - (g::float8 / $ROWS) * interval '90 days'
FROM generate_series(1, $ROWS) g;
VACUUM ANALYZE jobs;
SQL
"${PSQL[@]}" -d "$DB" -c "SELECT count(*) AS jobs, pg_size_pretty(pg_total_relation_size('jobs')) AS with_indexes FROM jobs"

VIEW="SELECT j.id, j.category, j.status, j.created_at::text AS created_at,
        j.finished_at::text AS finished_at, j.error, j.review_reason,
        j.envelope->'metadata' AS metadata, j.route_decision,
        r.output, r.output_json, r.model,
        COALESCE(r.cost_usd, (SELECT sum(cost_usd) FROM calls c WHERE c.job_id = j.id)) AS cost_usd,
        r.latency_ms::int8 AS latency_ms
     FROM jobs j LEFT JOIN results r ON r.job_id = j.id"
ORDER="ORDER BY j.created_at DESC, j.id DESC LIMIT 51"
run() {
  local plan
  plan=$("${PSQL[@]}" -d "$DB" -c "EXPLAIN (ANALYZE, BUFFERS) $VIEW WHERE $2 $ORDER")
  printf '%-44s %s  [%s]\n' "$1" "$(grep -oE 'Execution Time: [0-9.]+ ms' <<<"$plan")" \
    "$(grep -oE '(Index Scan|Index Only Scan|Bitmap Index Scan|Seq Scan)[^(]* on [a-z_]+' <<<"$plan" | head -2 | paste -sd ';')"
}
MID=$("${PSQL[@]}" -d "$DB" -At -c "SELECT created_at::text || '|' || id FROM jobs WHERE id = 'j$((ROWS / 2))'")
echo "== EXPLAIN ANALYZE of GET /v1/jobs's query (limit 50)"
run "first page" "true"
run "a page half-way down (cursor)" "(j.created_at, j.id) < ('${MID%%|*}'::timestamptz, '${MID##*|}')"
run "category=sales" "j.category = 'sales'"
run "status=needs_review (4%)" "j.status = 'needs_review'"
run "status=cancelled (0.1%)" "j.status = 'cancelled'"
run "category=sales&status=failed" "j.category = 'sales' AND j.status = 'failed'"
run "metadata.batch=b3 (10%)" "j.envelope->'metadata' @> '{\"batch\":\"b3\"}'"
run "metadata.customer=c7 (0.1%)" "j.envelope->'metadata' @> '{\"customer\":\"c7\"}'"
run "metadata.trace=rare ($((ROWS / 1000000)) jobs)" "j.envelope->'metadata' @> '{\"trace\":\"rare\"}'"
run "since/until: one hour, 30 days ago" "j.created_at >= now() - interval '30 days' AND j.created_at < now() - interval '30 days' + interval '1 hour'"

echo "== GET /v1/jobs through switchyard serve"
TOKEN=$("$BIN" token create --name explain --scope read | tail -1)
PORT=${PORT:-19187}
"$BIN" serve --listen "127.0.0.1:$PORT" >/dev/null 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.2; done
get() { curl -sf -o /tmp/explain-jobs-page.json -w '%{time_total}' -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/v1/jobs?$1"; }
for q in "limit=50" "limit=50&category=sales&status=failed" "limit=50&metadata.customer=c7" "limit=50&metadata.trace=rare" "limit=50&metadata.batch=b3"; do
  printf '%-44s %s s\n' "$q" "$(get "$q")"
done
start=$(date +%s.%N); cursor=""
for _ in $(seq 100); do
  get "limit=50${cursor:+&cursor=$cursor}" >/dev/null
  cursor=$(grep -o '"next_cursor":"[^"]*"' /tmp/explain-jobs-page.json | cut -d'"' -f4)
done
printf '%-44s %s s\n' "100 pages of 50 by cursor, total" "$(echo "$(date +%s.%N) - $start" | bc)"
kill $SERVE 2>/dev/null || true
[ "${KEEP:-0}" = 1 ] || "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
