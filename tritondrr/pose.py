"""Camera poses: `RigidTransform` and `convert`, with DiffDRR 0.6.1's parameterizations.

A pose E is a batch of 4x4 matrices mapping the (reoriented) camera frame to world mm:
``world = E @ reorient @ p_cam``, the source sitting at the camera origin. It is built from a
rotation R and a translation t (both per batch item) as

    E = [[R, R t], [0, 1]]

that is, t is applied first, in the camera frame, then R rotates about the world origin (the
volume centre for volumes read with ``center_volume=True``). Exceptions, as in DiffDRR:
"matrix" takes a 4x4 as is, and "se3_log_map" takes the SE(3) logarithm [t, w] (pytorch3d's
layout, translation first) and returns its exponential.

Rotation parameterizations (B is the batch size; an unbatched vector means B = 1):

=====================  =======  =========================================================
name                   shape    meaning
=====================  =======  =========================================================
axis_angle             (B, 3)   rotation vector w: angle |w| (radians) about w/|w|
euler_angles           (B, 3)   angles (a0, a1, a2) of ``convention``, one of the 12 of
                                pytorch3d: "ZXY" means R = Rz(a0) @ Rx(a1) @ Ry(a2)
matrix                 (B,4,4)  the pose itself (or R (B,3,3) and t (B,3), see `convert`)
quaternion             (B, 4)   (w, x, y, z), scalar first; any nonzero norm (normalised)
quaternion_adjugate    (B, 10)  upper triangle (row-major) of the symmetric 4x4 q q^T;
                                q is read off its row of largest norm
rotation_6d            (B, 6)   the first two rows of R (Zhou et al.), Gram-Schmidt
rotation_9d            (B, 9)   a 3x3 (row-major), projected onto SO(3) by SVD
rotation_10d           (B, 10)  upper triangle of a symmetric 4x4 A (Peretroukhin et al.);
                                q is the eigenvector of A's smallest eigenvalue
se3_log_map            (B, 3)   w of the SE(3) log (translation argument is its v)
spherical              scalars  early DiffDRR's C-arm (sdr, theta, phi, gamma, bx, by, bz);
                                see `convert_spherical`
=====================  =======  =========================================================

``degrees=True`` reads (and `RigidTransform.convert` writes) angles in degrees for
euler_angles, as DiffDRR does, and also for axis_angle and spherical (DiffDRR 0.6.1 silently
ignores ``degrees`` there; we honour it). Other parameterizations reject ``degrees=True``.

Everything is differentiable, batched, dtype- and device-agnostic (float32/float64, CPU, CUDA,
MPS). Small rotation angles use series expansions so that the identity has finite gradients;
the SVD (rotation_9d) and eigenvector (rotation_10d) steps have hand-written backward passes
that stay finite where singular or eigenvalues repeat (e.g. at the identity).
"""

from __future__ import annotations

import math

import torch

from . import _validate

__all__ = [
    "EULER_CONVENTIONS",
    "PARAMETERIZATIONS",
    "RigidTransform",
    "axis_angle_to_matrix",
    "convert",
    "convert_spherical",
    "euler_angles_to_matrix",
    "hat",
    "hat_inv",
    "make_matrix",
    "matrix_to_axis_angle",
    "matrix_to_euler_angles",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "matrix_to_rotation_9d",
    "quaternion_to_matrix",
    "random_rigid_transform",
    "rotation_6d_to_matrix",
    "rotation_9d_to_matrix",
    "se3_exp_map",
    "se3_log_map",
    "standardize_quaternion",
]

PARAMETERIZATIONS = (
    "axis_angle",
    "euler_angles",
    "matrix",
    "quaternion",
    "quaternion_adjugate",
    "rotation_6d",
    "rotation_9d",
    "rotation_10d",
    "se3_log_map",
    "spherical",
)
EULER_CONVENTIONS = (
    "XYZ", "XZY", "YXZ", "YZX", "ZXY", "ZYX",  # Tait-Bryan
    "XYX", "XZX", "YXY", "YZY", "ZXZ", "ZYZ",  # proper Euler
)  # fmt: skip
_ANGLE_PARAMETERIZATIONS = ("euler_angles", "axis_angle", "spherical")
_ROTATION_SIZE = {
    "axis_angle": 3,
    "euler_angles": 3,
    "quaternion": 4,
    "quaternion_adjugate": 10,
    "rotation_6d": 6,
    "rotation_9d": 9,
    "rotation_10d": 10,
    "se3_log_map": 3,
}
# Above this squared angle the closed forms are used; below it, Taylor series (exact to
# float64 rounding there, and free of 0/0 at the identity).
_SMALL_ANGLE_SQ = 1e-2


