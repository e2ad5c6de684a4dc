"""Reading the shards and training on them: the DALI input pipeline and the DeepSpeed engine."""
