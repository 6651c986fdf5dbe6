"""BERT batches cut from device tensors: the same values as `tokenizer.pad`, bucketed lengths, one
host read per `batches` call, a forward with no host read and no graph break, and FLOPs on both
bases. Small files and MiniLM: each test takes seconds on a CPU."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import RECIPES
from dltrain.data import eval_index_batches, train_index_batches
from dltrain.recipe import load_recipe
from dltrain.workloads import bert

MAX_LENGTH = 24  # tokens: short, and some texts below are truncated to it


@pytest.fixture
def texts_tsv(tmp_path, monkeypatch):
    """37 texts: 25 of 3 to 14 tokens, then 12 of up to 200 (cut at MAX_LENGTH); a fresh tokenized cache."""
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(0)
    words = ["a", "good", "film", "dull", "plot", "the", "actors", "shine", "never"]  # one token each
    long_words = [*words, "unbelievably"]  # five tokens
    rows = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(25)]
    rows += [" ".join(rng.choice(long_words) for _ in range(rng.randint(1, 40))) for _ in range(12)]
    rows = [f"{text}\t{i % 2}" for i, text in enumerate(rows)]
    path = tmp_path / "texts.tsv"
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


def recipe_for(minilm_dir, tsv, *overrides):
    return load_recipe(
        RECIPES / "bert_sst2_minilm.yaml",
        "cpu_test",
        [
            f"model.name_or_path={minilm_dir}",
            f"data.train_file={tsv}",
            f"data.eval_file={tsv}",
            f"data.max_length={MAX_LENGTH}",
            *overrides,
        ],
    )


def index_batches(n: int) -> list[torch.Tensor]:
    """A shuffled epoch in micro-batches of 8, then evaluation batches of 10 (the last one shorter)."""
    train = list(train_index_batches(n, micro_batch=8, grad_accum=1, rank=0, world=1, seed=3, epoch=0))
    return train + [idx for idx, _ in eval_index_batches(n, batch=10, rank=0, world=1)]


@pytest.mark.parametrize("padding, hf_padding", [("dynamic", "longest"), ("fixed", "max_length")])
def test_batches_equal_tokenizer_pad(minilm_dir, texts_tsv, padding, hf_padding):
    recipe = recipe_for(minilm_dir, texts_tsv, f"data.padding={padding}")
    tokenizer, rows = bert.tokenizer_for(recipe), bert.load_splits(recipe)["train"]["input_ids"]
    split = bert.build_data(recipe).train
    batches = index_batches(len(split))
    assert [len(idx) for idx in batches][-1] < 10
    for idx, got in zip(batches, split.batches(batches), strict=True):
        want = tokenizer.pad(
            {"input_ids": [rows[i] for i in idx.tolist()]},
            padding=hf_padding,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        for key in ("input_ids", "attention_mask"):
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
        assert torch.equal(got["labels"], idx % 2)


def test_bucket_lengths_are_multiples_capped_at_max_length(minilm_dir, texts_tsv):
    multiple = 10  # MAX_LENGTH = 24 is no multiple of it: the longest texts are capped, not rounded up
    recipe = recipe_for(minilm_dir, texts_tsv, "data.padding=bucket", f"data.bucket_multiple={multiple}")
    split = bert.build_data(recipe).train
    lengths = set()
    for b in split.batches(index_batches(len(split))):
        T, longest = b["input_ids"].shape[1], int(b["attention_mask"].sum(dim=1).max())
        assert (T % multiple == 0 or T == MAX_LENGTH) and longest <= T < longest + multiple and T <= MAX_LENGTH
        lengths.add(T)
    assert MAX_LENGTH in lengths and len(lengths) >= 2


HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every way a tensor's values reach Python while the test runs."""
    calls: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("padding, reads", [("dynamic", 1), ("bucket", 1), ("fixed", 0)])
def test_batches_reads_back_once_per_call(minilm_dir, texts_tsv, request, padding, reads):
    split = bert.build_data(recipe_for(minilm_dir, texts_tsv, f"data.padding={padding}")).train
    batches = index_batches(len(split))
    calls = request.getfixturevalue("host_reads")
    assert len(list(split.batches(batches))) == len(batches)
    assert calls == ["tolist"] * reads


@pytest.fixture(scope="module")
def minilm_model(minilm_dir):
    recipe = load_recipe(RECIPES / "bert_sst2_minilm.yaml", "cpu_test", [f"model.name_or_path={minilm_dir}"])
    torch.manual_seed(0)
    return bert.build_model(recipe)


