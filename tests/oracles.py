"""Independent oracles for the renderers, written without any tritondrr code.

``exact_line_integrals`` integrates the trilinear (tent) interpolant of the zero-extended grid
exactly along segments: between two consecutive crossings of the ray with the planes through
voxel centres (i = n, j = n or k = n for integer n) the interpolant is a product of three affine
functions of t, a cubic, so Simpson's rule on each such piece is exact. The interpolant is
evaluated by an explicit 8-corner gather (not ``grid_sample``), in float64.
"""

from __future__ import annotations

import torch


def trilinear(density: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Tent interpolant of the zero-extended grid at index-space ``points`` (..., 3), float64."""
    density = density.double()
    shape = torch.tensor(density.shape, device=points.device)
    base = torch.floor(points)
    frac = points - base
    base = base.long()
    out = torch.zeros(points.shape[:-1], dtype=torch.float64, device=points.device)
    for corner in range(8):
        offset = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], device=points.device)
        idx = base + offset
        weight = torch.where(offset.bool(), frac, 1.0 - frac).prod(dim=-1)
        inside = ((idx >= 0) & (idx < shape)).all(dim=-1)
        idx = torch.where(inside[..., None], idx, torch.zeros_like(idx))
        out += torch.where(inside, weight * density[idx[..., 0], idx[..., 1], idx[..., 2]], 0.0)
    return out


def exact_line_integrals(
    density: torch.Tensor,
    affine: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    chunk: int = 256,
) -> torch.Tensor:
    """Exact integral (density x mm) of the interpolant along each segment from source to target.

    Args:
        density: (I, J, K) voxel values; voxel centres at integer indices.
        affine: (4, 4) voxel index -> world mm.
        source: (N, 3) or (1, 3) world mm; target: (N, 3) world mm.

    Returns:
        (N,) float64.
    """
    density = density.detach().double().cpu()
    affine = affine.detach().double().cpu()
    target = target.detach().double().cpu().reshape(-1, 3)
    source = source.detach().double().cpu().reshape(-1, 3).expand_as(target)
    inverse = torch.linalg.inv(affine)
    s = source @ inverse[:3, :3].T + inverse[:3, 3]
    e = target @ inverse[:3, :3].T + inverse[:3, 3]
    length_mm = (target - source).norm(dim=-1)
    planes = [torch.arange(-1, n + 1, dtype=torch.float64) for n in density.shape]
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
        breaks = torch.sort(torch.cat(ts, dim=1), dim=1).values  # [R, M]
        a, b = breaks[:, :-1], breaks[:, 1:]
        h = b - a
        fa = trilinear(density, s_c[:, None] + a[..., None] * d_c[:, None])
        fm = trilinear(density, s_c[:, None] + (0.5 * (a + b))[..., None] * d_c[:, None])
        fb = trilinear(density, s_c[:, None] + b[..., None] * d_c[:, None])
        out[rows] = (h / 6.0 * (fa + 4.0 * fm + fb)).sum(dim=1)
    return out * length_mm
