#!/usr/bin/env bash
# GPU check, for a lent GPU machine (the `device` tool) or any CUDA host, from the repo root:
#
#   bash bench/gpu_check.sh [rows] [epochs]
#
# 1. Installs the project into .venv-gpu. A machine whose Python already has a CUDA torch
#    keeps it (--system-site-packages; pip leaves a torch inside the pinned range alone);
#    without a package registry it installs only the project itself (--no-deps).
# 2. Trains the same model on the synthetic source (`rows` rows, `epochs` epochs) with the
#    train stage on Ray Train, one worker: on the CPU (gloo), on the GPU in FP32 and on the
#    GPU with bf16 autocast (NCCL), and prints samples/s per run and the ratio to the CPU run.
set -euo pipefail
rows=${1:-200000}
epochs=${2:-3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
site=""
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    site="--system-site-packages"
fi
python3 -m venv $site .venv-gpu
if ! .venv-gpu/bin/pip install -q -e . 2>/tmp/gpu_check_pip.log; then
    echo "pip install -e . failed (no package registry?); installing the project alone"
    .venv-gpu/bin/pip install -q --no-deps --no-build-isolation -e .
fi
.venv-gpu/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
.venv-gpu/bin/python -m bench.train --rows "$rows" --epochs "$epochs" --gpu
