"""The trilinear renderer's Triton backend as ``torch.library`` custom ops with autograd: ``raymarch``.

``raymarch(density, source, target, phase, lo, hi, n_samples, *, deterministic=False)``
computes exactly ``naive.raymarch`` (labelmap channels included) with the kernels of
``tritondrr.kernels.trilinear``: per ray, the rectangle rule with the ray's sampling ``phase``
plus the Euler-Maclaurin end correction (the kernels' module docstring). Two ops are registered:

- ``tritondrr::raymarch`` (forward), differentiable with respect to ``density``, ``source``
  and ``target`` through ``register_autograd`` (``phase`` is not differentiated). The autograd
  context saves the inputs (the rays, the phases and a reference to the volume, no samples);
  the backward recomputes the samples.
- ``tritondrr::raymarch_backward``: one launch of the backward kernel, which returns the pose
  gradients (per ray, reduced in registers) and, only when the volume needs a gradient, the
  volume gradient (atomics; 64-bit fixed point when ``deterministic``).

On a GPU with torch >= 2.6 both are ``torch.library.triton_op`` (their launches go through
``wrap_triton``, so ``torch.compile`` sees and can inline the Triton kernels); under
``TRITON_INTERPRET=1`` (tests on CPU) or older torch they are opaque ``custom_op`` with a fake
implementation, which ``torch.compile`` also traces. This module imports Triton: import it only
for ``backend="triton"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from tritondrr.kernels import trilinear as _kernels

from .._op import define_op, interpreting


__all__ = ["MAX_CHANNELS", "raymarch"]

_VOLUME_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_RAY_DTYPES = (torch.float32, torch.float64)
_warned_noncontiguous = False


# ----------------------------------------------------------------------------------------------
# Forward op
# ----------------------------------------------------------------------------------------------


def _forward_impl(
    density: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    phase: torch.Tensor,
    lo: Sequence[float],
    hi: Sequence[float],
    n_samples: int,
    deterministic: bool,
    labels: torch.Tensor | None = None,
    n_channels: int = 1,
    soft_labels: bool = False,
    occupied: torch.Tensor | None = None,
) -> torch.Tensor:
    return _kernels.raymarch_forward(
        density, source, target, phase, lo, hi, n_samples, labels=labels, n_channels=n_channels, soft_labels=soft_labels,
        occupied=occupied,
    )  # fmt: skip


def _forward_fake(
    density, source, target, phase, lo, hi, n_samples, deterministic, labels=None, n_channels=1, soft_labels=False,
    occupied=None,
):  # fmt: skip
    batch, n_rays, _ = target.shape
    return target.new_empty((batch, n_channels if labels is not None else 1, n_rays))


_raymarch_op = define_op("tritondrr::raymarch", _forward_impl, _forward_fake)


# ----------------------------------------------------------------------------------------------
# Backward op
# ----------------------------------------------------------------------------------------------


def _backward_impl(
    grad_out: torch.Tensor,
    density: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    phase: torch.Tensor,
    lo: Sequence[float],
    hi: Sequence[float],
    n_samples: int,
    need_pose: bool,
    need_volume: bool,
    deterministic: bool,
    labels: torch.Tensor | None = None,
    n_channels: int = 1,
    soft_labels: bool = False,
    occupied: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_vol, grad_src, grad_tgt = _kernels.raymarch_backward(
        grad_out,
        density,
        source,
        target,
        phase,
        lo,
        hi,
        n_samples,
        need_pose=need_pose,
        need_volume=need_volume,
        deterministic=deterministic,
        labels=labels,
        n_channels=n_channels,
        soft_labels=soft_labels,
        occupied=occupied,
    )
    # Custom ops return tensors: empty ones stand for gradients nobody asked for.
    if grad_vol is None:
        grad_vol = density.new_empty((0,))
    if grad_src is None:
        grad_src = source.new_empty((0,))
        grad_tgt = target.new_empty((0,))
    return grad_vol, grad_src, grad_tgt


def _backward_fake(
    grad_out, density, source, target, phase, lo, hi, n_samples, need_pose, need_volume, deterministic,
    labels=None, n_channels=1, soft_labels=False, occupied=None,
):  # fmt: skip
    grad_vol = density.new_empty(density.shape if need_volume else (0,))
    grad_src = source.new_empty(source.shape if need_pose else (0,))
    grad_tgt = target.new_empty(target.shape if need_pose else (0,))
    return grad_vol, grad_src, grad_tgt


_raymarch_backward_op = define_op("tritondrr::raymarch_backward", _backward_impl, _backward_fake)


def _setup_context(ctx, inputs, output):
    density, source, target, phase, lo, hi, n_samples, deterministic, labels, n_channels, soft_labels, occupied = inputs
    ctx.save_for_backward(density, source, target, phase, labels, occupied)
    ctx.config = (list(lo), list(hi), n_samples, deterministic, n_channels, soft_labels)


def _backward(ctx, grad_out):
    density, source, target, phase, labels, occupied = ctx.saved_tensors
    lo, hi, n_samples, deterministic, n_channels, soft_labels = ctx.config
    need_volume = ctx.needs_input_grad[0]
    need_pose = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    nones = (None,) * 9  # phase, lo, hi, n_samples, deterministic, labels, n_channels, soft_labels, occupied
    if not (need_volume or need_pose):
        return (None, None, None) + nones
    grad_vol, grad_src, grad_tgt = _raymarch_backward_op(
        grad_out.contiguous(), density, source, target, phase, lo, hi, n_samples, need_pose, need_volume, deterministic,
        labels, n_channels, soft_labels, occupied,
    )  # fmt: skip
    return (
        grad_vol if need_volume else None,
        grad_src if ctx.needs_input_grad[1] else None,
        grad_tgt if ctx.needs_input_grad[2] else None,
    ) + nones


_raymarch_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry point: validation, then the op
# ----------------------------------------------------------------------------------------------


def _box(name, value) -> list[float]:
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise TypeError(f"{name} must be 3 floats or a CPU tensor (reading a {value.device} tensor would sync)")
        value = value.tolist()
    try:
        out = [float(x) for x in value]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of 3 floats, got {type(value).__name__}") from None
    if len(out) != 3:
        raise ValueError(f"{name} must have 3 entries, got {len(out)}")
    return out


def raymarch(
    density: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    phase: torch.Tensor,
    lo,
    hi,
    n_samples: int,
    *,
    deterministic: bool = False,
    labels: torch.Tensor | None = None,
    n_channels: int = 1,
    soft_labels: bool = False,
    bricks=None,
) -> torch.Tensor:
    """Integral of the density along rays (``naive.raymarch``), in Triton: ``g`` of docs/sampling.md.

    Args:
        density: (I, J, K) float32/float16/bfloat16/float64 volume on CUDA (or CPU under
            ``TRITON_INTERPRET=1``). Voxel centres at integer index coordinates. Should be
            contiguous: a non-contiguous volume is copied, with a warning (once).
        source: (B, 1, 3) or (B, N, 3) ray starts in index coordinates, float32 or float64.
        target: (B, N, 3) ray ends in index coordinates, the same dtype as ``source``.
        phase: (N,) floating tensor on the rays' device, each ray's sampling phase in [0, 1)
            (shared by all poses; values are not checked, that would sync). Converted to the
            rays' dtype and made contiguous. Not differentiable.
        lo, hi: 3 floats each (or CPU tensors), the index-space box outside which the field is
            zero (passed to the kernels as float32: exact for integer and half-integer boxes).
        n_samples: samples per ray (a positive int).
        deterministic: make the volume gradient bitwise repeatable (64-bit fixed-point atomics:
            an extra 8 bytes per voxel during the backward). Pose gradients always are.
        labels: optional (I, J, K) integer labelmap of channel indices in ``[0, n_channels)`` on
            density's device (converted to a contiguous int64 tensor). Hard labels: each sample
            and end-correction point goes to the channel of its nearest voxel's label (round
            half to even; channel 0 outside the grid; labels outside the range are clamped).
        n_channels: C, the number of channels with ``labels`` (a compile-time constant of the
            kernels: the C = 1 path is the plain kernel). Values up to ``MAX_CHANNELS``.
        soft_labels: with ``labels``, route each of a point's 8 trilinear corner weights to that
            corner's label channel (channel c is the plain integral of ``density * (labels == c)``;
            labels outside ``[0, n_channels)`` go nowhere).
        bricks: optional ``tritondrr.occupancy.Bricks`` of ``density`` (on its device): runs of
            samples in empty space load nothing (same result). Ignored while ``density``
            requires grad: the volume gradient is non-zero in empty space too.

    Returns:
        (B, C, N) in the rays' dtype (C = 1 without labels), differentiable with respect to
        ``density``, ``source`` and ``target`` (not ``phase``). Samples and accumulation are in the
        rays' dtype. Channels sum to the plain image.
    """
    global _warned_noncontiguous
    if not isinstance(density, torch.Tensor):
        raise TypeError(f"density must be a torch.Tensor, got {type(density).__name__}")
    if density.dim() != 3:
        raise ValueError(f"density must be (I, J, K), got shape {tuple(density.shape)}")
    if density.dtype not in _VOLUME_DTYPES:
        raise TypeError(f"density must be float32, float16, bfloat16 or float64, got {density.dtype}")
    _check_rays(density, source, target, phase)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    lo_f, hi_f = _box("lo", lo), _box("hi", hi)
    labels, n_channels = _check_labels(labels, n_channels, soft_labels, density)
    if not density.is_contiguous():
        if not _warned_noncontiguous:
            warnings.warn(
                f"density is not contiguous (strides {density.stride()}); copying it on every call. "
                "Pass density.contiguous() once to avoid the copy.",
                stacklevel=2,
            )
            _warned_noncontiguous = True
        density = density.contiguous()
    # Rays are O(B N): making them contiguous is cheap.
    phase = phase.detach().to(target.dtype).contiguous()
    occupied = None
    if bricks is not None and not (density.requires_grad and torch.is_grad_enabled()):
        occupied = bricks.occupied
        expected = tuple(n // 8 + 2 for n in density.shape)  # occupancy.BRICK = 8 (the kernels' _skip_empty)
        if occupied.device != density.device or occupied.dtype != torch.uint8 or tuple(occupied.shape) != expected:
            raise ValueError(
                f"bricks.occupied must be a uint8 tensor of shape {expected} on {density.device}, got "
                f"{occupied.dtype} {tuple(occupied.shape)} on {occupied.device}"
            )
    return _raymarch_op(
        density, source.contiguous(), target.contiguous(), phase, lo_f, hi_f, n_samples, deterministic,
        labels, n_channels, bool(soft_labels), occupied,
    )  # fmt: skip


def _check_rays(density, source, target, phase) -> None:
    """Device of the volume, shapes and dtypes of the rays and the phases (``raymarch``'s Args)."""
    if not (density.is_cuda or (interpreting() and density.device.type == "cpu")):
        raise ValueError(
            f"density must be on a CUDA device (or the CPU under TRITON_INTERPRET=1), got {density.device}"
        )
    for name, x in (("source", source), ("target", target)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != 3:
            raise ValueError(f"{name} must be (B, N, 3), got shape {tuple(x.shape)}")
        if x.dtype not in _RAY_DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
        if x.device != density.device:
            raise ValueError(f"{name} is on {x.device} but density is on {density.device}")
    if source.dtype != target.dtype:
        raise TypeError(f"source and target must share a dtype, got {source.dtype} and {target.dtype}")
    if source.shape[0] != target.shape[0] or source.shape[1] not in (1, target.shape[1]):
        raise ValueError(
            f"source must be (B, 1, 3) or (B, N, 3) with target (B, N, 3), got source "
            f"{tuple(source.shape)} and target {tuple(target.shape)}"
        )
    if not isinstance(phase, torch.Tensor):
        raise TypeError(f"phase must be a torch.Tensor, got {type(phase).__name__}")
    if phase.dim() != 1 or phase.shape[0] != target.shape[1]:
        raise ValueError(
            f"phase must be (N,) = ({target.shape[1]},) for target (B, N, 3), got shape {tuple(phase.shape)}"
        )
    if not phase.is_floating_point():
        raise TypeError(f"phase must be a floating tensor, got {phase.dtype}")
    if phase.device != target.device:
        raise ValueError(f"phase is on {phase.device} but the rays are on {target.device}")


#: Largest channel count the kernels take (O(C) work per sample: a loop over the channels per
#: sample block); ``tritondrr.renderers`` renders more channels with the PyTorch reference.
MAX_CHANNELS = 32


def _check_labels(labels, n_channels, soft_labels, density):
    """(labels as contiguous int64 or None, C) after checking them against ``density``."""
    if not isinstance(soft_labels, bool):
        raise TypeError(f"soft_labels must be a bool, got {type(soft_labels).__name__}")
    if labels is None:
        return None, 1
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor, got {got}")
    if labels.shape != density.shape:
        raise ValueError(f"labels must have density's shape {tuple(density.shape)}, got {tuple(labels.shape)}")
    if labels.device != density.device:
        raise ValueError(f"labels is on {labels.device} but density is on {density.device}")
    if isinstance(n_channels, bool) or not isinstance(n_channels, int) or not 1 <= n_channels <= MAX_CHANNELS:
        raise ValueError(f"n_channels must be an int in [1, {MAX_CHANNELS}], got {n_channels!r}")
    return labels.to(torch.int64).contiguous(), n_channels


# ----------------------------------------------------------------------------------------------
# Many volumes in one launch: pose b through volume index[b] of a packed pool
# ----------------------------------------------------------------------------------------------


def _pack(tensors) -> tuple[torch.Tensor, list[int]]:
    """(flat pool, element offset of each tensor). Contiguous tensors that share one storage
    (``BatchDRR``'s views of its pool) are used in place; others are concatenated (one copy)."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    if all(t.is_contiguous() and t.untyped_storage().data_ptr() == storage for t in tensors):
        base = min(t.storage_offset() for t in tensors)
        end = max(t.storage_offset() + t.numel() for t in tensors)
        return first.detach().as_strided((end - base,), (1,), base), [t.storage_offset() - base for t in tensors]
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += t.numel()
    return torch.cat([t.detach().reshape(-1) for t in tensors]), offsets


def _pack_like(labels, offsets: list[int], size: int) -> torch.Tensor:
    """The labelmaps laid out at the volumes' offsets in one flat int64 buffer."""
    flat = torch.zeros(size, dtype=torch.int64, device=labels[0].device)
    for lab, off in zip(labels, offsets):
        flat[off : off + lab.numel()] = lab.reshape(-1)
    return flat


class _RaymarchPool(torch.autograd.Function):
    """``raymarch_pool``'s autograd: one forward launch, one backward launch, gradients per volume."""

    @staticmethod
    def forward(ctx, config, index, source, target, phase, *volumes):
        boxes, n_samples, _deterministic, labels, n_channels, soft_labels = config
        flat, offsets = _pack(volumes)
        meta = [[off, *v.shape, v.shape[1] * v.shape[2], v.shape[2], n, 0] for v, off, n in zip(volumes, offsets, n_samples)]
        box = [[*lo, *hi] for lo, hi in boxes]
        pool = _kernels.Pool(
            item=torch.tensor(meta, dtype=torch.int64).to(target.device)[index].contiguous(),
            box=torch.tensor(box, dtype=torch.float32).to(target.device)[index].contiguous(),
            shapes=tuple(tuple(v.shape) for v in volumes),
            max_samples=max(n_samples),
        )
        flat_labels = None if labels is None else _pack_like(labels, offsets, flat.numel())
        ctx.save_for_backward(source, target, phase, *volumes)
        ctx.pool, ctx.offsets, ctx.flat_labels, ctx.config = pool, offsets, flat_labels, config
        return _kernels.raymarch_forward(
            flat, source, target, phase, None, None, 0,
            labels=flat_labels, n_channels=n_channels, soft_labels=soft_labels, pool=pool,
        )  # fmt: skip

    @staticmethod
    def backward(ctx, grad_out):
        source, target, phase, *volumes = ctx.saved_tensors
        _, _, deterministic, _, n_channels, soft_labels = ctx.config
        need_volume = any(ctx.needs_input_grad[5:])
        need_pose = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        none = (None,) * (5 + len(volumes))
        if not (need_volume or need_pose):
            return none
        flat, _ = _pack(volumes)
        grad_flat, grad_src, grad_tgt = _kernels.raymarch_backward(
            grad_out.contiguous(), flat, source, target, phase, None, None, 0,
            need_pose=need_pose, need_volume=need_volume, deterministic=deterministic,
            labels=ctx.flat_labels, n_channels=n_channels, soft_labels=soft_labels, pool=ctx.pool,
        )  # fmt: skip
        grads = [
            grad_flat[off : off + v.numel()].view(v.shape) if need_volume and needs else None
            for v, off, needs in zip(volumes, ctx.offsets, ctx.needs_input_grad[5:])
        ]
        ctx.flat_labels = None
        return (
            None,
            None,
            grad_src if ctx.needs_input_grad[2] else None,
            grad_tgt if ctx.needs_input_grad[3] else None,
            None,
            *grads,
        )


def raymarch_pool(
    volumes,
    index: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    phase: torch.Tensor,
    boxes,
    n_samples,
    *,
    deterministic: bool = False,
    labels=None,
    n_channels: int = 1,
    soft_labels: bool = False,
) -> torch.Tensor:
    """``raymarch`` of pose b through ``volumes[index[b]]``, for all poses in one kernel launch.

    The volumes are packed into one flat pool (used in place when they are contiguous views of
    one buffer, as ``BatchDRR`` keeps them; else concatenated, one copy per call); each pose reads
    its volume's int64 offset, shape, box and sample count from small per-pose tensors gathered
    on the device (no host synchronisation).

    Args:
        volumes: sequence of V (I_v, J_v, K_v) volumes of one dtype on one device (any shapes).
        index: (B,) integer tensor on that device, values in [0, V) (not checked: that would sync).
        source: (B, 1, 3) or (B, N, 3), target: (B, N, 3): index coordinates of each pose's own
            volume; phase: (N,) as in ``raymarch``.
        boxes: V pairs (lo, hi) of 3 floats: each volume's box (index space).
        n_samples: V positive ints: each volume's samples per ray.
        deterministic, n_channels, soft_labels: as in ``raymarch``.
        labels: None, or V integer labelmaps, one per volume, of the volumes' shapes.

    Returns:
        (B, C, N) in the rays' dtype, equal to B separate ``raymarch`` calls (to float rounding);
        differentiable with respect to every volume, ``source`` and ``target``.
    """
    volumes = list(volumes)
    if not volumes:
        raise ValueError("volumes must hold at least one volume, got none")
    first = volumes[0]
    for v, x in enumerate(volumes):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"volumes[{v}] must be an (I, J, K) tensor, got {got}")
        if x.dtype != first.dtype or x.device != first.device:
            raise ValueError(
                f"volumes must share one dtype and device: volumes[0] is {first.dtype} on {first.device}, "
                f"volumes[{v}] is {x.dtype} on {x.device}"
            )
    if first.dtype not in _VOLUME_DTYPES:
        raise TypeError(f"volumes must be float32, float16, bfloat16 or float64, got {first.dtype}")
    _check_rays(first, source, target, phase)
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point():
        raise ValueError(f"index must be a (B,) integer tensor, got {index!r:.80}")
    if target.dim() != 3 or index.shape[0] != target.shape[0]:
        raise ValueError(f"index must have one entry per pose of target (B, N, 3), got {tuple(index.shape)} and {tuple(target.shape)}")
    boxes, n_samples = list(boxes), list(n_samples)
    if len(boxes) != len(volumes) or len(n_samples) != len(volumes):
        raise ValueError(f"boxes and n_samples need one entry per volume ({len(volumes)}), got {len(boxes)} and {len(n_samples)}")
    boxes = [(_box("lo", lo), _box("hi", hi)) for lo, hi in boxes]
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in n_samples):
        raise ValueError(f"n_samples must be positive ints, got {n_samples!r}")
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(volumes):
            raise ValueError(f"labels needs one labelmap per volume ({len(volumes)}), got {len(labels)}")
        labels = [_check_labels(lab, n_channels, soft_labels, vol)[0] for lab, vol in zip(labels, volumes)]
    else:
        n_channels = 1
    phase = phase.detach().to(target.dtype).contiguous()
    config = (boxes, n_samples, deterministic, labels, n_channels, bool(soft_labels))
    index = index.to(device=target.device, dtype=torch.int64)
    return _RaymarchPool.apply(config, index, source.contiguous(), target.contiguous(), phase, *volumes)
