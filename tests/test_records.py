"""Time-to-accuracy records: the aggregation over seeds and the table (dltrain.bench.records)."""

from __future__ import annotations

import math

import pytest

from dltrain.bench.records import aggregate, mean_std, table, verdict


def _run(seed, metric, train_s, wall_s, ok=True):
    return {"seed": seed, "metric": metric, "train_s": train_s, "wall_s": wall_s, "ok": ok}


def test_mean_and_sample_std_with_every_value():
    stats = mean_std([0.990, 0.992, 0.988, 0.991, 0.989])
    assert stats["n"] == 5 and stats["mean"] == pytest.approx(0.99)
    # sample standard deviation (n - 1): sqrt((0 + 4 + 4 + 1 + 1) e-6 / 4)
    assert stats["std"] == pytest.approx(math.sqrt(10e-6 / 4))
    assert stats["values"] == [0.990, 0.992, 0.988, 0.991, 0.989]
    assert mean_std([3.0])["std"] == 0.0
    assert mean_std([])["mean"] is None


def test_aggregate_keeps_failed_seeds_out_of_the_mean_and_refuses_a_record():
    runs = [_run(0, 0.99, 10.0, 15.0), _run(1, 0.995, 12.0, 17.0), _run(2, None, None, 3.0, ok=False)]
    agg = aggregate(runs, "test/accuracy")
    assert agg["seeds"] == [0, 1, 2] and agg["failed_seeds"] == [2]
    assert agg["metric"]["values"] == [0.99, 0.995] and agg["train_s"]["mean"] == pytest.approx(11.0)
    assert agg["wall_s"]["values"] == [15.0, 17.0]
    assert verdict(agg, 0.99, "max") is None  # a seed failed: no record, whatever the mean


def test_verdict_follows_the_mode_on_the_mean():
    agg = aggregate([_run(0, 0.004, 1.0, 2.0), _run(1, 0.012, 1.0, 2.0)], "test/mse_ratio")
    assert agg["metric"]["mean"] == pytest.approx(0.008)
    assert verdict(agg, 0.01, "min") is True  # one seed above the target: the mean is what counts
    assert verdict(agg, 0.005, "min") is False
    assert verdict(aggregate([_run(0, 0.985, 1, 2), _run(1, 0.99, 1, 2)], "a"), 0.99, "max") is False


def test_table_shows_both_clocks_each_seed_and_the_speed_up():
    agg = aggregate([_run(0, 0.9901, 20.0, 30.0), _run(1, 0.9911, 22.0, 32.0)], "test/accuracy")
    lines = table([{"name": "cnn fast", "agg": agg, "target": 0.99, "mode": "max", "met": verdict(agg, 0.99, "max"),
                    "reference": {"train_s": 157.5, "what": "10 epochs, batch 64, to 99% val"}}])
    assert len(lines) == 3
    row = lines[2]
    assert "test/accuracy 0.9906 ± 0.0007" in row and "0.9901, 0.9911" in row
    assert "| yes |" in row and "21.0 ± 1.4 s" in row and "31.0 ± 1.4 s" in row
    assert "157.5 s (10 epochs, batch 64, to 99% val)" in row and "7.5x" in row


def test_a_reference_short_of_the_target_gives_a_bound_not_a_speed_up():
    agg = aggregate([_run(0, 0.991, 28.0, 33.0)], "test/accuracy")
    row = {"name": "cnn", "agg": agg, "target": 0.99, "mode": "max", "met": True,
           "reference": {"train_s": 164.5, "what": "original", "metric": 0.9875, "metric_name": "val/accuracy"}}
    assert "> 5.9x (reference short of the target)" in table([row])[2]
    row["reference"] |= {"train_s": 0.1}
    assert "n/a (reference short of the target)" in table([row])[2]
    row["reference"] |= {"train_s": 164.5, "metric": 0.991}
    assert "| 5.9x |" in table([row])[2]
