#!/usr/bin/env bash
# Create a separate venv holding llama-cpp-python, the llama.cpp peer that `python -m engine bench` compares against.
# It is never installed into .venv or requirements.txt: engine/bench_llama.py runs it in a subprocess under this venv.
# Idempotent: does nothing when the venv already imports the pinned llama_cpp. Builds from source (about 5-10 min on
# 2 cores). The venv's python path is printed on the last line of stdout (progress goes to stderr).
#   SCRATCHCHAT_LLAMA_VENV  where to create it (default ~/.cache/scratchchat/llama-venv)
#   PYTHON                  interpreter used to create it (default python3)
set -euo pipefail
LLAMA_CPP_PYTHON_VERSION=0.3.36
DIR=${SCRATCHCHAT_LLAMA_VENV:-$HOME/.cache/scratchchat/llama-venv}
PYTHON=${PYTHON:-python3}
check="import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON_VERSION')"
if [ -x "$DIR/bin/python" ] && "$DIR/bin/python" -c "$check" 2>/dev/null; then
  echo "[bench-llama-env] llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION already in $DIR" >&2
else
  if [ ! -x "$DIR/bin/python" ]; then
    echo "[bench-llama-env] creating $DIR with $($PYTHON --version)" >&2
    mkdir -p "$(dirname "$DIR")"
    "$PYTHON" -m venv "$DIR"
  fi
  "$DIR/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  echo "[bench-llama-env] building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION from source (5-10 minutes)" >&2
  start=$(date +%s)
  # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, so never reuse a wheel built with other flags.
  CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$DIR/bin/python" -m pip install --disable-pip-version-check --no-cache-dir \
    --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
  "$DIR/bin/python" -c "$check"
  echo "[bench-llama-env] built in $(( $(date +%s) - start )) s" >&2
fi
echo "$DIR/bin/python"
