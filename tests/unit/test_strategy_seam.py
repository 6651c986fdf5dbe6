"""The strategy seam without training: each backend in one module behind one interface, the loop
and storage modules that never branch on it, no import cycle, and the GPU defects a CPU can show
(what the step keeps across steps, compile with dynamic padding, DeepSpeed's step verdict read
without the loss, DLTRAIN_SYNC_DEBUG's values, the combinations refused before any process)."""

from __future__ import annotations

import ast
import re

import pytest
import torch

from conftest import RECIPES, REPO
from dltrain.recipe import RecipeError, load_recipe

CNN = RECIPES / "cnn_mnist.yaml"
MINILM = RECIPES / "bert_sst2_minilm.yaml"


# ----------------------------------------------------------------------------------------------
# Structure


def _import_graph() -> dict[str, set[str]]:
    """dltrain's modules and the dltrain modules each imports anywhere in its file (lazy imports
    inside functions and TYPE_CHECKING blocks included); a submodule's import of its own parent
    package is left out (Python initialises the parent first in any case)."""
    root = REPO / "dltrain"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        if path.resolve().parent != path.parent.resolve() or any(
            p in ("recipes", "suites", "baselines") for p in parts
        ):
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in modules else base)
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_dltrain():
    graph = _import_graph()
    assert {"dltrain.trainer", "dltrain.strategy.fsdp", "dltrain.bench.runner"} <= graph.keys()
    assert "dltrain.strategy" in graph["dltrain.run"]  # the graph does see imports
    assert _cycles(graph) == []


def test_the_loop_and_storage_never_ask_which_backend_they_hold():
    """trainer, checkpoint (and its checkpoint_scan, storage), export and run call the Strategy
    interface: no name in their code (the identifiers, not comments or messages) is a backend's or
    Accelerate's distributed type."""
    import io
    import tokenize

    banned = {
        "DistributedType",
        "distributed_type",
        "fsdp",
        "deepspeed",
        "DeepSpeed",
        "FSDP",
        "DDP",
        "DistributedDataParallel",
        "zero_stage",
        "unwrap_model",
        "is_sharded",
    }
    for name in ("trainer", "checkpoint", "checkpoint_scan", "storage", "export", "run", "state"):
        source = (REPO / "dltrain" / f"{name}.py").read_text()
        names = {
            tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.NAME
        }
        assert {"strategy", "Loop", "Path"} & names, name  # the file was read
        assert not names & banned, f"dltrain/{name}.py names {sorted(names & banned)}"


def test_one_module_per_backend_behind_one_interface():
    from dltrain.strategy import DDP, FSDP, STRATEGIES, DeepSpeed, Strategy

    assert STRATEGIES == {"ddp": DDP, "fsdp": FSDP, "deepspeed": DeepSpeed}
    interface = {n for n in dir(Strategy) if not n.startswith("_")}
    for cls in (DDP, FSDP, DeepSpeed):
        assert issubclass(cls, Strategy) and cls.__module__ == f"dltrain.strategy.{cls.name}"
        for method in ("setup", "backward", "step", "zero_grad", "module", "full_state_dict", "save", "load"):
            assert method in vars(cls), f"{cls.__name__} lacks {method}"
    assert {"setup", "step", "full_state_dict", "check_replicas", "refusal"} <= interface


# ----------------------------------------------------------------------------------------------
# a: what the step keeps across steps


def test_what_the_step_keeps_never_shares_storage_with_the_steps_output():
    """CUDA graph trees overwrite a graph's outputs at the next replay: the metrics window must
    hold copies. Here every tensor the window keeps is checked against the output's storage."""
    from dltrain.metrics import add_train_stats, window_sums
    from dltrain.plugin import classification_output

    window: dict = {}
    outputs = []
    for seed in range(3):
        torch.manual_seed(seed)
        out = classification_output(torch.randn(8, 10), torch.randint(0, 10, (8,)))
        for dtype in (torch.float32, torch.float64):  # a float64 loss must not be kept as itself either
            loss = out.loss.detach().to(dtype)
            add_train_stats(window, loss, out.stats, 8)
            outputs += [loss, *out.stats.values()]
    output_storages = {t.untyped_storage().data_ptr() for t in outputs}
    kept = [t for values in window.values() for t in values if torch.is_tensor(t)]
    assert len(kept) == 12  # 6 losses and 6 "correct" sums
    assert not {t.untyped_storage().data_ptr() for t in kept} & output_storages
    assert window_sums(window)["count"].item() == 48


# ----------------------------------------------------------------------------------------------
# d: compile needs few batch shapes


def test_compile_with_dynamic_padding_is_refused_naming_bucket_padding():
    with pytest.raises(RecipeError, match=r"train.compile with data.padding=dynamic .* set data.padding=bucket"):
        load_recipe(MINILM, "cpu_test", ["train.compile.enabled=true"])
    assert load_recipe(MINILM, "cpu_test", ["train.compile.enabled=true", "data.padding=bucket"]).train.compile.enabled
    assert load_recipe(MINILM, "cpu_test", ["train.compile.enabled=true", "train.compile.dynamic=true"])


# ----------------------------------------------------------------------------------------------
# e: DeepSpeed's step verdict


class _Engine:
    def __init__(self, applied: bool):
        self.applied = applied

    def was_step_applied(self) -> bool:
        return self.applied


