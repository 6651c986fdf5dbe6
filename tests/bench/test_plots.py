"""The report's plots (dltrain.bench.plots): what each one draws, from typed results."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from dltrain.bench import plots
from dltrain.bench.report import Summary, aggregate, build_summary
from dltrain.bench.result import Result, append_result


def _result(config: str, world: int, sps: float, repeat: int = 0, **more) -> Result:
    return Result(
        suite="t",
        config=config,
        kind="dltrain",
        entry="cnn",
        mode="throughput",
        world_size=world,
        precision="fp32",
        repeat=repeat,
        samples_per_s=sps,
        **more,
    )


@pytest.fixture
def drawn(monkeypatch):
    """Each figure the plots save, by file name, instead of its PNG alone."""
    figures = {}
    save = plots._save

    def keep(fig, path):
        figures[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_throughput_against_world_size_with_its_ideal_line(tmp_path, drawn):
    results = [
        _result("cnn-w1", 1, 100.0),
        _result("cnn-w2", 2, 150.0),
        _result("cnn-w1", 1, 110.0, repeat=1),
        _result("cnn-w2", 2, 170.0, repeat=1),
    ]
    from dltrain.bench.scaling import scaling

    summary = Summary(configs=aggregate(results))
    summary.scaling = scaling(summary.configs)
    path = plots.plot_scaling(summary, tmp_path)
    assert path == tmp_path / "throughput_vs_world.png" and path.stat().st_size > 0
    measured, ideal = drawn[path.name].axes[0].lines
    assert list(measured.get_xdata()) == [1, 2] and list(measured.get_ydata()) == pytest.approx([105.0, 160.0])
    assert list(ideal.get_ydata()) == pytest.approx([105.0, 210.0])  # world 1's throughput times the world size


def test_bars_are_the_means_over_repeats_with_their_spread(tmp_path, drawn):
    configs = aggregate(
        [
            _result("a", 1, 100.0),
            _result("a", 1, 120.0, repeat=1),
            _result("b", 1, 50.0),
            Result(
                suite="t",
                config="c",
                kind="dltrain",
                entry="cnn",
                mode="time_to_target",
                world_size=1,
                precision="fp32",
                time_to_target_s=9.0,
            ),
        ]
    )
    items = plots._figure_items(Summary(configs=configs), "samples_per_s", mode="throughput")
    assert [(name, mean) for name, mean, _ in items] == [("a", 110.0), ("b", 50.0)]  # c is not a throughput run
    assert items[0][2] == pytest.approx(14.142, rel=1e-3) and items[1][2] == 0.0  # sample std; one run: none
    path = plots._bars(items, "train samples/s", "t", tmp_path / "bars.png")
    bars = drawn["bars.png"].axes[0].patches
    assert [b.get_height() for b in bars] == [110.0, 50.0]
    assert plots._bars([], "y", "t", tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    assert path.is_file()


def test_loss_curves_draw_the_first_repeat_of_each_run_that_finished(tmp_path, drawn):
    def run_dir(name: str, losses: list[float]) -> str:
        d = tmp_path / name
        d.mkdir()
        lines = [json.dumps({"step": i + 1, "train/loss": v}) for i, v in enumerate(losses)] + [json.dumps({"step": 9})]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return str(d)

    results = [
        _result("a", 1, 1.0, run_dir=run_dir("a0", [2.0, 1.0])),
        _result("a", 1, 1.0, repeat=1, run_dir=run_dir("a1", [9.0, 9.0])),  # a second repeat: not drawn
        _result("b", 1, 1.0, status="failed", run_dir=run_dir("b0", [5.0])),  # failed: not drawn
        _result("c", 1, 1.0, run_dir=str(tmp_path / "missing")),
    ]  # no metrics.jsonl: skipped
    path = plots.plot_loss_curves({}, results, tmp_path)
    (line,) = drawn[path.name].axes[0].lines
    assert line.get_label() == "a" and list(line.get_ydata()) == [2.0, 1.0]
    assert plots.plot_loss_curves({}, results[2:], tmp_path / "x") is None  # nothing to draw: no file


def test_a_committed_result_directory_plots_what_it_holds(tmp_path, drawn):
    """The scaling_cpu results (no run directories kept): throughput, MFU and scaling, and no
    loss curves or time to target; the comm plot from its comm.json."""
    out = tmp_path / "scaling_cpu"
    out.mkdir()
    committed = REPO / "benchmarks" / "results" / "2026-11-30-cpu" / "scaling_cpu" / "results.jsonl"
    for line in committed.read_text().splitlines():
        append_result(out / "results.jsonl", Result.model_validate_json(line))
    summary = build_summary(out)
    paths = plots.make_plots(summary, [Result.model_validate_json(x) for x in committed.read_text().splitlines()], out)
    assert sorted(p.name for p in paths) == ["mfu.png", "throughput.png", "throughput_vs_world.png"]
    mfu = [b.get_height() for b in drawn["mfu.png"].axes[0].patches]
    assert mfu == pytest.approx([100 * c.mean("mfu") for c in summary.configs.values() if c.mean("mfu") is not None])
