"""Training-core choices that change speed but must not change what is trained."""

from __future__ import annotations

import torch

from conftest import RECIPES
from dltrain.optim import build_optimizer
from dltrain.recipe import load_recipe


def test_fused_optimizer_by_default_not_under_deepspeed_and_overridable():
    params = [torch.nn.Parameter(torch.zeros(3))]
    adam = load_recipe(RECIPES / "cnn_mnist.yaml").optim
    assert build_optimizer(adam, params).defaults["fused"] is True
    assert not build_optimizer(adam, params, fused_default=False).defaults["fused"]
    from dltrain.strategy import DDP, FSDP, DeepSpeed

    assert DDP.fused_optimizer and FSDP.fused_optimizer and not DeepSpeed.fused_optimizer
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


def test_a_skipped_fp16_step_is_seen_from_the_scale_with_a_fused_optimizer():
    """GradScaler always calls a fused optimizer's step (the kernel skips the update itself), so
    a wrapper that waits for step() not to be called never sees the skip; the scale's decrease does."""
    from dltrain.strategy.ddp import scale_dropped

    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([p], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    flags = []
    for planted in (False, True, False):
        loss = (p * 2).sum()
        scaler.scale(loss).backward()
        if planted:
            p.grad[1] = float("inf")
        before_step, before = p.detach().clone(), scaler._get_scale_async().clone()
        scaler.step(opt)
        scaler.update()
        flags.append(scale_dropped(scaler, before).item())
        assert torch.equal(p.detach(), before_step) == planted  # the planted inf left the weights alone
        opt.zero_grad(set_to_none=True)
    assert flags == [0.0, 1.0, 0.0]


def test_a_nonfinite_loss_skips_the_fused_update_on_the_device():
    """The loop's guard: found_inf from the loss, no host read, no update, no step count."""
    for name in ("adam", "adamw", "sgd"):
        cfg = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=[f"optim.name={name}"]).optim
        p = torch.nn.Parameter(torch.ones(3))
        opt = build_optimizer(cfg, [p])
        p.grad = torch.ones(3)
        opt.found_inf = (~torch.isfinite(torch.tensor(float("nan")))).float()
        opt.step()
        assert torch.equal(p.detach(), torch.ones(3)), name
        opt.found_inf = (~torch.isfinite(torch.tensor(1.0))).float()
        opt.step()
        assert not torch.equal(p.detach(), torch.ones(3)), name


def compiles_whole(forward, model, batch) -> bool:
    """torch.compile with fullgraph=True (any graph break raises) and the eager backend (dynamo's
    tracing only: seconds, not inductor's minutes); forward and backward run. `torch._dynamo.explain`
    is not enough: it reported 0 breaks for the RNN, which fullgraph then refused."""
    torch._dynamo.reset()
    torch._dynamo.config.allow_rnn = True  # as the loop sets it for train.compile
    compiled = torch.compile(forward, fullgraph=True, backend="eager", dynamic=False)
    out = compiled(model, batch)
    out.loss.backward()
    return torch.allclose(out.loss, forward(model, batch).loss)


def test_cnn_and_rnn_training_forward_compile_without_graph_breaks():
    from dltrain.workloads import cnn, rnn

    torch.manual_seed(0)
    for workload, recipe_file, batch in (
        (cnn, "cnn_mnist.yaml", (torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))),
        (rnn, "rnn_sine.yaml", (torch.randn(8, 10, 1), torch.randn(8))),
    ):
        model = workload.build_model(load_recipe(RECIPES / recipe_file, "cpu_test")).train()
        assert compiles_whole(workload.forward, model, batch), recipe_file


def test_the_schedule_follows_the_optimizer_steps_without_torchs_order_warning(tmp_path):
    """The DDP backend steps the inner torch optimizer (not Accelerate's wrapper), so the scheduler is
    built on that one: torch then sees each step() before the schedule's and warns of nothing."""
    import warnings

    from dltrain.api import train

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(
            RECIPES / "rnn_sine.yaml",
            profile="fast",
            output_dir=tmp_path / "run",
            sets=["train.max_steps=3", "train.eval_every=3", "tracking.trackers=[]"],
        )
    assert result.summary["steps"] == 3
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
