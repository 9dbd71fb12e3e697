r"""The exact renderer in plain PyTorch: the integral of the trilinear interpolant along each ray.

Index space (voxel ``(i, j, k)`` centred at the integer point ``(i, j, k)``), the tent interpolant
of the zero-extended grid ``f``, a ray ``p(t) = s + t d`` with ``d = e - s`` and ``t`` in
``[0, 1]``. The result is ``g = int_0^1 f(p(t)) dt`` with no sampling error:

1. Clip ``[0, 1]`` to the support box ``[-1, I] x [-1, J] x [-1, K]`` (intersected with ``box``):
   ``[t0, t1]``. Rays that miss it, or have zero length (``|d_a| < TINY`` on every axis), give 0.
2. The crossings of axis ``a`` with the planes ``p_a = n h`` (``h = 1``; ``h = 1/2`` with hard
   labels, whose nearest voxel changes at half-integers) inside ``(t0, t1)`` form an arithmetic
   sequence ``t = (n h - s_a) / d_a``. Merged over the three axes (by closed-form rank, no sort)
   they cut ``[t0, t1]`` into pieces; on each piece the ray stays in one cell
   ``[c, c + 1]^3`` (and, for hard labels, in one voxel), so ``f`` is a product of three affine
   functions of ``t``: a cubic.
3. The two-point Gauss-Legendre rule on each piece ``[a, b]`` is exact for a cubic:
   ``g = sum (b - a) / 2 (f(x_1) + f(x_2))``, ``x_1,2 = (a + b) / 2 -+ (b - a) / (2 sqrt 3)``.
   (Simpson's rule is exact too; Gauss needs two evaluations per piece instead of three, and its
   nodes lie inside the piece, away from the cell faces where the gradient of ``f`` jumps.) The
   plain and hard modes evaluate ``f`` with ``grid_sample`` (the tent interpolant of the
   zero-extended grid, in one fused op); soft labels gather the 8 corners of each piece's cell.

Merging without a sort: only the crossings of the two minor axes (fewer crossings) are ranked.
The ``m``-th crossing ``t_A`` of axis ``a`` has rank ``1 + m + sum_{b != a} #{crossings of b
before t_A}`` in ``[t0, crossings..., t1]``. Each count is a floor expression in
``q_b(t_A) = (s_b + t_A d_b) / h``, taken with a rounding margin so that it is never too large,
then corrected by one comparison with the crossing time of ``b`` computed by the very expression
that produces that crossing. The ranks are therefore those of one strict total order of the
computed times (ties broken by axis order): every minor crossing lands in its own slot, and the
major axis's crossings fill the free slots in order (slot ``j`` holds major crossing
``j - 1 - #minor crossings before j``, an exclusive cumulative sum). No sort, no ``nonzero``
(MPS-safe ops). The margin is valid while ``64 eps (|s| + |d|) / h < 1/4`` in index units
(float32: coordinates below about 3e4 voxels).

Labels (``n_channels`` channels, ``labels`` already mapped to ``[0, n_channels)``):
- hard: each piece (cut at half-integer planes too) goes to the channel of its midpoint's nearest
  voxel (``torch.round``: half to even), channel 0 outside the grid;
- soft: each corner's Gauss-integrated trilinear weight goes to its own label's channel.

Gradients. Without labels the backward differentiates a surrogate (``_plain_surrogate``): the
derivative of ``g`` is ``int (1 - t) grad f dt`` (source) or ``int t grad f dt`` (target), a
cubic per piece that the same Gauss nodes integrate exactly, plus ``f(p(t1)) dt1 - f(p(t0)) dt0``
at the clipped ends; the moves of interior breaks cancel because ``f`` is continuous. With labels
(hard channels jump at half-integer planes, whose moves then count) autograd runs through the
chunk: every piece integral is a differentiable function of its end points and node positions
(the cells and labels are integer constants), and the derivative of an exact rule with respect to
an end point is the piece's own cubic there, so autograd is exact too. The volume gradient is the
adjoint of the sampling (``grid_sample``'s, or a scatter-add of the gathered corners' weights).

Memory: rays are processed in chunks with at most about ``chunk_elements`` pieces-times-corners
alive; the backward recomputes each chunk (a half or a quarter of the chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["TINY", "integrate"]

#: Direction components below this are treated as zero (no crossings, no division).
TINY = 1e-12

#: Pieces x corners alive per chunk in the forward (the backward uses a quarter).
CHUNK_ELEMENTS = 1 << 21


def _support(shape, box, device, dtype):
    """The clip box: the interpolant's support ``[-1, n]`` per axis, intersected with ``box``. -> (3,), (3,)"""
    lo = [-1.0, -1.0, -1.0]
    hi = [float(n) for n in shape]
    if box is not None:
        blo, bhi = box
        lo = [max(a, float(b)) for a, b in zip(lo, blo)]
        hi = [min(a, float(b)) for a, b in zip(hi, bhi)]
    return torch.tensor(lo, device=device, dtype=dtype), torch.tensor(hi, device=device, dtype=dtype)


