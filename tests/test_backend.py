"""backend: every choice that depends on the hardware (chunks, compiler options, the attention
implementation, huge pages), where each is made and what it changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from adapter_plus_jax import backend, create_model

ROOT = Path(__file__).resolve().parents[1]
# The tests of what runs where: they expect JAX on CPUs (as in CI).
CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks CPU-only choices")
HERE = {"glibc": backend.glibc_version(), "thp": backend.thp_mode()}
HELPS_HERE = sys.platform.startswith("linux") and backend.would_reexec(
    {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", backend.HUGE_PAGES_ENV)},
    HERE["glibc"],
    HERE["thp"],
)


@pytest.mark.parametrize(
    "environ, glibc, thp, expected",
    [
        ({}, (2, 36), "madvise", True),
        ({}, (2, 35), "madvise", True),
        ({}, (2, 34), "madvise", False),  # the tunable is new in 2.35
        ({}, None, "madvise", False),  # musl or unknown C library
        ({}, (2, 36), "never", False),  # no huge pages to get
        ({}, (2, 36), "always", False),  # malloc's large blocks get them already
        ({}, (2, 36), None, False),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise", True),
        ({backend.HUGE_PAGES_ENV: "0"}, (2, 36), "madvise", False),
        ({backend.HUGE_PAGES_ENV: "1"}, (2, 36), "madvise", True),
    ],
)
def test_restarts_only_where_it_helps(environ, glibc, thp, expected) -> None:
    assert backend.would_reexec(environ, glibc, thp) is expected


def test_never_restarts_a_process_that_has_the_tunable() -> None:
    # The restart's own environment has it (no loop), and a user's own setting is kept.
    for value in ("glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"):
        assert not backend.would_reexec({"GLIBC_TUNABLES": value}, (2, 36), "madvise")


def test_never_restarts_a_session_that_would_not_run_again(monkeypatch) -> None:
    """A REPL, a notebook kernel or a script read from stdin is left alone: starting it over
    would not run the same program."""
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert backend._restartable()
    for argv in ([""], ["-"]):
        monkeypatch.setattr(sys, "argv", argv)
        assert not backend._restartable()
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    assert not backend._restartable()
    monkeypatch.delattr(sys, "ps1")
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    assert not backend._restartable()


def test_adds_the_tunable_and_keeps_the_others() -> None:
    env = backend.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
    assert backend.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_reads_the_kernels_mode(tmp_path: Path) -> None:
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert backend.thp_mode(mode) == "madvise"
    mode.write_text("[always] madvise never\n")
    assert backend.thp_mode(mode) == "always"
    assert backend.thp_mode(tmp_path / "missing") is None


SCRIPT = """
import os, resource, sys
print("started", flush=True)
import jax
import jax.numpy as jnp

from adapter_plus_jax import backend, create_model
backend.reexec_with_huge_pages()
import ctypes
libc = ctypes.CDLL(None)  # glibc's malloc, as XLA:CPU uses it (numpy asks for huge pages itself)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # 256 MiB each, above malloc's mmap threshold: mapped fresh every time
    block = libc.malloc(2**28)
    ctypes.memset(block, 1, 2**28)
    libc.free(block)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print("tunables", os.environ.get("GLIBC_TUNABLES", ""), "faults", faults, flush=True)
