"""The peak FLOP/s table MFU is computed against: names as torch.cuda.get_device_name gives them."""

from __future__ import annotations

import pytest
import torch

from dltrain import peaks


@pytest.mark.parametrize(
    "name, precision, expected",
    [
        ("NVIDIA H200", "bf16", 989e12),  # SXM
        ("NVIDIA H200 NVL", "bf16", 835e12),  # power-capped PCIe card: not the SXM's peak
        ("NVIDIA GH200 480GB", "bf16", 989e12),  # "GH200" contains "H200": must not read as it either way
        ("NVIDIA GH200 480GB", "fp32", 66.9e12),
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 NVL", "bf16", 835e12),
        ("NVIDIA H100 PCIe", "fp16", 756e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A10G", "bf16", 70e12),
        ("NVIDIA A10", "bf16", 125e12),  # not the A100's
        ("NVIDIA L4", "fp32", 30.3e12),
        ("NVIDIA L40S", "fp32", 91.6e12),  # not the L4's
        ("Tesla V100-SXM2-16GB", "fp16", 125e12),
        ("Tesla V100-PCIE-32GB", "fp16", 112e12),
    ],
)
def test_datasheet_peaks_by_name(name, precision, expected):
    assert peaks.gpu_peak(name, precision) == expected


@pytest.mark.parametrize(
    "name, fp32, tf32",
    [
        ("NVIDIA H100 80GB HBM3", 66.9e12, 494.7e12),
        ("NVIDIA H200", 66.9e12, 494.7e12),
        ("NVIDIA H100 PCIe", 51.2e12, 378e12),
        ("NVIDIA H200 NVL", 60e12, 417.5e12),
        ("NVIDIA A100-PCIE-40GB", 19.5e12, 156e12),
        ("NVIDIA L40S", 91.6e12, 183e12),
        ("NVIDIA L4", 30.3e12, 60e12),
        ("Tesla V100-SXM2-16GB", 15.7e12, 15.7e12),  # no TF32 units: fp32 stays fp32
        ("Tesla T4", 8.1e12, 8.1e12),
    ],
)
def test_tf32_switches_the_fp32_peak_only(name, fp32, tf32):
    assert peaks.gpu_peak(name, "fp32", tf32=False) == fp32
    assert peaks.gpu_peak(name, "fp32", tf32=True) == tf32
    assert peaks.gpu_peak(name, "bf16", tf32=True) == peaks.gpu_peak(name, "bf16")


@pytest.mark.parametrize(
    "name, precision, tf32",
    [
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16", False),  # a slice: no whole-GPU peak
        ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "fp32", True),
        ("NVIDIA RTX 9999", "bf16", False),  # unknown
        ("Tesla V100-SXM2-16GB", "bf16", False),  # no bf16 rate on its sheet
        ("NVIDIA A10G", "fp32", True),  # no TF32 figure published
    ],
)
def test_no_peak_rather_than_a_wrong_one(name, precision, tf32):
    assert peaks.gpu_peak(name, precision, tf32) is None


def test_cpu_peak_is_one_thread_measured_once_times_the_threads(monkeypatch):
    calls = []

    def fake(precision, seconds=1.5):
        calls.append((precision, seconds, torch.get_num_threads()))
        return 1e11

    monkeypatch.setattr(peaks, "cpu_peak", fake)
    monkeypatch.setattr(peaks, "_CPU_PEAKS", {})
    threads = torch.get_num_threads()
    try:
        for n in (threads, 3):
            torch.set_num_threads(n)
            peak, source = peaks.peak_flops(torch.device("cpu"), "fp32", tf32=False)
            assert peak == 1e11 * n and source == f"measured (CPU matmul, 1 thread x {n})"
            assert torch.get_num_threads() == n  # the run's threads are left as they were
    finally:
        torch.set_num_threads(threads)
    assert calls == [("fp32", 0.3, 1)]  # short, on one thread, and cached
    assert peaks.peak_flops(torch.device("cpu"), "fp16", False)[0] is None


def test_cpu_bf16_peak_is_never_below_the_fp32_rate(monkeypatch):
    # A CPU without bf16 units emulates it far slower than fp32: a bf16 run's kernels then beat
    # the bf16 matmul, and MFU against it read 300% (seen on this project's AVX2 machines).
    rates = {"fp32": 20e9, "bf16": 0.5e9}
    monkeypatch.setattr(peaks, "cpu_matmul_peak", lambda precision, size=1024, seconds=1.5: rates[precision])
    assert peaks.cpu_peak("bf16") == 20e9 and peaks.cpu_peak("fp32") == 20e9
    rates["bf16"] = 60e9  # AVX512-BF16 / AMX: bf16 is faster
    assert peaks.cpu_peak("bf16") == 60e9


def test_cpu_matmul_peak_is_a_plausible_rate():
    assert 1e7 < peaks.cpu_matmul_peak("fp32", seconds=0.1) < 1e14
    assert 1e6 < peaks.cpu_matmul_peak("bf16", seconds=0.1) < 1e14


def test_emulated_bf16_is_measured_on_smaller_matrices_within_the_time_given(monkeypatch):
    """On a simulated clock, where a product of n x n matrices takes 2 n^3 / rate: a CPU that
    emulates bf16 (40x slower than fp32 here) gets smaller matrices, and the measurement spends
    about the `seconds` it is given, not the minutes a 1024^3 emulated product would take. No
    wall clock is read, so a loaded machine changes nothing."""
    rates = {torch.float32: 40e9, torch.bfloat16: 1e9}  # FLOP/s
    now, sizes = [0.0], []

    def product(a, b):
        sizes.append((a.dtype, a.shape[0]))
        now[0] += 2 * a.shape[0] ** 3 / rates[a.dtype]
        return a

    monkeypatch.setattr(peaks.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(torch.Tensor, "__matmul__", product)
    for dtype, precision in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        now[0], sizes[:] = 0.0, []
        rate = peaks.cpu_matmul_peak(precision, seconds=1.0)
        assert rate == pytest.approx(rates[dtype])
        measured = max(n for _, n in sizes)
        assert 2 * measured**3 / rates[dtype] <= 1.0 / 16  # each product within 1/16 of the time given
        assert now[0] <= 1.0 + 2 * 1.0 / 16  # the time given, and the last product begun within it
    assert measured < 1024  # bf16: a smaller matrix than fp32's


def test_measuring_the_cpu_peak_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    peaks.cpu_matmul_peak("fp32", size=128, seconds=0.05)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "precision, tf32, rate",
    [("fp32", True, "tf32"), ("fp32", False, "fp32"), ("bf16", True, "bf16"), ("fp16", False, "fp16")],
)
def test_tf32_counts_only_for_fp32(precision, tf32, rate):
    assert peaks.peak_rate(precision, tf32) == rate
    assert peaks.gpu_peak("NVIDIA A100-SXM4-80GB", precision, tf32) == dict(peaks.GPU_PEAKS)["A100"].get(rate)
