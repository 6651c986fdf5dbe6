"""The `distributed` recipe section on 2 CPU processes (gloo): DDP's settings reach the wrapped
module, compressed gradients stay near the fp32 run, and FSDP2 trains like DDP and resumes exactly
from its sharded and full checkpoints. The same short CNN run as tests/distributed/test_distributed.py (6 Adam
steps with warm-up and clipping), compared with a plain DDP run of it.

Measured on 2026-11-30 (torch 2.14.1, gloo, 2 processes, this 6-step run against plain DDP): the
DDP settings moved nothing; the bf16 hook moved the per-step loss by up to 3.4e-5 and a parameter
by up to 2.5e-3, the fp16 hook by 2.1e-6 and 1.5e-3; FSDP2 differed from DDP by 1.2e-7 (loss) and
4.1e-7 (parameters), and resumed bit for bit.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_distributed import DLTRAIN, LOSS_ATOL, PARAM_ATOL, SMALL, Runs, _sets, max_diff, max_param_diff

pytestmark = pytest.mark.distributed

# Compressed gradients: the averaged gradient is rounded to 8 (bf16) or 11 (fp16) significant bits
# each step. The loss bounds are ~6-10x the measured and under the 1e-3 a missing all-reduce
# causes. Parameters: Adam moves each weight by about lr per step whatever the gradient's size, so
# where a gradient is near zero a rounding that flips its sign moves the weight by up to 2 x lr;
# over 6 steps at lr 1e-3 that is 1.2e-2 (measured 2.5e-3 bf16, 1.5e-3 fp16).
HOOK_LOSS_ATOL = {"bf16": 2e-4, "fp16": 2e-5}
HOOK_PARAM_ATOL = 2 * 1e-3 * 6

LAUNCH2 = [*DLTRAIN, "launch", "--cpu", "--nproc", "2"]
CNN = SMALL["cnn"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("strategies"), data_dir)


def _ddp(runs: Runs):
    return runs.ok("cnn-ddp", [*LAUNCH2, *CNN])


# ----------------------------------------------------------------------------------------------
# DDP settings


@pytest.mark.long
def test_ddp_settings_reach_the_wrapped_module_and_change_nothing(runs):
    run = runs.ok(
        "cnn-ddp-settings",
        [
            *LAUNCH2,
            *CNN,
            *_sets(
                "distributed.bucket_cap_mb=0.25",
                "distributed.gradient_as_bucket_view=true",
                "distributed.static_graph=true",
                "distributed.find_unused_parameters=true",
            ),
        ],
    )
    # Read from the DistributedDataParallel module of rank 0 after accelerator.prepare.
    assert (
        "DDP: bucket_cap 0.25 MB, gradient_as_bucket_view True, static_graph True, find_unused_parameters True, "
        "comm hook none"
    ) in run.stdout
    ddp = _ddp(runs)
    assert "DDP: bucket_cap 25 MB, gradient_as_bucket_view False, static_graph False" in ddp.stdout
    # Same sums, other buckets: for two processes the all-reduce adds the same two numbers.
    assert max_diff(run.losses(), ddp.losses()) <= LOSS_ATOL
    assert max_param_diff(run.final_model(), ddp.final_model()) <= PARAM_ATOL
    assert "parameters identical on all 2 ranks" in run.stdout


@pytest.mark.parametrize("hook", ["bf16", "fp16"])
def test_compressed_gradients_stay_near_the_fp32_run(runs, hook):
    run = runs.ok(f"cnn-ddp-{hook}", [*LAUNCH2, *CNN, *_sets(f"distributed.comm_hook={hook}")])
    assert f"comm hook {hook}_compress_hook" in run.stdout
    ddp = _ddp(runs)
    loss_diff = max_diff(run.losses(), ddp.losses())
    param_diff = max_param_diff(run.final_model(), ddp.final_model())
    assert loss_diff <= HOOK_LOSS_ATOL[hook] and param_diff <= HOOK_PARAM_ATOL, (loss_diff, param_diff)
    assert param_diff > 0  # the hook did compress: an uncompressed run matches DDP to the bit
    assert "parameters identical on all 2 ranks" in run.stdout


# ----------------------------------------------------------------------------------------------
# FSDP2 (fully_shard applied by dltrain on the CPU)

FSDP = [*LAUNCH2, "--fsdp", *CNN]


def test_fsdp_trains_like_ddp(runs):
    fsdp = runs.ok("cnn-fsdp", [*FSDP, *_sets("distributed.fsdp.auto_wrap=[Linear]", "checkpoint.every_steps=3")])
    assert "FSDP2: 2 unit(s) (Linear) + root; this rank holds 210,821 of 421,642 parameters" in fsdp.stdout
    ddp = _ddp(runs)
    assert max_diff(fsdp.losses(), ddp.losses()) <= LOSS_ATOL
    assert max_param_diff(fsdp.final_model(), ddp.final_model()) <= PARAM_ATOL  # gathered from the shards
    assert (fsdp.out / "checkpoints" / "step_3" / "fsdp_sharded" / ".metadata").is_file()


@pytest.mark.long
def test_fsdp_resumes_exactly_from_sharded_and_full_checkpoints(runs):
    """A (sharded checkpoints) -> B resumes A's step 3 and writes full checkpoints -> C resumes B's
    step 4: every segment continues A's losses bit for bit, so both formats restore model,
    optimizer and RNG states."""
    wrap = _sets("distributed.fsdp.auto_wrap=[Linear]")
    a = runs.ok("cnn-fsdp", [*FSDP, *wrap, *_sets("checkpoint.every_steps=3")])
    b = runs.ok(
        "cnn-fsdp-full",
        [
            *FSDP,
            *wrap,
            *_sets("checkpoint.every_steps=2", "distributed.fsdp.state_dict_type=full"),
            "--resume",
            str(a.out / "checkpoints" / "step_3"),
        ],
    )
    step4 = b.out / "checkpoints" / "step_4"
    assert (step4 / "model.safetensors").is_file() and (step4 / "fsdp_optimizer.pt").is_file()
    c = runs.ok("cnn-fsdp-from-full", [*FSDP, *wrap, "--resume", str(step4)])
    assert "resuming at step 4" in c.stdout
    assert b.losses() == a.losses()[3:] and c.losses() == a.losses()[4:]
    assert max_param_diff(c.final_model(), a.final_model()) == 0.0


# Compile under two processes (issue 19, defect b: fullgraph failed at step 1 under DDP and FSDP2
# with `torch._dynamo.exc.Unsupported` while dynamo traced the wrappers' own code) is a cell of the
# combination matrix (tests/distributed/test_matrix.py: DDP in make test's diagonal, FSDP2 in make test-matrix).


# ----------------------------------------------------------------------------------------------
# DeepSpeed's non-finite rule (defect e: engine.step() runs inside accelerator.backward, so the
# loop's "not applied" was a guess; the engine's own overflow verdict is the truth)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.long
def test_a_nan_step_under_zero_is_skipped_by_the_engine_and_counted_once(runs, stage):
    """Step 3's loss (and so its gradients) is made NaN on both ranks: the engine skips that
    update, dltrain counts it once and trains on (max_nonfinite_steps=1), and the weights stay
    finite. Had the NaN update been applied, every later loss would be NaN and the run would stop."""
    run = runs.ok(
        f"cnn-zero{stage}-nan",
        [
            *DLTRAIN,
            "launch",
            "--cpu",
            "--nproc",
            "2",
            "--deepspeed",
            str(stage),
            *CNN,
            *_sets("train.max_nonfinite_steps=1"),
        ],
        env={"DLTRAIN_TEST_NONFINITE_AT_STEP": "3"},
    )
    records = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/nonfinite_steps"]) for r in records if "train/nonfinite_steps" in r] == [(3, 1)]
    losses = run.losses()
    assert len(losses) == 6 and math.isnan(losses[2]) and all(math.isfinite(x) for x in losses[3:])
    assert all(torch.isfinite(t).all() for t in run.final_model().values())
    assert json.loads((run.out / "summary.json").read_text())["nonfinite_steps"] == 1


@pytest.mark.long
def test_a_planted_pickle_in_a_sharded_checkpoint_is_refused_not_run(runs, tmp_path):
    """torch.distributed.checkpoint reads `.metadata` with plain pickle: a crafted file, its
    manifest checksum fixed to match, ran code at `--resume` (issue 22, item 7). dltrain's reader
    takes only the checkpoint's own classes."""
    import hashlib
    import os
    import pickle
    import shutil

    a = runs.ok("cnn-fsdp", [*FSDP, *_sets("distributed.fsdp.auto_wrap=[Linear]", "checkpoint.every_steps=3")])
    run = tmp_path / "run"
    shutil.copytree(a.out, run)
    step = run / "checkpoints" / "step_3"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (step / "fsdp_sharded" / ".metadata").write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((step / "manifest.json").read_text())
    data = (step / "fsdp_sharded" / ".metadata").read_bytes()
    manifest["files"]["fsdp_sharded/.metadata"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))
    done = runs.get("cnn-fsdp-planted", [*FSDP, *_sets("distributed.fsdp.auto_wrap=[Linear]"), "--resume", str(step)])
    assert done.returncode != 0, done.stderr[-3000:]  # each rank exits 2; the launcher reports the job failed
    assert not marker.exists()
    refusals = [line for line in done.stderr.splitlines() if "dltrain: error:" in line]
    assert len(refusals) == 2 and all(
        "asks to load posix.system, which a dltrain checkpoint never holds" in line for line in refusals
    ), done.stderr[-3000:]
