"""benchmarks/matrix_table.py on a small synthetic results file (the markdown it writes, the README
section it replaces), and tests/distributed/test_matrix.py's judge on synthetic job ends. No training: seconds."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "matrix_table.py"
spec = importlib.util.spec_from_file_location("matrix_table", SCRIPT)
matrix_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(matrix_table)


def _record(strategy, comp, precision, outcome, reason=""):
    return {
        "strategy": strategy,
        "compile": comp,
        "precision": precision,
        "outcome": outcome,
        "reason": reason,
        "commit": "abc1234",
        "torch": "2.14.1",
    }


RECORDS = [
    _record("ddp", "off", "fp32", "works"),
    _record("ddp", "on", "fp32", "failed", "train: exit 1: torch._dynamo.exc.Unsupported: Unsupported method call"),
    _record("zero3", "on", "bf16", "refused", "train.compile with DeepSpeed ZeRO-3 | not supported yet"),
]


def test_the_table_shows_each_cell_by_its_record_and_counts_them():
    table = matrix_table.render(RECORDS, [("*", "*", "fp16")])
    lines = table.splitlines()
    assert lines[0] == (
        "| strategy | compile off, fp32 | compile off, bf16 | compile off, fp16 | compile on, fp32 "
        "| compile on, bf16 | compile on, fp16 |"
    )
    assert lines[1] == "|---|---|---|---|---|---|---|"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:7]}
    assert list(rows) == ["DDP", "FSDP2", "DeepSpeed ZeRO-1", "DeepSpeed ZeRO-2", "DeepSpeed ZeRO-3"]
    assert rows["DDP"][0] == "works" and rows["DDP"][1] == "not run"
    assert rows["DDP"][2] == "GPU-only, untested"  # told about, no record
    assert rows["DDP"][3] == "failed: train: exit 1: torch._dynamo.exc.Unsupported: Unsupported method call"
    # The reason's pipe is escaped, so the row keeps its 6 cells.
    assert rows["DeepSpeed ZeRO-3"][4] == "refused: train.compile with DeepSpeed ZeRO-3 \\| not supported yet"
    assert len(rows["DeepSpeed ZeRO-3"]) == 6
    assert lines[-1].startswith("30 cells: 1 works, 1 refused, 1 failed, 10 GPU-only, untested, 17 not run.")
    assert "abc1234, torch 2.14.1" in lines[-1]


def test_a_record_wins_over_a_gpu_only_pattern():
    table = matrix_table.render(RECORDS, [("ddp", "off", "*")])
    ddp = next(line for line in table.splitlines() if line.startswith("| DDP |"))
    assert ddp == (
        "| DDP | works | GPU-only, untested | failed: train: exit 1: torch._dynamo.exc.Unsupported: "
        "Unsupported method call | not run |"
    )


def test_the_script_rewrites_only_the_readme_section_between_the_markers(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"cells": RECORDS, "gpu_only": ["*:*:fp16"]}))
    readme = tmp_path / "README.md"
    before, after = "# Title\n\n## Strategy combinations\n\nText above.\n\n", "\nText below.\n"
    readme.write_text(f"{before}{matrix_table.BEGIN}\n| an old table |\n{matrix_table.END}{after}")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(results), "--readme", str(readme)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    table = matrix_table.render(RECORDS, [("*", "*", "fp16")])  # the file's gpu_only list
    assert done.stdout == table and "GPU-only, untested" in table
    assert readme.read_text() == f"{before}{matrix_table.BEGIN}\n{table}{matrix_table.END}{after}"
    # Run again: the same file (the section is replaced, not appended to).
    subprocess.run(
        [sys.executable, str(SCRIPT), str(results), "--readme", str(readme)], check=True, capture_output=True
    )
    assert readme.read_text() == f"{before}{matrix_table.BEGIN}\n{table}{matrix_table.END}{after}"


@pytest.mark.parametrize(
    "text",
    [
        "no markers here\n",
        f"{matrix_table.END}\n{matrix_table.BEGIN}\n",
        f"{matrix_table.BEGIN}\n{matrix_table.BEGIN}\n{matrix_table.END}\n",
    ],
)
def test_a_readme_without_one_ordered_pair_of_markers_is_left_alone(tmp_path, text):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(ValueError, match="expected one"):
        matrix_table.rewrite_readme(readme, "| table |\n")
    assert readme.read_text() == text


def test_the_readme_table_is_the_committed_results_rendered():
    """README.md's section is benchmarks/results/matrix.json rendered: a hand edit of the table, or
    new results without the README rewritten (or the other way round), fails here."""
    results = json.loads((REPO / "benchmarks" / "results" / "matrix.json").read_text())
    gpu_only = [matrix_table.parse_pattern(p) for p in results.get("gpu_only", [])]
    text = (REPO / "README.md").read_text()
    section = text.split(matrix_table.BEGIN, 1)[1].split(matrix_table.END, 1)[0]
    assert section == "\n" + matrix_table.render(results["cells"], gpu_only)


# ----------------------------------------------------------------------------------------------
# tests/distributed/test_matrix.py's judge, on synthetic job ends: no cell is refused today, so the refusal
# rules are shown to pass and to fail here.

from test_distributed import Run  # noqa: E402
from test_matrix import (  # noqa: E402
    CellFailed,
    MatrixRuns,
    first_error_line,
    job_failed,
    names_the_combination,
    refusal,
)

FSDP_COMPILE_BF16 = ("fsdp", "on", "bf16")
TRACEBACK = """W1207 03:25:01 torch/distributed/run.py: Setting OMP_NUM_THREADS
[rank1]: Traceback (most recent call last):
[rank1]:   File "dltrain/trainer.py", line 123, in _train_step
[rank1]:     raise RuntimeError("x")
[rank1]: torch._dynamo.exc.Unsupported: Unsupported method call
[rank1]:   Explanation: Dynamo does not know how to trace method `set_runtime_stats_and_log`
[rank0]: RuntimeError: a later error
dltrain launch: the job failed (exit 1); the failing rank's error is above, under [rankN]
"""


def test_the_first_error_line_is_the_first_exception_without_its_rank_prefix():
    assert first_error_line(TRACEBACK) == "torch._dynamo.exc.Unsupported: Unsupported method call"
    assert first_error_line("Exception ignored in: <x>\nValueError: bad\n") == "ValueError: bad"
    assert first_error_line("some output\nlast words\n") == "last words"  # nothing reads as an error
    assert first_error_line("") == "(nothing on stderr)"


def test_a_refusal_names_the_strategy_and_an_option_the_cell_turns_on():
    assert names_the_combination("train.compile is not supported with distributed.strategy fsdp yet", FSDP_COMPILE_BF16)
    assert names_the_combination("FSDP2 with bf16 on a CPU: ...", FSDP_COMPILE_BF16)
    assert not names_the_combination("train.compile is not supported yet", FSDP_COMPILE_BF16)  # which strategy?
    assert not names_the_combination("FSDP cannot do this", FSDP_COMPILE_BF16)  # which option?
    assert names_the_combination("DeepSpeed ZeRO-3 needs ...", ("zero3", "off", "fp32"))


def _exit2(tmp_path, stderr: str, written: list[str] = ()) -> Run:
    out = tmp_path / "run"
    for name in written:
        out.mkdir(exist_ok=True)
        (out / name).write_text("")
    return Run(2, "", stderr, out)


def test_a_proper_refusal_gives_its_reason(tmp_path):
    line = "train.compile under FSDP is not supported yet: set train.compile.enabled=false"
    run = _exit2(tmp_path, f"some warning\ndltrain: error: {line}\n")
    assert refusal(run, FSDP_COMPILE_BF16) == line


@pytest.mark.parametrize(
    "stderr, written, why",
    [
        (
            "[rank0]: dltrain: error: compile under FSDP\n[rank1]: dltrain: error: compile under FSDP\n",
            [],
            "2 'dltrain: error:' lines",
        ),
        ("dltrain: error: the recipe is wrong\n", [], "without naming"),
        ("dltrain: error: compile under FSDP\n", ["metrics.jsonl"], "after training started"),
        ("usage: dltrain ...\ndltrain: error: unrecognized arguments\n", [], "without naming"),
    ],
)
def test_anything_else_that_exits_2_fails_the_cell(tmp_path, stderr, written, why):
    with pytest.raises(CellFailed, match=why):
        refusal(_exit2(tmp_path, stderr, written), FSDP_COMPILE_BF16)


def test_a_hung_job_is_killed_with_the_processes_it_started(tmp_path):
    """A cell that hangs must not leave its ranks running: the launcher's whole session is killed."""
    pid_file = tmp_path / "child.pid"
    hang = [
        sys.executable,
        "-c",
        "import subprocess, sys, time; "
        f"p = subprocess.Popen(['sleep', '300']); open({str(pid_file)!r}, 'w').write(str(p.pid)); "
        "print('started', flush=True); print('RuntimeError: stuck', file=sys.stderr, flush=True); time.sleep(300)",
    ]
    run = MatrixRuns(tmp_path, tmp_path).get("hang", hang, timeout=5)
    assert run.returncode is None and "started" in run.stdout
    child = Path("/proc") / pid_file.read_text()

    def state() -> str:
        try:
            return (child / "stat").read_text().split()[2]
        except FileNotFoundError:
            return "gone"

    # SIGKILL takes effect when the process is next scheduled: on a loaded machine /proc can still
    # say R just after the kill. Wait for it (a hang is what the 60 s bound catches, not a speed).
    deadline = time.monotonic() + 60
    while state() not in ("Z", "gone") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state() in ("Z", "gone")  # killed (a zombie until its new parent reaps it)
    assert "no exit within" in str(job_failed("train", run)) and "RuntimeError: stuck" in str(job_failed("train", run))
