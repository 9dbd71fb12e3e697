"""Triton kernels of tritondrr, installed as ``tritondrr.kernels``.

Importing this package imports Triton; the rest of tritondrr imports it lazily so that
``import tritondrr`` works where Triton is not installable. Each module holds its
``@triton.jit`` kernels, then their host launchers; the autograd ops around them live in
``tritondrr/renderers/<name>/op.py`` (docs/architecture.md).

- ``_common``: helpers shared by the kernels (ray loading and slab clipping, cells, eight-corner
  loads, trilinear value and gradient, end points, the adjoint scatter).
- ``trilinear``: the sampled trilinear renderer (docs/sampling.md): ``_raymarch_fwd_kernel`` /
  ``_raymarch_bwd_kernel`` (pose gradients with the clip terms; atomic or deterministic
  fixed-point volume gradient; label channels; volume pools), launchers ``raymarch_forward`` /
  ``raymarch_backward``.
- ``siddon``: the exact nearest-neighbour (Siddon) integral by sort-free integration by parts over
  independent plane crossings, with its exact pose and volume gradients.
- ``exact``: the exact integral of the trilinear interpolant, stepping plane to plane with
  two-point Gauss-Legendre per cubic piece, with its exact pose and volume gradients.
"""
