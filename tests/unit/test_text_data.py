"""The text workload beyond SST-2: a multi-class csv with string labels, sentence pairs, json and
parquet files, a datasets folder, and the errors a user can cause with them."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from conftest import RECIPES
from dltrain.data import DataError
from dltrain.recipe import RecipeError, load_recipe
from dltrain.workloads import bert

MINILM = RECIPES / "bert_sst2_minilm.yaml"
WORDS = {
    "sports": ["match", "goal", "team", "coach", "league"],
    "food": ["bread", "soup", "spice", "oven", "salad"],
    "music": ["guitar", "song", "drum", "choir", "piano"],
}


def _topics_csv(path, n: int, seed: int):
    """`n` rows of text,topic: three classes named by strings, each told apart by its words."""
    rng = random.Random(seed)
    rows = ["text,topic"]
    for _ in range(n):
        topic = rng.choice(sorted(WORDS))
        rows.append(f"{' '.join(rng.choices(WORDS[topic], k=6))},{topic}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _recipe(minilm_dir, tmp_path, *sets):
    train, val = _topics_csv(tmp_path / "train.csv", 96, 0), _topics_csv(tmp_path / "val.csv", 48, 1)
    return load_recipe(
        MINILM,
        "cpu_test",
        [
            f"model.name_or_path={minilm_dir}",
            f"data.train_file={train}",
            f"data.eval_file={val}",
            "data.text_column=text",
            "data.label_column=topic",
            "data.train_subset=null",
            "data.label_names=null",
            *sets,
        ],
    )


def test_multiclass_csv_with_string_labels_trains_and_saves_id2label(tmp_path, minilm_dir, monkeypatch):
    import dltrain

    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    recipe = _recipe(minilm_dir, tmp_path, "data.label_names=[food,music,sports]")
    assert recipe.model.num_labels == 3  # from data.label_names
    result = dltrain.train(
        recipe,
        output_dir=tmp_path / "run",
        train={"max_steps": 12, "global_batch_size": 16},
        optim={"lr": 5e-4},
        checkpoint={"save_best": False, "save_final_model": True},
        target={"value": 0.9},
        tracking={"plots": False},
    )
    assert result.summary["steps"] == 12 and result.metrics["val/examples"] == 48
    assert result.metrics["val/accuracy"] > 0.6, result.metrics  # chance is 1/3; the words give the topic away
    config = json.loads((result.run_dir / "final_model" / "config.json").read_text())
    assert config["id2label"] == {"0": "food", "1": "music", "2": "sports"}
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "final_model")
    assert model.config.num_labels == 3 and model.config.label2id["music"] == 1


def test_string_labels_map_by_label_names_and_bad_labels_are_one_line(tmp_path, minilm_dir, monkeypatch):
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    ds = bert.load_splits(_recipe(minilm_dir, tmp_path, "data.label_names=[sports,food,music]"))["train"]
    text = (tmp_path / "train.csv").read_text().splitlines()[1:]
    assert ds["labels"] == [["sports", "food", "music"].index(row.split(",")[1]) for row in text]
    with pytest.raises(DataError, match=r"labels are strings .*data.label_names"):
        bert.load_splits(_recipe(minilm_dir, tmp_path))
    with pytest.raises(DataError, match="label 'sports' is not in data.label_names"):
        bert.load_splits(_recipe(minilm_dir, tmp_path, "data.label_names=[food,music]"))
    with pytest.raises(RecipeError, match="lists 3 labels but model.num_labels is 2"):
        _recipe(minilm_dir, tmp_path, "data.label_names=[food,music,sports]", "model.num_labels=2")
    with pytest.raises(RecipeError, match="two sources"):
        _recipe(minilm_dir, tmp_path, "data.dataset=somewhere")
    (tmp_path / "ints.csv").write_text("text,topic\ngoal,0\nsoup,2\n")
    ints = [f"data.train_file={tmp_path / 'ints.csv'}", f"data.eval_file={tmp_path / 'ints.csv'}"]
    with pytest.raises(DataError, match="labels must be 0 or 1 .*found 0, 2"):
        bert.load_splits(_recipe(minilm_dir, tmp_path, *ints))
    assert bert.load_splits(_recipe(minilm_dir, tmp_path, *ints, "model.num_labels=3"))["train"]["labels"] == [0, 2]


def test_sentence_pairs_get_segment_ids_from_json_parquet_and_a_dataset_folder(tmp_path, minilm_dir, monkeypatch):
    import datasets

    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    rows = {"premise": ["a cat sits", "rain falls"], "hypothesis": ["an animal sits", "it is sunny"], "label": [0, 2]}
    ds = datasets.Dataset.from_dict(rows)
    ds.to_json(tmp_path / "pairs.jsonl")
    ds.to_parquet(tmp_path / "pairs.parquet")
    (tmp_path / "folder_src").mkdir()  # load_dataset's own layout: dev.parquet is the "validation" split
    for split in ("train", "dev"):
        ds.to_parquet(tmp_path / "folder_src" / f"{split}.parquet")
    pair = [
        "data.text_column=premise",
        "data.text_pair_column=hypothesis",
        "data.label_names=[a,b,c]",
        "data.train_subset=null",
        f"model.name_or_path={minilm_dir}",
    ]
    sources = {
        "jsonl": [f"data.train_file={tmp_path / 'pairs.jsonl'}", f"data.eval_file={tmp_path / 'pairs.jsonl'}"],
        "parquet": [f"data.train_file={tmp_path / 'pairs.parquet'}", f"data.eval_file={tmp_path / 'pairs.parquet'}"],
        "folder": [f"data.dataset={tmp_path / 'folder_src'}"],
    }
    tokenizer = bert.load_tokenizer(str(minilm_dir))
    for name, sets in sources.items():
        batch = bert.build_data(load_recipe(MINILM, "cpu_test", [*pair, *sets])).train.fetch(torch.arange(2))
        assert batch["labels"].tolist() == [0, 2], name
        first = batch["input_ids"][0][batch["attention_mask"][0].bool()]
        assert tokenizer.decode(first) == "[CLS] a cat sits [SEP] an animal sits [SEP]", name
        types = batch["token_type_ids"][0][batch["attention_mask"][0].bool()].tolist()
        assert types == [0] * 5 + [1] * 4, (name, types)  # [CLS] a cat sits [SEP] | an animal sits [SEP]
        assert batch["token_type_ids"].shape == batch["input_ids"].shape
    with pytest.raises(DataError, match="cannot load split 'nope' of data.dataset"):
        bert.load_splits(
            load_recipe(MINILM, "cpu_test", [*pair, f"data.dataset={tmp_path / 'folder_src'}", "data.eval_split=nope"])
        )


def test_cached_tokens_are_checked_against_model_num_labels(tmp_path, minilm_dir, monkeypatch):
    """Issue 22, item 9: model.num_labels is not in the cache key, so a cache tokenized for 3
    classes was handed to a 2-class model unchecked, and training died on `Target 2 is out of bounds`."""
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "three.csv").write_text("text,topic\ngoal,0\nsoup,2\nsong,1\n")
    three = [f"data.train_file={tmp_path / 'three.csv'}", f"data.eval_file={tmp_path / 'three.csv'}"]
    assert bert.load_splits(_recipe(minilm_dir, tmp_path, *three, "model.num_labels=3"))["train"]["labels"] == [0, 2, 1]
    before = bert.TOKENIZE_CALLS
    with pytest.raises(DataError, match=r"three.csv: labels must be 0 or 1 .*found 0, 1, 2"):
        bert.load_splits(_recipe(minilm_dir, tmp_path, *three, "model.num_labels=2"))
    assert bert.TOKENIZE_CALLS == before  # refused from the cache, as a fresh read refuses it


def _texts(split, tokenizer) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in split["input_ids"]]


def test_numbers_in_a_text_column_are_text(tmp_path, minilm_dir, monkeypatch):
    """Issue 22, item 10: pandas reads a csv column of numbers as integers and datasets reads a
    JSON number as one; the tokenizer took neither. A number where a text belongs is the text as written."""
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "numbers.csv").write_text("text,topic\n123,0\n007,1\n1.50,0\n")
    (tmp_path / "mixed.jsonl").write_text(
        '{"text": "good", "topic": 1}\n{"text": 5, "topic": 0}\n{"text": 2.5, "topic": 0}\n'
    )
    (tmp_path / "numbers.jsonl").write_text('{"text": 5, "topic": 1}\n{"text": 6, "topic": 0}\n')
    tokenizer = bert.load_tokenizer(str(minilm_dir))
    expected = {
        "numbers.csv": ["123", "007", "1. 50"],
        "mixed.jsonl": ["good", "5", "2. 5"],
        "numbers.jsonl": ["5", "6"],
    }
    for name, texts in expected.items():
        files = [f"data.train_file={tmp_path / name}", f"data.eval_file={tmp_path / name}"]
        assert _texts(bert.load_splits(_recipe(minilm_dir, tmp_path, *files))["train"], tokenizer) == texts, name
    import dltrain

    result = dltrain.train(
        _recipe(minilm_dir, tmp_path, *files),
        output_dir=tmp_path / "run",
        tracking={"plots": False},
        train={"max_steps": 2, "global_batch_size": 2},
        checkpoint={"save_best": False},
    )
    assert result.summary["steps"] == 2  # and the loop takes them: the numbers trained as texts


def test_a_text_field_past_128_kib_is_read_and_truncated(tmp_path, minilm_dir, monkeypatch):
    """Issue 22, item 10: Python's csv module refuses a field past 131,072 characters by default;
    pandas reads it, and the tokenizer truncates it to data.max_length anyway."""
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    long_text = "word " * 30_000  # 150,000 characters
    (tmp_path / "long.csv").write_text(f"text,topic\n{long_text},1\nshort,0\n")
    files = [f"data.train_file={tmp_path / 'long.csv'}", f"data.eval_file={tmp_path / 'long.csv'}"]
    split = bert.load_splits(_recipe(minilm_dir, tmp_path, *files, "data.max_length=16"))["train"]
    assert [len(ids) for ids in split["input_ids"]] == [16, 3]  # [CLS] 14 x word [SEP]; [CLS] short [SEP]


def test_missing_labels_are_refused_by_line_and_the_suggested_label_names_load(tmp_path, minilm_dir, monkeypatch):
    """Issue 22, item 10: an empty label made the labels strings, and the message suggested
    `data.label_names=[, 0, 1]`; a suggestion must be one the recipe takes (a label "1" is a string)."""
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "gap.csv").write_text("text,topic\ngoal,1\nsoup,\n")
    gap = [f"data.train_file={tmp_path / 'gap.csv'}", f"data.eval_file={tmp_path / 'gap.csv'}"]
    with pytest.raises(DataError, match=r"gap.csv, line 3: no label in column 'topic'"):
        bert.load_splits(_recipe(minilm_dir, tmp_path, *gap))
    (tmp_path / "names.csv").write_text("text,topic\ngoal,1\nsoup,pos\n")
    names = [f"data.train_file={tmp_path / 'names.csv'}", f"data.eval_file={tmp_path / 'names.csv'}"]
    with pytest.raises(DataError, match="labels are strings") as refused:
        bert.load_splits(_recipe(minilm_dir, tmp_path, *names))
    suggested = re.search(r"--set '(data.label_names=.*)'", str(refused.value)).group(1)
    assert suggested == 'data.label_names=["1", pos]'
    assert bert.load_splits(_recipe(minilm_dir, tmp_path, *names, suggested))["train"]["labels"] == [0, 1]
    with pytest.raises(DataError, match=r"names.csv, line 3: label 'pos' is not in data.label_names"):
        bert.load_splits(_recipe(minilm_dir, tmp_path, *names, "data.label_names=['1', neg]"))
