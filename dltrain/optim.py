"""Optimizer and learning-rate schedule, as the Hugging Face ecosystem builds them.

Weight decay: with AdamW (by default; `optim.no_decay_bias_norm` turns the rule on or off for any
optimizer) biases and the weights of normalization layers (LayerNorm, BatchNorm, GroupNorm,
RMSNorm) go to a parameter group without weight decay, as the HF Trainer and nanoGPT do: decaying a
LayerNorm gain towards zero pulls the layer's output scale down, which is not regularization.

Schedules: `transformers.get_scheduler` (linear, cosine, constant_with_warmup, ...), counted in
optimizer steps, so a schedule is the same whatever the world size. `none` is a constant LR and
`linear_warmup` is dltrain's own (kept for its numbers: the golden loss curves and the records):
the LR rises as (step + 1) / (warmup + 1), so the first step already moves, then decays linearly
to zero at the last step.
"""

from __future__ import annotations

import torch
from torch import nn

from dltrain.recipe import RecipeError

# transformers.get_scheduler's names that need only the warm-up and the total length.
HF_SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
SCHEDULES = ("none", "linear_warmup", *HF_SCHEDULES)

# torch's normalization layers; a module whose class name ends in "Norm" (e.g. a model's own
# RMSNorm, T5LayerNorm) counts too, as transformers' rule matches by name.
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that take no weight decay: biases and normalization weights."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORMS) or type(module).__name__.lower().endswith("norm")
        for param_name, _ in module.named_parameters(recurse=False):
            if is_norm or param_name == "bias":
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def decays_bias_and_norm(cfg) -> bool:
    """Whether biases and norms are decayed like the other weights (the rule is off)."""
    rule = cfg.no_decay_bias_norm if cfg.no_decay_bias_norm is not None else cfg.name == "adamw"
    return not rule or cfg.weight_decay == 0


def param_groups(cfg, model_or_params) -> list:
    """A model's trained parameters (frozen ones, requires_grad false, are left out) in (up to) two
    groups, the second marked `no_decay` with weight decay 0; a plain list of parameters (or a model
    under a rule that is off) stays one group."""
    if not isinstance(model_or_params, nn.Module):
        return list(model_or_params)
    trained = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
    if decays_bias_and_norm(cfg):
        return [p for _, p in trained]
    skip = no_decay_names(model_or_params)
    decay = [p for n, p in trained if n not in skip]
    plain = [p for n, p in trained if n in skip]
    groups = [{"params": decay}] if decay else []
    return groups + ([{"params": plain, "weight_decay": 0.0, "no_decay": True}] if plain else [])


def build_optimizer(cfg, model_or_params, *, fused_default: bool = True):
    """torch's fused implementations by default: one kernel over all parameters instead of a dozen
    ops per tensor (several times faster for MiniLM's 22M parameters on a CPU), and the same
    arithmetic up to rounding."""
    fused = {"fused": True} if use_fused(cfg, fused_default) else {}
    params = param_groups(cfg, model_or_params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **fused)


def use_fused(cfg, fused_default: bool = True) -> bool:
    """`optim.fused`, else the backend's default (off where an engine steps the optimizer itself)."""
    return cfg.fused if cfg.fused is not None else fused_default


def warmup_steps(cfg, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_fraction * total_steps)


def build_scheduler(cfg, optimizer, total_steps: int):
    """A LambdaLR (dltrain.resume_rules re-evaluates its lambdas when a resume changes the schedule)."""
    if cfg.name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = warmup_steps(cfg, total_steps)
    if cfg.name == "polynomial" and warmup >= total_steps:  # transformers' decay divides by the steps after warm-up
        raise RecipeError(
            f"schedule.name=polynomial decays over the steps after the warm-up, and the warm-up "
            f"({warmup} steps) covers all {total_steps}: lower schedule.warmup_fraction or warmup_steps"
        )
    if cfg.name == "linear_warmup":

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    try:
        from transformers import get_scheduler
    except ImportError:
        raise RecipeError(
            f"schedule.name={cfg.name} comes from transformers.get_scheduler, which is not installed: "
            "pip install transformers (or use schedule.name=linear_warmup or none)"
        ) from None
    return get_scheduler(cfg.name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
