"""``render``: line integrals of a CT volume along rays, with input checks and backend dispatch.

This is the functional core below ``DRR``: it knows volumes, affines and rays in world mm, and
nothing about poses or detectors. It validates its arguments once, converts rays to index
space, and calls one row of ``tritondrr.renderers.RENDERERS`` (docs/architecture.md).
"""

from __future__ import annotations

import torch

from . import _config, _limits, _validate
from .renderers import BACKENDS, RENDERER_NAMES, RENDERERS, Sampling
from .renderers._sampling import ray_phases, samples_per_ray
from .volume import Volume, world_to_index

__all__ = ["render", "ray_phases", "samples_per_ray", "BACKENDS", "RENDERER_NAMES"]


def _check_tensor(name, x, dims, last=None, floating=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims or (last is not None and x.shape[-1] != last):
        want = f"{dims}-D" + (f" with last dimension {last}" if last else "")
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _resolve_backend(backend: str, density: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if density.is_cuda else "torch"
    if backend == "triton" and not (density.is_cuda or _config.interpreting()):
        raise ValueError(
            f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for testing), got density on {density.device}"
        )
    return backend


def check_renderer(renderer) -> str:
    """``renderer`` if it names a renderer, else a ValueError listing the choices."""
    if renderer not in RENDERER_NAMES:
        raise ValueError(f"renderer must be one of {RENDERER_NAMES}, got {renderer!r}")
    return renderer


def render(
    density: torch.Tensor,
    affine: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    renderer: str = "trilinear",
    soft_labels: bool = False,
    n_channels: int | None = None,
    step: float | None = None,
    n_samples: int | None = None,
    box=None,
    ray_ids: torch.Tensor | None = None,
    backend: str = "auto",
    deterministic: bool = False,
    bricks=None,
) -> torch.Tensor:
    """Line integrals (density x mm) of ``density`` along rays: the trilinear interpolant
    (sampled, or exactly) or Siddon's nearest-neighbour voxels.

    Args:
        density: (I, J, K) float tensor (fp32, fp64, fp16 or bf16). Voxel (i, j, k) has its centre
            at index (i, j, k); the field is zero beyond one voxel outside the grid. Or a list or
            tuple of B volumes of any shapes: pose b is rendered through volume b (one launch on
            the Triton backend; ``tritondrr.renderers.batched``), with ``affine`` (B, 4, 4) and
            ``mask`` / ``box`` sequences of B entries.
        affine: (4, 4) voxel index -> world mm (or a one-pose ``RigidTransform`` such as
            ``drr.affine``).
        source: (B, 1, 3) or (B, N, 3) ray starts in world mm.
        target: (B, N, 3) ray ends in world mm (the detector pixels).
        mask: optional (I, J, K) integer labelmap. The output gets one channel per label
            (C = max label + 1); each point of a ray goes to the channel of its nearest voxel's
            label (round half to even), or with ``soft_labels`` each trilinear corner weight to
            its own voxel's label. Channels sum to the plain image.
        renderer: "trilinear" (sampled trilinear interpolant, docs/sampling.md), "siddon"
            (exact integral of the nearest-neighbour field) or "exact" (exact integral of the
            trilinear interpolant).
        soft_labels: see ``mask``.
        n_channels: channel count with ``mask`` (None: max label + 1, read from the mask).
        step: trilinear: sampling distance in mm along the longest chord through the volume
            (shorter chords are sampled more densely); None: one voxel (the smallest spacing).
        n_samples: trilinear: samples per ray, instead of ``step``.
        box: optional ``(lo, hi)`` index-space box outside which ``density`` is zero. None: the
            bounding box of the non-zero voxels (one pass over the volume) when the volume needs
            no gradient, else the whole support.
        ray_ids: optional (N,) integer id of each ray (its pixel index), which seeds the ray's
            sampling phase; None: 0 .. N-1. Give the pixel indices when rendering a subset of a
            detector so each pixel gets the value it has in the whole image.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
        deterministic: bitwise-repeatable volume gradient on the Triton backend (fixed-point
            atomics, 8 bytes per voxel during the backward). The PyTorch backend always is.
        bricks: optional ``tritondrr.occupancy.Bricks`` of ``density`` (``brick_groups(density)``,
            or ``Volume.bricks()`` cached): rays skip the empty space it marks, with the same
            result to float rounding. Ignored while ``density`` requires grad. ``DRR`` passes its
            cached one; None: no skipping.

    Returns:
        (B, C, N) in the rays' dtype. Rays that miss the volume or have zero length give 0.

    Example:
        >>> density = torch.ones(4, 4, 4)
        >>> out = render(density, torch.eye(4), torch.tensor([[[-10.0, 1.5, 1.5]]]),
        ...              torch.tensor([[[10.0, 1.5, 1.5]]]), n_samples=500)
        >>> round(float(out), 4)  # 1 mm voxels: 3 mm of plateau plus a 1 mm tent on each side
        4.0
    """
    if hasattr(affine, "matrix") and not isinstance(affine, torch.Tensor):  # a RigidTransform (drr.affine)
        affine = affine.matrix
        if isinstance(density, torch.Tensor) and affine.dim() == 3 and affine.shape[0] == 1:
            affine = affine[0]
    if isinstance(density, (list, tuple)):  # many volumes: pose b through density[b]
        from .renderers.batched import render_volumes

        return render_volumes(
            density, affine, source, target, mask=mask, renderer=renderer, soft_labels=soft_labels,
            n_channels=n_channels, step=step, n_samples=n_samples, box=box, ray_ids=ray_ids, backend=backend,
            deterministic=deterministic,
        )  # fmt: skip
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
    step, n_samples, box, n_channels = _validate.render_arguments(
        density, affine, source, target, mask=mask, n_channels=n_channels, step=step, n_samples=n_samples, box=box,
        ray_ids=ray_ids,
    )  # fmt: skip
    source, target = _validate.finite_ray_ends(source, target, affine, density.shape)
    if step is not None and n_samples is not None:
        raise ValueError("give step or n_samples, not both")
    if step is not None and not (isinstance(step, (int, float)) and step > 0):
        raise ValueError(f"step must be a positive number of mm, got {step!r}")
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    check_renderer(renderer)
    if mask is None:
        n_channels = 1
    else:
        _check_tensor("mask", mask, 3, floating=False)
        if mask.shape != density.shape:
            raise ValueError(f"mask must have density's shape {tuple(density.shape)}, got {tuple(mask.shape)}")
        n_channels = int(mask.max()) + 1 if n_channels is None else n_channels
        mask = mask if mask.dtype == torch.int64 else mask.long()
    if ray_ids is None:
        ray_ids = torch.arange(target.shape[1], device=target.device)
    elif not isinstance(ray_ids, torch.Tensor) or ray_ids.shape != (target.shape[1],) or ray_ids.is_floating_point():
        got = tuple(ray_ids.shape) if isinstance(ray_ids, torch.Tensor) else type(ray_ids).__name__
        raise ValueError(f"ray_ids must be an integer tensor of shape ({target.shape[1]},), got {got}")
    backend = _resolve_backend(backend, density)

    if box is None:
        box = Volume(density, affine).box()
    if bricks is not None:
        if not hasattr(bricks, "groups"):
            raise TypeError(f"bricks must be a tritondrr.occupancy.Bricks or None, got {type(bricks).__name__}")
        if density.requires_grad and torch.is_grad_enabled():
            bricks = None  # the volume gradient is non-zero in empty space too
        elif bricks.groups.device != density.device:
            raise ValueError(f"bricks are on {bricks.groups.device} but density is on {density.device}")
    sampling = None
    if renderer == "trilinear":
        lo, hi = box
        if n_samples is None:
            n_samples = samples_per_ray(affine, lo, hi, step)
        _limits.check_samples(n_samples, target.element_size(), backend, step)
        sampling = Sampling(ray_phases(ray_ids.to(target.device), target.dtype), n_samples, deterministic)

    inverse = world_to_index(affine, target.dtype)
    src = source @ inverse[:3, :3].T + inverse[:3, 3]
    tgt = target @ inverse[:3, :3].T + inverse[:3, 3]
    integral = RENDERERS[(renderer, backend)](
        density, src, tgt, box=box, labels=mask, n_channels=n_channels, soft_labels=soft_labels, sampling=sampling,
        bricks=bricks,
    )  # fmt: skip
    length_mm = (target - source).norm(dim=-1)  # [B, N]
    integral = _validate.clamp_if_nonnegative(integral, density)  # docs/errors.md: the end correction
    return integral * length_mm[:, None, :]
