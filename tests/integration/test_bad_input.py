"""Bad input, table-driven: every case must exit non-zero with one readable line that names the
problem, and never show a traceback.

Cases that fail while the recipe is read run in this process through `dltrain.cli.main` (an
uncaught exception there is exactly what would print a traceback; a fresh interpreter per case
would cost ~2.5 s of imports each). Cases that touch data, Accelerate, a process group or a
checkpoint run as real `python -m dltrain` subprocesses.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import RECIPES, REPO, run_cli
from resume_helpers import TINY, error_lines

CNN = str(RECIPES / "cnn_mnist.yaml")
BERT = str(RECIPES / "bert_sst2_minilm.yaml")
EXIT_BAD_INPUT = 2


@dataclass
class Case:
    id: str
    args: list[str]  # after `dltrain train`; {name} placeholders are filled from the workspace
    expect: str  # must appear (case-insensitive) in the error line
    inproc: bool = False  # fails while reading the recipe: run through cli.main in this process
    env: dict = field(default_factory=dict)
    prelude: str | None = None  # python code run before main(), e.g. to hide an installed package
    needs: tuple = ()  # workspace parts: "mnist", "ckpt", "bert", "port"


def _set(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


HIDE_DEEPSPEED = "import sys; sys.modules['deepspeed'] = None  # as if it were not installed"
CPU_TEST = [CNN, "--profile", "cpu_test"]


def _text(train_file: str, *sets: str) -> list[str]:
    """The BERT cpu_test recipe on one of _text_files' files (a good file for evaluation)."""
    return [
        BERT,
        "--profile",
        "cpu_test",
        *_set("model.name_or_path={minilm}", f"data.train_file={train_file}", "data.eval_file={sst_ok}", *sets),
        "--output-dir",
        "{tmp}/run",
    ]


