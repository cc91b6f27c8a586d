#!/usr/bin/env bash
# Makes (or reuses) the project's virtual environment and installs what it needs.
#   launch/setup_env.sh            runtime + test dependencies
#   launch/setup_env.sh --torch    also torch/torchvision/timm/smp (weight
#                                  conversion and the PyTorch parity tests)
# The venv lives in $PAN_JAX_VENV (default: .venv in the repository root).
# Prints the venv's python on the last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PAN_JAX_VENV:-$root/.venv}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv" >&2
  "$venv/bin/pip" install -q --upgrade pip >&2
fi
# Reinstall only when the requirement files changed since the last install.
stamp="$venv/.pan_jax_requirements"
# requirements-gcs.txt: gs:// support and the local GCS server of the tests.
want="$root/requirements.txt $root/requirements-gcs.txt $root/requirements-test.txt"
if [ "${1:-}" = "--torch" ]; then want="$want $root/requirements-torch.txt"; fi
sum=$(cat $want | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || ! grep -qx "$sum" "$stamp"; then
  echo "installing into $venv ..." >&2
  for f in $want; do "$venv/bin/pip" install -q -r "$f" >&2; done
  echo "$sum" >> "$stamp"
fi
echo "$venv/bin/python"
