"""Per-pixel pose Jacobians against torch.autograd.functional.jacobian (one backward per pixel), float64."""

import pytest
import torch

import tritondrr as td
from tritondrr.registration import pose_jacobian

# Measured max |J - J_autograd| / max |J_autograd|: 1.4e-15 .. 2.4e-15 (torch and triton backends).
RTOL_MAX = 1e-10


@pytest.fixture(scope="module")
def subject():
    return td.load_example_ct(shape=(24, 20, 16))


def _drr(subject, backend="torch", **kwargs):
    kwargs.setdefault("n_samples", 24)
    return td.DRR(subject, sdd=1020.0, height=8, delx=50.0, backend=backend, **kwargs).to(torch.float64)


def _autograd_jacobian(drr, rotations, translations, **options):
    """(B, C, ..., P) from autograd's full Jacobian: each pose's block of its own parameters."""
    batch = max(len(rotations), len(translations))
    rotations = rotations.expand(batch, *rotations.shape[1:]).clone()
    translations = translations.expand(batch, 3).clone()
    jr, jt = torch.autograd.functional.jacobian(lambda r, t: drr(r, t, **options), (rotations, translations))
    rows = [torch.cat([jr[b, ..., b, :], jt[b, ..., b, :]], dim=-1) for b in range(batch)]
    return torch.stack(rows)


def _close(got, want):
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float((got - want).abs().max() / want.abs().max())
    assert err < RTOL_MAX, err


EULER = {"parameterization": "euler_angles", "convention": "ZXY"}
ROT = torch.tensor([[0.1, -0.2, 0.15], [0.0, 0.05, -0.1]], dtype=torch.float64)
TRANS = torch.tensor([[3.0, 850.0, -5.0], [0.0, 860.0, 2.0]], dtype=torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_jacobian_matches_autograd(subject, backend):
    drr = _drr(subject, backend)
    rot, trans = (ROT, TRANS) if backend == "torch" else (ROT[:1], TRANS[:1])  # the interpreter is slow
    got = pose_jacobian(drr, rot, trans, **EULER)
    assert got.shape == (len(rot), 1, 8, 8, 6)
    _close(got, _autograd_jacobian(drr, rot, trans, **EULER))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reshape", [True, False])
def test_jacobian_subsampled(subject, backend, reshape):
    torch.manual_seed(0)
    drr = _drr(subject, backend, p_subsample=0.4, reshape=reshape)
    got = pose_jacobian(drr, ROT[:1], TRANS[:1], **EULER)
    want = _autograd_jacobian(drr, ROT[:1], TRANS[:1], **EULER)
    _close(got, want)
    if reshape:  # pixels that are not rendered have zero rows
        assert int((got.abs().sum(-1) > 0).sum()) == drr.n_subsample
    else:
        assert got.shape == (1, 1, drr.n_subsample, 6)


def test_jacobian_shared_rotation_broadcast_and_degrees(subject):
    drr = _drr(subject)
    rot = torch.tensor([[5.0, -3.0, 8.0]], dtype=torch.float64)  # one rotation for both poses, degrees
    options = dict(EULER, degrees=True)
    got = pose_jacobian(drr, rot, TRANS, **options)
    assert got.shape == (2, 1, 8, 8, 6)
    _close(got, _autograd_jacobian(drr, rot, TRANS, **options))


def test_jacobian_quaternion_and_patches(subject):
    drr = _drr(subject, patch_size=3)
    q = torch.tensor([[0.9, 0.1, -0.2, 0.3]], dtype=torch.float64)
    options = {"parameterization": "quaternion"}
    got = pose_jacobian(drr, q, TRANS[:1], **options)
    assert got.shape[-1] == 7
    _close(got, _autograd_jacobian(drr, q, TRANS[:1], **options))


def test_jacobian_label_channels(subject):
    drr = _drr(subject)
    got = pose_jacobian(drr, ROT[:1], TRANS[:1], mask_to_channels=True, **EULER)
    assert got.shape[1] > 1
    _close(got, _autograd_jacobian(drr, ROT[:1], TRANS[:1], mask_to_channels=True, **EULER))
    # Channels sum to the plain image, so their Jacobians sum to its Jacobian.
    plain = pose_jacobian(drr, ROT[:1], TRANS[:1], **EULER)
    torch.testing.assert_close(got.sum(1, keepdim=True), plain, rtol=1e-9, atol=1e-9)


def test_drr_jacobian_method_and_image(subject):
    drr = _drr(subject)
    img, jac = pose_jacobian(drr, ROT, TRANS, return_image=True, **EULER)
    torch.testing.assert_close(img, drr(ROT, TRANS, **EULER), rtol=0, atol=0)
    torch.testing.assert_close(drr.jacobian(ROT, TRANS, **EULER), jac, rtol=0, atol=0)


def test_jacobian_against_central_differences(subject):
    # An oracle independent of autograd: central differences of the rendered image (float64).
    drr = _drr(subject)
    jac = pose_jacobian(drr, ROT[:1], TRANS[:1], **EULER)[0, 0]  # [H, W, 6]
    params = torch.cat([ROT[:1], TRANS[:1]], -1)[0]
    for p, h in ((0, 1e-5), (2, 1e-5), (3, 1e-3), (4, 1e-3)):
        plus, minus = params.clone(), params.clone()
        plus[p] += h
        minus[p] -= h
        fd = (drr(plus[None, :3], plus[None, 3:], **EULER) - drr(minus[None, :3], minus[None, 3:], **EULER))[0, 0] / (
            2 * h
        )
        # Measured relative error 9e-11 .. 3e-9 (truncation h^2 and rounding / h).
        assert float((fd - jac[..., p]).abs().max() / jac[..., p].abs().max()) < 1e-6


def test_jacobian_rejects_a_bare_pose(subject):
    drr = _drr(subject)
    pose = td.convert(ROT[:1], TRANS[:1], **EULER)
    with pytest.raises(ValueError, match="parameterization"):
        pose_jacobian(drr, pose)


def test_jacobian_with_calibration(subject):
    drr = _drr(subject)
    calibration = drr.detector.calibration_matrix(torch.float64)
    calibration[0, 0] *= 1.1  # another pixel pitch and principal point than the detector's
    calibration[1, 3] = 7.0
    options = dict(EULER, calibration=calibration)
    got = pose_jacobian(drr, ROT[:1], TRANS[:1], **options)
    _close(got, _autograd_jacobian(drr, ROT[:1], TRANS[:1], **options))
    assert not torch.allclose(got, pose_jacobian(drr, ROT[:1], TRANS[:1], **EULER))
