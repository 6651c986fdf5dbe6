"""`dltrain inspect`: sample views, the layer table, and the note about the architecture graph."""

from __future__ import annotations

import pytest

from conftest import RECIPES, run_cli
from dltrain.inspect import inspect
from dltrain.recipe import load_recipe


def _table_rows(summary_text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in summary_text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}  # skip the header


def test_cli_inspect_rnn(tmp_path):
    out = tmp_path / "inspect"
    result = run_cli(
        "inspect",
        str(RECIPES / "rnn_sine.yaml"),
        "--profile",
        "seed",
        "--set",
        "model.cell=lstm",
        "--output-dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "samples.png").stat().st_size > 10_000
    rows = _table_rows((out / "model_summary.md").read_text())
    # LSTM(1 -> 32): 4 gates x (1 + 32 + 2 biases) x 32 = 4,480; head 33. Batch of 2, 10 steps.
    assert rows["rnn"] == ["LSTM", "2x10x32", "4,480"] and rows["head"] == ["Linear", "2x1", "33"]
    assert rows["(model)"][2] == "4,513"
    assert "parameters: 4,513" in result.stdout and "FLOPs per sample" in result.stdout
    assert "architecture graph" in result.stdout  # rendered, or skipped with the reason


def test_inspect_cnn_digits_and_layers(tmp_path, data_dir):
    recipe = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=[f"data.root={data_dir}"])
    result = inspect(recipe, tmp_path)
    assert [p.name for p in result["samples"]] == ["samples.png"]
    rows = _table_rows(result["summary"].read_text())
    assert rows["features.3"][:2] == ["Conv2d", "2x64x14x14"] and rows["classifier.3"][1] == "2x10"
    assert result["parameters"] == 421_642
    names = list(rows)
    assert names.index("features") < names.index("features.0")  # definition order, container first


def test_inspect_bert_writes_sentences_with_labels(tmp_path, minilm_dir, monkeypatch):
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    rows = [("a gripping , funny film", 1), ("dull and far too long", 0), ("pipes | and tabs", 1)]
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    recipe = load_recipe(
        RECIPES / "bert_sst2_minilm.yaml",
        "cpu_test",
        [f"model.name_or_path={minilm_dir}", f"data.train_file={tsv}", f"data.eval_file={tsv}"],
    )
    result = inspect(recipe, tmp_path / "out", max_depth=2)
    text = result["samples"][0].read_text()
    assert (
        "| 0 | 1 (positive) | 7 | a gripping, funny film |" in text
    )  # 5 words + [CLS] [SEP]; decoded by the tokenizer
    assert "| 1 | 0 (negative) |" in text and "pipes \\| and tabs" in text
    table = _table_rows(result["summary"].read_text())
    assert table["bert.encoder"][:2] == ["BertEncoder", "2x7x384"]  # batch of 2, padded to the longer row
    assert result["parameters"] == 22_713_986
    # ~6 N T with N the 10.6M encoder weights (the 11.7M embeddings are lookups, not matmuls)
    assert 6 * 128 * 10_600_000 < result["flops_per_sample"] < 1.1 * 6 * 128 * 10_600_000


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_and_profile_validates(recipe):
    from dltrain.recipe import read_yaml

    for profile in [None, *(read_yaml(RECIPES / recipe).get("profiles") or {})]:
        load_recipe(RECIPES / recipe, profile)
