"""``tritondrr generate OUT``: render a sharded DRR dataset, in one process or under torchrun.

Layout of OUT::

    manifest.json        geometry, seed, sampler, subjects, shard list, versions (rank 0, last)
    shard-000000.npz     images (n, C, H, W) float32, pose_index (n,) int64, poses (n, 4, 4)
                         float32 world matrices, subject_index (n,) int64 with several subjects,
                         settings (the settings' SHA-256, to recognise a shard on rerun)

Pose index g in [0, S N) (S subjects, N = --poses per subject) is subject g // N at pose g of
the sampler (a pose file's pose g mod N). Shard s holds g in [s K, (s + 1) K) (K = --shard-size).
Rank 0 lists the shards still missing (a shard counts as finished when its zip directory, pose
indices, image header and size check out) and splits them into contiguous blocks, one per rank;
each shard is rendered whole by one rank, written to a temporary name in OUT and renamed, so a
killed run leaves whole shards only and a rerun of the same command renders what is missing.
Every image depends only on (settings, g): the same command gives the same bytes for every pose
index whatever the number of processes (same device type and backend).

Multi-process: ``torchrun --nproc_per_node P -m tritondrr generate OUT ...`` (any number of
nodes; OUT on a file system all nodes share). torch.distributed starts only when WORLD_SIZE > 1,
with gloo on CPU and nccl on CUDA (each rank renders on cuda:LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import socket
import sys
import time
import zipfile
from pathlib import Path

__all__ = ["add_arguments", "run"]

FORMAT = "tritondrr-drr-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

_EPILOG = """\
poses: --sampler uniform draws each of the six pose parameters uniformly in [LO, HI]
(--r1 .. --tz LO HI); --sampler normal draws them normally (--r1 .. --tz MEAN STD). r1, r2, r3
are ZXY Euler angles in degrees (r1 about z, the patient's long axis, relative to the view:
AP 0, PA 180); tx, ty, tz are translations in mm (ty: source to volume centre). Defaults:
uniform r1 -45 45, r2 -45 45, r3 -15 15, tx -150 150, ty 450 1000, tz -150 150;
normal r1 0 15, r2 0 15, r3 0 5, tx 0 50, ty 850 90, tz 0 50. --pose-file replaces the sampler.

examples:
  tritondrr generate data --poses 1000 --height 256 --delx 1.6 --sdd 1020 --shard-size 250 --seed 0
  torchrun --nproc_per_node 4 -m tritondrr generate data --subjects ct1.nii.gz ct2.nii.gz \\
      --poses 5000 --height 128 --delx 2.2 --sampler normal --view PA
