"""model.freeze_embeddings / model.freeze_layers: the frozen parameters get no gradient, no optimizer
state and no update, autograd stops at the first trained layer, and flops_per_token counts what the
step then does (checked against torch's FLOP counter on MiniLM). Seconds on a CPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import RECIPES
from dltrain.optim import build_optimizer
from dltrain.recipe import RecipeError, load_recipe
from dltrain.workloads import bert


def minilm_recipe(minilm_dir, *overrides):
    return load_recipe(RECIPES / "bert_sst2_minilm.yaml", "cpu_test", [f"model.name_or_path={minilm_dir}", *overrides])


def frozen(minilm_dir, layers: int):
    return minilm_recipe(minilm_dir, "model.freeze_embeddings=true", f"model.freeze_layers={layers}")


def batch(rows: int = 4, length: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, 5000, (rows, length), generator=g),
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
        "labels": torch.tensor([0, 1] * (rows // 2)),
    }


def test_frozen_layers_need_frozen_embeddings(minilm_dir):
    with pytest.raises(RecipeError, match="model.freeze_embeddings=true"):
        minilm_recipe(minilm_dir, "model.freeze_layers=1")


def test_freezing_every_layer_is_refused_with_the_most_allowed(minilm_dir):
    with pytest.raises(RecipeError, match="model.freeze_layers=6 .* at most 5"):
        bert.build_model(frozen(minilm_dir, 6))


def test_frozen_parameters_get_no_gradient_state_or_update(minilm_dir):
    recipe = frozen(minilm_dir, 2)
    torch.manual_seed(0)
    model = bert.build_model(recipe).train()
    names = {n for n, p in model.named_parameters() if not p.requires_grad}
    frozen_prefixes = ("bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1.")
    assert names and all(n.startswith(frozen_prefixes) for n in names)
    assert any(n.startswith("bert.encoder.layer.1.") for n in names)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("bert.encoder.layer.2."))

    optimizer = build_optimizer(recipe.optim, model)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bert.forward(model, batch()).loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if n in names:
            assert p.grad is None and torch.equal(p, before[n]), n
    changed = [n for n, p in model.named_parameters() if n not in names and not torch.equal(p, before[n])]
    assert any(n.startswith("bert.encoder.layer.2.") for n in changed)
    assert len(optimizer.state) == len(in_optimizer)


def counted_flops(model, rows: int, length: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        bert.forward(model.train(), batch(rows, length)).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@pytest.mark.parametrize("layers", [0, 2])
def test_flops_per_token_counts_what_freezing_saves(minilm_dir, layers):
    """The formula's pooler and classifier are counted per token (a slight over-count), so the
    check is on what freezing takes away: counted (all trained) - counted (frozen) must equal
    the formula's difference, token for token."""
    rows, length = 4, 16
    trained_recipe, frozen_recipe = minilm_recipe(minilm_dir), frozen(minilm_dir, layers)
    torch.manual_seed(0)
    model = bert.build_model(trained_recipe)
    saved = counted_flops(model, rows, length)
    bert.freeze(model, frozen_recipe.model)
    saved -= counted_flops(model, rows, length)
    config = bert.model_config(trained_recipe.model)
    per_token = bert.flops_per_token(config, length) - bert.flops_per_token(config, length, frozen_recipe.model)
    assert saved > 0
    assert saved == rows * length * per_token
