#!/usr/bin/env bash
# One command: bring up NATS and PostgreSQL if needed, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
# The dashboard test drives headless Chromium (Debian's package); install it
# where we can, else that test says SKIPPED (and fails under CI).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[test] installing chromium for the dashboard test" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
    || echo "[test] could not install chromium" >&2
fi
exec cargo test --locked "$@"
