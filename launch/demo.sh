#!/usr/bin/env bash
# The demo, from a fresh clone: install, prepare the synthetic dataset (if
# missing), train a small PAN on it (configs/demo.py), evaluate on its val
# split (per-class IoU table, report, confusion matrix and overlay PNGs).
#   launch/demo.sh [WORKDIR] [--config.x=y ...]
# WORKDIR defaults to runs/demo; rerunning resumes it (a finished run is only
# re-evaluated). Environment: DATA_DIR (default data), PAN_JAX_VENV (see
# launch/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
stamp() { echo "[demo $((SECONDS - start))s] $*"; }

stamp "installing (launch/setup_env.sh)"
python=$(launch/setup_env.sh | tail -n 1)
data=${DATA_DIR:-data}
workdir=runs/demo
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then workdir=$1; shift; fi
# Faster CPU training: glibc huge pages (read at process start) and the XLA
# flags that every pan_jax command sets on CPU (pan_jax/runtime.py).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}

if [ ! -d "$data/synthetic" ]; then
  stamp "preparing the synthetic dataset in $data"
  "$python" -m pan_jax.data.prepare --dataset=synthetic \
    --source_dir="$data/synthetic_source" --data_dir="$data"
fi
stamp "training configs/demo.py in $workdir"
"$python" -m pan_jax.main --config=configs/demo.py --workdir="$workdir" \
  --config.data.data_dir="$data" "$@"
stamp "evaluating $workdir on the synthetic val split"
"$python" -m pan_jax.evaluate --checkpoint="$workdir" --data_dir="$data" \
  --output="$workdir/eval_val"
stamp "done: report, confusion matrix and overlays in $workdir/eval_val"