def _clip(source, target, lo, hi):
    """Clipped interval of each ray. source (R or 1, 3), target (R, 3) -> t0, t1 (R,), d (R, 3).

    Rays that miss the box or have zero length get ``t0 = t1 = 0`` (constants: no gradient).
    """
    d = target - source
    small = d.abs() < TINY
    dm = torch.where(small, torch.full_like(d, TINY), d)
    t_lo = (lo - source) / dm
    t_hi = (hi - source) / dm
    t0 = torch.minimum(t_lo, t_hi).amax(dim=-1).clamp(min=0.0)
    t1 = torch.maximum(t_lo, t_hi).amin(dim=-1).clamp(max=1.0)
    hit = (t1 > t0) & ~small.all(dim=-1)
    zero = torch.zeros_like(t0)
    return torch.where(hit, t0, zero), torch.where(hit, t1, zero), d


class _Axes:
    """The plane crossings of each axis inside ``(t0, t1)``: first plane, direction, count.

    Crossing ``m`` of axis ``a`` is at ``t = (n0_a + sigma_a m - qs_a) / qd_a`` in units of the
    plane spacing ``h`` (``qs = s / h``, ``qd = d / h``); every crossing time of an axis is
    computed by ``time`` so that equal indices give bitwise equal times.
    """

    def __init__(self, source, d, t0, t1, inv_h):
        qs = source * inv_h  # [R or 1, 3]
        qd = d * inv_h  # [R, 3]
        moving = d.abs() >= TINY
        self.pos = (d > 0) & moving
        q0 = (qs + t0[:, None] * qd).detach()
        q1 = (qs + t1[:, None] * qd).detach()
        self.sigma = torch.where(self.pos, 1.0, -1.0).to(d.dtype)
        # First plane beyond q0 in the direction of travel: floor(q0) + 1 or ceil(q0) - 1.
        self.n0 = self.sigma * (torch.floor(self.sigma * q0) + 1.0)  # [R, 3]
        # Planes strictly before q1: ceil(q1) - n0 or n0 - floor(q1).
        count = torch.ceil(self.sigma * (q1 - self.n0))
        self.count = torch.where(moving, count, torch.zeros_like(count)).clamp(min=0.0)  # [R, 3] float
        self.qs = qs.expand_as(qd)
        self.qd = torch.where(moving, qd, torch.ones_like(qd))
        # A bound on the rounding error of q_b(t) in plane units: estimated counts never exceed the true ones.
        eps = torch.finfo(d.dtype).eps
        self.margin = (64 * eps * (self.qs.abs() + qd.abs() + 1.0)).clamp(max=0.25).detach()
        self.t_first = (self.n0 - self.qs) / self.qd  # [R, 3] crossing of the first plane
        self.t_step = self.sigma / self.qd  # [R, 3] between consecutive planes

    def time(self, axis, index):
        """Crossing times of ``axis`` at plane ``index`` (R, M) (float integers)."""
        return torch.addcmul(self.t_first[:, axis, None], index, self.t_step[:, axis, None])

    def count_before(self, axis, t, inclusive):
        """Number of crossings of ``axis`` before ``t`` (R, M): ``t_b < t``, or ``<=`` if ``inclusive``."""
        q = (self.qs[:, axis, None] + t * self.qd[:, axis, None]).detach()
        margin = self.margin[:, axis, None]
        n0 = self.n0[:, axis, None]
        est = torch.ceil(self.sigma[:, axis, None] * (q - n0) - margin)  # ceil(q - m) - n0 or n0 - floor(q + m)
        count = self.count[:, axis, None]
        est = torch.minimum(est.clamp(min=0.0), count)  # never above the true count
        tb = self.time(axis, est).detach()
        before = (tb <= t) if inclusive else (tb < t)
        return est + (before & (est < count)).to(est.dtype)


