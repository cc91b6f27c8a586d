#!/usr/bin/env bash
# The accelerator suite on one NVIDIA GPU, within 8 minutes: pan_jax's
# bf16 / fp32 train step (images/s, MFU, peak HBM), inference at b1 / b8, and
# smp.PAN with PyTorch AMP + channels_last (+ torch.compile), same shapes;
# one table on stdout and one JSON record appended to $OUT.
#   launch/bench_gpu.sh [--batch=8] [--size=512] [--config=...] [--nosmp]
# Environment:
#   PYTHON  interpreter with jax[cuda] (and torch + smp for the smp rows;
#           default .venv/bin/python)
#   OUT     JSON lines file (default bench_gpu.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m pan_jax.bench gpu --config=configs/smp_pan.py:resnet101 \
  --size=512 --batch=8 --infer_batches=1,8 --budget_s=480 \
  --json="${OUT:-bench_gpu.jsonl}" "$@"
