"""Raw ImageNet folder -> verified, class-mixed, DALI-ready TFRecord shards (TensorFlow ImageNet schema)."""
