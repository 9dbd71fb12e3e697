"""Every Siddon kernel specialisation compiles for sm_90 (H100/H200), checked without a GPU.

``compile_siddon_sm90.py`` runs in a subprocess whose environment drops ``TRITON_INTERPRET``
(the interpreter accepts code the GPU compiler rejects) and builds PTX and a cubin for each
specialisation: fp32/fp64 rays, fp32/fp16/bf16/fp64 volumes, int32/int64 offsets, labels on/off,
pose/volume gradient flags, ints equal to 1 (constexpr on the GPU) and small blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_siddon_sm90.py")
ROOT = Path(__file__).resolve().parents[3]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's default-change warning
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_every_siddon_specialisation_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    listing = subprocess.run(
        [sys.executable, str(SCRIPT), "--list"], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert listing.returncode == 0, listing.stderr
    names = listing.stdout.split()
    for part in ("fwd-labels", "bwd-pose1-vol0", "bwd-pose0-vol1", "i64", "bf16", "fp16", "rays-fp64", "ones"):
        assert any(part in n for n in names), part
    result = subprocess.run([sys.executable, str(SCRIPT)], env=_env(), capture_output=True, text=True, timeout=1500)
    report = result.stdout + result.stderr[-4000:]
    compiled = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert result.returncode == 0, report
    assert sorted(compiled) == sorted(names), report
