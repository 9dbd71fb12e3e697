r"""Exact Siddon integrals (nearest-neighbour field) as Triton kernels: forward and backward, then launchers.

The kernels compute exactly ``tritondrr.renderers.siddon.naive.integrate`` (its module docstring
states the maths once): per ray, the clipped interval ``[ta, tb]``, the entry point ``q`` and,
by integration by parts, ``g = tau_b f(tb-) - sum_c tau_c (f(c+) - f(c-))`` over the crossings
``c`` of the planes ``x_a = m + 1/2`` with ``0 < tau_c < tau_b`` (``tau = t - ta``). Each crossing
is independent, so there is no sort and no per-ray list: the crossings of one axis are a
``[BLOCK_R, BLOCK_S]`` block of plane indices ``m_lo + j``; the voxel index along the two other
axes comes from their own crossing parameters (``_index_at``), which makes simultaneous crossings
(edges, corners) telescope exactly.

Backward, with ``w`` the output gradient of the channel of each voxel: per axis the sums
``J_a = sum_c (w f)(c+) - (w f)(c-)`` and ``T_a = sum_c tau_c (...)`` over that axis's crossings
give ``dg/ds_a = -((ta - 1) J_a + T_a) / d_a`` and ``dg/de_a = (ta J_a + T_a) / d_a``; the ends
add the same terms when they are box faces (``ta > 0``: jump ``w f(ta+)`` on the entry axis,
``tb < 1``: jump ``-w f(tb-)`` on the exit axis). The volume gradient is the exact adjoint:
``atomic_add`` of ``+w tau_c`` to the voxel before each crossing, ``-w tau_c`` to the voxel after
it and ``+w tau_b`` to the voxel at ``tb-`` (fp32 atomics, fp64 for fp64 volumes or rays).

Layout: the grid is ``(cdiv(N, BLOCK_R), B)``; a program takes ``BLOCK_R`` consecutive rays of one
pose and loops, per axis, over that block's plane indices in chunks of ``BLOCK_S`` (the loop bound
is the block's largest count). Accumulation is in the rays' dtype whatever the volume's
(fp32/fp16/bf16/fp64 loads are upcast). ``N_CHANNELS`` (constexpr) > 1 routes each crossing's two
terms to the channels of its two voxels (labelmap gathered at the same offsets) through a one-hot
``[BLOCK_R, BLOCK_S, C_PAD]`` reduction; ``N_CHANNELS = 1`` compiles none of it. ``INT64``
(constexpr) turns on int64 offsets when the volume or the rays pass 2^31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _ray_block, interpreting, wrap_launch

__all__ = ["launch_config", "needs_int64", "siddon_backward", "siddon_forward"]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _slab(s, e, lo, hi):
    """Per-axis clip of BLOCK_R rays: d, 1/d (1e30 when parallel), parallel flag, tmin, tmax. [BLOCK_R]"""
    d = e - s
    par = tl.abs(d) < 1e-30  # naive.PARALLEL
    inv = tl.where(par, 1e30, 1.0 / tl.where(par, 1.0, d))
    t_lo = (lo - s) * inv
    t_hi = (hi - s) * inv
    inside = (s >= lo) & (s < hi)  # parallel rays: half-open box, round half up
    tmin = tl.where(par, tl.where(inside, -1e30, 1e30), tl.minimum(t_lo, t_hi))
    tmax = tl.where(par, tl.where(inside, 1e30, -1e30), tl.maximum(t_lo, t_hi))
    return d, par, inv, tmin, tmax


@triton.jit
def _planes(s, d, par, ta, taub, hit, n):
    """Entry point q, q - 1/2, direction flag and the range of plane indices of one axis. [BLOCK_R]"""
    q = s + ta * d
    qh = q - 0.5
    pos = (d > 0) | par
    xe = q + taub * d
    m_lo = tl.maximum(tl.floor(tl.minimum(q, xe) - 0.5), 0.0)
    m_hi = tl.minimum(tl.ceil(tl.maximum(q, xe) - 0.5), n - 2.0)
    live = hit & (par == 0)
    count = tl.where(live, tl.maximum(m_hi - m_lo + 1.0, 0.0), 0.0).to(tl.int32)
    m_lo = tl.where(live, m_lo, 0.0).to(tl.int32)
    return q, qh, pos, m_lo, count


@triton.jit
def _index_at(q, qh, d, inv, pos, tau, n, AFTER: tl.constexpr):
    """Voxel index (float, in [0, n - 1]) along one axis at parameters tau (any shape q.. broadcast to).

    The nearest plane ``h = floor(x)`` has crossed iff ``tau_h <= tau`` (AFTER) or ``tau_h < tau``,
    with ``tau_h`` the exact expression the axis's own crossings use.
    """
    h = tl.floor(q + tau * d)
    tau_h = (h - qh) * inv
    if AFTER:
        crossed = tau_h <= tau
    else:
        crossed = tau_h < tau
    idx = h + tl.where(crossed == pos, 1.0, 0.0)
    return tl.minimum(tl.maximum(idx, 0.0), n - 1.0)


@triton.jit
def _to_index(x, INT64: tl.constexpr):
    if INT64:
        return x.to(tl.int64)
    else:
        return x.to(tl.int32)


@triton.jit
def _end_offsets(
    qx, qhx, dx, invx, posx, qy, qhy, dy, invy, posy, qz, qhz, dz, invz, posz,
    tau, size_i, size_j, size_k, stride_i, stride_j, AFTER: tl.constexpr, INT64: tl.constexpr,
):
    """Flat offsets [BLOCK_R] of the voxels at tau [BLOCK_R], every axis on the same side."""
    ix = _to_index(_index_at(qx, qhx, dx, invx, posx, tau, size_i, AFTER), INT64)
    iy = _to_index(_index_at(qy, qhy, dy, invy, posy, tau, size_j, AFTER), INT64)
    iz = _to_index(_index_at(qz, qhz, dz, invz, posz, tau, size_k, AFTER), INT64)
    return ix * stride_i + iy * stride_j + iz


@triton.jit
def _crossings(
    start, taub,
    qh_a, inv_a, pos_a, mlo_a, cnt_a, n_a, st_a,
    q_b, qh_b, d_b, inv_b, pos_b, n_b, st_b,
    q_c, qh_c, d_c, inv_c, pos_c, n_c, st_c,
    B_AFTER: tl.constexpr, C_AFTER: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """Crossings ``start .. start + BLOCK_S`` of axis a's planes for BLOCK_R rays.

    Returns tau (0 where invalid), valid, and the flat offsets of the voxels before and after
    each crossing. All [BLOCK_R, BLOCK_S].
    """
    j = start + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    m = mlo_a[:, None] + j[None, :]  # [BLOCK_R, BLOCK_S] int32 plane indices
    tau = (m.to(qh_a.dtype) - qh_a[:, None]) * inv_a[:, None]
    valid = (j[None, :] < cnt_a[:, None]) & (tau > 0) & (tau < taub[:, None])
    tau = tl.where(valid, tau, 0.0)
    ib = _index_at(q_b[:, None], qh_b[:, None], d_b[:, None], inv_b[:, None], pos_b[:, None], tau, n_b, B_AFTER)
    ic = _index_at(q_c[:, None], qh_c[:, None], d_c[:, None], inv_c[:, None], pos_c[:, None], tau, n_c, C_AFTER)
    m = tl.maximum(tl.minimum(m, n_a - 2), 0)
    # Voxel before: m for d_a > 0, m + 1 for d_a < 0; after: the other one.
    m_before = m + tl.where(pos_a, 0, 1)[:, None]
    before = _to_index(ib, INT64) * st_b + _to_index(ic, INT64) * st_c + _to_index(m_before, INT64) * st_a
    after = before + tl.where(pos_a, st_a, -st_a)[:, None]
    return tau, valid, before, after


@triton.jit
def _axis_fwd(
    vol_ptr, lab_ptr, acc, taub,
    qh_a, inv_a, pos_a, mlo_a, cnt_a, n_a, st_a,
    q_b, qh_b, d_b, inv_b, pos_b, n_b, st_b,
    q_c, qh_c, d_c, inv_c, pos_c, n_c, st_c,
    B_AFTER: tl.constexpr, C_AFTER: tl.constexpr, N_CHANNELS: tl.constexpr, C_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """Adds -sum_c tau_c (f(c+) - f(c-)) over axis a's crossings to acc ([BLOCK_R] or [BLOCK_R, C_PAD])."""
    CDT = taub.dtype
    for start in range(0, tl.max(cnt_a, axis=0), BLOCK_S):
        tau, valid, before, after = _crossings(
            start, taub,
            qh_a, inv_a, pos_a, mlo_a, cnt_a, n_a, st_a,
            q_b, qh_b, d_b, inv_b, pos_b, n_b, st_b,
            q_c, qh_c, d_c, inv_c, pos_c, n_c, st_c,
            B_AFTER, C_AFTER, BLOCK_S, INT64,
        )  # fmt: skip
        vb = tl.load(vol_ptr + before, mask=valid, other=0.0).to(CDT) * tau  # [BLOCK_R, BLOCK_S]
        va = tl.load(vol_ptr + after, mask=valid, other=0.0).to(CDT) * tau
        if N_CHANNELS == 1:
            acc += tl.sum(vb - va, axis=1)
        else:
            lb = tl.load(lab_ptr + before, mask=valid, other=0)  # [BLOCK_R, BLOCK_S]
            la = tl.load(lab_ptr + after, mask=valid, other=0)
            ch = tl.arange(0, C_PAD)[None, None, :]  # [1, 1, C_PAD]
            part = tl.where(lb[:, :, None] == ch, vb[:, :, None], 0.0)  # [BLOCK_R, BLOCK_S, C_PAD]
            part -= tl.where(la[:, :, None] == ch, va[:, :, None], 0.0)
            acc += tl.sum(part, axis=1)  # [BLOCK_R, C_PAD]
    return acc