# --------------------------------------------------------------------------------------------
# The pose
# --------------------------------------------------------------------------------------------
class RigidTransform(torch.nn.Module):
    """A batch of 4x4 homogeneous transforms (usually rigid: camera -> world poses).

    An ``nn.Module`` holding the matrix as a buffer, as DiffDRR 0.6.1's: ``.to()``, ``.cuda()``,
    ``.double()`` convert it in place (and return it), it can be a submodule of a model and it
    has a ``state_dict`` (key ``"matrix"``). Gradients flow through the buffer.

    Args:
        matrix: (4, 4) or (B, 4, 4) floating tensor; stored as (B, 4, 4). It is not checked
            for rigidity, so calibration matrices and reflections (DiffDRR's "PA") fit too.

    Indexing follows DiffDRR where it can: an integer gives the (4, 4) tensor ``pose[0]``; a
    slice or an index tensor gives a RigidTransform of the selected poses (DiffDRR returns the
    (b, 4, 4) tensor there; ``pose[1:3].matrix`` is that tensor). Any index that does not
    leave a (b, 4, 4) batch (``pose[:, :3, :3]``) gives the tensor.

    Example:
        >>> pose = convert(torch.zeros(1, 3), torch.tensor([[0.0, 850.0, 0.0]]),
        ...                parameterization="euler_angles", convention="ZXY")
        >>> pose(torch.zeros(1, 1, 3))  # the camera origin (source) in world mm
        tensor([[[  0., 850.,   0.]]])
        >>> pose[0].shape
        torch.Size([4, 4])
    """

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        if isinstance(matrix, RigidTransform):
            matrix = matrix.matrix
        if not isinstance(matrix, torch.Tensor):
            raise TypeError(f"matrix must be a torch.Tensor, got {type(matrix).__name__}")
        if not matrix.is_floating_point():
            raise TypeError(f"matrix must be a floating tensor, got dtype {matrix.dtype}")
        if matrix.dim() not in (2, 3) or matrix.shape[-2:] != (4, 4):
            raise ValueError(f"matrix must be (4, 4) or (B, 4, 4), got {tuple(matrix.shape)}")
        self.register_buffer("matrix", matrix.unsqueeze(0) if matrix.dim() == 2 else matrix)

    @property
    def rotation(self) -> torch.Tensor:
        """(B, 3, 3) upper-left block R."""
        return self.matrix[:, :3, :3]

    @property
    def translation(self) -> torch.Tensor:
        """(B, 3) last column: the world position of the camera origin (the source)."""
        return self.matrix[:, :3, 3]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def __getitem__(self, idx):
        """``pose[i]``: the (4, 4) tensor (DiffDRR); ``pose[a:b]``: a RigidTransform of those poses."""
        selected = self.matrix[idx]
        if selected.dim() == 3 and selected.shape[-2:] == (4, 4):
            return RigidTransform(selected)
        return selected

    def __repr__(self) -> str:
        return f"RigidTransform(matrix={self.matrix!r})"

    def get_se3_log(self) -> torch.Tensor:
        """(B, 6) SE(3) logarithm [v, w] (pytorch3d's layout, translation part first), DiffDRR's.

        ``convert(w, v, parameterization="se3_log_map")`` rebuilds the pose; w is the rotation's
        axis-angle vector (|w| <= pi) and v = V(w)^-1 t, with V the left Jacobian of SO(3).
        """
        w, v = self.convert("se3_log_map")
        return torch.cat([v, w], dim=-1)

    def inverse(self) -> RigidTransform:
        """Closed-form inverse [R^T | -R^T t] (valid for rigid transforms only)."""
        Rt = self.rotation.mT
        t = -(Rt @ self.translation.unsqueeze(-1)).squeeze(-1)
        return RigidTransform(_make_matrix(Rt, t))

    def compose(self, other: RigidTransform) -> RigidTransform:
        """The transform that applies `self` first, then `other`: matrix = other @ self.

        This is DiffDRR 0.6.1's order (``einsum("bij, bjk -> bik", T.matrix, self.matrix)``),
        used as ``reorient.compose(pose)`` = pose @ reorient. Batches of size 1 broadcast.

        Example:
            >>> a = convert(torch.zeros(1, 3), torch.ones(1, 3), parameterization="axis_angle")
            >>> b = convert(torch.tensor([[0.0, 0.0, math.pi / 2]]), torch.zeros(1, 3),
            ...             parameterization="axis_angle")
            >>> p = torch.zeros(1, 1, 3)
            >>> torch.allclose(a.compose(b)(p), b(a(p)))
            True
        """
        if not isinstance(other, RigidTransform):
            raise TypeError(f"other must be a RigidTransform, got {type(other).__name__}")
        return RigidTransform(other.matrix @ self.matrix)

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """Transform points: (B, N, 3), or (N, 3) shared by the batch -> (B, N, 3), R p + t.

        ``pose(points)`` is the same (DiffDRR's ``forward``). Given a function instead of a
        tensor, this is ``nn.Module.apply`` (so ``model.apply(init)`` still recurses through a
        model holding a pose).
        """
        if callable(points) and not isinstance(points, torch.Tensor):
            return super().apply(points)
        if not isinstance(points, torch.Tensor):
            raise TypeError(f"points must be a torch.Tensor, got {type(points).__name__}")
        if points.dim() not in (2, 3) or points.shape[-1] != 3:
            raise ValueError(f"points must be (B, N, 3) or (N, 3), got {tuple(points.shape)}")
        if points.dim() == 3 and points.shape[0] not in (1, len(self)) and len(self) != 1:
            raise ValueError(
                f"points must have batch size {len(self)} (or 1), got {tuple(points.shape)}"
            )
        return points @ self.rotation.mT + self.translation.unsqueeze(-2)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``pose(points)``: see `apply`."""
        return self.apply(points)

    def convert(
        self, parameterization: str, convention: str | None = None, degrees: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters (rotation, translation) such that `convert` rebuilds this pose.

        translation is the camera-frame t of E = [R | R t], i.e. R^T times the last column
        (for "matrix", rotation is R (B, 3, 3) and `convert(R, t, parameterization="matrix")`
        inverts it); for "se3_log_map" it is (w, v), the SE(3) logarithm. Angles come back in
        the principal branch: euler angles as pytorch3d (first and third in (-pi, pi], the
        middle in [-pi/2, pi/2] for Tait-Bryan, [0, pi] for proper Euler), axis-angle with
        |w| <= pi, quaternions with w >= 0. Shapes as in the module docstring.
        """
        degrees = _validate.flag("degrees", degrees)
        _check_parameterization(parameterization, convention, degrees)
        if parameterization == "spherical":
            raise ValueError(
                "parameterization 'spherical' cannot be read back from a pose: sdr and the "
                "isocentre's position along the principal ray are not determined by it"
            )
        R, T = self.rotation, self.translation
        if parameterization == "se3_log_map":
            w = _matrix_to_axis_angle(R)
            v = (_se3_V_inverse(w) @ T.unsqueeze(-1)).squeeze(-1)
            return w, v
        translation = (R.mT @ T.unsqueeze(-1)).squeeze(-1)
        if parameterization == "matrix":
            return R, translation
        rotation = _FROM_MATRIX[parameterization](R, convention)
        if degrees:
            rotation = torch.rad2deg(rotation)
        return rotation, translation