"""


class ArgumentError(ValueError):
    """A bad command-line value: reported as one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``generate`` sub-command's arguments (``cli.py`` adds the sub-parser)."""
    parser.description = "Render a sharded DRR dataset (one process, or torchrun for many)."
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter

    def one_line_error(message):  # argparse's own errors also fit on one line
        print(f"tritondrr generate: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    parser.add_argument("out", metavar="OUT", help="output directory (created; a rerun completes it)")
    parser.add_argument(
        "--subjects",
        nargs="+",
        metavar="FILE",
        default=None,
        help="CT volumes in HU (.nrrd, .nhdr, .nii, .nii.gz). Default: the built-in chest phantom",
    )
    parser.add_argument(
        "--phantom-shape",
        nargs=3,
        type=int,
        metavar=("I", "J", "K"),
        default=None,
        help="voxels of the built-in phantom (default 256 256 133)",
    )
    parser.add_argument(
        "--poses", metavar="N", type=int, default=None, help="poses per subject (default: all of --pose-file)"
    )
    parser.add_argument("--height", metavar="H", type=int, default=256, help="detector rows (default: 256)")
    parser.add_argument("--width", metavar="W", type=int, default=None, help="detector columns (default: --height)")
    parser.add_argument("--delx", metavar="MM", type=float, default=1.6, help="pixel size in mm (default: 1.6)")
    parser.add_argument(
        "--sdd", metavar="MM", type=float, default=1020.0, help="source-to-detector distance in mm (default: 1020)"
    )
    parser.add_argument("--shard-size", metavar="K", type=int, default=256, help="DRRs per shard file (default: 256)")
    parser.add_argument(
        "--seed", metavar="SEED", type=int, default=0, help="pose seed; pose g is a function of (seed, g) (default: 0)"
    )
    parser.add_argument("--batch-size", metavar="B", type=int, default=16, help="poses per render call (default: 16)")
    parser.add_argument(
        "--device",
        metavar="DEVICE",
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda:LOCAL_RANK when CUDA is available, else cpu)",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="auto: Triton kernels on CUDA, PyTorch elsewhere (default: auto)",
    )
    parser.add_argument(
        "--sampler", choices=("uniform", "normal"), default=None, help="pose distribution (default: uniform)"
    )
    parser.add_argument(
        "--view", choices=("AP", "PA"), default="AP", help="centre view; PA turns r1 by 180 deg (default: AP)"
    )
    for name, what in (("r1", "deg"), ("r2", "deg"), ("r3", "deg"), ("tx", "mm"), ("ty", "mm"), ("tz", "mm")):
        parser.add_argument(
            f"--{name}",
            nargs=2,
            type=float,
            metavar=("A", "B"),
            default=None,
            help=f"{what}: LO HI (uniform) or MEAN STD (normal)",
        )
    parser.add_argument(
        "--pose-file",
        metavar="F",
        default=None,
        help="poses to render instead of a sampler: .npy/.pt (N, 4, 4) world matrices or (N, 6) "
        "ZXY degrees + mm rows, .npz with 'poses', .txt/.csv with 16 or 6 numbers a line",
    )
    parser.add_argument(
        "--n-samples",
        metavar="S",
        type=int,
        default=None,
        help="samples per ray (default: from the volume's voxel size)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="do not compile the CPU ray marcher with torch.compile (the library default compiles: "
        "10-60 s once per process, then several times faster)",
    )


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
def _positive_int(name, value):
    if value is not None and not value >= 1:
        raise ArgumentError(f"--{name} must be a positive integer, got {value}")


def _positive_float(name, value):
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ArgumentError(f"--{name} must be a positive number, got {value}")


def _settings(args):
    """Validate the arguments; returns (settings dict, sampler, subjects list, device).

    Raises ArgumentError with a one-line message naming the flag."""
    import torch

    from ..phantom import EXAMPLE_SHAPE
    from .samplers import SAMPLERS, FixedPoseSampler, load_pose_file

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"OUT {str(out)!r} is a file, expected a directory")
    for name in ("poses", "height", "width", "shard_size", "batch_size", "n_samples"):
        _positive_int(name.replace("_", "-"), getattr(args, name))
    for name in ("delx", "sdd"):
        _positive_float(name, getattr(args, name))
    if args.seed < 0:
        raise ArgumentError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.seed >= 2**63:
        raise ArgumentError(f"--seed must be below 2**63, got {args.seed}")

    if args.subjects is not None:
        if args.phantom_shape is not None:
            raise ArgumentError("--phantom-shape applies to the built-in phantom, not to --subjects files")
        for path in args.subjects:
            if not Path(path).is_file():
                raise ArgumentError(f"--subjects: {path!r} does not exist or is not a file")
        subjects = [{"kind": "file", "path": str(p), "bytes": Path(p).stat().st_size} for p in args.subjects]
    else:
        shape = tuple(args.phantom_shape or EXAMPLE_SHAPE)
        if min(shape) < 2:
            raise ArgumentError(f"--phantom-shape must be three voxel counts >= 2, got {list(shape)}")
        subjects = [{"kind": "phantom", "shape": list(shape)}]

    ranges = {n: getattr(args, n) for n in ("r1", "r2", "r3", "tx", "ty", "tz")}
    if args.pose_file is not None:
        if args.sampler is not None or any(v is not None for v in ranges.values()):
            raise ArgumentError("--pose-file replaces the sampler: drop --sampler and --r1 .. --tz")
        try:
            sampler = load_pose_file(args.pose_file)
        except (FileNotFoundError, ValueError) as e:
            raise ArgumentError(f"--pose-file: {e}") from None
        poses = len(sampler) if args.poses is None else args.poses
        if poses > len(sampler):
            raise ArgumentError(f"--poses {poses} exceeds the {len(sampler)} poses of --pose-file {args.pose_file!r}")
        # The first N poses; every subject is rendered at each of them.
        sampler = FixedPoseSampler(sampler.matrices[:poses], source=sampler.source)
        spec = sampler.to_dict()
        spec["sha256"] = hashlib.sha256(sampler.matrices.numpy().tobytes()).hexdigest()
    else:
        if args.poses is None:
            raise ArgumentError("--poses is required (poses per subject) unless --pose-file is given")
        poses = args.poses
        kind = SAMPLERS[args.sampler or "uniform"]
        sampler = kind(view=args.view, seed=args.seed)
        pairs = list(sampler.rotations) + list(sampler.translations)
        for k, name in enumerate(("r1", "r2", "r3", "tx", "ty", "tz")):
            if ranges[name] is None:
                continue
            a, b = ranges[name]
            if not (math.isfinite(a) and math.isfinite(b)):
                raise ArgumentError(f"--{name} must be two finite numbers, got {a} {b}")
            if kind.name == "uniform" and not a <= b:
                raise ArgumentError(f"--{name} LO HI must have LO <= HI for --sampler uniform, got {a} {b}")
            if kind.name == "normal" and not b >= 0:
                raise ArgumentError(f"--{name} MEAN STD must have STD >= 0 for --sampler normal, got {a} {b}")
            pairs[k] = (a, b)
        sampler = kind(pairs[:3], pairs[3:], view=args.view, seed=args.seed)
        spec = sampler.to_dict()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if args.device is None:
            from .dataset import default_device

            device = default_device()
        else:
            device = torch.device(args.device)
    except RuntimeError as e:
        raise ArgumentError(f"--device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"--device {args.device}: CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    elif world > 1 and device.type not in ("cpu",):
        raise ArgumentError(f"--device {args.device}: torchrun needs cpu (gloo) or cuda (nccl) devices")

    height = args.height
    settings = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "geometry": {
            "sdd": args.sdd,
            "height": height,
            "width": args.width or height,
            "delx": args.delx,
            "dely": args.delx,
            "x0": 0.0,
            "y0": 0.0,
            "reverse_x_axis": True,
        },
        "n_samples": args.n_samples,
        "subjects": subjects,
        "sampler": spec,
        "seed": args.seed,
        "poses_per_subject": poses,
        "total": poses * len(subjects),
        "shard_size": args.shard_size,
        "image_shape": [1, height, args.width or height],
    }
    return settings, sampler, device


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------
def shard_name(s: int) -> str:
    return f"shard-{s:06d}.npz"


