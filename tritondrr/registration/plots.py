"""Plots of a registration: loss and pose error against iteration, and a GIF of the DRR over the X-ray.

matplotlib is an optional extra (``pip install 'tritondrr[plot]'``).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

__all__ = ["plot_convergence", "save_gif"]


def _pyplot():
    try:
        import matplotlib

        if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "registration plots need matplotlib: pip install 'tritondrr[plot]' (or pip install matplotlib)"
        ) from e
    return plt


def plot_convergence(result, true_pose=None, path=None):
    """Loss (and, given ``true_pose``, rotation error in degrees and translation error in mm) per iteration.

    Args:
        result: a ``RegistrationResult``.
        true_pose: optional ``RigidTransform`` (B or 1 poses) to measure the errors against.
        path: optional file to save the figure to (PNG, PDF, SVG ...).

    Returns:
        The matplotlib figure. One line per pose; vertical dotted lines mark resolution levels.
    """
    plt = _pyplot()
    history = result.history
    panels = 3 if true_pose is not None else 1
    fig, axs = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    axs = axs[0]
    it = [h["iteration"] for h in history]
    loss = torch.tensor([h["loss"] for h in history])  # [T, B]
    axs[0].semilogy(it, loss.clamp(min=1e-16).numpy())
    axs[0].set(xlabel="iteration", ylabel="loss", title="loss")
    if true_pose is not None:
        rot, trans = result.errors(true_pose)
        axs[1].semilogy(it, rot.clamp(min=1e-6).numpy())
        axs[1].axhline(1.0, color="gray", lw=0.8, ls="--")
        axs[1].set(xlabel="iteration", ylabel="degrees", title="rotation error")
        axs[2].semilogy(it, trans.clamp(min=1e-6).numpy())
        axs[2].axhline(1.0, color="gray", lw=0.8, ls="--")
        axs[2].set(xlabel="iteration", ylabel="mm", title="translation error")
    changes = [h["iteration"] for prev, h in itertools.pairwise(history) if h["level"] != prev["level"]]
    for ax in axs:
        for x in changes:
            ax.axvline(x, color="gray", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


@torch.no_grad()
def save_gif(drr, xray, result, path, max_frames: int = 40, fps: int = 6, batch_index: int = 0) -> Path:
    """An animated GIF of the DRR (colour overlay) over the X-ray (grey), along the optimisation.

    Args:
        drr: the full-resolution ``DRR`` the X-ray belongs to.
        xray: (B or 1, C, H, W) X-ray.
        result: a ``RegistrationResult``; at most ``max_frames`` of its iterations are rendered.
        path: the .gif file to write.
        fps: frames per second.
        batch_index: which pose of the batch to show.

    Returns:
        The path written.
    """
    plt = _pyplot()
    from matplotlib.animation import FuncAnimation, PillowWriter

    history = result.history
    if not history:
        raise ValueError("result has no iterations to animate")
    steps = sorted({round(i * (len(history) - 1) / max(1, max_frames - 1)) for i in range(max_frames)})
    xr = xray[min(batch_index, len(xray) - 1)].sum(0).detach().cpu().float()
    frames = []
    for i in steps:
        h = history[i]
        rot, trans = h["rotations"][batch_index : batch_index + 1], h["translations"][batch_index : batch_index + 1]
        img = drr(
            rot.to(drr._affine),
            trans.to(drr._affine),
            parameterization=result.parameterization,
            convention=result.convention,
            degrees=result.degrees,
        )
        frames.append((h, img[0].sum(0).cpu().float()))

    def normalise(x):
        return (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.set_axis_off()
    ax.imshow(normalise(xr).numpy(), cmap="gray")
    overlay = ax.imshow(normalise(frames[0][1]).numpy(), cmap="magma", alpha=0.5)
    title = ax.set_title("")

    def draw(k):
        h, img = frames[k]
        overlay.set_data(normalise(img).numpy())
        title.set_text(f"iteration {h['iteration']}  loss {h['loss'][batch_index]:.4g}")
        return overlay, title

    animation = FuncAnimation(fig, draw, frames=len(frames), blit=False)
    path = Path(path)
    animation.save(str(path), writer=PillowWriter(fps=fps))
    plt.close(fig)
    return path
