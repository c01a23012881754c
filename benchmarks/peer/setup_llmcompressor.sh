#!/usr/bin/env bash
# Builds the peer's own virtual environment, .venv-llmcompressor at the repository root (gitignored).
# llm-compressor pins its own torch (<= 2.14.0) and transformers (<= 5.17), which differ from ecoflap-pl's, so it
# never shares an environment with the project. torch 2.13.0 is the CPU build; the peer runs on the same CPU.
# Usage: bash benchmarks/peer/setup_llmcompressor.sh [PYTHON]   (default python3.11, else python3)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/.venv-llmcompressor"
python="${1:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --upgrade pip
# torch first, pinned, so that llm-compressor's range does not pull a CUDA build of several GB.
"$venv/bin/pip" install --quiet "torch==2.13.0"
"$venv/bin/pip" install --quiet "llmcompressor==0.14.0.1" "torch==2.13.0"
"$venv/bin/python" -c "import llmcompressor, torch, transformers; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
