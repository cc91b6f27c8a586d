#!/usr/bin/env bash
# Makes (or reuses) the project's virtual environment and installs pan_jax
# into it, editable, with the tested versions (constraints.txt):
#   launch/setup_env.sh            pan_jax + the dev extra (pytest, the tests'
#                                  local GCS server) + the gcs extra (gs://)
#   launch/setup_env.sh --torch    also the torch extra: torch/torchvision/
#                                  timm/smp (weight conversion and the
#                                  PyTorch parity tests)
# i.e. pip install -c constraints.txt -e ".[dev,gcs(,torch)]". The venv lives
# in $PAN_JAX_VENV (default: .venv in the repository root). Prints the venv's
# python on the last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PAN_JAX_VENV:-$root/.venv}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv" >&2
  "$venv/bin/pip" install -q --upgrade pip >&2
fi
extras=dev,gcs
if [ "${1:-}" = "--torch" ]; then extras=dev,gcs,torch; fi
# Reinstall only when the package's metadata, the pins or the extras changed
# since the last install.
stamp="$venv/.pan_jax_requirements"
sum=$( (cat "$root/pyproject.toml" "$root/constraints.txt"; echo "$extras") |
      sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || ! grep -qx "$sum" "$stamp"; then
  echo "installing into $venv ..." >&2
  "$venv/bin/pip" install -q -c "$root/constraints.txt" -e "$root[$extras]" >&2
  echo "$sum" >> "$stamp"
fi
echo "$venv/bin/python"
