"""``@triton.jit`` helpers shared by the renderers' kernels: ray loading, slab clipping, cells,
eight-corner loads, trilinear value and gradient, end points, and the adjoint scatter.

Index space as everywhere (docs/sampling.md): voxel (i, j, k) has its centre at integer
coordinates; corners outside the grid are masked (read 0), so no volume is ever padded.
Shapes in comments: ``R`` rays of a block, ``S`` samples (or any second block dimension).
"""

import torch
import triton
import triton.language as tl

#: Must equal ``tritondrr.volume.TINY`` (a test checks it).
TINY = 1e-12


@triton.jit
def _clip_axis(s, e, lo, hi):
    """Slab parameters of one axis. s, e: [BLOCK_R]. Returns d (raw), dm, tmin, tmax, small."""
    d = e - s
    small = tl.abs(d) < 1e-12  # TINY: replaced components carry no gradient
    dm = tl.where(small, 1e-12, d)
    t_lo = (lo - s) / dm
    t_hi = (hi - s) / dm
    return d, dm, tl.minimum(t_lo, t_hi), tl.maximum(t_lo, t_hi), small


@triton.jit
def _cell(x, n, INT64: tl.constexpr):
    """Cell of coordinate x [R, S] on an axis of n voxels: base index (int32), fraction, corner masks."""
    fl = tl.floor(x)
    frac = x - fl
    # int32 whatever INT64 (an axis has < 2^31 voxels; only the flat offset needs 64 bits). Far
    # outside the support the conversion saturates (GPU) or gives INT_MIN (interpreter): both
    # corners then fail their masks, which is all such points need.
    i0 = fl.to(tl.int32)
    # Corner c is inside [0, n) iff c as uint32 is below n: one 32-bit compare instead of two
    # (n as int32 also with INT64, where it arrives as int64; the clamp is loop-invariant).
    if INT64:
        n = tl.minimum(n, 2147483647).to(tl.int32)
    m0 = i0.to(tl.uint32, bitcast=True) < n  # corner i0 inside the grid
    m1 = (i0 + 1).to(tl.uint32, bitcast=True) < n  # corner i0 + 1 inside the grid
    return i0, frac, m0, m1


@triton.jit
def _corners(x, y, z, m, size_i, size_j, size_k, stride_i, stride_j, INT64: tl.constexpr):
    """Cell of the points (x, y, z) [R, S] (any 2-D block) under mask m [R, S].

    Returns the offset of corner (0, 0, 0), the fractions, the i-masks of corners i0 / i0 + 1
    and the (j, k) masks m00, m01, m10, m11 (``m`` included): corner (a, b, c) is loaded under
    ``m{bc} & mi{a}``.
    """
    ix, fx, mi0, mi1 = _cell(x, size_i, INT64)
    iy, fy, mj0, mj1 = _cell(y, size_j, INT64)
    iz, fz, mk0, mk1 = _cell(z, size_k, INT64)
    if INT64:
        off = ix.to(tl.int64) * stride_i + iy.to(tl.int64) * stride_j + iz  # [R, S]
    else:
        off = ix * stride_i + iy * stride_j + iz  # [R, S]
    m00 = m & mj0 & mk0
    m01 = m & mj0 & mk1
    m10 = m & mj1 & mk0
    m11 = m & mj1 & mk1
    return off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11


@triton.jit
def _load8(vol_ptr, off, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT: tl.constexpr):
    """The 8 corner values of the cells (masked corners read 0), upcast to CDT. Each [R, S]."""
    base = vol_ptr + off
    v000 = tl.load(base, mask=m00 & mi0, other=0.0).to(CDT)
    v001 = tl.load(base + 1, mask=m01 & mi0, other=0.0).to(CDT)
    v010 = tl.load(base + stride_j, mask=m10 & mi0, other=0.0).to(CDT)
    v011 = tl.load(base + stride_j + 1, mask=m11 & mi0, other=0.0).to(CDT)
    v100 = tl.load(base + stride_i, mask=m00 & mi1, other=0.0).to(CDT)
    v101 = tl.load(base + stride_i + 1, mask=m01 & mi1, other=0.0).to(CDT)
    v110 = tl.load(base + stride_i + stride_j, mask=m10 & mi1, other=0.0).to(CDT)
    v111 = tl.load(base + stride_i + stride_j + 1, mask=m11 & mi1, other=0.0).to(CDT)
    return v000, v001, v010, v011, v100, v101, v110, v111