def _make_matrix(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[R | t; 0 0 0 1] from R (B, 3, 3) and t (B, 3), differentiably."""
    top = torch.cat([R, t.unsqueeze(-1)], dim=-1)
    bottom = torch.zeros_like(top[:, :1, :])
    bottom[..., 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def make_matrix(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) homogeneous matrix [R | t; 0 0 0 1] from R (B, 3, 3) and t (B, 3) (DiffDRR's).

    Differentiable with respect to both. t is the last column as given (not R t).
    """
    for name, x, shape in (("R", R, "(B, 3, 3)"), ("t", t, "(B, 3)")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(x).__name__}")
    if R.dim() != 3 or R.shape[-2:] != (3, 3):
        raise ValueError(f"R must be (B, 3, 3), got {tuple(R.shape)}")
    if t.dim() != 2 or t.shape[-1] != 3 or len(t) != len(R):
        raise ValueError(f"t must be (B, 3) with B = {len(R)} as R, got {tuple(t.shape)}")
    dtype = torch.promote_types(R.dtype, t.dtype)
    return _make_matrix(R.to(dtype), t.to(dtype))


def random_rigid_transform(
    batch_size: int = 1, *, generator: torch.Generator | None = None, dtype=torch.float32, device=None
) -> RigidTransform:
    """Random poses for tests (DiffDRR's helper): uniform rotations, translations 100 N(0, 1) mm.

    The rotation is the matrix of a unit quaternion drawn uniformly on the 3-sphere (normalised
    4-D Gaussian), which is the uniform (Haar) distribution on SO(3), as scipy's
    ``Rotation.random`` that DiffDRR calls. The pose is E = [R | t] with t the drawn vector.

    Args:
        batch_size: number of poses B >= 1.
        generator: optional torch.Generator for reproducible draws (our addition).
        dtype, device: of the matrix (float32, CPU by default, as DiffDRR's).

    Returns:
        RigidTransform (B, 4, 4).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    q = torch.randn(batch_size, 4, generator=generator, dtype=torch.float64)
    t = 100.0 * torch.randn(batch_size, 3, generator=generator, dtype=torch.float64)
    R = _quaternion_to_matrix(q)
    return RigidTransform(_make_matrix(R, t).to(dtype=dtype, device=device))


# pytorch3d-style functions DiffDRR 0.6.1 exposes in ``diffdrr.pose`` (same names, shapes, layouts).
def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """(..., 3) rotation vectors (radians) -> (..., 3, 3) rotation matrices (Rodrigues)."""
    return _axis_angle_to_matrix(axis_angle)


def matrix_to_axis_angle(matrix: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotations -> (..., 3) rotation vectors with angle in [0, pi]."""
    return _matrix_to_axis_angle(matrix)


def euler_angles_to_matrix(euler_angles: torch.Tensor, convention: str) -> torch.Tensor:
    """(..., 3) angles (radians) of a pytorch3d convention ("ZXY": Rz(a0) Rx(a1) Ry(a2)) -> (..., 3, 3)."""
    _check_parameterization("euler_angles", convention, False)
    return _euler_to_matrix(euler_angles, convention)


def matrix_to_euler_angles(matrix: torch.Tensor, convention: str) -> torch.Tensor:
    """(..., 3, 3) rotations -> (..., 3) angles of ``convention`` on pytorch3d's branches."""
    _check_parameterization("euler_angles", convention, False)
    return _matrix_to_euler(matrix, convention)


def quaternion_to_matrix(quaternions: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions (w, x, y, z), any nonzero norm -> (..., 3, 3) rotations."""
    return _quaternion_to_matrix(quaternions)


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotations -> (..., 4) unit quaternions (w, x, y, z) with w >= 0."""
    return _matrix_to_quaternion(matrix)


def standardize_quaternion(quaternions: torch.Tensor) -> torch.Tensor:
    """Flip (..., 4) quaternions (w, x, y, z) so that w >= 0 (the same rotation)."""
    return _standardize(quaternions)


def rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """(..., 6) first two rows of R -> (..., 3, 3) by Gram-Schmidt (Zhou et al.)."""
    return _rotation_6d_to_matrix(d6)


def matrix_to_rotation_6d(matrix: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 6), the first two rows."""
    return _matrix_to_rotation_6d(matrix)


def rotation_9d_to_matrix(rotation: torch.Tensor) -> torch.Tensor:
    """(B, 9) row-major 3x3 -> (B, 3, 3), the nearest rotation (SVD projection onto SO(3))."""
    return _rotation_9d_to_matrix(rotation)


def matrix_to_rotation_9d(matrix: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 9) row-major."""
    return _matrix_to_rotation_9d(matrix)


def hat(v: torch.Tensor) -> torch.Tensor:
    """(B, 3) vectors -> (B, 3, 3) skew-symmetric matrices K with K x = v cross x."""
    return _hat(v)


def hat_inv(h: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) skew-symmetric matrices -> (B, 3) vectors (the inverse of `hat`)."""
    if h.dim() < 2 or h.shape[-2:] != (3, 3):
        raise ValueError(f"h must be (B, 3, 3), got {tuple(h.shape)}")
    return torch.stack([h[..., 2, 1], h[..., 0, 2], h[..., 1, 0]], dim=-1)


def se3_exp_map(log_transform: torch.Tensor) -> torch.Tensor:
    """(B, 6) [v, w] -> (B, 4, 4) SE(3) matrices in pytorch3d's row-vector layout.

    The result is ``[[R^T, 0], [(V v)^T, 1]]`` (translation in the last row), as pytorch3d and
    DiffDRR 0.6.1 return it; ``.mT`` gives the column-vector pose that `convert` builds.
    """
    if log_transform.dim() != 2 or log_transform.shape[-1] != 6:
        raise ValueError(f"log_transform must be (B, 6), got {tuple(log_transform.shape)}")
    v, w = log_transform[:, :3], log_transform[:, 3:]
    return convert(w, v, parameterization="se3_log_map").matrix.mT


def se3_log_map(transform: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) SE(3) matrices in pytorch3d's row-vector layout -> (B, 6) [v, w] (inverse of `se3_exp_map`)."""
    if transform.dim() != 3 or transform.shape[-2:] != (4, 4):
        raise ValueError(f"transform must be (B, 4, 4), got {tuple(transform.shape)}")
    return RigidTransform(transform.mT).get_se3_log()


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------
def convert(
    *args, parameterization: str, convention: str | None = None, degrees: bool = False
) -> RigidTransform:
    """Build a pose from a parameterization (DiffDRR 0.6.1's `convert`).

    Usual form: ``convert(rotation, translation, parameterization=..., convention=...)`` with
    rotation (B, d) in the parameterization (module docstring) and translation (B, 3) in mm;
    unbatched (d,) / (3,) mean B = 1, and a batch of 1 broadcasts against B. The pose is
    E = [R | R t] (translation first, in the camera frame, then rotation), except:

    - ``convert(matrix, parameterization="matrix")``: the (B, 4, 4) matrix as is. Also
      ``convert(R, t, parameterization="matrix")`` with R (B, 3, 3): [R | R t] (our addition,
      the inverse of `RigidTransform.convert("matrix")`).
    - ``convert(w, v, parameterization="se3_log_map")``: exp of the twist [[hat(w), v], [0, 0]]
      (pytorch3d's se3_exp_map, transposed to act on column vectors as DiffDRR does).
    - ``convert(sdr, theta, phi, gamma, bx, by, bz, parameterization="spherical")``: see
      `convert_spherical`.

    Args:
        parameterization: one of `PARAMETERIZATIONS`.
        convention: for "euler_angles", one of `EULER_CONVENTIONS` (required).
        degrees: angles in degrees for "euler_angles", "axis_angle" and "spherical".

    Example:
        >>> pose = convert(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.0, 850.0, 0.0]]),
        ...                parameterization="euler_angles", convention="ZXY")
        >>> pose.translation
        tensor([[  0., 850.,   0.]])
    """
    degrees = _validate.flag("degrees", degrees)
    _check_parameterization(parameterization, convention, degrees)
    if parameterization == "spherical":
        if len(args) != 7:
            raise ValueError(
                "parameterization 'spherical' expects 7 positional arguments "
                f"(sdr, theta, phi, gamma, bx, by, bz), got {len(args)}"
            )
        return convert_spherical(*args, degrees=degrees)
    if parameterization == "matrix" and len(args) == 1:
        return RigidTransform(args[0])
    if len(args) != 2:
        expected = (
            "(matrix) or (rotation, translation)"
            if parameterization == "matrix"
            else ("(rotation, translation)")
        )
        raise ValueError(
            f"parameterization '{parameterization}' expects positional arguments {expected}, "
            f"got {len(args)} argument(s)"
        )
    rotation, translation = _batch_pair(*args, parameterization)
    _validate.check_pose_parameters(rotation, translation, parameterization)
    if parameterization == "se3_log_map":
        R = _axis_angle_to_matrix(rotation)
        T = (_se3_V(rotation) @ translation.unsqueeze(-1)).squeeze(-1)
        return RigidTransform(_make_matrix(R, T))
    if degrees:
        rotation = torch.deg2rad(rotation)
    R = (
        rotation
        if parameterization == "matrix"
        else _TO_MATRIX[parameterization](rotation, convention)
    )
    T = (R @ translation.unsqueeze(-1)).squeeze(-1)
    return RigidTransform(_make_matrix(R, T))


def _check_parameterization(parameterization, convention, degrees) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {list(PARAMETERIZATIONS)}, got {parameterization!r}"
        )
    if parameterization == "euler_angles":
        if convention is None:
            raise ValueError(
                "convention is required for parameterization 'euler_angles': one of "
                f"{list(EULER_CONVENTIONS)}, got None"
            )
        if convention not in EULER_CONVENTIONS:
            raise ValueError(
                f"convention must be one of {list(EULER_CONVENTIONS)} (pytorch3d's, uppercase), "
                f"got {convention!r}"
            )
    if degrees and parameterization not in _ANGLE_PARAMETERIZATIONS:
        raise ValueError(
            f"degrees=True applies to {list(_ANGLE_PARAMETERIZATIONS)} only, "
            f"got parameterization {parameterization!r}"
        )


def _batch_pair(rotation, translation, parameterization):
    """Validate shapes and dtypes; return rotation (B, *shape) and translation (B, 3)."""
    for name, x in (("rotation", rotation), ("translation", translation)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if parameterization == "matrix":
        if rotation.dim() == 2:
            rotation = rotation.unsqueeze(0)
        if rotation.dim() != 3 or rotation.shape[-2:] != (3, 3):
            raise ValueError(
                "rotation for parameterization 'matrix' (with a translation) must be "
                f"(B, 3, 3) or (3, 3), got {tuple(rotation.shape)}"
            )
    else:
        d = _ROTATION_SIZE[parameterization]
        if rotation.dim() == 1:
            rotation = rotation.unsqueeze(0)
        if rotation.dim() != 2 or rotation.shape[-1] != d:
            raise ValueError(
                f"rotation for parameterization '{parameterization}' must be (B, {d}) or ({d},), "
                f"got {tuple(rotation.shape)}"
            )
    if translation.dim() == 1:
        translation = translation.unsqueeze(0)
    if translation.dim() != 2 or translation.shape[-1] != 3:
        raise ValueError(f"translation must be (B, 3) or (3,), got {tuple(translation.shape)}")
    b_r, b_t = rotation.shape[0], translation.shape[0]
    if b_r != b_t and 1 not in (b_r, b_t):
        raise ValueError(
            f"rotation and translation must have the same batch size (or 1), got {b_r} and {b_t}"
        )
    dtype = torch.promote_types(rotation.dtype, translation.dtype)
    rotation, translation = rotation.to(dtype), translation.to(dtype)
    B = max(b_r, b_t)
    rotation = rotation.expand(B, *rotation.shape[1:])
    translation = translation.expand(B, 3)
    return rotation, translation


# --------------------------------------------------------------------------------------------
# Legacy spherical C-arm of early DiffDRR (v0.3.x: DRR.forward(sdr, theta, phi, gamma, bx, by, bz))
# --------------------------------------------------------------------------------------------
# Columns: P e_x = -e_z, P e_y = e_x, P e_z = -e_y (proper rotation, det +1): maps our AP camera
# axes (detector column, towards source, detector row) onto the legacy C-arm axes.
_LEGACY_AXES = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0))