def _breakpoints(source, d, t0, t1, inv_h):
    """[t0, crossings in merged order, t1, t1, ...] per ray: (R, n + 2), n the chunk's most crossings.

    Only the crossings of the two minor axes (the ones with fewer crossings) are ranked; the
    crossings of the major axis fill the remaining slots in order: the slot ``j`` left free holds
    major crossing ``j - 1 - (minor crossings before j)`` (an exclusive cumulative sum).
    """
    axes = _Axes(source, d, t0, t1, inv_h)
    n_rays = d.shape[0]
    *per_axis, n_max = torch.cat([axes.count.amax(dim=0), axes.count.sum(dim=1).amax()[None]]).long().tolist()
    width = n_max + 3  # t0, crossings, t1, then a column that takes the padding of the minor axes
    major = max(range(3), key=lambda a: per_axis[a])
    times, ranks = [], []
    for a in range(3):
        if a == major or per_axis[a] == 0:
            continue
        m = torch.arange(per_axis[a], device=d.device, dtype=d.dtype)[None, :]  # [1, Na]
        t = axes.time(a, m)  # [R, Na]
        rank = (m + 1.0).expand(n_rays, -1)
        for b in range(3):
            if b != a:
                rank = rank + axes.count_before(b, t.detach(), inclusive=b < a)
        rank = torch.where(m < axes.count[:, a, None], rank, torch.full_like(rank, width - 1))
        times.append(t)
        ranks.append(rank.long())
    j = torch.arange(width, device=d.device, dtype=d.dtype)[None, :]  # [1, W]
    ends = torch.where(j == 0, t0[:, None], t1[:, None])  # [R, W]
    if times:
        index = torch.cat(ranks, dim=1)
        minor = torch.scatter(ends, 1, index, torch.cat(times, dim=1))  # [R, W]
        marks = torch.zeros_like(ends).scatter_(1, index, 1.0)
        before = torch.cumsum(marks, dim=1) - marks
    else:
        minor, marks, before = ends, None, 0.0
    k = (j - 1.0 - before).detach()  # [R, W]: the major crossing of each free slot
    free = (k >= 0) & (k < axes.count[:, major, None])
    t = torch.where(free, axes.time(major, k.clamp(min=0.0)), ends)
    if marks is not None:
        t = torch.where(marks > 0, minor, t)
    return t[:, : n_max + 2]


def _padded(x, value=0):
    """x zero-padded by one voxel on each side, flattened: cells [-1, n - 1] index without masks."""
    return F.pad(x, (1, 1, 1, 1, 1, 1), value=value).reshape(-1)


_CORNERS = [(di, dj, dk) for di in (0, 1) for dj in (0, 1) for dk in (0, 1)]  # corner c = 4 di + 2 dj + dk

#: Two-point Gauss-Legendre nodes on [0, 1] (exact for cubics): 1/2 -+ 1/(2 sqrt 3).
_GAUSS = 0.5 / 3.0**0.5


def _sample(volume, shape, source, d, t):
    """The interpolant at the points s + t d with grid_sample. t: (R, S) -> (R, S)."""
    # grid_sample's (x, y, z) = (k, j, i), normalised so that -1 and 1 are the outer faces of the
    # grid; zero padding makes it the tent interpolant of the zero-extended grid.
    scale = 2.0 / torch.tensor(shape[::-1], device=d.device, dtype=d.dtype)  # [3]
    first = source.flip(-1) * scale + (scale / 2 - 1)  # [R or 1, 3]
    step = d.flip(-1) * scale  # [R, 3]
    # Built as (R, 3, S), whose inner dimension vectorises, and read through a transposed view.
    grid = torch.addcmul(first[:, :, None], step[:, :, None], t[:, None, :]).transpose(1, 2)  # [R, S, 3]
    return F.grid_sample(
        volume[None, None], grid[None, :, :, None, :], mode="bilinear", padding_mode="zeros", align_corners=False
    )[0, 0, :, :, 0]


