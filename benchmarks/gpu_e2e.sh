#!/usr/bin/env bash
# The end-to-end GPU check for one H100/H200-class GPU, under 6 minutes: real runs through
# main.py and `apj suite`, on image folders it writes, against the isolated train step. No
# network and no TensorFlow needed; each part runs under a time limit, and a part that fails or
# runs out is reported and makes the script exit non-zero, the other parts still run.
#
#   benchmarks/gpu_e2e.sh [--wheels DIR] [OUT]   # on the GPU machine, default OUT=gpu_e2e_results
#   benchmarks/gpu_e2e.sh --tiny [OUT]           # the same parts at toy sizes, on any machine
#
# 0. The Python modules it needs (benchmarks/e2e_report.py NEEDED): with --wheels DIR the missing
#    ones are installed from DIR (pip --no-index --find-links DIR), and listed; without, a
#    missing one stops the script, naming it. This package is read from the repository
#    (PYTHONPATH), so nothing has to be built on the host.
# 1. VTAB-shaped image folders: 1,000 training and 1,000 test JPEGs at 224x224, 47 classes, one
#    for the run and three (other seeds) for the suite, under OUT/data.
# 2. One run: main.py with configs/folder.py, ViT-B/16 (random weights: no download) with
#    Adapter+ r=8 in bfloat16, batch 64, 3 epochs, into OUT/run; it compiles into the
#    compilation cache OUT/xla_cache.
# 3. The suite over the three folders (seed 18) with the same settings, into OUT/suite, loading
#    its steps from the cache, and `apj suite report`.
# 4. The isolated train step, ours against the reference (benchmarks/train_step.py, bfloat16,
#    batch 64), into OUT/train_step.
# Then prints and writes OUT/summary.md (benchmarks/e2e_report.py summary): wall and compile
# times, the run's steady images/s against the isolated step's, the input-wait fraction,
# evaluation images/s, and the projected time of the VTAB-1k suite (19 tasks x 3 seeds). The
# log of every part is OUT/<part>.log, its wall time OUT/<part>.wall_s. --tiny: 48 training and
# 24 test images at 32x32, 4 classes, a 2-block ViT-Ti in float32 at batch 8, 2 epochs, and the
# isolated step of ViT-Ti at batch 8 (CPU: ~2 minutes), with XLA's own CPU dots.
set -uo pipefail

