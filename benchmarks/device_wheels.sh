#!/usr/bin/env bash
# Downloads, on a machine that reaches the package registry, the wheels that a lent GPU machine
# (the device tool: Python 3.12, jax with CUDA, torch, no network) lacks for
# benchmarks/device_run.sh: the versions this project pins (requirements*.txt) of the packages
# that host has in other versions or not at all. All are pure-Python wheels.
#
#   benchmarks/device_wheels.sh [DIR]   # default DIR=.whl (.gitignore leaves it out of git)
set -euo pipefail
dir="${1:-.whl}"
python="${PYTHON:-python3}"
packages=(
    adapter-plus==0.1.0        # the reference (absent there)
    timm==1.0.12               # the newest that adapter-plus 0.1.0 builds with (there: newer)
    huggingface_hub==0.36.2    # timm 1.0.12 imports names that huggingface_hub 1.x removed
    omegaconf==2.4.0           # the reference's configs (absent there)
    ml-collections==1.1.0      # our configs (absent there)
    flax==0.12.8
    optax==0.2.8
    orbax-checkpoint==0.12.8
)
mkdir -p "$dir"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "${packages[@]}"
echo "wrote $(ls "$dir"/*.whl | wc -l) wheels to $dir ($(du -sh "$dir" | cut -f1))"
