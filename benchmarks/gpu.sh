#!/usr/bin/env bash
# The prepared GPU check for one H100/H200-class GPU, about 8 minutes: each part runs under a
# time limit (listed below); a part that fails or runs out is reported, not fatal, and the
# pipeline part is skipped, saying so, where tensorflow-datasets is not installed. The parts
# run in the order of what matters most if the machine is taken back early.
#
#   benchmarks/gpu.sh [OUT]         # on the GPU machine, from anywhere, default OUT=gpu_results
#   benchmarks/gpu.sh --tiny [OUT]  # the same parts at toy sizes, on any machine (CPU: ~3 min)
#   benchmarks/device_run.sh gpu    # the same through the device tool (wheels, one archive)
#
# 1. Accuracy (120 s): tests/test_mixed_precision.py's bfloat16 tests against float64 and torch
#    autocast (`-s`: each prints its ratios), with the attention `create_model` takes by
#    default on this machine (on NVIDIA GPUs, cuDNN's fused kernel).
# 2. The train step in bfloat16 at batch 64 (200 s) and 128 (300 s): ours (the default
#    attention, and XLA's einsums where the default is cuDNN's) against the reference
#    (adapter-plus on timm) in torch eager bf16 autocast and under torch.compile, one
#    interleaved run per batch size, with evaluation throughput (torch.compile's forward
#    too), device memory and MFU (model FLOP/s over the GPU's datasheet bf16 peak and over
#    the measured matmul peak): benchmarks/train_step.py. At batch 128 also ours with each of XLA_OPTIONS (one peer
#    each), and our steps' optimized HLO in OUT/hlo.
# 3. Where the step's time goes (150 s): GPU kernels by family, ours by op class, ours against
#    torch eager and torch.compile at batch 128: benchmarks/gpu_profile.py.
# 4. The bfloat16 product forms at ViT-B/16's layer shapes, batch 64 (40 s; our float32 result
#    and one rounding against a bfloat16 result): benchmarks/dot_forms.py.
# 5. The input pipeline on this host's cores at batch 128 (40 s): benchmarks/data_pipeline.py.
# Writes OUT/train_step_b<batch>/*.{md,json}, OUT/gpu_profile/*, OUT/hlo/*.hlo.txt.gz,
# OUT/dot_forms.md, OUT/data_pipeline.md, OUT/nvidia-smi.txt, OUT/versions.txt, the log of
# every part in OUT/*.log, and the tables in OUT/summary.md. --tiny skips torch.compile
# (minutes of compilation on a CPU) and uses a 4-block ViT-Ti at 64x64 and batch 4, 75x100
# JPEGs, tiny products, only the ViT-Ti accuracy test, and a CPU option as the XLA option.
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

# XLA options to try on the step, NAME:KEY=VALUE[,KEY=VALUE] (train_step.py --xla-option).
XLA_OPTIONS=(
    cudnn_layer_norm:xla_gpu_enable_cudnn_layer_norm=true
    cudnn_gemm_fusion:xla_gpu_cudnn_gemm_fusion_level=2
    no_triton_gemm:xla_gpu_enable_triton_gemm=false
)
if ((tiny)); then
    batches=(4)
    big=4
    train_args=(--model-size tiny --image 64 --depth 4 --warmup 1 --rounds 1 --steps 1
        --matmul-n 256)
    profile_args=(--model-size tiny --image 64 --depth 4 --warmup 1 --steps 1 --batch 4)
    pipeline_args=(--batch 16 --epochs 1 --test-size 64 --height 75 --width 100)
    dot_args=(--batch 1 --width 0.125 --calls 2 --rounds 1)
    accuracy_tests="as_accurate"
    XLA_OPTIONS=(fast_min_max:xla_cpu_enable_fast_min_max=true)
    limits=(300 300 300 300 300 300)
else
    batches=(64 128)
    big=128
    train_args=(--model-size base --warmup 3 --rounds 3 --steps 10 --torch-compile)
    profile_args=(--model-size base --warmup 3 --steps 5 --batch 128 --torch-compile)
    pipeline_args=(--batch 128 --epochs 2 --test-size 1000)
    dot_args=(--batch 64)
    accuracy_tests="as_accurate or peft_matches"
    limits=(120 200 300 150 40 40)  # accuracy, train b64, train b128, profile, dots, pipeline
fi
failed=0
part() {  # part NAME LIMIT_S COMMAND...: run COMMAND under a time limit, log to OUT/NAME.log
    local name=$1 seconds=$2
    shift 2
    seconds=$(capped_limit "$seconds") || {
        echo "== $name skipped: the check's time (GPU_CHECK_DEADLINE) is up"
        failed=1
        return
    }
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
cd "$(dirname "$here")" || exit 2  # the repository: pytest finds its tests and conftest
if "$python" -c "import pytest" 2>/dev/null; then
    part accuracy "${limits[0]}" "$python" -m pytest -q -s -p no:cacheprovider \
        tests/test_mixed_precision.py -k "$accuracy_tests"
else
    echo "== accuracy skipped: pytest is not installed for $python"
    failed=1
fi
for b in "${batches[@]}"; do
    extra=()
    limit=${limits[1]}
    if ((b == big)); then
        for option in "${XLA_OPTIONS[@]}"; do extra+=(--xla-option "$option"); done
        extra+=(--hlo-dir "$out/hlo")
        limit=${limits[2]}
    fi
    part "train_step_b$b" "$limit" "$python" "$here/train_step.py" --dtype bfloat16 \
        --batch "$b" "${train_args[@]}" "${extra[@]}" --out "$out/train_step_b$b"
done
part gpu_profile "${limits[3]}" "$python" "$here/gpu_profile.py" "${profile_args[@]}" \
    --out "$out/gpu_profile"
part dot_forms "${limits[4]}" "$python" "$here/dot_forms.py" "${dot_args[@]}" \
    --out "$out/dot_forms.md"
if "$python" -c "import tensorflow_datasets" 2>/dev/null; then
    part data_pipeline "${limits[5]}" "$python" "$here/data_pipeline.py" \
        "${pipeline_args[@]}" --out "$out/data_pipeline.md"
else
    echo "== data_pipeline skipped: tensorflow-datasets is not installed for $python"
fi

{
    echo "# benchmarks/gpu.sh$( ((tiny)) && echo " --tiny"), $(date -u +%Y-%m-%dT%H:%MZ)"
    if [[ -f "$out/accuracy.log" ]]; then
        echo
        echo "## Accuracy against float64 (tests/test_mixed_precision.py, on this machine)"
        echo
        grep -E "attention=|passed|failed|error" "$out/accuracy.log" | sed 's/^/    /'
    fi
    for f in "$out"/train_step_b*/*.md "$out"/gpu_profile/*.md "$out/dot_forms.md" \
        "$out/data_pipeline.md"; do
        [[ -f "$f" ]] && { echo; cat "$f"; }
    done
} >"$out/summary.md"
echo "== wrote $out/summary.md"
exit "$failed"
