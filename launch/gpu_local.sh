#!/usr/bin/env bash
# Trains on every GPU of this machine: one process drives all local GPUs
# (the mesh's 'data' axis spans them; no jax.distributed needed).
#   launch/gpu_local.sh CONFIG WORKDIR [--config.x=y ...]
# Environment: PYTHON (default .venv/bin/python; install the CUDA build with
# `.venv/bin/pip install -c constraints.txt -e ".[cuda12]"`),
# CUDA_VISIBLE_DEVICES to pick GPUs, DRY_RUN=1 to print the command instead
# of running it.
# Rerunning the same command resumes from WORKDIR's latest checkpoint.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 2 ]; then
  echo "usage: launch/gpu_local.sh CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
python=${PYTHON:-$root/.venv/bin/python}
# XLA reserves 75% of GPU memory up front by default; the data pipeline and
# evaluation live alongside, so leave some room.
cmd=(env XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
     "$python" -m pan_jax.main "--config=$config" "--workdir=$workdir" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "cd $(printf '%q' "$root") && $(printf '%q ' "${cmd[@]}")"
else
  cd "$root" && exec "${cmd[@]}"
fi