def convert_spherical(sdr, theta, phi, gamma, bx, by, bz, *, degrees: bool = False):
    """Pose reproducing early DiffDRR's spherical C-arm (`Detector.make_xrays`, v0.3.x).

    Early DiffDRR put the source at ``sdr * e1 + b`` and the detector centre at
    ``-sdr * e1 + b``, where [e1 e2 e3] = Rz(theta) @ Ry(phi) @ Rx(gamma) (theta azimuth,
    phi polar angle, gamma roll about the principal ray) and b = (bx, by, bz): the source
    circles the isocentre b on a sphere of radius sdr, the detector faces it at the
    antipode, so the source-to-detector distance is 2 * sdr. Pixel (i, j) of an H x W image
    sat at ``-sdr e1 + b + (i - (H-1)/2) * delx_old * e2 + (j - (W-1)/2) * dely_old * e3``.

    With the returned pose E = [R | sdr e1 + b], R = [e1 e2 e3] @ P (P = [[0, 1, 0],
    [0, 0, -1], [-1, 0, 0]]), a tritondrr `DRR` built with ``sdd=2*sdr``, ``delx=dely_old``,
    ``dely=delx_old`` (equal in practice: v0.3 used delx for both), ``x0=y0=0``,
    ``reverse_x_axis=True`` and ``orientation="AP"`` (the defaults) has exactly early
    DiffDRR's source and pixel centres, in the same (B, C, H, W) layout. With
    ``reverse_x_axis=False`` the image is mirrored left-right; for another orientation with
    reorientation matrix M, use E @ M_AP @ M^-1.

    World frame: early DiffDRR placed the volume with the corner of voxel (0, 0, 0) at the
    origin and voxel (i, j, k) filling [i, i+1] x [j, j+1] x [k, k+1] * spacing, array axes
    along world axes; its usual isocentre b = shape * spacing / 2 is the volume centre. Here b
    is taken in our world as is; for a volume with a diagonal affine read with
    ``center_volume=True`` pass ``b_old - shape * spacing / 2``.

    Args:
        sdr: source-to-isocentre distance in mm (half the source-to-detector distance).
        theta, phi, gamma: angles in radians (degrees if ``degrees=True``).
        bx, by, bz: isocentre in world mm.
        Each is a float or a tensor of shape (), (B,) or (B, 1); they broadcast to (B,).

    Returns:
        RigidTransform (B, 4, 4).
    """
    names = ("sdr", "theta", "phi", "gamma", "bx", "by", "bz")
    values = (sdr, theta, phi, gamma, bx, by, bz)
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    for name, v in zip(names, values):
        if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
            raise TypeError(f"{name} must be a float or a torch.Tensor, got {type(v).__name__}")
        if isinstance(v, torch.Tensor) and not (
            v.dim() == 0 or v.dim() == 1 or (v.dim() == 2 and v.shape[1] == 1)
        ):
            raise ValueError(f"{name} must be a scalar, (B,) or (B, 1), got {tuple(v.shape)}")
    dtype = torch.get_default_dtype()
    for v in tensors:
        dtype = torch.promote_types(dtype, v.dtype) if v.is_floating_point() else dtype
    device = tensors[0].device if tensors else None
    flat = [torch.as_tensor(v, dtype=dtype, device=device).reshape(-1) for v in values]
    try:
        flat = torch.broadcast_tensors(*flat)
    except RuntimeError as err:
        shapes = {n: tuple(v.shape) for n, v in zip(names, flat)}
        raise ValueError(
            f"spherical parameters must broadcast to one batch size, got {shapes}"
        ) from err
    sdr, theta, phi, gamma, bx, by, bz = flat
    if degrees:
        theta, phi, gamma = (torch.deg2rad(a) for a in (theta, phi, gamma))
    carm = _elementary("Z", theta) @ _elementary("Y", phi) @ _elementary("X", gamma)
    axes = torch.tensor(_LEGACY_AXES, dtype=dtype, device=carm.device)
    source = sdr.unsqueeze(-1) * carm[:, :, 0] + torch.stack([bx, by, bz], dim=-1)
    return RigidTransform(_make_matrix(carm @ axes, source))