@triton.jit
def _sample_cells(
    start, phase, t0s, length, n_samples, live, sx, sy, sz, dx, dy, dz,
    size_i, size_j, size_k, stride_i, stride_j, BLOCK_S: tl.constexpr, INT64: tl.constexpr, CDT: tl.constexpr,
):
    """Samples ``start .. start + BLOCK_S`` of each ray: u [R, S] and the cells of their points."""
    k = start + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    u = (k.to(CDT)[None, :] + phase[:, None]) / n_samples  # [BLOCK_R, BLOCK_S]
    t = t0s[:, None] + length[:, None] * u  # [BLOCK_R, BLOCK_S]
    m = live[:, None] & (k < n_samples)[None, :]
    cells = _corners(
        sx[:, None] + t * dx[:, None],
        sy[:, None] + t * dy[:, None],
        sz[:, None] + t * dz[:, None],
        m,
        size_i,
        size_j,
        size_k,
        stride_i,
        stride_j,
        INT64,
    )
    return (u,) + cells


@triton.jit
def _value(vol_ptr, off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT: tl.constexpr):
    """Trilinear value f at the points of a block. [R, S]"""
    v = _load8(vol_ptr, off, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT)
    return _interp8(v, fx, fy, fz)


@triton.jit
def _interp8(v, fx, fy, fz):
    """Trilinear interpolation of the 8 corner values v = (v000, v001, ..., v111). [R, S]"""
    v000, v001, v010, v011, v100, v101, v110, v111 = v
    # Interpolate along k, then j, then i.
    c00 = v000 + fz * (v001 - v000)
    c01 = v010 + fz * (v011 - v010)
    c10 = v100 + fz * (v101 - v100)
    c11 = v110 + fz * (v111 - v110)
    c0 = c00 + fy * (c01 - c00)
    c1 = c10 + fy * (c11 - c10)
    return c0 + fx * (c1 - c0)


@triton.jit
def _value_grad(vol_ptr, off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT: tl.constexpr):
    """Trilinear value f and its gradient (gx, gy, gz) at the points of a block. Each [R, S]."""
    v = _load8(vol_ptr, off, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT)
    return _interp8_grad(v, fx, fy, fz)


@triton.jit
def _interp8_grad(v, fx, fy, fz):
    """Trilinear value f and gradient (gx, gy, gz) of the 8 corner values v. Each [R, S]."""
    v000, v001, v010, v011, v100, v101, v110, v111 = v
    # Along k: values and k-differences of the four (i, j) edges.
    c00 = v000 + fz * (v001 - v000)
    c01 = v010 + fz * (v011 - v010)
    c10 = v100 + fz * (v101 - v100)
    c11 = v110 + fz * (v111 - v110)
    e00 = v001 - v000
    e01 = v011 - v010
    e10 = v101 - v100
    e11 = v111 - v110
    # Along j.
    c0 = c00 + fy * (c01 - c00)
    c1 = c10 + fy * (c11 - c10)
    dz0 = e00 + fy * (e01 - e00)
    dz1 = e10 + fy * (e11 - e10)
    # Along i: value and the three partial derivatives.
    f = c0 + fx * (c1 - c0)
    gx = c1 - c0
    gy = (c01 - c00) + fx * ((c11 - c10) - (c01 - c00))
    gz = dz0 + fx * (dz1 - dz0)
    return f, gx, gy, gz


@triton.jit
def _load_ray(src_ptr, tgt_ptr, pid_b, rays, n_rays, src_stride_b, src_stride_r, mask_r):
    """Source and target coordinates of BLOCK_R rays. All [BLOCK_R]."""
    src = src_ptr + pid_b * src_stride_b + rays * src_stride_r
    tgt = tgt_ptr + (pid_b * n_rays + rays) * 3
    sx = tl.load(src + 0, mask=mask_r, other=0.0)
    sy = tl.load(src + 1, mask=mask_r, other=0.0)
    sz = tl.load(src + 2, mask=mask_r, other=0.0)
    ex = tl.load(tgt + 0, mask=mask_r, other=0.0)
    ey = tl.load(tgt + 1, mask=mask_r, other=0.0)
    ez = tl.load(tgt + 2, mask=mask_r, other=0.0)
    return sx, sy, sz, ex, ey, ez