def _plain_surrogate(volume, shape, source, target, lo, hi, weight):
    """A scalar whose gradient is the exact gradient of ``sum_r weight_r g_r`` (no labels).

    ``g = sum_pieces h/2 (f(x_1) + f(x_2))``. Its derivative with respect to the rays is the sum
    over the Gauss nodes of ``h/2 grad f . dp/d(s, e)`` at fixed node parameters (exact: the
    integrand ``(1 - t) grad f`` is a cubic per piece), plus ``f(p(t1)) dt1 - f(p(t0)) dt0`` at
    the clipped ends; the moves of interior breaks cancel (``f`` is continuous). So the nodes,
    their weights and the end values enter as constants, and only the positions ``s + x d`` and
    the clip ends ``t0``, ``t1`` carry gradients: no autograd graph through the merge.
    """
    n_rays = target.shape[0]
    t0, t1, d = _clip(source, target, lo, hi)
    with torch.no_grad():
        t = _breakpoints(source.detach(), d.detach(), t0.detach(), t1.detach(), 1.0)  # [R, M + 1]
        a, b = t[:, :-1], t[:, 1:]
        half = (0.5 * (b - a) * weight[:, None])[..., None].expand(-1, -1, 2).reshape(n_rays, -1)  # [R, 2M]
        x = torch.stack([torch.lerp(a, b, 0.5 - _GAUSS), torch.lerp(a, b, 0.5 + _GAUSS)], dim=-1).reshape(n_rays, -1)
        ends = _sample(volume.detach(), shape, source.detach(), d.detach(), torch.stack([t0, t1], dim=-1))  # [R, 2]
    values = _sample(volume, shape, source, d, x)  # [R, 2M]
    return (values * half).sum() + (weight * (ends[:, 1] * t1 - ends[:, 0] * t0)).sum()


def _chunk(volume, lab, shape, source, target, lo, hi, mode, n_channels):
    """g for one chunk of rays: (R, C).

    ``volume``: the (I, J, K) density in the rays' dtype (plain and hard modes) or its padded
    flat copy (soft mode); ``lab``: the padded flat labels (None without labels).
    """
    n_rays = target.shape[0]
    t0, t1, d = _clip(source, target, lo, hi)
    inv_h = 2.0 if mode == "hard" else 1.0
    t = _breakpoints(source, d, t0, t1, inv_h)  # [R, M + 1]
    a, b = t[:, :-1], t[:, 1:]  # [R, M]
    h = b - a
    nodes = torch.stack([torch.lerp(a, b, 0.5 - _GAUSS), torch.lerp(a, b, 0.5 + _GAUSS)], dim=-1)  # [R, M, 2]
    if mode != "soft":
        values = _sample(volume, shape, source, d, nodes.reshape(n_rays, -1))  # [R, 2M]
        if mode == "plain":
            return torch.einsum("rmn,rm->r", values.view(n_rays, -1, 2), h)[:, None] * 0.5
        piece = values.view(n_rays, -1, 2).sum(dim=-1) * (0.5 * h)  # [R, M]
        mid = 0.5 * (a + b)
        # Hard labels: the piece lies in one voxel, its midpoint's nearest (round half to even).
        size = torch.tensor(shape, device=target.device, dtype=target.dtype)
        p_mid = (source[:, None, :] + mid[..., None] * d[:, None, :]).detach()  # [R, M, 3]
        vox = (torch.minimum(torch.round(p_mid).clamp(min=-1.0), size) + 1.0).long()  # [R, M, 3] padded
        label = lab[(vox[..., 0] * (shape[1] + 2) + vox[..., 1]) * (shape[2] + 2) + vox[..., 2]]  # [R, M]
        out = torch.zeros(n_rays, n_channels, device=target.device, dtype=target.dtype)
        return out.scatter_add(1, label, piece)
    # Soft labels: the 8 corners of each piece's cell, each with its Gauss-integrated weight.
    mid = 0.5 * (a + b)
    size = torch.tensor(shape, device=target.device, dtype=target.dtype)
    src, dd = source[:, None, None, :], d[:, None, None, :]
    points = src + nodes[..., None] * dd  # [R, M, 2, 3]
    p_mid = (source[:, None, :] + mid[..., None] * d[:, None, :]).detach()  # [R, M, 3]
    cell = torch.minimum(torch.floor(p_mid).clamp(min=-1.0), size - 1.0)  # [R, M, 3]
    frac = points - cell[:, :, None, :]  # [R, M, 2, 3]
    fx, fy, fz = frac.unbind(-1)  # [R, M, 2]
    wx = torch.stack([1 - fx, fx], dim=-1)  # [R, M, 2, 2]
    wy = torch.stack([1 - fy, fy], dim=-1)
    wz = torch.stack([1 - fz, fz], dim=-1)
    w = wx[..., :, None, None] * wy[..., None, :, None] * wz[..., None, None, :]  # [R, M, 2, 2, 2, 2]
    weights = w.flatten(-3).sum(dim=2) * (0.5 * h)[..., None]  # [R, M, 8]
    ci = (cell + 1.0).long()
    base = (ci[..., 0] * (shape[1] + 2) + ci[..., 1]) * (shape[2] + 2) + ci[..., 2]  # [R, M]
    offsets = torch.tensor(
        [(di * (shape[1] + 2) + dj) * (shape[2] + 2) + dk for di, dj, dk in _CORNERS], device=target.device
    )  # [8]
    index = base[..., None] + offsets  # [R, M, 8]
    out = torch.zeros(n_rays, n_channels, device=target.device, dtype=target.dtype)
    flat = (volume[index] * weights).reshape(n_rays, -1)
    return out.scatter_add(1, lab[index].reshape(n_rays, -1), flat)


