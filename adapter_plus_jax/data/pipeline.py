"""Batches for the steps, without TensorFlow: sharded global jax arrays from images in memory.

Every loader yields dicts of global `jax.Array`s sharded over the 'data' axis of a 1-D mesh of
all devices: 'image' (B, S, S, 3) float32 in [0, 255], 'label' (B,) int32 and 'mask' (B,) bool.
The normalisation ((x / 255 - mean) / std, `images.normalize`) runs inside the jitted steps.
What every loader takes besides its data (batch sizes, seed, image size, mesh) is one
`LoaderOptions`.

Two kinds of loader share these batches (docs/recipe.md, "Preprocessing" and "Input
pipeline"):

- in memory (this module): a split small enough to hold (the VTAB-1k training splits, image
  folders, the demo) is decoded and resized once into one array on the devices; shuffling and
  sharding are numpy's (example indices), and each batch is gathered on the devices, with no
  TensorFlow;
- streamed (`tfdata`): tf.data for what does not fit or needs TF's augmentation (VTAB-1k test
  splits, FGVC, any TFDS dataset).

Both follow the same rules:

- Training: a full shuffle per epoch whose seed is derived from (seed, epoch), so an epoch can
  be replayed or resumed from its number alone. Every process walks the same shuffled order and
  keeps its own rows of each global batch, so the global batches do not depend on the number
  of processes. With `drop_remainder` (VTAB, like the reference's drop_last) an epoch has
  N // B steps; without it the last batch is padded (zeros, label 0, mask False).
- Evaluation: each process reads its own slice of the split, pads the last batch and marks real
  examples in 'mask', so that every example counts exactly once; all processes yield the same
  number of batches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

IMAGE_SIZE = 224
GLOBAL_BATCH = 64
DATA_AXIS = "data"
CACHED_SPLITS = ("train800", "val200", "train800val200")
PREFETCH = 2  # batches prepared ahead of the step that takes them


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """What every dataset's loaders take besides their data.

    Attributes:
      batch_size: the global training batch (summed over all devices).
      eval_batch_size: the global evaluation batch.
      seed: the run's seed (the shuffle and augmentation of every epoch derive from it).
      image_size: the model's input size (square).
      mesh: 1-D 'data' mesh (None: all devices).
    """

    batch_size: int = GLOBAL_BATCH
    eval_batch_size: int = GLOBAL_BATCH
    seed: int = 0
    image_size: int = IMAGE_SIZE
    mesh: Mesh | None = None


# ----------------------------------------------------------------------------------------------
# Devices.


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: all), ordered by process so that
    each process owns one contiguous block of every global batch."""
    devices = jax.devices() if devices is None else devices
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(ordered), (DATA_AXIS,))


def _process_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """The rows [lo, hi) of a global batch that live on this process's devices."""
    slices = sorted(
        (idx[0].start or 0, idx[0].stop if idx[0].stop is not None else global_batch)
        for idx in sharding.addressable_devices_indices_map((global_batch,)).values()
    )
    lo, hi = slices[0][0], slices[-1][1]
    covered = sum(stop - start for start, stop in dict.fromkeys(slices))
    if covered != hi - lo:
        raise ValueError("this process's devices do not hold one contiguous block of the batch")
    return lo, hi


