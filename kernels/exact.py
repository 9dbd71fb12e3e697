r"""Exact line integrals of the trilinear interpolant: forward and backward Triton kernels, then launchers.

The kernels compute ``tritondrr.renderers.exact.naive.integrate``: for pose ``b`` and ray ``r``
with source ``s`` (shared per pose or per ray) and target ``e`` in index coordinates,
``g_c = int_0^1 f_c(s + t d) dt`` with ``d = e - s``, ``f`` the tent interpolant of the
zero-extended grid and ``c`` the label channel (one channel without labels).

Traversal (Amanatides-Woo in lockstep over a block of rays). The ray is clipped to the box
(``[t0, t1]``; misses and zero-length rays get ``t0 = t1 = 0``). Each axis ``a`` keeps its next
plane ``n_a h`` (``h = 1``, or ``1/2`` with hard labels, whose nearest voxel changes at
half-integers) in the direction of travel and that plane's crossing ``t_a = (n_a h - s_a) / d_a``
(recomputed from ``n_a``, never accumulated). A step takes the piece
``[tp, tn = min(t_x, t_y, t_z, t1)]`` and advances the first axis attaining the minimum.
Inside a piece the ray stays in one cell ``[c, c + 1]^3`` (``c = floor`` of the piece's
midpoint), where ``f`` is a cubic in ``t``; the two-point Gauss-Legendre rule (nodes
``mid -+ h / (2 sqrt 3)``, both inside the piece, weights ``h / 2``) integrates it exactly from
the cell's 8 corners, loaded once per piece. The loop runs ``max over the block of the number of
crossings + 2`` steps (closed-form counts); steps past ``t1`` are empty pieces without loads.

Labels (``LABEL_MODE``: 0 none, 1 hard, 2 soft; ``N_CHANNELS`` constexpr): hard labels send each
piece to the channel of its midpoint's nearest voxel (round half to even; channel 0 outside the
grid); soft labels send each corner's Gauss-integrated weight ``W_c = h/2 (w_c(x_1) + w_c(x_2))``
to the corner's own label.

Backward, with ``w_c = dLoss/dg_c`` and ``phi`` the field weighted by them (``w f`` without
labels; ``w_label f`` per piece for hard labels; the trilinear interpolant of
``V_k w_label(k)`` for soft labels)::

    dLoss/ds = int (1 - t) grad phi dt + sum_breaks [phi] dt/ds,   dLoss/de = int t grad phi dt + sum_breaks [phi] dt/de

The integrand ``t grad phi`` is a cubic on each piece (the gradient of a trilinear function is
bilinear in the other two coordinates), so the same two nodes integrate it exactly:
``G = sum h/2 sum_nodes grad phi``, ``U = sum h/2 sum_nodes x grad phi``, ``dLoss/ds = G - U``
and ``dLoss/de = U`` plus the break terms. ``[phi]`` is the jump of ``phi`` at a break point:
``phi`` is continuous at integer planes (no term), jumps at the clip ends (``+phi(t1) dt1 -
phi(t0) dt0``) and, with hard labels, at half-integer planes where the label changes. A break
on the plane ``P`` of axis ``a`` (a clip face or a crossing) has ``t = (P - s_a) / d_a``, so
``dt/ds_a = (t - 1) / d_a`` and ``dt/de_a = -t / d_a``; the clip ends follow ``clip_rays``'s
autograd (ties share the gradient, clamps at 0 and 1 stop it). The volume gradient is the exact
adjoint: ``W_c`` times the channel weight, scattered with ``atomic_add`` (fp32, or fp64 for
fp64 volumes) under the same masks as the loads.

Layout: grid ``(cdiv(N, BLOCK_R), B)``, one ray per lane, accumulation in the rays' dtype,
fp32/fp16/bf16/fp64 volume loads upcast; ``INT64`` turns on 64-bit offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _load8, interpreting, wrap_launch

__all__ = ["TINY", "exact_backward", "exact_forward", "needs_int64"]

#: Must equal ``tritondrr.renderers.exact.naive.TINY``.
TINY = 1e-12
#: Two-point Gauss-Legendre node offset on [0, 1] around the midpoint: 1 / (2 sqrt 3).
GAUSS = 0.28867513459481287


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _clip_axis(s, e, lo, hi):
    """Slab of one axis. s, e: [BLOCK_R]. Returns d, dm (|d| < TINY replaced), tmin, tmax, moving."""
    d = e - s
    moving = tl.abs(d) >= 1e-12  # TINY
    dm = tl.where(moving, d, 1e-12)
    t_lo = (lo - s) / dm
    t_hi = (hi - s) / dm
    return d, dm, tl.minimum(t_lo, t_hi), tl.maximum(t_lo, t_hi), moving


@triton.jit
def _axis_start(s, d, moving, t0, t1, spacing):
    """First plane index after p(t0) in the direction of travel, its sign step, and the count of
    planes strictly between p(t0) and p(t1). All [BLOCK_R] (float integers)."""
    q0 = (s + t0 * d) / spacing
    q1 = (s + t1 * d) / spacing
    pos = d > 0
    n0 = tl.where(pos, tl.floor(q0) + 1.0, tl.ceil(q0) - 1.0)
    sign = tl.where(pos, 1.0, -1.0)
    count = tl.where(pos, tl.ceil(q1) - n0, n0 - tl.floor(q1))
    count = tl.where(moving, tl.maximum(count, 0.0), 0.0)
    return n0, sign, count


@triton.jit
def _cross(n, s, dm, moving, spacing):
    """Crossing parameter of plane ``n * spacing`` (2.0, i.e. never, for a still axis). [BLOCK_R]"""
    return tl.where(moving, (n * spacing - s) / dm, 2.0)


@triton.jit
def _cell(x, n, INT64: tl.constexpr):
    """Cell of coordinate x on an axis of n voxels: base index, corner masks (i0, i0 + 1 in grid)."""
    # Clamping to [-2, n + 1] keeps the float -> int conversion in range for stray points.
    fl = tl.floor(tl.minimum(tl.maximum(x, -2.0), n + 1.0))
    if INT64:
        i0 = fl.to(tl.int64)
    else:
        i0 = fl.to(tl.int32)
    return fl, i0, (i0 >= 0) & (i0 < n), (i0 >= -1) & (i0 < n - 1)


@triton.jit
def _nearest(x, n, INT64: tl.constexpr):
    """Nearest voxel index (round half to even) and whether it is in the grid. [BLOCK_R]"""
    fl = tl.floor(tl.minimum(tl.maximum(x, -2.0), n + 1.0))
    frac = x - fl  # exact
    odd = (fl - 2.0 * tl.floor(0.5 * fl)) != 0.0
    r = tl.where((frac > 0.5) | ((frac == 0.5) & odd), fl + 1.0, fl)
    if INT64:
        i = r.to(tl.int64)
    else:
        i = r.to(tl.int32)
    return i, (i >= 0) & (i < n)


@triton.jit
def _trilinear(v000, v001, v010, v011, v100, v101, v110, v111, fx, fy, fz):
    """Value of the trilinear function with those corners at fractions (fx, fy, fz). [BLOCK_R]"""
    c00 = v000 + fz * (v001 - v000)
    c01 = v010 + fz * (v011 - v010)
    c10 = v100 + fz * (v101 - v100)
    c11 = v110 + fz * (v111 - v110)
    c0 = c00 + fy * (c01 - c00)
    c1 = c10 + fy * (c11 - c10)
    return c0 + fx * (c1 - c0)


@triton.jit
def _trilinear_grad(v000, v001, v010, v011, v100, v101, v110, v111, fx, fy, fz):
    """Value and gradient (gx, gy, gz) of the trilinear function at (fx, fy, fz). Each [BLOCK_R]."""
    c00 = v000 + fz * (v001 - v000)
    c01 = v010 + fz * (v011 - v010)
    c10 = v100 + fz * (v101 - v100)
    c11 = v110 + fz * (v111 - v110)
    e0 = (v001 - v000) + fy * ((v011 - v010) - (v001 - v000))  # d/dz at i = 0
    e1 = (v101 - v100) + fy * ((v111 - v110) - (v101 - v100))  # d/dz at i = 1
    c0 = c00 + fy * (c01 - c00)
    c1 = c10 + fy * (c11 - c10)
    f = c0 + fx * (c1 - c0)
    gx = c1 - c0
    gy = (c01 - c00) + fx * ((c11 - c10) - (c01 - c00))
    gz = e0 + fx * (e1 - e0)
    return f, gx, gy, gz


@triton.jit
def _weights8(fx1, fy1, fz1, fx2, fy2, fz2, hh):
    """Gauss-integrated corner weights W_abc = hh (w_abc(node 1) + w_abc(node 2)). Each [BLOCK_R]."""
    a00_1 = (1.0 - fy1) * (1.0 - fz1)
    a01_1 = (1.0 - fy1) * fz1
    a10_1 = fy1 * (1.0 - fz1)
    a11_1 = fy1 * fz1
    a00_2 = (1.0 - fy2) * (1.0 - fz2)
    a01_2 = (1.0 - fy2) * fz2
    a10_2 = fy2 * (1.0 - fz2)
    a11_2 = fy2 * fz2
    gx1 = 1.0 - fx1
    gx2 = 1.0 - fx2
    w000 = hh * (gx1 * a00_1 + gx2 * a00_2)
    w001 = hh * (gx1 * a01_1 + gx2 * a01_2)
    w010 = hh * (gx1 * a10_1 + gx2 * a10_2)
    w011 = hh * (gx1 * a11_1 + gx2 * a11_2)
    w100 = hh * (fx1 * a00_1 + fx2 * a00_2)
    w101 = hh * (fx1 * a01_1 + fx2 * a01_2)
    w110 = hh * (fx1 * a10_1 + fx2 * a10_2)
    w111 = hh * (fx1 * a11_1 + fx2 * a11_2)
    return w000, w001, w010, w011, w100, w101, w110, w111


@triton.jit
def _ray_setup(
    src_ptr, tgt_ptr, pid_b, rays, mask_r, n_rays, src_stride_b, src_stride_r,
    lo0, lo1, lo2, hi0, hi1, hi2, spacing,
):  # fmt: skip
    """Load BLOCK_R rays, clip them, start the traversal. Returns a tuple of [BLOCK_R] values."""
    src = src_ptr + pid_b * src_stride_b + rays * src_stride_r
    tgt = tgt_ptr + (pid_b * n_rays + rays) * 3
    sx = tl.load(src + 0, mask=mask_r, other=0.0)
    sy = tl.load(src + 1, mask=mask_r, other=0.0)
    sz = tl.load(src + 2, mask=mask_r, other=0.0)
    ex = tl.load(tgt + 0, mask=mask_r, other=0.0)
    ey = tl.load(tgt + 1, mask=mask_r, other=0.0)
    ez = tl.load(tgt + 2, mask=mask_r, other=0.0)
    dx, dmx, tmin_x, tmax_x, movx = _clip_axis(sx, ex, lo0, hi0)
    dy, dmy, tmin_y, tmax_y, movy = _clip_axis(sy, ey, lo1, hi1)
    dz, dmz, tmin_z, tmax_z, movz = _clip_axis(sz, ez, lo2, hi2)
    t0m = tl.maximum(tl.maximum(tmin_x, tmin_y), tmin_z)
    t1m = tl.minimum(tl.minimum(tmax_x, tmax_y), tmax_z)
    t0 = tl.maximum(t0m, 0.0)
    t1 = tl.minimum(t1m, 1.0)
    hit = mask_r & (t1 > t0) & (movx | movy | movz)
    t0 = tl.where(hit, t0, 0.0)
    t1 = tl.where(hit, t1, 0.0)
    nx, gx, cx = _axis_start(sx, dx, movx, t0, t1, spacing)
    ny, gy, cy = _axis_start(sy, dy, movy, t0, t1, spacing)
    nz, gz, cz = _axis_start(sz, dz, movz, t0, t1, spacing)
    return (
        sx, sy, sz, dx, dy, dz, dmx, dmy, dmz, movx, movy, movz,
        tmin_x, tmin_y, tmin_z, tmax_x, tmax_y, tmax_z, t0m, t1m,
        t0, t1, hit, nx, ny, nz, gx, gy, gz, cx + cy + cz,
    )  # fmt: skip


@triton.jit
def _piece(
    tp, tn, live, sx, sy, sz, dx, dy, dz, size_i, size_j, size_k, stride_i, stride_j,
    INT64: tl.constexpr,
):  # fmt: skip
    """Cell of the piece [tp, tn] and the fractions of its two Gauss nodes.

    Returns the corner offset and masks (``live`` included), h, mid, the nodes x1, x2
    (parameters), the cell corner (clx, cly, clz) and the node fractions. Each [BLOCK_R].
    """
    h = tn - tp
    mid = 0.5 * (tp + tn)
    x1 = mid - 0.28867513459481287 * h  # GAUSS
    x2 = mid + 0.28867513459481287 * h
    clx, ix, mi0, mi1 = _cell(sx + mid * dx, size_i, INT64)
    cly, iy, mj0, mj1 = _cell(sy + mid * dy, size_j, INT64)
    clz, iz, mk0, mk1 = _cell(sz + mid * dz, size_k, INT64)
    off = ix * stride_i + iy * stride_j + iz
    m00 = live & mj0 & mk0
    m01 = live & mj0 & mk1
    m10 = live & mj1 & mk0
    m11 = live & mj1 & mk1
    fx1 = sx + x1 * dx - clx
    fy1 = sy + x1 * dy - cly
    fz1 = sz + x1 * dz - clz
    fx2 = sx + x2 * dx - clx
    fy2 = sy + x2 * dy - cly
    fz2 = sz + x2 * dz - clz
    return off, mi0, mi1, m00, m01, m10, m11, h, mid, x1, x2, clx, cly, clz, fx1, fy1, fz1, fx2, fy2, fz2


@triton.jit
def _advance(tp, t1, tx, ty, tz, nx, ny, nz, gx, gy, gz, sx, sy, sz, dmx, dmy, dmz, movx, movy, movz, spacing):
    """One traversal step: the piece end tn, the advancing axis flags and the updated planes."""
    tn = tl.minimum(tl.minimum(tl.maximum(tl.minimum(tl.minimum(tx, ty), tz), tp), t1), 1.0)
    ax = (tx <= ty) & (tx <= tz)  # ties: x, then y, then z
    ay = (ty < tx) & (ty <= tz)
    az = (tz < tx) & (tz < ty)
    nx = tl.where(ax, nx + gx, nx)
    ny = tl.where(ay, ny + gy, ny)
    nz = tl.where(az, nz + gz, nz)
    tx = tl.where(ax, _cross(nx, sx, dmx, movx, spacing), tx)
    ty = tl.where(ay, _cross(ny, sy, dmy, movy, spacing), ty)
    tz = tl.where(az, _cross(nz, sz, dmz, movz, spacing), tz)
    return tn, ax, ay, az, tx, ty, tz, nx, ny, nz


@triton.jit
def _exact_fwd_kernel(
    vol_ptr,  # (I, J, K) contiguous, fp32/fp16/bf16/fp64
    lab_ptr,  # (I, J, K) int64 labels (LABEL_MODE > 0), else any pointer (unused)
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
    LABEL_MODE: tl.constexpr,  # 0 none, 1 hard, 2 soft
    N_CHANNELS: tl.constexpr,
    CH_BLOCK: tl.constexpr,  # next power of two >= N_CHANNELS
    INT64: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    CDT = src_ptr.dtype.element_ty
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    if INT64:
        pid_b = pid_b.to(tl.int64)
        pid_r = pid_r.to(tl.int64)
    rays = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    mask_r = rays < n_rays
    if LABEL_MODE == 1:
        spacing = 0.5  # the nearest voxel changes at half-integer planes
    else:
        spacing = 1.0
    (
        sx, sy, sz, dx, dy, dz, dmx, dmy, dmz, movx, movy, movz,
        _tmin_x, _tmin_y, _tmin_z, _tmax_x, _tmax_y, _tmax_z, _t0m, _t1m,
        t0, t1, hit, nx, ny, nz, gx, gy, gz, n_cross,
    ) = _ray_setup(
        src_ptr, tgt_ptr, pid_b, rays, mask_r, n_rays, src_stride_b, src_stride_r,
        lo0, lo1, lo2, hi0, hi1, hi2, spacing,
    )  # fmt: skip
    tx = _cross(nx, sx, dmx, movx, spacing)
    ty = _cross(ny, sy, dmy, movy, spacing)
    tz = _cross(nz, sz, dmz, movz, spacing)
    n_steps = tl.max(n_cross.to(tl.int32), axis=0) + 2  # pieces = crossings + 1, one more for rounding
    ch = tl.arange(0, CH_BLOCK)  # [CH_BLOCK]
    acc = tl.zeros([BLOCK_R], dtype=CDT)
    acc_c = tl.zeros([BLOCK_R, CH_BLOCK], dtype=CDT)
    tp = t0
    for step in range(n_steps):
        tn, _ax, _ay, _az, tx, ty, tz, nx, ny, nz = _advance(
            tp, t1, tx, ty, tz, nx, ny, nz, gx, gy, gz, sx, sy, sz, dmx, dmy, dmz, movx, movy, movz, spacing
        )
        off, mi0, mi1, m00, m01, m10, m11, h, mid, _x1, _x2, _clx, _cly, _clz, fx1, fy1, fz1, fx2, fy2, fz2 = _piece(
            tp, tn, hit & (tn > tp), sx, sy, sz, dx, dy, dz, size_i, size_j, size_k, stride_i, stride_j, INT64
        )
        v000, v001, v010, v011, v100, v101, v110, v111 = _load8(
            vol_ptr, off, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT
        )
        hh = 0.5 * h
        if LABEL_MODE == 2:
            l000, l001, l010, l011, l100, l101, l110, l111 = _load8(
                lab_ptr, off, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, tl.int32
            )
            w000, w001, w010, w011, w100, w101, w110, w111 = _weights8(fx1, fy1, fz1, fx2, fy2, fz2, hh)
            acc_c += tl.where(ch[None, :] == l000[:, None], (w000 * v000)[:, None], 0.0)
            acc_c += tl.where(ch[None, :] == l001[:, None], (w001 * v001)[:, None], 0.0)
            acc_c += tl.where(ch[None, :] == l010[:, None], (w010 * v010)[:, None], 0.0)
            acc_c += tl.where(ch[None, :] == l011[:, None], (w011 * v011)[:, None], 0.0)
            acc_c += tl.where(ch[None, :] == l100[:, None], (w100 * v100)[:, None], 0.0)
            acc_c += tl.where(ch[None, :] == l101[:, None], (w101 * v101)[:, None], 0.0)
            acc_c += tl.where(ch[None, :] == l110[:, None], (w110 * v110)[:, None], 0.0)
            acc_c += tl.where(ch[None, :] == l111[:, None], (w111 * v111)[:, None], 0.0)
        else:
            f1 = _trilinear(v000, v001, v010, v011, v100, v101, v110, v111, fx1, fy1, fz1)
            f2 = _trilinear(v000, v001, v010, v011, v100, v101, v110, v111, fx2, fy2, fz2)
            piece = hh * (f1 + f2)  # [BLOCK_R]
            if LABEL_MODE == 1:
                vi, ini = _nearest(sx + mid * dx, size_i, INT64)
                vj, inj = _nearest(sy + mid * dy, size_j, INT64)
                vk, ink = _nearest(sz + mid * dz, size_k, INT64)
                inside = hit & (h > 0) & ini & inj & ink
                label = tl.load(lab_ptr + vi * stride_i + vj * stride_j + vk, mask=inside, other=0).to(tl.int32)
                acc_c += tl.where(ch[None, :] == label[:, None], piece[:, None], 0.0)
            else:
                acc += piece
        tp = tn
    gdt = out_ptr.dtype.element_ty
    if LABEL_MODE == 0:
        tl.store(out_ptr + pid_b * n_rays + rays, acc.to(gdt), mask=mask_r)
    else:
        o = (pid_b * N_CHANNELS + ch[None, :]) * n_rays + rays[:, None]  # [BLOCK_R, CH_BLOCK]
        tl.store(out_ptr + o, acc_c.to(gdt), mask=mask_r[:, None] & (ch[None, :] < N_CHANNELS))


@triton.jit
def _slab_grad(t, dm, moving):
    """dt/ds_a and dt/de_a of a break t = (P - s_a) / dm_a. [BLOCK_R]"""
    return tl.where(moving, (t - 1.0) / dm, -1.0 / dm), tl.where(moving, -t / dm, 0.0)


@triton.jit
def _scatter(ptr, val, mask):
    tl.atomic_add(ptr, val.to(ptr.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _channel_weight(wc, label, ch):
    """The weight of each ray's channel ``label``: wc [R, CH] -> [R]."""
    return tl.sum(tl.where(ch[None, :] == label[:, None], wc, 0.0), axis=1)


