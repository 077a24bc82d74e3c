"""Shared test setup.

timm imports torchvision -> torch._dynamo -> triton, whose LLVM aborts the process if
TensorFlow's LLVM was loaded first ("Option ... registered more than once"). Importing timm
before any test module imports TensorFlow avoids that.
"""

import timm  # noqa: F401
