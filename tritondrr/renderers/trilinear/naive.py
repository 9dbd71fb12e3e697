"""The trilinear renderer in plain PyTorch: the product on MPS (and CPU without a compiler), the oracle.

Computes ``g``, the sampled integral over ``t`` in [0, 1] of the trilinear interpolant along
each ray, exactly as docs/sampling.md states it (clip to the box, ``S`` samples at the ray's
phase, Euler-Maclaurin end correction); the Triton kernels (``kernels/trilinear.py``) compute
the same function and ``tests/renderers/trilinear`` holds them to it. Samples come from
``grid_sample`` (any device, any float dtype); ``cpu.py`` plugs a compiled gather loop into the
same chunked machinery.

Memory is bounded by chunking rays: at most ``chunk_samples`` samples are alive at a time, in
the forward and in the backward (which recomputes the samples of each chunk rather than storing
them), so any image size renders without ``patch_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...occupancy import BRICK, may_be_nonzero
from ...volume import clip_rays

__all__ = ["RUN", "grid_sample_sums", "raymarch", "run_keep", "run_span"]

#: Default number of samples alive at once (about 50 MB of float32 per chunk).
CHUNK_SAMPLES = 1 << 22

#: Consecutive samples that empty-space skipping keeps or skips together (tritondrr.occupancy).
#: A run spans RUN - 1 steps, at most BRICK - 1 voxels per axis while a step is at most one voxel
#: (the default sampling); longer runs are never skipped.
RUN = BRICK


def _grid(density, first, stride, n_samples, k0=None):
    """Sample points of each ray as grid_sample's grid: (1, R, S, 1, 3); with ``k0`` (R,) samples
    ``k0 + 0 .. k0 + S - 1`` of each row."""
    # grid_sample wants (x, y, z) = (k, j, i) normalised so that -1 and 1 are the outer faces of
    # the grid (align_corners=False); zero padding then makes it the zero-extended tent interpolant.
    scale = 2.0 / torch.tensor(density.shape[::-1], device=first.device, dtype=first.dtype)  # [3]
    first = first.flip(-1) * scale + (scale / 2 - 1)  # [R, 3]
    stride = stride.flip(-1) * scale  # [R, 3]
    k = torch.arange(n_samples, device=first.device, dtype=first.dtype)[None, :]  # [1, S]
    if k0 is not None:
        k = k0[:, None] + k  # [R, S]
    return torch.addcmul(first[:, None, :], k[..., None], stride[:, None, :])[None, :, :, None, :]


def grid_sample_sums(density, first, stride, n_samples):
    """sum_k f(first + k * stride) per ray with grid_sample (any device, any float dtype). -> [R]"""
    grid = _grid(density, first, stride, n_samples)
    return F.grid_sample(density[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[
        0, 0, :, :, 0
    ].sum(dim=-1)


def run_keep(groups, first, stride, n_samples):
    """(R, ceil(S / RUN)) bool: False for the runs of RUN samples on which the field is zero.

    Run ``r`` holds samples ``r RUN .. min((r + 1) RUN, S) - 1`` of ``first + k stride``; the test
    (``occupancy.may_be_nonzero``) looks at the segment between its first and last sample.
    """
    k0 = torch.arange(0, n_samples, RUN, device=first.device, dtype=first.dtype)  # [n_runs]
    k1 = (k0 + (RUN - 1)).clamp(max=n_samples - 1)
    p = first[:, None, :] + k0[None, :, None] * stride[:, None, :]  # [R, n_runs, 3]
    q = first[:, None, :] + k1[None, :, None] * stride[:, None, :]
    return may_be_nonzero(groups, p, q)


def run_span(groups, first, stride, n_samples):
    """Per ray, the first run ``run_keep`` keeps and one past the last, (R,) int64 each (``n_runs``
    and 0 when it keeps none): the range of runs a ray needs."""
    keep = run_keep(groups, first, stride, n_samples)  # [R, n_runs]
    n_runs = keep.shape[1]
    runs = torch.arange(n_runs, device=first.device)
    begin = torch.where(keep, runs, n_runs).amin(dim=1)
    end = torch.where(keep, runs + 1, 0).amax(dim=1)
    return begin, end


def _kept_runs(density, groups, first, stride, n_samples):
    """The runs of samples the occupancy groups cannot clear, at their usual positions: the ray of
    each (M,), grid_sample's grid of their samples (1, M, RUN, 1, 3) and which samples exist
    (M, RUN) (the last run of a ray may pass sample S - 1)."""
    rays, run = run_keep(groups, first, stride, n_samples).nonzero(as_tuple=True)  # [M], [M]
    k0 = run.to(first.dtype) * RUN
    grid = _grid(density, first[rays], stride[rays], RUN, k0)
    valid = k0[:, None] + torch.arange(RUN, device=first.device, dtype=first.dtype) < n_samples
    return rays, grid, valid


def _grid_sample_sums_any(density, first, stride, n_samples, cache=None, groups=None):
    if groups is None:
        return grid_sample_sums(density, first, stride, n_samples)
    rays, grid, valid = _kept_runs(density, groups, first, stride, n_samples)  # empty-space skipping
    values = F.grid_sample(density[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    parts = torch.where(valid, values[0, 0, :, :, 0], 0.0).sum(dim=-1)  # [M]
    return first.new_zeros(first.shape[0]).index_add_(0, rays, parts)


def _march(density, labels, n_channels, source, target, phase, lo, hi, n_samples, sums, cache=None, groups=None):
    """``g`` for one chunk of rays. source (R or 1, 3), target (R, 3), phase (R,) -> (C, R).

    ``sums(density, first, stride, n_samples, cache, groups)`` returns ``sum_k f(first + k stride)``
    per ray; ``cache`` is that function's own (``cpu.py`` keeps per-ray pose sums there);
    ``groups`` (occupancy groups or None) lets it skip runs of samples in empty space.
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
        total = sums(density, first, stride, n_samples, cache, groups)  # [R]
        f_ends = sums(density, ends, torch.zeros_like(ends), 1, None)  # [2R]
        return ((total + (end_weight * f_ends).view(2, -1).sum(0)) * h)[None]
    # Hard labels: each sample goes to the channel of the nearest voxel's label (round half to even).
    out = torch.zeros(target.shape[0], n_channels, device=target.device, dtype=target.dtype)  # [R, C]
    rays = None  # row r of the sample grid belongs to ray r, or (skipping) to ray rays[r]
    if groups is None:
        sample_grid = _grid(density, first, stride, n_samples)  # [1, R, S, 1, 3]
        valid = None
    else:  # empty-space skipping
        rays, sample_grid, valid = _kept_runs(density, groups, first, stride, n_samples)
    points = ends.view(2, -1, 3).transpose(0, 1)  # [R, 2, 3] the two end points of each ray
    end_grid = _grid(density, points[:, 0], points[:, 1] - points[:, 0], 2)  # as a 2-sample grid
    for grid, weight in ((sample_grid, None), (end_grid, end_weight.view(2, -1).T)):
        values = F.grid_sample(density[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        label = F.grid_sample(
            labels[None, None].to(grid.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        values, label = values[0, 0, :, :, 0], label[0, 0, :, :, 0].long().clamp(0, n_channels - 1)  # [R or M, n]
        if weight is not None:
            out.scatter_add_(1, label, values * weight)
        elif rays is None:
            out.scatter_add_(1, label, values)
        else:
            out.index_put_((rays[:, None].expand_as(label), label), torch.where(valid, values, 0.0), accumulate=True)
    return (out * h[:, None]).T


class _Raymarch(torch.autograd.Function):
    """Chunked forward without a graph; the backward recomputes each chunk with autograd.

    When ``sums`` keeps per-ray pose sums (``cpu.py``), the forward leaves them in one cache
    per chunk, so the backward does not march again.
    """

    @staticmethod
    def forward(ctx, density, source, target, phase, labels, n_channels, lo, hi, n_samples, chunk_rays, sums, groups):
        ctx.save_for_backward(density, source, target, phase, labels, lo, hi)
        ctx.config = (n_channels, n_samples, chunk_rays, sums, groups)
        keeps = getattr(sums, "keeps_pose_sums", False)
        pose_grad = (source.requires_grad or target.requires_grad) and labels is None and keeps
        ctx.caches = [{} for _ in range(0, target.shape[0], chunk_rays)] if pose_grad else None
        with torch.no_grad():
            return _chunked(
                density, labels, n_channels, source, target, phase, lo, hi, n_samples, chunk_rays, sums, ctx.caches,
                groups,
            )  # fmt: skip

    @staticmethod
    def backward(ctx, grad_out):
        density, source, target, phase, labels, lo, hi = ctx.saved_tensors
        n_channels, n_samples, chunk_rays, sums, groups = ctx.config
        need_density, need_source, need_target = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "double backward through the PyTorch trilinear renderer is not supported "
                "(its backward recomputes samples outside the graph); use first derivatives only"
            )
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
                out = _march(dens, labels, n_channels, src, tgt, phase[rays], lo, hi, n_samples, sums, cache, groups)
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
        return grad_density, grad_source, grad_target, None, None, None, None, None, None, None, None, None


def _chunked(
    density, labels, n_channels, source, target, phase, lo, hi, n_samples, chunk_rays, sums, caches=None, groups=None
):
    n_rays = target.shape[0]
    parts = []
    for chunk, start in enumerate(range(0, n_rays, chunk_rays)):
        rays = slice(start, min(start + chunk_rays, n_rays))
        src = source if source.shape[0] == 1 else source[rays]
        cache = caches[chunk] if caches is not None else None
        parts.append(
            _march(density, labels, n_channels, src, target[rays], phase[rays], lo, hi, n_samples, sums, cache, groups)
        )
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
    soft_labels: bool = False,
    chunk_samples: int = CHUNK_SAMPLES,
    sums=None,
    bricks=None,
) -> torch.Tensor:
    """``g`` of docs/sampling.md along each ray: the sampled integral over ``t`` in [0, 1].

    Args:
        density: (I, J, K) float tensor; other dtypes than the rays' are converted once per call.
        source: (B, 1, 3) or (B, N, 3) ray starts in index coordinates.
        target: (B, N, 3) ray ends in index coordinates.
        phase: (N,) sampling phase of each ray in [0, 1], shared by the poses (1/2: midpoints).
        lo, hi: box corners (3 floats each, index coordinates) outside which the field is zero.
        n_samples: samples per ray, ``S``.
        labels: optional (I, J, K) integer labelmap of channel indices in ``[0, n_channels)``
            (values outside are clamped into it).
        n_channels: number of output channels when ``labels`` is given.
        soft_labels: route each sample's eight trilinear corner weights to the channels of
            those corners' labels (channel ``c`` is then the interpolant of the volume masked
            to label ``c``, a smooth function of the pose); False: the whole sample goes to the
            channel of the nearest voxel's label.
        chunk_samples: at most this many samples are alive at once.
        sums: the per-ray sample-sum function (default ``grid_sample``; ``cpu.py`` passes its
            compiled one).
        bricks: optional ``occupancy.Bricks`` of ``density``: runs of samples in empty space
            are skipped (same result to float rounding). Ignored while ``density`` requires grad
            (its gradient is non-zero in empty space).

    Returns:
        (B, C, N) tensor in the rays' dtype: the integral over ``t`` (multiply by the ray length in
        mm for a line integral in mm). Differentiable with respect to density, source and target.
    """
    batch, n_rays, _ = target.shape
    if labels is not None and soft_labels:
        # Soft channel c is the plain integral of the volume masked to label c: exact routing of
        # every corner weight, one pass per channel.
        channels = [
            raymarch(
                density * (labels == c),
                source,
                target,
                phase,
                lo,
                hi,
                n_samples,
                chunk_samples=chunk_samples,
                sums=sums,
                bricks=bricks,
            )
            for c in range(n_channels)
        ]
        return torch.cat(channels, dim=1)
    sums = _grid_sample_sums_any if sums is None else sums
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
    groups = None if bricks is None or density.requires_grad else bricks.groups
    out = _Raymarch.apply(
        density, flat_source, flat_target, flat_phase, labels, channels, lo_t, hi_t, n_samples, chunk_rays, sums,
        groups,
    )  # fmt: skip
    return out.reshape(channels, batch, n_rays).transpose(0, 1)
