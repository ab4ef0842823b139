#!/usr/bin/env bash
# One command: bring up NATS and PostgreSQL if needed, build, and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
cargo build --release --locked
exec ./target/release/switchyard demo "$@"
