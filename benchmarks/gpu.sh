#!/usr/bin/env bash
# The prepared GPU check for one H100/H200-class GPU, about 8 minutes: each train-step part runs
# under a 200 s limit, the product forms and the pipeline (writing its JPEGs included) under 40 s
# each; a part that fails or runs out is reported, not fatal, and the pipeline part is skipped,
# saying so, where tensorflow-datasets is not installed.
#
#   benchmarks/gpu.sh [OUT]         # on the GPU machine, from anywhere, default OUT=gpu_results
#   benchmarks/gpu.sh --tiny [OUT]  # the same parts at toy sizes, on any machine (CPU: ~2 min)
#
# 1. The train step in bfloat16 at batch 64 and 128: ours (XLA attention, and the opt-in cuDNN
#    fused attention) against the reference (adapter-plus on timm) in torch eager bf16 autocast
#    and under torch.compile, one interleaved run per batch size, with evaluation throughput,
#    peak device memory and MFU (model FLOP/s over the GPU's datasheet bf16 peak and over the
#    measured matmul peak): benchmarks/train_step.py.
# 2. The bfloat16 product forms at ViT-B/16's layer shapes, batch 64 (our float32 result and
#    one rounding against a bfloat16 result): benchmarks/dot_forms.py.
# 3. The input pipeline on this host's cores at batch 128: benchmarks/data_pipeline.py.
# Writes OUT/train_step_b<batch>/*.{md,json}, OUT/dot_forms.md, OUT/data_pipeline.md,
# OUT/nvidia-smi.txt, OUT/versions.txt, the log of every part in OUT/*.log, and everything in
# OUT/summary.md. --tiny skips torch.compile (minutes of compilation on a CPU) and uses a
# 4-block ViT-Ti at 64x64 and batch 4, 75x100 JPEGs, and tiny products.
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
    train_args=(--model-size tiny --image 64 --depth 4 --warmup 1 --rounds 1 --steps 1
        --matmul-n 256)
    pipeline_args=(--batch 16 --epochs 1 --test-size 64 --height 75 --width 100)
    dot_args=(--batch 1 --width 0.125 --calls 2 --rounds 1)
    limit=300
    short_limit=300
else
    batches=(64 128)
    train_args=(--model-size base --warmup 3 --rounds 3 --steps 10 --torch-compile)
    pipeline_args=(--batch 128 --epochs 2 --test-size 1000)
    dot_args=(--batch 64)
    limit=200
    short_limit=40
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

# shellcheck source=benchmarks/host.sh
source "$here/host.sh"
describe_host "$python" "$out"
for b in "${batches[@]}"; do
    part "train_step_b$b" "$limit" "$python" "$here/train_step.py" --dtype bfloat16 \
        --batch "$b" "${train_args[@]}" --out "$out/train_step_b$b"
done
part dot_forms "$short_limit" "$python" "$here/dot_forms.py" "${dot_args[@]}" \
    --out "$out/dot_forms.md"
if "$python" -c "import tensorflow_datasets" 2>/dev/null; then
    part data_pipeline "$short_limit" "$python" "$here/data_pipeline.py" \
        "${pipeline_args[@]}" --out "$out/data_pipeline.md"
else
    echo "== data_pipeline skipped: tensorflow-datasets is not installed for $python"
fi

{
    echo "# benchmarks/gpu.sh$( ((tiny)) && echo " --tiny"), $(date -u +%Y-%m-%dT%H:%MZ)"
    for f in "$out"/train_step_b*/*.md "$out/dot_forms.md" "$out/data_pipeline.md"; do
        [[ -f "$f" ]] && { echo; cat "$f"; }
    done
} >"$out/summary.md"
echo "== wrote $out/summary.md"
exit "$failed"
