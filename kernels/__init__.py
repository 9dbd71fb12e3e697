"""Triton kernels of tritondrr, installed as ``tritondrr.kernels``.

Importing this package imports Triton; the rest of tritondrr imports it lazily so that
``import tritondrr`` works where Triton is not installable.
"""
