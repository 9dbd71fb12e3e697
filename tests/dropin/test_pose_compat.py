"""DiffDRR 0.6.1 behaviours of `tritondrr.pose`: indexing, nn.Module semantics, SE(3) log, helpers.

Oracles: torch.linalg.matrix_exp of the 4x4 twist (independent of our Rodrigues series), closed
forms of elementary rotations, and moments of the Haar measure on SO(3).
"""

import copy
import math

import pytest
import torch

from tritondrr.pose import (
    RigidTransform,
    axis_angle_to_matrix,
    convert,
    euler_angles_to_matrix,
    hat,
    hat_inv,
    make_matrix,
    matrix_to_axis_angle,
    matrix_to_euler_angles,
    random_rigid_transform,
    se3_exp_map,
    se3_log_map,
)

F64 = torch.float64


def twist_exp(v, w):
    """exp([[hat(w), v], [0, 0]]) by torch.linalg.matrix_exp, (B, 4, 4) float64."""
    B = len(v)
    X = torch.zeros(B, 4, 4, dtype=F64)
    X[:, 0, 1], X[:, 0, 2], X[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    X[:, 1, 0], X[:, 2, 0], X[:, 2, 1] = w[:, 2], -w[:, 1], w[:, 0]
    X[:, :3, 3] = v
    return torch.linalg.matrix_exp(X)


def test_integer_index_gives_the_matrix_slices_give_transforms():
    pose = random_rigid_transform(4, generator=torch.Generator().manual_seed(0))
    assert isinstance(pose[0], torch.Tensor) and pose[0].shape == (4, 4)
    assert torch.equal(pose[-1], pose.matrix[3])
    part = pose[1:3]
    assert isinstance(part, RigidTransform) and len(part) == 2 and torch.equal(part.matrix, pose.matrix[1:3])
    picked = pose[torch.tensor([3, 0])]
    assert isinstance(picked, RigidTransform) and torch.equal(picked.matrix[1], pose.matrix[0])
    assert pose[:, :3, :3].shape == (4, 3, 3)  # not a batch of 4x4: the tensor


def test_is_a_module_whose_to_converts_in_place_and_keeps_gradients():
    rot = torch.tensor([[0.1, -0.2, 0.3]], requires_grad=True)
    pose = convert(rot, torch.tensor([[1.0, 2.0, 3.0]]), parameterization="axis_angle")
    assert isinstance(pose, torch.nn.Module) and list(pose.state_dict()) == ["matrix"]
    same = pose.to(F64)
    assert same is pose and pose.matrix.dtype == F64 and pose.rotation.dtype == F64
    pose.translation.sum().backward()  # the float64 buffer is still a function of rot
    assert rot.grad is not None and torch.isfinite(rot.grad).all() and rot.grad.abs().sum() > 0

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pose = RigidTransform(torch.eye(4))

    holder = Holder().double()
    assert holder.pose.dtype == F64 and "pose.matrix" in holder.state_dict()
    dup = copy.deepcopy(holder.pose).to(torch.float32)
    assert dup.dtype == torch.float32 and holder.pose.dtype == F64
    seen = []
    holder.apply(lambda m: seen.append(type(m).__name__))  # nn.Module.apply still recurses
    assert seen == ["RigidTransform", "Holder"]


def test_call_and_apply_transform_points():
    pose = convert(torch.tensor([[0.0, 0.0, math.pi / 2]], dtype=F64), torch.zeros(1, 3, dtype=F64),
                   parameterization="axis_angle")
    p = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=F64)
    torch.testing.assert_close(pose(p), torch.tensor([[[0.0, 1.0, 0.0]]], dtype=F64))
    torch.testing.assert_close(pose.apply(p), pose(p))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_se3_log_is_the_logarithm_of_the_pose(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, generator=g, dtype=F64)
    w = w / w.norm(dim=-1, keepdim=True) * torch.rand(5, 1, generator=g, dtype=F64) * 3.0  # |w| < pi
    v = 50 * torch.randn(5, 3, generator=g, dtype=F64)
    pose = RigidTransform(twist_exp(v, w))
    log = pose.get_se3_log()
    assert log.shape == (5, 6)
    torch.testing.assert_close(log, torch.cat([v, w], dim=-1), rtol=1e-9, atol=1e-9)
    # pytorch3d's row-vector layout for the free functions
    torch.testing.assert_close(se3_exp_map(torch.cat([v, w], -1)), twist_exp(v, w).mT, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(se3_log_map(twist_exp(v, w).mT), torch.cat([v, w], -1), rtol=1e-9, atol=1e-9)
    # convert("se3_log_map") returns (rotation, translation) = (w, v), as DiffDRR
    rw, tv = pose.convert("se3_log_map")
    torch.testing.assert_close(rw, w, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(tv, v, rtol=1e-9, atol=1e-9)


def test_pure_translation_log():
    t = torch.tensor([[3.0, -4.0, 12.0]], dtype=F64)
    M = torch.eye(4, dtype=F64)[None].clone()
    M[:, :3, 3] = t
    torch.testing.assert_close(RigidTransform(M).get_se3_log(), torch.cat([t, torch.zeros(1, 3, dtype=F64)], -1))


def test_make_matrix():
    R = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    t = torch.tensor([[1.0, 2.0, 3.0]])
    M = make_matrix(R, t)
    expected = torch.tensor([[[0.0, -1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0], [0, 0, 0, 1.0]]])
    assert torch.equal(M, expected)
    with pytest.raises(ValueError, match="t must be"):
        make_matrix(R, torch.zeros(2, 3))


def test_random_rigid_transform_is_haar_distributed():
    pose = random_rigid_transform(4000, generator=torch.Generator().manual_seed(7), dtype=F64)
    R = pose.rotation
    assert pose.matrix.dtype == F64 and len(pose) == 4000
    torch.testing.assert_close(R @ R.mT, torch.eye(3, dtype=F64).expand(4000, 3, 3), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(4000, dtype=F64), rtol=0, atol=1e-12)
    # Haar: E[R] = 0 and E[R_ij^2] = 1/3; standard errors about 0.009 and 0.005 for 4000 draws.
    assert R.mean(0).abs().max() < 0.05
    assert ((R**2).mean(0) - 1 / 3).abs().max() < 0.03
    # trace = 1 + 2 cos(angle); Haar angle density (1 - cos a) / pi gives E[trace] = 0
    assert abs(float(R.diagonal(dim1=-2, dim2=-1).sum(-1).mean())) < 0.06
    t = pose.translation
    assert 90 < float(t.std()) < 110  # 100 N(0, 1) mm
    a = random_rigid_transform(3, generator=torch.Generator().manual_seed(8))
    b = random_rigid_transform(3, generator=torch.Generator().manual_seed(8))
    assert a.dtype == torch.float32 and torch.equal(a.matrix, b.matrix)


def test_pytorch3d_style_functions():
    a = 0.7
    Rz = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]], dtype=F64)
    torch.testing.assert_close(euler_angles_to_matrix(torch.tensor([[a, 0.0, 0.0]], dtype=F64), "ZXY")[0], Rz)
    torch.testing.assert_close(axis_angle_to_matrix(torch.tensor([[0.0, 0.0, a]], dtype=F64))[0], Rz)
    torch.testing.assert_close(matrix_to_axis_angle(Rz[None]), torch.tensor([[0.0, 0.0, a]], dtype=F64))
    torch.testing.assert_close(matrix_to_euler_angles(Rz[None], "ZXY"), torch.tensor([[a, 0.0, 0.0]], dtype=F64))
    v, x = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close((hat(v) @ x.unsqueeze(-1)).squeeze(-1), torch.linalg.cross(v, x))
    torch.testing.assert_close(hat_inv(hat(v)), v)
