#!/usr/bin/env bash
# One call of the device tool (a lent GPU machine: Python 3.12 with jax and torch, no network,
# up to 8 files back from $OUT) runs one of the prepared GPU checks and sends back its results
# as a few files. From the repository's root:
#
#   here, once:  benchmarks/device_wheels.sh         # .whl/, which .gitignore leaves out
#   there:       bash benchmarks/device_run.sh gpu    # carry [".whl"]: benchmarks/gpu.sh
#                bash benchmarks/device_run.sh e2e    # carry [".whl"]: benchmarks/gpu_e2e.sh
#
# It installs the wheels in .whl (the versions this project pins of what that host lacks) into
# /tmp/site, runs the check into /tmp/<check>_results, each of its parts ending within
# DEVICE_BUDGET_S seconds (default 540, inside the tool's 600 s per call) so that it always
# ends in time to pack, and writes to $OUT: console.txt (what the check printed), summary.md,
# and <check>_results.tgz (every table, log, JSON and HLO file; the e2e image folders and
# compilation cache left out).
# A session lent 15 minutes of device time: `gpu` first (its start and 9 minutes), then `e2e`
# at once, while the machine is still warm, with DEVICE_BUDGET_S set to what is left.
set -uo pipefail

check="${1:-}"
case "$check" in
    gpu) script=gpu.sh ;;
    e2e) script=gpu_e2e.sh ;;
    *) echo "usage: $0 gpu|e2e (with OUT set to the folder that comes back)" >&2; exit 2 ;;
esac
out="${OUT:?set OUT to the folder whose files come back}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$(dirname "$here")" || exit 2
export PYTHON="${PYTHON:-python3}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "installing .whl failed" >&2; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
results="/tmp/${check}_results"
budget="${DEVICE_BUDGET_S:-540}"
echo "== $script into $results, at most $budget s ($(date -u +%H:%M:%SZ))"
# Each part of the check ends by this deadline (its part() cuts its own limit to it); the
# outer limit only guards against a part that ignores its timeout.
export GPU_CHECK_DEADLINE=$(($(date +%s) + budget))
timeout -k 10 "$((budget + 20))" bash "$here/$script" "$results" 2>&1 | tee "$out/console.txt"
status=${PIPESTATUS[0]}
echo "== $script ended with exit $status ($(date -u +%H:%M:%SZ)); packing" | tee -a "$out/console.txt"
[[ -f "$results/summary.md" ]] && cp "$results/summary.md" "$out/summary.md"
tar -czf "$out/${check}_results.tgz" -C /tmp --exclude "${check}_results/data" \
    --exclude "${check}_results/xla_cache" --exclude "${check}_results/*/checkpoints" \
    "${check}_results"
ls -la "$out"
exit "$status"
