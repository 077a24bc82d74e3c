"""The streamed input pipeline: tf.data to sharded global jax arrays, for what is not held in
memory (VTAB-1k test splits, FGVC, any TFDS dataset) and to read TFDS splits into memory.

VTAB-1k preprocessing (docs/recipe.md, "Preprocessing"), identical for train and test:

    TFDS decode (uint8) -> task image/label transform -> resize to 224x224 with the TF1
    `tf.compat.v1.image.resize` bilinear (legacy grid, align_corners=False) -> /255 ->
    (x - mean) / std with the mean/std of the ported model's pretrained config -> NHWC float32.

tf.data does everything up to the resize; the loaders yield images in [0, 255] and the steps
normalise them (`images.normalize`). Batches, shuffling rules and sharding are those of
`pipeline` (its docstring); the small splits (train800, val200, train800val200) are cached as
decoded uint8 images before the resize, the big test sets streamed. `read_into_memory` turns a
split into the arrays of `pipeline`'s in-memory loaders.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
import tensorflow as tf

from adapter_plus_jax.data.pipeline import IMAGE_SIZE, Batcher, LoaderOptions, epoch_seeds

log = logging.getLogger(__name__)

Example = Mapping[str, tf.Tensor]
# (example, per-example stateless seed of shape [2]) -> (float32 HxWx3 image in [0, 255], label)
TrainTransform = Callable[[Example, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
EvalTransform = Callable[[Example], tuple[tf.Tensor, tf.Tensor]]


def _hide_gpus_from_tf() -> None:
    """Keep TF off the accelerators (as the reference does) so it never claims GPU memory that
    JAX needs; the input pipeline runs on the host CPU only."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF's devices are already initialised; nothing can be changed then
        log.warning("TensorFlow was initialised before adapter_plus_jax.data; it may use GPUs")


_hide_gpus_from_tf()


def _padding(element_spec: Mapping[str, tf.TensorSpec], count: int) -> tf.data.Dataset:
    """`count` all-zero examples (mask False) shaped like `element_spec`."""
    zeros = {k: tf.zeros(s.shape, s.dtype) for k, s in element_spec.items()}
    return tf.data.Dataset.from_tensors(zeros).repeat(count)


