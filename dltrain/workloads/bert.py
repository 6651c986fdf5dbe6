"""Sequence classification with any AutoModelForSequenceClassification checkpoint, via transformers:
SST-2 by default (the original report's BERT), or any text data `datasets` reads.

Data: SST-2 from the data root (or the hub), a `datasets.load_dataset` spec (`data.dataset` hub id
or local dataset folder, `data.config`, split names), or local csv/tsv/json/jsonl/parquet files
(`data.train_file`, `data.eval_file`, `data.test_file`). One text column, or two for sentence pairs
(`data.text_pair_column`); labels are integer ids below `model.num_labels`, or strings mapped to
ids by `data.label_names`, whose names are saved with the model (`id2label`). Reading, tokenizing,
the tokenized cache and the padded device tensors live in dltrain.workloads.bert_data;
`load_splits` and `build_data` here give it the recipe's data section, tokenizer and seed.

Model path: `model.name_or_path` is a local directory or a hub id. A hub id also resolves to
`$DLTRAIN_MODELS_DIR/<id>` or `$DLTRAIN_MODELS_DIR/<last part of the id>` when such a folder
exists (so `sentence-transformers/all-MiniLM-L6-v2` finds `$DLTRAIN_MODELS_DIR/all-MiniLM-L6-v2`
offline).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from dltrain.data import DataError, DataSplits, sized_by
from dltrain.plugin import Output, classification_output
from dltrain.recipe import HubIdOrPath, RecipeBase, RecipeError, Section
from dltrain.workload import Workload
from dltrain.workloads import bert_data
from dltrain.workloads.bert_data import TokenSplit, tokenized_split  # noqa: F401 - public names of this workload
from dltrain.workloads.text_config import DataConfig

METRICS = tuple(
    f"{split}/{m}"
    for split in ("val", "test")
    for m in ("loss", "accuracy", "tokens_per_example", "padded_tokens_per_example")
)  # test/: with data.test_file
REQUIRES = {"transformers": "nlp", "datasets": "nlp"}  # module -> the pip extra that installs it (dltrain.extras)

# ----------------------------------------------------------------------------------------------
# Config


class ModelConfig(Section):
    name_or_path: HubIdOrPath = "bert-base-uncased"
    """hub id or local directory (see module docstring)"""
    tokenizer: HubIdOrPath | None = None
    """hub id or directory; default: name_or_path"""
    init: Literal["pretrained", "random"] = "pretrained"
    """random: architecture from the config alone"""
    # Always an int once the recipe is validated (Recipe._labels_agree fills in the default).
    num_labels: int | None = Field(None, ge=2)
    """classifier outputs (label ids 0 .. num_labels-1); null: the number of data.label_names, else 2"""
    freeze_embeddings: bool = False
    """the embedding tables and their LayerNorm are not trained: no gradient, no optimizer state"""
    freeze_layers: int = Field(0, ge=0)
    """the first k encoder layers are not trained either (needs freeze_embeddings): no backward
    runs below the first trained layer"""


class Recipe(RecipeBase):
    workload: Literal["bert"]
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()

    @model_validator(mode="after")
    def _labels_agree(self) -> Recipe:
        names = self.data.label_names
        if self.model.num_labels is None:
            self.model = self.model.model_copy(update={"num_labels": len(names) if names else 2})
        elif names and self.model.num_labels != len(names):
            raise ValueError(
                f"data.label_names lists {len(names)} labels but model.num_labels is {self.model.num_labels}: "
                "make them agree (or set model.num_labels to null)"
            )
        return self

    @model_validator(mode="after")
    def _frozen_layers_sit_on_frozen_embeddings(self) -> Recipe:
        if self.model.freeze_layers and not self.model.freeze_embeddings:
            raise ValueError(
                f"model.freeze_layers={self.model.freeze_layers} with trained embeddings still runs the "
                "frozen layers' backward to reach them: set model.freeze_embeddings=true as well"
            )
        return self

    @model_validator(mode="after")
    def _a_test_metric_needs_a_test_split(self) -> Recipe:
        metric = self.target.metric if self.target is not None else ""
        if metric.startswith("test/") and not (self.data.test_file or (self.data.dataset and self.data.test_split)):
            raise ValueError(
                f"target.metric={metric} but this recipe has no test split (SST-2's test set has no "
                "labels): give data.test_file (or data.dataset with data.test_split), or a val/ metric"
            )
        return self

    @model_validator(mode="after")
    def _compile_needs_few_lengths(self) -> Recipe:
        if self.train.compile.enabled and self.train.compile.dynamic is False and self.data.padding == "dynamic":
            raise ValueError(
                "train.compile with data.padding=dynamic compiles again for every new batch length and "
                "torch stops after 8 (FailOnRecompileLimitHit): set data.padding=bucket (or fixed), "
                "or train.compile.dynamic=true"
            )
        return self


# ----------------------------------------------------------------------------------------------
# Model

# Configs that must be buildable with no network and no files, for random-init throughput runs.
# transformers' BertConfig() defaults are exactly bert-base-uncased's (12 layers, hidden 768,
# 12 heads, intermediate 3072, 512 positions, vocab 30,522).
_BUILTIN_CONFIGS = {"bert-base-uncased": {}, "google-bert/bert-base-uncased": {}}

_HOW_TO_MODEL = (
    "download it while online, or put its files in a local directory and set model.name_or_path "
    "(and model.tokenizer) to it, or set DLTRAIN_MODELS_DIR to a folder holding {short}/"
)


def resolve(name: str) -> str:
    """A local directory for `name` if there is one, else `name` itself (a hub id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    models = os.environ.get("DLTRAIN_MODELS_DIR")
    if models:
        for candidate in (Path(models) / name, Path(models) / name.split("/")[-1]):
            if candidate.is_dir():
                return str(candidate)
    return name


def _load_error(what: str, name: str, exc: Exception) -> DataError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    how = _HOW_TO_MODEL.format(short=name.split("/")[-1])
    return DataError(f"cannot load {what} {name!r} ({reason[:200]}): {how}")


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(name))
    except (OSError, ValueError) as exc:
        raise _load_error("tokenizer", name, exc) from None


