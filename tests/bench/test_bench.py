"""The benchmark harness: suite validation, FLOP counts, compare, and a tiny suite end to end."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import RECIPES
from dltrain.bench.compare import EXIT_REGRESSION, run_compare
from dltrain.bench.measure import measure_workload
from dltrain.bench.suite import expand, load_suite
from dltrain.cli import main
from dltrain.recipe import RecipeError, load_recipe

CNN = str(RECIPES / "cnn_mnist.yaml")


def write_suite(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def suite_with(**changes) -> dict:
    base = {"name": "t", "entries": [{"name": "cnn", "recipe": CNN, "profile": "cpu_test"}]}
    return base | changes


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"precisions": ["fp64"]}, "precisions.0"),
        ({"mode": "fast"}, "mode"),
        ({"repeat": 3}, "unknown key 'repeat'"),
        ({"entries": []}, "entries"),
        ({"throughput_steps": 5, "warmup_steps": 5}, "throughput_steps must exceed warmup_steps"),
        ({"entries": [{"name": "a", "recipe": CNN}, {"name": "a", "recipe": CNN}]}, "repeated: a"),
        ({"entries": [{"name": "a", "recipe": CNN, "overrides": ["train.epochz=1"]}]}, "entry 'a'"),
        ({"entries": [{"name": "a", "recipe": "recipes/nope.yaml"}]}, "recipe file not found"),
        ({"entries": [{"name": "a", "recipe": CNN, "baselines": ["magic"]}]}, "baselines.0"),
        ({"name": "../elsewhere"}, "bad value at 'name'"),  # it names the default output directory
        ({"timeout_s": 10**10}, "timeout_s"),  # past what the in-process timer (setitimer) takes
        ({"entries": [{"name": "a", "recipe": CNN, "overrides": ["target.metric=val/acc"]}]}, "target.metric"),
        ({"entries": [{"name": "a", "recipe": CNN, "reference": "b"}]}, "reference b: no entry of that name"),
        ({"comm": {"world_sizes": [1]}}, "comm.world_sizes.0"),  # a collective needs two processes
        ({"comm": {"max_bytes": "lots"}}, "give bytes or a number with K, M or G"),
        ({"comm": {"ops": ["all_to_all"]}}, "comm.ops.0"),
    ],
)
def test_bad_suites_give_one_clear_error(tmp_path, changes, message):
    path = write_suite(tmp_path, suite_with(**changes))
    with pytest.raises(RecipeError) as err:
        load_suite(str(path))
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_cli_reports_bad_suite_and_missing_suite_with_exit_2(tmp_path, capsys):
    # in-process: the same main() as `dltrain`, without a second interpreter's start-up
    assert main(["bench", str(write_suite(tmp_path, suite_with(device="tpu")))]) == 2
    err = capsys.readouterr().err
    assert "device" in err and err.count("\n") == 1
    assert main(["bench", "no_such_suite"]) == 2
    err = capsys.readouterr().err
    assert "suite not found" in err and "cpu_quick" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nproc", "1"], "--nproc 1: a collective needs at least 2 processes"),
        (["--ops", "all_reduce,gossip"], "--ops all_reduce,gossip: choose from"),
        (["--min-bytes", "1M", "--max-bytes", "4K"], "give 0 < --min-bytes <= --max-bytes"),
        (["--max-bytes", "huge"], "message size 'huge'"),
        # more processes than this node has devices (a CPU: its cores) time-slice them: refused
        (
            ["--nproc", str((os.cpu_count() or 1) + 1), "--ops", "all_reduce", "--max-bytes", "4K"],
            f"--nproc {(os.cpu_count() or 1) + 1}: this node has",
        ),
        (["--nnodes", "2", "--nproc", "1"], "several nodes need --master ADDR:PORT"),
        (
            ["--nnodes", "2", "--node-rank", "2", "--nproc", "1", "--master", "127.0.0.1:29511"],
            "--node-rank 2 is outside 0..1",
        ),
    ],
)
def test_bench_comm_refuses_bad_options_in_one_line(tmp_path, capsys, argv, message):
    assert main(["bench", "comm", *argv, "--output-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()  # refused before anything was written


@pytest.mark.distributed
@pytest.mark.long
def test_bench_comm_runs_across_two_nodes_as_dltrain_launch_starts_them(tmp_path):
    """Two "nodes" on this host, one process each, meeting at node 0's address: node 0 writes the
    world-2 results, node 1 nothing."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(RECIPES.parent), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dltrain",
                "bench",
                "comm",
                "--nproc",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--master",
                f"127.0.0.1:{port}",
                "--ops",
                "all_reduce",
                "--min-bytes",
                "4K",
                "--max-bytes",
                "64K",
                "--output-dir",
                str(tmp_path / f"node{rank}"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    result = json.loads((tmp_path / "node0" / "comm.json").read_text())
    assert result["world_size"] == 2 and result["nnodes"] == 2
    assert {r["world_size"] for r in result["rows"]} == {2} and len(result["rows"]) == 5  # 4K .. 64K
    assert not (tmp_path / "node1" / "comm.json").exists() and "node 1 done" in outs[1]


def test_a_suite_file_that_is_not_utf8_or_is_an_alias_bomb_is_one_line(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_bytes(b"name: caf\xe9\nentries: []\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_suite(str(path))
    levels = [f"l0: &l0 [{', '.join(['x'] * 9)}]"] + [
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)
    ]
    path.write_text("\n".join([*levels, "description: *l8", "entries: []"]) + "\n")
    with pytest.raises(RecipeError, match="alias") as err:
        load_suite(str(path))
    assert len(str(err.value)) < 300


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tolerance", "nan"], "--tolerance nan"),  # nan flags nothing: the gate would always pass
        (["--tolerance", "-0.1"], "--tolerance -0.1"),  # negative flags an identical pair
    ],
)
def test_compare_refuses_a_tolerance_that_defeats_the_gate(tmp_path, capsys, argv, message):
    assert main(["bench", "compare", str(tmp_path), str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_refuses_what_this_host_or_directory_cannot_take_before_any_job(tmp_path, capsys, monkeypatch):
    from dltrain.bench.runner import run_suite

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    suite = write_suite(tmp_path, suite_with())
    assert main(["bench", str(suite), "--output-dir", str(a_file / "out")]) == 2  # was a FileExistsError traceback
    assert "cannot write to --output-dir" in capsys.readouterr().err
    assert main(["bench", str(suite), "--only", "nothing", "--output-dir", str(tmp_path / "o")]) == 2
    assert "no job matches --only nothing" in capsys.readouterr().err and not (tmp_path / "o").exists()
    cores = os.cpu_count() or 1
    for changes, message in (({"cpu_threads": 2**31}, "cpu_threads"), ({"world_sizes": [8 * cores]}, "world_sizes")):
        with pytest.raises(RecipeError, match=message):
            run_suite(load_suite(str(write_suite(tmp_path, suite_with(**changes)))), tmp_path / "out")
        assert not (tmp_path / "out").exists()
    monkeypatch.setenv("DLTRAIN_NODE_RANK", "first")  # was a ValueError from int()
    assert main(["bench", str(suite), "--output-dir", str(tmp_path / "o")]) == 2
    assert "DLTRAIN_NODE_RANK" in capsys.readouterr().err


def _cheap_harness(monkeypatch):
    """run_suite without its FLOP count and CPU peak measurements (seconds each, beside the point)."""
    from dltrain.bench import runner

    monkeypatch.setattr(runner, "measure_entries", lambda suite, jobs: {})
    monkeypatch.setattr(runner, "measure_cpu_peaks", lambda suite, jobs, seconds=1.5: {})


@pytest.mark.parametrize("no_report", [False, True])
def test_a_suite_with_a_failed_run_exits_non_zero_and_still_reports(tmp_path, monkeypatch, capsys, no_report):
    """Seen: '9/12 runs ok', exit 0. Automation running a suite must see the failure."""
    import dltrain.run
    from dltrain.bench.cli import EXIT_RUNS_FAILED
    from dltrain.data import DataError

    def fails(recipe, output_dir):
        raise DataError("MNIST not found in /nowhere: set DLTRAIN_DATA_DIR")

    _cheap_harness(monkeypatch)
    monkeypatch.setattr(dltrain.run, "train", fails)
    suite = write_suite(tmp_path, suite_with(in_process=True, wandb_runs=False, wandb_summary=False, cpu_threads=1))
    out = tmp_path / "out"
    rc = main(["bench", str(suite), "--output-dir", str(out), *(["--no-report"] if no_report else [])])
    assert rc == EXIT_RUNS_FAILED == 3
    (rec,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rec["status"] == "failed" and "MNIST not found" in rec["error"]
    printed = capsys.readouterr().out
    assert "0/1 runs ok (1 failed: exit code 3" in printed
    assert (out / "report.md").is_file() != no_report
    if not no_report:
        assert "MNIST not found" in (out / "report.md").read_text()


def test_a_suite_whose_runs_all_pass_exits_0(tmp_path, monkeypatch):
    import dltrain.run

    def passes(recipe, output_dir):
        summary = {"workload": "cnn", "throughput": {"train_samples_per_s": 100.0, "steady_steps": 45}}
        (Path(output_dir) / "summary.json").write_text(json.dumps(summary))

    _cheap_harness(monkeypatch)
    monkeypatch.setattr(dltrain.run, "train", passes)
    suite = write_suite(tmp_path, suite_with(in_process=True, wandb_runs=False, wandb_summary=False, cpu_threads=1))
    (tmp_path / "out" / "runs" / "cnn-w1-fp32-tput-r0").mkdir(parents=True)
    assert main(["bench", str(suite), "--output-dir", str(tmp_path / "out"), "--no-report"]) == 0


def test_each_jobs_recipe_is_parsed_once_whatever_the_repeats(tmp_path, monkeypatch):
    """The plan parses the entry's recipe once and each job's once; the run, its result, its FLOP
    shape and its TF32 rule take the job's parsed recipe (before: 10 parses for 1 job x 2 repeats)."""
    import dltrain.recipe
    import dltrain.run

    parses = []
    validate = dltrain.recipe.validate
    monkeypatch.setattr(dltrain.recipe, "validate", lambda raw, **kw: parses.append(1) or validate(raw, **kw))

    def passes(recipe, output_dir):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "summary.json").write_text(
            json.dumps({"workload": "cnn", "throughput": {"train_samples_per_s": 1.0}})
        )

    _cheap_harness(monkeypatch)
    monkeypatch.setattr(dltrain.run, "train", passes)
    for repeats in (1, 3):
        parses.clear()
        suite = write_suite(tmp_path, suite_with(in_process=True, wandb_runs=False, wandb_summary=False, cpu_threads=1))
        out = tmp_path / f"out{repeats}"
        assert main(["bench", str(suite), "--output-dir", str(out), "--repeats", str(repeats), "--no-report"]) == 0
        assert len((out / "results.jsonl").read_text().splitlines()) == repeats
        assert len(parses) == 2, repeats  # the entry's recipe, then the job's


def test_a_failing_baseline_gives_its_one_line_error_not_an_exception_name(tmp_path, monkeypatch):
    from dltrain.bench import runner

    (tmp_path / "baselines").mkdir()
    (tmp_path / "baselines" / "cnn_bare.py").write_text(
        "from dltrain.recipe import RecipeError\n"
        "raise RecipeError('--batch 100000 is larger than the training set: lower it')\n"
    )
    monkeypatch.setattr(runner, "BASELINES", tmp_path / "baselines")
    suite = load_suite(
        str(
            write_suite(
                tmp_path,
                suite_with(entries=[{"name": "cnn", "recipe": CNN, "profile": "cpu_test", "baselines": ["bare"]}]),
            )
        )
    )
    (baseline,) = [j for j in expand(suite) if j.kind == "bare"]
    summary, error, _, _ = runner.run_job(baseline, suite, tmp_path / "run", tmp_path / "bare.log")
    assert summary is None and "Traceback" in (tmp_path / "bare.log").read_text()
    assert error == "exit code 1: --batch 100000 is larger than the training set: lower it"


@pytest.mark.parametrize(
    "log, rc, expected",
    [
        (
            "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'hidden'\n",
            1,
            "exit code 1: 'hidden' (KeyError)",
        ),
        (
            'Traceback (most recent call last):\n  File "x.py", line 1\nMemoryError\n',
            1,
            "exit code 1: MemoryError (no message)",
        ),
        ("step 3\n", -9, "killed by SIGKILL (out of memory?): step 3"),
        (
            "dltrain: error: bad value at 'optim.lr'\nValueError: later\n",
            2,
            "exit code 2: dltrain: error: bad value at 'optim.lr'",
        ),
        ("", 1, "exit code 1: no output"),
    ],
)
def test_a_job_logs_error_line(tmp_path, log, rc, expected):
    from dltrain.bench.joblog import error_line

    (tmp_path / "job.log").write_text(log)
    assert error_line(tmp_path / "job.log", rc) == expected


@pytest.mark.parametrize("name", ["cpu_quick", "cpu_full", "gpu_single", "scaling", "device_dryrun", "scaling_cpu"])
def test_shipped_suites_parse_and_expand(name):
    suite = load_suite(name)
    jobs = expand(suite)  # every job's recipe parsed with its full set of overrides, as it runs
    assert jobs and all(j.recipe is not None for j in jobs), name
    if name == "gpu_single":  # the rows that matter most run first; nothing slow the device does not need
        assert [j.config for j in jobs[:2]] == ["bert_base-w1-bf16-compile-tput", "cnn-w1-bf16-compile-tput"]
        assert suite.in_process and not suite.wandb_runs
        first_baseline = next(i for i, j in enumerate(jobs) if j.kind != "dltrain")
        assert jobs[first_baseline - 2].config == "bert_base_eager-w1-bf16-tput"


def test_run_order_is_file_order_with_each_entrys_baselines_after_its_rows(tmp_path):
    suite = load_suite(
        str(
            write_suite(
                tmp_path,
                suite_with(
                    entries=[
                        {
                            "name": "a",
                            "recipe": CNN,
                            "precisions": ["bf16", "fp32"],
                            "compile": [True, False],
                            "baselines": ["bare"],
                        },
                        {"name": "b", "recipe": CNN, "baselines": ["bare"]},
                    ]
                ),
            )
        )
    )
    assert [j.config for j in expand(suite)] == [
        "a-w1-bf16-compile-tput",
        "a-w1-bf16-tput",
        "a-w1-fp32-compile-tput",
        "a-w1-fp32-tput",
        "a-bare-bf16",
        "a-bare-fp32",
        "b-w1-fp32-tput",
        "b-bare-fp32",
    ]


def test_in_process_only_for_single_process_dltrain_jobs(tmp_path):
    from dltrain.bench import inprocess

    suite = load_suite(
        str(
            write_suite(
                tmp_path,
                suite_with(
                    in_process=True,
                    world_sizes=[1, 2],
                    entries=[{"name": "cnn", "recipe": CNN, "baselines": ["bare", "notebook"]}],
                ),
            )
        )
    )
    chosen = {j.config for j in expand(suite) if inprocess.eligible(j, suite)}
    assert chosen == {"cnn-w1-fp32-tput", "cnn-notebook-fp32"}
    suite.in_process = False
    assert not any(inprocess.eligible(j, suite) for j in expand(suite))


def test_a_variant_baseline_takes_its_settings_from_the_workload(tmp_path):
    """The harness names no workload: a `notebook` job's settings are the CNN workload's
    bench_variants, and a workload without that variant is refused before any job runs."""
    suite = load_suite(
        str(
            write_suite(
                tmp_path,
                suite_with(entries=[{"name": "cnn", "recipe": CNN, "profile": "cpu_test", "baselines": ["notebook"]}]),
            )
        )
    )
    notebook = next(j for j in expand(suite) if j.kind == "notebook")
    assert notebook.sets[-1:] == ["data.loader=torch"] and notebook.recipe.data.loader == "torch"
    rnn = load_suite(
        str(
            write_suite(
                tmp_path,
                suite_with(
                    entries=[
                        {
                            "name": "rnn",
                            "recipe": str(RECIPES.parent / "dltrain" / "recipes" / "rnn_sine.yaml"),
                            "baselines": ["notebook"],
                        }
                    ]
                ),
            )
        )
    )
    with pytest.raises(RecipeError, match="the rnn workload has no 'notebook' baseline") as err:
        expand(rnn)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_in_process_jobs_run_back_to_back_each_in_a_fresh_state(tmp_path, capfd):
    """Two dltrain jobs inside this process with different precisions: Accelerate refuses a second
    Accelerator with another mixed precision unless its singleton state was reset in between."""
    from dltrain.bench.runner import run_suite

    suite = load_suite(
        str(
            write_suite(
                tmp_path,
                suite_with(
                    in_process=True,
                    precisions=["bf16", "fp32"],
                    throughput_steps=6,
                    warmup_steps=2,
                    wandb_runs=False,
                    wandb_summary=False,
                    cpu_threads=1,
                    timeout_s=120,
                    entries=[{"name": "rnn", "recipe": str(RECIPES / "rnn_sine.yaml"), "profile": "cpu_test"}],
                ),
            )
        )
    )
    results = run_suite(suite, tmp_path / "out")
    assert [(r.precision, r.status) for r in results] == [("bf16", "ok"), ("fp32", "ok")], [r.error for r in results]
    for r in results:
        assert r.command.startswith("(in process)") and r.samples_per_s > 0
        assert r.environment["precision"] == r.precision and r.environment["cpu_threads"] == 1
        log = (tmp_path / "out" / "logs" / f"{r.config}-r0.log").read_text()
        assert "dltrain: done" in log  # the run's output went to its log, not to the harness's
    assert "dltrain: done" not in capfd.readouterr().out


def test_a_bad_job_override_fails_the_suite_before_any_job(tmp_path):
    from dltrain.bench.runner import run_suite

    suite = load_suite(str(write_suite(tmp_path, suite_with())))
    suite.warmup_steps = -1  # past the suite's own validation: the job's train.warmup_steps_excluded=-1 is refused
    with pytest.raises(RecipeError, match="job cnn-w1-fp32-tput"):
        run_suite(suite, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_suite_cut_by_its_time_budget_records_the_cut_job_and_reports(tmp_path, monkeypatch):
    """device_check.sh's timeout sends SIGINT to the harness: the job it cuts is recorded as
    interrupted, the interrupt goes on, and the report is built from what finished."""
    from dltrain.bench import runner
    from dltrain.bench.cli import finish

    suite = load_suite(str(write_suite(tmp_path, suite_with(wandb_summary=False))))
    (job,) = expand(suite)
    monkeypatch.setattr(runner, "run_job", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    results = tmp_path / "results.jsonl"
    with pytest.raises(KeyboardInterrupt):
        runner._run_or_note_cut(job, suite, tmp_path / "run", tmp_path / "log", {"repeat": 0, "run_dir": "x"}, results)
    (rec,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert rec["status"] == "failed" and "time budget" in rec["error"]
    finish(tmp_path, wandb=False)
    assert "interrupted (the time budget ran out)" in (tmp_path / "report.md").read_text()


def test_an_in_process_job_that_fails_or_hangs_is_an_error_not_the_harness_s(tmp_path, monkeypatch):
    import time

    import dltrain.run
    from dltrain.bench import inprocess

    def boom(recipe, output_dir):
        print("training...")
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(dltrain.run, "train", boom)
    log = tmp_path / "a.log"
    error = inprocess.run(
        load_recipe(CNN, "cpu_test"), tmp_path / "run", log, env={"DLTRAIN_X": "1"}, threads=1, timeout_s=60
    )
    assert error == "in process: ValueError: boom" and "DLTRAIN_X" not in os.environ
    assert "training..." in log.read_text() and "Traceback" in log.read_text()
    finished = []

    def slow(recipe, output_dir):
        time.sleep(30)
        finished.append(True)  # reached only when the timeout did not interrupt the job

    monkeypatch.setattr(dltrain.run, "train", slow)
    error = inprocess.run(
        load_recipe(CNN, "cpu_test"), tmp_path / "run", tmp_path / "b.log", env={}, threads=None, timeout_s=1
    )
    assert error == "timed out after 1 s (suite timeout_s)" and finished == []


def test_each_in_process_job_logs_its_own_host_sync_warnings(tmp_path, monkeypatch):
    """device_check.sh counts torch's sync-debug warnings in each job's log; Python shows a warning
    once per site per process, so the second in-process job used to log none of them."""
    import warnings

    import dltrain.run
    from dltrain.bench import inprocess

    def sync_site():  # one host-sync site, as torch.cuda.set_sync_debug_mode("warn") reports one
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    def train(recipe, output_dir):
        for _ in range(3):
            sync_site()

    monkeypatch.setattr(dltrain.run, "train", train)
    with warnings.catch_warnings():  # as in a plain `python -m dltrain bench` process, not pytest's recorder
        warnings.resetwarnings()
        warnings.simplefilter("default")
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line)
        )
        for job in ("a", "b"):
            assert (
                inprocess.run(
                    load_recipe(CNN, "cpu_test"),
                    tmp_path / job,
                    tmp_path / f"{job}.log",
                    env={},
                    threads=None,
                    timeout_s=60,
                )
                is None
            )
    counts = [(tmp_path / f"{job}.log").read_text().count("UserWarning: called a synchronizing") for job in ("a", "b")]
    assert counts == [1, 1]  # once per site, in every job


def test_a_gpu_suite_never_runs_on_the_cpu(tmp_path):
    import torch

    from dltrain.bench.runner import run_suite

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    suite = load_suite(str(write_suite(tmp_path, suite_with(device="gpu"))))
    with pytest.raises(RecipeError, match="CUDA is not available"):
        run_suite(suite, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_records_carry_the_clock_figures_and_old_results_still_report(tmp_path):
    from dltrain.bench.markdown import render
    from dltrain.bench.report import build_summary
    from dltrain.bench.result import append_result
    from dltrain.bench.runner import make_result

    suite = load_suite(str(write_suite(tmp_path, suite_with())))
    (job,) = expand(suite)
    meta = {"repeat": 0, "wall_s": 1.0, "run_dir": str(tmp_path), "command": "", "warmup_steps": 5}
    new = {
        "workload": "cnn",
        "throughput": {
            "train_samples_per_s": 100.0,
            "steady_steps": 45,
            "eval_s": 1.5,
            "checkpoint_s": 0.25,
            "train_wall_s": 9.0,
            "overall_samples_per_s": 90.0,
            "clock_agreement": 100 / 90,
        },
    }
    old = {"workload": "cnn", "throughput": {"train_samples_per_s": 100.0, "steady_steps": 45}}
    rec_new, rec_old = (make_result(job, suite, s, None, meta) for s in (new, old))
    assert (rec_new.eval_s, rec_new.checkpoint_s, rec_new.clock_agreement) == (1.5, 0.25, 100 / 90)
    assert rec_old.eval_s is None and rec_old.clock_agreement is None
    for results, shown in (([rec_old], False), ([rec_new, rec_old.model_copy(update={"repeat": 1})], True)):
        out = tmp_path / f"out{int(shown)}"
        out.mkdir()
        for result in results:
            append_result(out / "results.jsonl", result)
        report = render(build_summary(out), out)
        assert ("## Outside the clock" in report) == shown
        if shown:
            (row,) = [ln for ln in report.splitlines() if ln.startswith("| cnn-w1-fp32-tput") and "1.5" in ln]
            assert "0.25" in row and "1.11" in row


def test_baseline_clock_is_one_window_around_the_steps(capsys):
    import time

    import torch

    sys.path.insert(0, str(RECIPES.parent / "benchmarks" / "baselines"))
    try:
        import bare_common
    finally:
        sys.path.pop(0)
    calls = []

    def step(i):
        calls.append(i)
        time.sleep(0.002)

    timing = bare_common.timed(step, steps=5, warmup=2, device=torch.device("cpu"))
    assert calls == list(range(7)) and len(timing.step_times_s) == 5
    assert timing.window_s >= sum(timing.step_times_s) * 0.999 and min(timing.step_times_s) >= 0.002
    bare_common.report("x", None, 10, "fp32", timing)
    out = json.loads(capsys.readouterr().out)
    assert out["train_samples_per_s"] == pytest.approx(50 / timing.window_s)
    assert {"step_time_ms_p50", "step_time_ms_p90"} <= out.keys() and out["steps"] == 5


def test_expansion_crosses_axes_scales_batch_and_pairs_baselines(tmp_path):
    suite = load_suite(
        str(
            write_suite(
                tmp_path,
                suite_with(
                    world_sizes=[1, 2, 16],
                    nodes=[1, 2],
                    max_procs_per_node=8,
                    precisions=["fp32", "bf16"],
                    mode="both",
                    entries=[{"name": "cnn", "recipe": CNN, "baselines": ["bare"], "baseline_precisions": ["bf16"]}],
                ),
            )
        )
    )
    jobs = {j.config: j for j in expand(suite)}
    assert "cnn-w16-fp32-tput" not in jobs and "cnn-w16-n2-fp32-tput" in jobs  # 16 per node is too many
    assert "cnn-w1-n2-fp32-tput" not in jobs  # one process cannot span two nodes
    assert "train.global_batch_size=128" in jobs["cnn-w2-bf16-ttt"].overrides  # 64 per device, kept
    assert not any("global_batch_size" in o for o in jobs["cnn-w1-bf16-tput"].overrides)
    assert jobs["cnn-bare-bf16"].pair == "cnn-w1-bf16-tput" and "cnn-bare-fp32" not in jobs


def test_flops_match_analytic_cnn_and_rnn(data_dir):
    cnn = measure_workload(load_recipe(CNN, overrides=[f"data.root={data_dir}"]), 32)
    rnn = measure_workload(load_recipe(RECIPES / "rnn_sine.yaml", "cpu_test"), 32)
    for counts in (cnn, rnn):
        assert counts["flops_measured_over_analytic"] == pytest.approx(1.0, abs=0.10)
    assert cnn["params"] == 421_642 and cnn["grad_bytes"] == 4 * 421_642


@pytest.mark.slow
def test_flops_match_analytic_bert(tmp_path, sst2_dir, minilm_dir):
    # 64 real SST-2 rows in a file of their own: tokenizing them is instant
    rows = (sst2_dir / "train.tsv").read_text().splitlines()[:65]
    (tmp_path / "small.tsv").write_text("\n".join(rows) + "\n")
    recipe = load_recipe(
        RECIPES / "bert_sst2_minilm.yaml",
        "cpu_test",
        [
            f"model.name_or_path={minilm_dir}",
            f"data.train_file={tmp_path / 'small.tsv'}",
            f"data.eval_file={tmp_path / 'small.tsv'}",
            "data.train_subset=64",
        ],
    )
    counts = measure_workload(recipe, 4)
    assert counts["flops_measured_over_analytic"] == pytest.approx(1.0, abs=0.10)
    # a dynamically padded batch is shorter than max_length: less work per sample than the analytic
    assert (
        0
        < counts["flops_per_padded_token_measured"] * recipe.data.max_length
        <= 1.1 * counts["flops_per_sample_analytic"]
    )


def _summary(samples_per_s: float, std: float = 0.0) -> dict:
    fig = {"mean": samples_per_s, "std": std, "min": samples_per_s - std, "max": samples_per_s + std, "n": 3}
    ms = 64e3 / samples_per_s  # batch 64: the step time moves with the throughput, spread alike
    step = {"mean": ms, "std": ms * std / samples_per_s, "min": ms, "max": ms, "n": 3}
    config = {"kind": "dltrain", "entry": "cnn", "mode": "throughput", "world_size": 1, "precision": "fp32"}
    return {"configs": {"cnn-w1-fp32-tput": config | {"figures": {"samples_per_s": fig, "step_time_ms_p50": step}}}}


def test_compare_flags_a_planted_regression_and_passes_an_identical_pair(tmp_path, capsys):
    for name, summary in {
        "old": _summary(1000.0, 10.0),
        "same": _summary(1000.0, 10.0),
        "slow": _summary(700.0, 10.0),
        "noisy": _summary(700.0, 150.0),
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    assert run_compare(tmp_path / "old", tmp_path / "same") == 0
    assert run_compare(tmp_path / "old", tmp_path / "slow") == EXIT_REGRESSION
    assert "REGRESSION" in capsys.readouterr().out
    # the same drop within the repeats' spread is noise, not a regression
    assert run_compare(tmp_path / "old", tmp_path / "noisy") == 0
    capsys.readouterr()
    assert main(["bench", "compare", str(tmp_path / "old"), str(tmp_path / "slow")]) == EXIT_REGRESSION
    assert "0.700" in capsys.readouterr().out
    assert main(["bench", "compare", str(tmp_path / "old"), str(tmp_path / "nowhere")]) == 2
    assert "no summary.json" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.long
def test_tiny_suite_end_to_end(tmp_path, data_dir):
    small = [
        f"data.root={data_dir}",
        "data.train_subset=1024",
        "data.val_fraction=0.02",
        "train.global_batch_size=128",
        "checkpoint.save_final_model=false",
    ]
    suite = write_suite(
        tmp_path,
        {
            "name": "tiny",
            "throughput_steps": 8,
            "warmup_steps": 2,
            "world_sizes": [1, 2],
            "cpu_threads": 1,
            "wandb_runs": False,
            "timeout_s": 300,
            "comm": {"world_sizes": [2], "ops": ["all_reduce", "broadcast"], "max_bytes": "256K", "target_s": 0.02},
            "entries": [
                {"name": "cnn", "recipe": CNN, "profile": "cpu_test", "overrides": small, "baselines": ["bare"]},
                {
                    "name": "ttt",
                    "recipe": CNN,
                    "profile": "cpu_test",
                    "mode": "time_to_target",
                    "world_sizes": [1],
                    "overrides": [*small, "target.value=0.3", "train.eval_every=2"],
                },
            ],
        },
    )
    out = tmp_path / "out"
    assert main(["bench", str(suite), "--output-dir", str(out)]) == 0  # the jobs are real processes
    for name in (
        "results.jsonl",
        "summary.json",
        "report.md",
        "plots/throughput_vs_world.png",
        "plots/mfu.png",
        "plots/loss_curves.png",
        "plots/time_to_target.png",
        "plots/throughput.png",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 4, [r.get("error") for r in records]
    dl = [r for r in records if r["kind"] == "dltrain" and r["mode"] == "throughput"]
    assert {r["world_size"] for r in dl} == {1, 2}
    for r in dl:
        assert r["samples_per_s"] > 0 and 0 < r["mfu"] <= 1 and r["peak_source"].startswith("measured")
        assert r["environment"]["world_size"] == r["world_size"]
    summary = json.loads((out / "summary.json").read_text())
    (w2,) = [s for s in summary["scaling"] if s["world_size"] == 2]
    # The bound holds on an idle machine; on one shared with other jobs the load moves between the
    # world-1 and world-2 runs, so only a looser sanity bound is fair there.
    idle = os.getloadavg()[0] <= (os.cpu_count() or 1)
    assert 0 < w2["efficiency"] <= (1.2 if idle else 2.0), (w2, os.getloadavg())
    (ratio,) = summary["baselines"]
    assert ratio["baseline"] == "bare" and ratio["ratio"]["mean"] > 0 and ratio["ratio_p50_step"]["mean"] > 0
    (bare,) = [r for r in records if r["kind"] == "bare"]
    # the baseline runs with the allocator settings dltrain gives itself, so the ratio is the loop's
    assert bare["step_time_ms_p50"] > 0 and "MALLOC_MMAP_THRESHOLD_=" in bare["command"]
    assert all("dltrain" in r["environment"]["host_allocator"] for r in dl)
    ttt = summary["configs"]["ttt-w1-fp32-ttt"]
    assert ttt["reached"] == 1 and ttt["figures"]["time_to_target_s"]["mean"] > 0
    # Stopped at the target: the run's step count is the step that reached it, not the planned total.
    (ttt_run,) = [Path(r["run_dir"]) for r in records if r["mode"] == "time_to_target"]
    reached_at = [
        json.loads(line)["step"]
        for line in (ttt_run / "metrics.jsonl").read_text().splitlines()
        if "time_to_target_s" in line
    ]
    assert json.loads((ttt_run / "summary.json").read_text())["steps"] == reached_at[0]
    # The step model's check: the w2 step predicted from the w1 run, the step profile and the
    # collectives measured on 2 gloo processes, beside the measured w2 step.
    (comm,) = summary["comm"]
    assert comm["backend"] == "gloo" and {f["op"] for f in comm["fits"]} == {"all_reduce", "broadcast"}
    assert len(comm["rows"]) == 2 * 7 and all(r["busbw_GBps"] > 0 for r in comm["rows"])  # 4 KiB .. 256 KiB
    (check,) = summary["validation"]
    assert check["config"] == "cnn-w2-fp32-tput" and check["buckets"] >= 1
    assert check["predicted_ms"] >= check["step1_ms"] and 0 <= check["exposed_ms"] <= check["comm_ms"] + 1e-9
    assert check["measured_ms"] == summary["configs"]["cnn-w2-fp32-tput"]["figures"]["step_time_ms_p50"]["mean"]
    # Never projected from this CPU's steps; from the datasheet (no GPU results here) the CNN's step
    # is microseconds, below the launch floor: refused, with the reason in the report.
    assert summary["projection"] == [] and "launch floor" in summary["projection_refused"]["cnn"]
    report = (out / "report.md").read_text()
    assert (
        "cnn-w1-fp32-tput" in report
        and "wandb sync" in report
        and "Not projected: cnn: its datasheet compute" in report
    )
    assert "The step model against measured runs" in report and (out / "plots" / "comm_busbw.png").is_file()
    # the suite's W&B run, offline: its record file holds the summary figures
    (wandb_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(wandb_file).read_bytes()
    w1 = summary["configs"]["cnn-w1-fp32-tput"]["figures"]["samples_per_s"]["mean"]
    assert b"cnn-w1-fp32-tput/samples_per_s" in data and json.dumps(w1).encode() in data


def test_a_setting_is_compared_with_its_reference_entry_repeat_by_repeat():
    from dltrain.bench.report import aggregate, variants
    from dltrain.bench.result import Result

    def rec(entry, repeat, sps, world=2, reference=None):
        return Result(
            suite="t",
            config=f"{entry}-w{world}",
            entry=entry,
            kind="dltrain",
            mode="throughput",
            repeat=repeat,
            world_size=world,
            precision="fp32",
            samples_per_s=sps,
            reference=reference,
        )

    records = [
        rec("ddp", 0, 100.0),
        rec("ddp", 1, 200.0),
        rec("ddp", 0, 60.0, world=1),
        rec("hook", 0, 110.0, reference="ddp"),
        rec("hook", 1, 180.0, reference="ddp"),
    ]
    (row,) = variants(records, aggregate(records))
    assert row.config == "hook-w2" and row.reference_config == "ddp-w2"  # the same world size only
    assert row.ratio.mean == pytest.approx((1.1 + 0.9) / 2) and row.ratio.n == 2


def test_peak_memory_is_the_runs_own_not_its_parents():
    """A run started by a big process (the harness) must not report the parent's peak."""
    ballast = bytearray(1536 * 2**20)  # 1.5 GiB resident in this process
    ballast[::4096] = b"x" * len(ballast[::4096])
    probe = (
        "import resource; from dltrain.metrics import peak_rss_bytes; "
        "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    own, inherited = map(
        int, subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    )
    del ballast
    assert own < 1024 * 2**20, own
    if sys.platform == "linux":
        assert inherited >= 1536 * 2**20  # what ru_maxrss says on Linux: why it is not used


def test_the_mfu_column_names_its_flops_basis():
    """A text workload's MFU counts its padded tokens (the work done, not what a padding-free run
    would do); the column must say so, and say samples for the others."""
    from dltrain.bench.markdown import throughput_rows
    from dltrain.bench.report import aggregate
    from dltrain.bench.result import Result
    from dltrain.bench.runner import add_flops

    base = {
        "suite": "t",
        "kind": "dltrain",
        "mode": "throughput",
        "world_size": 1,
        "precision": "fp32",
        "cpu_threads": 1,
        "environment": {"device": "cpu"},
        "samples_per_s": 100.0,
    }
    text = Result(**base, config="bert", entry="bert", tokens_per_s=2_000.0, padded_tokens_per_s=3_000.0)
    image = Result(**base, config="cnn", entry="cnn")
    add_flops(text, {"flops_measured_over_analytic": 1.0, "flops_per_padded_token_measured": 1e6}, {"fp32": 1e11})
    add_flops(image, {"flops_measured_over_analytic": 1.0, "flops_per_sample_measured": 1e6}, {"fp32": 1e11})
    rows = {r[0]: r for r in throughput_rows(aggregate([text, image]))}
    mfu_column = 10
    assert rows["bert"][mfu_column] == "3 (padded tokens)"  # 1e6 FLOPs x 3,000 padded tokens/s over 1e11
    assert rows["cnn"][mfu_column] == "0.1 (samples)"
