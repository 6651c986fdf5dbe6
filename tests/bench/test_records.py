"""Time-to-accuracy records: the aggregation over seeds and the table (dltrain.bench.records)."""

from __future__ import annotations

import math

import pytest

from dltrain.bench.records import RecordRow, table, verdict
from dltrain.bench.report import aggregate
from dltrain.bench.result import Result, Stats


def _run(seed, metric, train_s, wall_s, ok=True, name="test/accuracy"):
    return Result(
        suite="t",
        config="cnn",
        entry="cnn",
        kind="dltrain",
        mode="record",
        world_size=1,
        precision="fp32",
        seed=seed,
        status="ok" if ok else "failed",
        train_s=train_s,
        wall_s=wall_s,
        target={"metric": name, "value": 0.99, "mode": "max"},
        metrics={name: metric} if ok else {},
    )


def _row(runs, target=0.99, mode="max", reference=None, name="test/accuracy") -> RecordRow:
    row = RecordRow(
        name="cnn fast",
        recipe="r.yaml",
        seeds=[r.seed for r in runs],
        metric_name=name,
        target=target,
        mode=mode,
        config=aggregate(runs)["cnn"],
        runs=runs,
        reference=reference,
    )
    return row.model_copy(update={"met": verdict(row)})


def _reference(train_s, note, metric=None):
    return Result(
        suite="t",
        config="cnn-reference",
        entry="cnn",
        kind="reference",
        mode="record",
        world_size=1,
        precision="fp32",
        train_s=train_s,
        note=note,
        target={"metric": "val/accuracy", "value": 0.99},
        metrics={} if metric is None else {"val/accuracy": metric},
    )


def test_mean_and_sample_std_with_every_value():
    stats = Stats.of([0.990, 0.992, 0.988, 0.991, 0.989])
    assert stats.n == 5 and stats.mean == pytest.approx(0.99)
    # sample standard deviation (n - 1): sqrt((0 + 4 + 4 + 1 + 1) e-6 / 4)
    assert stats.std == pytest.approx(math.sqrt(10e-6 / 4))
    assert (stats.min, stats.max) == (0.988, 0.992)
    assert Stats.of([3.0]).std == 0.0


def test_aggregate_keeps_failed_seeds_out_of_the_mean_and_refuses_a_record():
    runs = [_run(0, 0.99, 10.0, 15.0), _run(1, 0.995, 12.0, 17.0), _run(2, None, None, 3.0, ok=False)]
    row = _row(runs)
    assert row.seeds == [0, 1, 2] and row.failed_seeds == [2]
    assert row.metric.n == 2 and row.config.figures["train_s"].mean == pytest.approx(11.0)
    assert row.config.figures["wall_s"].mean == pytest.approx(16.0)  # the failed seed's 3 s is not in it
    assert row.met is None  # a seed failed: no record, whatever the mean


def test_verdict_follows_the_mode_on_the_mean():
    row = _row(
        [_run(0, 0.004, 1.0, 2.0, name="test/mse_ratio"), _run(1, 0.012, 1.0, 2.0, name="test/mse_ratio")],
        target=0.01,
        mode="min",
        name="test/mse_ratio",
    )
    assert row.metric.mean == pytest.approx(0.008)
    assert verdict(row) is True  # one seed above the target: the mean is what counts
    assert verdict(row.model_copy(update={"target": 0.005})) is False
    assert _row([_run(0, 0.985, 1, 2), _run(1, 0.99, 1, 2)]).met is False


def test_table_shows_both_clocks_each_seed_and_the_speed_up():
    row = _row(
        [_run(0, 0.9901, 20.0, 30.0), _run(1, 0.9911, 22.0, 32.0)],
        reference=_reference(157.5, "10 epochs, batch 64, to 99% val"),
    )
    lines = table([row])
    assert len(lines) == 3
    row = lines[2]
    assert "test/accuracy 0.9906 ± 0.0007" in row and "0.9901, 0.9911" in row
    assert "| yes |" in row and "21.0 ± 1.4 s" in row and "31.0 ± 1.4 s" in row
    assert "157.5 s (10 epochs, batch 64, to 99% val)" in row and "7.5x" in row


def test_a_reference_short_of_the_target_gives_a_bound_not_a_speed_up():
    runs = [_run(0, 0.991, 28.0, 33.0)]
    assert (
        "> 5.9x (reference short of the target)"
        in table([_row(runs, reference=_reference(164.5, "original", 0.9875))])[2]
    )
    assert (
        "n/a (reference short of the target)" in table([_row(runs, reference=_reference(0.1, "original", 0.9875))])[2]
    )
    assert "| 5.9x |" in table([_row(runs, reference=_reference(164.5, "original", 0.991))])[2]
