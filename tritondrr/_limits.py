"""Memory limits: estimate what a call will allocate before it allocates, and refuse giant plans.

Every estimate is arithmetic on shapes and header fields (O(1), no tensor is read). A plan above
the limit raises a ValueError naming the argument responsible, the bytes and how to lower them;
the limit is ``TRITONDRR_MAX_BYTES`` (default 16 GiB, ``tritondrr._config.max_bytes``).

| what                              | estimate (bytes)                                                  |
|-----------------------------------|-------------------------------------------------------------------|
| a DRR's detector (``height``,     | ``H * W * (8 + 4 * 3 * 4 + 4 * C)`` per pose: pixel ids, camera,  |
| ``width``)                        | world and index-space ray ends, the image                         |
| ``render`` output (``mask`` /     | ``B * N * C * itemsize``, twice when C > 1 (scatter buffer)      |
| ``n_channels``)                   |                                                                   |
| PyTorch backend, per chunk        | ``max(n_samples, 2^22) * 8 * itemsize`` (sample grid and values)  |
| (``n_samples``)                   |                                                                   |
| reading a volume file             | ``prod(sizes) * itemsize`` from the header, checked against the  |
|                                   | limit and against what the file can hold (raw: its size; gzip:   |
|                                   | 1032 x its size, deflate's largest ratio)                         |
"""

from __future__ import annotations

import os
from pathlib import Path

from . import _config

__all__ = [
    "check_bytes",
    "check_samples",
    "detector_bytes",
    "render_bytes",
    "check_nrrd_file",
    "check_nifti_image",
    "human",
]

#: Bytes alive per sample in the PyTorch trilinear path: grid (3 coords) + value + flip/scale temporaries.
_BYTES_PER_SAMPLE = 8
#: Samples alive at once in the PyTorch path's chunks (renderers/trilinear/naive.py: CHUNK_SAMPLES).
_CHUNK_SAMPLES = 1 << 22
#: deflate cannot compress better than about 1032:1 (RFC 1951 length codes); a gzip file that claims
#: more uncompressed bytes than this bound is truncated or forged.
_DEFLATE_MAX_RATIO = 1032


