#!/bin/bash
# The GPU path in ~5 minutes on one GPU (see benchmarks/gpu_check.py). Assumes a CUDA build of torch is
# installed; installs maskpot and its dependencies with `DS_BUILD_OPS=0 pip install -e .` (torch is already satisfied;
# no DeepSpeed ops compiled) unless
# MASKPOT_SKIP_INSTALL=1. Usage: benchmarks/gpu_check.sh [--out DIR] [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)' || {
    echo "gpu_check: no CUDA device visible to torch ($("$PYTHON" -c 'import torch; print(torch.__version__)' 2>&1)); run it on a GPU machine" >&2
    exit 2
}
if [ "${MASKPOT_SKIP_INSTALL:-0}" != 1 ]; then
    DS_BUILD_OPS=0 "$PYTHON" -m pip install -q -e .
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
