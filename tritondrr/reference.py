"""The PyTorch reference ray marcher: the product on CPU and MPS, the oracle for the Triton kernels.

Everything here works in *index space*: voxel ``(i, j, k)`` of ``density`` has its centre at the
integer point ``(i, j, k)``, and the density field is the trilinear (tent) interpolant of the
zero-extended grid,

    f(p) = sum_ijk V[i, j, k] * tent(p_0 - i) * tent(p_1 - j) * tent(p_2 - k),  tent(x) = max(0, 1 - |x|).

The function computed for a ray from ``s`` to ``e`` (index coordinates, ``t`` in [0, 1]) samples
the part of the ray inside ``box`` (an axis-aligned box ``[lo, hi]`` outside which ``f`` is known
to be zero) at ``S`` evenly spaced points, offset by the ray's own ``phase`` in [0, 1), with the
Euler-Maclaurin end correction that keeps the rule second order wherever the interval is cut:

    d = e - s                                         (components with |d| < TINY are set to TINY)
    t0 = max(0, max_a min((lo_a - s_a) / d_a, (hi_a - s_a) / d_a))
    t1 = min(1, min_a max((lo_a - s_a) / d_a, (hi_a - s_a) / d_a))
    L = max(t1 - t0, 0),  h = L / S
    g = h * [ sum_{k=0}^{S-1} f(s + (t0 + (k + phase) h) d)  -  (phase - 1/2) (f(s + t1 d) - f(s + t0 d)) ]

With ``phase = 1/2`` this is the midpoint rule. A phase that differs from ray to ray (``render``
hashes the pixel index) keeps the sampling errors of neighbouring pixels from lining up with the
voxel grid (moire), which otherwise biases the pose gradient of image-level losses.

``g`` approximates the integral of ``f`` over t in [0, 1]; multiplying by the ray's length in mm
gives the line integral in mm. ``S`` is the same for every ray of a call and never depends on
the pose, and the phase depends on the ray's identity only, so ``g`` is a smooth function of ``s``
and ``e`` (the clipped interval moves continuously, samples never appear or vanish). The Triton
kernels in ``tritondrr.kernels`` compute exactly this function; ``tests/test_triton.py`` holds
them to it.

Memory is bounded by chunking rays: at most ``chunk_samples`` samples are alive at a time, in
the forward and in the backward (which recomputes the samples of each chunk rather than storing
them), so any image size renders without ``patch_size``.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.nn.functional as F

__all__ = ["TINY", "clip_rays", "raymarch", "support_box", "occupied_box"]

_log = logging.getLogger("tritondrr")

#: Direction components smaller than this are replaced by it, so the slab test never divides by 0.
TINY = 1e-12

#: Default number of samples alive at once in the reference path (about 50 MB of float32 per chunk).
CHUNK_SAMPLES = 1 << 22


def support_box(shape: tuple[int, int, int]) -> tuple[list[float], list[float]]:
    """The support of the interpolant of a grid of ``shape``: ``[-1, I] x [-1, J] x [-1, K]``."""
    return [-1.0, -1.0, -1.0], [float(n) for n in shape]


def occupied_box(density: torch.Tensor) -> tuple[list[float], list[float]]:
    """The smallest box (index space) outside which the interpolant of ``density`` is zero.

    It is the bounding box of the non-zero voxels grown by one voxel (the tent's reach). A volume
    that is zero everywhere gets an empty box (``lo > hi``), so every ray renders 0. This reads
    the whole volume once; callers that render the same volume many times cache it.
    """
    lo, hi = [], []
    nonzero = density != 0
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        occupied = nonzero.any(dim=others[1]).any(dim=others[0]).to(torch.uint8)  # [n_axis]
        if not bool(occupied.any()):
            return [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]
        # argmax finds the first maximum: the first and (from the end) the last occupied slice.
        lo.append(float(occupied.argmax()) - 1.0)
        hi.append(float(occupied.numel() - 1 - occupied.flip(0).argmax()) + 1.0)
    return lo, hi


def clip_rays(source: torch.Tensor, target: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Clip rays to ``[0, 1]`` and to the box ``[lo, hi]``.

    Args:
        source: (..., 3) ray starts, index coordinates (broadcasts against ``target``).
        target: (..., 3) ray ends, index coordinates.
        lo, hi: (3,) box corners, index coordinates.

    Returns:
        ``(t0, length)``, each (...): the entry parameter and the clipped length in ``t``
        (``length`` is 0 for rays that miss the box).
    """
    d = target - source
    d = torch.where(d.abs() < TINY, torch.full_like(d, TINY), d)
    t_lo = (lo - source) / d
    t_hi = (hi - source) / d
    t0 = torch.minimum(t_lo, t_hi).amax(dim=-1).clamp(min=0.0)
    t1 = torch.maximum(t_lo, t_hi).amin(dim=-1).clamp(max=1.0)
    return t0, (t1 - t0).clamp(min=0.0)


def _grid(density, first, stride, n_samples):
    """Sample points of each ray as grid_sample's grid: (1, R, S, 1, 3)."""
    # grid_sample wants (x, y, z) = (k, j, i) normalised so that -1 and 1 are the outer faces of
    # the grid (align_corners=False); zero padding then makes it the zero-extended tent interpolant.
    scale = 2.0 / torch.tensor(density.shape[::-1], device=first.device, dtype=first.dtype)  # [3]
    first = first.flip(-1) * scale + (scale / 2 - 1)  # [R, 3]
    stride = stride.flip(-1) * scale  # [R, 3]
    k = torch.arange(n_samples, device=first.device, dtype=first.dtype)  # [S]
    return torch.addcmul(first[:, None, :], k[None, :, None], stride[:, None, :])[None, :, :, None, :]


def _grid_sample_sums(density, first, stride, n_samples):
    """sum_k f(first + k * stride) per ray with grid_sample (any device, any float dtype). -> [R]"""
    grid = _grid(density, first, stride, n_samples)
    return F.grid_sample(density[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[
        0, 0, :, :, 0
    ].sum(dim=-1)


def _gather_sums(density, first, stride, n_samples: int, with_grad: bool = False):
    """sum_k f(first + k * stride) per ray with eight explicit gathers; compiled into one CPU loop.

    The same function as ``_grid_sample_sums``; under ``torch.compile`` it fuses the sample
    positions, gathers, weights and the sum, so no (R, S, 3) grid is ever written to memory.
    With ``with_grad`` it also returns, from the same gathers, ``sum_k grad f`` and
    ``sum_k k grad f`` (R, 3): the derivatives of the sum with respect to ``first`` and ``stride``.
    """
    size_i, size_j, size_k = density.shape
    flat = density.reshape(-1)
    k = torch.arange(n_samples, device=first.device, dtype=first.dtype)
    points = first[:, None, :] + k[None, :, None] * stride[:, None, :]  # [R, S, 3]
    base = torch.floor(points)
    frac = points - base
    base = base.long()
    fx, fy, fz = frac.unbind(-1)
    total = torch.zeros(points.shape[:2], device=first.device, dtype=first.dtype)  # [R, S]
    grad = [torch.zeros_like(total) for _ in range(3)] if with_grad else None
    for corner in range(8):
        di, dj, dk = (corner >> 2) & 1, (corner >> 1) & 1, corner & 1
        i, j, kk = base[..., 0] + di, base[..., 1] + dj, base[..., 2] + dk
        wx, wy, wz = (fx if di else 1 - fx), (fy if dj else 1 - fy), (fz if dk else 1 - fz)
        inside = (i >= 0) & (i < size_i) & (j >= 0) & (j < size_j) & (kk >= 0) & (kk < size_k)
        value = torch.where(inside, flat[torch.where(inside, (i * size_j + j) * size_k + kk, 0)], 0.0)
        total = total + wx * wy * wz * value
        if with_grad:  # d weight / d x is +-1 times the other two weights
            grad[0] = grad[0] + (1 if di else -1) * wy * wz * value
            grad[1] = grad[1] + (1 if dj else -1) * wx * wz * value
            grad[2] = grad[2] + (1 if dk else -1) * wx * wy * value
    if not with_grad:
        return total.sum(dim=-1)
    grad = torch.stack(grad, dim=-1)  # [R, S, 3]
    return total.sum(dim=-1), grad.sum(dim=1), (k[None, :, None] * grad).sum(dim=1)


_compiled_gather_sums = None


class _GatherSums(torch.autograd.Function):
    """The compiled sums with an analytic backward for ``first`` and ``stride`` (pose gradients).

    ``cache`` (a dict or None) carries the sums and their per-ray gradients from the forward of
    ``raymarch`` to the recomputation in its backward, so a pose gradient costs one pass over the
    samples. The volume gradient, when needed, is grid_sample's adjoint (the same function).
    """

    @staticmethod
    def forward(ctx, density, first, stride, n_samples, cache):
        ctx.n_samples = n_samples
        if cache is not None and "sums" in cache:
            sums, g_first, g_stride = cache.pop("sums")
            ctx.save_for_backward(density, first, stride, g_first, g_stride)
            return sums
        if cache is not None or first.requires_grad or stride.requires_grad:  # sums and gradients in one pass
            sums, g_first, g_stride = _compiled_gather_sums(density, first, stride, n_samples, True)
            if cache is not None:
                cache["sums"] = (sums, g_first, g_stride)
            ctx.save_for_backward(density, first, stride, g_first, g_stride)
            return sums
        ctx.save_for_backward(density, first, stride)
        return _compiled_gather_sums(density, first, stride, n_samples)

    @staticmethod
    def backward(ctx, grad_sums):
        density, first, stride, *pose_grads = ctx.saved_tensors
        need_density, need_first, need_stride = ctx.needs_input_grad[:3]
        grad_density = grad_first = grad_stride = None
        if need_first or need_stride:
            g_first, g_stride = pose_grads
            grad_first, grad_stride = grad_sums[:, None] * g_first, grad_sums[:, None] * g_stride
        if need_density:  # grid_sample's adjoint scatters faster than the compiled gathers' one
            with torch.enable_grad():
                dens = density.detach().requires_grad_()
                sums = _grid_sample_sums(dens, first.detach(), stride.detach(), ctx.n_samples)
                (grad_density,) = torch.autograd.grad(sums, dens, grad_sums)
        return grad_density, grad_first, grad_stride, None, None


def _use_compiled(density: torch.Tensor) -> bool:
    """Compiled gathers on CPU unless TRITONDRR_COMPILE=0 (or compiling failed once here)."""
    return density.device.type == "cpu" and os.environ.get("TRITONDRR_COMPILE", "1") != "0"


def _sample_sums(density, first, stride, n_samples, cache=None):
    global _compiled_gather_sums
    if _use_compiled(density):
        if _compiled_gather_sums is None:
            _log.warning(
                "compiling the CPU ray marcher with torch.compile: the first renders take 10-60 s "
                "(once per process, cached on disk); set TRITONDRR_COMPILE=0 to use grid_sample instead"
            )
            _compiled_gather_sums = torch.compile(_gather_sums, dynamic=True)
        try:
            return _GatherSums.apply(density, first, stride, n_samples, cache)
        except Exception as error:  # no C++ compiler, unsupported platform: keep rendering
            warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); using grid_sample", stacklevel=3)
            os.environ["TRITONDRR_COMPILE"] = "0"
    return _grid_sample_sums(density, first, stride, n_samples)


def _march(density, labels, n_channels, source, target, phase, lo, hi, n_samples, cache=None):
    """``g`` for one chunk of rays. source (R or 1, 3), target (R, 3), phase (R,) -> (C, R).

    ``cache``: see ``_GatherSums`` (compiled CPU path only).
    """
    t0, length = clip_rays(source, target, lo, hi)  # [R], [R]
    d = target - source  # [R, 3]
    h = length / n_samples  # [R]
    # Sample k sits at t0 + (k + phase) * h: an affine function of k in index space.
    first = source + (t0 + phase * h)[:, None] * d  # [R, 3]
    stride = h[:, None] * d  # [R, 3]
    # End correction: +(phase - 1/2) f at the entry point, -(phase - 1/2) f at the exit point.
    ends = torch.cat([source + t0[:, None] * d, source + (t0 + length)[:, None] * d])  # [2R, 3]
    end_weight = torch.cat([phase - 0.5, 0.5 - phase])  # [2R]
    if labels is None:
        total = _sample_sums(density, first, stride, n_samples, cache)  # [R]
        f_ends = _sample_sums(density, ends, torch.zeros_like(ends), 1)  # [2R]
        return ((total + (end_weight * f_ends).view(2, -1).sum(0)) * h)[None]
    # Each sample goes to the channel of the nearest voxel's label (round half to even).
    out = torch.zeros(target.shape[0], n_channels, device=target.device, dtype=target.dtype)  # [R, C]
    for points, n, weight in ((first, n_samples, None), (ends.view(2, -1, 3).transpose(0, 1), 2, end_weight)):
        if weight is None:
            grid = _grid(density, points, stride, n)  # [1, R, S, 1, 3]
        else:  # the two end points of each ray as a 2-sample grid
            grid = _grid(density, points[:, 0], points[:, 1] - points[:, 0], 2)
            weight = weight.view(2, -1).T  # [R, 2]
        values = F.grid_sample(density[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        label = F.grid_sample(
            labels[None, None].to(grid.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        values, label = values[0, 0, :, :, 0], label[0, 0, :, :, 0].long()  # [R, n]
        out.scatter_add_(1, label.clamp(0, n_channels - 1), values if weight is None else values * weight)
    return (out * h[:, None]).T


class _Raymarch(torch.autograd.Function):
    """Chunked forward without a graph; the backward recomputes each chunk with autograd.

    On the compiled CPU path, when the rays need gradients, the forward also keeps the per-ray
    sums of the sample gradients (7 numbers per ray), so the backward does not march again.
    """

    @staticmethod
    def forward(ctx, density, source, target, phase, labels, n_channels, lo, hi, n_samples, chunk_rays):
        ctx.save_for_backward(density, source, target, phase, labels, lo, hi)
        ctx.config = (n_channels, n_samples, chunk_rays)
        pose_grad = (source.requires_grad or target.requires_grad) and labels is None and _use_compiled(density)
        ctx.caches = [{} for _ in range(0, target.shape[0], chunk_rays)] if pose_grad else None
        with torch.no_grad():
            return _chunked(
                density, labels, n_channels, source, target, phase, lo, hi, n_samples, chunk_rays, ctx.caches
            )

    @staticmethod
    def backward(ctx, grad_out):
        density, source, target, phase, labels, lo, hi = ctx.saved_tensors
        n_channels, n_samples, chunk_rays = ctx.config
        need_density, need_source, need_target = ctx.needs_input_grad[:3]
        grad_density = torch.zeros_like(density) if need_density else None
        grad_source = torch.zeros_like(source) if need_source else None
        grad_target = torch.zeros_like(target) if need_target else None
        n_rays = target.shape[0]
        for chunk, start in enumerate(range(0, n_rays, chunk_rays)):
            rays = slice(start, min(start + chunk_rays, n_rays))
            cache = ctx.caches[chunk] if ctx.caches is not None else None
            with torch.enable_grad():
                dens = density.detach().requires_grad_(need_density)
                src = source.detach() if source.shape[0] == 1 else source[rays].detach()
                src.requires_grad_(need_source)
                tgt = target[rays].detach().requires_grad_(need_target)
                out = _march(dens, labels, n_channels, src, tgt, phase[rays], lo, hi, n_samples, cache)
                inputs = [x for x, need in ((dens, need_density), (src, need_source), (tgt, need_target)) if need]
                grads = list(torch.autograd.grad(out, inputs, grad_out[:, rays]))
            if need_density:
                grad_density += grads.pop(0)
            if need_source:
                if source.shape[0] == 1:
                    grad_source += grads.pop(0)
                else:
                    grad_source[rays] += grads.pop(0)
            if need_target:
                grad_target[rays] += grads.pop(0)
        ctx.caches = None
        return grad_density, grad_source, grad_target, None, None, None, None, None, None, None


def _chunked(density, labels, n_channels, source, target, phase, lo, hi, n_samples, chunk_rays, caches=None):
    n_rays = target.shape[0]
    parts = []
    for chunk, start in enumerate(range(0, n_rays, chunk_rays)):
        rays = slice(start, min(start + chunk_rays, n_rays))
        src = source if source.shape[0] == 1 else source[rays]
        cache = caches[chunk] if caches is not None else None
        parts.append(_march(density, labels, n_channels, src, target[rays], phase[rays], lo, hi, n_samples, cache))
    return torch.cat(parts, dim=-1) if parts else target.new_zeros(n_channels, 0)


def raymarch(
    density: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    phase: torch.Tensor,
    lo,
    hi,
    n_samples: int,
    *,
    labels: torch.Tensor | None = None,
    n_channels: int = 1,
    chunk_samples: int = CHUNK_SAMPLES,
) -> torch.Tensor:
    """Integral of the density over ``t`` in [0, 1] along each ray, ``g`` of the module docstring.

    Args:
        density: (I, J, K) float tensor; other dtypes than the rays' are converted once per call.
        source: (B, 1, 3) or (B, N, 3) ray starts in index coordinates.
        target: (B, N, 3) ray ends in index coordinates.
        phase: (N,) sampling phase of each ray in [0, 1], shared by the poses (1/2: midpoints).
        lo, hi: box corners (3 floats each, index coordinates) outside which the field is zero.
        n_samples: samples per ray, ``S``.
        labels: optional (I, J, K) integer labelmap; each sample is added to the channel of its
            nearest voxel's label (labels outside ``[0, n_channels)`` are clamped into it).
        n_channels: number of output channels when ``labels`` is given.
        chunk_samples: at most this many samples are alive at once.

    Returns:
        (B, C, N) tensor in the rays' dtype: the integral over ``t`` (multiply by the ray length in
        mm for a line integral in mm). Differentiable with respect to density, source and target.
    """
    batch, n_rays, _ = target.shape
    lo_t = torch.as_tensor(lo, device=target.device, dtype=target.dtype)
    hi_t = torch.as_tensor(hi, device=target.device, dtype=target.dtype)
    # All poses' rays go through one flat list; a shared source stays one row per pose.
    flat_target = target.reshape(batch * n_rays, 3)
    if source.shape[1] == 1 and batch == 1:
        flat_source = source.reshape(1, 3)
    else:
        flat_source = source.expand(batch, n_rays, 3).reshape(batch * n_rays, 3)
    chunk_rays = max(1, chunk_samples // max(n_samples, 1))
    if density.dtype != target.dtype:  # grid_sample needs one dtype: fp16/bf16 volumes are upcast once per call
        density = density.to(target.dtype)
    flat_phase = phase.to(target.dtype).expand(batch, n_rays).reshape(batch * n_rays)
    channels = n_channels if labels is not None else 1
    out = _Raymarch.apply(
        density, flat_source, flat_target, flat_phase, labels, channels, lo_t, hi_t, n_samples, chunk_rays
    )
    return out.reshape(channels, batch, n_rays).transpose(0, 1)
