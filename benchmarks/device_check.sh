#!/usr/bin/env bash
# The GPU check: on one H100, the gpu_single suite (bert-base and the CNN bf16 compiled first, then
# eager bf16 and fp32 rows, then the baselines) in under 8 minutes, install included;
# results.jsonl, summary.json, report.md and plots/ land in $OUT/bench, and the script prints its
# own time per phase (install, import check, suite, report).
#
# The GPU machine has no network and lacks datasets, wandb, pydantic and deepspeed. So, on the
# CPU machine first:   PYTHON=.venv/bin/python benchmarks/device_check.sh --prepare
# which copies the wheels the device installs (../shared/wheels/gpu-cp312, less W&B and DeepSpeed),
# MNIST's .gz files, SST-2 and MiniLM's tokenizer (not its weights: bert-base runs from a random
# init) into the ignored .carry/ folder, and tokenizes the suite's SST-2 into .carry/cache (the
# cache is keyed by contents, not paths, so the device finds it); carry `.carry` with the run.
# On the GPU machine:
#     OUT=/some/dir benchmarks/device_check.sh
# The plan first: each phase's expected seconds (PLAN_* below, the suites' plan_s) against
# BUDGET_S, printed before anything starts; over budget, the script refuses (exit 2) instead of
# being cut in the middle of the suite. `benchmarks/device_check.sh --plan` prints the GPU run's
# plan and stops (no GPU, no OUT needed); a CPU dry run prints it beside its own.
# A lent GPU is counted in minutes, so nothing slow starts before a check that takes seconds:
# every package the suite needs imports, CUDA is there, the suite validates; if not, exit 2.
# A CPU dry run of the whole script (no GPU, no .carry when the imports already work):
#     DEVICE=cpu OUT=/tmp/dry benchmarks/device_check.sh      # SUITE defaults to device_dryrun
#
# Environment: OUT (required), DEVICE (cuda | cpu; default cuda), SUITE (default gpu_single, or
# device_dryrun with DEVICE=cpu), RECORDS (record suite run first, default ttt_gpu; none with
# DEVICE=cpu), RECORDS_S (its cap, default its plan_s plus the plan's slack), BUDGET_S (whole
# script, default 450), PYTHON (default python3).
# Exit codes: 0 done; 2 cannot run (missing packages, no CUDA, bad suite); 3 the suite was cut by
# the time budget (the report holds what finished); else the suite's or the report's exit code.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CARRY=$REPO/.carry
SHARED=${SHARED:-$REPO/../shared}
BUDGET_S=${BUDGET_S:-450}   # the whole script, install included; the suite gets what is left
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then SUITE=${SUITE:-device_dryrun}; else SUITE=${SUITE:-gpu_single}; fi
PY=${PYTHON:-python3}

if [ "$DEVICE" = cpu ]; then RECORDS=${RECORDS:-none}; else RECORDS=${RECORDS:-ttt_gpu}; fi

# ---- the plan. Estimates of what each phase takes on the GPU machine, not measurements (no GPU
# run has timed them yet): correct them from the phase times a run prints.
PLAN_INSTALL_S=20  # five carried wheels, no resolver, no bytecode compile
PLAN_IMPORT_S=20   # torch, transformers, accelerate, datasets, and the suite's validation
PLAN_REPORT_S=20   # summary, report.md and plots from results.jsonl
suite_file() { case "$1" in */*|*.yaml) echo "$1" ;; *) echo "$REPO/benchmarks/suites/$1.yaml" ;; esac; }
plan_of() {  # a suite's plan_s (0 for none: RECORDS=none), or nothing when the file states none
    [ "$1" = none ] && { echo 0; return; }
    sed -n 's/^plan_s: *\([0-9][0-9]*\).*/\1/p' "$(suite_file "$1")" 2>/dev/null | head -n 1
}
print_plan() {  # print_plan LABEL RECORDS SUITE; sets PLAN_TOTAL (empty when a suite states no plan_s)
    local records suite
    records=$(plan_of "$2") suite=$(plan_of "$3")
    if [ -z "$records" ] || [ -z "$suite" ]; then
        echo "device_check: $1: no plan ($2 or $3 states no plan_s)"
        PLAN_TOTAL=""
        return
    fi
    PLAN_TOTAL=$((PLAN_INSTALL_S + PLAN_IMPORT_S + records + suite + PLAN_REPORT_S))
    echo "device_check: $1: install ${PLAN_INSTALL_S} s, import-check ${PLAN_IMPORT_S} s, records ${records} s ($2)," \
        "suite ${suite} s ($3), report ${PLAN_REPORT_S} s: ${PLAN_TOTAL} s of BUDGET_S=${BUDGET_S}"
}
over_budget() { [ -n "$PLAN_TOTAL" ] && [ "$PLAN_TOTAL" -gt "$BUDGET_S" ]; }

