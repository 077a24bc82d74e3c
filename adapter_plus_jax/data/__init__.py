"""Input pipelines (tf.data on the host, sharded jax arrays out) and the datasets of the paper.

- `pipeline`: batching shared by every dataset (`LoaderOptions`, the mesh, TrainLoader,
  EvalLoader, the TF1 resize);
- `tfds_io`: TFDS builders pinned to the recipe's versions, splits, any TFDS split's loaders;
- `vtab`, `fgvc`, `folder`, `demo`: the VTAB-1k task table, FGVC, image folders of your own,
  and the offline digits dataset;
- `registry`: dataset name -> class count and loaders, as the runner uses them;
- `prepare`: `apj data prepare --tasks all` downloads and prepares.

The recipe they follow is docs/recipe.md.
"""
