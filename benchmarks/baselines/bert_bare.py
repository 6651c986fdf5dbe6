"""BERT-family SST-2 fine-tuning by a minimal hand-written PyTorch loop: dltrain's yardstick.

Same model and tokenized data as the recipe (dltrain's own builders), the same AdamW, batch and
precision; no Accelerate, no metrics, no logging. The batches come as dltrain's come: the epoch's
permutation drawn on the training device (dltrain.data.train_index_batches: a GPU's generator
draws another permutation than the CPU's, so the order must be drawn where dltrain draws it for
step i to train on the same sentences), padded the same way (dynamic by default) with every
micro-batch's length read back once per epoch (TokenSplit.batches), and the mask handed to the
model as dltrain.workloads.bert.forward hands it (4-D, so transformers asks no `padding_mask.all()`).
So the step makes no host read, as dltrain's makes none.

    python benchmarks/baselines/bert_bare.py --recipe recipes/bert_sst2_minilm.yaml --profile cpu_test --steps 30
"""

from __future__ import annotations

import torch
from bare_common import load, parse_args, report, timed

from dltrain.data import train_index_batches
from dltrain.optim import param_groups, use_fused
from dltrain.workloads import bert

RECIPE = "bert_sst2_minilm"  # a shipped recipe, found by name (dltrain.shipped)


def batch_stream(recipe, split, device):
    """dltrain's batches at world size 1, epoch after epoch, as its training loop asks for them."""
    epoch = 0
    while True:
        yield from split.batches(
            train_index_batches(
                len(split),
                micro_batch=recipe.train.global_batch_size,
                grad_accum=1,
                rank=0,
                world=1,
                seed=recipe.train.seed,
                epoch=epoch,
                device=device,
                lengths=getattr(split, "order_lengths", None),
                group=getattr(split, "group", 0),
            )
        )
        epoch += 1


def make_step(recipe, model, opt, split, device):
    """One optimizer step per call, on the next batch."""
    bf16 = recipe.train.precision == "bf16"
    batches = batch_stream(recipe, split, device)

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = bert.forward(model, next(batches)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], RECIPE)
    recipe, device = load(args)
    torch.manual_seed(args.seed)
    data = bert.build_data(recipe, device)
    model = bert.build_model(recipe).to(device).train()
    # dltrain's parameter groups (no decay for biases and norms when the recipe says so), so the same update.
    opt = torch.optim.AdamW(
        param_groups(recipe.optim, model),
        lr=recipe.optim.lr,
        weight_decay=recipe.optim.weight_decay,
        fused=use_fused(recipe.optim),
    )
    step = make_step(recipe, model, opt, data.train, device)
    batch = recipe.train.global_batch_size
    report("bert_bare", args, batch, recipe.train.precision, timed(step, args.steps, args.warmup, device))


if __name__ == "__main__":
    main()
