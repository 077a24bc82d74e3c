"""Input pipelines (tf.data on the host, sharded jax arrays out) and the datasets of the paper.

- `pipeline`: batching shared by every dataset (mesh, TrainLoader, EvalLoader, TF1 resize);
- `tfds_io`: TFDS builders pinned to the recipe's versions, splits, any TFDS split's loaders;
- `vtab`, `fgvc`, `demo`: the VTAB-1k task table, FGVC, and the offline digits dataset;
- `registry`: dataset name -> class count and loaders, as the runner uses them;
- `prepare`: `python -m adapter_plus_jax.data prepare --tasks all` downloads and prepares.

The recipe they follow is docs/recipe.md.
"""
