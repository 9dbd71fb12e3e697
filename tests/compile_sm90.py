"""Compile every specialisation of the ray-marching kernels for sm_90 (H100/H200) without a GPU.

Run in a process WITHOUT ``TRITON_INTERPRET`` (``tests/test_compile_sm90.py`` does): the
interpreter accepts code that the GPU compiler rejects (TRITON.md). Each specialisation goes
through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, i.e. Triton IR ->
LLVM -> PTX -> cubin with the ptxas bundled in the wheel.

Usage: ``python tests/compile_sm90.py [--list] [NAME_SUBSTRING ...]``. Prints one line per
specialisation (``ok NAME SECONDS`` or ``FAIL NAME: error``) and exits 1 if any failed.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_sm90.py must run without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tritondrr.kernels.trilinear import _raymarch_bwd_kernel, _raymarch_fwd_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)

_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp64": "*fp64", "i64": "*i64"}
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
    "n_samples",
]
_FLOATS = {"lo0", "lo1", "lo2", "hi0", "hi1", "hi2"}


def _scalars(int_type: str, ones: tuple[str, ...]) -> tuple[dict, dict]:
    """Signature of the scalar arguments; names in ``ones`` are the constexpr 1 Triton makes of ints equal to 1."""
    sig, const = {}, {}
    for name in _SCALARS:
        if name in ones:
            sig[name], const[name] = "constexpr", 1
        else:
            sig[name] = "fp32" if name in _FLOATS else int_type
    return sig, const


def _skip(vol: str, skip: bool) -> tuple[dict, dict]:
    """Signature of the occupancy arguments: the bricks (uint8) and their shape with SKIP; without,
    the launcher passes the volume and three 1s (constexpr 1 on a GPU)."""
    if skip:
        return {"bricks_ptr": "*u8", "bricks_n0": "i32", "bricks_n1": "i32", "bricks_n2": "i32"}, {}
    sig = {"bricks_ptr": _PTR[vol], "bricks_n0": "constexpr", "bricks_n1": "constexpr", "bricks_n2": "constexpr"}
    return sig, {"bricks_n0": 1, "bricks_n1": 1, "bricks_n2": 1}


def _channels(channels: int, soft: bool) -> dict:
    """Constexprs of the labelmap channels (C = 1: the plain kernel)."""
    return dict(N_CHANNELS=channels, SOFT_LABELS=soft)


def _forward(
    vol: str, rays: str, int64: bool, ones=(), block_r=16, block_s=16, channels=1, soft=False, pool=False, skip=False
):
    sig = {
        "vol_ptr": _PTR[vol],
        "labels_ptr": "*i64",
        "src_ptr": _PTR[rays],
        "tgt_ptr": _PTR[rays],
        "phase_ptr": _PTR[rays],
        "out_ptr": _PTR[rays],
        "item_ptr": "*i64",
        "box_ptr": "*fp32",
    }
    scal, const = _scalars("i64" if int64 else "i32", ones)
    sig.update(scal)
    skip_sig, skip_const = _skip(vol, skip)
    sig.update(skip_sig)
    const.update(skip_const)
    flags = dict(
        **_channels(channels, soft),
        POOL=pool,
        INT64=int64,
        SKIP=skip,
        BLOCK_R=block_r,
        BLOCK_S=block_s,
        BLOCK_C=triton.next_power_of_2(channels),
    )
    const.update(flags)
    sig.update({k: "constexpr" for k in flags})
    return _raymarch_fwd_kernel, sig, const


def _backward(
    vol, rays, int64, pose, volume, det, ones=(), block_r=32, block_s=16, channels=1, soft=False, pool=False, skip=False
):
    acc = "i64" if det else ("fp64" if vol == "fp64" else "fp32")
    sig = {
        "vol_ptr": _PTR[vol],
        "labels_ptr": "*i64",
        "src_ptr": _PTR[rays],
        "tgt_ptr": _PTR[rays],
        "phase_ptr": _PTR[rays],
        "grad_out_ptr": _PTR[rays],
        "grad_src_ptr": _PTR[rays],
        "grad_tgt_ptr": _PTR[rays],
        "grad_vol_ptr": _PTR[acc],
        "scale_ptr": "*fp64",
        "item_ptr": "*i64",
        "box_ptr": "*fp32",
    }
    scal, const = _scalars("i64" if int64 else "i32", ones)
    sig.update(scal)
    skip_sig, skip_const = _skip(vol, skip)
    sig.update(skip_sig)
    const.update(skip_const)
    flags = dict(
        NEED_POSE_GRAD=pose,
        NEED_VOLUME_GRAD=volume,
        DETERMINISTIC=det,
        **_channels(channels, soft),
        POOL=pool,
        INT64=int64,
        SKIP=skip,
        BLOCK_R=block_r,
        BLOCK_S=block_s,
    )
    const.update(flags)
    sig.update({k: "constexpr" for k in flags})
    return _raymarch_bwd_kernel, sig, const


def specialisations() -> dict:
    """name -> (kernel, signature, constexprs): every combination the launchers can produce."""
    specs = {}
    for vol in ("fp32", "fp16", "bf16"):
        for int64 in (False, True):
            specs[f"fwd-{vol}-{'i64' if int64 else 'i32'}"] = _forward(vol, "fp32", int64)
    specs["fwd-fp64-rays-fp64"] = _forward("fp64", "fp64", False)
    # Ints equal to 1 become constexpr on the GPU: K = 1 volumes, one ray, one sample, 1-D blocks.
    specs["fwd-ones"] = _forward("fp32", "fp32", False, ones=("n_rays", "size_k", "stride_j", "n_samples"))
    specs["fwd-large-blocks"] = _forward("fp32", "fp32", False, block_r=64, block_s=32)
    for pose, volume, det in ((1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1)):
        for int64 in (False, True):
            name = f"bwd-pose{pose}-vol{volume}-det{det}-fp32-{'i64' if int64 else 'i32'}"
            specs[name] = _backward("fp32", "fp32", int64, bool(pose), bool(volume), bool(det))
    for vol in ("fp16", "bf16"):
        specs[f"bwd-pose1-vol1-det0-{vol}-i32"] = _backward(vol, "fp32", False, True, True, False)
    specs["bwd-pose1-vol1-det0-fp64-rays-fp64"] = _backward("fp64", "fp64", False, True, True, False)
    specs["bwd-ones"] = _backward(
        "fp32", "fp32", False, True, True, True, ones=("n_rays", "size_k", "stride_j", "n_samples")
    )
    # Labelmap channels: hard and soft labels, a non-power-of-two C, the largest C the kernels take.
    for soft in (False, True):
        kind = "soft" if soft else "hard"
        specs[f"fwd-{kind}-c5-fp32-i32"] = _forward("fp32", "fp32", False, block_r=64, channels=5, soft=soft)
        specs[f"fwd-{kind}-c32-bf16-i64"] = _forward("bf16", "fp32", True, block_r=64, channels=32, soft=soft)
        specs[f"bwd-{kind}-c5-pose1-vol1-det0-fp32-i32"] = _backward(
            "fp32", "fp32", False, True, True, False, channels=5, soft=soft
        )
        specs[f"bwd-{kind}-c5-pose0-vol1-det1-fp32-i64"] = _backward(
            "fp32", "fp32", True, False, True, True, channels=5, soft=soft
        )
        specs[f"bwd-{kind}-c32-pose1-vol0-det0-fp32-i32"] = _backward(
            "fp32", "fp32", False, True, False, False, channels=32, soft=soft
        )
    specs["fwd-hard-c2-ones"] = _forward(
        "fp32", "fp32", False, ones=("n_rays", "size_k", "stride_j", "n_samples"), channels=2
    )
    # Packed pools (one volume per pose): the scalar shape, box and sample arguments are unused
    # (the launcher passes 1s and 0s: size_i, size_j, size_k and stride_j become constexpr 1).
    pool_ones = ("size_i", "size_j", "size_k", "stride_i", "stride_j")
    for int64 in (False, True):
        tag = "i64" if int64 else "i32"
        specs[f"fwd-pool-fp32-{tag}"] = _forward("fp32", "fp32", int64, ones=pool_ones, pool=True)
        specs[f"bwd-pool-pose1-vol1-det0-fp32-{tag}"] = _backward(
            "fp32", "fp32", int64, True, True, False, ones=pool_ones, pool=True
        )
    specs["fwd-pool-bf16-i32"] = _forward("bf16", "fp32", False, ones=pool_ones, pool=True)
    specs["bwd-pool-pose0-vol1-det1-fp32-i32"] = _backward("fp32", "fp32", False, False, True, True, ones=pool_ones, pool=True)
    specs["fwd-pool-soft-c5-fp32-i32"] = _forward("fp32", "fp32", False, ones=pool_ones, channels=5, soft=True, pool=True)
    specs["bwd-pool-hard-c5-pose1-vol1-det0-fp32-i32"] = _backward(
        "fp32", "fp32", False, True, True, False, ones=pool_ones, channels=5, pool=True
    )
    # Empty-space skipping (a brick lookup per sample masks the gathers), pose gradients only.
    specs["fwd-skip-fp32-i32"] = _forward("fp32", "fp32", False, block_r=16, block_s=16, skip=True)
    specs["fwd-skip-bf16-i64"] = _forward("bf16", "fp32", True, block_r=16, block_s=16, skip=True)
    specs["fwd-skip-hard-c5-fp32-i32"] = _forward("fp32", "fp32", False, block_r=64, block_s=16, channels=5, skip=True)
    specs["fwd-skip-soft-c5-fp32-i32"] = _forward(
        "fp32", "fp32", False, block_r=64, block_s=16, channels=5, soft=True, skip=True
    )
    specs["bwd-skip-pose1-vol0-det0-fp32-i32"] = _backward("fp32", "fp32", False, True, False, False, block_s=16, skip=True)
    specs["bwd-skip-pose1-vol0-det0-fp32-i64"] = _backward("fp32", "fp32", True, True, False, False, block_s=16, skip=True)
    specs["bwd-skip-soft-c5-pose1-vol0-det0-fp32-i32"] = _backward(
        "fp32", "fp32", False, True, False, False, block_s=16, channels=5, soft=True, skip=True
    )
    return specs


def compile_all(specs: dict, argv: list[str]) -> int:
    """Compile ``specs`` (name -> (kernel, signature, constexprs)) for sm_90, one line per
    specialisation; ``argv``: ``--list`` and name substrings. 1 if any failed. The Siddon and exact
    kernels' scripts (tests/renderers/*/compile_*_sm90.py) run their specialisations through it."""
    wanted = [a for a in argv if not a.startswith("--")]
    names = [n for n in specs if not wanted or any(w in n for w in wanted)]
    if "--list" in argv:
        print("\n".join(names))
        return 0
    failed = 0
    for name in names:
        kernel, sig, const = specs[name]
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(kernel, sig, const), target=TARGET, options={"num_warps": 4})
            if "cubin" not in compiled.asm:
                raise RuntimeError("no cubin produced")
            print(f"ok {name} {time.perf_counter() - start:.2f}s", flush=True)
        except Exception as exc:  # report every failure, not just the first
            failed += 1
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            print(f"FAIL {name}: {detail[:2000]}", flush=True)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    return compile_all(specialisations(), argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