def tokenizer_for(recipe: Recipe):
    return load_tokenizer(recipe.model.tokenizer or recipe.model.name_or_path)


def model_config(cfg: ModelConfig):
    from transformers import AutoConfig, BertConfig

    if cfg.name_or_path in _BUILTIN_CONFIGS and resolve(cfg.name_or_path) == cfg.name_or_path:
        return BertConfig(num_labels=cfg.num_labels, **_BUILTIN_CONFIGS[cfg.name_or_path])
    try:
        return AutoConfig.from_pretrained(resolve(cfg.name_or_path), num_labels=cfg.num_labels)
    except (OSError, ValueError) as exc:
        raise _load_error("model config", cfg.name_or_path, exc) from None


def build_model(recipe: Recipe) -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    cfg = recipe.model
    names = recipe.data.label_names  # saved with the model (save_pretrained) as id2label
    labels = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}} if names else {}
    if cfg.init == "random":
        config = model_config(cfg)
        for key, value in labels.items():
            setattr(config, key, value)
        with sized_by("the model", "model.num_labels or choose a smaller model.name_or_path"):
            return freeze(AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa"), cfg)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    try:
        with sized_by("the model", "model.num_labels or choose a smaller model.name_or_path"):
            model = AutoModelForSequenceClassification.from_pretrained(
                resolve(cfg.name_or_path),
                num_labels=cfg.num_labels,
                attn_implementation="sdpa",  # forward() relies on it
                **labels,
            )
    except (OSError, ValueError) as exc:
        raise _load_error("model", cfg.name_or_path, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return freeze(model, cfg)


def freeze(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """model.freeze_embeddings / freeze_layers: those parameters stop requiring gradients, so autograd
    stops at the first trained layer and the optimizer (dltrain.optim.param_groups) never sees them."""
    if not cfg.freeze_embeddings:
        return model
    base = model.base_model
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not hasattr(base, "embeddings") or layers is None:
        raise RecipeError(
            f"model.freeze_embeddings: {type(base).__name__} has no .embeddings and .encoder.layer "
            "(a BERT-like encoder): set model.freeze_embeddings=false and model.freeze_layers=0"
        )
    if cfg.freeze_layers >= len(layers):
        raise RecipeError(
            f"model.freeze_layers={cfg.freeze_layers} leaves none of {cfg.name_or_path}'s {len(layers)} "
            f"encoder layers to train: set it to at most {len(layers) - 1}"
        )
    for module in (base.embeddings, *layers[: cfg.freeze_layers]):
        module.requires_grad_(False)
    return model


def forward(model: nn.Module, batch: dict) -> Output:
    mask = batch["attention_mask"]
    # The mask goes in as [B, 1, 1, T] bool (True: attend), which transformers passes to SDPA as it
    # is. Given the 2D mask, it first asks whether anything is padded (`padding_mask.all()` in
    # masking_utils._ignore_bidirectional_mask_sdpa), a host read that stalls every step on a GPU.
    # The values are those it would build; a bool mask suits SDPA only, hence build_model's choice.
    # token_type_ids: sentence pairs only (segment A/B); single texts leave the model's default zeros.
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=mask[:, None, None, :].bool(),
        token_type_ids=batch.get("token_type_ids"),
    ).logits
    out = classification_output(logits, batch["labels"])
    # Tokens per example, real and as padded: tokens/s, padded tokens/s and FLOPs (flops_of).
    out.stats["tokens"] = mask.sum(dim=1).float()
    out.stats["padded_tokens"] = torch.full_like(out.stats["tokens"], mask.shape[1])
    return out


def summarize(sums: dict[str, float]) -> dict[str, float]:
    count = max(sums.get("count", 0.0), 1.0)
    out = {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count}
    if "tokens" in sums:
        out["tokens_per_example"] = sums["tokens"] / count
        out["padded_tokens_per_example"] = sums["padded_tokens"] / count
    return out


def batch_size_of(batch) -> int:
    return len(batch["labels"])


def flops_per_token(config, seq_len: float, model: ModelConfig | None = None) -> float:
    """Training FLOPs per token, PaLM appendix B: 6 N + 12 L d T, where N counts the weights of the
    encoder layers, pooler and classifier (embeddings are lookups, not matmuls), L layers, d the
    hidden size, T the sequence length (the 12 L d T term is QK^T and attention x V, forward and
    backward).

    Frozen parts (`model`'s freeze_embeddings, freeze_layers): the first freeze_layers layers run
    forward only, a third of their share, and the first trained layer's Q, K and V projections
    compute no input gradient (2 d^2 each), as nothing below them is trained."""
    d, L, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_layer = 4 * d * d + 2 * d * ff  # Q, K, V, output projections; two feed-forward matmuls
    n = L * per_layer + d * d + d * config.num_labels  # + pooler + classifier
    flops = 6 * n + 12 * L * d * seq_len
    if model is not None and model.freeze_embeddings:
        flops -= model.freeze_layers * 4 * (per_layer + 2 * d * seq_len) + 3 * 2 * d * d
    return flops


@functools.lru_cache(maxsize=8)
def _cached_config(name_or_path: str, num_labels: int):
    """model_config once per model: flops_of runs at every log record."""
    return model_config(ModelConfig(name_or_path=name_or_path, num_labels=num_labels))


def flops_per_sample(recipe: Recipe) -> int:
    """flops_per_token x T with T = data.max_length, i.e. every example padded to max_length as in
    the original. With dynamic or bucket padding the work done is smaller: see flops_of."""
    T = recipe.data.max_length
    config = _cached_config(recipe.model.name_or_path, recipe.model.num_labels)
    return T * flops_per_token(config, T, recipe.model)


def flops_of(recipe: Recipe, sums: dict[str, float]) -> dict[str, float]:
    """Training FLOPs of a logged window from its summed per-example statistics (`count`,
    `tokens`, `padded_tokens`): "flops" counts the padded tokens (the work done), "flops_real"
    the real ones (the work a padding-free run would do).

    Approximation: the attention term grows with T^2 per example; taking each basis's mean length
    T_mean for all examples gives tokens x flops_per_token(T_mean) = 6 N tokens + 12 L d
    (sum T)^2 / count, which is exact when every example has the same T (fixed padding, or one
    micro-batch's padded length) and otherwise under-counts attention by 12 L d count var(T).
    """
    count = sums.get("count", 0.0)
    if count <= 0:
        return {"flops": 0.0, "flops_real": 0.0}
    config = _cached_config(recipe.model.name_or_path, recipe.model.num_labels)
    padded, real = sums["padded_tokens"], sums["tokens"]
    return {
        "flops": padded * flops_per_token(config, padded / count, recipe.model),
        "flops_real": real * flops_per_token(config, real / count, recipe.model),
    }


def label_names(recipe: Recipe) -> list[str] | None:
    """Class names by index, for the exported config (id2label): data.label_names (SST-2's recipes
    name theirs), none for integer labels without names."""
    return recipe.data.label_names


def save_model(model: nn.Module, state_dict: dict, out_dir: Path, recipe: Recipe) -> None:
    """Hugging Face format: `from_pretrained(out_dir)` loads model and tokenizer back."""
    model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer_for(recipe).save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------
# Data (dltrain.workloads.bert_data does the work)


def __getattr__(name: str):
    # TOKENIZE_CALLS is counted in bert_data; read it there at each access, not copied at import.
    if name == "TOKENIZE_CALLS":
        return bert_data.TOKENIZE_CALLS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def checked_tokenizer(recipe: Recipe):
    """The tokenizer, once data.max_length is known to fit it and the model: a length past the
    model's positions fails in its embeddings, one that leaves no room for text in TokenSplit."""
    tokenizer, n = tokenizer_for(recipe), recipe.data.max_length
    specials = tokenizer.num_special_tokens_to_add()
    if n <= specials:
        raise RecipeError(
            f"data.max_length={n} leaves no room for text after the tokenizer's {specials} special tokens: raise it"
        )
    config = _cached_config(recipe.model.name_or_path, recipe.model.num_labels)
    positions = getattr(config, "max_position_embeddings", None)
    if positions and n > positions:
        raise RecipeError(
            f"data.max_length={n} is more than the {positions} positions of {recipe.model.name_or_path}: "
            f"lower it to {positions} or less"
        )
    return tokenizer


def load_splits(recipe: Recipe) -> dict:
    """split name -> tokenized datasets.Dataset (train, val, and test for user files that have one)."""
    return bert_data.tokenized_splits(
        recipe.data, checked_tokenizer(recipe), recipe.train.seed, recipe.model.num_labels
    )


def build_data(recipe: Recipe, device: torch.device | str = "cpu") -> DataSplits:
    return bert_data.device_splits(
        recipe.data, checked_tokenizer(recipe), recipe.train.seed, device, recipe.model.num_labels
    )


def build_split(recipe: Recipe, device: torch.device | str, split: str) -> bert_data.TokenSplit | None:
    return bert_data.device_split(
        recipe.data, checked_tokenizer(recipe), recipe.train.seed, device, recipe.model.num_labels, split
    )


def write_samples(recipe: Recipe, out_dir: Path, n: int = 12) -> list[Path]:
    """For `dltrain inspect`: validation texts as the model sees them (decoded token ids), with labels."""
    tokenizer = tokenizer_for(recipe)
    ds = load_splits(recipe)["val"]
    rows = ds.select(range(min(n, len(ds))))
    lines = [
        f"# {recipe.name}: {len(rows)} of {len(ds)} validation examples",
        "",
        "| # | label | tokens | text (decoded from the token ids) |",
        "| ---: | ---: | ---: | --- |",
    ]
    names = recipe.data.label_names
    for i, (ids, label) in enumerate(zip(rows["input_ids"], rows["labels"])):
        text = tokenizer.decode(ids, skip_special_tokens=True).replace("|", "\\|")
        lines.append(f"| {i} | {f'{label} ({names[label]})' if names else label} | {len(ids)} | {text} |")
    path = out_dir / "samples.md"
    path.write_text("\n".join(lines) + "\n")
    return [path]


# ----------------------------------------------------------------------------------------------
# What the registry hands the trainer, `inspect` and the bench harness (dltrain.workload)


def flops_batch(recipe: Recipe, device, n: int) -> dict:
    """The first n training texts padded to data.max_length: the shape flops_per_sample assumes."""
    fixed = recipe.model_copy(update={"data": recipe.data.model_copy(update={"padding": "fixed"})})
    train = build_data(fixed, device).train
    return train.fetch_one(torch.arange(min(n, len(train))))


def tokens_of(batch: dict) -> int:
    """Tokens the batch computes on, padding included."""
    return batch["attention_mask"].numel()


WORKLOAD = Workload(
    requires=REQUIRES,
    recipe=Recipe,
    build_model=build_model,
    build_data=build_data,
    forward=forward,
    summarize=summarize,
    batch_size_of=batch_size_of,
    flops_per_sample=flops_per_sample,
    metrics=METRICS,
    flops_of=flops_of,
    save_model=save_model,
    write_samples=write_samples,
    build_split=build_split,
    label_names=label_names,
    flops_batch=flops_batch,
    tokens_of=tokens_of,
    baselines={"bare": "bert_bare.py", "hf_trainer": "bert_hf_trainer.py"},
)
