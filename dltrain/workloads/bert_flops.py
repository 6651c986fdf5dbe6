"""The BERT workload's training FLOPs: per token from the model config (frozen layers counted as
forward-only), per sample as the original padded to max_length, and per logged window from its
summed token statistics. dltrain.workloads.bert registers them with the workload."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dltrain.workloads.bert import ModelConfig, Recipe


def flops_per_token(config, seq_len: float, model: ModelConfig | None = None) -> float:
    """Training FLOPs per token, PaLM appendix B: 6 N + 12 L d T, where N counts the weights of the
    encoder layers, pooler and classifier (embeddings are lookups, not matmuls), L layers, d the
    hidden size, T the sequence length (the 12 L d T term is QK^T and attention x V, forward and
    backward).

    Frozen parts (`model`'s freeze_embeddings, freeze_layers): the first freeze_layers layers run
    forward only, a third of their share, and the first trained layer's Q, K and V projections
    compute no input gradient (2 d^2 each), as nothing below them is trained."""
    d, L, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_layer = 4 * d * d + 2 * d * ff  # Q, K, V, output projections; two feed-forward matmuls
    n = L * per_layer + d * d + d * config.num_labels  # + pooler + classifier
    flops = 6 * n + 12 * L * d * seq_len
    if model is not None and model.freeze_embeddings:
        flops -= model.freeze_layers * 4 * (per_layer + 2 * d * seq_len) + 3 * 2 * d * d
    return flops


@functools.lru_cache(maxsize=8)
def _cached_config(name_or_path: str, num_labels: int):
    """model_config once per model: flops_of runs at every log record."""
    from dltrain.workloads import bert  # looked up at call time: bert imports this module

    return bert.model_config(bert.ModelConfig(name_or_path=name_or_path, num_labels=num_labels))


def flops_per_sample(recipe: Recipe) -> int:
    """flops_per_token x T with T = data.max_length, i.e. every example padded to max_length as in
    the original. With dynamic or bucket padding the work done is smaller: see flops_of."""
    T = recipe.data.max_length
    config = _cached_config(recipe.model.name_or_path, recipe.model.num_labels)
    return T * flops_per_token(config, T, recipe.model)


def flops_of(recipe: Recipe, sums: dict[str, float]) -> dict[str, float]:
    """Training FLOPs of a logged window from its summed per-example statistics (`count`,
    `tokens`, `padded_tokens`): "flops" counts the padded tokens (the work done), "flops_real"
    the real ones (the work a padding-free run would do).

    Approximation: the attention term grows with T^2 per example; taking each basis's mean length
    T_mean for all examples gives tokens x flops_per_token(T_mean) = 6 N tokens + 12 L d
    (sum T)^2 / count, which is exact when every example has the same T (fixed padding, or one
    micro-batch's padded length) and otherwise under-counts attention by 12 L d count var(T).
    """
    count = sums.get("count", 0.0)
    if count <= 0:
        return {"flops": 0.0, "flops_real": 0.0}
    config = _cached_config(recipe.model.name_or_path, recipe.model.num_labels)
    padded, real = sums["padded_tokens"], sums["tokens"]
    return {
        "flops": padded * flops_per_token(config, padded / count, recipe.model),
        "flops_real": real * flops_per_token(config, real / count, recipe.model),
    }
