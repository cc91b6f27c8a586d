#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: sets up .venv, then pytest.
#   launch/test.sh [--torch] [pytest args...]
# --torch installs torch/timm/smp so the PyTorch parity tests run instead of
# skipping. CPU only; tests use tiny models and take a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=()
if [ "${1:-}" = "--torch" ]; then extra=(--torch); shift; fi
python=$(launch/setup_env.sh "${extra[@]}" | tail -n 1)
exec "$python" -m pytest tests "$@"
