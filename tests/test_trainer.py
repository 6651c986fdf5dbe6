"""Training-core choices that change speed but must not change what is trained."""

from __future__ import annotations

import torch

from conftest import RECIPES
from dltrain.recipe import load_recipe
from dltrain.trainer import build_optimizer


def test_fused_optimizer_by_default_not_under_deepspeed_and_overridable():
    params = [torch.nn.Parameter(torch.zeros(3))]
    adam = load_recipe(RECIPES / "cnn_mnist.yaml").optim
    assert build_optimizer(adam, params).defaults["fused"] is True
    assert not build_optimizer(adam, params, deepspeed=True).defaults["fused"]
    off = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=["optim.fused=false"]).optim
    assert not build_optimizer(off, params).defaults["fused"]
    sgd = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=["optim.name=sgd"]).optim
    assert isinstance(build_optimizer(sgd, params), torch.optim.SGD)


def test_fused_and_unfused_adamw_take_the_same_steps():
    torch.manual_seed(0)
    start = torch.randn(1000)
    grads = [torch.randn(1000) for _ in range(5)]
    cfg = load_recipe(RECIPES / "bert_sst2_minilm.yaml").optim
    results = []
    for fused in (True, False):
        p = torch.nn.Parameter(start.clone())
        opt = build_optimizer(cfg.model_copy(update={"fused": fused}), [p])
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append(p.detach())
    assert torch.allclose(results[0], results[1], rtol=0, atol=1e-6), (results[0] - results[1]).abs().max()
