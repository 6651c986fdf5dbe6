"""The interface every backend implements, and what they share.

A strategy owns what differs between one process or DDP, FSDP2 and DeepSpeed: wrapping the model
and optimizer and where compile goes, backward and the optimizer step with its rule for a
non-finite step, the full state dict that exports read, sharded save and load, the line a run
prints about it, and the check that replicas agree. The trainer, checkpoint, export and run
modules call these methods and never ask which backend they hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dltrain.errors import TrainingError

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Strategy:
    """One backend. Built by `dltrain.strategy.create` after the Accelerator; `setup` then takes
    the freshly built model (on the CPU, seeded alike on every rank) and an optimizer factory."""

    name = ""
    # Whether its save runs collectives inside (then a rank must not leave it early to report a
    # failed write: every rank waits for the others), whether its checkpoints hold per-rank shards
    # that only the same number of processes can load, whether torch's fused optimizers may be used.
    save_is_collective = False
    shards_per_rank = False
    fused_optimizer = True

    def __init__(self, accelerator, recipe, plan):
        self.accelerator, self.recipe, self.plan = accelerator, recipe, plan
        self.model: nn.Module | None = None  # what the loop calls: wrapped, compiled where the backend puts it
        self.optimizer = None  # what checkpoints hold
        self.scaler = None  # fp16's GradScaler, where the backend has one

    # ------------------------------------------------------------------------------------------
    # Before the Accelerator exists

    @classmethod
    def refusal(cls, recipe, world: int, device_type: str) -> str | None:
        """Why this backend cannot run the recipe at this world size on this device (one line that
        names the combination and the way out), or None. Asked by the launcher before any process
        starts, and again by every process."""
        return None

    @classmethod
    def accelerator_kwargs(cls, recipe, plan, world: int, device_type: str) -> dict:
        """Keyword arguments for Accelerator() beyond precision, accumulation and trackers."""
        return {}

    def check_accelerator(self) -> None:
        """Refuse an Accelerator that set up something else than this backend asked for."""

    # ------------------------------------------------------------------------------------------
    # Set-up

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        raise NotImplementedError

    def stepped_optimizer(self):
        """The optimizer whose step() this backend calls: the learning-rate scheduler is built on it
        (torch's scheduler wraps that step() to warn when the schedule runs ahead of it)."""
        return self.optimizer

    # ------------------------------------------------------------------------------------------
    # The step

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, loss_sum: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Clip and take the optimizer step whose micro-batch losses sum to `loss_sum` (the same on
        every rank). Returns flags ("nonfinite" | "skipped", 0-d tensor, 1 = not applied) that the
        loop reads at its next sync point: nothing here waits for the device."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    # State

    def module(self) -> nn.Module:
        """The bare model under every wrapper (its own class, its own state_dict keys)."""
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the main process (other ranks may get an empty dict).
        Every rank must call it: gathering shards is a collective."""
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """Every rank: model, optimizer and random states into the (temporary) checkpoint folder."""
        raise NotImplementedError

    def load(self, path: Path) -> None:
        """Every rank: restore what `save` wrote."""
        raise NotImplementedError

    def saved_weights(self, path: Path) -> Path | None:
        """The checkpoint's consolidated weights file, checked against the model before loading
        (None where the backend writes its own layout and checks it itself)."""
        weights = path / "model.safetensors"
        return weights if weights.is_file() else None

    def describe(self) -> str | None:
        """One line on how the model is parallelised, read from what torch holds."""
        return None

    def replicated(self) -> bool:
        """Whether every rank holds all parameters (then they must be identical after a step)."""
        return True

    def check_replicas(self) -> None:
        """After training every rank must hold bit-identical replicated parameters; a difference
        means the processes did not all-reduce (unconnected copies) or diverged."""
        acc = self.accelerator
        if acc.num_processes == 1 or not self.replicated():
            return
        from accelerate.utils import gather_object

        digest = hashlib.sha256()
        for name, param in self.module().state_dict().items():
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests = gather_object([digest.hexdigest()])
        if len(set(digests)) != 1:
            raise TrainingError(
                f"parameters differ between ranks after training ({len(set(digests))} distinct over "
                f"{len(digests)} ranks): the processes were not all-reducing"
            )
        if acc.is_main_process:  # not accelerator.print: that speaks once per node
            print(f"  parameters identical on all {len(digests)} ranks (sha256 {digests[0][:12]})", flush=True)


# ----------------------------------------------------------------------------------------------
# Shared pieces


def apply_compile(units: list[nn.Module], cfg) -> None:
    """torch.compile each unit's own forward, before any wrapper is put around it. The wrappers'
    hooks (DDP's, FSDP's, Accelerate's autocast) then run outside the compiled code, so fullgraph
    holds inside each unit under one process, DDP and FSDP alike; the modules stay themselves, so
    state_dict keys, checkpoints and exports are those of an uncompiled model."""
    # nn.RNN/GRU/LSTM are refused by dynamo (a graph break, an error under fullgraph) unless this
    # lets it trace them as their decomposition.
    torch._dynamo.config.allow_rnn = True
    for unit in units:
        unit.forward = torch.compile(unit.forward, mode=cfg.mode, fullgraph=cfg.fullgraph, dynamic=cfg.dynamic)


def guarded_step(optimizer, parameters, loss_sum: torch.Tensor, clip: float | None) -> list[tuple[str, torch.Tensor]]:
    """Clip and step a torch optimizer unless the loss is not finite: skipped on the device by a
    fused optimizer, on the host (one read) by another. torch's clip reduces the norm over DTensor
    shards too (FSDP2). Returns the flag for the loop's next sync point."""
    bad = fused_guard(optimizer, loss_sum)
    if bad is None:
        bad = host_guard(loss_sum)
        if bad is not None:
            return [("nonfinite", bad)]  # not applied; the loop clears the gradients
    if clip:
        torch.nn.utils.clip_grad_norm_(parameters, clip)
    optimizer.step()
    return [("nonfinite", bad)] if bad is not None else []


def fused_guard(optimizer, loss_sum: torch.Tensor) -> torch.Tensor | None:
    """torch's fused optimizers skip their update on the device when `found_inf` is non-zero
    (GradScaler's mechanism): a non-finite loss then needs no host read before the step. Returns
    the flag set, or None where the optimizer is not fused (the caller then decides on the host)."""
    if not optimizer.defaults.get("fused"):
        return None
    bad = nonfinite(loss_sum)
    optimizer.found_inf = bad  # the fused step leaves weights, moments and its count alone
    return bad


def host_guard(loss_sum: torch.Tensor) -> torch.Tensor | None:
    """An unfused optimizer cannot skip by itself: the loss is read back (one host read per step)
    and the step left out when it is not finite. Returns the flag (already known) or None when the
    step may go on."""
    if nonfinite(loss_sum).item() == 0:
        return None
    return torch.ones((), device=loss_sum.device)


def nonfinite(x: torch.Tensor) -> torch.Tensor:
    """1.0 where `x` is inf or NaN, else 0.0, in float32 (what a fused optimizer's found_inf
    takes): (~torch.isfinite(x)).float() in two operators instead of six. x - x is exactly 0 for
    every finite x and NaN for inf and NaN; nan_to_num makes that NaN 1.0. On a 1 ms CPU step each
    operator dispatched costs a few microseconds (python -m dltrain.bench.overhead counts them)."""
    return torch.nan_to_num(x - x, nan=1.0).float()