# --------------------------------------------------------------------------------------------
# Rotation parameterizations <-> rotation matrices, all (B, d) <-> (B, 3, 3)
# --------------------------------------------------------------------------------------------
def _series(x: torch.Tensor, coefficients) -> torch.Tensor:
    """Polynomial sum_k c_k x^k by Horner's rule."""
    out = torch.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        out = out * x + c
    return out


def _series_coefficients(first: int) -> tuple:
    """Coefficients of sum_k (-1)^k x^k / (2k + first)!, i.e. of sin/cos Taylor remainders."""
    return tuple((-1) ** k / math.factorial(2 * k + first) for k in range(8))


_SIN_OVER_T = _series_coefficients(1)  # sin(t) / t
_ONE_MINUS_COS_OVER_T2 = _series_coefficients(2)  # (1 - cos t) / t^2
_T_MINUS_SIN_OVER_T3 = _series_coefficients(3)  # (t - sin t) / t^3
# (1 - (t/2) cot(t/2)) / t^2 in powers of t^2 (from the Bernoulli series of y cot y)
_V_INVERSE = (1 / 12, 1 / 720, 1 / 30240, 1 / 1209600, 1 / 47900160)


def _rodrigues_coefficients(w: torch.Tensor):
    """a = sin t / t, b = (1 - cos t) / t^2, c = (t - sin t) / t^3 with t = |w|, (B,) each."""
    x = (w * w).sum(-1)
    small = x < _SMALL_ANGLE_SQ
    t = torch.sqrt(torch.where(small, torch.ones_like(x), x))  # no sqrt'(0) in the graph
    half_sinc = torch.sin(t / 2) / (t / 2)
    a = torch.where(small, _series(x, _SIN_OVER_T), torch.sin(t) / t)
    b = torch.where(small, _series(x, _ONE_MINUS_COS_OVER_T2), 0.5 * half_sinc**2)
    c = torch.where(small, _series(x, _T_MINUS_SIN_OVER_T3), (t - torch.sin(t)) / t**3)
    return a, b, c


