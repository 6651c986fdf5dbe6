"""`dltrain export RUN_DIR|CHECKPOINT --format hf`: a trained model as a folder others can load.

The Hugging Face layout: `config.json` (with `id2label` where the workload has class names) and
`model.safetensors`, plus the resolved `recipe.yaml`. BERT is a transformers model and is saved with
`save_pretrained` (and its tokenizer), so `AutoModelForSequenceClassification.from_pretrained(DIR)`
loads it; the CNN and RNN are dltrain's own modules, and `dltrain.export.load_model(DIR)` (or
`dltrain eval DIR`) builds them back from the config. final_model/ and best_model/ of a run are
written in this layout already.

What can be read back (`load_model`): a run directory (what it saved, in the order final_model/,
best_model/, the newest checkpoint; or the one `which` names), a checkpoint folder
(checkpoints/step_N, not DeepSpeed's sharded layout), or an exported folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from dltrain import rundir, storage
from dltrain.errors import StorageError
from dltrain.recipe import RecipeError, dump_recipe, validate

CONFIG_FILE = "config.json"
RECIPE_FILE = "recipe.yaml"
WEIGHTS_FILE = "model.safetensors"


def id2label(workload, recipe) -> dict[int, str] | None:
    """Class names by index, where the workload has classes (`label_names(recipe)`, optional)."""
    names = getattr(workload, "label_names", None)
    names = names(recipe) if names is not None else None
    return dict(enumerate(names)) if names else None


def from_loop(loop, out_dir: Path) -> None:
    """The trained model of a run (final_model/, best_model/): the backend gathers the whole state
    dict on every rank (ZeRO-3 and FSDP shards included), then the main process saves it. Compile
    never wraps the module (dltrain.strategy compiles its forward), so the keys are the plain
    module's and load into an uncompiled model.
    A failed write (a full disk) leaves the previous folder as it was, removes what it wrote, and
    raises the same StorageError on every rank."""
    import shutil

    acc = loop.accelerator
    state_dict = loop.strategy.full_state_dict()
    tmp, old = out_dir.with_name(f".tmp-{out_dir.name}"), out_dir.with_name(f".old-{out_dir.name}")
    failed = None
    if acc.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            save(loop.strategy.module(), state_dict, tmp, loop.recipe)
            if out_dir.exists():  # best_model/ again: the new one in place before the old one goes
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        except storage.WRITE_ERRORS as exc:
            failed = exc
            shutil.rmtree(tmp, ignore_errors=True)
    if not storage.agree_ok(acc, failed):
        need = sum(t.numel() * t.element_size() for t in state_dict.values())
        intact = (
            f"the last checkpoint is {loop.last_checkpoint} (export it with `dltrain export`)"
            if loop.last_checkpoint
            else "no checkpoint was written"
        )
        raise StorageError(
            storage.write_failure(
                failed, f"{out_dir.name} not written to {out_dir.parent}", intact, need, out_dir.parent, loop.run_dir
            )
        )
    acc.wait_for_everyone()


def save(model, state_dict: dict, out_dir: Path, recipe) -> None:
    """The model in the Hugging Face layout, with its recipe: the workload's own saver where it has
    one (BERT: save_pretrained, id2label set in its config), else safetensors + config.json."""
    from safetensors.torch import save_file

    from dltrain.workload import get_workload

    workload = get_workload(recipe.workload)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_fn = getattr(workload, "save_model", None)
    if save_fn is not None:
        labels = id2label(workload, recipe)
        if labels and hasattr(getattr(model, "config", None), "id2label"):
            model.config.id2label, model.config.label2id = labels, {name: i for i, name in labels.items()}
        save_fn(model, state_dict, out_dir, recipe)
    else:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(out_dir / WEIGHTS_FILE))
        write_config(out_dir, model, recipe)
    (out_dir / RECIPE_FILE).write_text(dump_recipe(recipe))
    storage.with_umask_mode(out_dir)


def write_config(out_dir: Path, model, recipe) -> Path:
    """config.json for a dltrain module (CNN, RNN): what `load_model` needs to build it again."""
    from dltrain.workload import get_workload

    labels = id2label(get_workload(recipe.workload), recipe)
    config = {
        "model_type": f"dltrain-{recipe.workload}",
        "architectures": [type(model).__name__],
        "dltrain_workload": recipe.workload,
        "model": recipe.model.model_dump(mode="json"),
    }
    if labels:
        config |= {
            "id2label": {str(i): name for i, name in labels.items()},
            "label2id": {name: i for i, name in labels.items()},
        }
    path = out_dir / CONFIG_FILE
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _latest_segment_recipe(run_dir: Path) -> Path:
    """recipe.yaml, or the recipe of the last resumed segment (recipe.resume-<N>.yaml; a stray file
    of that pattern whose N is not a step is not a segment's)."""
    resumed = [p for p in run_dir.glob("recipe.resume-*.yaml") if p.stem.rsplit("-", 1)[1].isdigit()]
    resumed.sort(key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return resumed[-1] if resumed else run_dir / RECIPE_FILE


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(
            f"cannot read {path} ({exc}): the folder is damaged; use another run, checkpoint or export"
        ) from None


# What a run directory's model is when no --which is given: what the run saved, in this order.
# final_model/ is the model the run ended with; a recipe that saves only the best (or only
# checkpoints) still has a model to export, and a user should not need to know which it saved.
DEFAULT_ORDER = ("final", "best", "checkpoint")


def _newest_checkpoint(run_dir: Path, recipe_text: str) -> Path | None:
    """The newest complete checkpoint of a run that holds model weights (DeepSpeed's do not)."""
    from dltrain import checkpoint_scan

    try:
        recipe = validate(yaml.safe_load(recipe_text) or {}, source=f"{run_dir} (its recipe)")
        identity = rundir.read_identity(run_dir)
        root = rundir.checkpoint_root(recipe, run_dir, identity["run_id"] if identity else "")
    except RecipeError:
        root = run_dir / "checkpoints"
    good, _ = checkpoint_scan.scan(root)
    with_weights = [p for p in good if (p / WEIGHTS_FILE).is_file()]
    return with_weights[-1] if with_weights else None


def _run_model(run_dir: Path, which: str | None) -> Path:
    """The folder of `which` model of a run (final, best), or by DEFAULT_ORDER when None."""
    recipe_text = _latest_segment_recipe(run_dir).read_text()
    found = {
        name: run_dir / f"{name}_model"
        for name in ("final", "best")
        if (run_dir / f"{name}_model" / WEIGHTS_FILE).is_file()
    }
    if which in found:
        return found[which]
    newest = _newest_checkpoint(run_dir, recipe_text)
    if which is None:
        for name in DEFAULT_ORDER:
            chosen = newest if name == "checkpoint" else found.get(name)
            if chosen is not None:
                return chosen
    saved = [f"{name}_model/" for name in found] + ([_shown_under(newest, run_dir)] if newest else [])
    if saved:
        raise RecipeError(
            f"{run_dir} has no {which}_model/ (the run saved: {', '.join(saved)}): leave --which out to "
            f"take what it saved (in the order {', '.join(DEFAULT_ORDER)}), or give --which "
            f"{'best' if which == 'final' else 'final'} or a checkpoint folder"
        )
    raise RecipeError(
        f"{run_dir} holds no model: no final_model/, best_model/ or checkpoint with {WEIGHTS_FILE} "
        "(the run stopped before saving one, or saved none): train it again with "
        "checkpoint.save_final_model=true"
    )


def _shown_under(path: Path, run_dir: Path) -> str:
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def locate(path: Path, which: str | None = None) -> tuple[str, Path]:
    """(resolved recipe YAML, folder holding the weights) of a run, checkpoint or exported folder.
    Of a run directory: its `which` model (final, best), or with None what it saved, in the order
    DEFAULT_ORDER (final_model/, best_model/, the newest checkpoint)."""
    from dltrain import checkpoint_scan

    path = Path(path)
    if not path.is_dir():
        raise RecipeError(f"{path}: no such folder: give a run directory, a checkpoint or an exported model")
    if (path / "trainer_state.json").is_file():  # a checkpoint: intact, as --resume would require
        why = checkpoint_scan.problem_with(path)
        if why is not None:
            raise RecipeError(f"checkpoint {path} is {why}: use another of the run's checkpoints, or its final_model")
        if not (path / WEIGHTS_FILE).is_file():
            raise RecipeError(
                f"{path} holds no {WEIGHTS_FILE} (a DeepSpeed checkpoint?): evaluate or export the run's "
                "final_model instead"
            )
        return checkpoint_scan.saved_state(path)["recipe"], path
    if (path / WEIGHTS_FILE).is_file() and (path / RECIPE_FILE).is_file():  # exported, or final_model/
        return _read(path / RECIPE_FILE), path
    if (path / RECIPE_FILE).is_file():  # a run directory
        model_dir = _run_model(path, which)
        if (model_dir / "trainer_state.json").is_file():  # the newest checkpoint: its own recipe
            return locate(model_dir)
        return _read(_latest_segment_recipe(path)), model_dir
    raise RecipeError(
        f"{path} is not a run directory, a checkpoint or an exported model (no recipe.yaml, "
        "trainer_state.json or model.safetensors there)"
    )


def load_model(path: Path, which: str | None = None):
    """(recipe, model on the CPU in eval mode) from a run, checkpoint or exported folder: a pair,
    not the model alone. `which`: as for `locate` (None: what the run saved)."""
    import torch
    from safetensors.torch import load_file

    from dltrain.workload import get_workload

    text, weights_dir = locate(path, which)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(
            f"the recipe stored with {path} is not YAML ({str(exc).splitlines()[0]}): the folder is damaged"
        ) from None
    if not isinstance(raw, dict):
        raise RecipeError(
            f"the recipe stored with {path} is a {type(raw).__name__}, not a recipe: the folder is damaged"
        )
    recipe = validate(raw, source=f"{path} (its recipe)")
    if getattr(recipe.model, "init", None) == "pretrained":
        recipe.model.init = "random"  # the architecture only: the weights come from the file
    workload = get_workload(recipe.workload)
    torch.manual_seed(recipe.train.seed)
    model = workload.build_model(recipe)
    try:
        state = load_file(str(weights_dir / WEIGHTS_FILE))
    except Exception as exc:  # noqa: BLE001 - safetensors' own error for a cut-off or foreign file
        raise RecipeError(
            f"{weights_dir / WEIGHTS_FILE} cannot be read ({str(exc).splitlines()[0][:160]}): the file "
            "is damaged (cut off?); use another of the run's models or checkpoints"
        ) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])  # save_pretrained leaves tied copies out
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise RecipeError(
            f"{weights_dir / WEIGHTS_FILE} does not fit the model its recipe builds ('{key}' is "
            f"{'missing' if missing else 'unexpected'}): it was written by another recipe"
        )
    if raw.get("model", {}).get("init") == "pretrained":
        recipe.model.init = "pretrained"  # as trained, for the exported recipe
    return recipe, model.eval()