class Batcher:
    """Turns host-local numpy batches into global jax arrays sharded over the 'data' axis."""

    def __init__(self, global_batch: int, mesh: Mesh | None) -> None:
        mesh = data_mesh() if mesh is None else mesh
        if mesh.axis_names != (DATA_AXIS,):
            raise ValueError(f"expected a 1-D mesh with axis {DATA_AXIS!r}, got {mesh.axis_names}")
        num_devices = mesh.devices.size
        if global_batch <= 0 or global_batch % num_devices:
            raise ValueError(
                f"the global batch size ({global_batch}) must be a positive multiple of the "
                f"number of devices ({num_devices})"
            )
        self.mesh = mesh
        self.global_batch = global_batch
        self.sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
        self.rows = _process_rows(self.sharding, global_batch)
        self.local_batch = self.rows[1] - self.rows[0]

    def to_global(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return {
            k: jax.make_array_from_process_local_data(
                self.sharding, v, (self.global_batch, *v.shape[1:])
            )
            for k, v in batch.items()
        }

    def iterate(
        self, batches: Iterable[Mapping[str, np.ndarray]]
    ) -> Iterator[dict[str, jax.Array]]:
        for batch in batches:
            yield self.to_global(batch)


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """(shuffle seed, augmentation seed) of one epoch, a pure function of (seed, epoch)."""
    shuffle_seed, aug_seed = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return int(shuffle_seed) >> 1, int(aug_seed) >> 1  # < 2**31: valid int32/int64 seeds


def process_slice(n: int, index: int, count: int) -> tuple[slice, int]:
    """(process `index`'s slice of n examples split over `count` processes, the largest slice's
    size): contiguous, the first n % count processes one longer, as `tfds.even_splits`."""
    sizes = [n // count + (k < n % count) for k in range(count)]
    start = sum(sizes[:index])
    return slice(start, start + sizes[index]), sizes[0]


def prefetch(batches: Iterator, size: int = PREFETCH) -> Iterator:
    """`batches`, produced `size` ahead by a background thread (the index work and the
    dispatch of each batch's gather overlap the step). Closing the iterator, or dropping it,
    stops the thread and releases the batches it holds."""
    items: queue.Queue = queue.Queue(maxsize=size)
    stop, done = threading.Event(), object()

    def offer(entry: tuple[Any, BaseException | None]) -> bool:
        """Queue `entry` unless the consumer has gone; False once it has."""
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as e:  # handed to the consumer, raised there
            offer((done, e))

    thread = threading.Thread(target=produce, daemon=True, name="apj-prefetch")
    thread.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive() or not items.empty():  # let go of what it prepared
            try:
                items.get(timeout=0.1)
            except queue.Empty:
                continue
        thread.join()


# ----------------------------------------------------------------------------------------------
# In memory.


class _Images:
    """A split's images, replicated on every device of the mesh (host memory on CPUs), and the
    jitted gather of a batch, sharded over 'data', by global example indices (-1: a padding
    example of zeros). On CPUs this beats numpy's copies into fresh host buffers
    (docs/performance.md, "Input pipeline"); on accelerators only indices and labels travel."""

    def __init__(self, images: np.ndarray, batcher: Batcher) -> None:
        replicated = NamedSharding(batcher.mesh, PartitionSpec())
        self.array = jax.make_array_from_process_local_data(replicated, images, images.shape)
        self._batcher = batcher
        self._gather = jax.jit(_gather, out_shardings=batcher.sharding)

    def batch(self, index: np.ndarray, labels: np.ndarray) -> dict[str, jax.Array]:
        """The global batch whose rows on this process are examples `index` (-1: padding)."""
        real = index >= 0
        label = np.where(real, labels[np.maximum(index, 0)], 0).astype(np.int32)
        batch = self._batcher.to_global({"index": index, "label": label, "mask": real})
        return {"image": self._gather(self.array, batch.pop("index")), **batch}


class _HostImages:
    """A split's images in a file (a memory-mapped .npy: a folder larger than memory): each
    batch's rows are read from the file on the host (`os.preadv`, so the file's pages stay in
    the page cache instead of the process's memory), as uint8, and sent; the steps convert
    them."""

    def __init__(self, images: np.memmap, batcher: Batcher) -> None:
        self._fd = None
        if os.path.getsize(images.filename) != images.offset + images.nbytes:
            raise ValueError("a memory-mapped split must be a whole .npy file, not a slice")
        self.array, self._batcher = images, batcher
        self._fd = os.open(images.filename, os.O_RDONLY)
        self._row = int(np.prod(images.shape[1:])) * images.itemsize

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def batch(self, index: np.ndarray, labels: np.ndarray) -> dict[str, jax.Array]:
        real = index >= 0
        rows = np.zeros((len(index), *self.array.shape[1:]), self.array.dtype)
        for row, i in zip(rows, index, strict=True):
            if i >= 0:
                os.preadv(self._fd, [row], self.array.offset + int(i) * self._row)
        label = np.where(real, labels[np.maximum(index, 0)], 0).astype(np.int32)
        return self._batcher.to_global({"image": rows, "label": label, "mask": real})


def _source(images: np.ndarray, batcher: Batcher) -> _Images | _HostImages:
    """Where a split's batches come from: its file for a memory-mapped array, else a copy
    on the devices."""
    return (_HostImages if isinstance(images, np.memmap) else _Images)(images, batcher)


def _gather(images: jax.Array, index: jax.Array) -> jax.Array:
    rows = images[jnp.maximum(index, 0)].astype(jnp.float32)
    return jnp.where((index >= 0)[:, None, None, None], rows, 0)


class ArrayTrainLoader:
    """Training batches of any run of epochs from images in memory, reproducible from
    (seed, epoch); the same interface as `tfdata.TrainLoader`.

    Args:
      images: every training image, (N, S, S, 3) uint8 or float32 in [0, 255], already at the
        model's input size (resized once, as the streamed pipeline resizes every epoch); they
        are moved to the devices (every device holds all of them) with the first epoch, unless
        they are a memory-mapped file (`np.memmap`), which batches are read from.
      labels: (N,) integer labels.
      options: the global batch (`batch_size`), the run's `seed` and the `mesh`.
      drop_remainder: drop the last incomplete global batch (VTAB: the reference's drop_last);
        if False it is padded and masked.

    Each epoch's order is `np.random.default_rng(shuffle seed).permutation(N)` with the seed of
    `epoch_seeds(seed, epoch)`.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        options: LoaderOptions,
        *,
        drop_remainder: bool = True,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self._batcher = Batcher(options.batch_size, options.mesh)
        self.labels = np.asarray(labels, np.int32)
        self.num_examples, self.seed = len(labels), options.seed
        gb = self.global_batch
        self.steps_per_epoch = (self.num_examples // gb if drop_remainder
                                else math.ceil(self.num_examples / gb))  # fmt: skip
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_examples} examples do not fill one batch of {gb}")
        self._source: np.ndarray | None = images

    @property
    def global_batch(self) -> int:
        return self._batcher.global_batch

    @functools.cached_property
    def images(self) -> _Images | _HostImages:
        """The images' source (`_source`), made when the first epoch is asked for (an
        `--eval-only` run never does); a host copy put on the devices is let go then."""
        images, self._source = self._source, None
        return _source(images, self._batcher)

    def order(self, epoch: int) -> np.ndarray:
        """The example index of every row of the epoch's global batches, in order (-1 for the
        padding of a last partial batch)."""
        shuffle_seed, _ = epoch_seeds(self.seed, epoch)
        total = self.steps_per_epoch * self.global_batch
        order = np.random.default_rng(shuffle_seed).permutation(self.num_examples)[:total]
        return np.concatenate([order, np.full(total - len(order), -1, order.dtype)])

    def local_rows(self, first_epoch: int, num_epochs: int) -> Iterator[np.ndarray]:
        """This process's rows of every global batch of the epochs: the example of each row
        (-1 for padding)."""
        gb, (lo, hi) = self.global_batch, self._batcher.rows
        for epoch in range(first_epoch, first_epoch + num_epochs):
            order = self.order(epoch)
            for step in range(self.steps_per_epoch):
                yield order[step * gb + lo : step * gb + hi]

    def epochs(self, first_epoch: int, num_epochs: int) -> Iterator[dict[str, jax.Array]]:
        """The global batches of `num_epochs` epochs from `first_epoch` (0-based),
        `steps_per_epoch` per epoch, prepared ahead in a background thread."""
        rows = self.local_rows(first_epoch, num_epochs)
        return prefetch(self.images.batch(index, self.labels) for index in rows)

    def epoch(self, epoch: int) -> Iterator[dict[str, jax.Array]]:
        """The global batches of one epoch."""
        return self.epochs(epoch, 1)


class ArrayEvalLoader:
    """Evaluation batches of a split held in memory, each process over its own slice
    (`process_slice`), padded and masked; the same interface as `tfdata.EvalLoader`.

    Args:
      images: the whole split, (n, S, S, 3) uint8 or float32 in [0, 255] (every process holds
        it: on its devices, or as a memory-mapped file that batches are read from).
      labels: their labels.
      options: the global batch (`eval_batch_size`) and the `mesh`.
      process: (this process's index, the number of processes); default: JAX's.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        options: LoaderOptions,
        process: tuple[int, int] | None = None,
    ) -> None:
        self._batcher = Batcher(options.eval_batch_size, options.mesh)
        self.labels = np.asarray(labels, np.int32)
        index, count = process or (jax.process_index(), jax.process_count())
        self._slice, largest = process_slice(len(labels), index, count)
        self.num_batches = math.ceil(largest / self._batcher.local_batch)
        self.images = _source(images, self._batcher)

    def __len__(self) -> int:
        return self.num_batches

    def local_rows(self) -> Iterator[np.ndarray]:
        """This process's rows of every batch: the example of each row (-1 for padding)."""
        local = self._batcher.local_batch
        for b in range(self.num_batches):
            index = self._slice.start + np.arange(b * local, (b + 1) * local)
            yield np.where(index < self._slice.stop, index, -1)

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return prefetch(self.images.batch(index, self.labels) for index in self.local_rows())


def array_loaders(
    train: tuple[np.ndarray, np.ndarray],
    evaluation: tuple[np.ndarray, np.ndarray],
    options: LoaderOptions,
) -> tuple[ArrayTrainLoader, ArrayEvalLoader]:
    """In-memory loaders of a whole training split and a whole evaluation split."""
    return ArrayTrainLoader(*train, options), ArrayEvalLoader(*evaluation, options)