def _hat(w: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric (B, 3, 3) K with K v = w x v."""
    x, y, z = w.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(w.shape[:-1] + (3, 3))


def _eye_like(w: torch.Tensor) -> torch.Tensor:
    return torch.eye(3, dtype=w.dtype, device=w.device).expand(w.shape[:-1] + (3, 3))


def _axis_angle_to_matrix(w: torch.Tensor, convention=None) -> torch.Tensor:
    a, b, _ = _rodrigues_coefficients(w)
    K = _hat(w)
    return _eye_like(w) + a[..., None, None] * K + b[..., None, None] * (K @ K)


def _se3_V(w: torch.Tensor) -> torch.Tensor:
    """V = I + b K + c K^2: the translation part of exp([[K, v], [0, 0]]) is V v."""
    _, b, c = _rodrigues_coefficients(w)
    K = _hat(w)
    return _eye_like(w) + b[..., None, None] * K + c[..., None, None] * (K @ K)


def _se3_V_inverse(w: torch.Tensor) -> torch.Tensor:
    """V^-1 = I - K / 2 + e K^2, e = (1 - (t/2) cot(t/2)) / t^2 (valid for |w| < 2 pi)."""
    x = (w * w).sum(-1)
    small = x < _SMALL_ANGLE_SQ
    t = torch.sqrt(torch.where(small, torch.ones_like(x), x))
    half = t / 2
    e = torch.where(
        small, _series(x, _V_INVERSE), (1 - half * torch.cos(half) / torch.sin(half)) / x
    )
    K = _hat(w)
    return _eye_like(w) - 0.5 * K + e[..., None, None] * (K @ K)


def _elementary(axis: str, angle: torch.Tensor) -> torch.Tensor:
    """Right-handed rotation by angle (B,) about a coordinate axis, (B, 3, 3)."""
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    rows = {
        "X": (one, zero, zero, zero, c, -s, zero, s, c),
        "Y": (c, zero, s, zero, one, zero, -s, zero, c),
        "Z": (c, -s, zero, s, c, zero, zero, zero, one),
    }[axis]
    return torch.stack(rows, dim=-1).reshape(angle.shape + (3, 3))


def _euler_to_matrix(angles: torch.Tensor, convention: str) -> torch.Tensor:
    a0, a1, a2 = angles.unbind(-1)
    return (
        _elementary(convention[0], a0)
        @ _elementary(convention[1], a1)
        @ _elementary(convention[2], a2)
    )


def _matrix_to_euler(R: torch.Tensor, convention: str) -> torch.Tensor:
    """Inverse of `_euler_to_matrix` on pytorch3d's branches (see RigidTransform.convert)."""
    i, j = "XYZ".index(convention[0]), "XYZ".index(convention[1])
    k = 3 - i - j  # the axis not named first or second
    sign = 1.0 if (j - i) % 3 == 1 else -1.0  # +1 when (i, j, k) is a cyclic permutation
    if convention[0] != convention[2]:  # Tait-Bryan: R[i, k] = sign * sin(a1)
        a1 = torch.atan2(sign * R[..., i, k], torch.hypot(R[..., i, i], R[..., i, j]))
        a0 = torch.atan2(-sign * R[..., j, k], R[..., k, k])
        a2 = torch.atan2(-sign * R[..., i, j], R[..., i, i])
    else:  # proper Euler: R[i, i] = cos(a1)
        a1 = torch.atan2(torch.hypot(R[..., i, j], R[..., i, k]), R[..., i, i])
        a0 = torch.atan2(R[..., j, i], -sign * R[..., k, i])
        a2 = torch.atan2(R[..., i, j], sign * R[..., i, k])
    return torch.stack([a0, a1, a2], dim=-1)


def _quaternion_to_matrix(q: torch.Tensor, convention=None) -> torch.Tensor:
    """Textbook matrix of q / |q| (w, x, y, z); the identity for q = 0 (finite, with finite gradients;
    ``convert`` refuses a zero quaternion on the CPU)."""
    w, x, y, z = q.unbind(-1)
    n2 = (q * q).sum(-1)
    s = 2.0 / torch.where(n2 > 0, n2, torch.full_like(n2, torch.inf))
    R = torch.stack(
        [
            1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
            s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
            s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
        ],
        dim=-1,
    )  # fmt: skip
    return R.reshape(q.shape[:-1] + (3, 3))


def _matrix_to_quaternion(R: torch.Tensor, convention=None) -> torch.Tensor:
    """Unit quaternion (w >= 0) by Shepperd's method: divide by the largest of 4|w|, 4|x|, ..."""
    m = R.reshape(R.shape[:-2] + (9,))
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    # Row k is 4 q_k q; its k-th entry is 4 q_k^2.
    rows = torch.stack(
        [
            1 + m00 + m11 + m22, m21 - m12, m02 - m20, m10 - m01,
            m21 - m12, 1 + m00 - m11 - m22, m10 + m01, m02 + m20,
            m02 - m20, m10 + m01, 1 - m00 + m11 - m22, m12 + m21,
            m10 - m01, m02 + m20, m12 + m21, 1 - m00 - m11 + m22,
        ],
        dim=-1,
    ).reshape(R.shape[:-2] + (4, 4))  # fmt: skip
    diag = rows.diagonal(dim1=-2, dim2=-1)
    k = diag.argmax(dim=-1, keepdim=True)  # its 4 q_k^2 >= 1, so no division by ~0
    row = rows.gather(-2, k.unsqueeze(-1).expand(k.shape[:-1] + (1, 4))).squeeze(-2)
    q = row / (2 * torch.sqrt(diag.gather(-1, k)))
    q = q / q.norm(dim=-1, keepdim=True)
    return _standardize(q)


def _standardize(q: torch.Tensor) -> torch.Tensor:
    return torch.where(q[..., :1] < 0, -q, q)


def _matrix_to_axis_angle(R: torch.Tensor, convention=None) -> torch.Tensor:
    q = _matrix_to_quaternion(R)
    w, v = q[..., 0], q[..., 1:]
    n2 = (v * v).sum(-1)
    small = n2 < 1e-6
    n = torch.sqrt(torch.where(small, torch.ones_like(n2), n2))
    # angle / n = 2 atan2(n, w) / n; near 0 (w ~ 1 > 0) use 2 atan(u)/u with u = n / w
    u2 = n2 / (w * w)
    near = (2 / w) * (1 - u2 / 3 + u2 * u2 / 5)
    scale = torch.where(small, near, 2 * torch.atan2(n, w) / n)
    return v * scale.unsqueeze(-1)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _rotation_6d_to_matrix(d6: torch.Tensor, convention=None) -> torch.Tensor:
    """Rows b1, b2, b3 from Gram-Schmidt on (d6[:3], d6[3:]) (pytorch3d / Zhou et al.)."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = _normalize(a1)
    b2 = _normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


def _matrix_to_rotation_6d(R: torch.Tensor, convention=None) -> torch.Tensor:
    return R[..., :2, :].reshape(R.shape[:-2] + (6,))


def _rotation_9d_to_matrix(d9: torch.Tensor, convention=None) -> torch.Tensor:
    return _SpecialOrthogonalProjection.apply(d9.reshape(d9.shape[:-1] + (3, 3)))


def _matrix_to_rotation_9d(R: torch.Tensor, convention=None) -> torch.Tensor:
    return R.reshape(R.shape[:-2] + (9,))


# Position in the 10-vector of entry (i, j) of the symmetric 4x4 (row-major upper triangle,
# torch.triu_indices(4, 4) order, as DiffDRR).
_SYM_INDEX = (
    (0, 1, 2, 3),
    (1, 4, 5, 6),
    (2, 5, 7, 8),
    (3, 6, 8, 9),
)
_TRIU = ((0, 0, 0, 0, 1, 1, 1, 2, 2, 3), (0, 1, 2, 3, 1, 2, 3, 2, 3, 3))


def _symmetric_4x4(vec: torch.Tensor) -> torch.Tensor:
    index = torch.tensor(_SYM_INDEX, device=vec.device).reshape(-1)
    return vec[..., index].reshape(vec.shape[:-1] + (4, 4))


def _upper_triangle(A: torch.Tensor) -> torch.Tensor:
    return A[..., _TRIU[0], _TRIU[1]]


def _rotation_10d_to_matrix(d10: torch.Tensor, convention=None) -> torch.Tensor:
    q = _SmallestEigenvector.apply(_symmetric_4x4(d10))
    return _quaternion_to_matrix(q)


def _matrix_to_rotation_10d(R: torch.Tensor, convention=None) -> torch.Tensor:
    q = _matrix_to_quaternion(R)
    return -_upper_triangle(q.unsqueeze(-1) * q.unsqueeze(-2))


def _quaternion_adjugate_to_matrix(d10: torch.Tensor, convention=None) -> torch.Tensor:
    """q = the row of largest norm of the symmetric 4x4 (for q q^T, a multiple of q)."""
    A = _symmetric_4x4(d10)
    norms = A.norm(dim=-1)
    k = norms.argmax(dim=-1, keepdim=True)
    row = A.gather(-2, k.unsqueeze(-1).expand(k.shape[:-1] + (1, 4))).squeeze(-2)
    return _quaternion_to_matrix(row / norms.gather(-1, k))


def _matrix_to_quaternion_adjugate(R: torch.Tensor, convention=None) -> torch.Tensor:
    q = _matrix_to_quaternion(R)
    return _upper_triangle(q.unsqueeze(-1) * q.unsqueeze(-2))


_TO_MATRIX = {
    "axis_angle": _axis_angle_to_matrix,
    "euler_angles": _euler_to_matrix,
    "quaternion": _quaternion_to_matrix,
    "quaternion_adjugate": _quaternion_adjugate_to_matrix,
    "rotation_6d": _rotation_6d_to_matrix,
    "rotation_9d": _rotation_9d_to_matrix,
    "rotation_10d": _rotation_10d_to_matrix,
}
_FROM_MATRIX = {
    "axis_angle": _matrix_to_axis_angle,
    "euler_angles": _matrix_to_euler,
    "quaternion": _matrix_to_quaternion,
    "quaternion_adjugate": _matrix_to_quaternion_adjugate,
    "rotation_6d": _matrix_to_rotation_6d,
    "rotation_9d": _matrix_to_rotation_9d,
    "rotation_10d": _matrix_to_rotation_10d,
}


# --------------------------------------------------------------------------------------------
# Decompositions with backward passes that stay finite at repeated singular/eigen values
# --------------------------------------------------------------------------------------------
def _linalg_device(x: torch.Tensor) -> torch.Tensor:
    # MPS lacks some small-matrix decompositions; these are (B, 3, 3) / (B, 4, 4), so CPU is cheap.
    return x.cpu() if x.device.type == "mps" else x


class _SpecialOrthogonalProjection(torch.autograd.Function):
    """Nearest rotation U diag(1, 1, det(U V^T)) V^T to M = U S V^T (Levinson et al. 2020).

    With U' = U D, S' = D S, dR = U' X V^T where X_ij = (P_ij - P_ji) / (s'_i + s'_j) and
    P = U'^T dM V: finite unless s'_i + s'_j = 0, unlike the SVD's own backward, whose
    1 / (s_i^2 - s_j^2) is infinite when M is already a rotation (all s_i = 1).
    """

    @staticmethod
    def forward(ctx, M):
        U, S, Vh = torch.linalg.svd(_linalg_device(M))
        U, S, Vh = U.to(M.device), S.to(M.device), Vh.to(M.device)
        d = torch.where(torch.linalg.det(U @ Vh) < 0, -1.0, 1.0).to(M.dtype)
        flip = torch.ones_like(S)
        flip[..., 2] = d
        U, S = U * flip.unsqueeze(-2), S * flip
        ctx.save_for_backward(U, S, Vh)
        return U @ Vh

    @staticmethod
    def backward(ctx, grad):
        U, S, Vh = ctx.saved_tensors
        A = U.mT @ grad @ Vh.mT
        denom = S.unsqueeze(-1) + S.unsqueeze(-2)
        # s'_i + s'_j = 0 (M singular, e.g. rank <= 1): that rotation component is undetermined; give it 0.
        tiny = torch.finfo(S.dtype).eps * S.abs().amax(-1, keepdim=True).unsqueeze(-1).clamp_min(1.0)
        denom = torch.where(denom.abs() > tiny, denom, torch.full_like(denom, torch.inf))
        X = (A - A.mT) / denom  # zero on the diagonal
        return U @ X @ Vh


class _SmallestEigenvector(torch.autograd.Function):
    """Unit eigenvector of the smallest eigenvalue of a symmetric matrix (sign arbitrary).

    Backward: dv = -(A - l0 I)^+ dA v, the pseudo-inverse built from the other eigenpairs only,
    so it stays finite when those repeat (as for A = -q q^T, DiffDRR's encoding of a rotation).
    """

    @staticmethod
    def forward(ctx, A):
        L, V = torch.linalg.eigh(_linalg_device(A))
        L, V = L.to(A.device), V.to(A.device)
        ctx.save_for_backward(L, V)
        return V[..., 0]

    @staticmethod
    def backward(ctx, grad):
        L, V = ctx.saved_tensors
        v, others = V[..., 0], V[..., 1:]
        gaps = L[..., 1:] - L[..., :1]
        # A repeated smallest eigenvalue leaves the eigenvector undetermined in that plane: no gradient there.
        tiny = torch.finfo(L.dtype).eps * L.abs().amax(-1, keepdim=True).clamp_min(1.0)
        gaps = torch.where(gaps > tiny, gaps, torch.full_like(gaps, torch.inf))
        w = others @ ((others.mT @ grad.unsqueeze(-1)).squeeze(-1) / gaps).unsqueeze(-1)
        G = -w * v.unsqueeze(-2)
        return 0.5 * (G + G.mT)
