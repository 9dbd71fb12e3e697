"""Index-space geometry of a volume, and ``Volume``: the one owner of what is derived from it.

Voxel ``(i, j, k)`` of a density grid has its centre at the integer point ``(i, j, k)``; an
``affine`` maps ``(i, j, k, 1)`` to world mm. Renderers work in index space
(docs/sampling.md). This module knows boxes and rays in that space, nothing about renderers.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["TINY", "Volume", "clip_rays", "occupied_box", "support_box", "world_to_index"]

#: Direction components smaller than this are replaced by it, so the slab test never divides by 0.
TINY = 1e-12


def support_box(shape: tuple[int, int, int]) -> tuple[list[float], list[float]]:
    """The support of the trilinear interpolant of a grid of ``shape``: ``[-1, I] x [-1, J] x [-1, K]``.

    It also contains the nearest-neighbour field's support ``[-1/2, I - 1/2] x ...``.
    """
    return [-1.0, -1.0, -1.0], [float(n) for n in shape]


def occupied_box(density: torch.Tensor) -> tuple[list[float], list[float]]:
    """The smallest box (index space) outside which the interpolant of ``density`` is zero.

    It is the bounding box of the non-zero voxels grown by one voxel (the tent's reach). A volume
    that is zero everywhere gets an empty box (``lo > hi``), so every ray renders 0. This reads
    the whole volume once (and synchronises with a GPU): ``Volume`` caches it.
    """
    lo, hi = [], []
    nonzero = density.detach() != 0
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        occupied = nonzero.any(dim=others[1]).any(dim=others[0]).to(torch.uint8)  # [n_axis]
        if not bool(occupied.any()):
            return [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]
        # argmax finds the first maximum: the first and (from the end) the last occupied slice.
        lo.append(float(occupied.argmax()) - 1.0)
        hi.append(float(occupied.numel() - 1 - occupied.flip(0).argmax()) + 1.0)
    return lo, hi


def clip_rays(source: torch.Tensor, target: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Clip rays to ``t`` in ``[0, 1]`` and to the box ``[lo, hi]`` (slab test).

    Args:
        source: (..., 3) ray starts, index coordinates (broadcasts against ``target``).
        target: (..., 3) ray ends, index coordinates.
        lo, hi: (3,) box corners, index coordinates.

    Returns:
        ``(t0, length)``, each (...): the entry parameter and the clipped length in ``t``
        (``length`` is 0 for rays that miss the box).
    """
    d = target - source
    d = torch.where(d.abs() < TINY, torch.full_like(d, TINY), d)
    t_lo = (lo - source) / d
    t_hi = (hi - source) / d
    t0 = torch.minimum(t_lo, t_hi).amax(dim=-1).clamp(min=0.0)
    t1 = torch.maximum(t_lo, t_hi).amin(dim=-1).clamp(max=1.0)
    return t0, (t1 - t0).clamp(min=0.0)


def world_to_index(affine: torch.Tensor, dtype) -> torch.Tensor:
    """(4, 4) inverse of ``affine`` in ``dtype``, inverted in float64 where the device allows it.

    ``inv_ex`` does not check for singularity, which would synchronise with a CUDA device; the
    affine is checked where it is created (``Subject``).
    """
    if affine.device.type == "mps":
        return torch.linalg.inv_ex(affine.float()).inverse.to(dtype)
    return torch.linalg.inv_ex(affine.double()).inverse.to(dtype)


class _Key:
    """What a value derived from a tensor depends on: that tensor object (held weakly, so a new
    tensor that reuses a freed one's address never matches), its in-place edit count, and its
    storage and shape (``tensor.data = other`` swaps them without counting an edit). In-place
    edits through ``tensor.data`` are invisible to all three (docs/errors.md)."""

    def __init__(self, tensor: torch.Tensor):
        self.ref, self.version = weakref.ref(tensor), tensor._version
        self.storage = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())

    def matches(self, tensor: torch.Tensor) -> bool:
        return (
            self.ref() is tensor
            and self.version == tensor._version
            and self.storage == (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        )


def _valid(key: _Key | None, tensor: torch.Tensor) -> bool:
    return key is not None and key.matches(tensor)


class Volume:
    """A density grid and its affine, with what the renderers derive from them computed once.

    ``box()`` (the occupied box, ``occupied_box``), ``bricks()`` (the occupancy grid of
    ``tritondrr.occupancy``) and ``host_affine()`` (a float64 CPU copy of the affine, from which
    the sample count is sized without touching the GPU) are cached
    and keyed on the identity and the in-place edit count of the tensor they come from: edit
    ``density`` in place, or replace it, and the next call recomputes. ``DRR`` holds one;
    ``render`` makes a throw-away one for bare tensors.

    Args:
        density: (I, J, K) float tensor.
        affine: (4, 4) voxel index -> world mm.
    """

    def __init__(self, density: torch.Tensor, affine: torch.Tensor):
        self.density, self.affine = density, affine
        self._box: tuple | None = None
        self._box_key: _Key | None = None
        self._host: torch.Tensor | None = None
        self._host_key: _Key | None = None
        self._bricks = None
        self._bricks_key: _Key | None = None

    def update(self, density: torch.Tensor, affine: torch.Tensor) -> Volume:
        """Point at (possibly new) tensors; caches stay valid only for the tensors they came from."""
        self.density, self.affine = density, affine
        return self

    def moved(self, density: torch.Tensor, affine: torch.Tensor) -> None:
        """The same values now live in new tensors (``Module.to``): keep the caches, re-keyed."""
        valid_box, valid_host = _valid(self._box_key, self.density), _valid(self._host_key, self.affine)
        valid_bricks = _valid(self._bricks_key, self.density)
        self.update(density, affine)
        if valid_box:
            self._box_key = _Key(density)
        if valid_bricks:
            self._bricks, self._bricks_key = self._bricks.to(density.device), _Key(density)
        if valid_host:
            self._host_key = _Key(affine)

    def box(self) -> tuple[list[float], list[float]]:
        """Index-space box outside which the field is zero: the occupied box, or the whole support
        while the density requires grad (the gradient is non-zero where the density is zero)."""
        if self.density.requires_grad and torch.is_grad_enabled():
            return support_box(self.density.shape)
        if not _valid(self._box_key, self.density):
            self._box, self._box_key = occupied_box(self.density), _Key(self.density)
        return self._box

    def bricks(self):
        """``occupancy.Bricks`` of the density (empty-space skipping), or None while the density
        requires grad (its gradient is non-zero in empty space too)."""
        if self.density.requires_grad and torch.is_grad_enabled():
            return None
        if not _valid(self._bricks_key, self.density):
            from .occupancy import brick_groups

            self._bricks, self._bricks_key = brick_groups(self.density), _Key(self.density)
        return self._bricks

    def host_affine(self) -> torch.Tensor:
        """(4, 4) float64 CPU copy of the affine (copied again only after the affine changes)."""
        if not _valid(self._host_key, self.affine):
            self._host, self._host_key = self.affine.detach().to("cpu", torch.float64), _Key(self.affine)
        return self._host
