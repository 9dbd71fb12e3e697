"""tritondrr.metrics against independent computations: numpy correlations, brute-force windows,
closed-form pose distances, an explicit-loop Parzen MI, and float64 gradchecks."""

import math

import numpy as np
import pytest
import torch

import tritondrr as td
from tritondrr.metrics import (
    DoubleGeodesicSE3,
    GradientNormalizedCrossCorrelation2d,
    LogGeodesicSE3,
    MultiscaleNormalizedCrossCorrelation2d,
    MutualInformation,
    NormalizedCrossCorrelation2d,
    Sobel,
)


def _images(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=dtype)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("patch_size", [None, 4])
@pytest.mark.parametrize("scale, sign", [(3.0, 1.0), (0.25, 1.0), (2.0, -1.0)])
def test_ncc_affine_intensity_change(patch_size, scale, sign):
    x = _images(2, 2, 13, 11)
    ncc = NormalizedCrossCorrelation2d(patch_size, eps=0.0)
    score = ncc(x, sign * scale * x + 5.0)
    # float64, eps = 0: exact up to rounding (measured 2e-16).
    torch.testing.assert_close(score, torch.full((2,), sign, dtype=torch.float64), rtol=0, atol=1e-12)


def test_ncc_default_eps_close_to_one():
    x = _images(1, 1, 16, 16, dtype=torch.float32)
    # var(x) ~ 1/12, eps = 1e-5: 1 - NCC ~ eps / (2 var) (1 + 1/9) ~ 7e-5.
    assert abs(float(NormalizedCrossCorrelation2d()(x, 3 * x + 1)) - 1) < 2e-4


def test_ncc_global_matches_numpy_pearson():
    x1, x2 = _images(3, 2, 9, 7, seed=1), _images(3, 2, 9, 7, seed=2)
    got = NormalizedCrossCorrelation2d(eps=0.0)(x1, x2)
    want = [np.mean([_pearson(x1[b, c].numpy(), x2[b, c].numpy()) for c in range(2)]) for b in range(3)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)


def test_ncc_patches_match_brute_force_windows():
    p = 3
    x1, x2 = _images(2, 1, 8, 6, seed=3), _images(2, 1, 8, 6, seed=4)
    got = NormalizedCrossCorrelation2d(p, eps=0.0)(x1, x2)
    want = []
    for b in range(2):
        a, c = x1[b, 0].numpy(), x2[b, 0].numpy()
        scores = [
            _pearson(a[i : i + p, j : j + p], c[i : i + p, j : j + p])
            for i in range(8 - p + 1)
            for j in range(6 - p + 1)
        ]
        want.append(np.mean(scores))
    # Box-filter moments (E[x^2] - E[x]^2) in float64: measured error 3e-15.
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-10)


def test_multiscale_is_weighted_sum():
    x1, x2 = _images(2, 1, 10, 10, seed=5), _images(2, 1, 10, 10, seed=6)
    got = MultiscaleNormalizedCrossCorrelation2d([None, 5], [0.5, 2.0])(x1, x2)
    ncc_all = NormalizedCrossCorrelation2d()(x1, x2)
    ncc_5 = NormalizedCrossCorrelation2d(5)(x1, x2)
    torch.testing.assert_close(got, 0.5 * ncc_all + 2.0 * ncc_5)
    with pytest.raises(ValueError, match="patch_weights"):
        MultiscaleNormalizedCrossCorrelation2d([None, 5], [1.0])