class _NoHostRead(torch.Tensor):
    """A loss whose value must not be read on the host."""

    def item(self):  # noqa: D102
        raise AssertionError("the loss was read back to the host")

    def tolist(self):  # noqa: D102
        raise AssertionError("the loss was read back to the host")

    def __bool__(self):
        raise AssertionError("the loss was read back to the host")


def test_deepspeed_takes_the_engines_verdict_and_never_reads_the_loss():
    from types import SimpleNamespace

    from dltrain.strategy import DeepSpeed

    backend = DeepSpeed(SimpleNamespace(device=torch.device("cpu")), recipe=None, plan=None)
    loss = torch.tensor(float("nan")).as_subclass(_NoHostRead)
    backend.model = _Engine(applied=False)
    [(kind, flag)] = backend.step(loss)
    assert kind == "nonfinite" and float(flag) == 1.0
    backend.model = _Engine(applied=True)
    assert backend.step(loss) == []


# ----------------------------------------------------------------------------------------------
# k: DLTRAIN_SYNC_DEBUG


def test_sync_debug_takes_torchs_modes_and_refuses_others(monkeypatch):
    from dltrain.trainer import sync_debug_mode

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for value, mode in (("", None), ("0", None), ("1", "warn"), ("warn", "warn"), ("ERROR", "error")):
        monkeypatch.setenv("DLTRAIN_SYNC_DEBUG", value)
        assert sync_debug_mode(cuda) == mode
        assert sync_debug_mode(cpu) is None
    monkeypatch.setenv("DLTRAIN_SYNC_DEBUG", "yes please")
    with pytest.raises(RecipeError, match="DLTRAIN_SYNC_DEBUG=yes please: not a mode: use warn"):
        sync_debug_mode(cpu)


# ----------------------------------------------------------------------------------------------
# Combinations refused before any process starts


@pytest.mark.parametrize(
    "overrides, world, device, message",
    [
        (["distributed.strategy=fsdp"], 1, "cpu", "shards over several processes and this run has one"),
        (
            ["distributed.strategy=fsdp", "train.precision=fp16"],
            2,
            "cuda",
            "fsdp with train.precision=fp16 needs a sharded",
        ),
        (["deepspeed.zero_stage=3", "train.compile.enabled=true"], 2, "cpu", "zero_stage=3 with train.compile"),
        (["train.precision=fp16"], 1, "cpu", "fp16 needs a CUDA GPU"),
    ],
)
def test_combinations_that_cannot_run_are_refused_in_one_line(overrides, world, device, message):
    from dltrain import strategy

    recipe = load_recipe(CNN, "cpu_test", overrides)
    with pytest.raises(RecipeError, match=re.escape(message)):
        strategy.check(recipe, world, device)


def test_combinations_that_run_are_not_refused():
    from dltrain import strategy

    for overrides in (
        ["train.compile.enabled=true"],
        ["distributed.strategy=fsdp", "train.compile.enabled=true", "train.precision=bf16"],
        ["deepspeed.zero_stage=2", "train.compile.enabled=true"],
        ["deepspeed.zero_stage=3"],
    ):
        recipe = load_recipe(CNN, "cpu_test", overrides)
        assert strategy.check(recipe, 2, "cpu").name == recipe.distributed.strategy


def test_the_launcher_refuses_a_combination_before_any_process_starts(tmp_path):
    from conftest import run_cli

    out = tmp_path / "run"
    done = run_cli(
        "launch",
        str(CNN),
        "--profile",
        "cpu_test",
        "--cpu",
        "--nproc",
        "2",
        "--deepspeed",
        "3",
        "--set",
        "train.compile.enabled=true",
        "--output-dir",
        str(out),
    )
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.startswith("dltrain: error:")] == [
        line for line in done.stderr.splitlines() if line.strip()
    ]
    assert "zero_stage=3 with train.compile" in done.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# g: what the RNN computes in under CUDA autocast


def test_the_rnns_recurrent_layers_leave_bf16_autocast_and_the_summary_says_so():
    """cuDNN's RNN runs fp16 under CUDA autocast whatever dtype was asked: a 'bf16' RNN row was fp16
    without a loss scaler. The recurrent layers run in fp32 under bf16 autocast, and the workload
    reports it; fp16 autocast and the CPU are left as they are."""
    from unittest import mock

    from dltrain.workload import get_workload
    from dltrain.workloads import rnn

    with (
        mock.patch.object(torch, "is_autocast_enabled", lambda device=None: device == "cuda"),
        mock.patch.object(torch, "get_autocast_dtype", lambda device: torch.bfloat16),
    ):
        assert rnn.recurrent_in_fp32("cuda") and not rnn.recurrent_in_fp32("cpu")
    with (
        mock.patch.object(torch, "is_autocast_enabled", lambda device=None: True),
        mock.patch.object(torch, "get_autocast_dtype", lambda device: torch.float16),
    ):
        assert not rnn.recurrent_in_fp32("cuda")
    workload = get_workload("rnn")
    bf16 = load_recipe(RECIPES / "rnn_sine.yaml", "cpu_test", ["train.precision=bf16"])
    assert workload.compute_dtypes(bf16, "cuda")["recurrent layers"].startswith("fp32")
    assert workload.compute_dtypes(bf16, "cpu") == {}
    assert workload.compute_dtypes(load_recipe(RECIPES / "rnn_sine.yaml", "cpu_test"), "cuda") == {}
