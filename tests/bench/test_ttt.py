"""Record suites (`dltrain bench` on a file with `records:`): seeds, both clocks, the reference,
the table; a tiny suite end to end on real MNIST."""

from __future__ import annotations

import json

import pytest

from conftest import RECIPES, run_cli

TINY_CNN = [
    "data.train_subset=640",
    "data.val_fraction=0.01",
    "model.conv1_channels=8",
    "model.conv2_channels=16",
    "model.hidden=32",
    "tracking.plots=false",
    "train.eval_every=1000",
    "target.metric=test/accuracy",
    "target.value=0.05",
    "target.stop=false",
]


def _suite(tmp_path, reference: str) -> str:
    sets = ", ".join(TINY_CNN)
    path = tmp_path / "ttt_tiny.yaml"
    path.write_text(f"""name: ttt_tiny
description: two seeds of a few steps, and a reference
cpu_threads: 1
records:
  - name: cnn
    recipe: {RECIPES / "cnn_mnist.yaml"}
    profile: cpu_test
    overrides: [{sets}, train.max_steps=4]
    seeds: [0, 1]
    reference:
{reference}
""")
    return str(path)


@pytest.mark.long
def test_a_tiny_record_suite_runs_every_seed_and_the_reference_and_writes_the_table(data_dir, tmp_path):
    ref = (
        "      what: the same, twice as many steps\n      profile: cpu_test\n      overrides: "
        f"[{', '.join(TINY_CNN)}, train.max_steps=8]"
    )
    out = tmp_path / "out"
    done = run_cli("bench", _suite(tmp_path, ref), "--output-dir", str(out), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(x["kind"], x["seed"]) for x in lines] == [("dltrain", 0), ("dltrain", 1), ("reference", None)]
    for x in lines:
        assert x["status"] == "ok" and 0 < x["train_s"] < x["wall_s"], (
            x
        )  # the process clock covers imports and data as well
    assert [x["steps"] for x in lines] == [4, 4, 8]
    (row,) = json.loads((out / "records.json").read_text())
    figures = row["config"]["figures"]
    assert row["metric_name"] == "test/accuracy" and [r["metrics"]["test/accuracy"] for r in row["runs"]] == [
        x["metrics"]["test/accuracy"] for x in lines[:2]
    ]
    assert figures["test/accuracy"]["n"] == 2 and figures["train_s"]["n"] == 2
    assert figures["wall_s"]["mean"] > figures["train_s"]["mean"]
    assert row["met"] in (True, False) and row["reference"]["train_s"] == lines[2]["train_s"]
    report = (out / "report.md").read_text()
    assert "| cnn | 2 | test/accuracy" in report and "train_s" in report and "wall_s" in report
    assert "the same, twice as many steps" in report and "--set train.seed=S" in report


def test_a_failed_reference_run_fails_the_suite_with_exit_3(data_dir, tmp_path):
    ref = "      what: a baseline run that fails\n      baseline: rnn_bare\n      baseline_args: [--no-such-flag]"
    out = tmp_path / "out"
    path = _suite(tmp_path, ref)
    text = open(path).read().replace("seeds: [0, 1]", "seeds: [0]")
    open(path, "w").write(text)
    done = run_cli("bench", path, "--output-dir", str(out), timeout=600)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    (row,) = json.loads((out / "records.json").read_text())
    assert row["reference_failed"] and row["reference"] is None
    assert "1 failed runs" in done.stdout


def test_the_shipped_record_suites_validate_with_every_recipe_profile_and_reference():
    from dltrain.bench.suite import resolve_path
    from dltrain.bench.ttt import load_record_suite

    for name in ("ttt", "ttt_gpu"):
        suite = load_record_suite(resolve_path(name))
        assert suite.name == name and all(len(r.seeds) >= (3 if r.name == "minilm" else 5) for r in suite.records)
    cpu = load_record_suite(resolve_path("ttt"))
    assert {r.name for r in cpu.records} == {"cnn", "cnn_fp32", "rnn", "minilm"}
    assert all(r.reference for r in cpu.records)


def test_a_record_suite_with_a_recipe_without_target_is_refused(tmp_path):
    from dltrain.bench.ttt import load_record_suite
    from dltrain.recipe import RecipeError

    path = tmp_path / "s.yaml"
    path.write_text(
        f"records:\n  - name: x\n    recipe: {RECIPES / 'rnn_sine.yaml'}\n    overrides: [target=null]\n    "
        "seeds: [0]\n"
    )
    import pytest

    with pytest.raises(RecipeError, match="record x: its recipe has no target"):
        load_record_suite(path)


def test_an_in_process_record_suite_starts_no_process_for_its_seeds(data_dir, tmp_path, monkeypatch):
    """device_check.sh's records on a lent GPU: every seed in the harness process, so imports and
    the CUDA start are paid once, not once per seed."""
    from dltrain.bench import runner, ttt

    path = _suite(tmp_path, "      what: never run here\n      profile: cpu_test")
    path = ttt.Path(path)
    text = path.read_text().replace("cpu_threads: 1", "cpu_threads: 1\nin_process: true")
    path.write_text(text.split("    reference:")[0])  # seeds only: a reference stays a launched process
    suite = ttt.load_record_suite(path)
    launched = []  # every launched job goes through the runner's command_for
    monkeypatch.setattr(runner, "command_for", lambda job, *a: launched.append(job.config) or ([], {}))
    (row,) = ttt.run_records(suite, tmp_path / "out")
    assert launched == []
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(x["seed"], x["status"], x["steps"], x["in_process"]) for x in lines] == [
        (0, "ok", 4, True),
        (1, "ok", 4, True),
    ]
    assert row.config.figures["train_s"].n == 2
    assert "in the harness process" in (tmp_path / "out" / "report.md").read_text()


def test_a_record_suite_cut_by_the_budget_still_writes_the_table_of_what_finished(tmp_path, monkeypatch):
    """device_check.sh stops the records phase with SIGINT at its cap: the seeds that finished must
    still reach records.json and report.md, marked as cut."""
    import pytest

    from dltrain.bench import runner, ttt

    path = _suite(tmp_path, "      what: never run here\n      profile: cpu_test")
    suite = ttt.load_record_suite(ttt.Path(path))

    def run_job(job, suite, run_dir, log):  # the runner's launch: seed 0's summary.json, then the cut
        if job.seed == 1:
            raise KeyboardInterrupt  # timeout --signal=INT during the second seed
        summary = {
            "throughput": {"train_s": 1.0},
            "steps": 4,
            "target": {"metric": "test/accuracy", "value": 0.05},
            "metrics": {"test/accuracy": 0.5},
        }
        return summary, None, 2.0, ""

    monkeypatch.setattr(runner, "run_job", run_job)
    with pytest.raises(ttt.RecordsInterrupted) as cut:
        ttt.run_records(suite, tmp_path / "out")
    (row,) = json.loads((tmp_path / "out" / "records.json").read_text())
    assert row["interrupted"] and row["seeds"] == [0] and row["reference"] is None and cut.value.rows[0].name == "cnn"
    assert (
        "Interrupted (the time budget ran out): cnn over the seeds that finished"
        in (tmp_path / "out" / "report.md").read_text()
    )


def test_a_dry_run_with_only_lists_that_record_alone():
    done = run_cli("bench", "ttt", "--only", "cnn_fp32", "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines == [
        "[cnn_fp32] seeds [0, 1, 2, 3, 4]: dltrain train recipes/cnn_mnist.yaml --profile fast --set train.seed=S"
    ]