def _plan(source, target, lo, hi, inv_h):
    """Largest number of crossings of any ray (one host sync) and the per-ray counts."""
    with torch.no_grad():
        t0, t1, d = _clip(source, target, lo, hi)
        axes = _Axes(source, d, t0, t1, inv_h)
        total = axes.count.sum(dim=1)
        return int(total.max()) if total.numel() else 0


def _chunks(n_rays, n_max, budget):
    per_ray = 8 * (n_max + 1)
    step = max(1, budget // per_ray)
    return [slice(i, min(i + step, n_rays)) for i in range(0, n_rays, step)]


class _Exact(torch.autograd.Function):
    """Chunked forward without a graph; the backward recomputes each chunk under autograd."""

    @staticmethod
    def forward(ctx, density, source, target, labels, n_channels, mode, lo, hi, chunk_elements):
        shape = tuple(density.shape)
        inv_h = 2.0 if mode == "hard" else 1.0
        n_max = _plan(source, target, lo, hi, inv_h)
        vol = _padded(density) if mode == "soft" else density
        lab = _padded(labels.clamp(0, n_channels - 1)) if labels is not None else None
        ctx.save_for_backward(density, source, target, labels, lo, hi)
        ctx.config = (n_channels, mode, n_max, chunk_elements)
        parts = []
        for rays in _chunks(target.shape[0], n_max, chunk_elements):
            src = source if source.shape[0] == 1 else source[rays]
            parts.append(_chunk(vol, lab, shape, src, target[rays], lo, hi, mode, n_channels))
        if not parts:
            return target.new_zeros(0, n_channels)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_out):
        density, source, target, labels, lo, hi = ctx.saved_tensors
        n_channels, mode, n_max, chunk_elements = ctx.config
        need_density, need_source, need_target = ctx.needs_input_grad[:3]
        shape = tuple(density.shape)
        lab = _padded(labels.clamp(0, n_channels - 1)) if labels is not None else None
        grad_density = torch.zeros_like(density) if need_density else None
        grad_source = torch.zeros_like(source) if need_source else None
        grad_target = torch.zeros_like(target) if need_target else None
        dens = density.detach().requires_grad_(need_density)
        with torch.enable_grad():
            vol = _padded(dens) if mode == "soft" else dens
        # Without labels, a surrogate without a graph through the merge (``_plain_surrogate``);
        # with labels (jumps at half-integer planes for hard ones), autograd through the chunk.
        budget = chunk_elements // 2 if mode == "plain" else chunk_elements // 4
        for rays in _chunks(target.shape[0], n_max, max(1, budget)):
            with torch.enable_grad():
                src = source.detach() if source.shape[0] == 1 else source[rays].detach()
                src.requires_grad_(need_source)
                tgt = target[rays].detach().requires_grad_(need_target)
                inputs = [x for x, need in ((vol, need_density), (src, need_source), (tgt, need_target)) if need]
                if mode == "plain":
                    out = _plain_surrogate(vol, shape, src, tgt, lo, hi, grad_out[rays, 0])
                    grads = list(torch.autograd.grad(out, inputs))
                else:
                    out = _chunk(vol, lab, shape, src, tgt, lo, hi, mode, n_channels)
                    grads = list(torch.autograd.grad(out, inputs, grad_out[rays]))
            if need_density:
                g = grads.pop(0)
                if mode == "soft":
                    g = g.view(shape[0] + 2, shape[1] + 2, shape[2] + 2)[1:-1, 1:-1, 1:-1]
                grad_density += g
            if need_source:
                if source.shape[0] == 1:
                    grad_source += grads.pop(0)
                else:
                    grad_source[rays] += grads.pop(0)
            if need_target:
                grad_target[rays] += grads.pop(0)
        return grad_density, grad_source, grad_target, None, None, None, None, None, None


