"""BERT on SST-2: local TSV loading, the tokenized cache, padding, offline model resolution, accuracy,
and evaluation that counts each dev example once with one and with two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import RECIPES, REPO, run_cli
from dltrain.data import DataError
from dltrain.recipe import RecipeError, load_recipe
from dltrain.workloads import bert

MINILM = RECIPES / "bert_sst2_minilm.yaml"


def minilm_recipe(minilm_dir, *overrides, profile="cpu_test"):
    return load_recipe(MINILM, profile, [f"model.name_or_path={minilm_dir}", *overrides])


def write_tsv(path, rows, header="sentence\tlabel"):
    path.write_text(header + "\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    return path


@pytest.mark.slow
@pytest.mark.long
def test_sst2_local_tsv_counts_and_labels(sst2_dir, minilm_dir):
    splits = bert.load_splits(minilm_recipe(minilm_dir, f"data.root={sst2_dir.parent}", "data.train_subset=null"))
    assert (len(splits["train"]), len(splits["val"])) == (67_349, 872)
    assert torch.bincount(torch.tensor(splits["train"]["labels"])).tolist() == [29_780, 37_569]
    assert torch.bincount(torch.tensor(splits["val"]["labels"])).tolist() == [428, 444]
    first = splits["train"][0]["input_ids"]
    tokenizer = bert.load_tokenizer(str(minilm_dir))
    assert tokenizer.decode(first, skip_special_tokens=True) == "hide new secretions from the parental units"
    assert max(len(ids) for ids in splits["train"]["input_ids"]) <= 128


def test_a_tokenized_cache_carried_to_another_machine_is_found_there(tmp_path, minilm_dir, monkeypatch):
    """device_check.sh --prepare tokenizes on the CPU machine into .carry; the GPU machine sees the
    same files and tokenizer under another path, with other modification times."""
    import shutil

    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    here = tmp_path / "cpu_machine"
    (here / "model").mkdir(parents=True)
    for f in minilm_dir.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")):
            shutil.copy(f, here / "model")
    write_tsv(here / "train.tsv", [("a good film", 1), ("a dull film", 0), ("fine", 1)])
    write_tsv(here / "dev.tsv", [("great", 1), ("awful", 0)])

    def recipe(root):
        return minilm_recipe(
            minilm_dir,
            f"model.tokenizer={root / 'model'}",
            f"data.train_file={root / 'train.tsv'}",
            f"data.eval_file={root / 'dev.tsv'}",
        )

    before = bert.TOKENIZE_CALLS
    bert.load_splits(recipe(here))
    assert bert.TOKENIZE_CALLS == before + 2
    there = tmp_path / "gpu_machine"
    shutil.copytree(here, there)  # new paths, new modification times
    bert.load_tokenizer.cache_clear()
    assert bert.load_splits(recipe(there))["train"]["labels"] == [1, 0, 1]
    assert bert.TOKENIZE_CALLS == before + 2  # found, not tokenized again


def test_tokenized_cache_is_reused(tmp_path, minilm_dir, monkeypatch):
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    train = write_tsv(tmp_path / "train.tsv", [("a good film", 1), ("a dull film", 0), ("fine", 1)])
    dev = write_tsv(tmp_path / "dev.tsv", [("great", 1), ("awful", 0)])
    recipe = minilm_recipe(minilm_dir, f"data.train_file={train}", f"data.eval_file={dev}")
    before = bert.TOKENIZE_CALLS
    first = bert.load_splits(recipe)
    assert bert.TOKENIZE_CALLS == before + 2  # train and dev tokenized once
    cached = sorted((tmp_path / "cache" / "tokenized").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in cached]
    second = bert.load_splits(recipe)
    assert bert.TOKENIZE_CALLS == before + 2  # nothing tokenized again
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache" / "tokenized").iterdir())] == mtimes
    assert second["train"]["input_ids"] == first["train"]["input_ids"]
    # A changed file is a new cache entry, not a stale hit.
    write_tsv(train, [("a good film", 1), ("a dull film", 0), ("fine", 1), ("more", 0)])
    assert len(bert.load_splits(recipe)["train"]) == 4 and bert.TOKENIZE_CALLS == before + 3


def test_user_csv_with_own_columns_and_padding_modes(tmp_path, minilm_dir, monkeypatch):
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    csv_text = 'review,stars\n"a long, quoted ""film"" that goes on",1\nnull,0\n'
    (tmp_path / "train.csv").write_text(csv_text)
    overrides = [
        f"data.train_file={tmp_path / 'train.csv'}",
        f"data.eval_file={tmp_path / 'train.csv'}",
        "data.text_column=review",
        "data.label_column=stars",
    ]
    dynamic = bert.build_data(minilm_recipe(minilm_dir, *overrides)).train.fetch(torch.arange(2))
    assert dynamic["labels"].tolist() == [1, 0]
    lengths = dynamic["attention_mask"].sum(dim=1).tolist()
    assert dynamic["input_ids"].shape[1] == max(lengths) and lengths[1] == 3  # [CLS] null [SEP]
    fixed = bert.build_data(minilm_recipe(minilm_dir, *overrides, "data.padding=fixed")).train.fetch(torch.arange(2))
    assert fixed["input_ids"].shape == (2, 128) and fixed["attention_mask"].sum(dim=1).tolist() == lengths


@pytest.mark.parametrize(
    "rows, header, message",
    [
        ([("good", 1)], "text\tlabel", "no column 'sentence'"),
        ([("good", 1), ("meh", 3)], "sentence\tlabel", "labels must be 0 or 1"),
        ([], "sentence\tlabel", "no rows"),
    ],
)
def test_bad_user_files_give_one_clear_error(tmp_path, minilm_dir, monkeypatch, rows, header, message):
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    bad = write_tsv(tmp_path / "bad.tsv", rows, header)
    ok = write_tsv(tmp_path / "ok.tsv", [("good", 1), ("bad", 0)])
    with pytest.raises(DataError, match=message):
        bert.load_splits(minilm_recipe(minilm_dir, f"data.train_file={bad}", f"data.eval_file={ok}"))


@pytest.mark.parametrize(
    "name, row, message",
    [
        ("ragged.tsv", "bad\tfilm\t0", r"ragged.tsv, line 3: 3 tab-separated fields where the header has 2"),
        # pandas would read "" as this row's label
        ("ragged.tsv", "bad film", r"ragged.tsv, line 3: 1 tab-separated field where the header has 2"),
        ("ragged.csv", "bad,film,0", r"ragged.csv, line 3: 3 comma-separated fields where the header has 2"),
    ],
)
def test_a_ragged_row_names_the_file_and_the_line(tmp_path, minilm_dir, monkeypatch, name, row, message):
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    sep = "\t" if name.endswith(".tsv") else ","
    bad = tmp_path / name
    bad.write_text(f"sentence{sep}label\ngood film{sep}1\n{row}\n\nfine{sep}1\n")  # the blank line is no row
    ok = write_tsv(tmp_path / "ok.tsv", [("good", 1), ("bad", 0)])
    with pytest.raises(DataError, match=message):
        bert.load_splits(minilm_recipe(minilm_dir, f"data.train_file={bad}", f"data.eval_file={ok}"))


@pytest.mark.parametrize("damage", ["truncated", "unfinished"])
def test_a_damaged_tokenized_cache_is_rebuilt_with_one_warning(tmp_path, minilm_dir, monkeypatch, capsys, damage):
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    train = write_tsv(tmp_path / "train.tsv", [("a good film", 1), ("a dull film", 0), ("fine", 1)])
    dev = write_tsv(tmp_path / "dev.tsv", [("great", 1), ("awful", 0)])
    recipe = minilm_recipe(minilm_dir, f"data.train_file={train}", f"data.eval_file={dev}")
    want = {
        split: ds["input_ids"] for split, ds in bert.load_splits(recipe).items()
    }  # read now: the files change below
    folder = sorted((tmp_path / "cache" / "tokenized").iterdir())[0]
    if damage == "truncated":  # a new file in its place: the loaded copy may still map the old one
        arrow = next(folder.glob("*.arrow"))
        cut = folder / "cut"
        cut.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
        os.replace(cut, arrow)
    else:  # a folder with no completion marker, as a process killed while writing it would leave
        (folder / "dltrain-complete.json").unlink()
    capsys.readouterr()
    before = bert.TOKENIZE_CALLS
    again = bert.load_splits(recipe)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dltrain:")]  # not progress bars
    assert len(said) == 1 and said[0].startswith(f"dltrain: warning: tokenized cache {folder} is damaged"), said
    assert bert.TOKENIZE_CALLS == before + 1  # only the damaged split tokenized again
    assert {split: ds["input_ids"] for split, ds in again.items()} == want
    bert.load_splits(recipe)  # the rebuilt copy is whole
    assert bert.TOKENIZE_CALLS == before + 1 and "dltrain:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "max_length, message",
    [
        (2, "data.max_length=2 leaves no room for text after the tokenizer's 2 special tokens"),
        (513, "data.max_length=513 is more than the 512 positions of"),
    ],
)
def test_max_length_is_checked_against_the_tokenizer_and_the_model(
    tmp_path, minilm_dir, monkeypatch, max_length, message
):
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    rows = write_tsv(tmp_path / "rows.tsv", [("good", 1), ("bad", 0)])
    recipe = minilm_recipe(
        minilm_dir, f"data.train_file={rows}", f"data.eval_file={rows}", f"data.max_length={max_length}"
    )
    with pytest.raises(RecipeError, match=message):
        bert.build_data(recipe)
    assert not (tmp_path / "cache" / "tokenized").exists()  # refused before anything was tokenized


def test_models_dir_resolves_a_hub_id_offline(minilm_dir, monkeypatch):
    monkeypatch.setenv("DLTRAIN_MODELS_DIR", str(minilm_dir.parent))
    assert bert.resolve("sentence-transformers/all-MiniLM-L6-v2") == str(minilm_dir.parent / "all-MiniLM-L6-v2")
    monkeypatch.delenv("DLTRAIN_MODELS_DIR")
    assert bert.resolve("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_uncached_hub_id_offline_names_the_id_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DLTRAIN_MODELS_DIR", raising=False)
    recipe = load_recipe(MINILM, "cpu_test", ["model.name_or_path=nobody-here/no-such-model"])
    with pytest.raises(DataError, match=r"'nobody-here/no-such-model'.*local directory.*model.name_or_path"):
        bert.build_model(recipe)


@pytest.mark.slow
def test_random_bert_base_builds_offline_with_the_minilm_tokenizer(minilm_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DLTRAIN_MODELS_DIR", str(minilm_dir.parent))
    recipe = load_recipe(RECIPES / "bert_sst2.yaml", "cpu_test")
    assert (recipe.model.name_or_path, recipe.model.init) == ("bert-base-uncased", "random")
    model = bert.build_model(recipe)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (
        12,
        768,
        12,
        3072,
    )
    assert sum(p.numel() for p in model.parameters()) == 109_483_778  # bert-base 109,482,240 + 2-way head
    assert len(bert.tokenizer_for(recipe)) == cfg.vocab_size == 30_522
    batch = {
        "input_ids": torch.tensor([[101, 1996, 2143, 102]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "labels": torch.tensor([1]),
    }
    out = bert.forward(model.eval(), batch)
    assert out.stats["tokens"].tolist() == [4.0] and torch.isfinite(out.loss)


def test_flops_formula():
    cfg = bert.model_config(load_recipe(RECIPES / "bert_sst2.yaml", "cpu_test").model)
    d, L, T = 768, 12, 128
    n = L * (4 * d * d + 2 * d * 3072) + d * d + 2 * d
    assert bert.flops_per_token(cfg, T) == 6 * n + 12 * L * d * T


@pytest.mark.slow
@pytest.mark.long
def test_minilm_cpu_test_reaches_80_percent_and_saves_the_best_model(tmp_path, sst2_dir, minilm_dir):
    out = tmp_path / "run"
    result = run_cli(
        "train",
        str(MINILM),
        "--profile",
        "cpu_test",
        "--set",
        f"model.name_or_path={minilm_dir}",
        "--set",
        f"data.root={sst2_dir.parent}",
        "--output-dir",
        str(out),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["val/examples"] == 872  # one process: each dev sentence exactly once
    assert summary["metrics"]["val/accuracy"] >= 0.80, summary["metrics"]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    best = out / "best_model"
    model = AutoModelForSequenceClassification.from_pretrained(best)
    assert model.config.num_labels == 2 and AutoTokenizer.from_pretrained(best)("good")["input_ids"][0] == 101
    assert model.config.id2label == {0: "negative", 1: "positive"}  # the recipe's data.label_names


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.long
def test_two_processes_count_each_dev_example_once(tmp_path, sst2_dir, minilm_dir):
    out = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        "-m",
        "dltrain",
        "train",
        str(MINILM),
        "--profile",
        "cpu_test",
        "--set",
        f"model.name_or_path={minilm_dir}",
        "--set",
        f"data.root={sst2_dir.parent}",
        "--set",
        "data.train_subset=64",
        "--set",
        "train.max_steps=2",
        "--set",
        "checkpoint.save_best=false",
        "--output-dir",
        str(out),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batch"] == {"global": 16, "micro": 8, "grad_accum": 1}  # two ranks of 8
    assert summary["metrics"]["val/examples"] == 872  # 436 per rank, no padding counted


def test_fast_profile_validates_keeps_the_model_and_never_stops_early():
    base, fast = load_recipe(MINILM), load_recipe(MINILM, "fast")
    # a record may change anything but the architecture: which weights train is part of the schedule
    frozen = {"freeze_embeddings", "freeze_layers"}
    assert fast.model.model_dump(exclude=frozen) == base.model.model_dump(exclude=frozen)
    assert fast.target.stop is False  # dev is evaluated once, at the end of a fixed schedule
    assert fast.checkpoint.save_best is False  # no model is picked by the dev set
    assert (fast.target.metric, fast.target.value, fast.target.mode) == ("val/accuracy", 0.88, "max")
    assert fast.train.max_steps and fast.train.eval_every == fast.train.max_steps
