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
tutorials) run when those packages are importable and are skipped otherwise; DiffDRR's uses its
trilinear renderer (its tutorial's) and a placeholder for ``timm``, which only its pose
regressor needs.
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


def _adam_loop(params, loss_fn, lr, max_iterations=300, patience=10, n_decays=5):
    """tritondrr's Adam schedule for a peer's parameters: per-group learning rates, and on a plateau of
    ``patience`` iterations a restart from the best parameters with halved rates, ``n_decays`` times.
    Returns (iterations, converged)."""
    import torch

    opt = torch.optim.Adam([{"params": [p], "lr": r} for p, r in zip(params, lr)])
    best, since, decays = float("inf"), 0, 0
    best_params = [p.detach().clone() for p in params]
    for it in range(max_iterations):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        value = float(loss)
        if value < best * (1 - 1e-6) - 1e-12:
            best, since, best_params = value, 0, [p.detach().clone() for p in params]
        else:
            since += 1
        opt.step()
        if since >= patience:
            decays, since = decays + 1, 0
            if decays > n_decays:
                break
            with torch.no_grad():
                for p, b in zip(params, best_params):
                    p.copy_(b)
            for group in opt.param_groups:
                group["lr"] *= 0.5
    with torch.no_grad():
        for p, b in zip(params, best_params):
            p.copy_(b)
    return it + 1, decays > n_decays


def _run_nanodrr(args, drr, starts, euler):
    """nanodrr's Registration (its renderer, 500 samples per ray, its NCC) on the same task: the X-ray is
    rendered by nanodrr at the target pose, the starts are the same camera poses; Adam with tritondrr's
    schedule and learning rates (nanodrr's perturbation is an so(3) vector in radians and mm)."""
    import numpy as np
    import torch
    import torchio
    from nanodrr.camera import make_rt_inv
    from nanodrr.data import Subject
    from nanodrr.drr import DRR
    from nanodrr.metrics import NormalizedCrossCorrelation2d
    from nanodrr.registration import Registration

    from tritondrr import RigidTransform
    from tritondrr.registration.optimize import pose_errors

    det = drr.detector
    image = torchio.ScalarImage(
        tensor=drr.density.detach().cpu()[None].clone(), affine=drr._affine[0].double().cpu().numpy().astype(np.float64)
    )
    subject = Subject.from_images(image, convert_to_mu=False).to(args.device)
    nano = DRR.from_carm_intrinsics(
        det.sdd, det.delx, det.dely, *det.offsets, det.height, det.width, device=args.device
    )

    def rt_inv(rot, trans):  # ZXY radians -> nanodrr's camera-to-world, DiffDRR's AP convention
        return make_rt_inv(torch.rad2deg(rot), trans, orientation="AP").to(args.device)

    true_rt = rt_inv(torch.zeros(1, 3), torch.tensor([[0.0, 850.0, 0.0]]))
    with torch.no_grad():
        xray = nano(subject, true_rt)
    ncc = NormalizedCrossCorrelation2d()
    rows = []
    for rot, trans in starts:
        start_rt = rt_inv(rot.cpu(), trans.cpu())
        reg = Registration(subject, start_rt, nano.k_inv, nano.sdd, det.height, det.width)
        t0 = time.perf_counter()
        loss = lambda reg=reg: 1 - ncc(reg(), xray).mean()
        iterations, converged = _adam_loop([reg._rot, reg._xyz], loss, lr=(1e-2, 1.0))
        wall = time.perf_counter() - t0
        with torch.no_grad():
            r0, t0_err = pose_errors(RigidTransform(start_rt), RigidTransform(true_rt))
            r_err, t_err = pose_errors(RigidTransform(reg.pose.detach()), RigidTransform(true_rt))
        rows.append(
            {
                "start_rotation_error_deg": float(r0[0]),
                "start_translation_error_mm": float(t0_err[0]),
                "rotation_error_deg": float(r_err[0]),
                "translation_error_mm": float(t_err[0]),
                "success": bool(r_err[0] < 1.0 and t_err[0] < 1.0),
                "converged": converged,
                "iterations": iterations,
                "renders": iterations,
                "time_s": wall,
            }
        )
        print(f"  nanodrr: {rows[-1]}", file=sys.stderr)
    return rows


def _import_diffdrr_registration():
    """DiffDRR 0.6.1's ``Registration``. Its module also defines ``PoseRegressor``, whose import of
    ``timm`` (and through it torchvision) is all that fails on a CPU-only torch; ``Registration``
    never touches it, so an empty placeholder stands in for ``timm`` when it is not installed."""
    import importlib.util
    import types

    if "timm" not in sys.modules and importlib.util.find_spec("timm") is None:
        sys.modules.setdefault("timm", types.ModuleType("timm"))
    from diffdrr.registration import Registration

    return Registration


def _run_diffdrr(args, drr, starts, euler):
    """DiffDRR's ``Registration`` with its trilinear renderer (DiffDRR's tutorial setting) on the same
    task: DiffDRR's subject read from the same phantom (HU, DiffDRR's density rule), its X-ray rendered
    by DiffDRR at the target pose, the same starts; Adam with tritondrr's schedule and learning rates.
    The NCC is tritondrr's (DiffDRR's metrics module needs torchvision; the two are the same
    formula, tests/registration/test_metrics.py)."""
    import torch
    import torchio
    from diffdrr.data import read
    from diffdrr.drr import DRR

    import tritondrr as td
    from tritondrr.metrics import NormalizedCrossCorrelation2d
    from tritondrr.registration.optimize import pose_errors

    Registration = _import_diffdrr_registration()
    phantom = td.load_example_ct(shape=tuple(args.shape))
    hu = phantom.volume.detach().as_subclass(torch.Tensor).float().clone()
    image = torchio.ScalarImage(tensor=hu[None], affine=phantom.affine.double().cpu().numpy())
    det = drr.detector
    ddrr = DRR(read(image), sdd=det.sdd, height=det.height, delx=det.delx, renderer="trilinear").to(args.device)
    true_rot = torch.zeros(1, 3, device=args.device)
    true_trans = torch.tensor([[0.0, 850.0, 0.0]], device=args.device)
    with torch.no_grad():
        xray = ddrr(true_rot, true_trans, **euler)
    true_pose = td.convert(true_rot, true_trans, **euler)
    ncc = NormalizedCrossCorrelation2d()
    rows = []
    for rot, trans in starts:
        reg = Registration(ddrr, rot.clone(), trans.clone(), **euler)
        t0 = time.perf_counter()
        loss = lambda reg=reg: 1 - ncc(reg(), xray).mean()  # noqa: E731
        iterations, converged = _adam_loop([reg._rotation, reg._translation], loss, lr=(1e-2, 1.0))
        wall = time.perf_counter() - t0
        with torch.no_grad():
            r0, t0_err = pose_errors(td.convert(rot, trans, **euler), true_pose)
            r_err, t_err = pose_errors(td.convert(reg.rotation.detach(), reg.translation.detach(), **euler), true_pose)
        rows.append(
            {
                "start_rotation_error_deg": float(r0[0]),
                "start_translation_error_mm": float(t0_err[0]),
                "rotation_error_deg": float(r_err[0]),
                "translation_error_mm": float(t_err[0]),
                "success": bool(r_err[0] < 1.0 and t_err[0] < 1.0),
                "converged": converged,
                "iterations": iterations,
                "renders": iterations,
                "time_s": wall,
            }
        )
        print(f"  diffdrr: {rows[-1]}", file=sys.stderr)
    return rows


def _run_peer(name, args, drr, starts, euler):
    """A peer's row, or why it is skipped."""
    try:
        if name == "diffdrr":
            from diffdrr.drr import DRR  # noqa: F401

            _import_diffdrr_registration()
        else:
            import nanodrr.registration  # noqa: F401
            import torchio  # noqa: F401
    except ImportError as e:
        return {"skipped": f"{name} not importable: {e}"}
    if name == "nanodrr":
        return _summary(_run_nanodrr(args, drr, starts, euler))
    return _summary(_run_diffdrr(args, drr, starts, euler))


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
            results[method] = _run_peer(method, args, drr, starts, euler)
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
            "peers": _versions("diffdrr", "nanodrr"),
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


def _versions(*names):
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _commit():
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    main()