def human(nbytes: float) -> str:
    """``nbytes`` with a binary unit, e.g. ``'80.0 GiB'``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover


def check_bytes(nbytes: int, what: str, lower: str) -> None:
    """Raise a ValueError if ``nbytes`` (planned by ``what``) is above the limit.

    Args:
        nbytes: the estimate.
        what: the argument(s) responsible, e.g. ``"height=100000, width=100000"``.
        lower: how to need less, e.g. ``"use a smaller detector or patch_size"``.
    """
    limit = _config.max_bytes()
    if nbytes > limit:
        raise ValueError(
            f"{what} needs about {human(nbytes)} ({int(nbytes)} bytes), above the memory limit of "
            f"{human(limit)}: {lower}, or raise the limit with the environment variable TRITONDRR_MAX_BYTES "
            "(e.g. TRITONDRR_MAX_BYTES=64G; see docs/errors.md)"
        )


def detector_bytes(n_pixels: int, channels: int = 1, itemsize: int = 4) -> int:
    """Bytes one pose of an ``n_pixels`` detector allocates (ids, four sets of ray ends, the image)."""
    return n_pixels * (8 + 4 * 3 * itemsize + channels * itemsize)


def render_bytes(batch: int, n_rays: int, channels: int, itemsize: int, n_samples: int | None, backend: str) -> int:
    """Bytes a ``render`` call allocates: its output, plus a chunk of samples on the PyTorch backend."""
    out = batch * n_rays * channels * itemsize
    if channels > 1:  # the channels are scattered into a buffer, then laid out: two copies alive
        out *= 2
    if backend == "torch" and n_samples is not None:
        out += max(n_samples, _CHUNK_SAMPLES) * _BYTES_PER_SAMPLE * itemsize
    return out


def check_samples(n_samples: int, itemsize: int, backend: str, step: float | None = None) -> None:
    """Refuse a sample count whose chunk of samples (PyTorch backend) exceeds the limit."""
    if backend == "torch":
        check_bytes(
            render_bytes(1, 0, 1, itemsize, n_samples, backend),
            f"n_samples={n_samples} samples per ray" + ("" if step is None else f" (from step={step} mm)"),
            "use fewer samples per ray (a larger step)",
        )


def _truncated(path: Path, shape, nbytes: int, holds: int, how: str) -> ValueError:
    return ValueError(
        f"cannot read {str(path)!r}: its header claims shape {tuple(shape)} ({human(nbytes)}), but the file "
        f"{how} at most {human(holds)}: it is truncated or its header is corrupt"
    )


def _check_volume_bytes(path: Path, shape, itemsize: int, available: int, encoding: str) -> None:
    """Header says ``shape`` x ``itemsize``; ``available`` bytes of (possibly compressed) data follow."""
    shape = tuple(int(n) for n in shape)
    if itemsize < 1:
        raise ValueError(f"cannot read {str(path)!r}: its header gives a voxel type of {itemsize} bytes")
    if any(n < 1 for n in shape):
        raise ValueError(f"cannot read {str(path)!r}: its header has sizes {shape}; every axis needs a voxel or more")
    nbytes = itemsize
    for n in shape:
        nbytes *= int(n)
    if encoding == "raw" and nbytes > available:
        raise _truncated(path, shape, nbytes, available, "holds")
    if encoding == "gzip" and nbytes > _DEFLATE_MAX_RATIO * available + 1024:
        raise _truncated(path, shape, nbytes, _DEFLATE_MAX_RATIO * available, "can decompress to")
    if encoding in ("ascii", "text", "txt", "hex") and nbytes // itemsize > available:
        raise _truncated(path, shape, nbytes, available * itemsize, "can encode")
    check_bytes(nbytes, f"reading {str(path)!r} (shape {tuple(shape)})", "crop or downsample the volume first")


def check_nrrd_file(path: Path) -> None:
    """Read only the NRRD header of ``path`` and refuse data the file cannot hold or the limit forbids."""
    import nrrd
    from nrrd.reader import _determine_datatype

    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
            start = fh.tell()
        sizes = header["sizes"]
        itemsize = _determine_datatype(header).itemsize
    except Exception as e:  # pynrrd raises NRRDError, KeyError, ValueError, UnicodeDecodeError, ...
        raise ValueError(f"cannot read {str(path)!r} as NRRD: bad header ({type(e).__name__}: {e})") from e
    data_file = header.get("datafile", header.get("data file"))
    if data_file is not None:
        data_path = Path(data_file) if os.path.isabs(data_file) else path.parent / data_file
        if not data_path.is_file():
            raise ValueError(f"cannot read {str(path)!r}: its data file {str(data_path)!r} does not exist")
        available = data_path.stat().st_size
    else:
        available = path.stat().st_size - start
    encoding = str(header.get("encoding", "raw")).lower()
    encoding = {"gz": "gzip", "bz2": "bzip2"}.get(encoding, encoding)
    _check_volume_bytes(path, sizes, itemsize, max(available, 0), encoding)


def check_nifti_image(path: Path, img) -> None:
    """``img`` is a nibabel image whose header is read but not its data: refuse impossible sizes."""
    try:
        shape = tuple(int(n) for n in img.header.get_data_shape())
        itemsize = img.header.get_data_dtype().itemsize
    except Exception as e:  # nibabel raises HeaderDataError, ValueError, TypeError on corrupt headers
        raise ValueError(f"cannot read {str(path)!r} as NIfTI: bad header ({type(e).__name__}: {e})") from e
    size = path.stat().st_size
    compressed = path.name.lower().endswith(".gz")
    offset = 0 if compressed else int(img.header.get("vox_offset", 0) or 0)
    _check_volume_bytes(path, shape, itemsize, max(size - offset, 0), "gzip" if compressed else "raw")
