"""The exact renderer on the Triton kernels of ``tritondrr.kernels.exact``, as ``torch.library`` ops.

``integrate`` has the signature and result of ``tritondrr.renderers.exact.naive.integrate``. Two
ops are registered:

- ``tritondrr::exact_integrate`` (forward), differentiable with respect to ``density``,
  ``source`` and ``target`` through ``register_autograd``; the context saves the inputs only
  (no pieces), the backward re-traverses the rays.
- ``tritondrr::exact_integrate_backward``: one launch of the backward kernel, which returns the
  pose gradients (per ray, reduced in registers) and, only when the volume needs a gradient, the
  volume gradient (atomics).

On a GPU with torch >= 2.6 they are ``torch.library.triton_op`` (``torch.compile`` can see the
kernels); under ``TRITON_INTERPRET=1`` or older torch, opaque ``custom_op`` with fake
implementations. This module imports Triton.
"""

from __future__ import annotations

import torch

from tritondrr.kernels import exact as _kernels

from .._op import define_op, interpreting

__all__ = ["integrate"]

_VOLUME_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_RAY_DTYPES = (torch.float32, torch.float64)


def _forward_impl(
    density: torch.Tensor,
    labels: torch.Tensor | None,
    source: torch.Tensor,
    target: torch.Tensor,
    lo: list[float],
    hi: list[float],
    n_channels: int,
    label_mode: int,
) -> torch.Tensor:
    return _kernels.exact_forward(density, labels, source, target, lo, hi, n_channels, label_mode)


def _forward_fake(density, labels, source, target, lo, hi, n_channels, label_mode):
    batch, n_rays, _ = target.shape
    return target.new_empty((batch, n_channels, n_rays))


_exact_op = define_op("tritondrr::exact_integrate", _forward_impl, _forward_fake)


def _backward_impl(
    grad_out: torch.Tensor,
    density: torch.Tensor,
    labels: torch.Tensor | None,
    source: torch.Tensor,
    target: torch.Tensor,
    lo: list[float],
    hi: list[float],
    n_channels: int,
    label_mode: int,
    need_pose: bool,
    need_volume: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_vol, grad_src, grad_tgt = _kernels.exact_backward(
        grad_out,
        density,
        labels,
        source,
        target,
        lo,
        hi,
        n_channels,
        label_mode,
        need_pose=need_pose,
        need_volume=need_volume,
    )
    # Custom ops return tensors: empty ones stand for gradients nobody asked for.
    if grad_vol is None:
        grad_vol = density.new_empty((0,))
    if grad_src is None:
        grad_src = source.new_empty((0,))
        grad_tgt = target.new_empty((0,))
    return grad_vol, grad_src, grad_tgt


def _backward_fake(grad_out, density, labels, source, target, lo, hi, n_channels, label_mode, need_pose, need_volume):
    return (
        density.new_empty(density.shape if need_volume else (0,)),
        source.new_empty(source.shape if need_pose else (0,)),
        target.new_empty(target.shape if need_pose else (0,)),
    )


_exact_backward_op = define_op("tritondrr::exact_integrate_backward", _backward_impl, _backward_fake)


def _setup_context(ctx, inputs, output):
    density, labels, source, target, lo, hi, n_channels, label_mode = inputs
    ctx.save_for_backward(density, labels, source, target)
    ctx.config = (list(lo), list(hi), n_channels, label_mode)


def _backward(ctx, grad_out):
    density, labels, source, target = ctx.saved_tensors
    lo, hi, n_channels, label_mode = ctx.config
    need_volume = ctx.needs_input_grad[0]
    need_pose = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    if not (need_volume or need_pose):
        return None, None, None, None, None, None, None, None
    grad_vol, grad_src, grad_tgt = _exact_backward_op(
        grad_out.contiguous(), density, labels, source, target, lo, hi, n_channels, label_mode, need_pose, need_volume
    )
    return (
        grad_vol if need_volume else None,
        None,
        grad_src if ctx.needs_input_grad[2] else None,
        grad_tgt if ctx.needs_input_grad[3] else None,
        None,
        None,
        None,
        None,
    )


_exact_op.register_autograd(_backward, setup_context=_setup_context)


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
    """Exact integral over ``t`` in [0, 1] of the trilinear interpolant along each ray, in Triton.

    The same contract as ``tritondrr.renderers.exact.naive.integrate``:

    Args:
        density: (I, J, K) float32/float16/bfloat16/float64 on CUDA (or the CPU under
            ``TRITON_INTERPRET=1``); voxel centres at integer index coordinates. Loads are
            upcast to the rays' dtype. A non-contiguous volume is copied.
        source: (B, 1, 3) or (B, N, 3) ray starts, index coordinates, float32 or float64.
        target: (B, N, 3) ray ends, the same dtype and device.
        labels: optional (I, J, K) integer labelmap with values in ``[0, n_channels)``.
        n_channels: channels when ``labels`` is given.
        soft_labels: each corner's trilinear weight goes to its own label's channel (default:
            each point goes to its nearest voxel's label, channel 0 outside the grid).
        box: optional ``((lo0, lo1, lo2), (hi0, hi1, hi2))`` index-space box outside which the
            field is zero (skips work; the result does not depend on it).

    Returns:
        (B, C, N) in the rays' dtype, differentiable with respect to ``density``, ``source`` and
        ``target``. Rays that miss the volume or have zero length give 0.
    """
    if not isinstance(density, torch.Tensor) or density.dim() != 3:
        raise ValueError(f"density must be an (I, J, K) tensor, got {getattr(density, 'shape', type(density))}")
    if density.dtype not in _VOLUME_DTYPES:
        raise TypeError(f"density must be float32, float16, bfloat16 or float64, got {density.dtype}")
    if not (density.is_cuda or (interpreting() and density.device.type == "cpu")):
        raise ValueError(
            f"density must be on a CUDA device (or the CPU under TRITON_INTERPRET=1), got {density.device}"
        )
    if target.dim() != 3 or target.shape[-1] != 3:
        raise ValueError(f"target must be (B, N, 3), got shape {tuple(target.shape)}")
    batch, n_rays, _ = target.shape
    if source.dim() != 3 or source.shape[0] != batch or source.shape[1] not in (1, n_rays) or source.shape[2] != 3:
        raise ValueError(
            f"source must be (B, 1, 3) or (B, N, 3) with B = {batch}, N = {n_rays}, got {tuple(source.shape)}"
        )
    if source.dtype != target.dtype or target.dtype not in _RAY_DTYPES:
        raise TypeError(f"source and target must both be float32 or float64, got {source.dtype} and {target.dtype}")
    for name, x in (("source", source), ("target", target)):
        if x.device != density.device:
            raise ValueError(f"{name} is on {x.device} but density is on {density.device}")
    label_mode, channels = 0, 1
    if labels is not None:
        if labels.shape != density.shape:
            raise ValueError(f"labels must have density's shape {tuple(density.shape)}, got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if not isinstance(n_channels, int) or n_channels < 1:
            raise ValueError(f"n_channels must be a positive int, got {n_channels!r}")
        labels = labels.to(torch.int64).clamp(0, n_channels - 1).contiguous()
        label_mode, channels = (2 if soft_labels else 1), n_channels
    lo = [-1.0, -1.0, -1.0]
    hi = [float(n) for n in density.shape]
    if box is not None:
        lo = [max(a, float(b)) for a, b in zip(lo, box[0])]
        hi = [min(a, float(b)) for a, b in zip(hi, box[1])]
    return _exact_op(
        density.contiguous(), labels, source.contiguous(), target.contiguous(), lo, hi, channels, label_mode
    )
