"""Every environment variable tritondrr reads, read here and nowhere else.

| variable            | default | meaning                                                              |
|---------------------|---------|----------------------------------------------------------------------|
| ``TRITON_INTERPRET`` | ``0``  | ``1``: Triton kernels run on CPU tensors (tests). Triton reads it when |
|                     |         | a kernel module is imported; tritondrr only asks whether it is on.   |
| ``TRITONDRR_COMPILE`` | ``1`` | ``0``: the CPU trilinear renderer uses ``grid_sample`` instead of the |
|                     |         | ``torch.compile``-d gather loop (no 10-60 s first compile).          |

Code that wants to change a setting for the process calls ``set_compile`` (the command line
does); nothing else writes the environment.
"""

from __future__ import annotations

import os

__all__ = ["interpreting", "compile_enabled", "set_compile"]

_compile_override: bool | None = None


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compile_enabled() -> bool:
    """Whether the CPU trilinear renderer may use ``torch.compile`` (``TRITONDRR_COMPILE``)."""
    if _compile_override is not None:
        return _compile_override
    return os.environ.get("TRITONDRR_COMPILE", "1") != "0"


def set_compile(enabled: bool | None) -> None:
    """Turn the compiled CPU path on or off for this process (None: back to the environment)."""
    global _compile_override
    _compile_override = enabled
