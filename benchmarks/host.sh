# Sourced by benchmarks/gpu.sh and benchmarks/gpu_e2e.sh: what the host is, and how long a part
# of the check may run.
# describe_host PYTHON OUT: nvidia-smi (where there is one) into OUT/nvidia-smi.txt and the
# library versions into OUT/versions.txt, each also shown.
describe_host() {
    local python=$1 out=$2
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi >"$out/nvidia-smi.txt" 2>&1
        head -n 12 "$out/nvidia-smi.txt"
    fi
    "$python" -c "import jax, flax, optax, torch, timm; print('jax', jax.__version__,
        jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| torch',
        torch.__version__, '| timm', timm.__version__)" 2>&1 | tee "$out/versions.txt"
}

# capped_limit SECONDS: SECONDS, or the seconds left before GPU_CHECK_DEADLINE (the check's end,
# seconds since the epoch, set by benchmarks/device_run.sh) where that is less; prints nothing
# and fails where under 10 s are left.
capped_limit() {
    local seconds=$1 left
    if [[ -n "${GPU_CHECK_DEADLINE:-}" ]]; then
        left=$((GPU_CHECK_DEADLINE - $(date +%s)))
        ((left < 10)) && return 1
        ((seconds > left)) && seconds=$left
    fi
    echo "$seconds"
}
