"""FacT (Jie & Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer",
AAAI 2023): the updates of every block's q, k, v, proj, fc1 and fc2 weights as one low-rank
tensor, factored with factors shared across layers.

Every update reads U x (U: width x r, shared by all layers) and writes through V (r x width,
shared, initialised to 0), scaled by s (`TuneSpec.fact_scale`), with dropout after the core:

    q, k, v, proj   delta = s V(drop(core (U x)))                core r x r
    fc1             the 4 chunks of its output: s V(drop(core (U x)))    core r x 4r
    fc2             the 4 chunks of its input, each through U, then s V(drop(core (...)))
                                                                 core 4r x r

The cores are where the two forms differ. FacT-TT (tensor train): each layer has its own cores.
FacT-TK (Tucker): block i's 12 cores (q, k, v, proj, fc1's 4, fc2's 4) are a core tensor C
(r x r x r) times 12 columns of a factor P (r x 12 depth), both shared; fc1's and fc2's four
are laid out as the paper's code lays them out (`layer_core`). Inits as that code: U as torch's
Linear, V = 0, TT cores as torch's Linear, C and P Xavier-uniform.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

KINDS = ("fact_tt", "fact_tk")
PER_BLOCK = 12  # q, k, v, proj, fc1 (4 chunks), fc2 (4 chunks)


def uniform(bound: float) -> Callable:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def xavier(shape: tuple[int, ...]) -> Callable:
    """torch's xavier_uniform_ for a tensor of `shape` (fans over dims 1 and 0, times the rest)."""
    receptive = math.prod(shape[2:])
    return uniform(math.sqrt(6.0 / ((shape[0] + shape[1]) * receptive)))


class FactShared(nn.Module):
    """The factors every layer shares: u, v; and for FacT-TK the core tensor and P."""

    kind: str
    rank: int
    width: int
    depth: int

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        r, w = self.rank, self.width
        shared = {
            "u": self.param("u", uniform(1.0 / math.sqrt(w)), (w, r)),
            "v": self.param("v", nn.initializers.zeros, (r, w)),
        }
        if self.kind == "fact_tk":
            core_shape, factors_shape = (r, r, r), (r, PER_BLOCK * self.depth)
            shared["core"] = self.param("core", xavier(core_shape), core_shape)
            shared["factors"] = self.param("factors", xavier(factors_shape), factors_shape)
        return shared


def for_block(shared: dict[str, jax.Array], i: int) -> dict[str, jax.Array]:
    """What block `i` reads: u, v and (TK) its 12 cores, r x r x 12."""
    out = {"u": shared["u"], "v": shared["v"]}
    if "core" in shared:
        factors = shared["factors"][:, PER_BLOCK * i : PER_BLOCK * (i + 1)]
        out["cores"] = shared["core"] @ factors
    return out


def core_shape(layer: str, rank: int) -> tuple[int, ...]:
    """A FacT-TT layer's own core: (3, r, r) for qkv, as inputs x outputs."""
    r = rank
    return {"qkv": (3, r, r), "proj": (r, r), "fc1": (r, 4 * r), "fc2": (4 * r, r)}[layer]


def core_fan_in(layer: str, rank: int) -> int:
    return 4 * rank if layer == "fc2" else rank


def _xp(*arrays: Any) -> Any:
    """numpy for numpy arrays (`tuning.merge`, in float64), else jax.numpy."""
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def layer_core(cores: jax.Array, layer: str) -> jax.Array:
    """A FacT-TK layer's core from its block's 12 (r x r x 12), in `core_shape`'s layout."""
    r = cores.shape[0]
    if layer == "qkv":
        return _xp(cores).moveaxis(cores[:, :, 0:3], -1, 0)
    if layer == "proj":
        return cores[:, :, 3]
    if layer == "fc1":
        return cores[:, :, 4:8].reshape(r, 4 * r)
    return cores[:, :, 8:12].reshape(r, 4 * r).T


def delta(
    x: jax.Array, layer: str, u: jax.Array, v: jax.Array, core: jax.Array,
    drop: Callable[[jax.Array], jax.Array], scale: float,
) -> jax.Array:  # fmt: skip
    """The update FacT adds to the output of `layer` (one of LINEARS) on its input x."""
    r = u.shape[-1]
    lead = x.shape[:-1]
    if layer == "fc2":
        ux = (x.reshape(*lead, 4, -1) @ u).reshape(*lead, 4 * r)
    else:
        ux = x @ u
    if layer == "qkv":
        out = _xp(x, u, v, core).concatenate([drop(ux @ core[j]) @ v for j in range(3)], axis=-1)
    elif layer == "fc1":
        out = (drop(ux @ core).reshape(*lead, 4, r) @ v).reshape(*lead, 4 * v.shape[-1])
    else:
        out = drop(ux @ core) @ v
    return scale * out
