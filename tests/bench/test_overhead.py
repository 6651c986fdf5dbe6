"""Framework overhead (issue 24): what dltrain does per step beyond the bare loop, bounded by
counted work (Python and C function calls per steady step, cProfile), never by wall-clock time,
and the bench report's overhead table (us per step, from the baseline pairs already measured)."""

from __future__ import annotations

import pytest

from dltrain.bench import overhead

STEPS = 100  # steady steps profiled: two of the RNN cpu_test's log records (log_every 50) fall in them
# Calls per steady RNN step beyond the bare loop: 40 when this was written (75 before issue 24):
# the loop's own functions, the non-finite guard, the train-loss copy, one host read, the clock,
# the progress bar, log records amortized.
MAX_EXTRA_CALLS = 50
# ATen operators per step beyond the bare loop: 5.2 (12.2 before): the non-finite guard's sub and
# nan_to_num and fused Adam's found_inf step correction, the train loss's detach and float64 copy;
# a log record's reduction every 50 steps.
MAX_EXTRA_OPS = 6


@pytest.fixture(scope="module")
def rnn(tmp_path_factory):
    return overhead.measure("rnn_sine", "cpu_test", STEPS, [], tmp_path_factory.mktemp("overhead"), rounds=1)


def _extra(run: dict) -> str:
    return "\n".join(f"{calls:6.2f} {key}" for key, calls, _ in overhead.compare(run, top=40)["extra_functions"])


@pytest.mark.slow
def test_a_steady_rnn_step_runs_a_bounded_number_of_calls_and_operators_beyond_the_bare_loop(rnn):
    d, b = rnn["dltrain"], rnn["bare"]
    assert d["steps"] == b["steps"] == STEPS
    assert b["calls_per_step"] > 100  # the bare loop was profiled: forward, backward, Adam
    extra = d["calls_per_step"] - b["calls_per_step"]
    assert extra <= MAX_EXTRA_CALLS, f"{extra:.1f} calls per step beyond the bare loop:\n{_extra(rnn)}"
    ops = d["aten_ops_per_step"] - b["aten_ops_per_step"]
    assert b["aten_ops_per_step"] > 50  # counted: forward, backward and the fused step
    assert ops <= MAX_EXTRA_OPS, (
        f"{ops:.1f} ATen operators per step beyond the bare loop: {overhead.compare(rnn)['aten_ops_diff']}"
    )


@pytest.mark.slow
def test_a_steady_step_reads_no_environment_and_asks_accelerate_nothing(rnn):
    """The fault-injection variables are read once per run (dltrain.testhooks.arm), and the loop
    asks Accelerate's properties nothing per step (only log records reduce through it)."""
    d, b = rnn["dltrain"]["functions"], rnn["bare"]["functions"]
    environ = sum(calls for key, (calls, _) in d.items() if key.startswith("<frozen os>"))
    bare_environ = sum(calls for key, (calls, _) in b.items() if key.startswith("<frozen os>"))
    assert environ <= bare_environ + 0.1, _extra(rnn)
    accelerate = {key: calls for key, (calls, _) in d.items() if key.startswith("accelerate/")}
    assert sum(accelerate.values()) <= 0.5, accelerate


def test_the_report_shows_dltrain_s_step_time_minus_the_bare_loop_s_in_microseconds(tmp_path):
    from dltrain.bench.markdown import render
    from dltrain.bench.report import build_summary
    from dltrain.bench.result import Result, append_result

    common = {"suite": "s", "entry": "rnn", "mode": "throughput", "world_size": 1, "precision": "fp32"}
    for repeat, (ours_ms, bare_ms) in enumerate([(1.05, 1.00), (1.07, 1.00)]):
        ours = Result(config="rnn-w1-fp32-tput", kind="dltrain", repeat=repeat, batch={"global": 64}, **common)
        bare = Result(config="rnn-bare-fp32", kind="bare", pair="rnn-w1-fp32-tput", repeat=repeat, **common)
        for res, ms in ((ours, ours_ms), (bare, bare_ms)):
            res = res.model_copy(update={"step_time_ms_p50": ms, "samples_per_s": 64 / (ms * 1e-3)})
            append_result(tmp_path / "results.jsonl", res)
    summary = build_summary(tmp_path)
    (row,) = summary.overhead
    assert row.config == "rnn-bare-fp32" and row.dltrain_config == "rnn-w1-fp32-tput"
    assert row.overhead_us_p50.mean == pytest.approx(60) and row.overhead_us_p50.n == 2
    assert row.overhead_us_mean.mean == pytest.approx(60)
    assert row.overhead_share_p50 == pytest.approx(0.06)
    report = render(summary, tmp_path)
    assert "## Framework overhead (dltrain - bare loop, per step)" in report
    (line,) = [ln for ln in report.splitlines() if ln.startswith("| rnn-bare-fp32 | rnn-w1-fp32-tput | 1,000 |")]
    assert "+60 ± 14" in line and "+6.0%" in line


def test_a_suite_without_bare_baselines_has_no_overhead_section(tmp_path):
    from dltrain.bench.markdown import render
    from dltrain.bench.report import build_summary
    from dltrain.bench.result import Result, append_result

    ours = Result(
        suite="s", entry="rnn", mode="throughput", world_size=1, precision="fp32", config="rnn-w1-fp32-tput",
        kind="dltrain", repeat=0, batch={"global": 64}, step_time_ms_p50=1.0, samples_per_s=64e3,
    )  # fmt: skip
    append_result(tmp_path / "results.jsonl", ours)
    summary = build_summary(tmp_path)
    assert summary.overhead == []
    report = render(summary, tmp_path)
    assert "## dltrain vs baselines" in report and "Framework overhead" not in report
