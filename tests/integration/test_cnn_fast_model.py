"""The CNN's speed keys (issue 24), which only the record profiles set: model.channels_last (the
same CNN in NHWC memory format computes what the NCHW one does, and its runs checkpoint, export and
resume as the plain model's do: safetensors takes only contiguous tensors, the channels_last conv
weights are not) and model.pool_before_relu (the same function and gradients, bit for bit)."""

from __future__ import annotations

import pytest
import torch

from dltrain.recipe import load_recipe
from dltrain.workloads import cnn
from resume_helpers import TINY, losses, params, train


def test_channels_last_model_computes_what_the_plain_one_does():
    torch.manual_seed(0)
    cfg = cnn.ModelConfig()
    plain = cnn.Net(cfg)
    recipe = load_recipe(TINY[0], "fast")
    assert recipe.model.channels_last and not load_recipe(TINY[0], "cpu_test").model.channels_last
    nhwc = cnn.build_model(recipe)
    nhwc.load_state_dict(plain.state_dict())  # a copy into the channels_last parameters: keeps their strides
    conv2 = nhwc.features[3].weight
    assert conv2.is_contiguous(memory_format=torch.channels_last) and not conv2.is_contiguous()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for model in (plain, nhwc):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(nhwc(x), plain(x), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
        assert b.grad.stride() == b.stride(), name  # gradients (and so Adam's state) share the format


@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_before_relu_is_the_same_function_and_gradients_bit_for_bit(channels_last):
    torch.manual_seed(0)
    seed_order = cnn.Net(cnn.ModelConfig())
    swapped = cnn.Net(cnn.ModelConfig(pool_before_relu=True))
    assert [type(m) for m in swapped.features][1:3] == [torch.nn.MaxPool2d, torch.nn.ReLU]
    swapped.load_state_dict(seed_order.state_dict(), strict=True)  # the same keys and shapes
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    x[:, :, :8] = -1.0  # windows whose pre-activations are all <= 0 as well as ties
    outputs = []
    for model in (seed_order, swapped):
        if channels_last:
            model.to(memory_format=torch.channels_last)
        logits = model(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        outputs.append((logits, [p.grad for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = outputs
    assert torch.equal(a, b)
    assert all(torch.equal(ga, gb) for ga, gb in zip(grads_a, grads_b))


@pytest.mark.slow
def test_a_channels_last_run_saves_loadable_weights_and_resumes_bit_identical(tmp_path):
    """Checkpoints and the export are written (safetensors refuses non-contiguous tensors), load
    into the plain model, and a resume from a checkpoint (optimizer state in channels_last)
    continues bit-identically."""
    from safetensors.torch import load_file

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    done = train(full, "--set", "model.channels_last=true")
    assert done.returncode == 0, done.stderr[-3000:]
    overrides = [s for flag, s in zip(TINY, TINY[1:]) if flag == "--set" and s.startswith("model.")]
    plain = cnn.Net(load_recipe(TINY[0], "cpu_test", overrides).model)
    for path in (full / "final_model", full / "checkpoints" / "step_16"):
        weights = load_file(str(path / "model.safetensors"))
        assert all(t.is_contiguous() for t in weights.values())
        plain.load_state_dict(weights, strict=True)
    step_16 = full / "checkpoints" / "step_16"
    again = train(resumed, "--set", "model.channels_last=true", "--resume", str(step_16))
    assert again.returncode == 0, again.stderr[-3000:]
    la, lb = losses(full), losses(resumed)
    assert sorted(lb) == [17, 18, 19, 20] and all(lb[s] == la[s] for s in lb)
    pa, pb = params(full), params(resumed)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