def _shard_range(s: int, settings: dict) -> tuple[int, int]:
    k, total = settings["shard_size"], settings["total"]
    return s * k, min(total, (s + 1) * k)


def _read_member(z: zipfile.ZipFile, name: str):
    import numpy as np

    with z.open(name) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def shard_is_complete(path: Path, first: int, count: int, fingerprint: str, image_shape, several: bool) -> bool:
    """True when ``path`` is a whole shard of these settings holding pose indices first..first+count-1.

    Checks the zip directory (at the end of the file: a truncated file has none), the settings
    hash, the pose indices, and the images' header and byte size; it does not read the images."""
    import numpy as np

    names = {"images.npy", "pose_index.npy", "poses.npy", "settings.npy"}
    if several:
        names.add("subject_index.npy")
    try:
        with zipfile.ZipFile(path) as z:
            if not names <= set(z.namelist()):
                return False
            if str(_read_member(z, "settings.npy")) != fingerprint:
                return False
            if not np.array_equal(_read_member(z, "pose_index.npy"), np.arange(first, first + count, dtype=np.int64)):
                return False
            if _read_member(z, "poses.npy").shape != (count, 4, 4):
                return False
            info = z.getinfo("images.npy")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                fmt = np.lib.format
                read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = read_header(f)
                header = f.tell()
            expected = (count, *image_shape)
            return shape == expected and dtype == np.float32 and info.file_size == header + 4 * math.prod(expected)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return False


