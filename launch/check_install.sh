#!/usr/bin/env bash
# CI step: `pip install .` into a fresh venv with the tested versions
# (constraints.txt), then, from a directory outside the repository, every
# console script's --help, one real command's error path, and
# `from configs import voc`. Prints the install time.
#   launch/check_install.sh
# pip uses its cache and configured indexes; only if the install fails while
# PyPI is unreachable (offline) does the step say so and exit 0 unchecked.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "check_install: FAILED: $*" >&2; exit 1; }

# Build from a copy of the files git knows (tracked, and new ones not
# ignored): a stale build/ or egg-info of the checkout cannot leak in, and
# the checkout is left as it was.
mkdir "$tmp/src"
(cd "$root" && git ls-files -z -co --exclude-standard |
  xargs -0 -I{} sh -c '[ -e "{}" ] && printf "%s\0" "{}"' |
  tar --null -T - -cf -) | tar -xf - -C "$tmp/src"
"$py" -m venv "$tmp/venv"
bin=$tmp/venv/bin
start=$SECONDS
if ! "$bin/pip" install -q -c "$root/constraints.txt" "$tmp/src" \
    > "$tmp/pip.log" 2>&1; then
  online="import socket; socket.create_connection(('pypi.org', 443), 10)"
  if ! "$py" -c "$online" 2>/dev/null; then
    echo "check_install: skipped: pip could not install and pypi.org is" \
      "unreachable (offline, and pip's cache and indexes lack a package)"
    exit 0
  fi
  cat "$tmp/pip.log" >&2
  fail "pip install -c constraints.txt ."
fi
echo "check_install: pip install . took $((SECONDS - start)) s"

cd "$tmp"  # Outside the repository: only the installed package is there.
"$bin/python" - <<'PY' || fail "imports from outside the repository"
import configs, pan_jax
from configs import voc
for module in (configs, pan_jax):
  assert '/site-packages/' in module.__file__, module.__file__
assert voc.get_config().model.backbone == 'resnet101'
PY
# absl's --help exits with status 1 by design: check what it prints. The
# commands start in parallel (each imports jax).
commands="train evaluate predict export convert prepare bench"
for command in $commands; do
  "$bin/pan-jax-$command" --help > "$tmp/help_$command.txt" 2>&1 &
done
wait || true
for command in $commands; do
  # The module's docstring and its own flags, not just absl's.
  grep -q "python -m pan_jax" "$tmp/help_$command.txt" \
    || fail "pan-jax-$command --help lacks the command's description"
  grep -q "^  --" "$tmp/help_$command.txt" \
    || fail "pan-jax-$command --help lists no flags"
done
"$bin/pan-jax-train" --helpfull > "$tmp/help.txt" 2>&1 || true
grep -q "^absl.logging:" "$tmp/help.txt" \
  || fail "pan-jax-train --helpfull lists only the command's flags"
grep -q -- "--workdir" "$tmp/help.txt" || fail "pan-jax-train --helpfull"
# A real start (runtime.run, jax) that stops on a user error.
status=0
JAX_PLATFORMS=cpu "$bin/pan-jax-export" --checkpoint="$tmp/missing" \
  --output="$tmp/out" 2> "$tmp/err.txt" || status=$?
[ "$status" = 1 ] || fail "pan-jax-export, missing checkpoint: exit $status"
expected="pan-jax-export: error: checkpoint directory '$tmp/missing' does not"
grep -q "^$expected exist" "$tmp/err.txt" \
  || fail "pan-jax-export's error: $(cat "$tmp/err.txt")"
echo "check_install: OK (7 console scripts; configs importable outside the" \
  "repository)"