@pytest.mark.parametrize(
    "metric",
    [
        NormalizedCrossCorrelation2d(),
        NormalizedCrossCorrelation2d(4),
        GradientNormalizedCrossCorrelation2d(),
        MutualInformation(num_bins=16),
        MutualInformation(num_bins=16, normalize=False, rescale=True),
    ],
    ids=["ncc", "ncc-patch", "gncc", "mi", "mi-raw"],
)
def test_symmetry(metric):
    x1, x2 = _images(2, 1, 12, 12, seed=7), _images(2, 1, 12, 12, seed=8)
    torch.testing.assert_close(metric(x1, x2), metric(x2, x1), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "metric",
    [
        NormalizedCrossCorrelation2d(),
        NormalizedCrossCorrelation2d(3),
        MultiscaleNormalizedCrossCorrelation2d([None, 3], [1.0, 0.5]),
        GradientNormalizedCrossCorrelation2d(sigma=0.8),
        MutualInformation(sigma=0.2, num_bins=8),
        MutualInformation(sigma=0.2, num_bins=8, rescale=True),
    ],
    ids=["ncc", "ncc-patch", "mncc", "gncc", "mi", "mi-rescale"],
)
def test_gradcheck(metric):
    x1 = _images(2, 1, 7, 6, seed=9).requires_grad_()
    x2 = _images(2, 1, 7, 6, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(metric, (x1, x2), eps=1e-6, atol=1e-7)


def test_sobel_of_a_ramp():
    # A linear ramp is unchanged by a symmetric blur away from the border; Sobel's x filter
    # [1, 0, -1] x [1, 2, 1] gives -8 * slope (cross-correlation), its transpose -8 * slope_y.
    rows, cols = torch.meshgrid(
        torch.arange(16.0, dtype=torch.float64), torch.arange(16.0, dtype=torch.float64), indexing="ij"
    )
    img = (0.3 * cols + 0.7 * rows)[None, None]
    out = Sobel(sigma=1.3)(img)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    torch.testing.assert_close(out[:, :1][inner], torch.full_like(out[:, :1][inner], -8 * 0.3))
    torch.testing.assert_close(out[:, 1:][inner], torch.full_like(out[:, 1:][inner], -8 * 0.7))


def _parzen_mi(a: np.ndarray, b: np.ndarray, sigma: float, bins: int, eps: float = 1e-10):
    """Explicit-loop Parzen-window MI (bits) and its normalised form, from the definitions."""
    centres = np.linspace(0.0, 1.0, bins)
    ka = np.array([[math.exp(-0.5 * ((v - c) / sigma) ** 2) for c in centres] for v in a.ravel()])
    kb = np.array([[math.exp(-0.5 * ((v - c) / sigma) ** 2) for c in centres] for v in b.ravel()])
    pa = ka.mean(0)
    pa = pa / (pa.sum() + eps)
    pb = kb.mean(0)
    pb = pb / (pb.sum() + eps)
    joint = np.zeros((bins, bins))
    for n in range(len(ka)):
        joint += np.outer(ka[n], kb[n])
    joint = joint / (joint.sum() + eps)
    h = lambda p: -np.sum(p * np.log2(p + eps))
    mi = h(pa) + h(pb) - h(joint)
    return mi, 2 * mi / (h(pa) + h(pb))


def test_mi_matches_explicit_parzen_estimate():
    x1, x2 = _images(1, 1, 6, 5, seed=11), _images(1, 1, 6, 5, seed=12)
    mi, nmi = _parzen_mi(x1.numpy(), x2.numpy(), 0.15, 12)
    got_mi = MutualInformation(0.15, 12, normalize=False)(x1, x2)
    got_nmi = MutualInformation(0.15, 12)(x1, x2)
    torch.testing.assert_close(got_mi, torch.tensor([mi], dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_nmi, torch.tensor([nmi], dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_mi_independent_near_zero_identical_high():
    x1, x2 = _images(1, 1, 64, 64, seed=13), _images(1, 1, 64, 64, seed=14)
    mi = MutualInformation(sigma=0.05, num_bins=32)
    independent, identical = float(mi(x1, x2)), float(mi(x1, x1))
    # Measured: independent 0.00086 (the estimator's small-sample bias), identical 0.38, sqrt 0.36.
    assert independent < 0.01
    assert identical > 0.3
    # A monotone (non-affine) intensity change keeps much of the information.
    assert float(mi(x1, x1.sqrt())) > 0.2


def _pose(axis_angle, translation):
    return td.convert(
        torch.tensor([axis_angle], dtype=torch.float64),
        torch.tensor([translation], dtype=torch.float64),
        parameterization="axis_angle",
    )


def test_pose_distances_closed_forms():
    angle = 0.3
    axis = np.array([1.0, 2.0, -2.0]) / 3.0
    base = _pose([0.1, -0.2, 0.05], [1.0, 850.0, -3.0])
    # Rotate about the camera origin: E' = E [R_rel | 0], a pure rotation by `angle` relative to E.
    rel = _pose(list(angle * axis), [0.0, 0.0, 0.0])
    rotated = td.RigidTransform(base.matrix @ rel.matrix)
    shift = td.RigidTransform(base.matrix @ _pose([0.0, 0.0, 0.0], [3.0, -4.0, 12.0]).matrix)

    log = LogGeodesicSE3()
    torch.testing.assert_close(log(base, rotated), torch.tensor([angle], dtype=torch.float64))
    torch.testing.assert_close(log(base, shift), torch.tensor([13.0], dtype=torch.float64))

    sdd = 1020.0
    rot, xyz, dou = DoubleGeodesicSE3(sdd)(base, rotated)
    torch.testing.assert_close(rot, torch.tensor([sdd / 2 * angle], dtype=torch.float64))
    # Same camera origin; the camera-frame translations t = R^T T differ: |R_1^T T - R_2^T T|.
    T = base.matrix[0, :3, 3]
    want_xyz = (base.matrix[0, :3, :3].T @ T - rotated.matrix[0, :3, :3].T @ T).norm()
    torch.testing.assert_close(xyz, want_xyz[None])
    torch.testing.assert_close(dou, (rot**2 + xyz**2 + 1e-6).sqrt())

    rot, xyz, _ = DoubleGeodesicSE3(sdd)(
        _pose([0.0, 0.0, 0.2], [0.0, 850.0, 0.0]), _pose([0.0, 0.0, 0.2], [3.0, 846.0, 0.0])
    )
    torch.testing.assert_close(rot, torch.zeros(1, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(xyz, torch.tensor([5.0], dtype=torch.float64))


def test_rotation_distance_near_pi_and_zero():
    for angle in (1e-7, math.pi - 1e-6):
        a, b = _pose([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]), _pose([0.0, angle, 0.0], [0.0, 0.0, 0.0])
        rot, _, _ = DoubleGeodesicSE3(2.0)(a, b)
        assert abs(float(rot) - angle) < 1e-9


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="x1 must be"):
        NormalizedCrossCorrelation2d()(torch.zeros(4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="patch_size"):
        NormalizedCrossCorrelation2d(0)
    with pytest.raises(TypeError, match="pose_1"):
        LogGeodesicSE3()(torch.eye(4), torch.eye(4))


def test_matches_diffdrr_where_importable():
    metrics = pytest.importorskip("diffdrr.metrics")
    x1, x2 = _images(2, 1, 16, 16, seed=15, dtype=torch.float32), _images(2, 1, 16, 16, seed=16, dtype=torch.float32)
    for ours, theirs in (
        (NormalizedCrossCorrelation2d(), metrics.NormalizedCrossCorrelation2d()),
        (NormalizedCrossCorrelation2d(5), metrics.NormalizedCrossCorrelation2d(5)),
        (GradientNormalizedCrossCorrelation2d(), metrics.GradientNormalizedCrossCorrelation2d()),
        (MutualInformation(), metrics.MutualInformation()),
    ):
        torch.testing.assert_close(ours(x1, x2), theirs(x1, x2), rtol=1e-4, atol=1e-5)
