"""The CNN's `loss.label_smoothing` (issue 24's record profile): it changes the loss that is
backpropagated in training only; the per-example loss that is logged and evaluated stays the plain
cross-entropy, and evaluation (eval mode) ignores the setting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dltrain.api import load
from dltrain.plugin import classification_output
from dltrain.recipe import RecipeError
from dltrain.workloads import cnn


def test_the_training_loss_is_smoothed_and_the_statistics_are_not():
    torch.manual_seed(0)
    logits, labels = torch.randn(32, 10), torch.randint(0, 10, (32,))
    plain = classification_output(logits, labels)
    smoothed = classification_output(logits, labels, 0.1)
    by_hand = (-(0.9 * F.one_hot(labels, 10) + 0.01) * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(smoothed.loss, by_hand)
    assert not torch.allclose(smoothed.loss, plain.loss)
    assert torch.equal(smoothed.stats["loss"], plain.stats["loss"])
    assert torch.equal(smoothed.stats["correct"], plain.stats["correct"])


def test_the_cnn_smooths_in_training_mode_only():
    recipe = cnn.Recipe(workload="cnn", loss={"label_smoothing": 0.2})
    model = cnn.build_model(recipe)
    assert "label_smoothing" not in model.state_dict()
    batch = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with torch.no_grad():
        logits = model(batch[0])
        expect_train = F.cross_entropy(logits, batch[1], label_smoothing=0.2)
        expect_eval = F.cross_entropy(logits, batch[1])
        torch.testing.assert_close(cnn.forward(model, batch).loss, expect_train)
        model.eval()
        torch.testing.assert_close(cnn.forward(model, batch).loss, expect_eval)
        model.train()
        wrapped = torch.nn.Module()  # what DDP and DeepSpeed look like: the Net as `.module`
        wrapped.module = model
        wrapped.forward = model.forward
        torch.testing.assert_close(cnn.forward(wrapped, batch).loss, expect_train)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_label_smoothing_outside_zero_to_one_is_refused(value):
    with pytest.raises(RecipeError, match="label_smoothing"):
        load({"workload": "cnn", "loss": {"label_smoothing": value}})
