"""Peak FLOP/s to compute MFU against: datasheet dense peaks for GPUs, a measured matmul for CPUs.

MFU = achieved FLOP/s / peak FLOP/s of the hardware one process drives. The training loop prints
it on its log lines and the benchmark harness reports it; both take the peak from here.

GPUs: dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's datasheets, by device name and
precision. Datasheets print the sparse figure with an asterisk; the dense one is half of it.
fp32 is the plain FP32 (CUDA core) rate, unless TF32 is on for matmuls (train.tf32): then the
TF32 tensor-core rate. A MIG slice has a fraction of the GPU's units: no peak, so no MFU, rather
than a whole GPU's. CPUs have no datasheet figure that means anything for PyTorch: the best FLOP/s
of square matmuls on one thread, measured once per process, times the process's threads
(labelled "measured").
A CPU without bf16 units (no AVX512-BF16 or AMX) emulates bf16 some 40x slower than fp32, and
autocast's kernels do better than its bf16 matmul; the bf16 peak is the better of the bf16 and the
fp32 rate: what the hardware can do for a bf16 run.
"""

from __future__ import annotations

import os
import re
import sys
import time

import torch

from dltrain.precision import DTYPES

# FLOP/s per GPU. Matched against torch.cuda.get_device_name split into words (on spaces and
# dashes, case ignored): an entry matches when all its words are in the name; the first match
# wins, so the specific names come first ("H100 NVL" before "H100", "GH200" and "H200 NVL" before
# "H200"; whole words keep "L4" from matching "L40S" and "A10" from matching "A100").
# "tf32" is the rate of fp32 matmuls with TF32 on; None where the GPU has no such rate on the sheet.
# Sources (dense = the datasheet's sparse figure / 2):
#   H100 SXM5 / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet (2023): FP32 67 / 51 / 60 TFLOP/s;
#     TF32 989* / 756* / 835*; BF16 and FP16 1979* / 1513* / 1671* (* with sparsity).
#   H200 SXM / NVL: NVIDIA H200 Tensor Core GPU datasheet (2024): FP32 67 / 60; TF32 989* / 835*;
#     BF16 and FP16 1979* / 1671*.  The NVL part is power-capped: not the SXM's peaks.
#   GH200: NVIDIA GH200 Grace Hopper Superchip datasheet (2024): FP32 67; TF32 494 dense (989*);
#     BF16 and FP16 990 dense (1979*).
#   A100 (SXM4 and PCIe): NVIDIA A100 datasheet (2021): FP32 19.5; TF32 156 (312*); BF16/FP16 312 (624*).
#   A10: NVIDIA A10 datasheet (2021): FP32 31.2; TF32 62.5 (125*); BF16/FP16 125 (250*).
#   A10G (AWS G5): no NVIDIA datasheet; FP32 31.2 and BF16/FP16 70 as AWS and NVIDIA's 2021 AWS
#     announcement give them; no TF32 figure published: None.
#   L40S: NVIDIA L40S datasheet (2023): FP32 91.6; TF32 183 (366*); BF16/FP16 362.05 (733*).
#   L40: NVIDIA L40 datasheet (2022): FP32 90.5; TF32 90.5 (181*); BF16/FP16 181 (362*).
#   L4: NVIDIA L4 datasheet (2023): FP32 30.3; TF32 60 (120*); BF16/FP16 121 (242*).
#   V100 SXM2 / PCIe: NVIDIA V100 datasheet (2020): FP32 15.7 / 14; FP16 tensor 125 / 112. No BF16
#     and no TF32 units: with TF32 "on", fp32 matmuls still run at the FP32 rate.
#   T4: NVIDIA T4 datasheet (2019): FP32 8.1; FP16 tensor 65. No BF16, no TF32.
GPU_PEAKS: list[tuple[str, dict[str, float | None]]] = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51.2e12, "tf32": 378e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12, "tf32": 417.5e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 66.9e12, "tf32": 494.7e12}),  # SXM5: "H100 80GB HBM3"
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 66.9e12, "tf32": 494.7e12}),
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12, "tf32": 417.5e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 66.9e12, "tf32": 494.7e12}),  # SXM
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "tf32": 156e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12, "tf32": None}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12, "tf32": 62.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12, "tf32": 183e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12, "tf32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12, "tf32": 60e12}),
    ("V100 PCIe", {"fp16": 112e12, "fp32": 14e12, "tf32": 14e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12, "tf32": 15.7e12}),  # SXM2
    ("T4", {"fp16": 65e12, "fp32": 8.1e12, "tf32": 8.1e12}),
]


def _words(name: str) -> set[str]:
    return set(re.split(r"[\s\-]+", name.upper()))


def peak_rate(precision: str, tf32: bool = False) -> str:
    """The datasheet rate a run computes at: fp32 with TF32 matmuls counts as tf32, else its precision."""
    return "tf32" if precision == "fp32" and tf32 else precision


