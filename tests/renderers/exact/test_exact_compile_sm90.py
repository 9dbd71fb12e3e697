"""Every specialisation of the exact renderer's kernels compiles for sm_90 (H100/H200), without a GPU.

The test process runs kernels under ``TRITON_INTERPRET=1``, which accepts code the GPU compiler
rejects; ``compile_exact_sm90.py`` therefore runs in a subprocess without it and compiles each
specialisation to PTX and a cubin (about 1-3 s each).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_exact_sm90.py")
ROOT = Path(__file__).resolve().parents[3]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's default-change warning
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_every_exact_specialisation_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    listing = subprocess.run(
        [sys.executable, str(SCRIPT), "--list"], check=False, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert listing.returncode == 0, listing.stderr
    names = listing.stdout.split()
    for prefix in ("fwd-plain", "fwd-hard", "fwd-soft", "bwd-plain", "bwd-hard", "bwd-soft"):
        assert any(n.startswith(prefix) for n in names), prefix
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], check=False, env=_env(), capture_output=True, text=True, timeout=1500
    )
    report = result.stdout + result.stderr[-4000:]
    compiled = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert result.returncode == 0, report
    assert sorted(compiled) == sorted(names), report
