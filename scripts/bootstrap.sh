#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment with everything r2v needs.
# Idempotent: re-running only installs what is missing. Used by `make demo` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# System packages: bubblewrap sandboxes model-generated commands (terminal/code envs).
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing bubblewrap (apt)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
  else
    echo "[bootstrap] WARNING: bubblewrap (bwrap) is missing; install it (apt-get install bubblewrap)" \
         "or code/terminal environments will refuse to run." >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

# 1) torch first, pinned: a bare/unpinned torch requirement would pull a multi-GB CUDA build on CPU boxes.
#    On GPU machines the same pin resolves to the CUDA wheel.
$PIP install -q "torch==2.13.0"
# 2) everything else, resolved against the measured lock.
$PIP install -q -r requirements.txt -c constraints.txt
# 3) DeepSpeed without build isolation (it would otherwise download its own torch); ops JIT-built on demand.
if ! "$VENV/bin/python" -c "import deepspeed" >/dev/null 2>&1; then
  DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "deepspeed==0.19.8"
fi
# 4) r2v itself, editable.
$PIP install -q --no-deps --no-build-isolation -e .
touch "$VENV/.installed"
echo "[bootstrap] ready: $VENV"