CASES = [
    # --- the recipe: keys, types, ranges, files, profiles, overrides
    Case("unknown-key", [*CPU_TEST, *_set("optimizer.lr=0.1")], "unknown key 'optimizer'", inproc=True),
    Case("misspelt-key-in-file", ["{misspelt_yaml}"], "unknown key 'optim.lrr'", inproc=True),
    Case("misspelt-key-set", [*CPU_TEST, *_set("train.epocs=2")], "unknown key 'train.epocs'", inproc=True),
    Case("wrong-type-int", [*CPU_TEST, *_set("train.epochs=abc")], "train.epochs", inproc=True),
    Case("wrong-type-bool", [*CPU_TEST, *_set("tracking.wandb=maybe")], "tracking.wandb", inproc=True),
    Case("wrong-type-list", [*CPU_TEST, *_set("optim.lr=[1,2]")], "optim.lr", inproc=True),
    Case("negative-lr", [*CPU_TEST, *_set("optim.lr=-1")], "optim.lr", inproc=True),
    Case("fraction-above-1", [*CPU_TEST, *_set("data.val_fraction=1.5")], "data.val_fraction", inproc=True),
    Case("beta-out-of-range", [*CPU_TEST, *_set("optim.betas=[0.9,1.5]")], "betas", inproc=True),
    Case("unknown-precision", [*CPU_TEST, *_set("train.precision=fp8")], "train.precision", inproc=True),
    Case("zero-batch", [*CPU_TEST, *_set("train.global_batch_size=0")], "train.global_batch_size", inproc=True),
    Case(
        "zero-checkpoint-interval",
        [*CPU_TEST, *_set("checkpoint.every_steps=0")],
        "checkpoint.every_steps",
        inproc=True,
    ),
    Case("missing-recipe-file", ["{tmp}/no-such-recipe.yaml"], "recipe file not found", inproc=True),
    Case("invalid-yaml", ["{broken_yaml}"], "invalid YAML", inproc=True),
    Case("yaml-not-a-mapping", ["{list_yaml}"], "mapping", inproc=True),
    Case("unknown-workload", ["{gan_yaml}"], "unknown workload 'gan'", inproc=True),
    Case("missing-workload", ["{no_workload_yaml}"], "workload", inproc=True),
    Case("unknown-profile", [CNN, "--profile", "gpu_huge"], "unknown profile 'gpu_huge'", inproc=True),
    Case("set-without-equals", [*CPU_TEST, "--set", "train.epochs"], "expected key.path=value", inproc=True),
    Case("set-through-a-value", [*CPU_TEST, *_set("train.epochs.max=1")], "'train.epochs' is a value", inproc=True),
    Case("set-missing-path", [*CPU_TEST, *_set("model.depth=3")], "unknown key 'model.depth'", inproc=True),
    Case("resume-auto-without-output-dir", [*CPU_TEST, "--resume", "auto"], "--output-dir", inproc=True),
    # --- the environment: precision, batch arithmetic, DeepSpeed, output directory, rendezvous
    Case("fp16-on-cpu", [*CPU_TEST, *_set("train.precision=fp16"), "--output-dir", "{tmp}/run"], "fp16", inproc=True),
    Case(
        "batch-not-divisible",
        [*CPU_TEST, *_set("train.micro_batch_size=48"), "--output-dir", "{tmp}/run"],
        "micro_batch_size",
        inproc=True,
    ),
    Case(
        "deepspeed-not-installed",
        [*CPU_TEST, *_set("deepspeed.zero_stage=2"), "--output-dir", "{tmp}/run"],
        "not installed",
        prelude=HIDE_DEEPSPEED,
    ),
    Case(
        "deepspeed-without-launcher",
        [*CPU_TEST, *_set("deepspeed.zero_stage=2"), "--output-dir", "{tmp}/run"],
        "launcher",
        inproc=True,
    ),
    Case("output-dir-under-a-file", [*CPU_TEST, "--output-dir", "{a_file}/run"], "cannot write to output directory"),
    Case("output-dir-under-dev-null", [*CPU_TEST, "--output-dir", "/dev/null/run"], "cannot write to output directory"),
    Case("output-dir-holds-a-run", [*CPU_TEST, "--output-dir", "{old_run}"], "already holds a run"),
    Case(
        "rendezvous-port-in-use",
        [*CPU_TEST, "--output-dir", "{tmp}/run"],
        "port is already in use",
        env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "{port}", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"},
        needs=("port",),
    ),
    # --- MNIST files
    Case(
        "mnist-corrupt-gz",
        [*TINY, "--output-dir", "{tmp}/run"],
        "corrupt (MD5",
        env={"DLTRAIN_DATA_DIR": "{mnist_garbage}"},
        needs=("mnist",),
    ),
    Case(
        "mnist-truncated-gz",
        [*TINY, "--output-dir", "{tmp}/run"],
        "corrupt (MD5",
        env={"DLTRAIN_DATA_DIR": "{mnist_half}"},
        needs=("mnist",),
    ),
    Case(
        "mnist-truncated-unzipped",
        [*TINY, "--output-dir", "{tmp}/run"],
        "cannot be read",
        env={"DLTRAIN_DATA_DIR": "{mnist_raw_cut}"},
        needs=("mnist",),
    ),
    Case(
        "mnist-missing-offline",
        [*TINY, "--output-dir", "{tmp}/run"],
        "MNIST not found",
        env={"DLTRAIN_DATA_DIR": "{tmp}/empty_root", "HF_HUB_OFFLINE": "1"},
        needs=("mnist",),
    ),
    Case(
        "batch-larger-than-dataset",
        [*TINY, *_set("data.train_subset=10"), "--output-dir", "{tmp}/run"],
        "larger than the training set",
        needs=("mnist",),
    ),
    # --- checkpoints
    Case(
        "resume-missing-checkpoint",
        [*TINY, "--resume", "{tmp}/nowhere/step_3", "--output-dir", "{tmp}/run"],
        "no such checkpoint",
    ),
    Case(
        "resume-incomplete-checkpoint",
        [*TINY, "--resume", "{ckpt_incomplete}", "--output-dir", "{tmp}/run"],
        "incomplete",
        needs=("ckpt",),
    ),
    Case(
        "resume-truncated-checkpoint",
        [*TINY, "--resume", "{ckpt_truncated}", "--output-dir", "{tmp}/run"],
        "bytes",
        needs=("ckpt",),
    ),
    Case(
        "resume-bit-flipped-checkpoint",
        [*TINY, "--resume", "{ckpt_flipped}", "--output-dir", "{tmp}/run"],
        "checksum",
        needs=("ckpt",),
    ),
    Case(
        "resume-pickle-with-code",
        [*TINY, "--resume", "{ckpt_evil}", "--output-dir", "{tmp}/run"],
        "cannot load checkpoint",
        needs=("ckpt",),
    ),
    Case(
        "resume-other-model",
        [*TINY, *_set("model.hidden=64"), "--resume", "{ckpt}", "--output-dir", "{tmp}/run"],
        "different model",
        needs=("ckpt",),
    ),
    Case(
        "resume-other-global-batch",
        [*TINY, *_set("train.global_batch_size=32"), "--resume", "{ckpt}", "--output-dir", "{tmp}/run"],
        "train.global_batch_size",
        needs=("ckpt",),
    ),
    # --- SST-2 / BERT (the workload of issue 3)
    Case(
        "sst2-missing-column",
        [
            BERT,
            "--profile",
            "cpu_test",
            *_set("model.name_or_path={minilm}", "data.train_file={sst_nocol}", "data.eval_file={sst_ok}"),
            "--output-dir",
            "{tmp}/run",
        ],
        "sentence",
        needs=("bert",),
    ),
    Case(
        "sst2-non-binary-labels",
        [
            BERT,
            "--profile",
            "cpu_test",
            *_set("model.name_or_path={minilm}", "data.train_file={sst_labels}", "data.eval_file={sst_ok}"),
            "--output-dir",
            "{tmp}/run",
        ],
        "labels must be 0 or 1",
        needs=("bert",),
    ),
    Case(
        "sst2-empty",
        [
            BERT,
            "--profile",
            "cpu_test",
            *_set("model.name_or_path={minilm}", "data.train_file={sst_empty}", "data.eval_file={sst_ok}"),
            "--output-dir",
            "{tmp}/run",
        ],
        "empty.tsv",
        needs=("bert",),
    ),
    Case(
        "hub-model-offline",
        [
            BERT,
            "--profile",
            "cpu_test",
            *_set("model.name_or_path=nobody-here/no-such-model"),
            "--output-dir",
            "{tmp}/run",
        ],
        "no-such-model",
        env={"HF_HUB_OFFLINE": "1"},
        needs=("bert",),
    ),
    # --- issue 14: data (MNIST root and cache, tokenized cache, TSV rows)
    Case(
        "mnist-val-split-empty",
        [*TINY, *_set("data.val_fraction=0.000001"), "--output-dir", "{tmp}/run"],
        "data.val_fraction=1e-06 holds out no image",
        needs=("mnist",),
    ),
    Case("cnn-num-classes-below-labels", [*CPU_TEST, *_set("model.num_classes=9")], "model.num_classes", inproc=True),
    Case("cnn-data-root-empty-string", [*CPU_TEST, *_set("data.root=''")], "data.root", inproc=True),
    Case("cnn-std-infinite", [*CPU_TEST, *_set("data.std=.inf")], "data.std", inproc=True),
    Case("cnn-num-workers-huge", [*CPU_TEST, *_set("data.num_workers=100000")], "data.num_workers", inproc=True),
    Case(
        "rnn-val-split-empty",
        [str(RECIPES / "rnn_sine.yaml"), "--profile", "cpu_test", *_set("data.val_fraction=0.0001")],
        "data.val_fraction=0.0001 leaves the validation split empty",
        inproc=True,
    ),
    Case(
        "rnn-data-seed-past-generator",
        [str(RECIPES / "rnn_sine.yaml"), *_set(f"data.seed={2**64}")],
        "data.seed",
        inproc=True,
    ),
    Case("rnn-noise-infinite", [str(RECIPES / "rnn_sine.yaml"), *_set("data.noise=.inf")], "data.noise", inproc=True),
    Case(
        "rnn-model-past-memory",
        [
            str(RECIPES / "rnn_sine.yaml"),
            "--profile",
            "cpu_test",
            *_set("model.hidden=300000000"),
            "--output-dir",
            "{tmp}/run",
        ],
        "not enough memory for the model",
    ),
    Case(
        "bert-one-label", [BERT, "--profile", "cpu_test", *_set("model.num_labels=1")], "model.num_labels", inproc=True
    ),
    Case(
        "bert-text-column-empty",
        [BERT, "--profile", "cpu_test", *_set("data.text_column=''")],
        "data.text_column",
        inproc=True,
    ),
    Case(
        "sst2-ragged-row",
        [
            BERT,
            "--profile",
            "cpu_test",
            *_set("model.name_or_path={minilm}", "data.train_file={sst_ragged}", "data.eval_file={sst_ok}"),
            "--output-dir",
            "{tmp}/run",
        ],
        "ragged.tsv, line 3: 3 tab-separated fields",
        needs=("bert",),
    ),
    Case(
        "bert-max-length-past-positions",
        [
            BERT,
            "--profile",
            "cpu_test",
            *_set(
                "model.name_or_path={minilm}",
                "data.train_file={sst_ok}",
                "data.eval_file={sst_ok}",
                "data.max_length=1000",
                "data.padding=fixed",
            ),
            "--output-dir",
            "{tmp}/run",
        ],
        "data.max_length=1000 is more than the 512 positions",
        needs=("bert",),
    ),
    # --- issue 14: recipes, schema bounds, the command line
    Case(
        "alias-bomb-in-set",
        [
            *CPU_TEST,
            *_set(
                "description=["
                + ", ".join(
                    ["&a0 [x, x, x, x, x, x, x, x, x]"]
                    + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
                )
                + "]"
            ),
        ],
        "aliases",
        inproc=True,
    ),
    Case(
        "recipe-not-utf8",
        ["{tmp}/latin1.yaml"],
        "not UTF-8",
        env={"LATIN1_RECIPE": "{tmp}/latin1.yaml"},
        prelude="import os, sys; open(os.environ['LATIN1_RECIPE'], 'wb').write(b'workload: cnn\\ndescription: "
        "caf\\xe9\\n')",
    ),
    Case(
        "huge-value-echoed-short",
        [*CPU_TEST, *_set("train.precision=" + "x" * 100_000)],
        "train.precision",
        inproc=True,
    ),
    Case("int-past-yaml-digit-limit", [*CPU_TEST, *_set("train.seed=" + "9" * 5000)], "train.seed", inproc=True),
    Case(
        "epochs-and-max-steps-empty",
        [*CPU_TEST, *_set("train.epochs=null", "train.max_steps=null")],
        "train.epochs and train.max_steps are both empty",
        inproc=True,
    ),
    Case("lr-inf", [*CPU_TEST, *_set("optim.lr=.inf")], "optim.lr", inproc=True),
    Case("seed-past-int64", [*CPU_TEST, *_set("train.seed=9223372036854775808")], "train.seed", inproc=True),
    Case("name-is-a-path", [*CPU_TEST, *_set("name=../escaped")], "a name, not a path", inproc=True),
    Case("name-empty", [*CPU_TEST, *_set("name=' '")], "'name'", inproc=True),
    Case("name-with-newline", [*CPU_TEST, *_set('name="a\\nb"')], "control characters", inproc=True),
    Case(
        "wandb-project-refused-by-wandb",
        [*CPU_TEST, *_set("tracking.project=team/proj")],
        "tracking.project",
        inproc=True,
    ),
    Case("wandb-tag-too-long", [*CPU_TEST, *_set("tracking.tags=[" + "t" * 65 + "]")], "tracking.tags.0", inproc=True),
    Case(
        "keep-last-past-int64", [*CPU_TEST, *_set(f"checkpoint.keep_last={2**70}")], "checkpoint.keep_last", inproc=True
    ),
    Case(
        "target-metric-never-reported",
        [*CPU_TEST, *_set("target.metric=val/acc")],
        "val/loss, val/accuracy",
        inproc=True,
    ),
    Case("target-value-nan", [*CPU_TEST, *_set("target.value=.nan")], "target.value", inproc=True),
    Case(
        "save-best-without-target",
        [*CPU_TEST, *_set("checkpoint.save_best=true", "target=null")],
        "checkpoint.save_best",
        inproc=True,
    ),
    Case(
        "deepspeed-offload-below-its-stage",
        [*CPU_TEST, *_set("deepspeed.offload_optimizer=cpu")],
        "deepspeed.offload_optimizer needs",
        inproc=True,
    ),
    # --- issue 14: run directories (locks, resume with changes, confinement, metrics.jsonl, disk full)
    Case("run-dir-in-use", [*CPU_TEST, "--output-dir", "{locked_run}"], "in use by another run (pid", inproc=True),
    Case(
        "resume-auto-run-dir-in-use",
        [*CPU_TEST, "--resume", "auto", "--output-dir", "{locked_run}"],
        "in use by another run (pid",
        inproc=True,
    ),
    Case(
        "checkpoint-dir-climbs-out",
        [*CPU_TEST, *_set("checkpoint.dir=../../elsewhere"), "--output-dir", "{tmp}/run"],
        "leads outside the run directory",
        inproc=True,
    ),
    Case(
        "checkpoint-dir-absolute",
        [*CPU_TEST, *_set("checkpoint.dir={tmp}/scratch"), "--output-dir", "{tmp}/run"],
        "checkpoint.outside_run_dir=true",
        inproc=True,
    ),
    Case(
        "resume-given-a-run-dir",
        [*TINY, "--resume", "{ckpt_run}", "--output-dir", "{tmp}/run"],
        "is a run directory, not a checkpoint",
        inproc=True,
        needs=("ckpt",),
    ),
    Case(
        "resume-other-optimizer",
        [*TINY, *_set("optim.name=sgd"), "--resume", "{ckpt}", "--output-dir", "{tmp}/run"],
        "different optim.name",
        needs=("ckpt",),
    ),
    Case(
        "resume-other-seed",
        [*TINY, *_set("train.seed=3", "optim.lr=0.01"), "--resume", "{ckpt}", "--output-dir", "{tmp}/run"],
        "different train.seed",
        needs=("ckpt",),
    ),
    Case(
        "resume-past-the-end",
        [*TINY, *_set("train.max_steps=1"), "--resume", "{ckpt}", "--output-dir", "{tmp}/run"],
        "past the end of this recipe",
        needs=("ckpt",),
    ),
    Case(
        "disk-full-in-checkpoint",
        [*TINY, "--output-dir", "{tmp}/run"],
        "no space left on device",
        env={"DLTRAIN_TEST_ENOSPC_IN_SAVE": "2"},
        needs=("mnist",),
    ),
    # --- combinations refused at start (issue 19) and what the second probe found (issue 22)
    Case(
        "compile-with-dynamic-padding",
        [BERT, "--profile", "cpu_test", *_set("train.compile.enabled=true")],
        "set data.padding=bucket",
        inproc=True,
    ),
    Case(
        "fsdp-on-one-process",
        [*CPU_TEST, *_set("distributed.strategy=fsdp"), "--output-dir", "{tmp}/run"],
        "shards over several processes and this run has one",
        needs=("mnist",),
    ),
    Case(
        "sync-debug-not-a-mode",
        [*TINY, "--output-dir", "{tmp}/run"],
        "DLTRAIN_SYNC_DEBUG=yes: not a mode",
        env={"DLTRAIN_SYNC_DEBUG": "yes"},
        needs=("mnist",),
    ),
    Case(
        "polynomial-warmup-covers-all-steps",
        [*TINY, *_set("schedule.name=polynomial", "schedule.warmup_fraction=1.0"), "--output-dir", "{tmp}/run"],
        "the warm-up (20 steps) covers all 20",
        needs=("mnist",),
    ),
    Case(
        "resume-auto-without-output-dir",
        [*CPU_TEST, "--resume", "auto"],
        "give it (output_dir, --output-dir",
        inproc=True,
    ),
    # --- issue 22, item 10: text files whose rows crashed the tokenizer or gave messages without a line
    Case(
        "text-null-in-jsonl",
        [*_text("{null_text}")],
        "null_text.jsonl, line 2: no text in column 'sentence'",
        needs=("bert",),
    ),
    Case(
        "text-pair-null-in-jsonl",
        [*_text("{null_pair}", "data.text_pair_column=pair")],
        "null_pair.jsonl, line 3: no text in column 'pair'",
        needs=("bert",),
    ),
    Case(
        "labels-mixing-ids-and-names",
        [*_text("{mixed_labels}", "data.label_names=null")],
        "mixed_labels.jsonl, line 2: label 'positive' is a name where line 1 has an id",
        needs=("bert",),
    ),
    Case(
        "label-missing-in-csv",
        [*_text("{no_label}", "data.label_names=null")],
        "no_label.csv, line 3: no label",
        needs=("bert",),
    ),
    Case("csv-not-utf8", [*_text("{latin1_csv}")], "latin1.csv, line 2: not UTF-8", needs=("bert",)),
    Case("jsonl-line-not-json", [*_text("{bad_jsonl}")], "bad.jsonl, line 2: not JSON", needs=("bert",)),
]