if [ "${1:-}" = "--plan" ]; then  # the GPU run's plan (its defaults), nothing else
    print_plan "GPU plan" "${RECORDS_GPU:-ttt_gpu}" "${SUITE_GPU:-gpu_single}"
    over_budget && { echo "device_check: the GPU plan exceeds BUDGET_S=${BUDGET_S}: shorten a suite or its plan_s"; exit 2; }
    exit 0
fi

if [ "${1:-}" = "--prepare" ]; then
    rm -rf "$CARRY"
    mkdir -p "$CARRY/wheels" "$CARRY/data/MNIST/raw" "$CARRY/data/sst2" "$CARRY/models/all-MiniLM-L6-v2"
    # W&B is off on the device and gpu_single uses no ZeRO: their wheels (22 of the 27 MB) stay here.
    for w in "$SHARED"/wheels/gpu-cp312/*.whl; do
        case "$(basename "$w")" in wandb-*|deepspeed-*) ;; *) cp "$w" "$CARRY/wheels/" ;; esac
    done
    cp "$SHARED"/data/MNIST/raw/*.gz "$CARRY/data/MNIST/raw/"
    cp "$SHARED"/data/sst2/train.tsv "$SHARED"/data/sst2/dev.tsv "$CARRY/data/sst2/"
    for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
        cp "$SHARED/models/all-MiniLM-L6-v2/$f" "$CARRY/models/all-MiniLM-L6-v2/"
    done
    # The GPU suite's text entries tokenized here, not on the loan's clock.
    DLTRAIN_DATA_DIR=$CARRY/data DLTRAIN_MODELS_DIR=$CARRY/models DLTRAIN_CACHE_DIR=$CARRY/cache \
        HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$REPO "$PY" - "${SUITE_GPU:-gpu_single}" <<'PY'
import sys

from dltrain.bench.suite import load_suite
from dltrain.recipe import load_recipe
from dltrain.workloads import bert

for entry in load_suite(sys.argv[1]).entries:
    recipe = load_recipe(entry.recipe, entry.profile, entry.overrides)
    if recipe.workload == "bert":
        bert.load_splits(recipe)  # into DLTRAIN_CACHE_DIR; entries with the same data share one entry
PY
    rm -rf "$CARRY/cache/hf_datasets"  # datasets' own scratch, if any: the tokenized folders are what the device reads
    du -sh "$CARRY"
    exit 0
fi

OUT=${OUT:?set OUT to the folder that receives the results}
print_plan plan "$RECORDS" "$SUITE"
if over_budget; then
    echo "device_check: the plan exceeds BUDGET_S=${BUDGET_S}: shorten a suite or its plan_s, or raise BUDGET_S; nothing started"
    exit 2
fi
PLAN_SLACK=$(( ${PLAN_TOTAL:-$BUDGET_S} > BUDGET_S ? 0 : BUDGET_S - ${PLAN_TOTAL:-$BUDGET_S} ))
if [ "$DEVICE" = cpu ]; then
    print_plan "GPU plan" ttt_gpu gpu_single  # what a dry run exists to check
    over_budget && echo "device_check: the GPU plan exceeds BUDGET_S=${BUDGET_S}: a GPU run would refuse to start"
fi
mkdir -p "$OUT"
T_START=$(date +%s%3N)
T_PHASE=$T_START
phase_done() {  # "device_check: phase NAME  S.s s", the time since the previous phase ended
    local now ms
    now=$(date +%s%3N)
    ms=$((now - T_PHASE))
    printf 'device_check: phase %-13s %4d.%d s%s\n' "$1" $((ms / 1000)) $((ms % 1000 / 100)) "${2:+ ($2)}"
    T_PHASE=$now
}

# ---- install: only what the image lacks, from the carried wheels, without resolving (no network)
export PYTHONPATH="$REPO/.site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
if "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('datasets', 'pydantic')))" 2>/dev/null; then
    phase_done install "skipped: datasets and pydantic are installed"
else
    [ -d "$CARRY/wheels" ] || { echo "device_check: datasets or pydantic is missing and $CARRY/wheels is missing: run benchmarks/device_check.sh --prepare on the CPU machine and carry .carry" >&2; exit 2; }
    # W&B is off on the device and gpu_single uses no ZeRO: their wheels (22 of the 27 MB) stay out.
    wheels=$(ls "$CARRY"/wheels/*.whl | grep -v -e '/wandb-' -e '/deepspeed-')
    # shellcheck disable=SC2086  # one wheel path per word
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$REPO/.site" $wheels
    phase_done install
fi
# The caller's data and model folders win (a CPU dry run uses its own); else the carried ones.
export DLTRAIN_DATA_DIR=${DLTRAIN_DATA_DIR:-$CARRY/data} DLTRAIN_MODELS_DIR=${DLTRAIN_MODELS_DIR:-$CARRY/models}
# The cache --prepare filled (SST-2 tokenized), else a fresh one.
if [ -d "$CARRY/cache" ]; then DEFAULT_CACHE=$CARRY/cache; else DEFAULT_CACHE=${TMPDIR:-/tmp}/dltrain-cache; fi
export DLTRAIN_CACHE_DIR=${DLTRAIN_CACHE_DIR:-$DEFAULT_CACHE}
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# torch.cuda.set_sync_debug_mode("warn") in every dltrain run (dltrain/run.py) and every bare
# baseline (bare_common.sync_debug): each place that makes the host wait for the GPU warns once per
# job (in-process jobs each get their own warning registry); the count per job is printed after the suite.
export DLTRAIN_SYNC_DEBUG=${DLTRAIN_SYNC_DEBUG:-warn}
export DEVICE SUITE

# ---- import check: seconds, before anything slow. CUDA first (fail fast), then every package the
# suite imports (not wandb: W&B is off on the device), then the suite itself (a recipe override
# that does not validate fails here).
set +e
"$PY" - <<'PY' 2>&1 | tee "$OUT/device.txt"
import importlib, os, sys

def fail(message):
    print(f"device_check: {message}", flush=True)
    sys.exit(2)

try:
    import torch
except Exception as exc:
    fail(f"cannot import torch ({type(exc).__name__}: {exc})")
want_cuda = os.environ["DEVICE"] != "cpu"
if want_cuda and not torch.cuda.is_available():
    fail(f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
         f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); a GPU suite never falls back "
         "to the CPU: set DEVICE=cpu for a CPU dry run")
missing = []
for name in ("transformers", "accelerate", "datasets", "pydantic", "yaml", "tqdm", "safetensors", "torchvision",
             "matplotlib", "platformdirs", "dltrain", "dltrain.run", "dltrain.bench.runner"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})")
if missing:
    fail("cannot import: " + "; ".join(missing))
from dltrain.bench.suite import expand, load_suite
from dltrain.recipe import RecipeError

try:
    suite = load_suite(os.environ["SUITE"])
    expand(suite)  # every job's recipe with all its overrides, as the run parses it
except RecipeError as exc:
    fail(f"suite does not validate: {exc}")
if suite.device != ("gpu" if want_cuda else "cpu"):
    fail(f"suite {suite.name} is a {suite.device} suite but DEVICE={os.environ['DEVICE']}: "
         "a GPU check runs a gpu suite; DEVICE=cpu runs a cpu one")
import accelerate, transformers

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, python {sys.version.split()[0]}")
if want_cuda:
    props = torch.cuda.get_device_properties(0)
    print(f"GPU {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
          f"{torch.cuda.device_count()} visible")
print(f"suite {suite.name}: {len(suite.entries)} entries, device {suite.device}, in_process {suite.in_process}")
PY
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
    phase_done import-check "failed"
    exit 2
fi
if [ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$OUT/device.txt" || true
fi
phase_done import-check

# ---- records first (issue 11): the fast CNN and RNN over their seeds (seconds each on a GPU), all
# in one process (ttt_gpu's in_process: the imports and the CUDA start paid once, not per seed), in at
# most RECORDS_S: its plan and the plan's slack; results in $OUT/ttt (report.md). RECORDS=none
# skips them (the default with DEVICE=cpu: a CPU's records come from `dltrain bench ttt`).
if [ "$RECORDS" != none ]; then
    planned=$(plan_of "$RECORDS")
    RECORDS_S=${RECORDS_S:-$(( ${planned:-120} + PLAN_SLACK ))}  # a suite without plan_s: 120 s
    [ "$RECORDS_S" -ge 10 ] || RECORDS_S=10
    set +e
    timeout --signal=INT --kill-after=10 "$RECORDS_S" "$PY" -m dltrain bench "$RECORDS" --output-dir "$OUT/ttt"
    rrc=$?
    set -e
    phase_done records "exit code $rrc"
fi

# ---- suite: the jobs only, within what is left of the budget (20 s kept for the report)
LEFT=$((BUDGET_S - (T_PHASE - T_START) / 1000 - 20))
[ "$LEFT" -ge 30 ] || { echo "device_check: only ${LEFT} s of BUDGET_S=${BUDGET_S} left for the suite: not starting it"; exit 3; }
echo "device_check: running $SUITE with ${LEFT} s left"
set +e
timeout --signal=INT --kill-after=10 "$LEFT" "$PY" -m dltrain bench "$SUITE" --output-dir "$OUT/bench" --no-report
rc=$?
set -e
phase_done suite "exit code $rc"

if [ -d "$OUT/bench/logs" ]; then
    echo "device_check: host-sync sites warned per job, dltrain and bare baselines (set_sync_debug_mode; eval, logging and sync points included):"
    grep -c "synchronizing CUDA operation" "$OUT"/bench/logs/*.log 2>/dev/null | sed 's|.*/||' || true
fi
# ---- report: from whatever finished, also when the budget cut the suite
report_rc=0
if [ -f "$OUT/bench/results.jsonl" ]; then
    [ $rc -ne 0 ] && echo "device_check: suite ended with exit code $rc; reporting the runs that finished"
    # `dltrain bench report DIR` without the CLI's import of torch, nor W&B (off here): seconds saved.
    "$PY" -c 'import sys; from pathlib import Path; from dltrain.bench.cli import finish; finish(Path(sys.argv[1]), wandb=False); print("device_check: report in", Path(sys.argv[1]) / "report.md")' "$OUT/bench" || report_rc=$?
    phase_done report
else
    echo "device_check: no results to report"
fi
ms=$(($(date +%s%3N) - T_START))
echo "device_check: done in $((ms / 1000)).$((ms % 1000 / 100)) s (suite exit code $rc, report exit code $report_rc)"
# 124 would read as the caller's own timeout: a suite cut short by this script's budget exits 3.
[ $rc -eq 124 ] && exit 3
[ $rc -ne 0 ] && exit $rc
exit $report_rc
