"""What launched this process, checked before it trains: the world a launcher was asked for against
the one it started, an all-GPU Accelerate config on a host without GPUs, and how many CPU threads
each process takes. `dltrain launch` applies the same rules before it starts anything.

Accelerate's CPU launcher (`accelerate launch --cpu --num_processes N`, or a config with
`use_cpu: true`) starts one process unless run under mpirun, and passes no process count on: the
only trace of N is the launcher's own command line, which the started process reads (psutil) and
parses with Accelerate's own parser.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
from pathlib import Path

from dltrain.errors import LaunchError

CPU_CONFIG = "launch/cpu_2proc.yaml"
# Set by `dltrain launch` beside the OMP_NUM_THREADS it chose: the value is its default, not the
# user's, so the process still applies train.cpu_threads or cores / local processes itself.
THREADS_AUTO = "DLTRAIN_CPU_THREADS_AUTO"


def cores() -> int:
    """The CPUs this process may run on (its affinity: taskset, cgroups, SLURM's binding)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this job on this node, as the launcher says (torchrun, then MPI); 1 when none."""
    for name in ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def cpu_threads(recipe_threads: int | None, env=None) -> tuple[int, str]:
    """(threads per process, why): train.cpu_threads, else an OMP_NUM_THREADS the user set, else
    cores / local processes, so that N processes never run N x cores threads on the cores.

    The recipe wins over the variable because launchers set the variable themselves (Accelerate and
    torchrun default it to 1), so its value is often not the user's; the recipe key always is."""
    env = os.environ if env is None else env
    if recipe_threads:
        return recipe_threads, "train.cpu_threads"
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1 and not env.get(THREADS_AUTO):
        return int(omp), "OMP_NUM_THREADS"
    n, local = cores(), local_processes()
    return max(1, n // local), f"{n} cores / {local} process{'es' if local > 1 else ''} on this node"


def launcher_thread_env(recipe_threads: int | None, nproc: int) -> dict[str, str]:
    """What `dltrain launch` adds to the environment of `nproc` CPU processes on this node: their
    thread count in OMP_NUM_THREADS (which Accelerate otherwise sets to 1), unless the user set it."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(recipe_threads or max(1, cores() // max(nproc, 1))), THREADS_AUTO: "1"}


# ----------------------------------------------------------------------------------------------
# The launcher's request against what it started


def gpu_config_refusal(config: dict, path: str) -> str | None:
    """The one-line refusal of an Accelerate config that names GPUs (`gpu_ids`, as the root
    accelerate_config.yaml and `accelerate config` write for one process per GPU) on a host with
    none: it would start that many CPU processes instead. None when the config may run here."""
    if config.get("gpu_ids") is None or config.get("use_cpu") or config.get("distributed_type") == "MULTI_CPU":
        return None
    return (
        f"{path} is a GPU config (gpu_ids: {config['gpu_ids']}, {config.get('num_processes', '?')} processes) and "
        f"this host has no GPU: use the CPU config {CPU_CONFIG} (`dltrain list --where launch`), "
        "or `dltrain launch --cpu --nproc N RECIPE`"
    )


def accelerate_launch() -> tuple[object, dict, str] | None:
    """(parsed arguments, config file values, config path) of the `accelerate launch` command that
    started this process, read from the parent's command line; None when the parent is another
    program or cannot be read."""
    try:
        import psutil

        argv = psutil.Process().parent().cmdline()
    except Exception:  # no parent to read (gone, another user's): nothing to check
        return None
    for i, word in enumerate(argv[1:], start=1):
        before = os.path.basename(argv[i - 1])
        if word == "launch" and before in ("accelerate", "accelerate.commands.accelerate_cli"):
            break
    else:
        return None
    from accelerate.commands.config import default_config_file
    from accelerate.commands.launch import launch_command_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, _ = launch_command_parser().parse_known_args(argv[i + 1 :])
    except SystemExit:  # a command line Accelerate itself would not have started us with
        return None
    path = args.config_file or (default_config_file if os.path.isfile(default_config_file) and not args.cpu else None)
    config = {}
    if path:
        from dltrain.recipe_file import RecipeError, read_yaml

        with contextlib.suppress(RecipeError):
            loaded = read_yaml(Path(path), what="Accelerate config")
            config = loaded if isinstance(loaded, dict) else {}
    return args, config, path or ""


def _suggestion(args, n: int) -> str:
    """The command that starts `n` connected CPU processes for what `args` ran."""
    rest = list(args.training_script_args)
    if args.module and args.training_script == "dltrain" and rest[:1] == ["train"]:
        return f"`dltrain launch --cpu --nproc {n} {shlex.join(rest[1:])}`"
    script = shlex.join([*(["-m"] if args.module else []), args.training_script, *rest])
    return f"`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {n} {script}`"


def check_launch(world: int, gpus: int) -> None:
    """Refuse, before the Accelerator exists, a launch that started another world than it was
    asked for: Accelerate's CPU launcher asked for N > 1 processes (it starts one), or a GPU config
    on a host without GPUs. Rank 0 says why in one line (LaunchError); the other ranks exit 2."""
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:  # every `accelerate launch` sets it; other launchers do not
        return
    found = accelerate_launch()
    if found is None:
        return
    args, config, path = found
    message = gpu_config_refusal(config, path) if gpus == 0 else None
    asked = args.num_processes if args.num_processes is not None else config.get("num_processes")
    on_cpu = args.cpu or config.get("use_cpu") or config.get("distributed_type") == "MULTI_CPU"
    if message is None and world == 1 and on_cpu and isinstance(asked, int) and asked > 1 and not args.mpirun_hostfile:
        # A refusal, not a warning: a world of 1 changes the per-process batch and every throughput
        # figure, and one process is one flag away (--num_processes 1) for whoever wants it.
        message = (
            f"accelerate launch asked for {asked} CPU processes but started one (Accelerate's CPU launcher "
            f"starts several only under mpirun), so this would train a world of 1: run "
            f"{_suggestion(args, asked)} for {asked} processes, or pass --num_processes 1 for one"
        )
    if message is None:
        return
    if os.environ.get("RANK", "0") != "0":
        raise SystemExit(2)
    raise LaunchError(message)
