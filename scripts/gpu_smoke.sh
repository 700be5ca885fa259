#!/usr/bin/env bash
# GPU smoke test for ONE GPU (e.g. an H200), no network needed: builds a ~0.5B-shaped random Qwen2 locally,
# runs a few BC and DPO steps through r2v's own stages (Ray Train + DeepSpeed ZeRO-3, bf16), HF generation
# and rank scoring, vLLM generation if vLLM happens to be installed (never required), and one request to the
# Serve SLM deployment; prints tokens/s and peak GPU memory. Whole run capped at 8 minutes; any failure
# exits non-zero with a FAIL line.
#
#   scripts/gpu_smoke.sh [WORKDIR] [--preset 0.5b] [--steps 4]
#   scripts/gpu_smoke.sh /tmp/x --cpu-check     # CPU only: the data path up to the first GPU step
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
WORK="${1:-$(mktemp -d "${TMPDIR:-/tmp}/r2v-gpu-smoke-XXXXXX")}"
shift || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
trap 'rc=$?; [ $rc -eq 0 ] || echo "[gpu-smoke] FAIL (exit $rc; 124 = over the 8-minute cap); work dir: $WORK" >&2' EXIT

if [[ " $* " != *" --cpu-check "* ]]; then
  command -v nvidia-smi >/dev/null || { echo "[gpu-smoke] FAIL: no nvidia-smi on this machine" >&2; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
start=$(date +%s)
timeout 480 "$PY" scripts/gpu_smoke.py "$WORK" "$@"
echo "[gpu-smoke] total $(( $(date +%s) - start )) s; work dir: $WORK"
