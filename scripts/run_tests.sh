#!/usr/bin/env bash
# Runs the test suite against the real ComfyUI host (setting it up first if it is missing).
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k first_block_cache`.
set -euo pipefail
pack_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$pack_dir/scripts/host_env.sh"
bash "$pack_dir/scripts/setup_host.sh" --no-demo
cd "$pack_dir"
exec "$HOST_PYTHON" -m pytest "$@"
