r"""Fused ray marching through a trilinear volume: forward and backward Triton kernels, then launchers.

The kernels compute exactly ``tritondrr.renderers.trilinear.naive.raymarch`` (no labels) for flat rays: pose ``b``,
ray ``r``, source ``s`` (shared per pose or per ray), target ``e``, all in index coordinates,
and a sampling phase ``phase[r]`` in [0, 1) per ray (shared by all poses).

Forward, per ray: ``g`` of docs/sampling.md (the one statement of the rule). In the kernels'
names: ``d = e - s``; ``dm`` is ``d`` with tiny components replaced (slab test only);
``t0``, ``t1``, ``L`` the clipped interval; ``u_k = (k + phase) / S``; ``p_k = s + (t0 + u_k L) d``;
``p_0end = s + t0 d`` and ``p_1end = s + (t0 + L) d`` the end points; ``c = phase - 1/2``;
``g = L / S * (sum_k f(p_k) - c (f(p_1end) - f(p_0end)))``.

``f`` is the tent interpolant of the zero-extended grid: the 8 corners of the cell containing
``p`` are loaded under masks (corner inside the grid), so samples anywhere in the support
``[-1, I] x [-1, J] x [-1, K]`` -- or outside it -- are exact without padding the volume.
``f(p_0end)`` vanishes when the ray enters through a face of the support box (the tent is 0
there) but not for a source inside the box (``t0 = 0``) or an inner box; likewise ``f(p_1end)``.
Both end points are evaluated as one ``[BLOCK_R, 2]`` block after the sample loop.

Backward, with ``w = dLoss/dg``. The end points are two extra weighted samples: weight
``+c`` at ``u = 0`` (p_0end) and ``-c`` at ``u = 1`` (p_1end), weight 1 for the samples
``u_k``. With ``omega`` those weights, the per-ray sums (computed in one pass plus the end block)::

    F = sum omega f(p),  G = sum omega grad f(p),  U = sum omega u grad f(p)      (G, U: 3-vectors)
    H = sum omega t grad f(p) = t0 G + L U,  D0 = G . d,  D1 = U . d

    dg/ds_a = F/S dL/ds_a + L/S (G_a - H_a + D0 dt0/ds_a + D1 dL/ds_a)
    dg/de_a = F/S dL/de_a + L/S (H_a      + D0 dt0/de_a + D1 dL/de_a)

from ``dp/ds = (1 - t) I + d (dt/ds)^T``, ``dp/de = t I + d (dt/de)^T`` and
``dt = dt0 + u dL`` for every weighted point (``dt1 = dt0 + dL`` at p_1end). Spelled out, the
sample terms use ``dp_k = ds + t_k dd + d (dt0 + u_k dL)`` with ``u_k = (k + phase)/S``, and
the end term ``E = -(L/S) c (f(p_1end) - f(p_0end))`` contributes ``-c (f1 - f0)/S dL`` (in
``F/S dL``), ``-(L/S) c grad f(p_1end) . (ds + t1 dd + d dt1)`` and
``+(L/S) c grad f(p_0end) . (ds + t0 dd + d dt0)`` (in the ``L/S`` bracket). The clip terms: a
slab parameter ``t = (P - s_a) / d_a`` (``P`` = lo_a or hi_a, the same formula for both planes)
has ``dt/ds_a = (t - 1) / d_a`` and ``dt/de_a = -t / d_a``; where ``|d_a| < TINY`` was
replaced, ``dt/ds_a = -1/TINY`` and ``dt/de_a = 0`` (the replacement is a constant). ``dt0`` is
that derivative for the axis whose ``tmin`` is the maximum (ties share the gradient equally, as
``torch.amax`` does), gated by ``max_a tmin_a >= 0`` (``clamp(min=0)`` passes the gradient at
equality); likewise ``dt1`` with ``tmax``, the minimum and ``<= 1``; ``dL = (dt1 - dt0)`` gated
by ``t1 - t0 >= 0``. These match the reference's autograd gradients, including ties. The phase
is an input, not differentiated.

The volume gradient is the exact adjoint: ``dg/dV[c] = L/S sum omega weight_c(p)`` over the
samples and the two end points, scattered with ``atomic_add`` of ``w L/S omega`` times the same
trilinear weights and masks as the forward loads (``-w L/S c`` at the corners of p_1end,
``+w L/S c`` at those of p_0end). In the deterministic mode each contribution is rounded to a
64-bit fixed-point integer with a power-of-two scale ``2^(59 - ceil(log2 sum_r |w_r|))`` (a
voxel's total is at most ``2 sum_r |w_r|``, since a ray's weights sum to at most
``L/S (S + 2|c|) <= 2``) and added with integer atomics: integer addition is associative, so
the result is bitwise repeatable whatever the order of the atomics. Memory: one int64 buffer
the size of the volume (8 bytes per voxel, against 4 for the float32 atomic buffer);
resolution ``2^-59 sum_r |w_r|`` per contribution.

Layout: the grid is ``(cdiv(N, BLOCK_R), B)``; a program takes ``BLOCK_R`` consecutive rays of one
pose (a run of detector pixels along a row when rays are row-major) and marches them in chunks
of ``BLOCK_S`` samples as a ``[BLOCK_R, BLOCK_S]`` block, accumulating in the rays' dtype (fp32,
or fp64 for gradchecks) whatever the volume's dtype (fp32/fp16/bf16/fp64 loads are upcast). A
1-D run of rays is used because the op sees flat rays (no detector shape); consecutive rays
are spatial neighbours, which is what the gathers' cache reuse needs. ``INT64`` (constexpr) turns
on int64 offsets when the volume or the rays pass 2^31 elements.

Labelmap hook (not implemented): channels would be a constexpr ``N_CHANNELS`` with a per-sample
label gathered from the nearest voxel (round half to even) routing each sample's value into one
of ``N_CHANNELS`` accumulators; the output offset already carries the layout ``(B, C, N)`` with
``C = 1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (  # noqa: F401 (shared with the other renderers' kernels)
    _clip_axis,
    _cell,
    _corners,
    _load8,
    _sample_cells,
    _value,
    _value_grad,
    _load_ray,
    _ray_block,
    _ends,
    _slab_grad,
    _scatter,
    _scatter8,
    TINY,
)

__all__ = [
    "TINY",
    "raymarch_forward",
    "raymarch_backward",
    "launch_config",
    "needs_int64",
]



# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _raymarch_fwd_kernel(
    vol_ptr,  # (I, J, K) contiguous, fp32/fp16/bf16/fp64
    src_ptr,  # (B, 1, 3) or (B, N, 3) contiguous, fp32/fp64
    tgt_ptr,  # (B, N, 3) contiguous, same dtype as src
    phase_ptr,  # (N,) contiguous, same dtype as src: the rays' sampling phases in [0, 1)
    out_ptr,  # (B, 1, N) in the rays' dtype
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
    n_samples,
    INT64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    CDT = src_ptr.dtype.element_ty  # accumulation dtype: the rays' (fp32, or fp64 in tests)
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    if INT64:
        pid_b = pid_b.to(tl.int64)
    rays = _ray_block(pid_r, INT64, BLOCK_R)  # [BLOCK_R]
    mask_r = rays < n_rays
    sx, sy, sz, ex, ey, ez = _load_ray(src_ptr, tgt_ptr, pid_b, rays, n_rays, src_stride_b, src_stride_r, mask_r)
    phase = tl.load(phase_ptr + rays, mask=mask_r, other=0.5)  # [BLOCK_R]

    dx, dmx, tmin_x, tmax_x, small_x = _clip_axis(sx, ex, lo0, hi0)
    dy, dmy, tmin_y, tmax_y, small_y = _clip_axis(sy, ey, lo1, hi1)
    dz, dmz, tmin_z, tmax_z, small_z = _clip_axis(sz, ez, lo2, hi2)
    t0 = tl.maximum(tl.maximum(tl.maximum(tmin_x, tmin_y), tmin_z), 0.0)  # [BLOCK_R]
    t1 = tl.minimum(tl.minimum(tl.minimum(tmax_x, tmax_y), tmax_z), 1.0)
    length = tl.maximum(t1 - t0, 0.0)
    # Missed rays (L = 0) may have t0 >> 1: sample them at t <= 1 so positions stay finite.
    t0s = tl.minimum(t0, 1.0)
    hit = mask_r & (length > 0)  # rays with L = 0 need no loads at all

    acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=CDT)
    for start in range(0, n_samples, BLOCK_S):
        u, off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11 = _sample_cells(
            start, phase, t0s, length, n_samples, hit, sx, sy, sz, dx, dy, dz,
            size_i, size_j, size_k, stride_i, stride_j, BLOCK_S, INT64, CDT,
        )  # fmt: skip
        acc += _value(vol_ptr, off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT)
        # Labelmap hook: a per-sample channel index would select one of N_CHANNELS accumulators here.

    # End correction: -(phase - 1/2) (f(p_1end) - f(p_0end)), both ends as one [BLOCK_R, 2] block.
    te, we, ue = _ends(t0s, length, phase)  # [BLOCK_R, 2]
    off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11 = _corners(
        sx[:, None] + te * dx[:, None],
        sy[:, None] + te * dy[:, None],
        sz[:, None] + te * dz[:, None],
        hit[:, None] & (ue >= 0.0),
        size_i,
        size_j,
        size_k,
        stride_i,
        stride_j,
        INT64,
    )
    fe = _value(vol_ptr, off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT)  # [BLOCK_R, 2]
    total = tl.sum(acc, axis=1) + tl.sum(we * fe, axis=1)  # [BLOCK_R]
    g = total * (length / n_samples)  # [BLOCK_R]
    tl.store(out_ptr + pid_b * n_rays + rays, g.to(out_ptr.dtype.element_ty), mask=mask_r)


@triton.jit
def _raymarch_bwd_kernel(
    vol_ptr,  # (I, J, K) contiguous
    src_ptr,  # (B, 1, 3) or (B, N, 3)
    tgt_ptr,  # (B, N, 3)
    phase_ptr,  # (N,) the rays' dtype
    grad_out_ptr,  # (B, 1, N) contiguous, the rays' dtype
    grad_src_ptr,  # (B, N, 3) per-ray source gradient (summed over rays by the launcher if shared)
    grad_tgt_ptr,  # (B, N, 3)
    grad_vol_ptr,  # (I, J, K): fp32/fp64 atomic buffer, or int64 fixed point when DETERMINISTIC
    scale_ptr,  # (1,) fp64 fixed-point scale (DETERMINISTIC only)
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
    n_samples,
    NEED_POSE_GRAD: tl.constexpr,
    NEED_VOLUME_GRAD: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
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
    sx, sy, sz, ex, ey, ez = _load_ray(src_ptr, tgt_ptr, pid_b, rays, n_rays, src_stride_b, src_stride_r, mask_r)
    phase = tl.load(phase_ptr + rays, mask=mask_r, other=0.5)  # [BLOCK_R]
    w = tl.load(grad_out_ptr + pid_b * n_rays + rays, mask=mask_r, other=0.0).to(CDT)  # [BLOCK_R]

    dx, dmx, tmin_x, tmax_x, small_x = _clip_axis(sx, ex, lo0, hi0)
    dy, dmy, tmin_y, tmax_y, small_y = _clip_axis(sy, ey, lo1, hi1)
    dz, dmz, tmin_z, tmax_z, small_z = _clip_axis(sz, ez, lo2, hi2)
    t0m = tl.maximum(tl.maximum(tmin_x, tmin_y), tmin_z)  # [BLOCK_R]
    t1m = tl.minimum(tl.minimum(tmax_x, tmax_y), tmax_z)
    t0 = tl.maximum(t0m, 0.0)
    t1 = tl.minimum(t1m, 1.0)
    length = tl.maximum(t1 - t0, 0.0)
    t0s = tl.minimum(t0, 1.0)
    hit = mask_r & (length > 0)
    # Rays with L = 0 and t1 == t0 still get the dL term (clamp passes the gradient at 0), so
    # their samples (all at t0 <= 1) must be evaluated; other misses need no loads.
    live = mask_r & (t1 - t0 >= 0)
    scale = length / n_samples  # [BLOCK_R]
    wscale = tl.where(hit, w * scale, 0.0)

    acc_f = tl.zeros([BLOCK_R, BLOCK_S], dtype=CDT)
    acc_gx = tl.zeros([BLOCK_R, BLOCK_S], dtype=CDT)
    acc_gy = tl.zeros([BLOCK_R, BLOCK_S], dtype=CDT)
    acc_gz = tl.zeros([BLOCK_R, BLOCK_S], dtype=CDT)
    acc_ux = tl.zeros([BLOCK_R, BLOCK_S], dtype=CDT)
    acc_uy = tl.zeros([BLOCK_R, BLOCK_S], dtype=CDT)
    acc_uz = tl.zeros([BLOCK_R, BLOCK_S], dtype=CDT)
    if DETERMINISTIC:
        fixed = tl.load(scale_ptr)  # fp64 power of two
    else:
        fixed = 1.0  # unused
    for start in range(0, n_samples, BLOCK_S):
        u, off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11 = _sample_cells(
            start, phase, t0s, length, n_samples, live, sx, sy, sz, dx, dy, dz,
            size_i, size_j, size_k, stride_i, stride_j, BLOCK_S, INT64, CDT,
        )  # fmt: skip
        if NEED_POSE_GRAD:
            f, gx, gy, gz = _value_grad(vol_ptr, off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT)
            acc_f += f
            acc_gx += gx
            acc_gy += gy
            acc_gz += gz
            acc_ux += u * gx
            acc_uy += u * gy
            acc_uz += u * gz
        if NEED_VOLUME_GRAD:
            # Adjoint of the 8 loads: the same offsets, masks and weights, times w L / S.
            mv = hit[:, None]
            a = tl.broadcast_to(wscale[:, None], [BLOCK_R, BLOCK_S])
            _scatter8(
                grad_vol_ptr,
                off,
                fx,
                fy,
                fz,
                a,
                mi0,
                mi1,
                mv & m00,
                mv & m01,
                mv & m10,
                mv & m11,
                stride_i,
                stride_j,
                fixed,
                DETERMINISTIC,
            )

    # End correction: the two end points as weighted samples of a [BLOCK_R, 2] block, weight
    # +(phase - 1/2) at p_0end (u = 0) and -(phase - 1/2) at p_1end (u = 1). Only rays with L > 0
    # need them: for L = 0 both ends coincide and the correction vanishes with its derivatives.
    te, we, ue = _ends(t0s, length, phase)  # [BLOCK_R, 2]
    off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11 = _corners(
        sx[:, None] + te * dx[:, None],
        sy[:, None] + te * dy[:, None],
        sz[:, None] + te * dz[:, None],
        hit[:, None] & (ue >= 0.0),
        size_i,
        size_j,
        size_k,
        stride_i,
        stride_j,
        INT64,
    )
    if NEED_VOLUME_GRAD:
        _scatter8(
            grad_vol_ptr,
            off,
            fx,
            fy,
            fz,
            wscale[:, None] * we,
            mi0,
            mi1,
            m00,
            m01,
            m10,
            m11,
            stride_i,
            stride_j,
            fixed,
            DETERMINISTIC,
        )

    if NEED_POSE_GRAD:
        fe, gex, gey, gez = _value_grad(vol_ptr, off, fx, fy, fz, mi0, mi1, m00, m01, m10, m11, stride_i, stride_j, CDT)
        # Sums over the samples plus the weighted end points (u_end = 0, 1).
        F = tl.sum(acc_f, axis=1) + tl.sum(we * fe, axis=1)  # [BLOCK_R]
        Gx = tl.sum(acc_gx, axis=1) + tl.sum(we * gex, axis=1)
        Gy = tl.sum(acc_gy, axis=1) + tl.sum(we * gey, axis=1)
        Gz = tl.sum(acc_gz, axis=1) + tl.sum(we * gez, axis=1)
        Ux = tl.sum(acc_ux, axis=1) + tl.sum(we * ue * gex, axis=1)
        Uy = tl.sum(acc_uy, axis=1) + tl.sum(we * ue * gey, axis=1)
        Uz = tl.sum(acc_uz, axis=1) + tl.sum(we * ue * gez, axis=1)
        Hx = t0 * Gx + length * Ux  # sum_k t_k grad f
        Hy = t0 * Gy + length * Uy
        Hz = t0 * Gz + length * Uz
        D0 = Gx * dx + Gy * dy + Gz * dz
        D1 = Ux * dx + Uy * dy + Uz * dz

        # Clip terms. t0 = clamp(max_a tmin_a, min=0): the argmax axes share the gradient.
        sel0x = (tmin_x == t0m).to(CDT)
        sel0y = (tmin_y == t0m).to(CDT)
        sel0z = (tmin_z == t0m).to(CDT)
        gate0 = tl.where(t0m >= 0.0, 1.0 / (sel0x + sel0y + sel0z), 0.0)
        sel1x = (tmax_x == t1m).to(CDT)
        sel1y = (tmax_y == t1m).to(CDT)
        sel1z = (tmax_z == t1m).to(CDT)
        gate1 = tl.where(t1m <= 1.0, 1.0 / (sel1x + sel1y + sel1z), 0.0)
        gate_l = (t1 - t0 >= 0.0).to(CDT)
        a0sx, a0ex = _slab_grad(tmin_x, dmx, small_x)
        a0sy, a0ey = _slab_grad(tmin_y, dmy, small_y)
        a0sz, a0ez = _slab_grad(tmin_z, dmz, small_z)
        a1sx, a1ex = _slab_grad(tmax_x, dmx, small_x)
        a1sy, a1ey = _slab_grad(tmax_y, dmy, small_y)
        a1sz, a1ez = _slab_grad(tmax_z, dmz, small_z)
        dt0_sx = gate0 * sel0x * a0sx
        dt0_sy = gate0 * sel0y * a0sy
        dt0_sz = gate0 * sel0z * a0sz
        dt0_ex = gate0 * sel0x * a0ex
        dt0_ey = gate0 * sel0y * a0ey
        dt0_ez = gate0 * sel0z * a0ez
        dl_sx = gate_l * (gate1 * sel1x * a1sx - dt0_sx)
        dl_sy = gate_l * (gate1 * sel1y * a1sy - dt0_sy)
        dl_sz = gate_l * (gate1 * sel1z * a1sz - dt0_sz)
        dl_ex = gate_l * (gate1 * sel1x * a1ex - dt0_ex)
        dl_ey = gate_l * (gate1 * sel1y * a1ey - dt0_ey)
        dl_ez = gate_l * (gate1 * sel1z * a1ez - dt0_ez)

        fs = F / n_samples
        # The L/S term is zero for L = 0; tl.where keeps huge clip slopes of misses out of it.
        ls = tl.where(hit, scale, 0.0)
        wl = w * ls
        wf = tl.where(live, w * fs, 0.0)
        gsx = wf * dl_sx + tl.where(hit, wl * (Gx - Hx + D0 * dt0_sx + D1 * dl_sx), 0.0)
        gsy = wf * dl_sy + tl.where(hit, wl * (Gy - Hy + D0 * dt0_sy + D1 * dl_sy), 0.0)
        gsz = wf * dl_sz + tl.where(hit, wl * (Gz - Hz + D0 * dt0_sz + D1 * dl_sz), 0.0)
        gex = wf * dl_ex + tl.where(hit, wl * (Hx + D0 * dt0_ex + D1 * dl_ex), 0.0)
        gey = wf * dl_ey + tl.where(hit, wl * (Hy + D0 * dt0_ey + D1 * dl_ey), 0.0)
        gez = wf * dl_ez + tl.where(hit, wl * (Hz + D0 * dt0_ez + D1 * dl_ez), 0.0)
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


def _interpreting() -> bool:
    # Kernels know nothing of the package; the one place that reads the variable is tritondrr._config.
    from tritondrr._config import interpreting

    return interpreting()


def needs_int64(shape: tuple[int, int, int], n_ray_elements: int) -> bool:
    """int64 offsets when any offset the kernels form can pass 2^31 - 1.

    Offsets of masked-out corners reach one cell beyond the grid on each side, hence the +2.
    ``n_ray_elements`` is B * N * 3 (the largest ray-buffer offset).
    """
    i, j, k = shape
    return (i + 2) * (j + 2) * (k + 2) >= 2**31 or n_ray_elements + 3 >= 2**31


def launch_config(n_rays: int, n_samples: int, backward: bool = False) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_S, num_warps)`` from the problem size.

    Under the interpreter every Triton op costs ~25 us per program whatever the block size, so
    one configuration with big blocks. On a GPU the numbers are a starting point, not yet tuned
    on hardware: 2-D blocks of 2048 (forward) or 1024 (backward: 7 accumulators) samples per
    program with 4 warps, narrower in rays when there are few rays.
    """
    s_pow2 = triton.next_power_of_2(max(n_samples, 1))
    r_pow2 = triton.next_power_of_2(max(n_rays, 1))
    if _interpreting():
        return min(128, max(16, r_pow2)), min(64, max(16, s_pow2)), 1
    block_s = min(32, max(16, s_pow2))
    block_r = (32 if backward else 64) if n_rays >= 4096 else 32
    return min(block_r, max(16, r_pow2)), block_s, 4


