"""One rank of the 2-rank numerics check (torchrun in tests/test_numerics.py): every precision mode's first
optimizer steps through our engine on this rank's half of each batch, then one gradient all-reduce of known fp32
batch-norm gradients per 16-bit wrapper; rank 0 writes it all to $NUMERICS_OUT."""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from bench.fp16_cpu_train import allow_fp16_on_the_cpu_accelerator  # noqa: E402
from pipeline import ending, engine  # noqa: E402
from tests import oracle  # noqa: E402


def batch_norm_all_reduce(mode: str, rank: int, fitted: bool) -> dict[str, torch.Tensor]:
    """The all-reduced gradients of the batch-norm weights after each rank set its own, 1 + k * 2^-20 (rank 0) and
    3 + k * 2^-20 (rank 1): exact in fp32, not in 16 bits. `fitted`: the configuration as train.py runs it; else
    without the communication_data_type that deepspeed_json.configure adds (DeepSpeed's default)."""
    ds, _ = oracle.ds_config(mode, world=2, accum=1)
    if not fitted:
        ds.pop("communication_data_type")
    eng = engine.build(oracle.initial_model(), ds, oracle.SCHEDULE)
    norms = {name: p for name, p in eng.module.named_parameters() if name.startswith("1.")}
    for p in eng.module.parameters():
        p.grad = torch.zeros_like(p)
    for p in norms.values():
        p.grad = 1 + 2 * rank + torch.arange(p.numel(), dtype=torch.float32) * 2**-20
    eng.allreduce_gradients()
    return {name: p.grad.clone() for name, p in norms.items()}


def main() -> None:
    allow_fp16_on_the_cpu_accelerator()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    results = {
        f"{mode}-{accum}": oracle.engine_steps(mode, rank, world=2, accum=accum)
        for mode in oracle.MODES
        for accum in (1, 2)
    }
    for mode in ("fp16", "bf16"):
        for fitted in (True, False):
            results[f"all-reduce-{mode}-{'fitted' if fitted else 'default'}"] = batch_norm_all_reduce(
                mode, rank, fitted
            )
    if rank == 0:
        torch.save(results, os.environ["NUMERICS_OUT"])


if __name__ == "__main__":
    main()
    ending.end_process(0)
