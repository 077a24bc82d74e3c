# Sourced by benchmarks/gpu.sh and benchmarks/gpu_e2e.sh: what the host is.
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
