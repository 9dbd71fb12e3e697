"""Compile every specialisation of the Siddon kernels for sm_90 (H100/H200) without a GPU.

Run in a process WITHOUT ``TRITON_INTERPRET`` (``test_siddon_compile_sm90.py`` does): the
interpreter accepts code that the GPU compiler rejects (TRITON.md). Each specialisation goes
through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (Triton IR -> LLVM
-> PTX -> cubin with the ptxas bundled in the wheel), as ``tests/compile_sm90.py`` does for the
ray-marching kernels.

Usage: ``python tests/renderers/siddon/compile_siddon_sm90.py [--list] [NAME_SUBSTRING ...]``.
Prints ``ok NAME SECONDS`` or ``FAIL NAME: error`` per specialisation; exits 1 if any failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_siddon_sm90.py must run without TRITON_INTERPRET=1")

import triton  # noqa: E402

from tritondrr.kernels.siddon import _siddon_bwd_kernel, _siddon_fwd_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the shared compile harness
from compile_sm90 import _PTR, compile_all  # noqa: E402


# Runtime int and float arguments, in kernel order after the pointers.
_SCALARS = [
    "n_rays",
    "src_stride_b",
    "src_stride_r",
    "size_i",
    "size_j",
    "size_k",
    "stride_i",
    "stride_j",
    "lo0",
    "lo1",
    "lo2",
    "hi0",
    "hi1",
    "hi2",
]
_FLOATS = {"lo0", "lo1", "lo2", "hi0", "hi1", "hi2"}
# Ints equal to 1 become constexpr on the GPU: one ray, a shared source (stride 0 is not 1),
# K = 1 volumes (stride_j = K = 1), I = 1 or J = 1.
_ONES = ("n_rays", "size_i", "size_j", "size_k", "stride_j")


def _scalars(int_type: str, ones: tuple[str, ...]) -> tuple[dict, dict]:
    sig, const = {}, {}
    for name in _SCALARS:
        if name in ones:
            sig[name], const[name] = "constexpr", 1
        else:
            sig[name] = "fp32" if name in _FLOATS else int_type
    return sig, const


def _forward(vol: str, rays: str, int64: bool, channels: int = 1, ones=(), block_r=32, block_s=32):
    sig = {
        "vol_ptr": _PTR[vol],
        "lab_ptr": "*i64" if channels > 1 else _PTR[vol],
        "src_ptr": _PTR[rays],
        "tgt_ptr": _PTR[rays],
        "out_ptr": _PTR[rays],
    }
    scal, const = _scalars("i64" if int64 else "i32", ones)
    sig.update(scal)
    flags = {
        "N_CHANNELS": channels,
        "C_PAD": triton.next_power_of_2(channels),
        "INT64": int64,
        "BLOCK_R": block_r,
        "BLOCK_S": block_s,
    }
    const.update(flags)
    sig.update({k: "constexpr" for k in flags})
    return _siddon_fwd_kernel, sig, const


def _backward(vol, rays, int64, pose, volume, channels=1, ones=(), block_r=32, block_s=32):
    acc = "fp64" if "fp64" in (vol, rays) else "fp32"
    sig = {
        "vol_ptr": _PTR[vol],
        "lab_ptr": "*i64" if channels > 1 else _PTR[vol],
        "src_ptr": _PTR[rays],
        "tgt_ptr": _PTR[rays],
        "gout_ptr": _PTR[rays],
        "gsrc_ptr": _PTR[rays],
        "gtgt_ptr": _PTR[rays],
        "gvol_ptr": _PTR[acc],
    }
    scal, const = _scalars("i64" if int64 else "i32", ones)
    sig.update(scal)
    flags = {
        "N_CHANNELS": channels,
        "NEED_POSE_GRAD": pose,
        "NEED_VOLUME_GRAD": volume,
        "INT64": int64,
        "BLOCK_R": block_r,
        "BLOCK_S": block_s,
    }
    const.update(flags)
    sig.update({k: "constexpr" for k in flags})
    return _siddon_bwd_kernel, sig, const


def specialisations() -> dict:
    """name -> (kernel, signature, constexprs): every combination the launchers can produce."""
    specs = {}
    for vol in ("fp32", "fp16", "bf16"):
        for int64 in (False, True):
            specs[f"fwd-{vol}-{'i64' if int64 else 'i32'}"] = _forward(vol, "fp32", int64)
    specs["fwd-fp64-rays-fp64"] = _forward("fp64", "fp64", False)
    specs["fwd-fp32-rays-fp64"] = _forward("fp32", "fp64", False)
    specs["fwd-labels2-fp32-i32"] = _forward("fp32", "fp32", False, 2, block_s=16)
    specs["fwd-labels5-fp32-i64"] = _forward("fp32", "fp32", True, 5, block_s=16)
    specs["fwd-labels3-fp64-rays-fp64"] = _forward("fp64", "fp64", False, 3, block_s=16)
    specs["fwd-ones"] = _forward("fp32", "fp32", False, ones=_ONES)
    specs["fwd-labels-ones"] = _forward("fp32", "fp32", False, 3, ones=_ONES, block_s=16)
    specs["fwd-small-blocks"] = _forward("fp32", "fp32", False, block_r=16, block_s=2)
    for pose, volume in ((1, 0), (0, 1), (1, 1)):
        for channels in (1, 3):
            name = f"bwd-pose{pose}-vol{volume}-c{channels}-fp32-i32"
            specs[name] = _backward("fp32", "fp32", False, bool(pose), bool(volume), channels)
    for channels in (1, 3):
        specs[f"bwd-pose1-vol1-c{channels}-fp32-i64"] = _backward("fp32", "fp32", True, True, True, channels)
    for vol in ("fp16", "bf16"):
        specs[f"bwd-pose1-vol1-{vol}-i32"] = _backward(vol, "fp32", False, True, True)
    specs["bwd-pose1-vol1-fp64-rays-fp64"] = _backward("fp64", "fp64", False, True, True)
    specs["bwd-pose1-vol1-c3-fp64-rays-fp64"] = _backward("fp64", "fp64", False, True, True, 3)
    specs["bwd-pose1-vol1-fp32-rays-fp64"] = _backward("fp32", "fp64", False, True, True)
    specs["bwd-ones"] = _backward("fp32", "fp32", False, True, True, ones=_ONES)
    specs["bwd-labels-ones"] = _backward("fp32", "fp32", False, True, True, 3, ones=_ONES)
    specs["bwd-small-blocks"] = _backward("fp32", "fp32", False, True, True, block_r=16, block_s=2)
    return specs


def main(argv: list[str]) -> int:
    return compile_all(specialisations(), argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
