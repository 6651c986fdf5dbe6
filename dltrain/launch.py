"""`dltrain launch`: build (and run) the right launcher command for N processes on M nodes.

Accelerate has several invocations that look right and silently are not on a CPU (README,
"Accelerate on a CPU"): `--cpu --num_processes 2` starts one process, `--multi_gpu` without
ACCELERATE_USE_CPU starts unconnected copies, and ACCELERATE_USE_CPU drops a DeepSpeed plugin. This
module is the one place that knows the working forms, so users and the benchmark harness never
need them by heart:

* one process, no DeepSpeed: plain `python -m dltrain train ...`;
* several processes (or nodes): `accelerate launch --multi_gpu --num_processes TOTAL
  --num_machines M ...`, plus ACCELERATE_USE_CPU=true on a CPU (gloo);
* FSDP (`--fsdp`, or distributed.strategy: fsdp): the several-process form above; the recipe's
  strategy makes dltrain pass Accelerate an FSDP plugin (GPU) or shard the model itself (CPU);
* DeepSpeed: `accelerate launch --use_deepspeed --zero_stage Z ...`, plus DS_ACCELERATOR=cpu on a
  CPU and never ACCELERATE_USE_CPU; several nodes use the `standard` multi-node launcher (one
  torchrun per node, as srun starts them) instead of DeepSpeed's pdsh/ssh launcher.

Running the command in the foreground, with stop signals forwarded to the workers, is
dltrain.supervise's.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from dltrain import supervise
from dltrain.errors import LaunchError  # noqa: F401 - raised here, and imported from here elsewhere

DEFAULT_PORT = 29500


def accelerate_executable() -> str:
    """The `accelerate` of this interpreter's environment, so children run the same dltrain."""
    beside = Path(sys.executable).with_name("accelerate")
    return str(beside) if beside.exists() else "accelerate"