def gpu_peak(name: str, precision: str, tf32: bool = False) -> float | None:
    """Dense peak FLOP/s of one GPU, or None: unknown GPU or precision, or a MIG slice."""
    words = _words(name)
    if "MIG" in words:
        return None  # a slice of the GPU: its share of the units is not on any datasheet
    key = peak_rate(precision, tf32)
    for entry, peaks in GPU_PEAKS:
        if _words(entry) <= words:
            return peaks.get(key)
    return None


def cpu_matmul_peak(precision: str, size: int = 1024, seconds: float = 1.5) -> float:
    """Best FLOP/s of square matmuls over about `seconds`, with this process's threads (the same
    number a single-process training run uses). The best of many short trials, because the machine
    may be shared: the peak is what the hardware can do, not what it did on average. Matrices of
    `size`, halved while one product would take over 1/16 of `seconds` at the rate of a small
    one: enough trials for one to run undisturbed, and no emulated bf16 1024^3 product (seconds
    on its own)."""
    dtype = DTYPES[precision]

    def operands(n: int):
        # A generator of its own: drawing from the global one would shift the dropout masks of the
        # run that measures its peak (the golden loss curves caught exactly that).
        gen = torch.Generator().manual_seed(0)
        return torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)

    def trial(a, b) -> float:
        t0 = time.perf_counter()
        a @ b
        return time.perf_counter() - t0

    a, b = operands(128)
    trial(a, b)  # warm-up: thread pool, kernel selection
    rate = 2 * 128**3 / min(trial(a, b), trial(a, b))
    while size > 128 and 2 * size**3 / rate > seconds / 16:
        size //= 2
    a, b = operands(size)
    trial(a, b)
    flops, best, end = 2 * size**3, 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        best = max(best, flops / trial(a, b))
    return best


def cpu_peak(precision: str, seconds: float = 1.5) -> float:
    """The CPU's peak for a run in `precision`: bf16 runs at the better of the bf16 and fp32 rates
    (see the module docstring)."""
    if precision == "bf16":
        return max(cpu_matmul_peak("bf16", seconds=seconds / 2), cpu_matmul_peak("fp32", seconds=seconds / 2))
    return cpu_matmul_peak(precision, seconds=seconds)


_CPU_PEAKS: dict[str, float] = {}  # precision -> FLOP/s of one thread, measured once per process

# /proc/cpuinfo flags of bf16 units: x86's AVX512-BF16 and AMX-BF16, ARM's BF16 ("Features").
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
_BF16_WARNED = False


def cpu_has_bf16_units(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU has bf16 units, from the first flags (x86) or Features (ARM) line of
    /proc/cpuinfo; None where there is no such line (another OS): then nothing is claimed."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read(1 << 20)  # the first CPU's block is a few KB; a MB is every core's
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool(BF16_FLAGS & set(value.split()))
    return None


def warn_if_bf16_emulated(device: torch.device, precision: str) -> str | None:
    """Warn once per process (on rank 0) when a bf16 run is on a CPU without bf16 units: torch
    emulates bf16 there, some 40x slower than fp32 (3 MNIST steps took 78 s), and nothing said so.
    Returns the line printed, if any."""
    global _BF16_WARNED
    if _BF16_WARNED or device.type != "cpu" or precision != "bf16" or cpu_has_bf16_units() is not False:
        return None
    _BF16_WARNED = True
    if os.environ.get("RANK", "0") != "0":
        return None
    line = (
        f"dltrain: warning: train.precision=bf16 on a CPU without bf16 units (no avx512_bf16 or amx_bf16 "
        f"in /proc/cpuinfo; torch's CPU capability: {torch.backends.cpu.get_cpu_capability()}): torch emulates "
        "bf16 here, many times slower than fp32; use --set train.precision=fp32 on this machine"
    )
    print(line, file=sys.stderr, flush=True)
    return line


def peak_flops(
    device: torch.device, precision: str, tf32: bool = False, seconds: float = 0.3
) -> tuple[float | None, str]:
    """(peak FLOP/s of the hardware this process drives, where the figure comes from). None where
    no honest peak is known: then report no MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, precision, tf32)
        rate = peak_rate(precision, tf32)
        if peak is None:
            why = "a MIG slice" if "MIG" in _words(name) else "not in dltrain.peaks.GPU_PEAKS"
            return None, f"no datasheet peak for {name} {rate} ({why})"
        return peak, f"datasheet {name} {rate} dense"
    if device.type == "cpu" and precision in ("fp32", "bf16"):
        # One thread, times the run's threads: with several, a matmul waits at every barrier for
        # its slowest thread, and on a shared machine the measured "peak" fell below what the run
        # itself then achieved (MFU over 100%). One thread's best trial is what the core can do.
        # Every run asks for its peak at start-up, before the first step: the place that knows
        # the device and the precision, and where emulated bf16 first costs time.
        warn_if_bf16_emulated(device, precision)
        threads = torch.get_num_threads()
        if precision not in _CPU_PEAKS:
            torch.set_num_threads(1)
            try:
                _CPU_PEAKS[precision] = cpu_peak(precision, seconds=seconds)
            finally:
                torch.set_num_threads(threads)
        return _CPU_PEAKS[precision] * threads, f"measured (CPU matmul, 1 thread x {threads})"
    return None, f"no peak known for {precision} on {device.type}"
