#!/usr/bin/env bash
# A pod in a box: the pod workflow rehearsed on this machine before paying for
# a slice. A local GCS server (fake-gcs-server, requirements-gcs.txt) holds
# bucket gs://pod-demo; then, as on every host of a pod:
#   1. the synthetic dataset is prepared into gs://pod-demo/data;
#   2. NUM_PROCESSES processes x DEVICES_PER_PROCESS CPU devices train
#      configs/demo.py with the workdir gs://pod-demo/run (launch/local.sh;
#      each process copies the dataset once into a local cache);
#   3. after STOP_AFTER steps one process gets SIGTERM, as a preempted host
#      does: every process saves the same step to the bucket and exits 0;
#   4. the same command again resumes from the bucket to TOTAL_STEPS;
#   5. NUM_PROCESSES processes evaluate the run from the bucket, the report
#      into gs://pod-demo/run/eval_val;
#   6. one process exports it to gs://pod-demo/export.
#   launch/pod_demo.sh [--config.x=y ...]      (flags go to training)
# Environment: PYTHON (default .venv/bin/python), NUM_PROCESSES (2),
# DEVICES_PER_PROCESS (2), TOTAL_STEPS (60), STOP_AFTER (30; a multiple of
# LOG_EVERY, 10), NUM_TRAIN (400 synthetic training images), WORK_DIR (local scratch: logs, caches,
# the server's log; default a new temporary directory), DRY_RUN=1 to print
# the commands instead. The server keeps the bucket in memory: it is gone
# when the script ends (the last lines list what was in it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-$root/.venv/bin/python}
num=${NUM_PROCESSES:-2}
devices=${DEVICES_PER_PROCESS:-2}
steps=${TOTAL_STEPS:-60}
stop_after=${STOP_AFTER:-30}
log_every=${LOG_EVERY:-10}
num_train=${NUM_TRAIN:-400}
dry=${DRY_RUN:-0}
if ((stop_after < 1 || stop_after >= steps || stop_after % log_every)); then
  echo "launch/pod_demo.sh: STOP_AFTER=$stop_after must be in [1, TOTAL_STEPS)" \
       "and a multiple of LOG_EVERY=$log_every" >&2
  exit 2
fi
if [ "$dry" = 1 ]; then work=${WORK_DIR:-/tmp/pod_demo}
else work=${WORK_DIR:-$(mktemp -d -t pod_demo.XXXXXX)}; mkdir -p "$work"; fi
bucket=gs://pod-demo
start=$SECONDS
stamp() { echo "[pod_demo $((SECONDS - start))s] $*"; }
show() { printf '%q ' "$@"; echo; }
# The environment local.sh gives every process, and the processes it runs.
launch() { env PYTHON="$python" NUM_PROCESSES="$num" \
  DEVICES_PER_PROCESS="$devices" "$@"; }

train=(launch/local.sh --config=configs/demo.py --workdir="$bucket/run"
       --config.data.data_dir="$bucket/data"
       --config.data.cache_dir="$work/cache"
       --config.total_steps="$steps" --config.checkpoint_every_steps=1000
       --config.log_every_steps="$log_every" "$@")
evaluate=(env MODULE=pan_jax.evaluate launch/local.sh
          --checkpoint="$bucket/run" --output="$bucket/run/eval_val"
          --config.data.cache_dir="$work/cache")
export_=(env JAX_PLATFORMS=cpu "$python" -m pan_jax.export
         --checkpoint="$bucket/run" --output="$bucket/export" --platforms=cpu)
prepare=("$python" -m pan_jax.data.prepare --dataset=synthetic
         --source_dir="$work/source" --data_dir="$bucket/data"
         --cache_dir="$work/prepare_cache" --num_train="$num_train"
         --num_val=100)
server=("$python" tests/gcs_server.py pod-demo "$work/gcs.env")

if [ "$dry" = 1 ]; then
  echo "# the GCS server, then its environment (STORAGE_EMULATOR_HOST, ...) for all:"
  show "${server[@]}"
  show "${prepare[@]}"
  echo "# SIGTERM to process 1 after step $stop_after, then the same again:"
  show env LOG_DIR="$work/logs/train" PYTHON="$python" \
    NUM_PROCESSES="$num" DEVICES_PER_PROCESS="$devices" "${train[@]}"
  show env LOG_DIR="$work/logs/resume" PYTHON="$python" \
    NUM_PROCESSES="$num" DEVICES_PER_PROCESS="$devices" "${train[@]}"
  show env LOG_DIR="$work/logs/evaluate" PYTHON="$python" \
    NUM_PROCESSES="$num" DEVICES_PER_PROCESS="$devices" "${evaluate[@]}"
  show "${export_[@]}"
  exit 0
fi

server_pid=''
cleanup() { if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true
            wait "$server_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT
stamp "starting a local GCS server with $bucket (scratch: $work)"
rm -f "$work/gcs.env"  # A previous run's server is gone.
"${server[@]}" >"$work/gcs_server.out" 2>&1 &
server_pid=$!
for _ in $(seq 300); do
  [ -f "$work/gcs.env" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/gcs_server.out" >&2; exit 1; }
  sleep 0.1
done
[ -f "$work/gcs.env" ] || { echo "the GCS server did not start" >&2; exit 1; }
set -a
# shellcheck disable=SC1091
. "$work/gcs.env"
set +a
# As on CPU hosts (pan_jax/runtime.py): huge pages for the big buffers.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}

stamp "preparing the synthetic dataset into $bucket/data"
"${prepare[@]}" | tail -n 4

stamp "training on $num processes x $devices devices, workdir $bucket/run"
logs=$work/logs/train
mkdir -p "$logs"
LOG_DIR=$logs launch "${train[@]}" &
launcher=$!
until grep -q "step $stop_after/$steps" "$logs/process_0.log" 2>/dev/null; do
  if ! kill -0 "$launcher" 2>/dev/null; then
    tail -n 20 "$logs/process_0.log" >&2; exit 1
  fi
  sleep 0.5
done
stamp "step $stop_after reached: SIGTERM to process 1 (a preempted host)"
kill -TERM "$(cat "$logs/process_1.pid")"
status=0
wait "$launcher" || status=$?
grep -h "Stopped by" "$logs"/process_*.log | sed 's/^/  /'
((status == 0)) || { echo "training did not stop cleanly ($status)" >&2; exit 1; }

stamp "the same command again: resuming from $bucket/run"
logs=$work/logs/resume
LOG_DIR=$logs launch "${train[@]}"
grep -h "Resuming\|validation" "$logs/process_0.log" | sed 's/^.*\] //;s/^/  /'

stamp "evaluating $bucket/run on $num processes"
LOG_DIR=$work/logs/evaluate launch "${evaluate[@]}"
grep -h "^mIoU\|^report" "$work/logs/evaluate/process_0.log" | sed 's/^/  /'

stamp "exporting $bucket/run to $bucket/export (one process)"
"${export_[@]}" 2>"$work/export.err" | sed 's/^/  /' ||
  { cat "$work/export.err" >&2; exit 1; }

stamp "what the bucket holds:"
"$python" - "$bucket" <<'EOF'
import sys
from pan_jax import paths
root = sys.argv[1]
for name in ('data/synthetic/1.0.0', 'run', 'run/checkpoints',
             'run/eval_val', 'export'):
  print(f'  {root}/{name}/: {" ".join(paths.listdir(f"{root}/{name}"))}')
EOF
stamp "done (logs in $work/logs)"
