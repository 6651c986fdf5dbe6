"""One process, or DDP over several: Accelerate wraps the model (DistributedDataParallel with the
recipe's `distributed` settings when there are several processes) and, for fp16, the optimizer
with a GradScaler. The same code on a CPU (gloo) and a GPU (NCCL)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dltrain.strategy.base import OptimizerFactory, Strategy, apply_compile, guarded_step


class DDP(Strategy):
    name = "ddp"

    @classmethod
    def accelerator_kwargs(cls, recipe, plan, world: int, device_type: str) -> dict:
        return {"kwargs_handlers": [ddp_kwargs(recipe.distributed)]} if world > 1 else {}

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        if self.recipe.train.compile.enabled:
            apply_compile([model], self.recipe.train.compile)
        optimizer = make_optimizer(model)
        # The scheduler is not given to Accelerate: its wrapper would step it once per process, and
        # reload it with weights_only=False; the loop steps it and dltrain.checkpoint stores it.
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scaler = getattr(self.optimizer, "scaler", None)
        # Accelerate's optimizer wrapper does work of its own only with a GradScaler (fp16);
        # otherwise its step() and zero_grad() call the wrapped optimizer's after package lookups
        # that cost tens of microseconds per step, several percent of a 1 ms step. Call it directly.
        self._inner = self.optimizer if self.scaler is not None else self.optimizer.optimizer
        # Likewise Accelerator.backward divides the loss by the accumulation steps, a graph node
        # even when that is 1; without accumulation or a scaler it is loss.backward().
        self._plain_backward = self.scaler is None and self.plan.grad_accum == 1

    def stepped_optimizer(self):
        return self._inner

    def backward(self, loss: torch.Tensor) -> None:
        if self._plain_backward:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def step(self, loss_sum: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        clip = self.recipe.train.clip_grad_norm
        if self.scaler is not None:
            return self._scaled_step(loss_sum, clip)
        # Without a scaler Accelerate's clip is torch's (it has nothing to unscale).
        return guarded_step(self._inner, self.model.parameters() if clip else (), loss_sum, clip)

    def _scaled_step(self, loss_sum: torch.Tensor, clip: float | None) -> list[tuple[str, torch.Tensor]]:
        """fp16: the GradScaler skips a step whose gradients hold inf/NaN by itself (on the device
        for a fused optimizer). A skip is seen from the scale going down, read at the next sync
        point; a non-finite loss is counted as that, not also as a skip."""
        if clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), clip)  # unscales first
        before = self.scaler._get_scale_async().clone()  # a device tensor; get_scale() would read it
        self._inner.step()
        finite = torch.isfinite(loss_sum).float()
        return [("nonfinite", 1.0 - finite), ("skipped", scale_dropped(self.scaler, before) * finite)]

    def zero_grad(self) -> None:
        self._inner.zero_grad(set_to_none=True)

    def module(self) -> nn.Module:
        model = self.model
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        return model

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module().state_dict()

    def save(self, path: Path) -> None:
        self.accelerator.save_state(str(path), safe_serialization=True)

    def load(self, path: Path) -> None:
        self.accelerator.load_state(str(path), load_kwargs={"weights_only": True})

    def describe(self) -> str | None:
        model = self.model
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            return None
        hooks = [getattr(h, "__name__", type(h).__name__) for h, _ in getattr(model, "_comm_hooks", [])] or ["none"]
        return (
            f"DDP: bucket_cap {model.bucket_bytes_cap / 2**20:g} MB, gradient_as_bucket_view "
            f"{model.gradient_as_bucket_view}, static_graph {model.static_graph}, find_unused_parameters "
            f"{model.find_unused_parameters}, comm hook {', '.join(hooks)}"
        )


def scale_dropped(scaler, scale_before: torch.Tensor) -> torch.Tensor:
    """1.0 (on the device) when the GradScaler's update lowered the scale: it found inf/NaN
    gradients and the step was skipped. GradScaler always calls a fused optimizer's step (the
    kernel skips), so Accelerate's `step_was_skipped` never fires; the scale tells."""
    return (scaler._get_scale_async() < scale_before).float()


def ddp_kwargs(dist):
    """torch DDP's settings from the recipe's `distributed` section; Accelerate passes them to
    DistributedDataParallel and registers the compression hook on the wrapped model."""
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    hook = {
        "none": DDPCommunicationHookType.NO,
        "bf16": DDPCommunicationHookType.BF16,
        "fp16": DDPCommunicationHookType.FP16,
    }[dist.comm_hook]
    return DistributedDataParallelKwargs(
        bucket_cap_mb=dist.bucket_cap_mb,
        gradient_as_bucket_view=dist.gradient_as_bucket_view,
        static_graph=dist.static_graph,
        find_unused_parameters=dist.find_unused_parameters,
        comm_hook=hook,
    )