tiny=0
wheels=""
out_arg=""
while (($#)); do
    case "$1" in
        --tiny) tiny=1 ;;
        --wheels)
            [[ $# -ge 2 ]] || { echo "--wheels needs a folder of wheels" >&2; exit 2; }
            wheels="$(cd "$2" && pwd)" || { echo "--wheels $2: no such folder" >&2; exit 2; }
            shift
            ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1 (usage: $0 [--tiny] [--wheels DIR] [OUT])" >&2; exit 2 ;;
        *) out_arg="$1" ;;
    esac
    shift
done
out_arg="${out_arg:-gpu_e2e_results}"
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
out="$(mkdir -p "$out_arg" && cd "$out_arg" && pwd)"
[[ -n "$out" ]] || { echo "cannot create the output folder $out_arg" >&2; exit 2; }
python="${PYTHON:-python}"
report="$here/e2e_report.py"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this package, from the repository
start_all=$(date +%s.%N)

if ((tiny)); then
    folder_args=(--train 48 --test 24 --classes 4 --size 32)
    epochs=2
    model_args=(--config.model.name=vit_tiny_patch16_224
        "--config.model.timm_kwargs={'img_size': 32, 'patch_size': 16, 'depth': 2}"
        --config.batch_size=8 --config.eval_batch_size=8 --config.model.dtype=float32)
    step_args=(--model-size tiny --image 64 --depth 4 --batch 8 --dtype float32 --warmup 1
        --rounds 1 --steps 1 --matmul-n 256)
    limit=300
    # XLA's own CPU dots: executables with oneDNN's (backend.ONEDNN_DOTS, the float32 default on
    # Intel and AMD CPUs) cannot be written to the compilation cache ("ToProto is not
    # implemented for thunk kind: onednn-fusion"), and the suite would compile again.
    export ADAPTER_PLUS_JAX_CPU_DOTS="${ADAPTER_PLUS_JAX_CPU_DOTS:-xla}"
else
    folder_args=(--train 1000 --test 1000 --classes 47 --size 224)
    epochs=3
    model_args=(--config.model.dtype=bfloat16)  # configs/folder.py: ViT-B/16, Adapter+ r=8, b 64
    step_args=(--model-size base --batch 64 --dtype bfloat16 --warmup 3 --rounds 3 --steps 10
        --classes 47)
    limit=300
fi
# Random weights (no download), and one compilation cache for the run and the suite.
common=(--config.model.pretrained=False "${model_args[@]}"
    "--config.compilation_cache=$out/xla_cache")

failed=0
part() {  # part NAME LIMIT_S COMMAND...: run COMMAND under a time limit, log to OUT/NAME.log
    local name=$1 seconds=$2 begin status
    shift 2
    seconds=$(capped_limit "$seconds") || {
        echo "== $name skipped: the check's time (GPU_CHECK_DEADLINE) is up"
        failed=1
        return
    }
    echo "== $name (at most ${seconds} s)"
    begin=$(date +%s.%N)
    timeout -k 10 "$seconds" "$@" >"$out/$name.log" 2>&1
    status=$?
    awk -v a="$begin" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f\n", b - a }' \
        >"$out/$name.wall_s"
    if ((status == 0)); then
        tail -n 3 "$out/$name.log"
        echo "   ($(cat "$out/$name.wall_s") s)"
    else
        echo "   $name FAILED or ran out of time (exit $status); see $out/$name.log"
        tail -n 5 "$out/$name.log"
        failed=1
    fi
}

# 0. What this host lacks: "<import name> <pip name>" lines.
lacking="$("$python" "$report" missing)" || { echo "cannot run $python $report" >&2; exit 2; }
if [[ -n "$wheels" ]]; then
    echo "== installing what $python lacks from $wheels"
    if [[ -z "$lacking" ]]; then
        echo "   nothing missing"
    else
        pip_names=$(awk '{ print $2 }' <<<"$lacking")
        # shellcheck disable=SC2086  # one word per package
        "$python" -m pip install --no-index --find-links "$wheels" $pip_names \
            >>"$out/install.log" 2>&1 || echo "   pip install FAILED; see $out/install.log"
        still="$("$python" "$report" missing)"
        installed=$(grep -vxF -f <(printf '%s\n' "$still") <<<"$lacking" | awk '{ print $1 }')
        echo "   installed: $(tr "\n" " " <<<"${installed:-nothing}")"
        lacking="$still"
    fi
fi
if [[ -n "$lacking" ]]; then
    echo "Missing Python modules for $python (import name, pip name):" >&2
    sed 's/^/   /' <<<"$lacking" >&2
    echo "Install them, or rerun with --wheels DIR (a folder of wheels for this host)." >&2
    exit 2
fi

# shellcheck source=benchmarks/host.sh
source "$here/host.sh"
describe_host "$python" "$out"

# A fresh start: a finished run or suite run would be skipped, and a filled cache not compile.
rm -rf "$out/data" "$out/run" "$out/suite" "$out/xla_cache" "$out/train_step"
rm -f "$out"/*.wall_s "$out/summary.md"

# 1.-4.
part folders "$limit" "$python" "$report" make-folder "$out/data/run" "$out/data/suite/task0" \
    "$out/data/suite/task1" "$out/data/suite/task2" "${folder_args[@]}" --seed 0
cd "$repo" || exit 2
part run "$limit" "$python" main.py --config "configs/folder.py:$out/data/run,epochs=$epochs" \
    --workdir "$out/run" "${common[@]}"
part suite "$limit" "$python" -m adapter_plus_jax suite run --benchmark folders \
    --root "$out/data/suite" --workdir "$out/suite" --seeds 18 --config-args "epochs=$epochs" \
    "${common[@]}"
part suite_report 120 "$python" -m adapter_plus_jax suite report --workdir "$out/suite"
part train_step "$limit" "$python" "$here/train_step.py" "${step_args[@]}" \
    --out "$out/train_step"

awk -v a="$start_all" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f\n", b - a }' >"$out/total.wall_s"
echo "== summary"
summary_args=("$out")
((tiny)) && summary_args+=(--tiny)
"$python" "$report" summary "${summary_args[@]}" || failed=1
echo "== wrote $out/summary.md"
exit "$failed"
