"""The on-disk format of a shard set, in one place: what `data_prep` writes and `pipeline` reads.

- `tfrecord`: TFRecord framing (length, masked CRC-32C) and DALI's index lines.
- `example`: tf.train.Example and the TensorFlow ImageNet feature schema.
- `layout`: the folder's names: splits, shard series (`train-00000-of-01024`), `.idx` files, `manifest.json`,
  `labels.txt`, and the TensorFlow label convention of shards without a manifest.
- `manifest`: `manifest.json`, read through one typed loader.
- `atomic`: crash-safe writes (write, fsync, rename).
- `check`: re-reading a shard against all of the above (data_prep.verify, and training's search for a record
  DALI could not read).
"""