def parse_master(master: str | None) -> tuple[str, int]:
    """(address, port) of `--master ADDR[:PORT]`; the port is a TCP port, 1-65535 (0: any free one,
    which only a single node can use)."""
    if not master:
        return "127.0.0.1", DEFAULT_PORT
    if master.startswith("["):  # an IPv6 address: [ADDR]:PORT or [ADDR]
        host, bracket, rest = master[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else ("" if rest else str(DEFAULT_PORT))
        if not bracket or not host:
            raise LaunchError(f"--master {master!r}: expected [IPv6 ADDRESS]:PORT, e.g. [::1]:29500")
    elif master.count(":") > 1:
        raise LaunchError(
            f"--master {master!r}: an IPv6 address goes in brackets, e.g. [{master}]:29500 or "
            f"[{master}] for port {DEFAULT_PORT}"
        )
    else:
        host, colon, port = master.rpartition(":")
        if not colon:  # an address alone
            host, port = master, str(DEFAULT_PORT)
    if not host or not host.isprintable() or any(c.isspace() for c in host):
        raise LaunchError(
            f"--master {master!r}: expected ADDR:PORT with a host name or IP address, e.g. 10.0.0.1:29500"
        )
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise LaunchError(
            f"--master {master!r}: expected ADDR:PORT, PORT a number from 1 to 65535, e.g. 10.0.0.1:29500"
        )
    return host, int(port)


def build_command(
    *,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master: str | None = None,
    cpu: bool = False,
    deepspeed: int | None = None,
    fsdp: bool = False,
    train_args: list[str],
) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that start `dltrain train TRAIN_ARGS` on this node.

    nproc is the number of processes on this node; accelerate's --num_processes is the total over
    all nodes. On several nodes every node runs this with its own node_rank and the same master.
    """
    if nproc < 1 or nnodes < 1:
        raise LaunchError(f"--nproc {nproc} and --nnodes {nnodes} must be at least 1")
    if nproc * nnodes >= 2**31:  # torch.distributed counts ranks in 32-bit integers
        raise LaunchError(
            f"--nproc {nproc} x --nnodes {nnodes}: more processes than torch.distributed can number (2**31)"
        )
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank {node_rank} is outside 0..{nnodes - 1} for --nnodes {nnodes}")
    if nnodes > 1 and not master:
        raise LaunchError("several nodes need --master ADDR:PORT (the address of node 0, the same on every node)")
    if nnodes > 1 and parse_master(master)[1] == 0:
        raise LaunchError(f"--master {master}: port 0 (any free port) cannot be found by the other nodes: give a port")
    if deepspeed is not None and deepspeed not in (0, 1, 2, 3):
        raise LaunchError(f"--deepspeed {deepspeed}: the ZeRO stage is 0, 1, 2 or 3")
    if fsdp and deepspeed is not None:
        raise LaunchError("--fsdp and --deepspeed are two strategies: pick one")
    if fsdp and nproc * nnodes == 1:
        raise LaunchError("--fsdp shards over several processes: give --nproc 2 or more (or --nnodes)")
    train = ["-m", "dltrain", "train", *train_args]
    env: dict[str, str] = {}
    if deepspeed is None and nproc * nnodes == 1:
        if cpu:
            env["ACCELERATE_USE_CPU"] = "true"
        return [sys.executable, *train], env

    # Precision comes from the recipe (train.precision), which Accelerator() is given explicitly;
    # naming the launcher defaults here only silences accelerate's warning about them.
    argv = [accelerate_executable(), "launch"]
    if deepspeed is not None:
        argv += ["--use_deepspeed", "--zero_stage", str(deepspeed)]
        if cpu:
            env["DS_ACCELERATOR"] = "cpu"  # and not ACCELERATE_USE_CPU, which drops DeepSpeed
    else:
        argv.append("--multi_gpu")  # torchrun underneath; with ACCELERATE_USE_CPU it runs gloo
        if cpu:
            env["ACCELERATE_USE_CPU"] = "true"
    argv += ["--num_processes", str(nproc * nnodes), "--num_machines", str(nnodes)]
    if nnodes > 1:
        host, port = parse_master(master)
        argv += ["--machine_rank", str(node_rank), "--main_process_ip", host, "--main_process_port", str(port)]
        if deepspeed is not None:
            argv += ["--deepspeed_multinode_launcher", "standard"]
    else:
        # Port 0: accelerate picks a free one, so concurrent single-node jobs never collide.
        argv += ["--main_process_port", str(parse_master(master)[1] if master else 0)]
    argv += ["--mixed_precision", "no", "--dynamo_backend", "no", *train]
    return argv, env


def format_command(argv: list[str], env: dict[str, str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])


# ----------------------------------------------------------------------------------------------
# `dltrain launch`


def add_parser(sub, add_train_args) -> None:
    p = sub.add_parser("launch", help="start `dltrain train` on N processes / M nodes with the right launcher")
    p.add_argument("--nproc", type=int, help="processes on this node (default: its GPUs, else 1)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (each runs this command)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    p.add_argument("--master", metavar="ADDR:PORT", help="node 0's address and rendezvous port (several nodes)")
    p.add_argument(
        "--cpu", action="store_true", help="CPU processes talking over gloo (added by itself when no GPU is present)"
    )
    p.add_argument(
        "--deepspeed",
        type=int,
        metavar="STAGE",
        help="DeepSpeed ZeRO stage 0-3 (default: the recipe's deepspeed.zero_stage)",
    )
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (sets distributed.strategy=fsdp; see README)")
    p.add_argument("--dry-run", action="store_true", help="print the command for these options and exit")
    p.add_argument(
        "--config_file",
        metavar="YAML",
        help="an Accelerate config (from `accelerate config`): it decides "
        "the processes and backend; the recipe still sets precision and batch (a warning says when it overrides)",
    )
    add_train_args(p)
    p.add_argument("--resume", nargs="?", const="auto", help="passed on to `dltrain train --resume`")


def _train_args(args, deepspeed: int | None) -> list[str]:
    out = [args.recipe]
    if args.profile:
        out += ["--profile", args.profile]
    for assignment in args.overrides:
        out += ["--set", assignment]
    if deepspeed is not None:
        out += ["--set", f"deepspeed.zero_stage={deepspeed}"]  # the recipe and the launcher agree
    if getattr(args, "fsdp", False):
        out += ["--set", "distributed.strategy=fsdp"]
    if args.output_dir:
        out += ["--output-dir", args.output_dir]
    if args.resume:
        out += ["--resume", args.resume]
    return out


def check_nproc(nproc: int, cpu: bool) -> None:
    """Processes this host can run: one per visible GPU; on a CPU, up to 4 per core (each process
    holds its own torch, ~0.4 GB, and more only time-slice the same cores)."""
    if nproc < 1:
        raise LaunchError(f"--nproc {nproc}: give at least 1 process")
    if cpu:
        cores = os.cpu_count() or 1
        if nproc > 4 * cores:
            raise LaunchError(f"--nproc {nproc}: more than 4 processes per core of this host ({cores} cores)")
        return
    import torch

    if nproc > torch.cuda.device_count():
        raise LaunchError(f"--nproc {nproc}: this node has {torch.cuda.device_count()} visible GPU(s), one per process")


def preflight(recipe, world: int, cpu: bool, deepspeed: int | None) -> None:
    """What would fail in every rank, said once before any process starts (RecipeError, one line):
    the batch arithmetic at this world size, a combination of strategy, compile and precision that
    cannot run here (dltrain.strategy.check), a missing extra (workload, W&B, DeepSpeed)."""
    from dltrain import extras, strategy
    from dltrain.accel import plan_batches
    from dltrain.recipe import RecipeError
    from dltrain.workload import get_workload

    try:
        plan_batches(recipe.train, world)
    except RecipeError as exc:
        raise RecipeError(f"{exc} (this launch starts {world} processes)") from None
    strategy.check(recipe, world, "cpu" if cpu else "cuda")
    extras.check_recipe(recipe, get_workload(recipe.workload))
    if deepspeed is not None:
        extras.require({"deepspeed": "deepspeed"}, f"--deepspeed {deepspeed}")


def config_file_command(args, deepspeed: int | None) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch --config_file FILE ...`: the config decides the distribution; only what
    was given here (--nproc, --nnodes, --master, --deepspeed) is added, and overrides it."""
    if not Path(args.config_file).is_file():
        raise LaunchError(f"--config_file {args.config_file}: no such file (write one with `accelerate config`)")
    argv = [accelerate_executable(), "launch", "--config_file", args.config_file]
    if args.nproc is not None:
        argv += ["--num_processes", str(args.nproc * args.nnodes)]
    if args.nnodes > 1:
        host, port = parse_master(args.master)
        argv += [
            "--num_machines",
            str(args.nnodes),
            "--machine_rank",
            str(args.node_rank),
            "--main_process_ip",
            host,
            "--main_process_port",
            str(port),
        ]
    if deepspeed is not None:
        argv += ["--use_deepspeed", "--zero_stage", str(deepspeed)]
    return [*argv, "-m", "dltrain", "train", *_train_args(args, args.deepspeed)], {}


def config_file_world(args) -> tuple[int, bool]:
    """(processes in all, whether they run on CPUs) of `--config_file`, with --nproc/--nnodes
    winning as they do on the command line; a file that is not an Accelerate config is one line."""
    from dltrain.recipe import RecipeError, read_yaml

    try:
        config = read_yaml(Path(args.config_file), what="Accelerate config")
    except RecipeError as exc:
        raise LaunchError(f"--config_file {args.config_file}: {exc}") from None
    if not isinstance(config, dict):
        raise LaunchError(
            f"--config_file {args.config_file} is not an Accelerate config (a YAML mapping, as "
            "`accelerate config` writes)"
        )
    try:
        world = args.nproc * args.nnodes if args.nproc is not None else int(config.get("num_processes", 1))
    except (TypeError, ValueError):
        raise LaunchError(
            f"--config_file {args.config_file}: num_processes is {config.get('num_processes')!r}, not a number"
        ) from None
    on_cpu = bool(config.get("use_cpu")) or config.get("distributed_type") == "MULTI_CPU"
    return max(world, 1), on_cpu


def cmd_launch(args) -> int:
    from dltrain.recipe import RecipeError, load_recipe

    if args.resume == "auto" and not args.output_dir:
        raise RecipeError("--resume auto continues the run in --output-dir RUN_DIR: give that directory")
    # Check the recipe here, once, before any process starts: a typo fails in one line, not N times.
    # With the stage the processes will get (_train_args), e.g. for an offload that needs it.
    stage = [f"deepspeed.zero_stage={args.deepspeed}"] if args.deepspeed in (0, 1, 2, 3) else []
    stage += ["distributed.strategy=fsdp"] if args.fsdp and args.deepspeed is None else []
    recipe = load_recipe(args.recipe, args.profile, [*args.overrides, *stage])
    deepspeed = args.deepspeed
    if deepspeed is None and recipe.deepspeed is not None and recipe.deepspeed.zero_stage > 0:
        deepspeed = recipe.deepspeed.zero_stage
    if deepspeed is None and recipe.deepspeed is not None and recipe.deepspeed.config_file:
        from dltrain.strategy.deepspeed import config_file_of  # checks the file: a bad one fails here, once

        with open(config_file_of(recipe)) as f:  # the stage the recipe's DeepSpeed JSON sets
            stage = (json.load(f).get("zero_optimization") or {}).get("stage", 0)
        deepspeed = stage if stage in (0, 1, 2, 3) else 0
    cpu, nproc = args.cpu, args.nproc
    if args.config_file:
        try:
            argv, env = config_file_command(args, deepspeed)
            world, on_cpu = config_file_world(args)
        except LaunchError as exc:
            print(f"dltrain: error: {exc}", file=sys.stderr)
            return 2
        preflight(recipe, world, on_cpu, deepspeed)  # as for a launch without a config file
        if not args.dry_run:
            import torch

            from dltrain.launched import gpu_config_refusal, launcher_thread_env
            from dltrain.recipe import read_yaml

            if not torch.cuda.is_available():
                config = read_yaml(Path(args.config_file), what="Accelerate config")
                refusal = gpu_config_refusal(config, args.config_file)
                if refusal:
                    print(f"dltrain: error: {refusal}", file=sys.stderr)
                    return 2
                env |= launcher_thread_env(recipe.train.cpu_threads, world // args.nnodes)
        return _run_or_print(argv, env, args.dry_run, args.output_dir)
    if not args.dry_run:
        import torch

        if not cpu and not torch.cuda.is_available():
            print("dltrain launch: no GPU here, launching CPU processes (gloo)", file=sys.stderr)
            cpu = True
        if nproc is None:
            nproc = 1 if cpu else max(1, torch.cuda.device_count())
    try:
        if not args.dry_run:
            check_nproc(nproc, cpu)
        argv, env = build_command(
            nproc=1 if nproc is None else nproc,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            master=args.master,
            cpu=cpu,
            deepspeed=deepspeed,
            fsdp=args.fsdp or recipe.distributed.strategy == "fsdp",
            train_args=_train_args(args, args.deepspeed),
        )
    except LaunchError as exc:
        print(f"dltrain: error: {exc}", file=sys.stderr)
        return 2
    # After the options themselves (build_command), before anything starts: what every rank would
    # trip over, said once (the batch arithmetic at this world size, fp16 on a CPU, a missing extra).
    preflight(recipe, (1 if nproc is None else nproc) * args.nnodes, cpu, deepspeed)
    if cpu:  # threads per process: cores / processes, not all the cores each (dltrain.launched)
        from dltrain.launched import launcher_thread_env

        env |= launcher_thread_env(recipe.train.cpu_threads, 1 if nproc is None else nproc)
    return _run_or_print(argv, env, args.dry_run, args.output_dir)


def _run_or_print(argv: list[str], env: dict[str, str], dry_run: bool, output_dir: str | None) -> int:
    print(format_command(argv, env), file=sys.stdout if dry_run else sys.stderr, flush=True)
    if dry_run:
        return 0
    return supervise.run_job(argv, env, output_dir)
