"""A real multi-process training run (launched by `deepspeed` in tests) that also reports what each rank saw.

RANKS_REPORT=OUT.json deepspeed --num_gpus 2 tests/train_ranks.py [pipeline/train.py flags...]

It runs pipeline/train.py's own assemble -> epoch_loop -> close, recording each rank's training labels and
final weights, and rank 0 writes them all to $RANKS_REPORT (the launcher puts --local_rank first in argv).
"""

import hashlib
import json
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch.distributed as dist  # noqa: E402

from pipeline import ending, train  # noqa: E402


def digest(tensors) -> str:
    """SHA-256 of the tensors' bytes: equal only if every value is bit-for-bit equal."""
    return hashlib.sha256(b"".join(t.detach().float().cpu().numpy().tobytes() for t in tensors)).hexdigest()


def main() -> int:
    """Assemble, train, then gather every rank's labels seen per epoch, parameters, batch-norm statistics and
    average of the weights."""
    out, argv = os.environ["RANKS_REPORT"], sys.argv[1:]
    run = train.assemble(*train.parse(argv))
    seen, read = {}, run.data.train_epoch

    def recording(epoch):
        for batch in read(epoch):
            seen.setdefault(epoch, []).extend(batch.labels.tolist())
            yield batch

    run.data.train_epoch = recording
    sinks = train.open_run_sinks(run)
    summary = train.epoch_loop(run.stepper, run.data, run.progress, run.checkpointer, run.cadence, sinks)
    module = run.engine.module
    mine = {
        # Which host (network namespace) the rank ran on, and a variable the launching host set.
        "host": os.readlink("/proc/self/ns/net"),
        "probe": os.environ.get("PIPELINE_PROBE"),
        "seen": seen,
        "params": digest(module.parameters()),
        "bn_means": digest(m.running_mean for m in module.modules() if hasattr(m, "running_mean")),
        # The average of the weights and buffers (--ema-decay), if the run keeps one.
        "ema": digest(run.components["ema"].average.module.state_dict().values()) if "ema" in run.components else None,
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"ranks": gathered, "summary": summary}, f)
    train.close(run.roll, sinks, summary, run.out)
    return 0


if __name__ == "__main__":
    ending.end_process(main())
