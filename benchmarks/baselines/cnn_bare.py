"""The MNIST CNN trained by a minimal hand-written PyTorch loop: the yardstick for dltrain's overhead.

Same model (dltrain's Net, built from the same recipe), same data (MNIST decoded into memory and
normalized the same way), same optimizer and batch; no Accelerate, no logging, no metrics.
Prints one JSON line: steady-state train samples/s and step-time percentiles over the timed
steps (warm-up excluded).

    python benchmarks/baselines/cnn_bare.py --steps 300 --batch 64 [--precision bf16]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bare_common import report, sync_debug, timed

from dltrain.data import data_root
from dltrain.optim import use_fused
from dltrain.recipe import load_recipe
from dltrain.workloads import cnn

RECIPE = "cnn_mnist"  # a shipped recipe, found by name (dltrain.shipped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    recipe = load_recipe(RECIPE)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync_debug(device)
    images, labels = cnn.read_mnist(cnn.prepare_mnist(data_root(None)), train=True)
    x_all = images.unsqueeze(1).float().div(255).sub(recipe.data.mean).div(recipe.data.std).to(device)
    y_all = labels.to(device)
    model = cnn.Net(recipe.model).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.optim.lr, fused=use_fused(recipe.optim))
    order = torch.randperm(len(x_all), device=device)

    def step(i: int) -> None:
        idx = order[(i * args.batch) % (len(order) - args.batch) :][: args.batch]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = F.cross_entropy(model(x_all[idx]).float(), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    report("cnn_bare", args, args.batch, args.precision, timed(step, args.steps, args.warmup, device))


if __name__ == "__main__":
    main()
