"""Every environment variable tritondrr reads, read here and nowhere else.

| variable            | default | meaning                                                              |
|---------------------|---------|----------------------------------------------------------------------|
| ``TRITON_INTERPRET`` | ``0``  | ``1``: Triton kernels run on CPU tensors (tests). Triton reads it when |
|                     |         | a kernel module is imported; tritondrr only asks whether it is on.   |
| ``TRITONDRR_COMPILE`` | ``1`` | ``0``: the CPU trilinear renderer uses ``grid_sample`` instead of the |
|                     |         | ``torch.compile``-d gather loop (no 10-60 s first compile).          |
| ``TRITONDRR_SKIP_EMPTY`` | ``1`` | ``0``: ``DRR`` renders without empty-space skipping            |
|                     |         | (``tritondrr.occupancy``; results agree to float rounding).          |
| ``TRITONDRR_MAX_BYTES`` | 16 GiB | largest allocation a call may plan before it is refused with a    |
|                     |         | ValueError (``tritondrr._limits``); a number of bytes or ``64G``,   |
|                     |         | ``512M``; ``0`` or ``inf`` turns the limit off.                      |

Code that wants to change a setting for the process calls ``set_compile`` (the command line
does); nothing else writes the environment.
"""

from __future__ import annotations

import os

__all__ = ["interpreting", "compile_enabled", "set_compile", "max_bytes", "skip_empty"]

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


def skip_empty() -> bool:
    """Whether ``DRR`` skips empty space (``TRITONDRR_SKIP_EMPTY``, default on)."""
    return os.environ.get("TRITONDRR_SKIP_EMPTY", "1") != "0"


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def max_bytes() -> float:
    """Largest allocation a call may plan (``TRITONDRR_MAX_BYTES``, default 16 GiB; inf: no limit)."""
    text = os.environ.get("TRITONDRR_MAX_BYTES", "16G").strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _UNITS and text[-1:] else ""
    try:
        value = float(text[: len(text) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise ValueError(
            f"TRITONDRR_MAX_BYTES must be a number of bytes such as 17179869184, 16G or 512M, got {text!r}"
        ) from None
    return float("inf") if value <= 0 or value != value else value
