"""`dltrain train|list|...`: the command line. Errors a user can cause print one line and exit non-zero.

Exit codes: 0 done; 2 bad input (recipe, override, data, environment); 3 training stopped
(e.g. non-finite loss); 4 preempted: SIGTERM/SIGUSR1 made the run write a checkpoint and stop
(RUN_DIR/preempted.json says where), continue with `--resume auto --output-dir RUN_DIR`.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_BAD_INPUT = 2
EXIT_TRAINING_STOPPED = 3
EXIT_PREEMPTED = 4


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a shipped recipe's name (see `dltrain list`) or a recipe YAML file")
    p.add_argument("--profile", help="named profile inside the recipe, e.g. cpu_test")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.epochs=2 (repeatable)",
    )
    p.add_argument("--output-dir", help="run directory (default: runs/<recipe>-<time>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dltrain", description="Train and benchmark reference deep-learning workloads."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a recipe (also under `accelerate launch -m dltrain train ...`)")
    _add_train_args(p)
    p.add_argument(
        "--resume", nargs="?", const="auto", help="continue from a checkpoint: auto (newest in the run dir) or a path"
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved recipe (profile and --set applied) and exit"
    )
    p = sub.add_parser("list", help="list the shipped recipes")
    p.add_argument(
        "--where",
        choices=["recipes", "suites", "baselines", "launch"],
        help="print the folder of the shipped files of this kind instead (e.g. launch: slurm.sbatch)",
    )
    from dltrain import launch

    launch.add_parser(sub, _add_train_args)
    from dltrain.bench import cli as bench

    bench.add_parser(sub)
    from dltrain import inspect

    inspect.add_parser(sub, _add_train_args)
    from dltrain import evaluate, export, schema

    evaluate.add_parser(sub)
    export.add_parser(sub)
    schema.add_parser(sub)
    return parser


def cmd_train(args) -> int:
    from dltrain.recipe import load_recipe
    from dltrain.run import train

    if args.print_config:
        from dltrain.recipe import dump_recipe

        print(dump_recipe(load_recipe(args.recipe, args.profile, args.overrides)), end="")
        return 0
    if args.resume and args.resume != "auto":
        from dltrain.checkpoint_scan import locate

        locate(None, None, args.resume)  # a missing or damaged checkpoint fails now, before any data loads
    recipe = load_recipe(args.recipe, args.profile, args.overrides)
    from dltrain import allocator, signals

    signals.install()  # SIGTERM/SIGUSR1: checkpoint at the next sync point and exit 4
    allocator.tune()  # before the data and the model allocate anything
    train(recipe, output_dir=args.output_dir, resume=args.resume)
    return 0


def cmd_list(args) -> int:
    from dltrain.recipe import RecipeError, clip, read_yaml
    from dltrain.shipped import folder, recipes_dir

    if args.where:
        print(folder(args.where))
        return 0
    where = recipes_dir()
    if not where.is_dir():
        raise RecipeError(f"recipes directory {where} not found (DLTRAIN_RECIPES_DIR)")
    for path in sorted(where.glob("*.yaml")):
        try:
            raw = read_yaml(path)
        except RecipeError as exc:  # one bad file (not UTF-8, not YAML) must not hide the others
            print(f"dltrain: warning: skipping {path.name}: {exc}", file=sys.stderr)
            continue
        profiles = raw.get("profiles")
        profiles = ", ".join(map(str, profiles)) if isinstance(profiles, dict) and profiles else "-"
        description = clip(str(raw.get("description", "")).strip().split("\n")[0], 100)
        print(
            f"{path.name:<26} {clip(str(raw.get('workload', '?')), 20):<5} {description}  [profiles: "
            f"{clip(profiles, 100)}]"
        )
    return 0


def cmd_launch(args) -> int:
    from dltrain.launch import cmd_launch as launch

    return launch(args)


def cmd_bench(args) -> int:
    from dltrain.bench.cli import cmd_bench as bench

    return bench(args)


def cmd_inspect(args) -> int:
    from dltrain.inspect import cmd_inspect as inspect

    return inspect(args)


def _command(module: str, name: str):
    """`dltrain NAME` runs dltrain.MODULE.cmd_NAME, imported only when used."""

    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(f"dltrain.{module}"), f"cmd_{name}")(args)

    return run


COMMANDS = {
    "train": cmd_train,
    "list": cmd_list,
    "launch": cmd_launch,
    "bench": cmd_bench,
    "inspect": cmd_inspect,
    "eval": _command("evaluate", "eval"),
    "export": _command("export", "export"),
    "schema": _command("schema", "schema"),
}


class _NeverRaised(Exception):
    """Stands in for an error class whose module was never imported (so nothing raised it)."""


def _raised_by(module: str, name: str) -> type[BaseException]:
    """The exception class `module.name` if that module is loaded, else one nothing raises.

    dltrain's own errors live in dltrain.errors, which imports nothing; torch.distributed's does not.
    Importing it up front cost every command torch's import (3-4 s for `dltrain --help`); an except
    clause's class is looked up only when an exception reaches it, and an error of a module that
    was never imported cannot have been raised.
    """
    loaded = sys.modules.get(module)
    return getattr(loaded, name) if loaded is not None else _NeverRaised


def main(argv: list[str] | None = None) -> int:
    from dltrain.errors import Preempted, TrainingError, UserError  # imports nothing heavy

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"dltrain: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingError as exc:
        print(f"dltrain: training stopped: {exc}", file=sys.stderr)
        return EXIT_TRAINING_STOPPED
    except _raised_by("torch.distributed", "DistNetworkError") as exc:
        from dltrain.accel import rendezvous_error

        print(f"dltrain: error: {rendezvous_error(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Preempted as exc:
        print(f"dltrain: preempted: {exc}", file=sys.stderr)
        # Under `dltrain launch` every rank has written its checkpoint by now: exit 0, so torchrun
        # does not SIGTERM a rank still shutting down; the launcher reports the preemption (exit 4).
        return 0 if os.environ.get("DLTRAIN_LAUNCHED") == "1" else EXIT_PREEMPTED
    except ModuleNotFoundError as exc:  # an optional package a lazy import needed (dltrain.extras)
        from dltrain.extras import missing_module_error

        if (line := missing_module_error(exc)) is None:
            raise
        print(f"dltrain: error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("dltrain: interrupted", file=sys.stderr)
        return 130