@triton.jit
def _ray_setup(
    src_ptr, tgt_ptr, pid_b, rays, mask_r, n_rays, src_stride_b, src_stride_r,
    size_i, size_j, size_k, lo0, lo1, lo2, hi0, hi1, hi2,
):
    """Load BLOCK_R rays and clip them. Returns per-axis constants and the interval. All [BLOCK_R]."""
    src = src_ptr + pid_b * src_stride_b + rays * src_stride_r
    tgt = tgt_ptr + (pid_b * n_rays + rays) * 3
    sx = tl.load(src + 0, mask=mask_r, other=0.0)
    sy = tl.load(src + 1, mask=mask_r, other=0.0)
    sz = tl.load(src + 2, mask=mask_r, other=0.0)
    ex = tl.load(tgt + 0, mask=mask_r, other=0.0)
    ey = tl.load(tgt + 1, mask=mask_r, other=0.0)
    ez = tl.load(tgt + 2, mask=mask_r, other=0.0)
    dx, parx, invx, tminx, tmaxx = _slab(sx, ex, lo0, hi0)
    dy, pary, invy, tminy, tmaxy = _slab(sy, ey, lo1, hi1)
    dz, parz, invz, tminz, tmaxz = _slab(sz, ez, lo2, hi2)
    tmin = tl.maximum(tl.maximum(tminx, tminy), tminz)
    tmax = tl.minimum(tl.minimum(tmaxx, tmaxy), tmaxz)
    ta = tl.maximum(tmin, 0.0)
    tb = tl.minimum(tmax, 1.0)
    hit = mask_r & (tb > ta) & ((parx & pary & parz) == 0)
    ta = tl.where(hit, ta, 0.0)
    tb = tl.where(hit, tb, 0.0)
    taub = tb - ta
    qx, qhx, posx, mlox, cntx = _planes(sx, dx, parx, ta, taub, hit, size_i)
    qy, qhy, posy, mloy, cnty = _planes(sy, dy, pary, ta, taub, hit, size_j)
    qz, qhz, posz, mloz, cntz = _planes(sz, dz, parz, ta, taub, hit, size_k)
    # Axes whose box faces cut the ray at ta / tb (the first on ties, as torch.max / torch.min).
    inx = tminx == tmin
    iny = (tminy == tmin) & (inx == 0)
    outx = tmaxx == tmax
    outy = (tmaxy == tmax) & (outx == 0)
    cut_in = hit & (tmin > 0.0)
    cut_out = hit & (tmax < 1.0)
    return (
        qx, qhx, dx, invx, posx, mlox, cntx,
        qy, qhy, dy, invy, posy, mloy, cnty,
        qz, qhz, dz, invz, posz, mloz, cntz,
        ta, tb, taub, hit, inx, iny, outx, outy, cut_in, cut_out,
    )  # fmt: skip