def integrate(
    density: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    n_channels: int = 1,
    soft_labels: bool = False,
    box=None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Exact integral over ``t`` in [0, 1] of the trilinear interpolant along each ray.

    Args:
        density: (I, J, K) float volume (float16/bfloat16 are upcast to the rays' dtype); voxel
            ``(i, j, k)`` centred at index coordinates ``(i, j, k)``.
        source: (B, 1, 3) or (B, N, 3) ray starts, index coordinates, float32 or float64.
        target: (B, N, 3) ray ends, index coordinates, the same dtype and device.
        labels: optional (I, J, K) integer labelmap with values in ``[0, n_channels)``.
        n_channels: channels when ``labels`` is given.
        soft_labels: each corner's trilinear weight goes to its own label (default: the nearest
            voxel's label for each point, channel 0 outside the grid).
        box: optional ``((lo0, lo1, lo2), (hi0, hi1, hi2))`` index-space box outside which the
            field is zero (skips work; the result does not depend on it).
        chunk_elements: about this many pieces x 8 corners alive at once.

    Returns:
        (B, C, N) in the rays' dtype (C = ``n_channels`` with labels, else 1): multiply by the
        ray length in mm for the line integral in mm. Differentiable with respect to
        ``density``, ``source`` and ``target``; 0 with zero gradients for rays that miss the
        volume or have zero length.
    """
    if density.dim() != 3:
        raise ValueError(f"density must be (I, J, K), got shape {tuple(density.shape)}")
    if target.dim() != 3 or target.shape[-1] != 3:
        raise ValueError(f"target must be (B, N, 3), got shape {tuple(target.shape)}")
    batch, n_rays, _ = target.shape
    if source.dim() != 3 or source.shape[0] != batch or source.shape[1] not in (1, n_rays) or source.shape[2] != 3:
        raise ValueError(
            f"source must be (B, 1, 3) or (B, N, 3) with B = {batch}, N = {n_rays}, got {tuple(source.shape)}"
        )
    if source.dtype != target.dtype or target.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"source and target must both be float32 or float64, got {source.dtype} and {target.dtype}")
    if labels is not None:
        if labels.shape != density.shape:
            raise ValueError(f"labels must have density's shape {tuple(density.shape)}, got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if not isinstance(n_channels, int) or n_channels < 1:
            raise ValueError(f"n_channels must be a positive int, got {n_channels!r}")
        labels = labels.long()
        mode = "soft" if soft_labels else "hard"
        channels = n_channels
    else:
        mode, channels = "plain", 1
    if density.dtype != target.dtype:
        density = density.to(target.dtype)
    lo, hi = _support(density.shape, box, target.device, target.dtype)
    flat_target = target.reshape(batch * n_rays, 3)
    if source.shape[1] == 1 and batch == 1:
        flat_source = source.reshape(1, 3)
    else:
        flat_source = source.expand(batch, n_rays, 3).reshape(batch * n_rays, 3)
    out = _Exact.apply(density, flat_source, flat_target, labels, channels, mode, lo, hi, chunk_elements)
    return out.reshape(batch, n_rays, channels).transpose(1, 2)
