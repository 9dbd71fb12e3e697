"""``render``: line integrals of a CT volume along rays, with input checks and backend dispatch.

This is the functional core below ``DRR``: it knows volumes, affines and rays in world mm, and
nothing about poses or detectors. It converts rays to index space, chooses the number of samples
per ray from the sampling distance, and calls the reference (PyTorch) or the Triton backend,
which compute the same function (``tritondrr.reference``).
"""

from __future__ import annotations

import math

import torch

from . import reference

__all__ = ["render", "ray_phases", "samples_per_ray", "DEFAULT_STEP_VOXELS", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")

#: Default sampling distance, in units of the smallest voxel spacing, along the longest chord.
DEFAULT_STEP_VOXELS = 1.0


def _check_tensor(name, x, dims, last=None, floating=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims or (last is not None and x.shape[-1] != last):
        want = f"{dims}-D" + (f" with last dimension {last}" if last else "")
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _world_to_index(affine: torch.Tensor, dtype) -> torch.Tensor:
    """(4, 4) inverse affine, inverted in float64 where the device allows it.

    ``inv_ex`` does not check for singularity, which would synchronise with a CUDA device; the
    affine is checked where it is created (``Subject``).
    """
    if affine.device.type == "mps":
        return torch.linalg.inv_ex(affine.float()).inverse.to(dtype)
    return torch.linalg.inv_ex(affine.double()).inverse.to(dtype)


def samples_per_ray(affine: torch.Tensor, lo, hi, step: float | None = None) -> int:
    """Samples per ray so that the longest chord through the box ``[lo, hi]`` has spacing ``step``.

    The count depends on the volume only, never on the pose, so every ray of every pose gets the
    same number of samples and images are smooth functions of the pose. Shorter chords are
    sampled more densely. ``step`` is in mm; None means ``DEFAULT_STEP_VOXELS`` times the smallest
    voxel spacing.
    """
    linear = affine[:3, :3].double().cpu()
    if step is None:
        step = DEFAULT_STEP_VOXELS * float(linear.norm(dim=0).min())
    extent = torch.tensor(hi, dtype=torch.float64) - torch.tensor(lo, dtype=torch.float64)
    if (extent <= 0).any():
        return 1
    # The longest chord of a parallelepiped is one of its four space diagonals.
    signs = torch.tensor([[1.0, 1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]], dtype=torch.float64)
    chord = float(((signs * extent) @ linear.T).norm(dim=-1).max())
    return max(1, math.ceil(chord / step))


def ray_phases(ray_ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Sampling phase in [0, 1] of each ray from its id (a pixel index): Knuth's multiplicative hash.

    A fixed function of the ray's identity, so images stay smooth in the pose, and scattered
    enough that the sampling errors of neighbouring pixels do not line up (module docstring of
    ``tritondrr.reference``). Integer arithmetic, then one rounding: the same on every device.
    """
    # id + 1: pixel 0 would otherwise get phase 0 exactly, a sample on its entry point.
    return (((ray_ids.long() + 1) * 2654435761) % (1 << 32)).to(dtype) / float(1 << 32)


def _resolve_backend(backend: str, density: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if density.is_cuda else "torch"
    if backend == "triton" and not (density.is_cuda or _interpreting()):
        raise ValueError(
            f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for testing), got density on {density.device}"
        )
    return backend


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def render(
    density: torch.Tensor,
    affine: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    step: float | None = None,
    n_samples: int | None = None,
    box=None,
    ray_ids: torch.Tensor | None = None,
    backend: str = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """Line integrals (density x mm) of the trilinear interpolant of ``density`` along rays.

    Args:
        density: (I, J, K) float tensor (fp32, fp64, fp16 or bf16). Voxel (i, j, k) has its centre
            at index (i, j, k); the field is zero beyond one voxel outside the grid.
        affine: (4, 4) voxel index -> world mm.
        source: (B, 1, 3) or (B, N, 3) ray starts in world mm.
        target: (B, N, 3) ray ends in world mm (the detector pixels).
        mask: optional (I, J, K) integer labelmap. The output gets one channel per label
            (C = max label + 1); each sample goes to the channel of its nearest voxel's label.
        step: sampling distance in mm along the longest chord through the volume (shorter
            chords are sampled more densely); None: one voxel (the smallest spacing).
        n_samples: samples per ray, instead of ``step``.
        box: optional ``(lo, hi)`` index-space box outside which ``density`` is zero. None: the
            bounding box of the non-zero voxels (one pass over the volume) when the volume needs
            no gradient, else the whole support.
        ray_ids: optional (N,) integer id of each ray (its pixel index), which seeds the ray's
            sampling phase; None: 0 .. N-1. Give the pixel indices when rendering a subset of a
            detector so each pixel gets the value it has in the whole image.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
        deterministic: bitwise-repeatable volume gradient on the Triton backend (fixed-point
            atomics, 8 bytes per voxel during the backward). The PyTorch backend always is.

    Returns:
        (B, C, N) in the rays' dtype. Rays that miss the volume or have zero length give 0.

    Example:
        >>> density = torch.ones(4, 4, 4)
        >>> out = render(density, torch.eye(4), torch.tensor([[[-10.0, 1.5, 1.5]]]),
        ...              torch.tensor([[[10.0, 1.5, 1.5]]]), n_samples=500)
        >>> round(float(out), 4)  # 1 mm voxels: 3 mm of plateau plus a 1 mm tent on each side
        4.0
    """
    _check_tensor("density", density, 3)
    _check_tensor("affine", affine, 2)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4), got {tuple(affine.shape)}")
    _check_tensor("target", target, 3, last=3)
    _check_tensor("source", source, 3, last=3)
    if source.shape[0] != target.shape[0] or source.shape[1] not in (1, target.shape[1]):
        raise ValueError(
            f"source must be (B, 1, 3) or (B, N, 3) with target (B, N, 3), got source "
            f"{tuple(source.shape)} and target {tuple(target.shape)}"
        )
    for name, x in (("affine", affine), ("source", source), ("target", target)):
        if x.device != density.device:
            raise ValueError(f"{name} is on {x.device} but density is on {density.device}")
    if source.dtype != target.dtype or target.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"source and target must share dtype float32 or float64, got {source.dtype} and {target.dtype}")
    if step is not None and n_samples is not None:
        raise ValueError("give step or n_samples, not both")
    if step is not None and not (isinstance(step, (int, float)) and step > 0):
        raise ValueError(f"step must be a positive number of mm, got {step!r}")
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    n_channels = 1
    if mask is not None:
        _check_tensor("mask", mask, 3, floating=False)
        if mask.shape != density.shape:
            raise ValueError(f"mask must have density's shape {tuple(density.shape)}, got {tuple(mask.shape)}")
        n_channels = int(mask.max()) + 1
    if ray_ids is None:
        ray_ids = torch.arange(target.shape[1], device=target.device)
    elif not isinstance(ray_ids, torch.Tensor) or ray_ids.shape != (target.shape[1],) or ray_ids.is_floating_point():
        got = tuple(ray_ids.shape) if isinstance(ray_ids, torch.Tensor) else type(ray_ids).__name__
        raise ValueError(f"ray_ids must be an integer tensor of shape ({target.shape[1]},), got {got}")
    backend = _resolve_backend(backend, density)

    if box is None:
        needs_all = density.requires_grad and torch.is_grad_enabled()
        box = reference.support_box(density.shape) if needs_all else reference.occupied_box(density)
    lo, hi = box
    if n_samples is None:
        n_samples = samples_per_ray(affine, lo, hi, step)

    phase = ray_phases(ray_ids.to(target.device), target.dtype)
    inverse = _world_to_index(affine, target.dtype)
    src = source @ inverse[:3, :3].T + inverse[:3, 3]
    tgt = target @ inverse[:3, :3].T + inverse[:3, 3]
    if backend == "triton":
        from . import ops

        if mask is not None:
            raise NotImplementedError("mask (labelmap channels) is not yet supported by backend='triton'; use 'torch'")
        integral = ops.raymarch(density, src, tgt, phase, lo, hi, n_samples, deterministic=deterministic)
    else:
        integral = reference.raymarch(density, src, tgt, phase, lo, hi, n_samples, labels=mask, n_channels=n_channels)
    length_mm = (target - source).norm(dim=-1)  # [B, N]
    return integral * length_mm[:, None, :]
