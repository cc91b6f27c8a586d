#!/usr/bin/env bash
# Runs the test suite from a fresh clone: sets up .venv, then pytest.
#   launch/test.sh [--all] [--torch] [pytest args...]
# Without --all: the quick tier (~10 minutes on 2 cores): every test except
# those marked `slow` (the demo end to end, the multi-scale protocols, the
# gradient and serving checks, ...) and the multi-process tests.
# --all (CI, .ci/run): everything: PAN_JAX_TEST_SLOW=1 and
# PAN_JAX_TEST_MULTIPROCESS=1 (tests/test_multihost.py: several processes
# with a local GCS server).
# --torch installs torch/timm/smp so the PyTorch parity tests run instead of
# skipping. CPU only; tests use tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --all) export PAN_JAX_TEST_SLOW=1 PAN_JAX_TEST_MULTIPROCESS=1; shift ;;
    --torch) extra=(--torch); shift ;;
    *) break ;;
  esac
done
python=$(launch/setup_env.sh "${extra[@]}" | tail -n 1)
exec "$python" -m pytest tests "$@"
