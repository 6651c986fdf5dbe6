"""`dltrain inspect RECIPE`: what a recipe will train on and with, before any training.

Writes into the output directory: the workload's view of sample inputs with their labels
(`workload.write_samples`), `model_summary.md` (layers, output shapes, parameters, FLOPs per
sample) and, where graphviz's `dot` and torchviz are installed, `architecture.png`.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from dltrain.workload import get_workload

if TYPE_CHECKING:  # torch is imported where a model is built: `dltrain --help` must not wait for it
    import torch
    from torch import nn

EXAMPLE_BATCH = 2  # examples pushed through the model to record output shapes


def _first_tensor(value):
    """The tensor a module returns, inside tuples and Hugging Face ModelOutputs too."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def layer_table(model: nn.Module, workload, batch, max_depth: int) -> tuple[list[tuple[str, str, str, int]], object]:
    """(name, type, output shape, parameters) per module down to `max_depth`, and the forward's Output."""
    import torch

    rows: dict[str, tuple[str, str, str, int]] = {}
    hooks = []
    for name, module in model.named_modules():
        depth = 0 if not name else name.count(".") + 1
        if depth > max_depth:
            continue

        def hook(mod, _inputs, output, name=name):
            out = _first_tensor(output)
            shape = "x".join(str(s) for s in out.shape) if out is not None else "-"
            params = sum(p.numel() for p in mod.parameters())
            rows.setdefault(name or "(model)", (name or "(model)", type(mod).__name__, shape, params))

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = workload.forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    # Definition order (a container before its children), not the order the hooks fired in.
    order = {name or "(model)": i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(rows.values(), key=lambda row: order[row[0]]), out


def _markdown(rows, recipe, workload, n_params: int, n_trainable: int) -> str:
    lines = [
        f"# {recipe.name}: model summary",
        "",
        f"- workload: {recipe.workload}, model class {rows[0][1] if rows else '?'}",
        f"- parameters: {n_params:,} ({n_trainable:,} trainable)",
        f"- training FLOPs per sample (analytic, forward + backward): {workload.flops_per_sample(recipe):,}",
        f"- output shapes below are for a batch of {EXAMPLE_BATCH} validation examples",
        "",
        "| module | type | output shape | parameters |",
        "| --- | --- | --- | ---: |",
    ]
    lines += [f"| {name} | {kind} | {shape} | {params:,} |" for name, kind, shape, params in rows]
    return "\n".join(lines) + "\n"


def graph_tools_missing() -> list[str]:
    """What the architecture graph lacks, each with how to get it: torchviz draws the graph, and
    graphviz's `dot` (a system program, not a pip package) renders it, so either can be missing alone."""
    missing = []
    if importlib.util.find_spec("torchviz") is None:
        missing.append("the torchviz package is not installed (pip install 'dltrain[viz]')")
    if shutil.which("dot") is None:
        missing.append("graphviz's `dot` is not on PATH (install graphviz, e.g. apt-get install graphviz)")
    return missing


def _graph(model: nn.Module, loss: torch.Tensor, out_dir: Path) -> tuple[Path | None, str]:
    """The autograd graph as the original report drew it, when the tools are there."""
    missing = graph_tools_missing()
    if missing:
        return None, f"architecture graph skipped: {' and '.join(missing)}; the layer table stands in for it"
    from torchviz import make_dot

    dot = make_dot(loss, params=dict(model.named_parameters()))
    dot.format = "png"
    path = Path(dot.render(str(out_dir / "architecture"), cleanup=True))
    return path, f"architecture graph: {path}"


def inspect(recipe, out_dir: Path, max_depth: int = 4) -> dict:
    """Write the sample view, the model summary and (maybe) the graph; return what was written."""
    import torch

    workload = get_workload(recipe.workload)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_samples = getattr(workload, "write_samples", None)
    samples = write_samples(recipe, out_dir) if write_samples is not None else []

    torch.manual_seed(recipe.train.seed)
    model = workload.build_model(recipe)
    data = workload.build_data(recipe, "cpu")
    batch = data.val.fetch(torch.arange(min(EXAMPLE_BATCH, len(data.val))))
    model.eval()  # no dropout: the shapes and the loss are those of a deterministic pass
    rows, _ = layer_table(model, workload, batch, max_depth)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = out_dir / "model_summary.md"
    summary.write_text(_markdown(rows, recipe, workload, n_params, n_trainable))
    model.train()  # the training forward: an evaluation forward may detach what it only measures (the RNN's)
    graph, graph_note = _graph(model, workload.forward(model, batch).loss, out_dir)
    model.eval()
    return {
        "samples": samples,
        "summary": summary,
        "graph": graph,
        "graph_note": graph_note,
        "parameters": n_params,
        "flops_per_sample": workload.flops_per_sample(recipe),
    }


# ----------------------------------------------------------------------------------------------
# Command line


def add_parser(sub, add_recipe_args) -> None:
    p = sub.add_parser("inspect", help="show sample inputs and the model summary of a recipe, without training")
    add_recipe_args(p)
    p.add_argument("--depth", type=int, default=4, help="module nesting shown in the layer table (default 4)")


def cmd_inspect(args) -> int:
    from dltrain.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.profile, args.overrides)
    out_dir = Path(args.output_dir or Path("runs") / f"{recipe.name}-inspect").resolve()
    result = inspect(recipe, out_dir, max_depth=args.depth)
    print(result["summary"].read_text(), end="")
    for path in result["samples"]:
        print(f"sample inputs: {path}")
    print(result["graph_note"])
    print(f"model summary: {result['summary']}")
    return 0
