"""Shared test setup.

timm imports torchvision -> torch._dynamo -> triton, whose LLVM aborts the process if
TensorFlow's LLVM was loaded first ("Option ... registered more than once"). Importing timm
before any test module imports TensorFlow avoids that.
"""

import os
import tempfile

import pytest
import timm  # noqa: F401

# Runs in tests compile into a scratch compilation cache, not the user's
# ~/.cache/adapter_plus_jax/xla; tests of the cache itself set their own.
os.environ.setdefault(
    "ADAPTER_PLUS_JAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="apj-test-xla-cache-")
)
os.environ.setdefault("ADAPTER_PLUS_JAX_DATA_CACHE", tempfile.mkdtemp(prefix="apj-test-images-"))


@pytest.fixture
def hf_offline(monkeypatch):
    """Hugging Face offline mode inside this process.

    huggingface_hub reads HF_HUB_OFFLINE once, at import (timm is imported above), so setting
    the variable alone would let a test wait ~30 s for DNS retries instead of failing at once.
    """
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