@triton.jit
def _ray_block(pid_r, INT64: tl.constexpr, BLOCK_R: tl.constexpr):
    if INT64:
        pid_r = pid_r.to(tl.int64)
    return pid_r * BLOCK_R + tl.arange(0, BLOCK_R)


@triton.jit
def _ends(t0s, length, phase):
    """The two end points of each ray as a [BLOCK_R, 2] block: t, end weight and u.

    Column 0 is p_0end (t = t0, weight +(phase - 1/2), u = 0), column 1 is p_1end
    (t = t0 + L, weight -(phase - 1/2), u = 1). All [BLOCK_R, 2].
    """
    col = tl.arange(0, 2)[None, :]  # [1, 2]
    first = col == 0
    u = tl.where(first, 0.0, 1.0).to(t0s.dtype)  # [1, 2]
    t = t0s[:, None] + length[:, None] * u  # [BLOCK_R, 2]
    c = phase - 0.5  # [BLOCK_R]
    weight = tl.where(first, c[:, None], -c[:, None])  # [BLOCK_R, 2]
    return t, weight, u


@triton.jit
def _slab_grad(t, dm, small):
    """d t / d s_a and d t / d e_a of a slab parameter t = (P - s_a) / dm_a. All [BLOCK_R]."""
    dts = tl.where(small, -1.0 / dm, (t - 1.0) / dm)
    dte = tl.where(small, 0.0, -t / dm)
    return dts, dte