def _common_args(density, source, target, lo, hi, n_samples):
    batch, n_rays, _ = target.shape
    size_i, size_j, size_k = density.shape
    shared = source.shape[1] == 1
    src_stride_b = 3 if shared else 3 * n_rays
    src_stride_r = 0 if shared else 3
    int64 = needs_int64(tuple(density.shape), batch * n_rays * 3)
    args = (
        n_rays,
        src_stride_b,
        src_stride_r,
        size_i,
        size_j,
        size_k,
        size_j * size_k,
        size_k,
        float(lo[0]),
        float(lo[1]),
        float(lo[2]),
        float(hi[0]),
        float(hi[1]),
        float(hi[2]),
        n_samples,
    )
    return args, int64


def _wrap(kernel):
    # torch.library.wrap_triton makes the launch traceable by torch.compile (inside triton_op);
    # it returns the kernel itself under the interpreter or when tracing is off.
    wrap = getattr(torch.library, "wrap_triton", None)
    return wrap(kernel) if wrap is not None else kernel


def raymarch_forward(
    density: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    phase: torch.Tensor,
    lo,
    hi,
    n_samples: int,
    *,
    out: torch.Tensor | None = None,
    block_r: int | None = None,
    block_s: int | None = None,
) -> torch.Tensor:
    """Launch the forward kernel. Inputs must already be validated and contiguous (``tritondrr.ops``).

    Args:
        density: (I, J, K) contiguous volume.
        source: (B, 1, 3) or (B, N, 3) contiguous rays' starts, index coordinates, fp32/fp64.
        target: (B, N, 3) contiguous, same dtype as ``source``.
        phase: (N,) contiguous, same dtype as ``source``: each ray's sampling phase in [0, 1)
            (shared by all poses).
        lo, hi: 3 floats each, the box (index coordinates; passed to the kernel as fp32).
        n_samples: samples per ray.
        out: optional (B, 1, N) output buffer (tests pass a NaN-filled one).
        block_r, block_s: override the launch heuristic (tests of the tail masks).

    Returns:
        (B, 1, N) in the rays' dtype.
    """
    batch, n_rays, _ = target.shape
    if out is None:
        out = torch.empty((batch, 1, n_rays), device=target.device, dtype=target.dtype)
    if batch == 0 or n_rays == 0:
        return out
    br, bs, warps = launch_config(n_rays, n_samples)
    br, bs = block_r or br, block_s or bs
    args, int64 = _common_args(density, source, target, lo, hi, n_samples)
    grid = (triton.cdiv(n_rays, br), batch)
    _wrap(_raymarch_fwd_kernel)[grid](
        density, source, target, phase, out, *args, INT64=int64, BLOCK_R=br, BLOCK_S=bs, num_warps=warps
    )
    return out


