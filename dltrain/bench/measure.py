"""What the harness measures itself, outside the training runs: FLOPs of one real training step,
the parameters' gradient bytes, the peak FLOP/s to compute MFU against.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` counts the matmuls and convolutions that one
forward + backward on a real micro-batch dispatches (element-wise ops are not counted, as in
every MFU convention). It runs in the harness process, on the CPU (on the GPU for a GPU suite,
where a large BERT batch would take tens of seconds on the host): counts do not depend on the
device or the precision. The batch is the workload's `flops_batch` (text: padded to
`data.max_length`, the length the analytic formula assumes), and where a workload counts tokens
(`tokens_of`) a second count on a real, dynamically padded batch, whose FLOPs per padded token
turn the run's padded tokens/s into achieved FLOP/s.

Peaks (the GPU table, the CPU matmul microbenchmark) live in dltrain.peaks, shared with the
training loop; they are imported here under their old names.
"""

from __future__ import annotations

import torch

from dltrain.peaks import GPU_PEAKS, cpu_matmul_peak, gpu_peak  # noqa: F401  (the names this module had)


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
    try:  # the text libraries, where installed
        import datasets
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def measure_workload(recipe, micro_batch: int, device: str = "cpu") -> dict:
    """FLOPs per training sample counted on a real micro-batch, the analytic figure beside it,
    and the gradient bytes a data-parallel step all-reduces."""
    from dltrain.workload import get_workload

    _quiet()
    workload = get_workload(recipe.workload)
    torch.manual_seed(recipe.train.seed)
    model = workload.build_model(recipe).to(device)
    model.train()
    out = {
        "flops_per_sample_analytic": workload.flops_per_sample(recipe),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        # DDP all-reduces gradients in the parameters' dtype (fp32 master weights under autocast).
        "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
    }
    # The batch flops_per_sample describes (text: padded to data.max_length), to cross-check the
    # analytic count; by default the first training examples.
    data = None
    if workload.flops_batch is not None:
        batch = workload.flops_batch(recipe, device, micro_batch)
    else:
        data = workload.build_data(recipe, device)
        batch = first_batch(recipe, data, micro_batch)
    out["flops_per_sample_measured"] = _count(model, workload, batch) / workload.batch_size_of(batch)
    if workload.tokens_of is not None:
        # A real batch as training pads it: its FLOPs per padded token turn the run's padded
        # tokens/s into achieved FLOP/s.
        real = first_batch(recipe, data or workload.build_data(recipe, device), micro_batch)
        out["flops_per_padded_token_measured"] = _count(model, workload, real) / workload.tokens_of(real)
    out["flops_measured_over_analytic"] = out["flops_per_sample_measured"] / out["flops_per_sample_analytic"]
    return out
