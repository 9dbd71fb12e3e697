"""Registration benchmark: success rate and time to converge from a fixed set of random starts.

    python bench/registration.py --output bench/results/registration-cpu.json
    python bench/registration.py --device cuda --height 200 --shape 256 256 133 --starts 50 --output ...

The task: the example phantom (``load_example_ct``), an X-ray simulated by the same renderer at a
target pose, and ``--starts`` initial poses drawn with a fixed seed around it: a rotation about a
random axis by an angle uniform in [0, ``--max-rotation``] degrees and a translation in a random
direction of length uniform in [0, ``--max-translation``] mm. A start succeeds when the final
rotation error is below 1 degree and the translation error below 1 mm (camera-frame
translations, ``tritondrr.registration.optimize.pose_errors``). Each method uses its defaults
(NCC); the time to converge is the wall time of the whole ``register`` call (coarse levels
included). Rows for DiffDRR's and nanodrr's ``Registration`` (Adam on NCC, as in their
tutorials) run when those packages are importable and are skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--starts", type=int, default=20, help="number of random starts (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starts (default 0)")
    p.add_argument("--height", type=int, default=32, help="detector rows and columns (default 32)")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 64, 32), help="phantom voxels (default 64 64 32)")
    p.add_argument("--max-rotation", type=float, default=10.0, help="degrees (default 10)")
    p.add_argument("--max-translation", type=float, default=20.0, help="mm (default 20)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--methods", nargs="+", default=["tritondrr-lm", "tritondrr-adam", "diffdrr", "nanodrr"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the CPU ray marcher (TRITONDRR_COMPILE=1)")
    return p.parse_args(argv)


def _starts(n, seed, max_rot_deg, max_trans_mm):
    """(axis-angle rotations (n, 3) in radians, translation offsets (n, 3) in mm), fixed by the seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    axes = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    angles = torch.rand(n, 1, generator=g, dtype=torch.float64) * math.radians(max_rot_deg)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    lengths = torch.rand(n, 1, generator=g, dtype=torch.float64) * max_trans_mm
    return axes * angles, dirs * lengths


def _task(args):
    import torch

    import tritondrr as td

    subject = td.load_example_ct(shape=tuple(args.shape))
    drr = td.DRR(subject, sdd=1020.0, height=args.height, delx=400.0 / args.height, backend=args.backend)
    drr = drr.to(args.device)
    true_rot = torch.tensor([[0.0, 0.0, 0.0]], device=args.device)
    true_trans = torch.tensor([[0.0, 850.0, 0.0]], device=args.device)
    euler = {"parameterization": "euler_angles", "convention": "ZXY"}
    with torch.no_grad():
        xray = drr(true_rot, true_trans, **euler)
    true_pose = td.convert(true_rot, true_trans, **euler)
    perturb, offsets = _starts(args.starts, args.seed, args.max_rotation, args.max_translation)
    starts = []
    for w, dt in zip(perturb, offsets):
        # Rotate the camera about the volume centre by w (after the target rotation); offset t.
        R = (
            true_pose.rotation.cpu()
            @ td.convert(w[None].float(), torch.zeros(1, 3), parameterization="axis_angle").rotation
        )
        rot, _ = td.convert(R, torch.zeros(1, 3), parameterization="matrix").convert(**euler)
        starts.append((rot.to(args.device), true_trans + dt[None].float().to(args.device)))
    return drr, xray, true_pose, starts, euler


def _run_tritondrr(optimizer, drr, xray, true_pose, starts, euler, device):
    import torch

    from tritondrr import convert
    from tritondrr.registration import register
    from tritondrr.registration.optimize import pose_errors

    rows = []
    for rot, trans in starts:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = register(drr, xray, rot, trans, optimizer=optimizer, **euler)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        rot_err, trans_err = pose_errors(result.pose, true_pose)
        start_rot, start_trans = pose_errors(convert(rot, trans, **euler), true_pose)
        rows.append(
            {
                "start_rotation_error_deg": float(start_rot[0]),
                "start_translation_error_mm": float(start_trans[0]),
                "rotation_error_deg": float(rot_err[0]),
                "translation_error_mm": float(trans_err[0]),
                "success": bool(rot_err[0] < 1.0 and trans_err[0] < 1.0),
                "converged": result.converged,
                "iterations": result.iterations,
                "renders": result.evaluations,
                "time_s": wall,
            }
        )
        print(f"  {optimizer}: {rows[-1]}", file=sys.stderr)
    return rows


