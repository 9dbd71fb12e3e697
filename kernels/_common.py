"""``@triton.jit`` helpers shared by the renderers' kernels: ray loading, slab clipping, cells,
eight-corner loads, trilinear value and gradient, end points, and the adjoint scatter.

Index space as everywhere (docs/sampling.md): voxel (i, j, k) has its centre at integer
coordinates; corners outside the grid are masked (read 0), so no volume is ever padded.
Shapes in comments: ``R`` rays of a block, ``S`` samples (or any second block dimension).
"""

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
    """Cell of coordinate x [R, S] on an axis of n voxels: base index, fraction, corner masks."""
    # Clamping to [-2, n + 1] changes nothing inside the support (beyond it every corner is
    # masked) and keeps the float -> int conversion in range for rays far outside the volume.
    x = tl.minimum(tl.maximum(x, -2.0), n + 1.0)
    fl = tl.floor(x)
    frac = x - fl
    if INT64:
        i0 = fl.to(tl.int64)
    else:
        i0 = fl.to(tl.int32)
    m0 = (i0 >= 0) & (i0 < n)  # corner i0 inside the grid
    m1 = (i0 >= -1) & (i0 < n - 1)  # corner i0 + 1 inside the grid
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
    v000, v001, v010, v011, v100, v101, v110, v111 = _load8(
        vol_ptr, off, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT
    )
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
    v000, v001, v010, v011, v100, v101, v110, v111 = _load8(
        vol_ptr, off, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT
    )
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
