#!/usr/bin/env bash
# One command on a fresh clone: set up .venv, put the offline default model in the store, start the chat app.
# Open http://127.0.0.1:${PORT:-8000} in a browser. The OpenAI-compatible API is served on the same port under /v1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m weights fetch smollm2-135m-instruct
exec .venv/bin/chainlit run chat_app.py --headless --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