def _with_mask(image: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
    return {
        "image": image,
        "label": tf.cast(label, tf.int32),  # jax's default integer width
        "mask": tf.constant(True),
    }


def _options() -> tf.data.Options:
    options = tf.data.Options()
    # Same seed, same batches (the default, stated because the resume guarantee rests on it).
    # Intra-op threads stay on: they copy the examples into a batch in parallel, which measured
    # faster than the usual max_intra_op_parallelism=1.
    options.deterministic = True
    return options


class TrainLoader:
    """Training batches of any run of epochs, reproducible from (seed, epoch).

    Args:
      examples: the split's raw examples in a fixed order (no augmentation, no resizing yet).
      num_examples: their number N.
      transform: (example, stateless seed [2]) -> (float32 HxWx3 image in [0, 255], label).
        The seed is unique per (run seed, epoch, position in the epoch), so augmentations are
        reproducible and independent of the number of processes.
      options: the global batch (`batch_size`), the run's `seed` and the `mesh`.
      drop_remainder: drop the last incomplete global batch (VTAB: the reference's drop_last);
        if False it is padded and masked.
      cache: keep `examples` in memory once the first epoch has read them.
    """

    def __init__(
        self,
        examples: tf.data.Dataset,
        num_examples: int,
        transform: TrainTransform,
        options: LoaderOptions,
        *,
        drop_remainder: bool,
        cache: bool,
    ) -> None:
        global_batch = options.batch_size
        self._batcher = Batcher(global_batch, options.mesh)
        self._examples = examples.cache() if cache else examples
        self._transform = transform
        self.num_examples = num_examples
        self.seed = options.seed
        if drop_remainder:
            self.steps_per_epoch = num_examples // global_batch
        else:
            self.steps_per_epoch = math.ceil(num_examples / global_batch)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_examples} examples do not fill one batch of {global_batch}")

    @property
    def global_batch(self) -> int:
        return self._batcher.global_batch

    def _num_local_real(self) -> int:
        """How many real (unpadded) examples this process gets in one epoch."""
        gb, (lo, hi) = self.global_batch, self._batcher.rows
        full, rest = divmod(min(self.num_examples, self.steps_per_epoch * gb), gb)
        return full * (hi - lo) + min(max(rest - lo, 0), hi - lo)

    def _epoch(self, seeds: tf.Tensor) -> tf.data.Dataset:
        """One epoch's local batches; seeds = (shuffle seed, augmentation seed)."""
        gb, (lo, hi) = self.global_batch, self._batcher.rows
        ds = self._examples.shuffle(
            self.num_examples, seed=seeds[0], reshuffle_each_iteration=False
        )
        ds = ds.take(self.steps_per_epoch * gb).enumerate()
        ds = ds.filter(lambda i, ex: (i % gb >= lo) & (i % gb < hi))
        ds = ds.map(
            lambda i, ex: _with_mask(*self._transform(ex, tf.stack([seeds[1], i]))),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        pad = self.steps_per_epoch * self._batcher.local_batch - self._num_local_real()
        if pad:
            ds = ds.concatenate(_padding(ds.element_spec, pad))
        return ds.batch(self._batcher.local_batch, drop_remainder=True)

    def dataset(self, first_epoch: int, num_epochs: int = 1) -> tf.data.Dataset:
        """This process's batches of epochs first_epoch .. first_epoch + num_epochs - 1 as one
        tf.data pipeline (traced once, prefetching across epoch boundaries)."""
        seeds = np.array(
            [epoch_seeds(self.seed, e) for e in range(first_epoch, first_epoch + num_epochs)],
            np.int64,
        )
        ds = tf.data.Dataset.from_tensor_slices(seeds).flat_map(self._epoch)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

    def epochs(self, first_epoch: int, num_epochs: int) -> Iterator[dict[str, jax.Array]]:
        """The global batches of `num_epochs` epochs from `first_epoch` (0-based),
        `steps_per_epoch` per epoch. The same (seed, epoch) always gives the same batches, so a
        run resumes by asking for the epochs it has not done."""
        return self._batcher.iterate(self.dataset(first_epoch, num_epochs).as_numpy_iterator())

    def epoch(self, epoch: int) -> Iterator[dict[str, jax.Array]]:
        """The global batches of one epoch."""
        return self.epochs(epoch, 1)


class EvalLoader:
    """Evaluation batches over this process's slice of a split, padded and masked.

    Args:
      examples: this process's raw examples.
      num_local: their number.
      num_max_local: the largest slice over all processes (sets the common batch count).
      transform: example -> (float32 HxWx3 image in [0, 255], label).
      options: the global batch (`eval_batch_size`) and the `mesh`.
      cache: cache the raw examples in memory (small splits only).
    """

    def __init__(
        self,
        examples: tf.data.Dataset,
        num_local: int,
        num_max_local: int,
        transform: EvalTransform,
        options: LoaderOptions,
        *,
        cache: bool,
    ) -> None:
        self._batcher = Batcher(options.eval_batch_size, options.mesh)
        self._examples = examples.cache() if cache else examples
        self._transform = transform
        self.num_local = num_local
        self.num_batches = math.ceil(num_max_local / self._batcher.local_batch)

    def dataset(self) -> tf.data.Dataset:
        """This process's padded batches as a tf.data pipeline."""
        ds = self._examples.map(
            lambda ex: _with_mask(*self._transform(ex)), num_parallel_calls=tf.data.AUTOTUNE
        )
        pad = self.num_batches * self._batcher.local_batch - self.num_local
        if pad:
            ds = ds.concatenate(_padding(ds.element_spec, pad))
        ds = ds.batch(self._batcher.local_batch, drop_remainder=True)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self._batcher.iterate(self.dataset().as_numpy_iterator())


# ----------------------------------------------------------------------------------------------
# The resize.


def resize_bilinear_v1(image: tf.Tensor, size: int = IMAGE_SIZE) -> tf.Tensor:
    """Resize HxWxC to size x size with TF1's bilinear resize (source coordinate = dst*in/out,
    align_corners=False, half_pixel_centers=False, no antialias), float32 in the input's range.

    This is what the reference runs; `tf.image.resize` (half-pixel centres) and
    `jax.image.resize` give different pixels.
    """
    resized = tf.compat.v1.image.resize(
        image, [size, size], method=tf.compat.v1.image.ResizeMethod.BILINEAR, align_corners=False
    )
    # TF1 returns the input unchanged (uint8) when it already has the target size.
    return tf.cast(resized, tf.float32)


def read_into_memory(examples: tf.data.Dataset, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a split as arrays for `pipeline.ArrayTrainLoader`: every image
    resized as the streamed pipeline resizes it (`resize_bilinear_v1`, float32 in [0, 255]),
    kept as uint8 when every image already had the model's size (so the values are the
    same)."""
    resized = examples.map(
        lambda ex: (
            resize_bilinear_v1(ex["image"], size),
            tf.reduce_all(tf.shape(ex["image"])[:2] == size),
            tf.cast(ex["label"], tf.int32),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    parts = list(resized.batch(256).prefetch(1).as_numpy_iterator())  # batched: no per-image
    if not parts:  # Python round trip
        return np.zeros((0, size, size, 3), np.float32), np.zeros((0,), np.int32)
    images, same, labels = (np.concatenate(k) for k in zip(*parts, strict=True))
    return (images.astype(np.uint8) if same.all() else images), labels
