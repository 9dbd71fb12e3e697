r"""Fused ray marching through a trilinear volume: forward and backward Triton kernels, then launchers.

The kernels compute exactly ``tritondrr.renderers.trilinear.naive.raymarch`` for flat rays: pose ``b``,
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

Many volumes per launch (``POOL``, constexpr): the volumes are packed into one flat buffer and
pose ``b`` reads its volume's int64 pool offset, shape, strides, box and sample count from the
small per-pose tensors ``item`` (B, 8) and ``box`` (B, 6) at ``program_id(1)``; the scalar
arguments then go unused. The pool offset is always int64 (the pool may pass 2^31 elements);
``INT64`` is needed only when one volume (or the rays) does. The volume gradient goes to the
same offsets of a gradient pool, which the launcher's caller splits back per volume.

Labelmap channels (``N_CHANNELS`` > 1, a constexpr: the C = 1 specialisation is the plain kernel,
instruction for instruction). ``labels`` holds a channel index per voxel. Hard labels: each point
(sample or end point) goes to the channel of its nearest voxel's label, round half to even
(``torch.round``, and ``grid_sample``'s nearest mode used by the reference), channel 0 outside the
grid. Soft labels (``SOFT_LABELS``): each of the point's 8 trilinear corner weights goes to its
corner's channel, so channel c is exactly the plain rule applied to ``V * (labels == c)``. The
forward keeps ``[BLOCK_R, BLOCK_C]`` channel sums updated per sample block by a loop over the
channels (O(C) selects per sample, [R, S] temporaries only). The backward gathers, per point (hard)
or per corner (soft), the upstream gradient of its channel ``sig = grad_out[b, label, r]`` and runs
the single-channel formulas above with ``omega sig`` in place of ``w omega``: the labels are
piecewise constant, so they carry no pose gradient. Volume gradient: ``L/S omega sig`` times the
corner weights.

Empty-space skipping (``SKIP``, a constexpr; tritondrr.occupancy): each sample looks up its brick
in a small uint8 table and, where the brick is empty, drops out of the mask of its eight gathers
(and of the label gathers): it is an exact zero, and so is its contribution to the pose
gradient, so results do not change and masked loads move no memory. Not for the volume gradient
(non-zero in empty space) nor for pools.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import interpreting, wrap_launch

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
    _ray_prologue,
    _sample_points,
    _end_points,
    _grid_cells,
    _cell_value,
    _cell_value_grad,
    _cell_scatter,
    _clip_grad,
    _cell_load8,
    _cell_labels,
    _interp8_grad,
    _label_gather,
    _nearest_label,
    _products8,
    _route,
    _route8,
    _scatter_corners,
    _weights8,
)

__all__ = [
    "Pool",
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
    labels_ptr,  # (I, J, K) int64 channel indices in [0, N_CHANNELS) (unused when N_CHANNELS == 1)
    src_ptr,  # (B, 1, 3) or (B, N, 3) contiguous, fp32/fp64
    tgt_ptr,  # (B, N, 3) contiguous, same dtype as src
    phase_ptr,  # (N,) contiguous, same dtype as src: the rays' sampling phases in [0, 1)
    out_ptr,  # (B, C, N) in the rays' dtype
    item_ptr,  # POOL: (B, 8) int64 per pose: pool offset, I, J, K, J K, K, n_samples, 0
    box_ptr,  # POOL: (B, 6) fp32 per pose: lo0, lo1, lo2, hi0, hi1, hi2
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
    bricks_ptr,  # SKIP: (N0, N1, N2) uint8 brick occupancy (tritondrr.occupancy)
    bricks_n0,
    bricks_n1,
    bricks_n2,
    N_CHANNELS: tl.constexpr,
    SOFT_LABELS: tl.constexpr,
    POOL: tl.constexpr,
    INT64: tl.constexpr,
    SKIP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    CDT = src_ptr.dtype.element_ty  # accumulation dtype: the rays' (fp32, or fp64 in tests)
    pid_b, rays, mask_r = _program_rays(n_rays, INT64, BLOCK_R)
    grid = (size_i, size_j, size_k, stride_i, stride_j)
    box = (lo0, lo1, lo2, hi0, hi1, hi2)
    if POOL:  # pose b renders volume b of a packed pool: its offset, shape, box and sample count
        offset, grid, box, n_samples = _pool_item(item_ptr, box_ptr, pid_b, INT64)
        vol_ptr += offset
        labels_ptr += offset
    ray, _clip, _t0, _t1 = _ray_prologue(src_ptr, tgt_ptr, phase_ptr, pid_b, rays, n_rays, src_stride_b, src_stride_r, mask_r, box)
    length = ray[8]
    hit = mask_r & (length > 0)  # rays with L = 0 need no loads at all

    if N_CHANNELS == 1:
        acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=CDT)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=CDT)  # per-channel sums
    bricks = (bricks_ptr, bricks_n0, bricks_n1, bricks_n2)
    for start in range(0, n_samples, BLOCK_S):
        x, y, z, _u, m = _sample_points(ray, start, n_samples, hit, BLOCK_S, CDT)  # [BLOCK_R, BLOCK_S]
        m = _skip_empty(m, x, y, z, bricks, SKIP)
        cell = _grid_cells(x, y, z, m, grid, INT64)
        if N_CHANNELS == 1:
            acc += _cell_value(vol_ptr, cell, grid, CDT)
        else:
            acc = _channel_sums(acc, vol_ptr, labels_ptr, x, y, z, m, cell, grid, 1.0, N_CHANNELS, SOFT_LABELS, BLOCK_C, INT64, CDT)

    # End correction: -(phase - 1/2) (f(p_1end) - f(p_0end)), both ends as one [BLOCK_R, 2] block.
    x, y, z, _ue, me, we = _end_points(ray, hit)
    cell = _grid_cells(x, y, z, me, grid, INT64)
    scale = length / n_samples  # [BLOCK_R]
    if N_CHANNELS == 1:
        fe = _cell_value(vol_ptr, cell, grid, CDT)  # [BLOCK_R, 2]
        g = (tl.sum(acc, axis=1) + tl.sum(we * fe, axis=1)) * scale  # [BLOCK_R]
        tl.store(out_ptr + pid_b * n_rays + rays, g.to(out_ptr.dtype.element_ty), mask=mask_r)
    else:
        acc = _channel_sums(acc, vol_ptr, labels_ptr, x, y, z, me, cell, grid, we, N_CHANNELS, SOFT_LABELS, BLOCK_C, INT64, CDT)
        chan = tl.arange(0, BLOCK_C)[None, :]
        out = out_ptr + (pid_b * N_CHANNELS + chan) * n_rays + rays[:, None]  # [BLOCK_R, BLOCK_C]
        tl.store(out, (acc * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & (chan < N_CHANNELS))


@triton.jit
def _raymarch_bwd_kernel(
    vol_ptr,  # (I, J, K) contiguous
    labels_ptr,  # (I, J, K) int64 (unused when N_CHANNELS == 1)
    src_ptr,  # (B, 1, 3) or (B, N, 3)
    tgt_ptr,  # (B, N, 3)
    phase_ptr,  # (N,) the rays' dtype
    grad_out_ptr,  # (B, C, N) contiguous, the rays' dtype
    grad_src_ptr,  # (B, N, 3) per-ray source gradient (summed over rays by the launcher if shared)
    grad_tgt_ptr,  # (B, N, 3)
    grad_vol_ptr,  # (I, J, K): fp32/fp64 atomic buffer, or int64 fixed point when DETERMINISTIC
    scale_ptr,  # (1,) fp64 fixed-point scale (DETERMINISTIC only)
    item_ptr,  # POOL: (B, 8) int64 per pose (forward kernel)
    box_ptr,  # POOL: (B, 6) fp32 per pose
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
    bricks_ptr,  # SKIP (pose gradients only): brick occupancy, as in the forward
    bricks_n0,
    bricks_n1,
    bricks_n2,
    NEED_POSE_GRAD: tl.constexpr,
    NEED_VOLUME_GRAD: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    N_CHANNELS: tl.constexpr,
    SOFT_LABELS: tl.constexpr,
    POOL: tl.constexpr,
    INT64: tl.constexpr,
    SKIP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    CDT = src_ptr.dtype.element_ty
    pid_b, rays, mask_r = _program_rays(n_rays, INT64, BLOCK_R)
    grid = (size_i, size_j, size_k, stride_i, stride_j)
    box = (lo0, lo1, lo2, hi0, hi1, hi2)
    if POOL:
        offset, grid, box, n_samples = _pool_item(item_ptr, box_ptr, pid_b, INT64)
        vol_ptr += offset
        labels_ptr += offset
        grad_vol_ptr += offset
    ray, clip, t0, t1 = _ray_prologue(src_ptr, tgt_ptr, phase_ptr, pid_b, rays, n_rays, src_stride_b, src_stride_r, mask_r, box)
    length = ray[8]
    gout_ptr = grad_out_ptr + pid_b * N_CHANNELS * n_rays  # this pose's (C, N) block
    if N_CHANNELS == 1:
        w = tl.load(gout_ptr + rays, mask=mask_r, other=0.0).to(CDT)  # [BLOCK_R]
    else:
        w = tl.full([BLOCK_R], 1.0, CDT)  # channels: each point carries its own weight (sig below)
    hit = mask_r & (length > 0)
    # Rays with L = 0 and t1 == t0 still get the dL term (clamp passes the gradient at 0), so
    # their samples (all at t0 <= 1) must be evaluated; other misses need no loads.
    live = mask_r & (t1 - t0 >= 0)
    wscale = tl.where(hit, w * (length / n_samples), 0.0)  # [BLOCK_R]
    fixed = _fixed_scale(scale_ptr, DETERMINISTIC)

    acc_f = tl.zeros([BLOCK_R, BLOCK_S], dtype=CDT)  # sums of f, grad f and u grad f over the samples
    acc_gx, acc_gy, acc_gz = tl.zeros_like(acc_f), tl.zeros_like(acc_f), tl.zeros_like(acc_f)
    acc_ux, acc_uy, acc_uz = tl.zeros_like(acc_f), tl.zeros_like(acc_f), tl.zeros_like(acc_f)
    bricks = (bricks_ptr, bricks_n0, bricks_n1, bricks_n2)
    for start in range(0, n_samples, BLOCK_S):
        x, y, z, u, m = _sample_points(ray, start, n_samples, live, BLOCK_S, CDT)  # [BLOCK_R, BLOCK_S]
        m = _skip_empty(m, x, y, z, bricks, SKIP)
        cell = _grid_cells(x, y, z, m, grid, INT64)
        sig = _point_weights(labels_ptr, gout_ptr, rays, n_rays, x, y, z, m, cell, grid, N_CHANNELS, SOFT_LABELS, INT64)
        if NEED_POSE_GRAD:
            f, gx, gy, gz = _weighted_value_grad(vol_ptr, cell, sig, grid, N_CHANNELS, SOFT_LABELS, CDT)
            acc_f += f
            acc_gx += gx
            acc_gy += gy
            acc_gz += gz
            acc_ux += u * gx
            acc_uy += u * gy
            acc_uz += u * gz
        if NEED_VOLUME_GRAD:  # adjoint of the 8 loads: the same offsets, masks and weights, times w L / S
            a = tl.broadcast_to(wscale[:, None], [BLOCK_R, BLOCK_S])
            _weighted_scatter(grad_vol_ptr, cell, a, sig, hit[:, None], grid, fixed, N_CHANNELS, SOFT_LABELS, DETERMINISTIC)

    # End correction: the two end points as weighted samples (weights +c at u = 0, -c at u = 1).
    # Only rays with L > 0 need them: for L = 0 the correction vanishes with its derivatives.
    x, y, z, ue, me, we = _end_points(ray, hit)  # [BLOCK_R, 2]
    cell = _grid_cells(x, y, z, me, grid, INT64)
    sig = _point_weights(labels_ptr, gout_ptr, rays, n_rays, x, y, z, me, cell, grid, N_CHANNELS, SOFT_LABELS, INT64)
    if NEED_VOLUME_GRAD:
        a = wscale[:, None] * we
        _weighted_scatter(grad_vol_ptr, cell, a, sig, me, grid, fixed, N_CHANNELS, SOFT_LABELS, DETERMINISTIC)
    if NEED_POSE_GRAD:
        fe, gex, gey, gez = _weighted_value_grad(vol_ptr, cell, sig, grid, N_CHANNELS, SOFT_LABELS, CDT)
        F = tl.sum(acc_f, axis=1) + tl.sum(we * fe, axis=1)  # [BLOCK_R]
        G = (_row_sum(acc_gx, we, gex), _row_sum(acc_gy, we, gey), _row_sum(acc_gz, we, gez))
        U = (_row_sum(acc_ux, we * ue, gex), _row_sum(acc_uy, we * ue, gey), _row_sum(acc_uz, we * ue, gez))
        gs, ge = _pose_grad(ray, clip, t0, t1, F, G, U, w, n_samples, hit, live)
        o = (pid_b * n_rays + rays) * 3  # [BLOCK_R]
        _store3(grad_src_ptr + o, gs, mask_r)
        _store3(grad_tgt_ptr + o, ge, mask_r)


# ----------------------------------------------------------------------------------------------
# Kernel-side helpers of the trilinear rule (shared ones are in _common.py)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _skip_empty(m, x, y, z, bricks, SKIP: tl.constexpr):
    """Empty-space skipping (tritondrr.occupancy): the sample mask without the samples whose
    brick is empty, exact zeros whose eight gathers then move no memory. A sample at ``p`` lies
    in brick ``(p + 1) / 8`` per axis, rounded toward zero (floor for every sample of the support
    ``[-1, I]``, whose bricks the table covers with one to spare; rounding at a brick's face is
    covered by the bricks' one-voxel margin). The table is a few kB and stays in cache.
    Without SKIP: ``m``."""
    if SKIP:
        bricks_ptr, _n0, n1, n2 = bricks
        bx = (x * 0.125 + 0.125).to(tl.int32)  # 0.125 = 1 / occupancy.BRICK
        by = (y * 0.125 + 0.125).to(tl.int32)
        bz = (z * 0.125 + 0.125).to(tl.int32)
        occupied = tl.load(bricks_ptr + (bx * n1 + by) * n2 + bz, mask=m, other=0)
        return m & (occupied != 0)
    else:
        return m


@triton.jit
def _program_rays(n_rays, INT64: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's pose index, its BLOCK_R ray indices and their mask."""
    pid_b = tl.program_id(1)
    if INT64:
        pid_b = pid_b.to(tl.int64)
    rays = _ray_block(tl.program_id(0), INT64, BLOCK_R)  # [BLOCK_R]
    return pid_b, rays, rays < n_rays


@triton.jit
def _channel_sums(
    acc, vol_ptr, labels_ptr, x, y, z, m, cell, grid, weight,
    N_CHANNELS: tl.constexpr, SOFT_LABELS: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    """acc [R, BLOCK_C] plus weight x the points' values routed to their channels (hard or soft labels)."""
    if SOFT_LABELS:
        v = _cell_load8(vol_ptr, cell, grid, CDT)
        contributions = _products8(v, _weights8(cell[1], cell[2], cell[3]), weight)
        return _route8(acc, contributions, _cell_labels(labels_ptr, cell, grid), N_CHANNELS, BLOCK_C)
    else:
        channel = _nearest_label(labels_ptr, x, y, z, m, grid, N_CHANNELS, INT64)
        return _route(acc, _cell_value(vol_ptr, cell, grid, CDT) * weight, channel, N_CHANNELS, BLOCK_C)


@triton.jit
def _point_weights(
    labels_ptr, gout_ptr, rays, n_rays, x, y, z, m, cell, grid,
    N_CHANNELS: tl.constexpr, SOFT_LABELS: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    """Upstream gradient of each point's channel: grad_out[label, ray], [R, S] (hard labels), or
    of each corner's channel, 8 x [R, S] (soft labels). 1 (unused) without channels."""
    if N_CHANNELS == 1:
        return 1.0
    elif SOFT_LABELS:
        lab = _cell_labels(labels_ptr, cell, grid)
        return (
            _label_gather(gout_ptr, lab[0], rays, n_rays, m, N_CHANNELS),
            _label_gather(gout_ptr, lab[1], rays, n_rays, m, N_CHANNELS),
            _label_gather(gout_ptr, lab[2], rays, n_rays, m, N_CHANNELS),
            _label_gather(gout_ptr, lab[3], rays, n_rays, m, N_CHANNELS),
            _label_gather(gout_ptr, lab[4], rays, n_rays, m, N_CHANNELS),
            _label_gather(gout_ptr, lab[5], rays, n_rays, m, N_CHANNELS),
            _label_gather(gout_ptr, lab[6], rays, n_rays, m, N_CHANNELS),
            _label_gather(gout_ptr, lab[7], rays, n_rays, m, N_CHANNELS),
        )
    else:
        channel = _nearest_label(labels_ptr, x, y, z, m, grid, N_CHANNELS, INT64)
        return _label_gather(gout_ptr, channel, rays, n_rays, m, N_CHANNELS)


@triton.jit
def _weighted_value_grad(vol_ptr, cell, sig, grid, N_CHANNELS: tl.constexpr, SOFT_LABELS: tl.constexpr, CDT: tl.constexpr):
    """f and grad f of the field weighted by the points' (or corners') upstream gradients ``sig``."""
    if N_CHANNELS == 1:
        return _cell_value_grad(vol_ptr, cell, grid, CDT)
    elif SOFT_LABELS:  # the interpolant of the corner values v_q sig_q
        v = _cell_load8(vol_ptr, cell, grid, CDT)
        return _interp8_grad(_products8(v, sig, 1.0), cell[1], cell[2], cell[3])
    else:
        f, gx, gy, gz = _cell_value_grad(vol_ptr, cell, grid, CDT)
        return sig * f, sig * gx, sig * gy, sig * gz


@triton.jit
def _weighted_scatter(
    grad_vol_ptr, cell, a, sig, mask, grid, fixed,
    N_CHANNELS: tl.constexpr, SOFT_LABELS: tl.constexpr, DETERMINISTIC: tl.constexpr,
):  # fmt: skip
    """Adjoint of ``_channel_sums`` applied to the upstream gradients: a [R, S] x sig x corner weights."""
    if N_CHANNELS == 1:
        _cell_scatter(grad_vol_ptr, cell, a, mask, grid, fixed, DETERMINISTIC)
    elif SOFT_LABELS:
        amounts = _products8(_weights8(cell[1], cell[2], cell[3]), sig, a)
        _scatter_corners(grad_vol_ptr, cell, amounts, mask, grid, fixed, DETERMINISTIC)
    else:
        _cell_scatter(grad_vol_ptr, cell, a * sig, mask, grid, fixed, DETERMINISTIC)


@triton.jit
def _pool_item(item_ptr, box_ptr, pid_b, INT64: tl.constexpr):
    """Volume of pose pid_b in a packed pool: int64 offset, grid, box and sample count."""
    meta = item_ptr + pid_b * 8
    offset = tl.load(meta)  # int64: the pool may pass 2^31 elements
    box = box_ptr + pid_b * 6
    box = (tl.load(box), tl.load(box + 1), tl.load(box + 2), tl.load(box + 3), tl.load(box + 4), tl.load(box + 5))
    if INT64:
        grid = (tl.load(meta + 1), tl.load(meta + 2), tl.load(meta + 3), tl.load(meta + 4), tl.load(meta + 5))
    else:  # offsets inside one volume fit in 32 bits
        grid = (
            tl.load(meta + 1).to(tl.int32), tl.load(meta + 2).to(tl.int32), tl.load(meta + 3).to(tl.int32),
            tl.load(meta + 4).to(tl.int32), tl.load(meta + 5).to(tl.int32),
        )  # fmt: skip
    return offset, grid, box, tl.load(meta + 6).to(tl.int32)


@triton.jit
def _fixed_scale(scale_ptr, DETERMINISTIC: tl.constexpr):
    if DETERMINISTIC:
        return tl.load(scale_ptr)  # fp64 power of two
    else:
        return 1.0  # unused


@triton.jit
def _row_sum(acc, weight, end):
    """Per-ray sum of a [R, S] sample accumulator plus the weighted [R, 2] end-point values. [R]"""
    return tl.sum(acc, axis=1) + tl.sum(weight * end, axis=1)


@triton.jit
def _pose_grad_axis(cg, G, H, D0, D1, wf, wl, hit):
    """dLoss/ds_a and dLoss/de_a from the clip derivatives ``cg`` of axis a (module docstring)."""
    dt0_s, dt0_e, dl_s, dl_e = cg
    # The L/S term is zero for L = 0; tl.where keeps huge clip slopes of misses out of it.
    gs = wf * dl_s + tl.where(hit, wl * (G - H + D0 * dt0_s + D1 * dl_s), 0.0)
    ge = wf * dl_e + tl.where(hit, wl * (H + D0 * dt0_e + D1 * dl_e), 0.0)
    return gs, ge


@triton.jit
def _pose_grad(ray, clip, t0, t1, F, G, U, w, n_samples, hit, live):
    """dLoss/ds and dLoss/de of each ray (3-tuples of [BLOCK_R]) from the weighted sums F, G, U."""
    _sx, _sy, _sz, dx, dy, dz, _phase, _t0s, length = ray
    D0 = G[0] * dx + G[1] * dy + G[2] * dz
    D1 = U[0] * dx + U[1] * dy + U[2] * dz
    cx, cy, cz = _clip_grad(clip, t0, t1)
    wf = tl.where(live, w * (F / n_samples), 0.0)
    wl = w * tl.where(hit, length / n_samples, 0.0)
    # H_a = sum omega t grad_a f = t0 G_a + L U_a.
    gx = _pose_grad_axis(cx, G[0], t0 * G[0] + length * U[0], D0, D1, wf, wl, hit)
    gy = _pose_grad_axis(cy, G[1], t0 * G[1] + length * U[1], D0, D1, wf, wl, hit)
    gz = _pose_grad_axis(cz, G[2], t0 * G[2] + length * U[2], D0, D1, wf, wl, hit)
    return (gx[0], gy[0], gz[0]), (gx[1], gy[1], gz[1])


@triton.jit
def _store3(ptr, v, mask):
    """Store a 3-tuple of [BLOCK_R] at ptr + 0, 1, 2 (ptr: [BLOCK_R] pointers)."""
    dt = ptr.dtype.element_ty
    tl.store(ptr + 0, v[0].to(dt), mask=mask)
    tl.store(ptr + 1, v[1].to(dt), mask=mask)
    tl.store(ptr + 2, v[2].to(dt), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------




def needs_int64(shape: tuple[int, int, int], n_ray_elements: int) -> bool:
    """int64 offsets when any offset the kernels dereference can pass 2^31 - 1.

    Only corners inside the grid are dereferenced (their offsets are below I J K); the offsets of
    masked-out corners may wrap and are never used. The +2 (one cell beyond each side) is a margin.
    ``n_ray_elements`` is B * N * max(3, C) (the largest ray- or output-buffer offset).
    """
    i, j, k = shape
    return (i + 2) * (j + 2) * (k + 2) >= 2**31 or n_ray_elements + 3 >= 2**31


def launch_config(n_rays: int, n_samples: int, backward: bool = False, n_channels: int = 1) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_S, num_warps)`` from the problem size.

    Under the interpreter every Triton op costs ~25 us per program whatever the block size, so
    one configuration with big blocks. On a GPU the numbers come from the sm_90 SASS counts of
    ``bench/sass_count.py`` (bench/results/sass-sm90.md; fp32, int32 offsets, triton 3.9): among the
    configurations without register spills, the fewest SASS instructions per sample in the sample
    loop. They are compile-time facts, not timings: the retune on a GPU (``bench/bench_kernels.py``,
    whose grid starts with these) is still owed.

    - Forward ``(16, 16, 4)``: 75.5 instr/sample, 56 registers, no spills. The old default 64x32/4
      uses 255 registers and spills 312 B/thread (104.4 instr/sample; 344 B and 118.8 before the
      mask and sample-point helpers were trimmed); 32x32/4 78.6, 64x16/4 76.0 (143 registers),
      32x16/8 76.5, 32x16/4 80.0. 32x32/8 and 64x16/8 count 73.5 but spill 4 B.
    - Backward ``(32, 16, 8)``: pose only 92.0, volume only 105.0 instr/sample at 104 / 72
      registers, no spills (the fewest: 91.0 at 16x32/4 with 177 registers, and 105.0); pose and
      volume together (compiled the same way, not a row of the table) 171.0 at 138 registers, the
      fewest. The old default 32x32/4 counts 97.6 / 119.1 / 216.8, at 255 registers with 36
      B/thread of spills when both gradients are asked.
    - Forward with labelmap channels (``n_channels`` > 1) ``(64, 16, 4)``: the per-channel
      reductions cost per iteration, so more samples per lane pay: hard / soft labels, C = 5, count
      151.1 / 148.0 instr/sample (202 / 255 registers, no spills) against 179.5 / 273.0 at 16x16/4;
      C = 32 (bf16, int64) 189.8 / 175.6 against 284.0 / 281.5. The backward with channels keeps
      32x16/8 (C = 5, both gradients: 234.5 / 272.5, no spills; 16x16/4 237.0 / 282.5).
    - Fewer rays than a block: 16 rays per block (the backward with 4 warps: 16x16/4 counts 95.5 /
      105.0 / 176.5). BLOCK_S stays 16 for short rays too (its tail is masked).
    """
    r_pow2 = triton.next_power_of_2(max(n_rays, 1))
    if interpreting():
        s_pow2 = triton.next_power_of_2(max(n_samples, 1))
        return min(128, max(16, r_pow2)), min(64, max(16, s_pow2)), 1
    if backward:
        return (32, 16, 8) if r_pow2 >= 32 else (16, 16, 4)
    if n_channels > 1 and r_pow2 >= 64:
        return 64, 16, 4
    return 16, 16, 4


@dataclass(frozen=True)
class Pool:
    """One volume per pose, packed into one flat buffer (the ``density`` the launchers get).

    Attributes:
        item: (B, 8) int64 on the rays' device, per pose: offset of its volume in the pool,
            I, J, K, J K, K, its samples per ray, 0.
        box: (B, 6) float32 on the rays' device, per pose: its box lo0, lo1, lo2, hi0, hi1, hi2.
        shapes: the (I, J, K) of every volume (host ints: the int64 decision).
        max_samples: the largest sample count (host int: the launch configuration).
    """

    item: torch.Tensor
    box: torch.Tensor
    shapes: tuple
    max_samples: int


def _common_args(density, source, target, lo, hi, n_samples, n_channels=1, pool=None):
    batch, n_rays, _ = target.shape
    shared = source.shape[1] == 1
    src_stride_b = 3 if shared else 3 * n_rays
    src_stride_r = 0 if shared else 3
    n_ray_elements = batch * n_rays * max(3, n_channels)
    if pool is None:
        size_i, size_j, size_k = density.shape
        int64 = needs_int64(tuple(density.shape), n_ray_elements)
        pool_args = (target, target)  # unused pointers
    else:  # the kernels read shapes, boxes and sample counts per pose; pool offsets are int64 anyway
        size_i = size_j = size_k = 1
        lo, hi = (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)
        n_samples = pool.max_samples
        int64 = any(needs_int64(tuple(shape), n_ray_elements) for shape in pool.shapes)
        pool_args = (pool.item, pool.box)
    args = (
        *pool_args,
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
    labels: torch.Tensor | None = None,
    n_channels: int = 1,
    soft_labels: bool = False,
    pool: Pool | None = None,
    occupied: torch.Tensor | None = None,
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
        out: optional (B, C, N) output buffer (tests pass a NaN-filled one).
        block_r, block_s: override the launch heuristic (tests of the tail masks).
        labels: optional (I, J, K) contiguous int64 channel index of every voxel, in [0, n_channels).
        n_channels: C, the number of output channels (1 without labels).
        soft_labels: route each corner's trilinear weight to its own label's channel, instead of
            each point to its nearest voxel's label's channel.
        pool: one volume per pose (``Pool``): ``density`` (and ``labels``) are then the flat
            packed buffers, and ``lo``, ``hi`` and ``n_samples`` are read per pose from the pool.
        occupied: optional ``tritondrr.occupancy.Bricks.occupied`` of ``density`` on its device
            (``occupancy.BRICK`` must be 8): samples in empty bricks load nothing (same result;
            not with a pool).

    Returns:
        (B, C, N) in the rays' dtype.
    """
    batch, n_rays, _ = target.shape
    n_channels = n_channels if labels is not None else 1
    if out is None:
        out = torch.empty((batch, n_channels, n_rays), device=target.device, dtype=target.dtype)
    if batch == 0 or n_rays == 0:
        return out
    skip_args, skip = _skip_args(occupied, pool, density)
    n_max = pool.max_samples if pool is not None else n_samples
    br, bs, warps = launch_config(n_rays, n_max, n_channels=n_channels)
    br, bs = block_r or br, block_s or bs
    args, int64 = _common_args(density, source, target, lo, hi, n_samples, n_channels, pool)
    grid = (triton.cdiv(n_rays, br), batch)
    wrap_launch(_raymarch_fwd_kernel)[grid](
        density, labels if labels is not None else density, source, target, phase, out, *args, *skip_args,
        **_channel_flags(n_channels, soft_labels), POOL=pool is not None, INT64=int64, SKIP=skip, BLOCK_R=br,
        BLOCK_S=bs, BLOCK_C=_block_c(n_channels), num_warps=warps,
    )  # fmt: skip
    return out


def _skip_args(occupied, pool, fallback: torch.Tensor) -> tuple[tuple, bool]:
    """The kernels' occupancy arguments and SKIP flag (no skipping for pools or without bricks)."""
    if occupied is None or pool is not None:
        return (fallback, 1, 1, 1), False
    return (occupied, *occupied.shape), True


def _channel_flags(n_channels: int, soft_labels: bool) -> dict:
    return dict(N_CHANNELS=n_channels, SOFT_LABELS=bool(soft_labels) and n_channels > 1)


def _block_c(n_channels: int) -> int:
    return triton.next_power_of_2(max(n_channels, 1))


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
    labels: torch.Tensor | None = None,
    n_channels: int = 1,
    soft_labels: bool = False,
    pool: Pool | None = None,
    occupied: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel: ``(grad_density, grad_source, grad_target)``, None where not asked.

    ``grad_out`` is (B, C, N) contiguous; ``phase``, ``labels``, ``n_channels``, ``soft_labels`` and
    ``pool`` as in ``raymarch_forward`` (with a pool, ``grad_density`` is the flat pool's gradient).
    ``occupied`` skips empty space for the pose gradient only (the volume gradient is non-zero there).
    ``grad_source`` has ``source``'s shape (per-ray source gradients are summed over rays for a
    shared source, deterministically). ``grad_density`` has ``density``'s dtype; it is accumulated
    in fp32 (fp64 for fp64 volumes) with float atomics, or in 64-bit fixed point when
    ``deterministic`` (bitwise repeatable; module docstring).
    """
    batch, n_rays, _ = target.shape
    n_channels = n_channels if labels is not None else 1
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
        skip_args, skip = _skip_args(None if need_volume else occupied, pool, density)
        n_max = pool.max_samples if pool is not None else n_samples
        br, bs, warps = launch_config(n_rays, n_max, backward=True, n_channels=n_channels)
        br, bs = block_r or br, block_s or bs
        args, int64 = _common_args(density, source, target, lo, hi, n_samples, n_channels, pool)
        grid = (triton.cdiv(n_rays, br), batch)
        dummy = grad_out  # stands in for buffers a specialisation never touches
        wrap_launch(_raymarch_bwd_kernel)[grid](
            density,
            labels if labels is not None else density,
            source,
            target,
            phase,
            grad_out,
            grad_src if need_pose else dummy,
            grad_tgt if need_pose else dummy,
            grad_vol if need_volume else dummy,
            scale if scale is not None else dummy,
            *args,
            *skip_args,
            NEED_POSE_GRAD=need_pose,
            NEED_VOLUME_GRAD=need_volume,
            DETERMINISTIC=deterministic and need_volume,
            **_channel_flags(n_channels, soft_labels),
            POOL=pool is not None,
            INT64=int64,
            SKIP=skip,
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
