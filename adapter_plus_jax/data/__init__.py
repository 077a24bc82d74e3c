"""Input pipelines (sharded jax arrays out) and the datasets of the paper.

- `pipeline`: batching shared by every dataset (`LoaderOptions`, the mesh), and the in-memory
  loaders that need no TensorFlow (the demo, image folders, the VTAB-1k training splits);
- `tfdata`: the streamed tf.data loaders (TrainLoader, EvalLoader, TF's resize);
- `tfds_io`: TFDS builders pinned to the recipe's versions, splits, any TFDS split's loaders;
- `vtab`, `vtab_loaders`, `fgvc`, `folder`, `demo`: the VTAB-1k task table and loaders, FGVC,
  image folders of your own, and the offline digits dataset;
- `registry`: dataset name -> class count and loaders, as the runner uses them;
- `prepare`: `apj data prepare --tasks all` downloads and prepares.

The recipe they follow is docs/recipe.md.
"""
