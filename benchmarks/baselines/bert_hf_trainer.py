"""The Hugging Face Trainer fine-tuning the same model on the same SST-2 data and hyperparameters.

Model and tokenized data come from dltrain's builders for the recipe (so both sides see the same
tokens), then everything else is the Trainer's own: its DataLoader and DataCollatorWithPadding
(dynamic padding, or max_length for `data.padding: fixed`), AdamW, linear warm-up schedule,
autocast. Its sampler reads the data in dltrain's first-epoch order (the same permutation,
dltrain.data.epoch_order), so step i sees the same sentences, padded to the same lengths, on both
sides. The clock runs between the end of the last warm-up step and the end of the last step
(a callback), so it covers data loading like dltrain's step timer, and leaves out the Trainer's
start-up.

    python benchmarks/baselines/bert_hf_trainer.py --recipe recipes/bert_sst2_minilm.yaml --profile cpu_test --steps 30
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from bare_common import load, parse_args, report, sync
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from dltrain.data import epoch_order
from dltrain.trainer import use_fused
from dltrain.workloads import bert

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "bert_sst2_minilm.yaml"


class StepClock(TrainerCallback):
    """Per-step times after the warm-up, each from the end of the step before."""

    def __init__(self, warmup: int):
        self.warmup, self.last, self.times = warmup, None, []

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        now = time.perf_counter()
        if state.global_step > self.warmup:
            self.times.append(now - self.last)
        self.last = now


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], str(RECIPE))
    recipe, device = load(args)
    batch = recipe.train.global_batch_size
    tokenizer = bert.tokenizer_for(recipe)
    train = bert.load_splits(recipe)["train"]
    train = train.select(epoch_order(len(train), recipe.train.seed, epoch=0).tolist())
    fixed = recipe.data.padding == "fixed"
    collator = DataCollatorWithPadding(tokenizer, padding="max_length" if fixed else "longest",
                                       max_length=recipe.data.max_length if fixed else None)
    clock = StepClock(args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=args.warmup + args.steps,
            learning_rate=recipe.optim.lr, weight_decay=recipe.optim.weight_decay,
            # transformers 5 reads a float warmup_steps below 1 as a fraction of all steps.
            lr_scheduler_type="linear", warmup_steps=recipe.schedule.warmup_steps or recipe.schedule.warmup_fraction,
            bf16=recipe.train.precision == "bf16", use_cpu=device.type == "cpu", seed=args.seed,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
            dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential",
            optim="adamw_torch_fused" if use_fused(recipe.optim, deepspeed=False) else "adamw_torch",  # as dltrain
        )
        torch.manual_seed(args.seed)
        trainer = Trainer(model=bert.build_model(recipe), args=targs, train_dataset=train,
                          data_collator=collator, callbacks=[clock])
        trainer.train()
    report("bert_hf_trainer", args, batch, recipe.train.precision, clock.times)


if __name__ == "__main__":
    main()