"""


def _run(**env: str) -> tuple[list[str], int]:
    unset = ("GLIBC_TUNABLES", backend.HUGE_PAGES_ENV)
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    environ["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env={**environ, **env}, capture_output=True, text=True,
        timeout=300, check=True,
    ).stdout.splitlines()  # fmt: skip
    return out, int(out[-1].split()[-1])


def test_restart_gives_malloc_huge_pages_where_it_helps() -> None:
    lines, faults = _run()
    if not HELPS_HERE:  # this machine cannot gain: the process is left as it started
        assert lines[:-1] == ["started"] and lines[-1].startswith("tunables  faults")
        return
    # Started twice (the restart), the tunable set once, and 3 x 256 MiB of fresh buffers fault
    # in 2 MiB pages instead of 4 KiB ones (196,608 faults without).
    assert lines[:-1] == ["started", "started"], lines
    assert lines[-1].startswith(f"tunables {backend.TUNABLE} ")
    without_lines, without = _run(**{backend.HUGE_PAGES_ENV: "0"})
    assert without_lines[:-1] == ["started"] and without > 150_000
    assert faults * 10 < without, (faults, without)


# ----------------------------------------------------------------------------------------------
# Attention and compiler options.


@pytest.mark.parametrize(
    ("implementation", "dtype", "attn_drop", "message"),
    [
        ("flash", "bfloat16", 0.0, "expected one of \\('auto', 'xla', 'cudnn'\\)"),
        ("cudnn", "float32", 0.0, "has no float32 kernel"),
        ("cudnn", "bfloat16", 0.1, "takes no attention dropout"),
        ("cudnn", "bfloat16", 0.0, "needs an NVIDIA GPU; JAX computes on cpu"),
    ],
)
@CPU_ONLY
def test_cudnn_attention_is_refused_where_it_cannot_run(
    implementation: str, dtype: str, attn_drop: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        backend.check_attention(implementation, jnp.dtype(dtype), attn_drop)


@CPU_ONLY
def test_create_model_refuses_cudnn_attention_before_building() -> None:
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=3, rng=0,
            dtype="bfloat16", attention="cudnn", depth=1,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("dtype", "attn_drop", "head_dim", "capability", "expected"),
    [
        ("bfloat16", 0.0, 64, 9.0, "cudnn"),  # ViT-B/16 on an H100 or H200
        ("float16", 0.0, 64, 8.0, "cudnn"),  # an A100
        ("bfloat16", 0.0, 128, 8.9, "cudnn"),  # the widest head cuDNN takes
        ("float32", 0.0, 64, 9.0, "xla"),  # float32: the reference's arithmetic
        ("bfloat16", 0.1, 64, 9.0, "xla"),  # attention dropout
        ("bfloat16", 0.0, 80, 7.5, "xla"),  # a T4: no fused kernel before Ampere
        ("bfloat16", 0.0, 60, 9.0, "xla"),  # a head dimension cuDNN does not take
        ("bfloat16", 0.0, 256, 9.0, "xla"),
        ("bfloat16", 0.0, 64, None, "xla"),  # CPUs, TPUs, other GPUs
    ],
)
def test_auto_attention_takes_cudnn_only_where_it_runs(
    dtype: str, attn_drop: float, head_dim: int, capability: float | None, expected: str
) -> None:
    assert backend.auto_attention(jnp.dtype(dtype), attn_drop, head_dim, capability) == expected


class _Device:
    def __init__(self, platform: str, capability: str | None) -> None:
        self.platform = platform
        if capability is not None:
            self.compute_capability = capability


@pytest.mark.parametrize(
    ("device", "expected"),
    [(_Device("gpu", "9.0"), 9.0), (_Device("gpu", "gfx90a"), None),
     (_Device("gpu", None), None), (_Device("cpu", None), None), (_Device("tpu", None), None)],
)  # fmt: skip
def test_nvidia_compute_capability_reads_cuda_devices_only(device, expected) -> None:
    assert backend.nvidia_compute_capability(device) == expected


@CPU_ONLY
def test_create_model_resolves_auto_attention_to_the_einsums_on_cpus() -> None:
    for dtype in ("float32", "bfloat16"):
        module, _ = create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=3, rng=0, dtype=dtype,
            depth=1, img_size=32,
        )  # fmt: skip
        assert module.attention == "xla"


@pytest.mark.parametrize(
    ("cudnn", "dtype", "expected"),
    [(91900, "bfloat16", "cudnn"), (91900, "float32", "xla"), (None, "bfloat16", "xla"),
     (8907, "bfloat16", "xla")],
)  # fmt: skip
def test_create_model_takes_cudnn_where_auto_finds_a_gpu_for_it(
    monkeypatch, cudnn: int | None, dtype: str, expected: str
) -> None:
    """What create_model builds on an H100 (compute capability 9.0) with `cudnn` (its version;
    None: none found): attention='cudnn' in bfloat16 with cuDNN 9, the einsums otherwise. The
    facts of the GPU are stubbed; the module is not run."""
    monkeypatch.setattr(backend, "nvidia_compute_capability", lambda device=None: 9.0)
    monkeypatch.setattr(backend, "cudnn_version", lambda: cudnn)
    built = []
    monkeypatch.setattr(
        "adapter_plus_jax.factory.init_params",
        lambda module, params, rng: built.append(module) or params,
    )
    create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, rng=0, dtype=dtype,
                 depth=1, img_size=32)  # fmt: skip
    assert built[0].attention == expected


def test_cudnn_version_asks_jax(monkeypatch) -> None:
    """`cudnn_version` reads the version through jax's own check (so that a jax that moves it
    shows up here, not as a silent fallback to the einsums on GPUs)."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91900)
    assert backend.cudnn_version() == 91900

    def missing() -> int:
        raise RuntimeError("cuDNN is not detected.")

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", missing)
    assert backend.cudnn_version() is None


