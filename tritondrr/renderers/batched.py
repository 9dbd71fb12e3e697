"""Many volumes in one call: pose ``b`` rendered through its own volume.

``render(densities, affines, source, target)`` with a sequence of B volumes lands in
``render_volumes``; ``BatchDRR`` calls ``render_indexed`` directly (V subjects, a (B,) subject
index, no host synchronisation on CUDA). On the Triton backend the trilinear renderer renders
every pose in ONE launch over a packed pool of the volumes (``trilinear.op.raymarch_pool``);
every other (renderer, backend) pair renders one ``render`` call per distinct volume, which gives
the same images as B separate renders by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..volume import Volume, world_to_index
from ._sampling import ray_phases, samples_per_ray

__all__ = ["render_indexed", "render_volumes"]


def _resolve_backend(backend: str, density: torch.Tensor) -> str:
    from ..render import _resolve_backend as resolve

    return resolve(backend, density)


def render_indexed(
    volumes: Sequence[torch.Tensor],
    affines: torch.Tensor,
    index: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    masks: Sequence[torch.Tensor] | None = None,
    boxes=None,
    n_channels: int | None = None,
    renderer: str = "trilinear",
    soft_labels: bool = False,
    step: float | None = None,
    n_samples=None,
    ray_ids: torch.Tensor | None = None,
    backend: str = "auto",
    deterministic: bool = False,
    host_affines: torch.Tensor | None = None,
) -> torch.Tensor:
    """Line integrals (density x mm) of pose ``b`` through ``volumes[index[b]]``.

    Args:
        volumes: V (I_v, J_v, K_v) float volumes of one dtype on one device (any shapes).
        affines: (V, 4, 4) voxel index -> world mm of each volume.
        index: (B,) integer tensor, values in [0, V): the volume of each pose.
        source: (B, 1, 3) or (B, N, 3), target: (B, N, 3): world mm.
        masks: None, or V integer labelmaps (channels as in ``render``'s ``mask``).
        boxes: None (each volume's occupied box), or V index-space boxes ``(lo, hi)``.
        n_channels: channel count with ``masks`` (None: the largest label + 1).
        n_samples: None (from ``step``, per volume), an int, or V ints.
        host_affines: optional (V, 4, 4) float64 CPU copy of ``affines`` (sample counts are sized
            on the host; passing it avoids a device-to-host copy).
        renderer, soft_labels, step, ray_ids, backend, deterministic: as in ``render``.

    Returns:
        (B, C, N) in the rays' dtype, equal to B separate ``render`` calls (to float rounding).
    """
    from ..render import check_renderer

    volumes = list(volumes)
    n_vol = len(volumes)
    if n_vol == 0:
        raise ValueError("volumes must hold at least one volume, got none")
    if not isinstance(affines, torch.Tensor) or affines.shape != (n_vol, 4, 4):
        got = tuple(affines.shape) if isinstance(affines, torch.Tensor) else type(affines).__name__
        raise ValueError(f"affines must be ({n_vol}, 4, 4), one per volume, got {got}")
    check_renderer(renderer)
    if step is not None and n_samples is not None:
        raise ValueError("give step or n_samples, not both")
    if step is not None and not (isinstance(step, (int, float)) and step > 0):
        raise ValueError(f"step must be a positive number of mm, got {step!r}")
    backend = _resolve_backend(backend, volumes[0])
    if masks is not None:
        masks = [m if m.dtype == torch.int64 else m.long() for m in masks]
        if len(masks) != n_vol:
            raise ValueError(f"masks needs one labelmap per volume ({n_vol}), got {len(masks)}")
        if n_channels is None:
            n_channels = max(int(m.max()) for m in masks) + 1
    else:
        n_channels = 1
    if boxes is None:
        boxes = [Volume(v, affines[i]).box() for i, v in enumerate(volumes)]
    boxes = list(boxes)
    if ray_ids is None:
        ray_ids = torch.arange(target.shape[1], device=target.device)

    from .trilinear import op

    pooled = renderer == "trilinear" and backend == "triton" and (masks is None or n_channels <= op.MAX_CHANNELS)
    if not pooled:
        options = {
            "renderer": renderer, "soft_labels": soft_labels, "step": step, "ray_ids": ray_ids, "backend": backend,
            "deterministic": deterministic,
        }  # fmt: skip
        return _render_each(volumes, affines, index, source, target, masks, boxes, n_channels, n_samples, options)

    if host_affines is None:
        host_affines = affines.detach().to("cpu", torch.float64)
    if n_samples is None or isinstance(n_samples, int):
        counts = [n_samples or samples_per_ray(host_affines[v], *boxes[v], step) for v in range(n_vol)]
    else:
        counts = list(n_samples)
    index = index.to(device=target.device, dtype=torch.int64)
    inverse = world_to_index(affines, target.dtype)[index]  # [B, 4, 4]
    src = torch.einsum("bij,bnj->bni", inverse[:, :3, :3], source) + inverse[:, None, :3, 3]
    tgt = torch.einsum("bij,bnj->bni", inverse[:, :3, :3], target) + inverse[:, None, :3, 3]
    integral = op.raymarch_pool(
        volumes, index, src, tgt, ray_phases(ray_ids.to(target.device), target.dtype), boxes, counts,
        deterministic=deterministic, labels=masks, n_channels=n_channels, soft_labels=bool(soft_labels),
    )  # fmt: skip
    return integral * (target - source).norm(dim=-1)[:, None, :]


def _render_each(volumes, affines, index, source, target, masks, boxes, n_channels, n_samples, options):
    """One ``render`` per volume over the poses that use it, scattered back into pose order."""
    from ..render import render

    index = index.to(target.device)
    out = None
    for v, volume in enumerate(volumes):
        items = (index == v).nonzero().flatten()
        if items.numel() == 0:
            continue
        count = n_samples if n_samples is None or isinstance(n_samples, int) else n_samples[v]
        part = render(
            volume, affines[v], source[items], target[items], mask=None if masks is None else masks[v],
            n_channels=n_channels if masks is not None else None, box=boxes[v], n_samples=count, **options,
        )  # fmt: skip
        if out is None:
            out = part.new_zeros((target.shape[0], part.shape[1], target.shape[1]))
        out = out.index_copy(0, items, part)
    if out is None:  # no poses
        out = target.new_zeros((target.shape[0], n_channels, target.shape[1]))
    return out


def render_volumes(
    densities: Sequence[torch.Tensor],
    affine: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    mask=None,
    box=None,
    **options,
) -> torch.Tensor:
    """``render`` with ``density`` a sequence of B volumes: pose b through ``densities[b]``.

    ``affine`` is (B, 4, 4) (or one (4, 4) for all); ``mask`` None or B labelmaps; ``box`` None
    or B boxes. Poses that name the same volume tensor (and affine, mask and box) share one pool
    entry. Other options as in ``render``.
    """
    densities = list(densities)
    batch = len(densities)
    if batch == 0:
        raise ValueError("density must hold at least one volume, got an empty sequence")
    for b, d in enumerate(densities):
        if not isinstance(d, torch.Tensor) or d.dim() != 3 or not d.is_floating_point():
            got = f"{d.dtype} {tuple(d.shape)}" if isinstance(d, torch.Tensor) else type(d).__name__
            raise ValueError(f"density[{b}] must be an (I, J, K) float tensor, got {got}")
    if not isinstance(target, torch.Tensor) or target.dim() != 3 or target.shape[0] != batch:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must be (B, N, 3) with B = {batch} (one pose per volume), got {got}")
    if not isinstance(affine, torch.Tensor) or affine.shape not in ((batch, 4, 4), (4, 4)):
        got = tuple(affine.shape) if isinstance(affine, torch.Tensor) else type(affine).__name__
        raise ValueError(f"affine must be ({batch}, 4, 4) (or (4, 4) for all) with {batch} volumes, got {got}")
    affine = affine.expand(batch, 4, 4)
    for name, seq in (("mask", mask), ("box", box)):
        if seq is not None and (isinstance(seq, torch.Tensor) or len(seq) != batch):
            raise ValueError(f"{name} must be a sequence of {batch} entries (one per volume), got {type(seq).__name__}")
    host = affine.detach().to("cpu", torch.float64)
    entries: dict = {}
    index = []
    for b in range(batch):
        box_key = None if box is None else tuple(float(x) for part in box[b] for x in part)
        key = (id(densities[b]), None if mask is None else id(mask[b]), tuple(host[b].flatten().tolist()), box_key)
        index.append(entries.setdefault(key, len(entries)))
    firsts = [index.index(v) for v in range(len(entries))]
    return render_indexed(
        [densities[b] for b in firsts],
        affine[firsts],
        torch.tensor(index, device=target.device),
        source,
        target,
        masks=None if mask is None else [mask[b] for b in firsts],
        boxes=None if box is None else [box[b] for b in firsts],
        host_affines=host[firsts],
        **options,
    )
