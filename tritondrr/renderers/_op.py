"""How the renderers' Triton launches become ``torch.library`` ops (one rule for every ``op.py``)."""

from __future__ import annotations

import torch

from .._config import interpreting

__all__ = ["define_op", "interpreting"]


def define_op(name: str, fn, fake):
    """``triton_op`` where it can trace the launches (GPU, torch >= 2.6), else ``custom_op`` + fake.

    ``triton_op`` registers ``fn`` itself (traced with fake tensors) as the fake implementation and
    lets ``torch.compile`` see the Triton kernels launched through ``wrap_triton``; under
    ``TRITON_INTERPRET=1`` (tests on CPU) or older torch the op is opaque, with ``fake`` for tracing.
    """
    if hasattr(torch.library, "triton_op") and not interpreting():
        return torch.library.triton_op(name, fn, mutates_args=())
    op = torch.library.custom_op(name, fn, mutates_args=())
    op.register_fake(fake)
    return op