def fixed_point_scale(grad_out: torch.Tensor) -> torch.Tensor:
    """(1,) fp64 power of two such that every voxel's fixed-point total stays below 2^60.

    A voxel's gradient is bounded by 2 sum_r |w_r|: a ray's trilinear weights sum to at most
    L/S (S + 2 |phase - 1/2|) <= L (1 + 1/S) <= 2 (the samples plus the two end-correction
    points), so the scale is 2^(59 - ceil(log2 sum_r |w_r|)). Computed on the device: no host
    synchronisation. NaN when ``grad_out`` is not finite (fixed point cannot hold inf/NaN; the NaN
    then reaches the result).
    """
    bound = grad_out.detach().abs().sum(dtype=torch.float64).reshape(1)
    exponent = (59.0 - torch.ceil(torch.log2(bound.clamp(min=1e-300)))).clamp(-960.0, 960.0)
    return torch.where(torch.isfinite(bound), torch.exp2(exponent), torch.nan)


def raymarch_backward(
    grad_out: torch.Tensor,
    density: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    phase: torch.Tensor,
    lo,
    hi,
    n_samples: int,
    *,
    need_pose: bool,
    need_volume: bool,
    deterministic: bool = False,
    block_r: int | None = None,
    block_s: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel: ``(grad_density, grad_source, grad_target)``, None where not asked.

    ``grad_out`` is (B, 1, N) contiguous; ``phase`` is (N,) as in ``raymarch_forward``.
    ``grad_source`` has ``source``'s shape (per-ray source gradients are summed over rays for a
    shared source, deterministically). ``grad_density`` has ``density``'s dtype; it is accumulated
    in fp32 (fp64 for fp64 volumes) with float atomics, or in 64-bit fixed point when
    ``deterministic`` (bitwise repeatable; module docstring).
    """
    batch, n_rays, _ = target.shape
    dev, rdt = target.device, target.dtype
    grad_src = grad_tgt = grad_vol = None
    if need_pose:
        grad_src = torch.empty((batch, n_rays, 3), device=dev, dtype=rdt)
        grad_tgt = torch.empty((batch, n_rays, 3), device=dev, dtype=rdt)
    scale = None
    if need_volume:
        if deterministic:
            grad_vol = torch.zeros(density.shape, device=dev, dtype=torch.int64)
            scale = fixed_point_scale(grad_out)
        else:
            acc_dtype = torch.float64 if density.dtype == torch.float64 else torch.float32
            grad_vol = torch.zeros(density.shape, device=dev, dtype=acc_dtype)
    if (need_pose or need_volume) and batch > 0 and n_rays > 0:
        br, bs, warps = launch_config(n_rays, n_samples, backward=True)
        br, bs = block_r or br, block_s or bs
        args, int64 = _common_args(density, source, target, lo, hi, n_samples)
        grid = (triton.cdiv(n_rays, br), batch)
        dummy = grad_out  # stands in for buffers a specialisation never touches
        _wrap(_raymarch_bwd_kernel)[grid](
            density,
            source,
            target,
            phase,
            grad_out,
            grad_src if need_pose else dummy,
            grad_tgt if need_pose else dummy,
            grad_vol if need_volume else dummy,
            scale if scale is not None else dummy,
            *args,
            NEED_POSE_GRAD=need_pose,
            NEED_VOLUME_GRAD=need_volume,
            DETERMINISTIC=deterministic and need_volume,
            INT64=int64,
            BLOCK_R=br,
            BLOCK_S=bs,
            num_warps=warps,
        )
    if need_pose and source.shape[1] == 1:
        grad_src = grad_src.sum(dim=1, keepdim=True)
    if need_volume:
        if deterministic:
            # int64 -> fp32 rounds to 24 bits (an fp32 result's precision); both power-of-two
            # rescales are exact (2^-60 first: 1/scale alone can underflow fp32).
            out_dtype = torch.float64 if density.dtype == torch.float64 else torch.float32
            grad_vol = grad_vol.to(out_dtype) * 2.0**-60
            grad_vol = grad_vol * (2.0**60 / scale).to(out_dtype)
        grad_vol = grad_vol.to(density.dtype)
    return grad_vol, grad_src, grad_tgt
