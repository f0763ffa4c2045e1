#!/usr/bin/env bash
# One command on a fresh clone: set up .venv (and Debian's chromium for the browser tests), then run the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k tokenizer
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
if [ ! -x /usr/bin/chromium ]; then
  echo "[test] installing Debian's chromium for the browser tests (never a downloaded browser build)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
exec .venv/bin/python -m pytest "$@"
