"""The sampling policy of the trilinear renderer, in one place (docs/sampling.md states the rule).

The sample count depends on the volume only, never on the pose; the phase of each ray's
samples depends on the ray's identity only. Both together make images smooth functions of the
pose.
"""

from __future__ import annotations

import math

import torch

__all__ = ["DEFAULT_STEP_VOXELS", "ray_phases", "samples_per_ray"]

#: Default sampling distance, in units of the smallest voxel spacing, along the longest chord.
DEFAULT_STEP_VOXELS = 1.0


def samples_per_ray(affine: torch.Tensor, lo, hi, step: float | None = None) -> int:
    """Samples per ray so that the longest chord through the box ``[lo, hi]`` has spacing ``step``.

    Args:
        affine: (4, 4) voxel index -> world mm (read on the host: pass a CPU copy on the hot path).
        lo, hi: 3 floats each, the index-space box.
        step: sampling distance in mm; None means ``DEFAULT_STEP_VOXELS`` times the smallest
            voxel spacing.

    Shorter chords are sampled more densely (docs/sampling.md).
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
    """Sampling phase in [0, 1) of each ray from its id (a pixel index): Knuth's multiplicative hash.

    A fixed function of the ray's identity, so images stay smooth in the pose, and scattered
    enough that the sampling errors of neighbouring pixels do not line up (docs/sampling.md).
    Integer arithmetic, then one rounding: the same on every device.
    """
    # id + 1: pixel 0 would otherwise get phase 0 exactly, a sample on its entry point.
    return (((ray_ids.long() + 1) * 2654435761) % (1 << 32)).to(dtype) / float(1 << 32)
