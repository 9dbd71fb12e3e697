"""Triton kernels of tritondrr, installed as ``tritondrr.kernels``.

Importing this package imports Triton; the rest of tritondrr imports it lazily so that
``import tritondrr`` works where Triton is not installable.

- ``raymarch``: fused ray marching with trilinear sampling, ``_raymarch_fwd_kernel`` and
  ``_raymarch_bwd_kernel`` (pose gradients with the clip terms, atomic or deterministic
  fixed-point volume gradient), and their launchers ``raymarch_forward`` / ``raymarch_backward``.
  The autograd op around them is ``tritondrr.ops.raymarch``.
"""
