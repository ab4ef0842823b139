#!/usr/bin/env bash
# One command: bring up NATS and PostgreSQL if needed, then run every test.
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
exec cargo test --locked "$@"
