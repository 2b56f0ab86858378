"""The kernels' NEON paths: cross-compiled for aarch64 and run under qemu-user by scripts/test-neon.sh."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from helpers import REPO

CROSS_TOOLS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64")
APT = "apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user"


def test_neon_kernels_pass_under_qemu() -> None:
    """The kernel tests (plain, then ASan + UBSan) built for aarch64 all pass on the NEON paths."""
    missing = [tool for tool in CROSS_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {', '.join(missing)} ({APT})")
    proc = subprocess.run([str(REPO / "scripts" / "test-neon.sh")], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=3600)  # fmt: skip
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    results = re.findall(r"^(\d+) passed, (\d+) failed$", proc.stdout, re.MULTILINE)
    assert len(results) == 2, log
    for passed, failed in results:
        assert failed == "0" and int(passed) > 0, log
    # the SIMD paths ran, not the scalar fallback
    kernels = re.findall(r"^kernels: (\S+)$", proc.stdout, re.MULTILINE)
    assert len(kernels) == 2 and all(k.startswith("neon") for k in kernels), log
    assert "runtime error" not in proc.stderr and "AddressSanitizer" not in proc.stderr, log