@triton.jit
def _exact_bwd_kernel(
    vol_ptr,  # (I, J, K) contiguous
    lab_ptr,  # (I, J, K) int64 labels (LABEL_MODE > 0)
    src_ptr,  # (B, 1, 3) or (B, N, 3)
    tgt_ptr,  # (B, N, 3)
    grad_out_ptr,  # (B, C, N) contiguous, the rays' dtype
    grad_src_ptr,  # (B, N, 3) per-ray source gradient (summed over rays by the launcher if shared)
    grad_tgt_ptr,  # (B, N, 3)
    grad_vol_ptr,  # (I, J, K) fp32 / fp64 atomic buffer
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
    LABEL_MODE: tl.constexpr,
    N_CHANNELS: tl.constexpr,
    CH_BLOCK: tl.constexpr,
    NEED_POSE_GRAD: tl.constexpr,
    NEED_VOLUME_GRAD: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    CDT = src_ptr.dtype.element_ty
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    if INT64:
        pid_b = pid_b.to(tl.int64)
        pid_r = pid_r.to(tl.int64)
    rays = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    mask_r = rays < n_rays
    if LABEL_MODE == 1:
        spacing = 0.5
    else:
        spacing = 1.0
    (
        sx, sy, sz, dx, dy, dz, dmx, dmy, dmz, movx, movy, movz,
        tmin_x, tmin_y, tmin_z, tmax_x, tmax_y, tmax_z, t0m, t1m,
        t0, t1, hit, nx, ny, nz, gx, gy, gz, n_cross,
    ) = _ray_setup(
        src_ptr, tgt_ptr, pid_b, rays, mask_r, n_rays, src_stride_b, src_stride_r,
        lo0, lo1, lo2, hi0, hi1, hi2, spacing,
    )  # fmt: skip
    tx = _cross(nx, sx, dmx, movx, spacing)
    ty = _cross(ny, sy, dmy, movy, spacing)
    tz = _cross(nz, sz, dmz, movz, spacing)
    n_steps = tl.max(n_cross.to(tl.int32), axis=0) + 2
    ch = tl.arange(0, CH_BLOCK)  # [CH_BLOCK]
    if LABEL_MODE == 0:
        w = tl.load(grad_out_ptr + pid_b * n_rays + rays, mask=mask_r, other=0.0).to(CDT)  # [BLOCK_R]
        wc = tl.zeros([BLOCK_R, CH_BLOCK], dtype=CDT)  # unused
    else:
        o = (pid_b * N_CHANNELS + ch[None, :]) * n_rays + rays[:, None]  # [BLOCK_R, CH_BLOCK]
        wc = tl.load(grad_out_ptr + o, mask=mask_r[:, None] & (ch[None, :] < N_CHANNELS), other=0.0).to(CDT)
        w = tl.full([BLOCK_R], 1.0, CDT)  # the channel weights are inside phi

    # Clip-end derivatives (clip_rays' autograd: the argmax / argmin axes share, clamps gate).
    sel0x = (tmin_x == t0m).to(CDT)
    sel0y = (tmin_y == t0m).to(CDT)
    sel0z = (tmin_z == t0m).to(CDT)
    gate0 = tl.where(hit & (t0m >= 0.0), 1.0 / (sel0x + sel0y + sel0z), 0.0)
    sel1x = (tmax_x == t1m).to(CDT)
    sel1y = (tmax_y == t1m).to(CDT)
    sel1z = (tmax_z == t1m).to(CDT)
    gate1 = tl.where(hit & (t1m <= 1.0), 1.0 / (sel1x + sel1y + sel1z), 0.0)
    a, b = _slab_grad(tmin_x, dmx, movx)
    d0sx, d0ex = gate0 * sel0x * a, gate0 * sel0x * b
    a, b = _slab_grad(tmin_y, dmy, movy)
    d0sy, d0ey = gate0 * sel0y * a, gate0 * sel0y * b
    a, b = _slab_grad(tmin_z, dmz, movz)
    d0sz, d0ez = gate0 * sel0z * a, gate0 * sel0z * b
    a, b = _slab_grad(tmax_x, dmx, movx)
    d1sx, d1ex = gate1 * sel1x * a, gate1 * sel1x * b
    a, b = _slab_grad(tmax_y, dmy, movy)
    d1sy, d1ey = gate1 * sel1y * a, gate1 * sel1y * b
    a, b = _slab_grad(tmax_z, dmz, movz)
    d1sz, d1ez = gate1 * sel1z * a, gate1 * sel1z * b

    zero = tl.zeros([BLOCK_R], dtype=CDT)
    gax, gay, gaz, uax, uay, uaz = zero, zero, zero, zero, zero, zero  # G and U of the docstring
    bsx, bsy, bsz, bex, bey, bez = zero, zero, zero, zero, zero, zero  # break terms
    # Derivatives of the current piece's start tp (t0's at first; hard labels: a half-plane's).
    psx, psy, psz, pex, pey, pez = d0sx, d0sy, d0sz, d0ex, d0ey, d0ez
    tp = t0
    for step in range(n_steps):
        tn, ax, ay, az, tx, ty, tz, nx, ny, nz = _advance(
            tp, t1, tx, ty, tz, nx, ny, nz, gx, gy, gz, sx, sy, sz, dmx, dmy, dmz, movx, movy, movz, spacing
        )
        off, mi0, mi1, m00, m01, m10, m11, h, mid, x1, x2, clx, cly, clz, fx1, fy1, fz1, fx2, fy2, fz2 = _piece(
            tp,
            tn,
            hit & ((tn > tp) | (step == 0)),
            sx,
            sy,
            sz,
            dx,
            dy,
            dz,
            size_i,
            size_j,
            size_k,
            stride_i,
            stride_j,
            INT64,
        )
        v000, v001, v010, v011, v100, v101, v110, v111 = _load8(
            vol_ptr, off, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT
        )
        hh = tl.where(h > 0, 0.5 * h, 0.0)
        if LABEL_MODE == 2:
            l000, l001, l010, l011, l100, l101, l110, l111 = _load8(
                lab_ptr, off, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, tl.int32
            )
            c000 = _channel_weight(wc, l000, ch)
            c001 = _channel_weight(wc, l001, ch)
            c010 = _channel_weight(wc, l010, ch)
            c011 = _channel_weight(wc, l011, ch)
            c100 = _channel_weight(wc, l100, ch)
            c101 = _channel_weight(wc, l101, ch)
            c110 = _channel_weight(wc, l110, ch)
            c111 = _channel_weight(wc, l111, ch)
        elif LABEL_MODE == 1:
            vi, ini = _nearest(sx + mid * dx, size_i, INT64)
            vj, inj = _nearest(sy + mid * dy, size_j, INT64)
            vk, ink = _nearest(sz + mid * dz, size_k, INT64)
            inside = hit & ini & inj & ink
            label = tl.load(lab_ptr + vi * stride_i + vj * stride_j + vk, mask=inside, other=0).to(tl.int32)
            wp = _channel_weight(wc, label, ch)  # [BLOCK_R]
            c000, c001, c010, c011, c100, c101, c110, c111 = wp, wp, wp, wp, wp, wp, wp, wp
        else:
            c000, c001, c010, c011, c100, c101, c110, c111 = w, w, w, w, w, w, w, w
        if NEED_VOLUME_GRAD:
            w000, w001, w010, w011, w100, w101, w110, w111 = _weights8(fx1, fy1, fz1, fx2, fy2, fz2, hh)
            base = grad_vol_ptr + off
            _scatter(base, w000 * c000, m00 & mi0)
            _scatter(base + 1, w001 * c001, m01 & mi0)
            _scatter(base + stride_j, w010 * c010, m10 & mi0)
            _scatter(base + stride_j + 1, w011 * c011, m11 & mi0)
            _scatter(base + stride_i, w100 * c100, m00 & mi1)
            _scatter(base + stride_i + 1, w101 * c101, m01 & mi1)
            _scatter(base + stride_i + stride_j, w110 * c110, m10 & mi1)
            _scatter(base + stride_i + stride_j + 1, w111 * c111, m11 & mi1)
        if NEED_POSE_GRAD:
            # phi's corner values: V times the channel weight (w for plain rays: applied at the end).
            if LABEL_MODE == 0:
                p000, p001, p010, p011, p100, p101, p110, p111 = v000, v001, v010, v011, v100, v101, v110, v111
            else:
                p000 = v000 * c000
                p001 = v001 * c001
                p010 = v010 * c010
                p011 = v011 * c011
                p100 = v100 * c100
                p101 = v101 * c101
                p110 = v110 * c110
                p111 = v111 * c111
            _f1, g1x, g1y, g1z = _trilinear_grad(p000, p001, p010, p011, p100, p101, p110, p111, fx1, fy1, fz1)
            _f2, g2x, g2y, g2z = _trilinear_grad(p000, p001, p010, p011, p100, p101, p110, p111, fx2, fy2, fz2)
            gax += hh * (g1x + g2x)
            gay += hh * (g1y + g2y)
            gaz += hh * (g1z + g2z)
            uax += hh * (x1 * g1x + x2 * g2x)
            uay += hh * (x1 * g1y + x2 * g2y)
            uaz += hh * (x1 * g1z + x2 * g2z)
            # Break terms: +phi(tn) dtn - phi(tp) dtp with this piece's phi (continuous breaks carry none).
            phi_p = _trilinear(
                p000, p001, p010, p011, p100, p101, p110, p111,
                sx + tp * dx - clx, sy + tp * dy - cly, sz + tp * dz - clz,
            )  # fmt: skip
            phi_n = _trilinear(
                p000, p001, p010, p011, p100, p101, p110, p111,
                sx + tn * dx - clx, sy + tn * dy - cly, sz + tn * dz - clz,
            )  # fmt: skip
            last = hit & (tn >= t1) & (tp < t1)  # the piece that reaches t1
            # dtn: t1's derivatives on the last piece; with hard labels, a half-integer plane's.
            nsx = tl.where(last, d1sx, 0.0)
            nsy = tl.where(last, d1sy, 0.0)
            nsz = tl.where(last, d1sz, 0.0)
            nex = tl.where(last, d1ex, 0.0)
            ney = tl.where(last, d1ey, 0.0)
            nez = tl.where(last, d1ez, 0.0)
            if LABEL_MODE == 1:
                # The plane just passed (before _advance moved it): n - sign. Half-integer iff 2 n is odd.
                hx = ax & movx & (((nx - gx) - 2.0 * tl.floor(0.5 * (nx - gx))) != 0.0) & (tn < t1)
                hy = ay & movy & (((ny - gy) - 2.0 * tl.floor(0.5 * (ny - gy))) != 0.0) & (tn < t1)
                hz = az & movz & (((nz - gz) - 2.0 * tl.floor(0.5 * (nz - gz))) != 0.0) & (tn < t1)
                a, b = _slab_grad(tn, dmx, movx)
                nsx = tl.where(hx, a, nsx)
                nex = tl.where(hx, b, nex)
                a, b = _slab_grad(tn, dmy, movy)
                nsy = tl.where(hy, a, nsy)
                ney = tl.where(hy, b, ney)
                a, b = _slab_grad(tn, dmz, movz)
                nsz = tl.where(hz, a, nsz)
                nez = tl.where(hz, b, nez)
            bsx += phi_n * nsx - phi_p * psx
            bsy += phi_n * nsy - phi_p * psy
            bsz += phi_n * nsz - phi_p * psz
            bex += phi_n * nex - phi_p * pex
            bey += phi_n * ney - phi_p * pey
            bez += phi_n * nez - phi_p * pez
            # The next piece starts at tn: it inherits tn's derivative only for half-integer planes.
            if LABEL_MODE == 1:
                keep = tn < t1
                psx = tl.where(keep, nsx, 0.0)
                psy = tl.where(keep, nsy, 0.0)
                psz = tl.where(keep, nsz, 0.0)
                pex = tl.where(keep, nex, 0.0)
                pey = tl.where(keep, ney, 0.0)
                pez = tl.where(keep, nez, 0.0)
            else:
                psx, psy, psz, pex, pey, pez = zero, zero, zero, zero, zero, zero
        tp = tn
    if NEED_POSE_GRAD:
        gsx = w * (gax - uax + bsx)
        gsy = w * (gay - uay + bsy)
        gsz = w * (gaz - uaz + bsz)
        gex = w * (uax + bex)
        gey = w * (uay + bey)
        gez = w * (uaz + bez)
        gdt = grad_src_ptr.dtype.element_ty
        o = (pid_b * n_rays + rays) * 3  # [BLOCK_R]
        tl.store(grad_src_ptr + o + 0, gsx.to(gdt), mask=mask_r)
        tl.store(grad_src_ptr + o + 1, gsy.to(gdt), mask=mask_r)
        tl.store(grad_src_ptr + o + 2, gsz.to(gdt), mask=mask_r)
        tl.store(grad_tgt_ptr + o + 0, gex.to(gdt), mask=mask_r)
        tl.store(grad_tgt_ptr + o + 1, gey.to(gdt), mask=mask_r)
        tl.store(grad_tgt_ptr + o + 2, gez.to(gdt), mask=mask_r)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------




def needs_int64(shape: tuple[int, int, int], n_ray_elements: int, n_out: int) -> bool:
    """64-bit offsets when an offset the kernels form can pass 2^31 - 1.

    Masked corners reach one cell beyond the grid on each side (+2); ``n_ray_elements`` is
    B N 3 and ``n_out`` is B C N.
    """
    i, j, k = shape
    return (i + 2) * (j + 2) * (k + 2) >= 2**31 or max(n_ray_elements, n_out) + 3 >= 2**31


def _block_r(n_rays: int, backward: bool) -> tuple[int, int]:
    """(BLOCK_R, num_warps): one ray per lane. Big blocks under the interpreter (per-op cost)."""
    if interpreting():
        return min(128, max(16, triton.next_power_of_2(max(n_rays, 1)))), 1
    return (64, 2) if backward else (128, 4)


def _common(density, source, target, lo, hi, n_channels):
    batch, n_rays, _ = target.shape
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
        *(float(x) for x in lo),
        *(float(x) for x in hi),
    )
    int64 = needs_int64(tuple(density.shape), batch * n_rays * 3, batch * n_channels * n_rays)
    return args, int64




