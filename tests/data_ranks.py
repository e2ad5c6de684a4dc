"""One rank of a real multi-process read (run by torchrun in tests): what each rank saw, gathered on rank 0.

torchrun --nproc_per_node 2 tests/data_ranks.py DATA_DIR OUT.json
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from pipeline import ending
from pipeline.data import DataConfig, ImageNetData
from pipeline.data.shards import IGNORE


def main() -> None:
    """Read one training epoch and one validation pass with an all-reduce per step, like training does."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = DataConfig(sys.argv[1], batch_size=4, crop_size=32, val_resize=36, data_device="cpu", data_threads=1)
    data = ImageNetData(config, rank=rank, world_size=world)
    seen = {"train": [], "validation": []}
    for split, batches in (("train", data.train_epoch(0)), ("validation", data.validation())):
        for batch in batches:
            # A collective per step: unequal step counts would hang here, as they would in training.
            dist.all_reduce(torch.ones(1))
            seen[split].append(batch.labels.tolist())
    counted = torch.tensor([sum(x != IGNORE for b in seen["validation"] for x in b)])
    dist.all_reduce(counted)
    gathered = [None] * world
    dist.all_gather_object(gathered, seen)
    if rank == 0:
        with open(sys.argv[2], "w") as f:
            json.dump({"ranks": gathered, "validation_counted": int(counted), "world": world}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    ending.end_process(0)
