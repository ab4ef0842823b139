#!/usr/bin/env bash
# One command: bring up NATS and PostgreSQL if needed, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
exec cargo test --locked "$@"