def exact_forward(
    density: torch.Tensor,
    labels: torch.Tensor | None,
    source: torch.Tensor,
    target: torch.Tensor,
    lo,
    hi,
    n_channels: int = 1,
    label_mode: int = 0,
    *,
    out: torch.Tensor | None = None,
    block_r: int | None = None,
) -> torch.Tensor:
    """Launch the forward kernel. Inputs validated and contiguous (``tritondrr.renderers.exact.op``).

    Args:
        density: (I, J, K) contiguous volume.
        labels: (I, J, K) contiguous int64 labels in ``[0, n_channels)`` (label_mode 1 or 2), else None.
        source: (B, 1, 3) or (B, N, 3) contiguous index coordinates, fp32/fp64.
        target: (B, N, 3) contiguous, same dtype.
        lo, hi: 3 floats each, the clip box (already inside the support ``[-1, n]``).
        n_channels: C (1 when ``label_mode`` is 0).
        label_mode: 0 none, 1 hard (nearest voxel), 2 soft (per corner).
        out: optional (B, C, N) output buffer; block_r: override the block size (tail tests).

    Returns:
        (B, C, N) in the rays' dtype.
    """
    batch, n_rays, _ = target.shape
    if out is None:
        out = torch.empty((batch, n_channels, n_rays), device=target.device, dtype=target.dtype)
    if batch == 0 or n_rays == 0:
        return out
    br, warps = _block_r(n_rays, False)
    br = block_r or br
    args, int64 = _common(density, source, target, lo, hi, n_channels)
    grid = (triton.cdiv(n_rays, br), batch)
    wrap_launch(_exact_fwd_kernel)[grid](
        density,
        labels if labels is not None else density,
        source,
        target,
        out,
        *args,
        LABEL_MODE=label_mode,
        N_CHANNELS=n_channels,
        CH_BLOCK=triton.next_power_of_2(n_channels),
        INT64=int64,
        BLOCK_R=br,
        num_warps=warps,
    )
    return out


