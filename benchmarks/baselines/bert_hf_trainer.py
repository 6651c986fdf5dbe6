"""The Hugging Face Trainer fine-tuning the same model on the same SST-2 data and hyperparameters.

Model and tokenized data come from dltrain's builders for the recipe (so both sides see the same
tokens), then everything else is the Trainer's own: its DataLoader and DataCollatorWithPadding
(dynamic padding; max_length for `data.padding: fixed`; a multiple of data.bucket_multiple
for `bucket`), AdamW, linear warm-up schedule, autocast. Its sampler reads the data in dltrain's
first-epoch order (the same permutation, dltrain.data.epoch_order), so step i sees the same
sentences, padded to the same lengths, on both sides.

The clock is dltrain's (bare_common.WindowClock): one wall clock from the end of the last warm-up
step to the end of the last step (a callback), the device synchronized at those two edges only,
so it covers data loading and everything the Trainer does per step and leaves out its start-up;
the percentiles come from per-step CUDA events (host times on a CPU).

    python benchmarks/baselines/bert_hf_trainer.py --recipe recipes/bert_sst2_minilm.yaml --profile cpu_test --steps 30
"""

from __future__ import annotations

import tempfile

import torch
from bare_common import Timing, WindowClock, load, parse_args, report
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from dltrain.data import epoch_order
from dltrain.optim import use_fused
from dltrain.workloads import bert

RECIPE = "bert_sst2_minilm"  # a shipped recipe, found by name (dltrain.shipped)


class StepClock(TrainerCallback):
    """The window of steps warmup+1 .. warmup+steps on one WindowClock."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.end, self.clock, self.timing = warmup, warmup + steps, WindowClock(device), None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.warmup == 0:
            self.clock.start()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.clock.start()
        elif self.warmup < state.global_step <= self.end:
            self.clock.step_done()
            if state.global_step == self.end:
                self.timing: Timing = self.clock.stop()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], RECIPE)
    recipe, device = load(args)
    batch = recipe.train.global_batch_size
    tokenizer = bert.tokenizer_for(recipe)
    train = bert.load_splits(recipe)["train"]
    train = train.select(epoch_order(len(train), recipe.train.seed, epoch=0).tolist())
    fixed = recipe.data.padding == "fixed"
    # bucket: the longest text of the batch rounded up to a multiple of data.bucket_multiple
    multiple = getattr(recipe.data, "bucket_multiple", None) if recipe.data.padding == "bucket" else None
    collator = DataCollatorWithPadding(
        tokenizer,
        padding="max_length" if fixed else "longest",
        max_length=recipe.data.max_length if fixed else None,
        pad_to_multiple_of=multiple,
    )
    clock = StepClock(args.warmup, args.steps, device)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=args.warmup + args.steps,
            learning_rate=recipe.optim.lr,
            weight_decay=recipe.optim.weight_decay,
            # transformers 5 reads a float warmup_steps below 1 as a fraction of all steps.
            lr_scheduler_type="linear",
            warmup_steps=recipe.schedule.warmup_steps or recipe.schedule.warmup_fraction,
            bf16=recipe.train.precision == "bf16",
            use_cpu=device.type == "cpu",
            seed=args.seed,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            disable_tqdm=True,
            train_sampling_strategy="sequential",
            optim="adamw_torch_fused" if use_fused(recipe.optim) else "adamw_torch",  # as dltrain
        )
        torch.manual_seed(args.seed)
        trainer = Trainer(
            model=bert.build_model(recipe), args=targs, train_dataset=train, data_collator=collator, callbacks=[clock]
        )
        trainer.train()
    report("bert_hf_trainer", args, batch, recipe.train.precision, clock.timing)


if __name__ == "__main__":
    main()
