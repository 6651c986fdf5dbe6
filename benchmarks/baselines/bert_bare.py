"""BERT-family SST-2 fine-tuning by a minimal hand-written PyTorch loop: dltrain's yardstick.

Same model and tokenized data as the recipe (dltrain's own builders), the same AdamW, batch and
precision; no Accelerate, no metrics, no logging. Step i trains on the same sentences as dltrain's
step i (the same epoch permutation, dltrain.data.epoch_order), padded the same way (dynamic by
default), so both sides pad to the same lengths and do the same work.

    python benchmarks/baselines/bert_bare.py --recipe recipes/bert_sst2_minilm.yaml --profile cpu_test --steps 30
"""

from __future__ import annotations


import torch
from bare_common import load, parse_args, report, timed

from dltrain.data import epoch_order
from dltrain.optim import param_groups
from dltrain.optim import use_fused
from dltrain.workloads import bert

RECIPE = "bert_sst2_minilm"  # a shipped recipe, found by name (dltrain.shipped)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], RECIPE)
    recipe, device = load(args)
    batch, bf16 = recipe.train.global_batch_size, recipe.train.precision == "bf16"
    torch.manual_seed(args.seed)
    data = bert.build_data(recipe, device)
    model = bert.build_model(recipe).to(device).train()
    # dltrain's parameter groups (no decay for biases and norms when the recipe says so), so the same update.
    opt = torch.optim.AdamW(param_groups(recipe.optim, model), lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay,
                            fused=use_fused(recipe.optim))
    order = epoch_order(len(data.train), recipe.train.seed, epoch=0)
    per_epoch = len(order) // batch

    def step(i: int) -> None:
        start = (i % per_epoch) * batch
        b = data.train.fetch(order[start : start + batch])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    report("bert_bare", args, batch, recipe.train.precision, timed(step, args.steps, args.warmup, device))


if __name__ == "__main__":
    main()