def _complete(out: Path, s: int, settings: dict, fingerprint: str) -> bool:
    first, end = _shard_range(s, settings)
    several = len(settings["subjects"]) > 1
    return shard_is_complete(out / shard_name(s), first, end - first, fingerprint, settings["image_shape"], several)


def _write_shard(out: Path, s: int, arrays: dict) -> None:
    """Write to a temporary name in OUT, flush to disk, then rename: readers never see a partial shard."""
    import numpy as np

    final = out / shard_name(s)
    tmp = out / f".{shard_name(s)}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _scan(out: Path, settings: dict, fingerprint: str) -> tuple[list[int], int, str | None]:
    """Rank 0: (shards to render, shards already complete, error message or None)."""
    path = out / MANIFEST
    if path.is_file():
        try:
            with open(path) as f:
                old = json.load(f).get("settings", {})
        except (OSError, ValueError):
            old = None
        if old is not None and old != settings:
            keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            return (
                [],
                0,
                (
                    f"OUT {str(out)!r} holds a dataset made with other settings (different: {', '.join(keys)}); "
                    "choose another OUT or repeat the original command"
                ),
            )
    for pattern in (".shard-*.tmp", f".{MANIFEST}.*.tmp"):  # left by a killed run, not by this one
        for stray in out.glob(pattern):
            stray.unlink(missing_ok=True)
    n_shards = -(-settings["total"] // settings["shard_size"])
    todo = [s for s in range(n_shards) if not _complete(out, s, settings, fingerprint)]
    return todo, n_shards - len(todo), None


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
class _Progress:
    """tqdm on rank 0 when installed, else a line on stderr."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled, self.done = total, label, enabled, 0
        self.start = self.shown = time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, unit="DRR", file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        tty = sys.stderr.isatty()
        if self.done < self.total and now - self.shown < (0.5 if tty else 10.0):
            return
        self.shown = now
        rate = self.done / max(now - self.start, 1e-9)
        end = "\r" if tty and self.done < self.total else "\n"
        print(f"{self.label}: {self.done}/{self.total} DRRs, {rate:.2f} DRRs/s", end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def run(args, parser=None) -> int:
    """Run ``tritondrr generate``; returns the exit status (2 for bad arguments)."""
    if args.no_compile:
        os.environ["TRITONDRR_COMPILE"] = "0"
    try:
        settings, sampler, device = _settings(args)
    except ArgumentError as e:
        print(f"tritondrr generate: error: {e}", file=sys.stderr)
        return 2

    import numpy as np
    import torch
    import torch.distributed as dist

    from .. import __version__
    from ..phantom import load_example_ct
    from .dataset import DRRDataset

    out = Path(args.out)
    fingerprint = _fingerprint(settings)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
    else:
        rank = 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Rank 0 decides what is missing; every rank gets the same list.
        plan = [_scan(out, settings, fingerprint) if rank == 0 else None]
        if distributed:
            dist.broadcast_object_list(plan, src=0)
        todo, already, error = plan[0]
        if error is not None:
            if rank == 0:
                print(f"tritondrr generate: error: {error}", file=sys.stderr)
            return 2
        mine = todo[rank * len(todo) // world : (rank + 1) * len(todo) // world]

        subjects = [
            s["path"] if s["kind"] == "file" else load_example_ct(shape=tuple(s["shape"])) for s in settings["subjects"]
        ]
        geometry = settings["geometry"]
        dataset = DRRDataset(
            subjects,
            sampler,
            settings["poses_per_subject"],
            sdd=geometry["sdd"],
            height=geometry["height"],
            width=geometry["width"],
            delx=geometry["delx"],
            dely=geometry["dely"],
            x0=geometry["x0"],
            y0=geometry["y0"],
            reverse_x_axis=geometry["reverse_x_axis"],
            device=device,
            batch_size=args.batch_size,
            cache_size=2,
            backend=args.backend,
            n_samples=settings["n_samples"],
        )
        several = len(subjects) > 1
        count = sum(_shard_range(s, settings)[1] - _shard_range(s, settings)[0] for s in mine)
        label = f"rank 0/{world}" if distributed else "generate"
        progress = _Progress(count, label, enabled=rank == 0)
        start = time.perf_counter()
        for s in mine:
            first, end = _shard_range(s, settings)
            parts = []
            for b in range(first, end, args.batch_size):
                idx = torch.arange(b, min(end, b + args.batch_size))
                images, poses, subject_index = dataset.render(idx)
                parts.append((images.cpu().numpy(), poses.numpy(), subject_index.numpy()))
                progress.update(len(idx))
            arrays = {
                "images": np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False),
                "pose_index": np.arange(first, end, dtype=np.int64),
                "poses": np.concatenate([p[1] for p in parts]).astype(np.float32, copy=False),
                "settings": np.array(fingerprint),
            }
            if several:
                arrays["subject_index"] = np.concatenate([p[2] for p in parts]).astype(np.int64, copy=False)
            _write_shard(out, s, arrays)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        progress.close()
        rendered = torch.tensor([count], dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
        if distributed:
            dist.barrier()
            dist.all_reduce(rendered)
        seconds = time.perf_counter() - start
        if rank == 0:
            status = _finish(out, settings, fingerprint, int(rendered), seconds, world, device, already, __version__)
        else:
            status = 0
        if distributed:
            flag = torch.tensor([status], device=rendered.device)
            dist.broadcast(flag, src=0)
            status = int(flag)
        return status
    finally:
        if distributed:
            dist.destroy_process_group()


def _finish(out, settings, fingerprint, rendered, seconds, world, device, already, version) -> int:
    """Rank 0, after every rank is done: check every shard, write the manifest atomically, report."""
    import numpy as np
    import torch

    n_shards = -(-settings["total"] // settings["shard_size"])
    shards = []
    for s in range(n_shards):
        first, end = _shard_range(s, settings)
        if not _complete(out, s, settings, fingerprint):
            print(f"tritondrr generate: error: {shard_name(s)} is missing or incomplete after the run", file=sys.stderr)
            return 1
        shards.append({"file": shard_name(s), "first": first, "count": end - first})
    rate = rendered / seconds if seconds > 0 else 0.0
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings_sha256": fingerprint,
        "settings": settings,
        "geometry": settings["geometry"],
        "seed": settings["seed"],
        "sampler": settings["sampler"],
        "subjects": settings["subjects"],
        "poses_per_subject": settings["poses_per_subject"],
        "total": settings["total"],
        "shard_size": settings["shard_size"],
        "image_shape": settings["image_shape"],
        "layout": "pose index g: subject g // poses_per_subject at sampler pose g; shard s: g in [s K, (s+1) K)",
        "shards": shards,
        "versions": {
            "tritondrr": version,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "last_run": {
            "world_size": world,
            "device": str(device),
            "rendered": rendered,
            "already_complete_shards": already,
            "seconds": round(seconds, 3),
            "drrs_per_second": round(rate, 3),
        },
    }
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)
    print(
        f"generated {rendered} DRRs ({already} of {n_shards} shards were already complete) in {seconds:.2f} s "
        f"with {world} process{'es' if world > 1 else ''} on {device.type}: {rate:.2f} DRRs/s; wrote {out / MANIFEST}"
    )
    return 0