@triton.jit
def _siddon_fwd_kernel(
    vol_ptr,  # (I, J, K) contiguous, fp32/fp16/bf16/fp64
    lab_ptr,  # (I, J, K) int64 channels (N_CHANNELS > 1), else any pointer (unused)
    src_ptr,  # (B, 1, 3) or (B, N, 3) contiguous, fp32/fp64
    tgt_ptr,  # (B, N, 3) contiguous, same dtype as src
    out_ptr,  # (B, C, N) in the rays' dtype
    n_rays,
    src_stride_b,  # 3 for a shared source, 3 N otherwise
    src_stride_r,  # 0 for a shared source, 3 otherwise
    size_i,
    size_j,
    size_k,
    stride_i,  # J K
    stride_j,  # K
    lo0,
    lo1,
    lo2,
    hi0,
    hi1,
    hi2,
    N_CHANNELS: tl.constexpr,
    C_PAD: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    CDT = src_ptr.dtype.element_ty
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    if INT64:
        pid_b = pid_b.to(tl.int64)
    rays = _ray_block(pid_r, INT64, BLOCK_R)  # [BLOCK_R]
    mask_r = rays < n_rays
    (
        qx, qhx, dx, invx, posx, mlox, cntx,
        qy, qhy, dy, invy, posy, mloy, cnty,
        qz, qhz, dz, invz, posz, mloz, cntz,
        _ta, _tb, taub, hit, _inx, _iny, _outx, _outy, _cut_in, _cut_out,
    ) = _ray_setup(
        src_ptr, tgt_ptr, pid_b, rays, mask_r, n_rays, src_stride_b, src_stride_r,
        size_i, size_j, size_k, lo0, lo1, lo2, hi0, hi1, hi2,
    )  # fmt: skip

    # End term tau_b f(tb-): every axis on its "before" side.
    end = _end_offsets(
        qx, qhx, dx, invx, posx, qy, qhy, dy, invy, posy, qz, qhz, dz, invz, posz,
        taub, size_i, size_j, size_k, stride_i, stride_j, False, INT64,
    )  # fmt: skip
    v_end = tl.load(vol_ptr + end, mask=hit, other=0.0).to(CDT) * taub  # [BLOCK_R]
    if N_CHANNELS == 1:
        acc = v_end
    else:
        ch = tl.arange(0, C_PAD)[None, :]  # [1, C_PAD]
        l_end = tl.load(lab_ptr + end, mask=hit, other=0)
        acc = tl.where(l_end[:, None] == ch, v_end[:, None], 0.0)  # [BLOCK_R, C_PAD]

    # Crossings of each axis; simultaneous crossings in axis order (earlier axes "after").
    acc = _axis_fwd(
        vol_ptr, lab_ptr, acc, taub,
        qhx, invx, posx, mlox, cntx, size_i, stride_i,
        qy, qhy, dy, invy, posy, size_j, stride_j,
        qz, qhz, dz, invz, posz, size_k, 1,
        False, False, N_CHANNELS, C_PAD, BLOCK_S, INT64,
    )  # fmt: skip
    acc = _axis_fwd(
        vol_ptr, lab_ptr, acc, taub,
        qhy, invy, posy, mloy, cnty, size_j, stride_j,
        qx, qhx, dx, invx, posx, size_i, stride_i,
        qz, qhz, dz, invz, posz, size_k, 1,
        True, False, N_CHANNELS, C_PAD, BLOCK_S, INT64,
    )  # fmt: skip
    acc = _axis_fwd(
        vol_ptr, lab_ptr, acc, taub,
        qhz, invz, posz, mloz, cntz, size_k, 1,
        qx, qhx, dx, invx, posx, size_i, stride_i,
        qy, qhy, dy, invy, posy, size_j, stride_j,
        True, True, N_CHANNELS, C_PAD, BLOCK_S, INT64,
    )  # fmt: skip

    odt = out_ptr.dtype.element_ty
    if N_CHANNELS == 1:
        tl.store(out_ptr + pid_b * n_rays + rays, acc.to(odt), mask=mask_r)
    else:
        ch = tl.arange(0, C_PAD)[None, :]
        offs = (pid_b * N_CHANNELS + ch) * n_rays + rays[:, None]  # [BLOCK_R, C_PAD]
        tl.store(out_ptr + offs, acc.to(odt), mask=mask_r[:, None] & (ch < N_CHANNELS))


@triton.jit
def _weights(gout_ptr, lab_ptr, off, gbase, w, n_rays, mask, N_CHANNELS: tl.constexpr):
    """Output gradient of the channel of the voxels at off (any shape), or w if one channel."""
    if N_CHANNELS == 1:
        return w
    else:
        lab = tl.load(lab_ptr + off, mask=mask, other=0)
        return tl.load(gout_ptr + gbase + lab * n_rays, mask=mask, other=0.0).to(w.dtype)


@triton.jit
def _axis_bwd(
    vol_ptr, lab_ptr, gout_ptr, gvol_ptr, w, gbase, n_rays, taub,
    qh_a, inv_a, pos_a, mlo_a, cnt_a, n_a, st_a,
    q_b, qh_b, d_b, inv_b, pos_b, n_b, st_b,
    q_c, qh_c, d_c, inv_c, pos_c, n_c, st_c,
    B_AFTER: tl.constexpr, C_AFTER: tl.constexpr, N_CHANNELS: tl.constexpr,
    NEED_POSE_GRAD: tl.constexpr, NEED_VOLUME_GRAD: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """Axis a's crossings: volume-gradient scatter and the sums J_a, T_a of the weighted jumps. [BLOCK_R]"""
    CDT = taub.dtype
    jsum = tl.zeros_like(taub)
    tsum = tl.zeros_like(taub)
    for start in range(0, tl.max(cnt_a, axis=0), BLOCK_S):
        tau, valid, before, after = _crossings(
            start, taub,
            qh_a, inv_a, pos_a, mlo_a, cnt_a, n_a, st_a,
            q_b, qh_b, d_b, inv_b, pos_b, n_b, st_b,
            q_c, qh_c, d_c, inv_c, pos_c, n_c, st_c,
            B_AFTER, C_AFTER, BLOCK_S, INT64,
        )  # fmt: skip
        wb = _weights(gout_ptr, lab_ptr, before, gbase[:, None], w[:, None], n_rays, valid, N_CHANNELS)
        wa = _weights(gout_ptr, lab_ptr, after, gbase[:, None], w[:, None], n_rays, valid, N_CHANNELS)
        if NEED_VOLUME_GRAD:
            gdt = gvol_ptr.dtype.element_ty
            tl.atomic_add(gvol_ptr + before, (wb * tau).to(gdt), mask=valid, sem="relaxed")
            tl.atomic_add(gvol_ptr + after, (-(wa * tau)).to(gdt), mask=valid, sem="relaxed")
        if NEED_POSE_GRAD:
            vb = tl.load(vol_ptr + before, mask=valid, other=0.0).to(CDT)
            va = tl.load(vol_ptr + after, mask=valid, other=0.0).to(CDT)
            jump = wa * va - wb * vb  # [BLOCK_R, BLOCK_S], 0 where invalid
            jsum += tl.sum(jump, axis=1)
            tsum += tl.sum(jump * tau, axis=1)
    return jsum, tsum


@triton.jit
def _siddon_bwd_kernel(
    vol_ptr,  # (I, J, K) contiguous
    lab_ptr,  # (I, J, K) int64 (N_CHANNELS > 1)
    src_ptr,  # (B, 1, 3) or (B, N, 3)
    tgt_ptr,  # (B, N, 3)
    gout_ptr,  # (B, C, N) contiguous, the rays' dtype
    gsrc_ptr,  # (B, N, 3) per-ray source gradient (summed over rays by the launcher if shared)
    gtgt_ptr,  # (B, N, 3)
    gvol_ptr,  # (I, J, K) fp32/fp64 atomic buffer
    n_rays,
    src_stride_b,
    src_stride_r,
    size_i,
    size_j,
    size_k,
    stride_i,
    stride_j,
    lo0,
    lo1,
    lo2,
    hi0,
    hi1,
    hi2,
    N_CHANNELS: tl.constexpr,
    NEED_POSE_GRAD: tl.constexpr,
    NEED_VOLUME_GRAD: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    CDT = src_ptr.dtype.element_ty
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    if INT64:
        pid_b = pid_b.to(tl.int64)
    rays = _ray_block(pid_r, INT64, BLOCK_R)  # [BLOCK_R]
    mask_r = rays < n_rays
    (
        qx, qhx, dx, invx, posx, mlox, cntx,
        qy, qhy, dy, invy, posy, mloy, cnty,
        qz, qhz, dz, invz, posz, mloz, cntz,
        ta, tb, taub, hit, inx, iny, outx, outy, cut_in, cut_out,
    ) = _ray_setup(
        src_ptr, tgt_ptr, pid_b, rays, mask_r, n_rays, src_stride_b, src_stride_r,
        size_i, size_j, size_k, lo0, lo1, lo2, hi0, hi1, hi2,
    )  # fmt: skip
    gbase = pid_b * N_CHANNELS * n_rays + rays  # [BLOCK_R]: channel 0 of each ray's gradient
    w = tl.load(gout_ptr + gbase, mask=mask_r, other=0.0).to(CDT)  # [BLOCK_R] (channel 0)

    # End voxel at tb- (every axis "before").
    end = _end_offsets(
        qx, qhx, dx, invx, posx, qy, qhy, dy, invy, posy, qz, qhz, dz, invz, posz,
        taub, size_i, size_j, size_k, stride_i, stride_j, False, INT64,
    )  # fmt: skip
    w_end = tl.where(hit, _weights(gout_ptr, lab_ptr, end, gbase, w, n_rays, hit, N_CHANNELS), 0.0)
    if NEED_VOLUME_GRAD:
        tl.atomic_add(gvol_ptr + end, (w_end * taub).to(gvol_ptr.dtype.element_ty), mask=hit, sem="relaxed")

    jx, tx = _axis_bwd(
        vol_ptr, lab_ptr, gout_ptr, gvol_ptr, w, gbase, n_rays, taub,
        qhx, invx, posx, mlox, cntx, size_i, stride_i,
        qy, qhy, dy, invy, posy, size_j, stride_j,
        qz, qhz, dz, invz, posz, size_k, 1,
        False, False, N_CHANNELS, NEED_POSE_GRAD, NEED_VOLUME_GRAD, BLOCK_S, INT64,
    )  # fmt: skip
    jy, ty = _axis_bwd(
        vol_ptr, lab_ptr, gout_ptr, gvol_ptr, w, gbase, n_rays, taub,
        qhy, invy, posy, mloy, cnty, size_j, stride_j,
        qx, qhx, dx, invx, posx, size_i, stride_i,
        qz, qhz, dz, invz, posz, size_k, 1,
        True, False, N_CHANNELS, NEED_POSE_GRAD, NEED_VOLUME_GRAD, BLOCK_S, INT64,
    )  # fmt: skip
    jz, tz = _axis_bwd(
        vol_ptr, lab_ptr, gout_ptr, gvol_ptr, w, gbase, n_rays, taub,
        qhz, invz, posz, mloz, cntz, size_k, 1,
        qx, qhx, dx, invx, posx, size_i, stride_i,
        qy, qhy, dy, invy, posy, size_j, stride_j,
        True, True, N_CHANNELS, NEED_POSE_GRAD, NEED_VOLUME_GRAD, BLOCK_S, INT64,
    )  # fmt: skip

    if NEED_POSE_GRAD:
        # Box faces at the ends: the field jumps from 0 to f(ta+) and from f(tb-) to 0.
        start = _end_offsets(
            qx, qhx, dx, invx, posx, qy, qhy, dy, invy, posy, qz, qhz, dz, invz, posz,
            tl.zeros_like(taub), size_i, size_j, size_k, stride_i, stride_j, True, INT64,
        )  # fmt: skip
        w_in = _weights(gout_ptr, lab_ptr, start, gbase, w, n_rays, cut_in, N_CHANNELS)
        j_in = tl.where(cut_in, w_in * tl.load(vol_ptr + start, mask=cut_in, other=0.0).to(CDT), 0.0)
        j_out = tl.where(cut_out, -w_end * tl.load(vol_ptr + end, mask=cut_out, other=0.0).to(CDT), 0.0)
        # Per axis: jumps at crossings and, on the entry/exit axis, at the ends.
        inz = (inx == 0) & (iny == 0)
        outz = (outx == 0) & (outy == 0)
        ein_x = tl.where(inx, j_in, 0.0)
        ein_y = tl.where(iny, j_in, 0.0)
        ein_z = tl.where(inz, j_in, 0.0)
        eout_x = tl.where(outx, j_out, 0.0)
        eout_y = tl.where(outy, j_out, 0.0)
        eout_z = tl.where(outz, j_out, 0.0)
        gsx = -((ta - 1.0) * (jx + ein_x) + tx + (tb - 1.0) * eout_x) * invx
        gsy = -((ta - 1.0) * (jy + ein_y) + ty + (tb - 1.0) * eout_y) * invy
        gsz = -((ta - 1.0) * (jz + ein_z) + tz + (tb - 1.0) * eout_z) * invz
        gex = (ta * (jx + ein_x) + tx + tb * eout_x) * invx
        gey = (ta * (jy + ein_y) + ty + tb * eout_y) * invy
        gez = (ta * (jz + ein_z) + tz + tb * eout_z) * invz
        gdt = gsrc_ptr.dtype.element_ty
        o = (pid_b * n_rays + rays) * 3  # [BLOCK_R]
        tl.store(gsrc_ptr + o + 0, gsx.to(gdt), mask=mask_r)
        tl.store(gsrc_ptr + o + 1, gsy.to(gdt), mask=mask_r)
        tl.store(gsrc_ptr + o + 2, gsz.to(gdt), mask=mask_r)
        tl.store(gtgt_ptr + o + 0, gex.to(gdt), mask=mask_r)
        tl.store(gtgt_ptr + o + 1, gey.to(gdt), mask=mask_r)
        tl.store(gtgt_ptr + o + 2, gez.to(gdt), mask=mask_r)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------




def needs_int64(shape: tuple[int, int, int], n_ray_elements: int) -> bool:
    """int64 offsets when a volume offset, a ray-buffer offset (B N 3) or an output offset
    (B C N) can pass 2^31 - 1."""
    i, j, k = shape
    return i * j * k >= 2**31 or n_ray_elements + 3 >= 2**31


def launch_config(n_rays: int, n_channels: int = 1, backward: bool = False) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_S, num_warps)``.

    Under the interpreter each Triton op costs ~25 us per program whatever the block, so big
    blocks. On a GPU a starting point (not tuned on hardware): 32 rays x 32 planes, halved in
    planes per power of two of channels beyond 4 (the one-hot block is BLOCK_R BLOCK_S C_PAD).
    """
    r_pow2 = triton.next_power_of_2(max(n_rays, 1))
    c_pad = triton.next_power_of_2(max(n_channels, 1))
    if interpreting():
        return min(128, max(16, r_pow2)), 32, 1
    block_s = 32 if n_channels == 1 or backward else max(1, 32 * 4 // max(c_pad, 4))
    return min(32, max(16, r_pow2)), max(block_s, 2), 4


def _grid_box(shape, lo, hi) -> list[float]:
    """The clip box: the grid's [-1/2, n - 1/2] per axis, intersected with (lo, hi) if given."""
    box = [-0.5, -0.5, -0.5, shape[0] - 0.5, shape[1] - 0.5, shape[2] - 0.5]
    if lo is not None:
        box[:3] = [max(a, float(b)) for a, b in zip(box[:3], lo)]
        box[3:] = [min(a, float(b)) for a, b in zip(box[3:], hi)]
    return box


def _common_args(density, source, target, lo, hi):
    n_rays = target.shape[1]
    size_i, size_j, size_k = density.shape
    shared = source.shape[1] == 1
    args = (
        n_rays,
        3 if shared else 3 * n_rays,
        0 if shared else 3,
        size_i,
        size_j,
        size_k,
        size_j * size_k,
        size_k,
        *_grid_box(density.shape, lo, hi),
    )
    return args




def siddon_forward(
    density: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor | None = None,
    n_channels: int = 1,
    lo=None,
    hi=None,
    *,
    out: torch.Tensor | None = None,
    block_r: int | None = None,
    block_s: int | None = None,
) -> torch.Tensor:
    """Launch the forward kernel. Inputs must be validated and contiguous (``tritondrr.renderers.siddon.op``).

    Args:
        density: (I, J, K) contiguous volume (fp32/fp16/bf16/fp64).
        source: (B, 1, 3) or (B, N, 3) contiguous, index coordinates, fp32/fp64.
        target: (B, N, 3) contiguous, same dtype.
        labels: (I, J, K) contiguous int64 channels in [0, n_channels) (used when n_channels > 1).
        lo, hi: optional 3 floats each, a box outside which the field is zero (skips work).
        out: optional (B, C, N) output buffer (tests pass a NaN-filled one).
        block_r, block_s: override the launch heuristic (tests of the tail masks).

    Returns:
        (B, C, N) in the rays' dtype.
    """
    batch, n_rays, _ = target.shape
    if out is None:
        out = torch.empty((batch, n_channels, n_rays), device=target.device, dtype=target.dtype)
    if batch == 0 or n_rays == 0:
        return out
    br, bs, warps = launch_config(n_rays, n_channels)
    br, bs = block_r or br, block_s or bs
    int64 = needs_int64(tuple(density.shape), batch * n_rays * max(3, n_channels))
    grid = (triton.cdiv(n_rays, br), batch)
    wrap_launch(_siddon_fwd_kernel)[grid](
        density,
        labels if n_channels > 1 else density,
        source,
        target,
        out,
        *_common_args(density, source, target, lo, hi),
        N_CHANNELS=n_channels,
        C_PAD=triton.next_power_of_2(n_channels),
        INT64=int64,
        BLOCK_R=br,
        BLOCK_S=bs,
        num_warps=warps,
    )
    return out


def siddon_backward(
    grad_out: torch.Tensor,
    density: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor | None = None,
    n_channels: int = 1,
    lo=None,
    hi=None,
    *,
    need_pose: bool,
    need_volume: bool,
    block_r: int | None = None,
    block_s: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel: ``(grad_density, grad_source, grad_target)``, None where not asked.

    ``grad_out`` is (B, C, N) contiguous in the rays' dtype. ``grad_source`` has ``source``'s shape
    (summed over rays for a shared source). ``grad_density`` has ``density``'s dtype, accumulated
    with fp32 atomics (fp64 when the volume or the rays are fp64).
    """
    batch, n_rays, _ = target.shape
    dev, rdt = target.device, target.dtype
    grad_src = grad_tgt = grad_vol = None
    if need_pose:
        grad_src = torch.empty((batch, n_rays, 3), device=dev, dtype=rdt)
        grad_tgt = torch.empty((batch, n_rays, 3), device=dev, dtype=rdt)
    if need_volume:
        acc = torch.float64 if torch.float64 in (density.dtype, rdt) else torch.float32
        grad_vol = torch.zeros(density.shape, device=dev, dtype=acc)
    if (need_pose or need_volume) and batch > 0 and n_rays > 0:
        br, bs, warps = launch_config(n_rays, n_channels, backward=True)
        br, bs = block_r or br, block_s or bs
        int64 = needs_int64(tuple(density.shape), batch * n_rays * max(3, n_channels))
        grid = (triton.cdiv(n_rays, br), batch)
        dummy = grad_out  # stands in for buffers a specialisation never touches
        wrap_launch(_siddon_bwd_kernel)[grid](
            density,
            labels if n_channels > 1 else density,
            source,
            target,
            grad_out,
            grad_src if need_pose else dummy,
            grad_tgt if need_pose else dummy,
            grad_vol if need_volume else dummy,
            *_common_args(density, source, target, lo, hi),
            N_CHANNELS=n_channels,
            NEED_POSE_GRAD=need_pose,
            NEED_VOLUME_GRAD=need_volume,
            INT64=int64,
            BLOCK_R=br,
            BLOCK_S=bs,
            num_warps=warps,
        )
    if need_pose and source.shape[1] == 1:
        grad_src = grad_src.sum(dim=1, keepdim=True)
    if need_volume:
        grad_vol = grad_vol.to(density.dtype)
    return grad_vol, grad_src, grad_tgt
