"""Small pieces shared by the workload modules."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Output(NamedTuple):
    loss: torch.Tensor  # mean over the batch; what is backpropagated
    # Per-example values, summed by the trainer. Evaluation needs "loss" among them; in training
    # the trainer logs the mean `loss` itself and ignores a "loss" statistic.
    stats: dict[str, torch.Tensor]


def classification_output(logits: torch.Tensor, labels: torch.Tensor) -> Output:
    per_example = F.cross_entropy(logits.float(), labels, reduction="none")
    correct = (logits.argmax(dim=-1) == labels).float()
    return Output(per_example.mean(), {"loss": per_example.detach(), "correct": correct})


def classification_summary(sums: dict[str, float]) -> dict[str, float]:
    count = max(sums.get("count", 0.0), 1.0)
    return {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count}