def export_hf(path: Path, out_dir: Path, which: str | None = None) -> Path:
    """Write the model at `path` into `out_dir` in the Hugging Face layout; return out_dir."""
    recipe, model = load_model(path, which)
    save(model, model.state_dict(), out_dir, recipe)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Command line


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a trained model in the Hugging Face layout (config.json + safetensors)")
    p.add_argument(
        "path", help="a run directory, a checkpoint folder (RUN_DIR/checkpoints/step_N) or an exported model"
    )
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: config.json + model.safetensors (default)")
    p.add_argument(
        "--which",
        choices=["final", "best"],
        default=None,
        help="of a run directory: final_model or best_model (default: what the run saved, in the order "
        "final_model, best_model, the newest checkpoint)",
    )
    p.add_argument(
        "--output-dir",
        help="where to write: a new or empty folder (default: RUN_DIR/export-hf, "
        "RUN_DIR/export-hf-step_N for a checkpoint, FOLDER-export-hf for an exported model)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in --output-dir (never a run's own files or a checkpoint)",
    )


def default_output(source: Path, fmt: str) -> Path:
    """Where an export goes unless told: beside what it came from, never inside a checkpoint
    (keep_last would delete it with the checkpoint)."""
    if (source / "trainer_state.json").is_file():  # RUN/checkpoints/step_N -> RUN/export-hf-step_N
        return source.parent.parent / f"export-{fmt}-{source.name}"
    if (source / RECIPE_FILE).is_file() and not (source / WEIGHTS_FILE).is_file():  # a run directory
        return source / f"export-{fmt}"
    return source.parent / f"{source.name}-export-{fmt}"


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an export folder that holds anything of a run's, a checkpoint, or (without --overwrite)
    anything at all: an export never replaces what a user made."""
    for folder in (out, *out.parents):
        if (folder / "RUN_ID").is_file() or (folder / "trainer_state.json").is_file():  # a checkpoint of dltrain's
            raise RecipeError(
                f"--output-dir {out} is inside checkpoint {folder}: an export there would corrupt it; "
                "give a folder outside the run's checkpoints"
            )
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--output-dir {out} is a file: give a new or empty folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if any((out / name).exists() for name in ("metrics.jsonl", "run.json", "checkpoints", "summary.json")):
        raise RecipeError(
            f"--output-dir {out} is a run directory: an export there would replace its recipe.yaml; "
            "give a new or empty folder"
        )
    if not overwrite:
        raise RecipeError(
            f"--output-dir {out} is not empty: give a new or empty folder, or --overwrite to replace "
            "an earlier export there"
        )


def cmd_export(args) -> int:
    source = Path(args.path)
    out = Path(args.output_dir) if args.output_dir else default_output(source, args.format)
    _, weights_dir = locate(source, args.which)  # to say which model of a run was taken, and refuse early
    check_output(out, args.overwrite)
    if args.overwrite and out.is_dir():
        import shutil

        shutil.rmtree(out)  # an earlier export (check_output refused anything else)
    export_hf(source, out, args.which)
    print(f"dltrain: exported {weights_dir} -> {out}")
    return 0
