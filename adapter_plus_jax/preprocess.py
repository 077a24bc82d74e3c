"""Input normalisation with the ported backbone's mean and std, exactly as the reference's
preprocessing computes it. Needs only JAX; the tf.data pipelines call it on the devices.

    x = normalize(uint8_images, module.config.mean, module.config.std)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """[0, 255] float images (..., 3) -> (images / 255 - mean) / std per channel, float32, with
    IEEE divisions like the reference's.

    XLA turns a division by a broadcast value into a multiplication by its reciprocal, which
    is off by an ulp; hiding the broadcast divisors behind an optimisation barrier keeps true
    divisions (the tests check the result against numpy bit for bit).
    """
    images = images.astype(jnp.float32)
    scale, std = jax.lax.optimization_barrier(
        (
            jnp.full(images.shape, 255.0, jnp.float32),
            jnp.broadcast_to(jnp.asarray(std, jnp.float32), images.shape),
        )
    )
    return (images / scale - jnp.asarray(mean, jnp.float32)) / std
