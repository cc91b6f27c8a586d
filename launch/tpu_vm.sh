#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM slice (one process per host).
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_vm.sh CONFIG WORKDIR [--config.x=y ...]
# WORKDIR should be a gs:// path every host can reach; rerunning the same
# command resumes from its latest checkpoint. Environment:
#   TPU_NAME, ZONE (required), PROJECT (optional, gcloud's default otherwise),
#   REMOTE_DIR   the repository's path on the workers (default ~/pan_jax),
#   REMOTE_PYTHON  python on the workers (default $REMOTE_DIR/.venv/bin/python),
#   DRY_RUN=1    print the commands instead of running them.
#   launch/tpu_vm.sh --setup   copies this repository's tracked files (as they
#                are in the working tree) to REMOTE_DIR on every worker and
#                installs .venv + jax[tpu] there; rerun it after changing code.
# Every worker runs the same command with PAN_JAX_DISTRIBUTED=1, so
# pan_jax.main calls jax.distributed.initialize() (auto-configured on TPU).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
root=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=${REMOTE_DIR:-'~/pan_jax'}
remote_python=${REMOTE_PYTHON:-"$remote_dir/.venv/bin/python"}
gcloud=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all)
archive=pan_jax_code.tar.gz
scp=(gcloud compute tpus tpu-vm scp "${TMPDIR:-/tmp}/$archive"
     "$TPU_NAME:$archive" --zone="$ZONE" --worker=all)
if [ -n "${PROJECT:-}" ]; then
  gcloud+=(--project="$PROJECT"); scp+=(--project="$PROJECT")
fi

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ "${1:-}" = "--setup" ]; then
  # The code: the tracked files of this checkout, packed here, unpacked on
  # every worker. Then the project's venv and the TPU build of jax (the tpu
  # extra, at the tested versions) there.
  pack=(tar -czf "${TMPDIR:-/tmp}/$archive" -C "$root" --null -T -)
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf 'git -C %q ls-files -z | ' "$root"; run "${pack[@]}"
  else
    git -C "$root" ls-files -z | "${pack[@]}"
  fi
  run "${scp[@]}"
  run "${gcloud[@]}" --command "mkdir -p $remote_dir && \
tar -xzf ~/$archive -C $remote_dir && cd $remote_dir && launch/setup_env.sh && \
.venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"
  exit 0
fi
if [ $# -lt 2 ]; then
  echo "usage: launch/tpu_vm.sh CONFIG WORKDIR [--config.x=y ...] | --setup" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
args=$(printf ' %q' "--config=$config" "--workdir=$workdir" "$@")
run "${gcloud[@]}" --command \
  "cd $remote_dir && PAN_JAX_DISTRIBUTED=1 $remote_python -m pan_jax.main$args"