@triton.jit
def _scatter(ptr, val, mask, fixed, DETERMINISTIC: tl.constexpr):
    """Atomic add of val [R, S] into the volume-gradient buffer."""
    if DETERMINISTIC:
        # 64-bit fixed point: integer atomics commute, so the total is bitwise repeatable.
        tl.atomic_add(ptr, tl.floor(val * fixed + 0.5).to(tl.int64), mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptr, val.to(ptr.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _scatter8(
    grad_vol_ptr,
    off,
    fx,
    fy,
    fz,
    a,
    mi0,
    mi1,
    m00,
    m01,
    m10,
    m11,
    stride_i,
    stride_j,
    fixed,
    DETERMINISTIC: tl.constexpr,
):
    """Adjoint of the 8 loads: a [R, S] times the trilinear weights, same offsets and masks."""
    gx1 = fx
    gx0 = 1.0 - fx
    a00 = a * (1.0 - fy) * (1.0 - fz)  # [R, S]
    a01 = a * (1.0 - fy) * fz
    a10 = a * fy * (1.0 - fz)
    a11 = a * fy * fz
    ptr = grad_vol_ptr + off
    _scatter(ptr, gx0 * a00, m00 & mi0, fixed, DETERMINISTIC)
    _scatter(ptr + 1, gx0 * a01, m01 & mi0, fixed, DETERMINISTIC)
    _scatter(ptr + stride_j, gx0 * a10, m10 & mi0, fixed, DETERMINISTIC)
    _scatter(ptr + stride_j + 1, gx0 * a11, m11 & mi0, fixed, DETERMINISTIC)
    _scatter(ptr + stride_i, gx1 * a00, m00 & mi1, fixed, DETERMINISTIC)
    _scatter(ptr + stride_i + 1, gx1 * a01, m01 & mi1, fixed, DETERMINISTIC)
    _scatter(ptr + stride_i + stride_j, gx1 * a10, m10 & mi1, fixed, DETERMINISTIC)
    _scatter(ptr + stride_i + stride_j + 1, gx1 * a11, m11 & mi1, fixed, DETERMINISTIC)


# ----------------------------------------------------------------------------------------------
# Grouped helpers: a ray, a box, a grid and a cell travel as tuples, not as one argument per value.
#   ray  = (sx, sy, sz, dx, dy, dz, phase, t0s, length)        each [BLOCK_R]
#   grid = (size_i, size_j, size_k, stride_i, stride_j)        scalars
#   box  = (lo0, lo1, lo2, hi0, hi1, hi2)                      scalars
#   clip = (axis_x, axis_y, axis_z, t0m, t1m)                  axis_a = _clip_axis(...) of axis a
#   cell = (off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11)     as _corners returns it, each [R, S]
# ----------------------------------------------------------------------------------------------


@triton.jit
def _clip_box(sx, sy, sz, ex, ey, ez, box):
    """Slab clipping of rays to ``box``: d = (dx, dy, dz), t0, t1, L = max(t1 - t0, 0) and ``clip``.

    t0 = max(0, max_a tmin_a), t1 = min(1, min_a tmax_a) (docs/sampling.md). All [BLOCK_R].
    """
    lo0, lo1, lo2, hi0, hi1, hi2 = box
    ax = _clip_axis(sx, ex, lo0, hi0)
    ay = _clip_axis(sy, ey, lo1, hi1)
    az = _clip_axis(sz, ez, lo2, hi2)
    t0m = tl.maximum(tl.maximum(ax[2], ay[2]), az[2])  # [BLOCK_R]
    t1m = tl.minimum(tl.minimum(ax[3], ay[3]), az[3])
    t0 = tl.maximum(t0m, 0.0)
    t1 = tl.minimum(t1m, 1.0)
    return (ax[0], ay[0], az[0]), t0, t1, tl.maximum(t1 - t0, 0.0), (ax, ay, az, t0m, t1m)


@triton.jit
def _ray_prologue(src_ptr, tgt_ptr, phase_ptr, pid_b, rays, n_rays, src_stride_b, src_stride_r, mask_r, box):
    """Load BLOCK_R rays and their phases, clip them to ``box``: ``ray``, ``clip``, t0, t1 (all [BLOCK_R])."""
    sx, sy, sz, ex, ey, ez = _load_ray(src_ptr, tgt_ptr, pid_b, rays, n_rays, src_stride_b, src_stride_r, mask_r)
    phase = tl.load(phase_ptr + rays, mask=mask_r, other=0.5)  # [BLOCK_R]
    d, t0, t1, length, clip = _clip_box(sx, sy, sz, ex, ey, ez, box)
    # Missed rays (L = 0) may have t0 >> 1: sample them at t <= 1 so positions stay finite.
    t0s = tl.minimum(t0, 1.0)
    return (sx, sy, sz, d[0], d[1], d[2], phase, t0s, length), clip, t0, t1


@triton.jit
def _sample_points(ray, start, n_samples, live, BLOCK_S: tl.constexpr, CDT: tl.constexpr):
    """Samples ``start .. start + BLOCK_S`` of each ray: points (x, y, z), u and mask. Each [R, S]."""
    sx, sy, sz, dx, dy, dz, phase, t0s, length = ray
    k = start + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    kf = k.to(CDT)[None, :]  # [1, BLOCK_S]
    # Sample k sits at first + k stride (as the reference computes it): one FMA per coordinate and
    # sample; first and stride are per ray, so the compiler hoists them out of the sample loop.
    # Rays that are not live march at the origin: their samples are masked anyway, and every
    # coordinate stays in int32 range for _cell's conversion (live samples are in the box).
    h = tl.where(live, length / n_samples, 0.0)  # [BLOCK_R]
    t_first = t0s + phase * h
    inv_n = 1.0 / tl.cast(n_samples, CDT)  # in CDT (1.0 / n_samples would be fp32)
    u = kf * inv_n + (phase * inv_n)[:, None]  # (k + phase) / S, [BLOCK_R, BLOCK_S]
    x = kf * (h * dx)[:, None] + tl.where(live, sx + t_first * dx, 0.0)[:, None]
    y = kf * (h * dy)[:, None] + tl.where(live, sy + t_first * dy, 0.0)[:, None]
    z = kf * (h * dz)[:, None] + tl.where(live, sz + t_first * dz, 0.0)[:, None]
    m = live[:, None] & (k < n_samples)[None, :]
    return x, y, z, u, m


@triton.jit
def _end_points(ray, hit):
    """The two end points of each ray (``_ends``): points (x, y, z), u, mask and end weight. Each [BLOCK_R, 2]."""
    sx, sy, sz, dx, dy, dz, phase, t0s, length = ray
    te, we, ue = _ends(t0s, length, phase)  # [BLOCK_R, 2]
    # Rays without a hit take the origin (masked anyway; keeps _cell's conversion in range).
    x = tl.where(hit[:, None], sx[:, None] + te * dx[:, None], 0.0)
    y = tl.where(hit[:, None], sy[:, None] + te * dy[:, None], 0.0)
    z = tl.where(hit[:, None], sz[:, None] + te * dz[:, None], 0.0)
    return x, y, z, ue, hit[:, None] & (ue >= 0.0), we


@triton.jit
def _grid_cells(x, y, z, m, grid, INT64: tl.constexpr):
    """``_corners`` of the points (x, y, z) [R, S] under mask m, on ``grid``: the ``cell`` tuple."""
    size_i, size_j, size_k, stride_i, stride_j = grid
    return _corners(x, y, z, m, size_i, size_j, size_k, stride_i, stride_j, INT64)


@triton.jit
def _cell_value(vol_ptr, cell, grid, CDT: tl.constexpr):
    """Trilinear value f of ``cell`` [R, S]."""
    off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11 = cell
    return _value(vol_ptr, off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11, grid[3], grid[4], CDT)


@triton.jit
def _cell_value_grad(vol_ptr, cell, grid, CDT: tl.constexpr):
    """Trilinear value f and gradient (gx, gy, gz) of ``cell``. Each [R, S]."""
    off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11 = cell
    return _value_grad(vol_ptr, off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11, grid[3], grid[4], CDT)


@triton.jit
def _cell_scatter(grad_vol_ptr, cell, a, mask, grid, fixed, DETERMINISTIC: tl.constexpr):
    """Adjoint of ``_cell_value``: a [R, S] times the 8 trilinear weights, under the cell's masks & mask."""
    off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11 = cell
    # mask folded into the two i-masks (2 ANDs, not 4): the same corner predicates.
    _scatter8(
        grad_vol_ptr, off, fx, fy, fz, a, mask & mi0, mask & mi1, m00, m01, m10, m11,
        grid[3], grid[4], fixed, DETERMINISTIC,
    )  # fmt: skip


@triton.jit
def _clip_axis_grad(axis, t0m, t1m, gate0, gate1, gate_l):
    """Derivatives of t0 and L with respect to s_a and e_a through one axis's slab parameters.

    ``axis`` is ``_clip_axis``'s tuple; t0m = max_a tmin_a, t1m = min_a tmax_a; gate0 / gate1
    share the gradient among tied axes and gate the clamps; gate_l gates L = max(t1 - t0, 0).
    Returns dt0/ds_a, dt0/de_a, dL/ds_a, dL/de_a. All [BLOCK_R].
    """
    d, dm, tmin, tmax, small = axis
    a0s, a0e = _slab_grad(tmin, dm, small)
    a1s, a1e = _slab_grad(tmax, dm, small)
    sel0 = gate0 * (tmin == t0m).to(d.dtype)
    sel1 = gate1 * (tmax == t1m).to(d.dtype)
    dt0_s = sel0 * a0s
    dt0_e = sel0 * a0e
    return dt0_s, dt0_e, gate_l * (sel1 * a1s - dt0_s), gate_l * (sel1 * a1e - dt0_e)


@triton.jit
def _clip_grad(clip, t0, t1):
    """``_clip_axis_grad`` of the three axes, from ``_clip_box``'s ``clip`` and interval.

    t0 = clamp(max_a tmin_a, min=0): the argmax axes share the gradient (as torch.amax does) and
    the clamp passes it at equality; likewise t1 with min_a tmax_a and max=1; L gated by t1 >= t0.
    """
    ax, ay, az, t0m, t1m = clip
    cdt = t0m.dtype
    n0 = (ax[2] == t0m).to(cdt) + (ay[2] == t0m).to(cdt) + (az[2] == t0m).to(cdt)
    n1 = (ax[3] == t1m).to(cdt) + (ay[3] == t1m).to(cdt) + (az[3] == t1m).to(cdt)
    gate0 = tl.where(t0m >= 0.0, 1.0 / n0, 0.0)
    gate1 = tl.where(t1m <= 1.0, 1.0 / n1, 0.0)
    gate_l = (t1 - t0 >= 0.0).to(cdt)
    gx = _clip_axis_grad(ax, t0m, t1m, gate0, gate1, gate_l)
    gy = _clip_axis_grad(ay, t0m, t1m, gate0, gate1, gate_l)
    gz = _clip_axis_grad(az, t0m, t1m, gate0, gate1, gate_l)
    return gx, gy, gz


# ----------------------------------------------------------------------------------------------
# Labelmap channels: hard labels (nearest voxel, round half to even) and soft labels (per corner).
# Channel accumulators are [BLOCK_R, BLOCK_C] blocks (BLOCK_C = next power of two >= N_CHANNELS)
# updated by a loop over the channels: [R, S] temporaries only, O(N_CHANNELS) per sample. The loop
# is a runtime loop (not tl.static_range): unrolled, soft labels with C = 32 took minutes to compile.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _round_half_even(x, n, INT64: tl.constexpr):
    """Nearest integer of x [R, S] (ties to even, as torch.round and grid_sample's nearest mode)
    and whether it indexes one of the n voxels."""
    fl = tl.floor(x)
    frac = x - fl  # exact
    odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
    r = fl + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
    i = r.to(tl.int32)  # int32 and no clamp, as in _cell
    return i, i.to(tl.uint32, bitcast=True) < n


@triton.jit
def _nearest_label(labels_ptr, x, y, z, m, grid, N_CHANNELS: tl.constexpr, INT64: tl.constexpr):
    """Channel of each point (x, y, z) [R, S]: its nearest voxel's label clamped to [0, N_CHANNELS),
    0 outside the grid or where m is False. int32 [R, S]."""
    size_i, size_j, size_k, stride_i, stride_j = grid
    ri, inside_i = _round_half_even(x, size_i, INT64)
    rj, inside_j = _round_half_even(y, size_j, INT64)
    rk, inside_k = _round_half_even(z, size_k, INT64)
    inside = m & inside_i & inside_j & inside_k
    if INT64:
        off = ri.to(tl.int64) * stride_i + rj.to(tl.int64) * stride_j + rk
    else:
        off = ri * stride_i + rj * stride_j + rk
    label = tl.load(labels_ptr + off, mask=inside, other=0).to(tl.int32)
    return tl.minimum(tl.maximum(label, 0), N_CHANNELS - 1)


@triton.jit
def _cell_labels(labels_ptr, cell, grid):
    """The labels of the 8 corners of ``cell`` (0 where a corner is outside the grid). 8 x int32 [R, S]."""
    off, _fx, _fy, _fz, mi0, mi1, m00, m01, m10, m11 = cell
    return _load8(labels_ptr, off, mi0, mi1, m00, m01, m10, m11, grid[3], grid[4], tl.int32)


@triton.jit
def _weights8(fx, fy, fz):
    """The 8 trilinear corner weights, in _load8's corner order. Each [R, S]."""
    gx0 = 1.0 - fx
    w00 = (1.0 - fy) * (1.0 - fz)
    w01 = (1.0 - fy) * fz
    w10 = fy * (1.0 - fz)
    w11 = fy * fz
    return gx0 * w00, gx0 * w01, gx0 * w10, gx0 * w11, fx * w00, fx * w01, fx * w10, fx * w11


@triton.jit
def _route(acc, value, channel, N_CHANNELS: tl.constexpr, BLOCK_C: tl.constexpr):
    """acc [R, BLOCK_C] plus, per ray, the sum of value [R, S] over the samples of each channel."""
    chan = tl.arange(0, BLOCK_C)[None, :]  # [1, BLOCK_C]
    for c in range(N_CHANNELS):
        part = tl.sum(tl.where(channel == c, value, 0.0), axis=1)  # [R]
        acc += tl.where(chan == c, part[:, None], 0.0)
    return acc


@triton.jit
def _route8(acc, values, labels, N_CHANNELS: tl.constexpr, BLOCK_C: tl.constexpr):
    """``_route`` of 8 per-corner values [R, S] with their own channels (soft labels)."""
    chan = tl.arange(0, BLOCK_C)[None, :]  # [1, BLOCK_C]
    for c in range(N_CHANNELS):
        part = tl.where(labels[0] == c, values[0], 0.0)
        for q in tl.static_range(1, 8):
            part += tl.where(labels[q] == c, values[q], 0.0)
        acc += tl.where(chan == c, tl.sum(part, axis=1)[:, None], 0.0)
    return acc


@triton.jit
def _label_gather(gout_ptr, label, rays, n_rays, mask, N_CHANNELS: tl.constexpr):
    """grad_out[label, ray] of one pose (gout_ptr: its (C, N) block) at each point. [R, S]"""
    ok = mask & (label >= 0) & (label < N_CHANNELS)
    return tl.load(gout_ptr + label * n_rays + rays[:, None], mask=ok, other=0.0)


@triton.jit
def _cell_load8(vol_ptr, cell, grid, CDT: tl.constexpr):
    """The 8 corner values of ``cell`` (masked corners read 0), upcast to CDT. 8 x [R, S]."""
    off, _fx, _fy, _fz, mi0, mi1, m00, m01, m10, m11 = cell
    return _load8(vol_ptr, off, mi0, mi1, m00, m01, m10, m11, grid[3], grid[4], CDT)


@triton.jit
def _products8(a, b, s):
    """(a_q b_q s) for the 8 corners q. a, b: 8-tuples of [R, S]; s: [R, S] or scalar."""
    return (
        a[0] * b[0] * s, a[1] * b[1] * s, a[2] * b[2] * s, a[3] * b[3] * s,
        a[4] * b[4] * s, a[5] * b[5] * s, a[6] * b[6] * s, a[7] * b[7] * s,
    )  # fmt: skip


@triton.jit
def _scatter_corners(grad_vol_ptr, cell, a, mask, grid, fixed, DETERMINISTIC: tl.constexpr):
    """Atomic add of the 8 per-corner amounts a (8 x [R, S], _load8's corner order) under the cell's masks & mask."""
    off, _fx, _fy, _fz, mi0, mi1, m00, m01, m10, m11 = cell
    stride_i = grid[3]
    stride_j = grid[4]
    ptr = grad_vol_ptr + off
    mi0 = mask & mi0  # mask folded into the two i-masks: 2 ANDs, not 8
    mi1 = mask & mi1
    _scatter(ptr, a[0], m00 & mi0, fixed, DETERMINISTIC)
    _scatter(ptr + 1, a[1], m01 & mi0, fixed, DETERMINISTIC)
    _scatter(ptr + stride_j, a[2], m10 & mi0, fixed, DETERMINISTIC)
    _scatter(ptr + stride_j + 1, a[3], m11 & mi0, fixed, DETERMINISTIC)
    _scatter(ptr + stride_i, a[4], m00 & mi1, fixed, DETERMINISTIC)
    _scatter(ptr + stride_i + 1, a[5], m01 & mi1, fixed, DETERMINISTIC)
    _scatter(ptr + stride_i + stride_j, a[6], m10 & mi1, fixed, DETERMINISTIC)
    _scatter(ptr + stride_i + stride_j + 1, a[7], m11 & mi1, fixed, DETERMINISTIC)


# ----------------------------------------------------------------------------------------------
# Host helpers shared by the launchers
# ----------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether kernels run under ``TRITON_INTERPRET=1`` (read once, in ``tritondrr._config``)."""
    from tritondrr._config import interpreting as config_interpreting

    return config_interpreting()


def wrap_launch(kernel):
    """``torch.library.wrap_triton(kernel)``: the launch becomes traceable by ``torch.compile``
    (inside a ``triton_op``); the kernel itself under the interpreter, when tracing is off, or on
    torch without ``wrap_triton``."""
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    return wrap_triton(kernel) if wrap_triton is not None else kernel
