"""Compile every specialisation of the exact renderer's kernels for sm_90 (H100/H200) without a GPU.

Run in a process WITHOUT ``TRITON_INTERPRET`` (``test_exact_compile_sm90.py`` does): the
interpreter accepts code the GPU compiler rejects (TRITON.md). Each specialisation goes through
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` to PTX and a cubin.

Usage: ``python tests/renderers/exact/compile_exact_sm90.py [--list] [NAME_SUBSTRING ...]``.
Prints ``ok NAME SECONDS`` or ``FAIL NAME: error`` per specialisation; exits 1 if any failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_exact_sm90.py must run without TRITON_INTERPRET=1")

import triton

from tritondrr.kernels.exact import _exact_bwd_kernel, _exact_fwd_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the shared compile harness
from compile_sm90 import _PTR, compile_all  # noqa: E402

_SCALARS = ["n_rays", "src_stride_b", "src_stride_r", "size_i", "size_j", "size_k", "stride_i", "stride_j"]
_BOX = ["lo0", "lo1", "lo2", "hi0", "hi1", "hi2"]
#: Ints equal to 1 become constexprs on the GPU: one ray, a shared source stride, K = 1 volumes.
_ONES = ("n_rays", "size_k", "stride_j")


def _scalars(int_type: str, ones: tuple[str, ...]):
    sig, const = {}, {}
    for name in _SCALARS:
        if name in ones:
            sig[name], const[name] = "constexpr", 1
        else:
            sig[name] = int_type
    sig.update({name: "fp32" for name in _BOX})
    return sig, const


def _labels(vol: str, mode: int) -> str:
    return _PTR["i64"] if mode else _PTR[vol]


def _forward(vol, rays, int64, mode, channels, ones=(), block_r=128):
    sig = {
        "vol_ptr": _PTR[vol],
        "lab_ptr": _labels(vol, mode),
        "src_ptr": _PTR[rays],
        "tgt_ptr": _PTR[rays],
        "out_ptr": _PTR[rays],
    }
    scal, const = _scalars("i64" if int64 else "i32", ones)
    sig.update(scal)
    flags = {
        "LABEL_MODE": mode,
        "N_CHANNELS": channels,
        "CH_BLOCK": triton.next_power_of_2(channels),
        "INT64": int64,
        "BLOCK_R": block_r,
    }
    const.update(flags)
    sig.update({k: "constexpr" for k in flags})
    return _exact_fwd_kernel, sig, const


def _backward(vol, rays, int64, mode, channels, pose, volume, ones=(), block_r=64):
    acc = "fp64" if vol == "fp64" else "fp32"
    sig = {
        "vol_ptr": _PTR[vol],
        "lab_ptr": _labels(vol, mode),
        "src_ptr": _PTR[rays],
        "tgt_ptr": _PTR[rays],
        "grad_out_ptr": _PTR[rays],
        "grad_src_ptr": _PTR[rays],
        "grad_tgt_ptr": _PTR[rays],
        "grad_vol_ptr": _PTR[acc] if volume else _PTR[rays],
    }
    scal, const = _scalars("i64" if int64 else "i32", ones)
    sig.update(scal)
    flags = {
        "LABEL_MODE": mode,
        "N_CHANNELS": channels,
        "CH_BLOCK": triton.next_power_of_2(channels),
        "NEED_POSE_GRAD": pose,
        "NEED_VOLUME_GRAD": volume,
        "INT64": int64,
        "BLOCK_R": block_r,
    }
    const.update(flags)
    sig.update({k: "constexpr" for k in flags})
    return _exact_bwd_kernel, sig, const


def specialisations() -> dict:
    """name -> (kernel, signature, constexprs): every combination the launchers can produce."""
    specs = {}
    modes = ((0, 1, "plain"), (1, 5, "hard"), (2, 5, "soft"))
    for mode, channels, label in modes:
        for vol in ("fp32", "fp16", "bf16"):
            for int64 in (False, True):
                specs[f"fwd-{label}-{vol}-{'i64' if int64 else 'i32'}"] = _forward(vol, "fp32", int64, mode, channels)
        specs[f"fwd-{label}-fp64-rays-fp64"] = _forward("fp64", "fp64", False, mode, channels)
        specs[f"fwd-{label}-ones"] = _forward("fp32", "fp32", False, mode, channels, ones=_ONES)
        for pose, volume in ((1, 0), (0, 1), (1, 1)):
            for int64 in (False, True):
                name = f"bwd-{label}-pose{pose}-vol{volume}-fp32-{'i64' if int64 else 'i32'}"
                specs[name] = _backward("fp32", "fp32", int64, mode, channels, bool(pose), bool(volume))
        for vol in ("fp16", "bf16"):
            specs[f"bwd-{label}-pose1-vol1-{vol}-i32"] = _backward(vol, "fp32", False, mode, channels, True, True)
        specs[f"bwd-{label}-pose1-vol1-fp64-rays-fp64"] = _backward("fp64", "fp64", False, mode, channels, True, True)
        specs[f"bwd-{label}-ones"] = _backward("fp32", "fp32", False, mode, channels, True, True, ones=_ONES)
    specs["fwd-plain-small-block"] = _forward("fp32", "fp32", False, 0, 1, block_r=16)
    specs["fwd-hard-one-channel"] = _forward("fp32", "fp32", False, 1, 1)
    specs["bwd-soft-two-channels"] = _backward("fp32", "fp32", False, 2, 2, True, True)
    return specs


def main(argv: list[str]) -> int:
    return compile_all(specialisations(), argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
