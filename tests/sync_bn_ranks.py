"""Each rank of a gloo group (torchrun in tests) runs its half of one batch through a conv and a --sync-bn batch
norm, and writes its outputs, input and weight gradients and running statistics to $SYNC_BN_OUT/rank<N>.pt."""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from pipeline import ending  # noqa: E402
from pipeline.model import sync_batch_norm  # noqa: E402


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch (8 images, far from zero mean) and per-output weights of the loss."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 6, 6, generator=g) * 3 + 5
    return images, torch.randn(8, 4, 4, 4, generator=g)


def layers(sync: bool) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    return sync_batch_norm(model, cuda=False) if sync else model


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images, weights = batch()
    share = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
    out = {}
    for sync in (True, False):
        model = layers(sync)
        x = images[share].clone().requires_grad_()
        y = model(x)
        (y * weights[share]).sum().backward()
        model.eval()
        out["sync" if sync else "own"] = {
            "kind": type(model[1]).__name__, "y": y.detach(), "x_grad": x.grad, "w_grad": model[0].weight.grad,
            "gamma_grad": model[1].weight.grad, "running_mean": model[1].running_mean,
            "running_var": model[1].running_var, "eval_y": model(images[share]).detach(),
        }  # fmt: skip
    torch.save(out, os.path.join(os.environ["SYNC_BN_OUT"], f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    ending.end_process(0)
