"""What the harness measures itself, outside the training runs: FLOPs of one real training step,
the parameters' gradient bytes, the peak FLOP/s to compute MFU against.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` counts the matmuls and convolutions that one
forward + backward on a real micro-batch dispatches (element-wise ops are not counted, as in
every MFU convention). It runs on the CPU in the harness process: counts do not depend on the
device or the precision. Where a workload pads text (BERT), the count is taken twice: padded to
`data.max_length`, to cross-check the analytic formula (which assumes that length), and on a real
dynamically padded batch, whose FLOPs per padded token turn the run's padded tokens/s into
achieved FLOP/s.

Peaks: GPUs from a table of datasheet dense peaks by name and precision; CPUs by a matmul
microbenchmark run by the harness itself, labelled "measured".
"""

from __future__ import annotations

import time

import torch

# Dense (no sparsity) datasheet peaks in FLOP/s per GPU. fp32 is the plain FP32 rate: PyTorch
# leaves TF32 off for matmuls by default. Matched by substring of torch.cuda.get_device_name,
# first match wins, so the more specific names come first.
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51.2e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 66.9e12}),  # SXM5 ("H100 80GB HBM3")
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 66.9e12}),
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
]


def gpu_peak(name: str, precision: str) -> float | None:
    for key, peaks in GPU_PEAKS:
        if key in name:
            return peaks.get(precision)
    return None


def cpu_matmul_peak(precision: str, size: int = 1024, seconds: float = 1.5) -> float:
    """Best FLOP/s of square matmuls over `seconds`, with this process's threads (the same number
    a single-process training run uses). The best of many short trials, because the machine may
    be shared: the peak is what the hardware can do, not what it did on average."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(3):  # warm-up: thread pool, caches, kernel selection
        a @ b
    flops, best, end = 2 * size**3, 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, flops / (time.perf_counter() - t0))
    return best


def _count(model, workload, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        workload.forward(model, batch).loss.backward()
    return counter.get_total_flops()


def first_batch(recipe, data, batch_size: int):
    idx = torch.arange(min(batch_size, len(data.train)))
    return next(iter(data.train.batches([idx])))


def _quiet() -> None:
    """The harness prints one line per job; the libraries' progress bars would bury them."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def measure_workload(recipe, micro_batch: int) -> dict:
    """FLOPs per training sample counted on a real micro-batch, the analytic figure beside it,
    and the gradient bytes a data-parallel step all-reduces."""
    from dltrain.workloads import WORKLOADS

    _quiet()
    workload = WORKLOADS[recipe.workload]
    torch.manual_seed(recipe.train.seed)
    model = workload.build_model(recipe)
    model.train()
    out = {
        "flops_per_sample_analytic": workload.flops_per_sample(recipe),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        # DDP all-reduces gradients in the parameters' dtype (fp32 master weights under autocast).
        "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
    }
    padding = getattr(getattr(recipe, "data", None), "padding", None)
    if padding is not None:
        # The analytic count assumes every text padded to data.max_length: count that case for the
        # cross-check, and a real batch for the work actually done.
        fixed = recipe.model_copy(update={"data": recipe.data.model_copy(update={"padding": "fixed"})})
        batch = first_batch(fixed, workload.build_data(fixed, "cpu"), micro_batch)
        out["flops_per_sample_measured"] = _count(model, workload, batch) / workload.batch_size_of(batch)
        real = first_batch(recipe, workload.build_data(recipe, "cpu"), micro_batch)
        padded_tokens = real["attention_mask"].numel()
        out["flops_per_padded_token_measured"] = _count(model, workload, real) / padded_tokens
    else:
        batch = first_batch(recipe, workload.build_data(recipe, "cpu"), micro_batch)
        out["flops_per_sample_measured"] = _count(model, workload, batch) / workload.batch_size_of(batch)
    out["flops_measured_over_analytic"] = out["flops_per_sample_measured"] / out["flops_per_sample_analytic"]
    return out