def test_forward_and_backward_read_nothing_back(minilm_dir, texts_tsv, minilm_model, request):
    split = bert.build_data(recipe_for(minilm_dir, texts_tsv)).train
    batch = split.fetch(torch.arange(8))
    calls = request.getfixturevalue("host_reads")
    out = bert.forward(minilm_model.train(), batch)
    out.loss.backward()
    minilm_model.zero_grad(set_to_none=True)
    assert calls == []


def test_forward_compiles_without_graph_breaks(minilm_dir, texts_tsv, minilm_model):
    split = bert.build_data(recipe_for(minilm_dir, texts_tsv, "data.padding=bucket", "data.bucket_multiple=8")).train
    batch = split.fetch(torch.arange(8))
    # fullgraph=True raises at any graph break; the eager backend traces in seconds (inductor's
    # compile of the same graph took 138 s on this CPU). Forward and backward both run.
    torch._dynamo.reset()
    compiled = torch.compile(bert.forward, fullgraph=True, backend="eager", dynamic=False)
    out = compiled(minilm_model.train(), batch)
    out.loss.backward()
    minilm_model.zero_grad(set_to_none=True)
    assert torch.isfinite(out.loss) and set(out.stats) >= {"tokens", "padded_tokens", "correct"}


def test_padding_does_not_change_the_outputs(minilm_dir, texts_tsv, minilm_model):
    """The mask hides the padding: the same rows give the same losses however far they are padded."""
    idx = torch.arange(8)
    losses = []
    for padding in ("dynamic", "bucket", "fixed"):
        recipe = recipe_for(minilm_dir, texts_tsv, f"data.padding={padding}", "data.bucket_multiple=7")
        batch = bert.build_data(recipe).train.fetch(idx)
        with torch.no_grad():
            losses.append(bert.forward(minilm_model.eval(), batch).stats["loss"])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-5, atol=1e-6)


def test_flops_of_agrees_with_flops_per_sample_for_fixed_padding(monkeypatch):
    recipe = load_recipe(RECIPES / "bert_sst2.yaml", "cpu_test")
    T, count = recipe.data.max_length, 48
    sums = {"count": float(count), "tokens": 20.0 * count, "padded_tokens": float(T * count), "loss": 30.0}
    bert._cached_config.cache_clear()
    lookups = []
    real_lookup = bert.model_config
    monkeypatch.setattr(bert, "model_config", lambda cfg: lookups.append(cfg) or real_lookup(cfg))
    flops = bert.flops_of(recipe, sums)
    assert flops["flops"] == pytest.approx(count * bert.flops_per_sample(recipe), rel=1e-12)
    config = real_lookup(recipe.model)
    assert flops["flops_real"] == pytest.approx(20.0 * count * bert.flops_per_token(config, 20.0), rel=1e-12)
    bert.flops_of(recipe, sums)
    assert len(lookups) == 1  # the config is looked up once, not at every log record
    assert bert.flops_of(recipe, {"count": 0.0, "tokens": 0.0, "padded_tokens": 0.0}) == {
        "flops": 0.0,
        "flops_real": 0.0,
    }


def test_the_bare_baseline_step_reads_back_once_per_epoch_as_dltrain(minilm_dir, texts_tsv, minilm_model, request):
    """The BERT bare baseline is dltrain's yardstick: its steps must make no host read dltrain's do
    not make (dltrain: one `.tolist()` of the padded lengths per epoch, none per step). Reading the
    lengths per step, or handing transformers a 2-D mask (`padding_mask.all()`), each stall a GPU."""
    import sys

    sys.path.insert(0, str(RECIPES.parent / "benchmarks" / "baselines"))
    try:
        import bert_bare
    finally:
        sys.path.pop(0)
    recipe = recipe_for(minilm_dir, texts_tsv)
    split = bert.build_data(recipe).train
    per_epoch = len(split) // recipe.train.global_batch_size
    model = minilm_model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step's host reads, not its update, are counted
    step = bert_bare.make_step(recipe, model, opt, split, torch.device("cpu"))
    calls = request.getfixturevalue("host_reads")
    epochs = 3
    for i in range(epochs * per_epoch):
        step(i)
    assert per_epoch >= 2 and calls == ["tolist"] * epochs
