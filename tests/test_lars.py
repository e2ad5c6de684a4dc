"""LARS through the DeepSpeed engine: layer-wise trust ratio on conv/linear weights, plain lr on BN and biases."""

import pytest
import torch

from pipeline import deepspeed_json, engine, loss_scale
from tests.models import constant_schedule


@pytest.mark.parametrize(
    "mode", [{}, {"torch_autocast": {"enabled": True, "dtype": "fp16"}}], ids=["fp32", "autocast-fp16"]
)
def test_first_lars_step_is_the_clipped_trust_ratio_update(process_group, mode):
    """In fp32, and under autocast fp16 with torch's GradScaler (the step sees the unscaled gradients)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd, trust = 0.5, 1e-4, 0.02
    s = constant_schedule(lr, total_steps=10, steps_per_epoch=5)
    sgd = {"lr": lr, "momentum": 0.9, "nesterov": True, "weight_decay": wd}
    ds = {"train_batch_size": 6, "train_micro_batch_size_per_gpu": 6, "optimizer": {"type": "SGD", "params": sgd},
          **mode}  # fmt: skip
    ds, _ = deepspeed_json.configure(ds, "test.json", 1, cuda=False, allow_cpu=True)
    eng = engine.build(model, deepspeed_json.with_schedule(ds, s), s, optimizer="lars", lars_trust=trust)
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = torch.nn.functional.cross_entropy(eng(x).float(), y)
    eng.backward(loss)
    scale = loss_scale.LossScale(eng).now()[0]
    assert float(scale) == (2.0**16 if mode else 1.0)
    grads = {n: p.grad.detach().float() / float(scale) for n, p in eng.module.named_parameters()}
    eng.step()
    for name, p in eng.module.named_parameters():
        w, g = before[name], grads[name]
        if p.ndim > 1:  # conv/linear weights: decayed, and the layer's lr clipped by the trust ratio
            layer_lr = min(lr, trust * w.norm().item() / (g.norm().item() + wd * w.norm().item()))
            g = g + wd * w
        else:  # BN and biases: no decay, the global lr
            layer_lr = lr
        # First step: the momentum buffer is the gradient, so Nesterov moves by (1 + momentum) * g.
        assert torch.allclose(p.detach(), w - layer_lr * 1.9 * g, atol=1e-6), name
    assert any(min(lr, trust * before[n].norm() / grads[n].norm()) < lr for n in before if before[n].ndim > 1)
