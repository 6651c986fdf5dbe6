"""The text workloads' `data` section: where the texts come from, how they are padded and ordered.
Read by dltrain.workloads.bert_data and text_rows; the BERT recipe takes it (dltrain.workloads.bert)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt, model_validator

from dltrain.sections import HubIdOrPath, LocalPath, Section


class DataConfig(Section):
    root: LocalPath | None = None
    """folder holding sst2/{train,dev}.tsv; default $DLTRAIN_DATA_DIR"""
    train_file: LocalPath | None = None
    """own csv/tsv/json/jsonl/parquet file instead of SST-2 (needs eval_file)"""
    eval_file: LocalPath | None = None
    test_file: LocalPath | None = None
    dataset: HubIdOrPath | None = None
    """datasets.load_dataset path instead of SST-2: a hub id (e.g. nyu-mll/glue) or a local dataset folder"""
    config: str | None = Field(None, min_length=1)
    """the dataset's configuration (e.g. mnli); data.dataset only"""
    train_split: str = Field("train", min_length=1)
    """split names in data.dataset"""
    eval_split: str = Field("validation", min_length=1)
    test_split: str | None = Field(None, min_length=1)
    """evaluated once after training; needs labels"""
    text_column: str = Field("sentence", min_length=1)
    text_pair_column: str | None = Field(None, min_length=1)
    """second text of a sentence pair (e.g. NLI's hypothesis); tokenized as [CLS] a [SEP] b [SEP]"""
    label_column: str = Field("label", min_length=1)
    label_names: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, min_length=2, max_length=100_000
    )
    """names of the label ids 0, 1, ... in order: string labels are mapped by them, and they are saved
    with the model as id2label"""
    max_length: PositiveInt = 128
    """tokens, truncating longer texts, as the original"""
    padding: Literal["dynamic", "fixed", "bucket"] = "dynamic"
    """dynamic: each micro-batch padded to its longest text (least work in eager mode); fixed: always
    to max_length (one shape); bucket: the longest text rounded up to a multiple of
    bucket_multiple, capped at max_length (a few shapes, so torch.compile compiles a few graphs;
    slower than dynamic in eager mode)."""
    bucket_multiple: PositiveInt = 32
    """tokens; padding: bucket only"""
    order: Literal["random", "length_grouped"] = "random"
    """random: the epoch's permutation; length_grouped: sorted by length inside mega-batches of
    group_batches global batches, whose batches are then shuffled (dltrain.data.length_grouped):
    less padding, another order."""
    group_batches: int = Field(64, ge=1, le=1_000_000)
    train_subset: PositiveInt | None = None
    """use this many train rows, drawn by train.seed"""
    eval_subset: PositiveInt | None = None
    """use this many eval rows, drawn by train.seed"""

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.dataset and (self.train_file or self.eval_file or self.test_file):
            raise ValueError("data.dataset and data.train_file/eval_file/test_file are two sources: give one")
        if self.config and not self.dataset:
            raise ValueError("data.config names a configuration of data.dataset: give data.dataset too")
        if self.label_names and len(set(self.label_names)) != len(self.label_names):
            raise ValueError("data.label_names lists a name twice: each label id needs its own name")
        return self
