#!/usr/bin/env bash
# The GPU check: on one H100, the gpu_single suite (fp32 vs bf16, eager vs torch.compile, CNN, RNN,
# bert-base) with its baselines (bare loops, the notebook pipeline, the HF Trainer), in under 8
# minutes; results.jsonl, summary.json, report.md and plots/ land in $OUT/bench.
#
# The GPU machine has no network and lacks datasets, wandb, pydantic and deepspeed. So, on the
# CPU machine first:   benchmarks/device_check.sh --prepare
# which copies the wheels (../shared/wheels/gpu-cp312), MNIST's .gz files, SST-2 and MiniLM's
# tokenizer (not its weights: bert-base runs from a random init) into the ignored .carry/
# folder (about 45 MB); carry `.carry` with the run. On the GPU machine:
#     OUT=/some/dir benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CARRY=$REPO/.carry
SHARED=${SHARED:-$REPO/../shared}
BUDGET_S=${BUDGET_S:-450}   # the whole script, install included; the suite gets what is left
SUITE=${SUITE:-gpu_single}  # another suite only for a dry run of this script

if [ "${1:-}" = "--prepare" ]; then
    rm -rf "$CARRY"
    mkdir -p "$CARRY/wheels" "$CARRY/data/MNIST/raw" "$CARRY/data/sst2" "$CARRY/models/all-MiniLM-L6-v2"
    cp "$SHARED"/wheels/gpu-cp312/*.whl "$CARRY/wheels/"
    cp "$SHARED"/data/MNIST/raw/*.gz "$CARRY/data/MNIST/raw/"
    cp "$SHARED"/data/sst2/train.tsv "$SHARED"/data/sst2/dev.tsv "$CARRY/data/sst2/"
    for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
        cp "$SHARED/models/all-MiniLM-L6-v2/$f" "$CARRY/models/all-MiniLM-L6-v2/"
    done
    du -sh "$CARRY"
    exit 0
fi

OUT=${OUT:?set OUT to the folder that receives the results}
mkdir -p "$OUT"
[ -d "$CARRY/wheels" ] || { echo "device_check: $CARRY/wheels missing: run benchmarks/device_check.sh --prepare on the CPU machine and carry .carry" >&2; exit 2; }

# Install only what the image lacks, from the carried wheels, without resolving (no network).
if ! python3 -c "import datasets, wandb, pydantic" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$REPO/.site" "$CARRY"/wheels/*.whl
fi
export PYTHONPATH="$REPO/.site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export DLTRAIN_DATA_DIR="$CARRY/data" DLTRAIN_MODELS_DIR="$CARRY/models" DLTRAIN_CACHE_DIR="${TMPDIR:-/tmp}/dltrain-cache"
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
} | tee "$OUT/device.txt"

LEFT=$((BUDGET_S - SECONDS - 20))   # 20 s kept for the report
echo "device_check: running $SUITE with ${LEFT} s left"
set +e
timeout --signal=INT --kill-after=10 "$LEFT" python3 -m dltrain bench "$SUITE" --output-dir "$OUT/bench"
rc=$?
set -e
if [ $rc -ne 0 ] && [ -f "$OUT/bench/results.jsonl" ]; then
    # Cut short (time budget) or failed: report whatever runs finished.
    echo "device_check: suite ended with exit code $rc; reporting the runs that finished"
    python3 -m dltrain bench report "$OUT/bench" || true
fi
# Keep the reviewable outputs; the per-run folders (W&B files, logs) stay small enough to return.
ls -la "$OUT/bench" || true
echo "device_check: done in ${SECONDS} s (exit code of the suite: $rc)"
# 124 would read as the caller's own timeout: a suite cut short by this script's budget exits 3.
[ $rc -eq 124 ] && exit 3
exit $rc
