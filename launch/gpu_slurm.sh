#!/usr/bin/env bash
# Submits a multi-node GPU training job to SLURM: one task (process) per node,
# each driving all GPUs of its node; jax.distributed.initialize() reads the
# SLURM environment (PAN_JAX_DISTRIBUTED=1).
#   NODES=4 GPUS_PER_NODE=8 launch/gpu_slurm.sh CONFIG WORKDIR [--config.x=y ...]
# Environment: NODES (default 2), GPUS_PER_NODE (default 8), PARTITION,
# ACCOUNT, TIME (default 24:00:00), JOB_NAME (default pan_jax), PYTHON (default
# .venv/bin/python on the shared filesystem), DRY_RUN=1 to print the sbatch
# command instead of submitting it. WORKDIR must be on a filesystem every node
# sees. Resubmitting the same command resumes from the latest checkpoint;
# SLURM's SIGTERM before the time limit (--signal) triggers a final checkpoint.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 2 ]; then
  echo "usage: launch/gpu_slurm.sh CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
nodes=${NODES:-2}
gpus=${GPUS_PER_NODE:-8}
python=${PYTHON:-$root/.venv/bin/python}
train=$(printf '%q ' "$python" -m pan_jax.main "--config=$config" \
        "--workdir=$workdir" "$@")
sbatch=(sbatch --job-name="${JOB_NAME:-pan_jax}" --nodes="$nodes"
        --ntasks-per-node=1 --gpus-per-node="$gpus" --time="${TIME:-24:00:00}"
        --signal=TERM@120 --output="slurm-%j.out" --chdir="$root")
if [ -n "${PARTITION:-}" ]; then sbatch+=(--partition="$PARTITION"); fi
if [ -n "${ACCOUNT:-}" ]; then sbatch+=(--account="$ACCOUNT"); fi
# srun forwards SIGTERM to every task; each one checkpoints at the same step.
sbatch+=(--wrap "srun --kill-on-bad-exit=1 env PAN_JAX_DISTRIBUTED=1 $train")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${sbatch[@]}"; echo
else
  exec "${sbatch[@]}"
fi
