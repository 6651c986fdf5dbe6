"""Host allocator settings (dltrain/allocator.py): they must cut the page faults of a training step,
and leave alone what a user set."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from dltrain import allocator

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

# A conv layer's forward and backward at the MNIST CNN's shapes, repeated; prints minor page
# faults per iteration after a warm-up.
PROBE = """
import resource, sys, torch
from dltrain import allocator
print(allocator.tune())
x = torch.randn(64, 32, 28, 28)
conv = torch.nn.Conv2d(32, 64, 3, padding=1)
for _ in range(3):
    conv(x).sum().backward()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    conv(x).sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10)
"""


def _probe(**env: str) -> tuple[str, float]:
    clean = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") and k.endswith("_"))}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=clean | {"OMP_NUM_THREADS": "1"} | env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return out[-2], float(out[-1])


@glibc
def test_settings_cut_page_faults_of_a_training_step():
    tuned_desc, tuned = _probe()
    assert "(dltrain)" in tuned_desc
    # glibc starts with a 128 KiB mmap threshold and raises it only as large blocks happen to be
    # freed, so its default varies from run to run (1,200 to 5,000 faults per iteration seen
    # here); held at that starting value, every activation is mapped and faulted in afresh.
    start_desc, start = _probe(DLTRAIN_MALLOC_TUNING="0", MALLOC_MMAP_THRESHOLD_="131072")
    assert "MALLOC_MMAP_THRESHOLD_=131072" in start_desc
    # mapped afresh, one iteration's activations, gradients and conv buffers fault ~15,000 pages
    assert start > 5000 and tuned < 500, (tuned, start)
    default_desc, _ = _probe(DLTRAIN_MALLOC_TUNING="0")
    assert "DLTRAIN_MALLOC_TUNING=0" in default_desc


@glibc
def test_the_same_settings_as_environment_variables_work_too():
    desc, faults = _probe(DLTRAIN_MALLOC_TUNING="0", **allocator.ENV)
    assert desc.startswith("glibc, user settings MALLOC_MMAP_THRESHOLD_=")  # dltrain left them alone
    assert faults < 500, faults


def test_a_users_allocator_wins():
    assert allocator.describe_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "jemalloc (LD_PRELOAD)"
    assert allocator.describe_env({"MALLOC_TOP_PAD_": "0"}) == "glibc, user settings MALLOC_TOP_PAD_=0"
    tunables = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}
    assert allocator.describe_env(tunables) == "glibc, user settings GLIBC_TUNABLES=glibc.malloc.trim_threshold=0"
    assert allocator.describe_env({"PATH": "/bin"}) is None