# ----------------------------------------------------------------------------------------------
# The workspace: files each case points at, made once per module


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _recipe_files(tmp: Path) -> dict:
    made = {
        "misspelt_yaml": _write(tmp / "misspelt.yaml", "workload: cnn\noptim:\n  lrr: 0.1\n"),
        "broken_yaml": _write(tmp / "broken.yaml", "workload: cnn\noptim: [unclosed\n"),
        "list_yaml": _write(tmp / "list.yaml", "- workload\n- cnn\n"),
        "gan_yaml": _write(tmp / "gan.yaml", "workload: gan\n"),
        "no_workload_yaml": _write(tmp / "no_workload.yaml", "optim:\n  lr: 0.1\n"),
        "a_file": _write(tmp / "a_file", "not a directory\n"),
    }
    old = tmp / "old_run"
    _write(old / "metrics.jsonl", '{"step": 1, "train/loss": 2.3}\n')
    made["old_run"] = str(old)
    return made


def _mnist_roots(tmp: Path, data_dir: Path) -> dict:
    real = data_dir / "MNIST" / "raw"
    names = sorted(p.name for p in real.glob("*.gz"))
    roots = {}
    for kind in ("garbage", "half", "raw_cut"):
        raw = tmp / f"mnist_{kind}" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        roots[f"mnist_{kind}"] = str(raw.parent.parent)
        for name in names:
            src = real / name
            if kind == "raw_cut":  # unzipped files, the images of the train set cut short
                data = gzip.decompress(src.read_bytes())
                if name.startswith("train-images"):
                    data = data[: len(data) // 3]
                (raw / name[:-3]).write_bytes(data)
            elif name.startswith("train-images"):
                blob = src.read_bytes()
                (raw / name).write_bytes(os.urandom(len(blob)) if kind == "garbage" else blob[: len(blob) // 2])
            else:
                (raw / name).symlink_to(src)
    (tmp / "empty_root").mkdir()
    return roots


def _checkpoints(tmp: Path) -> dict:
    """A real run stopped (SIGTERM, exit 4) after step 2, then damaged copies of its checkpoint."""
    run = tmp / "ckpt_run"
    done = run_cli("train", *TINY, "--output-dir", str(run), env={"DLTRAIN_TEST_SIGNAL_AT_STEP": "2"})
    assert done.returncode == 4, done.stderr[-2000:]
    good = run / "checkpoints" / "step_2"
    made = {"ckpt": str(good), "ckpt_run": str(run)}

    def copy(name: str) -> Path:
        dst = tmp / "ckpts" / name / "step_2"
        shutil.copytree(good, dst)
        made[f"ckpt_{name}"] = str(dst)
        return dst

    (copy("incomplete") / "manifest.json").unlink()
    cut = copy("truncated") / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[:-100])
    flip = copy("flipped") / "optimizer.bin"
    blob = bytearray(flip.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    flip.write_bytes(bytes(blob))
    evil = copy("evil")
    made["pwned"] = str(tmp / "PWNED")
    _plant_code_in_pickle(evil / "scheduler.pt", Path(made["pwned"]))
    manifest = json.loads((evil / "manifest.json").read_text())  # a crafted file that passes the checksums
    from dltrain.data import sha256_of as _sha256

    manifest["files"]["scheduler.pt"] = {
        "size": (evil / "scheduler.pt").stat().st_size,
        "sha256": _sha256(evil / "scheduler.pt"),
    }
    (evil / "manifest.json").write_text(json.dumps(manifest))
    return made


class _RunsCode:
    """Unpickling this calls os.system: what weights_only=True must refuse to do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_code_in_pickle(path: Path, marker: Path) -> None:
    import torch

    torch.save({"last_epoch": 2, "payload": _RunsCode(marker)}, path)


def _sst2_files(tmp: Path) -> dict:
    return {
        "sst_ok": _write(tmp / "sst" / "ok.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\n"),
        "sst_nocol": _write(tmp / "sst" / "nocol.tsv", "text\tlabel\ngood film\t1\nbad film\t0\n"),
        "sst_labels": _write(tmp / "sst" / "labels.tsv", "sentence\tlabel\ngood film\t1\nso so\t3\n"),
        "sst_empty": _write(tmp / "sst" / "empty.tsv", "sentence\tlabel\n"),
        "sst_ragged": _write(tmp / "sst" / "ragged.tsv", "sentence\tlabel\ngood film\t1\nbad\tfilm\t0\n"),
    }


def _text_files(tmp: Path) -> dict:
    """Issue 22, item 10: each with its defect on the line its case names."""
    made = {
        "null_text": _write(
            tmp / "text" / "null_text.jsonl", '{"sentence": "good", "label": 1}\n{"sentence": null, "label": 0}\n'
        ),
        "null_pair": _write(
            tmp / "text" / "null_pair.jsonl",
            '{"sentence": "a", "pair": "b", "label": 1}\n\n{"sentence": "c", "pair": null, "label": 0}\n',
        ),  # a blank line counts
        "mixed_labels": _write(
            tmp / "text" / "mixed_labels.jsonl",
            '{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": "positive"}\n',
        ),
        "no_label": _write(tmp / "text" / "no_label.csv", "sentence,label\ngood film,1\nbad film,\nfine,0\n"),
        "bad_jsonl": _write(
            tmp / "text" / "bad.jsonl", '{"sentence": "good", "label": 1}\n{"sentence": "bad", label: 0}\n'
        ),
    }
    (tmp / "text" / "latin1.csv").write_bytes("sentence,label\ncaf\u00e9 au lait,1\nbad,0\n".encode("latin-1"))
    return made | {"latin1_csv": str(tmp / "text" / "latin1.csv")}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("bad_input")
    values = {"tmp": str(tmp), **_recipe_files(tmp)}
    wanted = {need for case in CASES for need in case.needs}
    if "mnist" in wanted or "ckpt" in wanted:
        data_dir = request.getfixturevalue("data_dir")
        values |= _mnist_roots(tmp, data_dir)
    if "ckpt" in wanted:
        values |= _checkpoints(tmp)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    values["port"] = str(busy.getsockname()[1])
    from dltrain.rundir import RunLock

    (tmp / "locked_run").mkdir()
    held = RunLock(tmp / "locked_run")  # as a live run holds its directory
    values["locked_run"] = str(tmp / "locked_run")
    yield values
    held.release()
    busy.close()


def _fill(text: str, values: dict) -> str:
    return text.format(**values) if "{" in text else text


# ----------------------------------------------------------------------------------------------


def _run_inproc(args: list[str], capsys) -> tuple[int, str]:
    from dltrain.cli import main

    try:
        code = main(["train", *args])
    except SystemExit as exc:  # argparse refusals
        code = exc.code
    except Exception as exc:  # noqa: BLE001 - this is what the user would see as a traceback
        pytest.fail(f"uncaught {type(exc).__name__}: {exc} (a traceback for the user)")
    return code, capsys.readouterr().err


def _run_subprocess(case: Case, args: list[str], values: dict, cache: Path) -> tuple[int, str]:
    env = {"DLTRAIN_CACHE_DIR": str(cache), **{k: _fill(v, values) for k, v in case.env.items()}}
    if case.prelude is None:
        done = run_cli("train", *args, env=env, timeout=300)
    else:
        import subprocess

        code = f"{case.prelude}\nfrom dltrain.cli import main\nsys.exit(main(sys.argv[1:]))"
        done = subprocess.run(
            [sys.executable, "-c", code, "train", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **env},
            cwd=REPO,
        )
    return done.returncode, done.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, workspace, tmp_path, capsys, request):
    if "bert" in case.needs:
        from dltrain.workload import workload_names

        if "bert" not in workload_names():
            pytest.skip("the BERT workload is not in this tree")
        values = (
            workspace
            | _sst2_files(tmp_path)
            | _text_files(tmp_path)
            | {"minilm": str(request.getfixturevalue("minilm_dir"))}
        )
    else:
        values = workspace
    values = values | {"tmp": str(tmp_path)}  # each case writes its run under its own directory
    args = [_fill(a, values) for a in case.args]
    if case.inproc:
        code, stderr = _run_inproc(args, capsys)
    else:
        code, stderr = _run_subprocess(case, args, values, tmp_path / "cache")
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == EXIT_BAD_INPUT, f"exit code {code}; stderr: {stderr[-2000:]}"
    errors = [line for line in error_lines(stderr) if line.startswith("dltrain: error:")]
    assert len(errors) == 1, stderr[-2000:]
    assert case.expect.lower() in errors[0].lower(), errors[0]
    if case.id == "resume-pickle-with-code":
        assert not Path(values["pwned"]).exists(), "unpickling ran the planted code"


def test_the_table_is_large_enough():
    assert len(CASES) >= 25
