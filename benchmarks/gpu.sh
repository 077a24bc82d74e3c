#!/usr/bin/env bash
# The prepared GPU check for one H100/H200-class GPU, under 8 minutes: each train-step part runs
# under a 170 s limit and the pipeline (writing its JPEGs included) under 120 s; a part that
# fails or runs out is reported, not fatal.
#
#   benchmarks/gpu.sh [OUT]         # on the GPU machine, from anywhere, default OUT=gpu_results
#   benchmarks/gpu.sh --tiny [OUT]  # the same parts at toy sizes, on any machine (CPU: ~2 min)
#
# 1. The train step in bfloat16 at batch 64 and 128: ours against the reference (adapter-plus
#    on timm) in torch eager bf16 autocast and under torch.compile, one interleaved run per
#    batch size, with evaluation throughput, peak device memory and MFU (model FLOP/s over the
#    GPU's datasheet bf16 peak and over the measured matmul peak): benchmarks/train_step.py.
# 2. The input pipeline on this host's cores at batch 128: benchmarks/data_pipeline.py.
# Writes OUT/train_step_b<batch>/*.{md,json}, OUT/data_pipeline.md, OUT/nvidia-smi.txt, the
# log of every part in OUT/*.log, and everything in OUT/summary.md. --tiny skips torch.compile
# (minutes of compilation on a CPU) and uses ViT-Ti at batch 4, 75x100 JPEGs.
set -uo pipefail

tiny=0
if [[ "${1:-}" == "--tiny" ]]; then
    tiny=1
    shift
fi
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mkdir -p "${1:-gpu_results}" && cd "${1:-gpu_results}" && pwd)"
[[ -n "$out" ]] || { echo "cannot create the output folder ${1:-gpu_results}" >&2; exit 2; }
python="${PYTHON:-python}"

if ((tiny)); then
    batches=(4)
    train_args=(--model-size tiny --warmup 1 --rounds 1 --steps 1 --matmul-n 256)
    pipeline_args=(--batch 16 --epochs 1 --test-size 64 --height 75 --width 100)
    limit=300
    pipeline_limit=300
else
    batches=(64 128)
    train_args=(--model-size base --warmup 3 --rounds 3 --steps 10 --torch-compile)
    pipeline_args=(--batch 128 --epochs 3 --test-size 2000)
    limit=170
    pipeline_limit=120
fi

failed=0
part() {  # part NAME LIMIT_S COMMAND...: run COMMAND under a time limit, log to OUT/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds} s)"
    if timeout -k 10 "$seconds" "$@" >"$out/$name.log" 2>&1; then
        tail -n 3 "$out/$name.log"
    else
        echo "   $name FAILED or ran out of time (exit $?); see $out/$name.log"
        tail -n 5 "$out/$name.log"
        failed=1
    fi
}

if command -v nvidia-smi >/dev/null; then
    nvidia-smi >"$out/nvidia-smi.txt" 2>&1
    head -n 12 "$out/nvidia-smi.txt"
fi
for b in "${batches[@]}"; do
    part "train_step_b$b" "$limit" "$python" "$here/train_step.py" --dtype bfloat16 \
        --batch "$b" "${train_args[@]}" --out "$out/train_step_b$b"
done
part data_pipeline "$pipeline_limit" "$python" "$here/data_pipeline.py" "${pipeline_args[@]}" \
    --out "$out/data_pipeline.md"

{
    echo "# benchmarks/gpu.sh$( ((tiny)) && echo " --tiny"), $(date -u +%Y-%m-%dT%H:%MZ)"
    for f in "$out"/train_step_b*/*.md "$out/data_pipeline.md"; do
        [[ -f "$f" ]] && { echo; cat "$f"; }
    done
} >"$out/summary.md"
echo "== wrote $out/summary.md"
exit "$failed"
