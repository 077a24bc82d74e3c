"""Shared test setup.

timm imports torchvision -> torch._dynamo -> triton, whose LLVM aborts the process if
TensorFlow's LLVM was loaded first ("Option ... registered more than once"). Importing timm
before any test module imports TensorFlow avoids that.
"""

import pytest
import timm  # noqa: F401


@pytest.fixture
def hf_offline(monkeypatch):
    """Hugging Face offline mode inside this process.

    huggingface_hub reads HF_HUB_OFFLINE once, at import (timm is imported above), so setting
    the variable alone would let a test wait ~30 s for DNS retries instead of failing at once.
    """
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
