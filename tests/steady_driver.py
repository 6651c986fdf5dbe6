"""Run one workload's `cpu_test` recipe in this process and report, as one JSON line on stdout:

* `losses`: the mean train loss of every optimizer step (captured as tensors inside the step and
  read only after training, so capturing them reads nothing back from the device), and
* `host_reads`: how many times the loop read a value back from the device (`Tensor.item`,
  `.tolist`, `.cpu`, `.numpy`, `__bool__`, `__float__`, `__int__`, `torch.cuda.synchronize`)
  during the `--count` optimizer steps that follow the warm-up, each step's end included, with
  where each read came from.

    python tests/steady_driver.py cnn [--steps 106] [--count 100] [--set KEY=VALUE ...]

Used by tests/integration/test_steady_state.py (golden loss curves and host reads per step) and to write the
golden files: `python tests/steady_driver.py cnn --write-golden`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = {"cnn": "cnn_mnist.yaml", "rnn": "rnn_sine.yaml", "bert": "bert_sst2_minilm.yaml"}
GOLDEN_STEPS = 100
# One thread: the same reduction order on any machine of this kind, whatever its core count.
THREADS = 1


def golden_path(workload: str, *, writing: bool = False) -> Path:
    """The golden curve for this CPU's kernels. Where a workload's curve depends on the vector
    ISA torch dispatches to (the CNN's convolutions: AVX2 and AVX-512 sum in another order, 1e-6
    apart at step 18 and 2% apart by step 91), its file carries the capability in its name
    (cnn_cpu_test_losses.AVX512.json); the others have one file for all."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    specific = HERE / "golden" / f"{workload}_cpu_test_losses.{capability}.json"
    if writing or specific.exists() or workload in PER_CAPABILITY:
        return specific
    return HERE / "golden" / f"{workload}_cpu_test_losses.json"


PER_CAPABILITY = {"cnn"}  # workloads whose golden curve is recorded per CPU capability


class ReadCounter:
    """Counts host reads while `active`; remembers the innermost dltrain frame of each."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")

    def __init__(self):
        import torch

        self.active = False
        self.count = 0
        self.where: Counter = Counter()
        self._orig = {}
        for name in self.NAMES:
            self._patch(torch.Tensor, name)
        self._patch(torch.cuda, "synchronize")

    def _patch(self, owner, name: str) -> None:
        orig = getattr(owner, name)
        self._orig[(owner, name)] = orig
        counter = self

        def wrapped(*args, **kwargs):
            if counter.active:
                counter.active = False  # reads made by the reporting below are not counted
                try:
                    counter.count += 1
                    counter.where[f"{name} at {_caller()}"] += 1
                finally:
                    counter.active = True
            return orig(*args, **kwargs)

        setattr(owner, name, wrapped)


def _caller() -> str:
    frames = traceback.extract_stack()[:-2]
    ours = [f for f in frames if "/dltrain/" in f.filename] or frames
    f = ours[-1]
    return f"{Path(f.filename).name}:{f.lineno} ({f.name})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=sorted(RECIPES))
    ap.add_argument("--steps", type=int, default=GOLDEN_STEPS + 6, help="optimizer steps to train")
    ap.add_argument("--count", type=int, default=100, help="steps after the warm-up whose host reads are counted")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--write-golden", action="store_true", help="write tests/golden/<workload>_cpu_test_losses.json")
    ap.add_argument("--slow-log-s", type=float, default=0.0, help="plant a log sink that sleeps this long per record")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    from dltrain import testhooks
    from dltrain.recipe import load_recipe
    from dltrain.run import train
    from dltrain.workload import get_workload

    sets = [
        f"train.max_steps={args.steps}",
        f"train.cpu_threads={THREADS}",
        "tracking.wandb=false",
        "tracking.plots=false",
        "checkpoint.save_final_model=false",
        "checkpoint.save_best=false",
        *args.overrides,
    ]
    if args.workload == "bert":
        sets.append("data.eval_subset=64")  # the final evaluation is not what is measured here
    recipe = load_recipe(HERE.parent / "recipes" / RECIPES[args.workload], "cpu_test", sets)
    workload = get_workload(recipe.workload)
    warmup = recipe.train.warmup_steps_excluded

    losses: list = []
    forward = workload.forward

    def capturing_forward(model, batch):
        out = forward(model, batch)
        if model.training:
            losses.append(out.loss.detach().clone())
        return out

    workload.forward = capturing_forward
    counter = ReadCounter()
    at_step_end = testhooks.at_step_end

    def window(rank: int, step: int) -> None:
        at_step_end(rank, step)
        # Steps warmup+1 .. warmup+count, each with everything that happens at its end.
        counter.active = warmup <= step < warmup + args.count

    testhooks.at_step_end = window
    from dltrain import trainer

    run_eval, evals = trainer.run_eval, []

    def uncounted_eval(loop, state):
        """Evaluation is not part of a training step (the clock takes it out too): its own reads
        are not counted; the sync point that precedes it is, and it is allowed for."""
        active, counter.active = counter.active, False
        if active:
            evals.append(state.step)
        try:
            return run_eval(loop, state)
        finally:
            counter.active = active

    trainer.run_eval = uncounted_eval
    if args.slow_log_s:
        from dltrain import tracking

        log = tracking.RunLog.log

        def slow_log(self, record, step):
            time.sleep(args.slow_log_s)
            log(self, record, step)

        tracking.RunLog.log = slow_log
    summary = train(recipe, output_dir=args.output_dir)
    counter.active = False
    values = [float(x) for x in torch.stack(losses).tolist()]
    records = [json.loads(line) for line in (Path(args.output_dir) / "metrics.jsonl").read_text().splitlines()]
    counted = range(warmup + 1, warmup + args.count + 1)
    out = {
        "workload": args.workload,
        "losses": values,
        "host_reads": counter.count,
        "records_in_window": len({r["step"] for r in records if r["step"] in counted and "train/loss" in r}),
        "evals_in_window": len(evals),
        "counted_steps": args.count,
        "read_sites": dict(counter.where),
        "log_every": recipe.train.log_every,
        "sync_every": getattr(recipe.train, "sync_every", None),
        "throughput": summary.get("throughput"),
    }
    if args.write_golden:
        path = golden_path(args.workload, writing=args.workload in PER_CAPABILITY)
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "about": f"train loss of each of the first {GOLDEN_STEPS} optimizer steps of "
                    f"recipes/{RECIPES[args.workload]} "
                    f"--profile cpu_test, 1 process, fp32, {THREADS} thread; written by tests/steady_driver.py "
                    "--write-golden",
                    "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "losses": values[:GOLDEN_STEPS],
                },
                indent=1,
            )
            + "\n"
        )
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
