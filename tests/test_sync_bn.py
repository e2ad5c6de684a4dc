"""--sync-bn: batch norm over the whole global batch. On ranks without a GPU it is our CPU form of torch's
SyncBatchNorm (whose kernels are CUDA-only); two gloo ranks holding half a batch each must compute what one
process computes with the whole batch. Across hosts: tests/test_multinode.py."""

import os
import sys

import pytest
import torch

from pipeline.launch import free_port, without_launcher
from tests import procs
from tests.runs import ROOT
from tests.sync_bn_ranks import batch, layers


@pytest.mark.slow
def test_two_ranks_with_sync_bn_compute_batch_norm_over_the_whole_batch(tmp_path):
    env = {**without_launcher(os.environ), "SYNC_BN_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = procs.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(ROOT / "tests" / "sync_bn_ranks.py")], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    images, weights = batch()
    whole = layers(sync=False)
    x = images.clone().requires_grad_()
    y = whole(x)
    (y * weights).sum().backward()
    close = dict(rtol=1e-5, atol=1e-5)
    sync = [r["sync"] for r in ranks]
    assert {s["kind"] for s in sync} == {"CpuSyncBatchNorm"}
    # Forward: each rank's outputs are the whole batch's batch norm of its half; the statistics are the whole batch's.
    torch.testing.assert_close(torch.cat([s["y"] for s in sync]), y.detach(), **close)
    for s in sync:
        torch.testing.assert_close(s["running_mean"], whole[1].running_mean, **close)
        torch.testing.assert_close(s["running_var"], whole[1].running_var, **close)
    # Backward: input gradients are the whole batch's, and the ranks' weight gradients sum (DeepSpeed's all-reduce)
    # to the whole batch's.
    torch.testing.assert_close(torch.cat([s["x_grad"] for s in sync]), x.grad, **close)
    torch.testing.assert_close(sync[0]["w_grad"] + sync[1]["w_grad"], whole[0].weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(sync[0]["gamma_grad"] + sync[1]["gamma_grad"], whole[1].weight.grad, **close)
    # Evaluation uses the running statistics, as plain batch norm does.
    whole.eval()
    torch.testing.assert_close(torch.cat([s["eval_y"] for s in sync]), whole(images).detach(), **close)
    # Without it (the default, Goyal et al.'s), each rank normalises with its own half's statistics.
    own = [r["own"] for r in ranks]
    assert {o["kind"] for o in own} == {"BatchNorm2d"}
    assert not torch.allclose(own[0]["running_mean"], own[1]["running_mean"])
    assert not torch.allclose(torch.cat([o["y"] for o in own]), y.detach(), **close)
