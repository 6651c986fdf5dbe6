"""The sine-sequence RNN trained by a minimal hand-written PyTorch loop: dltrain's yardstick.

Same model and generated sequences as the recipe (dltrain's builders), the same optimizer, batch
and precision; no Accelerate, no metrics, no logging.

    python benchmarks/baselines/rnn_bare.py --recipe recipes/rnn_sine.yaml --profile cpu_test --steps 300
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bare_common import load, parse_args, report, timed

from dltrain.optim import use_fused
from dltrain.workloads import rnn

RECIPE = "rnn_sine"  # a shipped recipe, found by name (dltrain.shipped)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], RECIPE)
    recipe, device = load(args)
    batch, bf16 = recipe.train.global_batch_size, recipe.train.precision == "bf16"
    torch.manual_seed(args.seed)
    x_all, y_all = rnn.generate(recipe.data)
    n_train = rnn.split_sizes(recipe.data)[0]
    x_all, y_all = x_all[:n_train].to(device), y_all[:n_train].to(device)
    model = rnn.build_model(recipe).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=recipe.optim.lr, fused=use_fused(recipe.optim))
    order = torch.randperm(n_train, device=device)

    def step(i: int) -> None:
        start = (i * batch) % (n_train - batch)
        idx = order[start : start + batch]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(model(x_all[idx]).float(), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    report("rnn_bare", args, batch, recipe.train.precision, timed(step, args.steps, args.warmup, device))


if __name__ == "__main__":
    main()
