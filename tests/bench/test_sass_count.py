"""``bench/sass_count.py``: the loop finder on hand-written SASS, then real sm_90 kernels.

The facts checked on the compiled kernels are independent of the counting code: a trilinear
sample loads 8 corners (8 ``LDG`` per sample in a forward or pose-backward loop), the volume
adjoint scatters 8 weights (8 atomics per sample) and loads nothing, and a lane handles
``BLOCK_R * BLOCK_S / (32 * num_warps)`` samples per iteration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0020*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0030*/                   LDG.E R3, desc[UR4][R6.64] ;
        /*0040*/                   FFMA R8, R2, R3, R8 ;
        /*0050*/              @P1 BRA `(.L_x_2) ;
        /*0060*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R10.64], R8 ;
.L_x_2:
        /*0070*/                   ISETP.GE.AND P0, PT, R9, R12, PT ;
        /*0080*/               @P0 BRA `(.L_x_1) ;
.L_x_0:
        /*0090*/                   STG.E desc[UR4][R14.64], R8 ;
        /*00a0*/                   EXIT ;
.L_x_3:
        /*00b0*/                   BRA `(.L_x_3);
"""


def test_loop_finder_on_handwritten_sass():
    import sass_count as S

    instrs, labels = S.parse_sass(SASS)
    assert len(instrs) == 12 and labels == {".L_x_1": 0x20, ".L_x_2": 0x70, ".L_x_0": 0x90, ".L_x_3": 0xB0}
    # One backward branch closes the loop 0x20..0x80; the trap after EXIT branches to itself, not back.
    assert S.loops(instrs, labels) == [(2, 8)]
    found = S.sample_loop(SASS)
    assert found["loop_instr"] == 7  # 0x20 .. 0x80 inclusive
    assert found["inner_branches"] == 1  # the branch around the atomic
    classes = found["classes"]
    assert (classes["ldg"], classes["atom"], classes["fp"], classes["mask"], classes["branch"]) == (2, 1, 1, 1, 2)
    assert sum(classes.values()) == 7


def test_opcode_strips_predicates_and_modifiers():
    import sass_count as S

    assert S.opcode("@!P0 IMAD.WIDE.U32 R2, R3, 0x4, R4") == "IMAD"
    assert S.opcode("LDG.E.128 R4, desc[UR4][R2.64]") == "LDG"


def test_compiled_kernels_have_eight_gathers_or_eight_atomics_per_sample(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    names = ["fwd-large-blocks", "fwd-skip-fp32-i32", "bwd-pose1-vol0-det0-fp32-i32", "bwd-pose0-vol1-det0-fp32-i32"]
    done = subprocess.run([sys.executable, str(REPO / "bench" / "sass_count.py"), "--no-grid", "--out", str(tmp_path),
                           *names], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "sass-sm90.json") as f:
        rows = {row["name"]: row for row in json.load(f)["rows"]}
    assert set(rows) == set(names)
    for name, row in rows.items():
        assert row["samples_per_lane"] == row["block_r"] * row["block_s"] / (32 * row["num_warps"])
        assert row["regs"] > 0 and row["loop_instr"] > 0
        gathers, atomics = row["per_sample"]["ldg"], row["per_sample"]["atom"]
        if "vol1" in name and "pose0" in name:
            assert (gathers, atomics) == (0, 8)
        elif "skip" in name:  # the eight gathers and the brick lookup of empty-space skipping
            assert (gathers, atomics) == (9, 0)
        else:
            assert (gathers, atomics) == (8, 0)
    assert (tmp_path / "sass-sm90.md").read_text().count("| fwd-large-blocks |") == 1