def _run_peer(name, args, true_pose, starts, euler):
    """DiffDRR's / nanodrr's Registration with Adam on NCC, when importable (not installed here)."""
    try:
        if name == "diffdrr":
            from diffdrr.data import load_example_ct  # noqa: F401
            from diffdrr.drr import DRR  # noqa: F401
            from diffdrr.metrics import NormalizedCrossCorrelation2d  # noqa: F401
            from diffdrr.registration import Registration  # noqa: F401
        else:
            import nanodrr  # noqa: F401
    except ImportError as e:
        return {"skipped": f"{name} not importable: {e}"}
    return {"skipped": f"{name} is importable but its row is not implemented in this script yet"}


def _summary(rows):
    if not rows or "skipped" in rows:
        return rows
    ok = [r for r in rows if r["success"]]
    return {
        "success_rate": len(ok) / len(rows),
        "median_time_s": statistics.median(r["time_s"] for r in rows),
        "mean_time_s": statistics.fmean(r["time_s"] for r in rows),
        "median_iterations": statistics.median(r["iterations"] for r in rows),
        "mean_iterations": statistics.fmean(r["iterations"] for r in rows),
        "median_time_successful_s": statistics.median(r["time_s"] for r in ok) if ok else None,
        "runs": rows,
    }


def main(argv=None):
    args = _parse(argv)
    os.environ["TRITONDRR_COMPILE"] = "1" if args.compile else "0"
    import torch

    import tritondrr as td

    torch.set_num_threads(args.threads)
    drr, xray, true_pose, starts, euler = _task(args)
    results = {}
    for method in args.methods:
        print(f"{method} ...", file=sys.stderr)
        if method in ("tritondrr-lm", "tritondrr-adam"):
            optimizer = method.split("-")[1]
            results[method] = _summary(_run_tritondrr(optimizer, drr, xray, true_pose, starts, euler, args.device))
        elif method in ("diffdrr", "nanodrr"):
            results[method] = _run_peer(method, args, true_pose, starts, euler)
        else:
            raise SystemExit(f"--methods: unknown method {method!r}")
    lm, adam = results.get("tritondrr-lm"), results.get("tritondrr-adam")
    derived = {}
    if lm and adam and "mean_iterations" in lm and "mean_iterations" in adam:
        derived["lm_over_adam_iterations"] = lm["mean_iterations"] / adam["mean_iterations"]
        derived["adam_over_lm_time"] = adam["median_time_s"] / lm["median_time_s"]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    report = {
        "task": {
            "phantom_shape": list(args.shape),
            "detector": [args.height, args.height],
            "delx_mm": 400.0 / args.height,
            "sdd_mm": 1020.0,
            "target_pose": dict(rotations=[0.0, 0.0, 0.0], translations=[0.0, 850.0, 0.0], **euler),
            "starts": args.starts,
            "seed": args.seed,
            "max_rotation_deg": args.max_rotation,
            "max_translation_mm": args.max_translation,
            "success": "rotation error < 1 deg and translation error < 1 mm",
            "metric": "ncc",
        },
        "machine": {
            "device": args.device,
            "backend": args.backend,
            "compile": args.compile,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "load_average": load,
            "torch": torch.__version__,
            "tritondrr": td.__version__,
            "python": platform.python_version(),
            "commit": _commit(),
        },
        "derived": derived,
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    for method, res in results.items():
        if "success_rate" in res:
            print(
                f"{method:16s} success {res['success_rate']:.0%}  median time {res['median_time_s']:.2f} s  "
                f"mean iterations {res['mean_iterations']:.1f}"
            )
        else:
            print(f"{method:16s} {res.get('skipped')}")
    if derived:
        print(
            f"LM / Adam iterations {derived['lm_over_adam_iterations']:.3f}; Adam / LM time {derived['adam_over_lm_time']:.2f}"
        )
    print(f"wrote {args.output}")


def _commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    main()
