#!/usr/bin/env bash
# Trains as a multi-host job on this machine: NUM_PROCESSES processes of
# pan_jax.main, each with its own CPU devices, joined by jax.distributed over
# a coordinator on 127.0.0.1 -- the way every host of a pod runs it.
#   launch/local.sh --config=configs/smoke.py --workdir=RUN [--config.x=y ...]
#   MODULE=pan_jax.evaluate launch/local.sh --checkpoint=RUN [...]
# Environment:
#   MODULE               the command's module (default pan_jax.main)
#   NUM_PROCESSES        processes (default 2)
#   DEVICES_PER_PROCESS  CPU devices of each process (default 4)
#   PYTHON               interpreter (default .venv/bin/python)
#   COORDINATOR_PORT     coordinator port on 127.0.0.1 (default: a free one)
#   LOG_DIR              write process i's output to LOG_DIR/process_i.log
#                        and its pid to LOG_DIR/process_i.pid (default: all
#                        processes print here)
#   KILL_AFTER           seconds the others get between SIGTERM and SIGKILL
#                        once one process has failed (default 10)
#   DRY_RUN=1            print one command line per process instead
# Exit status: 0 when every process exits 0; otherwise the status of the
# first process that failed (the others are stopped). SIGTERM or SIGINT to
# this script reaches every process as SIGTERM: they checkpoint and stop, and
# rerunning the same command resumes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
module=${MODULE:-pan_jax.main}
num=${NUM_PROCESSES:-2}
devices=${DEVICES_PER_PROCESS:-4}
kill_after=${KILL_AFTER:-10}
check() {  # check NAME VALUE MIN: VALUE must be an integer >= MIN.
  if ! [[ $2 =~ ^[0-9]+$ ]] || (($2 < $3)); then
    echo "launch/local.sh: $1=$2, expected an integer >= $3" >&2
    exit 2
  fi
}
check NUM_PROCESSES "$num" 1
check DEVICES_PER_PROCESS "$devices" 1
check KILL_AFTER "$kill_after" 0
if [ -n "${COORDINATOR_PORT:-}" ]; then
  port=$COORDINATOR_PORT
else
  # Any python can find one; the venv's may not exist yet in a dry run.
  finder=python3
  command -v "$finder" >/dev/null || finder=$python
  port=$("$finder" -c 'import socket; s = socket.socket()
s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# The user's XLA flags are kept, less a device count of their own.
xla_flags=$(sed -E 's/(^| )--xla_force_host_platform_device_count=[^ ]*//g;
                   s/^ +//' <<<"${XLA_FLAGS:-}")
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"

command_of() {  # Sets `cmd` to the command line of process $1 (flags: $2...).
  local index=$1
  shift
  # The coordinator (process 0) listens on loopback only, not on [::].
  cmd=(env PAN_JAX_DISTRIBUTED=1 "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port"
       "JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:$port"
       "PAN_JAX_NUM_PROCESSES=$num" "PAN_JAX_PROCESS_ID=$index"
       JAX_PLATFORMS=cpu
       "XLA_FLAGS=$xla_flags"
       "$python" -m "$module" "$@")
}

if [ "${DRY_RUN:-0}" = 1 ]; then
  for ((i = 0; i < num; i++)); do
    command_of "$i" "$@"
    line=$(printf '%q ' "${cmd[@]}")
    echo "cd $(printf '%q' "$root") && ${line% }"
  done
  exit 0
fi

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1)))
then
  echo "launch/local.sh needs bash >= 5.1 (wait -n -p), this is $BASH_VERSION" >&2
  exit 2
fi
if [ -n "${LOG_DIR:-}" ]; then mkdir -p "$LOG_DIR"; fi
cd "$root"
# Every process runs in its own session (setsid), hence its own process
# group: stopping it also stops what it started (data workers), and a Ctrl-C
# in the terminal reaches only this script, which passes it on once.
declare -A index_of=()
running=() first_status=0 killer=''

signal_all() {  # Sends signal $1 to the process group of every live process.
  local pid
  for pid in "${running[@]}"; do kill "-$1" -- "-$pid" 2>/dev/null || true; done
}
on_signal() {
  echo "launch/local.sh: $1 received; passing SIGTERM to every process" >&2
  signal_all TERM
}
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT
trap 'signal_all KILL; [ -z "$killer" ] || kill -- "-$killer" 2>/dev/null || true' EXIT

finished() {  # Process $1 ended with status $2: forget it; on failure, stop all.
  local pid remaining=()
  for pid in "${running[@]}"; do [ "$pid" = "$1" ] || remaining+=("$pid"); done
  running=("${remaining[@]+"${remaining[@]}"}")
  if (($2 != 0 && first_status == 0)); then
    first_status=$2
    echo "launch/local.sh: process ${index_of[$1]} (pid $1) exited with" \
         "status $2; stopping the other ${#running[@]}" >&2
    signal_all TERM
    if ((${#running[@]})); then
      # SIGKILL whoever is still there after KILL_AFTER seconds (a process
      # blocked in a collective with the dead one may never stop by itself).
      local pgids
      pgids=$(printf -- '-%s ' "${running[@]}")
      setsid bash -c "sleep $kill_after; kill -KILL -- $pgids 2>/dev/null" &
      killer=$!
    fi
  fi
}

for ((i = 0; i < num; i++)); do
  command_of "$i" "$@"
  if [ -n "${LOG_DIR:-}" ]; then
    setsid "${cmd[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  else
    setsid "${cmd[@]}" &
  fi
  index_of[$!]=$i
  running+=("$!")
  if [ -n "${LOG_DIR:-}" ]; then echo "$!" >"$LOG_DIR/process_$i.pid"; fi
done

while ((${#running[@]})); do
  pid='' status=0
  wait -n -p pid "${running[@]}" 2>/dev/null || status=$?
  if [ -n "${pid:-}" ]; then
    finished "$pid" "$status"
    continue
  fi
  # Woken by a trapped signal, or bash already reaped a job (then `wait -n`
  # no longer knows it, but `wait PID` still has its status).
  for pid in "${running[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      status=0
      wait "$pid" 2>/dev/null || status=$?
      finished "$pid" "$status"
    fi
  done
  sleep 0.1
done
exit "$first_status"
