"""`dltrain eval RUN_DIR|CHECKPOINT|EXPORTED [--split val|test]`: evaluation only.

The model and its recipe come from the folder (dltrain.export.locate), the data from the recipe,
and the metrics from the same `dltrain.trainer.evaluate` training uses: the same numbers a run
reports for that split. The result is one JSON object, on stdout and (with --output) in a file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dltrain.recipe import RecipeError


def evaluate_path(path: Path, split: str = "val", which: str | None = None) -> dict:
    """{"metrics": {...}, ...} for `split` of the model at `path` (a single process)."""
    from dltrain.accel import build_accelerator
    from dltrain.export import load_model, locate
    from dltrain.trainer import evaluate
    from dltrain.workload import get_workload

    _, model_dir = locate(path, which)  # reported: which of a run's models was evaluated
    recipe, model = load_model(path, which)
    recipe.deepspeed = None  # evaluation needs no engine and no shards: one process, the plain model
    recipe.distributed.strategy = "ddp"
    workload = get_workload(recipe.workload)
    accelerator, plan = build_accelerator(recipe, run_dir=None, with_trackers=False)
    if workload.build_split is not None:  # only the split evaluated: the training file may be gone
        chosen = workload.build_split(recipe, accelerator.device, split)
    else:
        data = workload.build_data(recipe, accelerator.device)
        chosen = {"val": data.val, "test": data.test}[split]
    if chosen is None:
        raise RecipeError(f"the {recipe.workload} recipe of {path} has no {split} split: use --split val")
    model = accelerator.prepare(model)
    t0 = time.perf_counter()
    metrics = evaluate(model, chosen, workload, accelerator, plan.micro_batch, split)
    return {
        "path": str(path),
        "model": str(model_dir),
        "recipe": recipe.name,
        "workload": recipe.workload,
        "split": split,
        "metrics": metrics,
        "eval_s": time.perf_counter() - t0,
        "precision": recipe.train.precision,
    }


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model (run directory, checkpoint or export) on val or test")
    p.add_argument(
        "path", help="a run directory, a checkpoint folder (RUN_DIR/checkpoints/step_N) or an exported model"
    )
    p.add_argument("--split", choices=["val", "test"], default="val", help="which held-out split (default val)")
    p.add_argument(
        "--which",
        choices=["final", "best"],
        default=None,
        help="of a run directory: final_model or best_model (default: what the run saved, in the order "
        "final_model, best_model, the newest checkpoint)",
    )
    p.add_argument("--output", help="also write the JSON result to this file")


def cmd_eval(args) -> int:
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise RecipeError(
            f"--output {args.output}: folder {Path(args.output).resolve().parent} does not exist: create it, "
            "or give a path in an existing folder"
        )
    result = evaluate_path(Path(args.path), args.split, args.which)
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0