def test_cpu_vendor_reads_proc_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n")
    assert backend.cpu_vendor(str(info)) == "GenuineIntel"
    assert backend.cpu_vendor(str(tmp_path / "missing")) is None


@CPU_ONLY
def test_compiler_options_choose_the_float32_dot_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN's dots on Intel and AMD CPUs in float32, XLA's defaults otherwise (another vendor,
    an unreadable /proc/cpuinfo); the environment variable overrides the vendor, and a bad value
    is refused."""
    monkeypatch.delenv(backend.CPU_DOTS_ENV, raising=False)
    cases = [("GenuineIntel", backend.ONEDNN_DOTS), ("AuthenticAMD", backend.ONEDNN_DOTS),
             ("ARM", None), (None, None)]  # fmt: skip
    for vendor, expected in cases:
        monkeypatch.setattr(backend, "cpu_vendor", lambda v=vendor: v)
        assert backend.compiler_options(jnp.float32) == expected
        assert backend.compiler_options(jnp.bfloat16) is None
    monkeypatch.setenv(backend.CPU_DOTS_ENV, "onednn")
    assert backend.compiler_options(jnp.float32) == backend.ONEDNN_DOTS
    monkeypatch.setenv(backend.CPU_DOTS_ENV, "xla")
    assert backend.compiler_options(jnp.float32) is None
    monkeypatch.setenv(backend.CPU_DOTS_ENV, "mkl")
    with pytest.raises(ValueError, match="expected 'onednn' or 'xla'"):
        backend.compiler_options(jnp.float32)


def test_the_compilation_cache_keeps_steps_not_one_op_programs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program that compiles in CACHE_MIN_COMPILE_S or more is written to the cache; the
    one-op programs of eager jax calls are not (each write lists the whole cache directory)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    before = {
        name: getattr(jax.config, name)
        for name in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    }
    model, _ = create_model("vit_tiny_patch16_224", num_classes=3, pretrained=False, rng=0)
    images = jnp.zeros((1, 224, 224, 3))
    try:
        assert backend.use_compilation_cache(str(tmp_path)) == tmp_path
        jnp.add(jnp.ones((5, 7, 11)), 3.0).block_until_ready()  # one op: ~10 ms to compile
        jax.jit(model.init).lower(jax.random.key(0), images).compile()  # ~2.7 s on 2 cores
        stored = {p.name.split("-")[0] for p in tmp_path.glob("*-cache")}
        assert stored == {"jit_init"}, stored
    finally:
        cc.reset_cache()
        for name, value in before.items():
            jax.config.update(name, value)