def exact_backward(
    grad_out: torch.Tensor,
    density: torch.Tensor,
    labels: torch.Tensor | None,
    source: torch.Tensor,
    target: torch.Tensor,
    lo,
    hi,
    n_channels: int = 1,
    label_mode: int = 0,
    *,
    need_pose: bool,
    need_volume: bool,
    block_r: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel: ``(grad_density, grad_source, grad_target)``, None where not asked.

    ``grad_out`` is (B, C, N) contiguous. ``grad_source`` has ``source``'s shape (per-ray
    gradients summed over the rays for a shared source). ``grad_density`` has ``density``'s
    dtype, accumulated in fp32 (fp64 for fp64 volumes) with atomics.
    """
    batch, n_rays, _ = target.shape
    dev, rdt = target.device, target.dtype
    grad_src = grad_tgt = grad_vol = None
    if need_pose:
        grad_src = torch.empty((batch, n_rays, 3), device=dev, dtype=rdt)
        grad_tgt = torch.empty((batch, n_rays, 3), device=dev, dtype=rdt)
    if need_volume:
        acc_dtype = torch.float64 if density.dtype == torch.float64 else torch.float32
        grad_vol = torch.zeros(density.shape, device=dev, dtype=acc_dtype)
    if (need_pose or need_volume) and batch > 0 and n_rays > 0:
        br, warps = _block_r(n_rays, True)
        br = block_r or br
        args, int64 = _common(density, source, target, lo, hi, n_channels)
        grid = (triton.cdiv(n_rays, br), batch)
        dummy = grad_out
        wrap_launch(_exact_bwd_kernel)[grid](
            density,
            labels if labels is not None else density,
            source,
            target,
            grad_out,
            grad_src if need_pose else dummy,
            grad_tgt if need_pose else dummy,
            grad_vol if need_volume else dummy,
            *args,
            LABEL_MODE=label_mode,
            N_CHANNELS=n_channels,
            CH_BLOCK=triton.next_power_of_2(n_channels),
            NEED_POSE_GRAD=need_pose,
            NEED_VOLUME_GRAD=need_volume,
            INT64=int64,
            BLOCK_R=br,
            num_warps=warps,
        )
    if need_pose and source.shape[1] == 1:
        grad_src = grad_src.sum(dim=1, keepdim=True)
    if need_volume:
        grad_vol = grad_vol.to(density.dtype)
    return grad_vol, grad_src, grad_tgt
