"""tritondrr.detector.Detector as DiffDRR 0.6.1's module: rays against the closed form of
CONVENTIONS.md, DiffDRR's attribute values, state_dict, and parity with DiffDRR where importable."""

import numpy as np
import pytest
import torch

import tritondrr as td
from tritondrr import utils as tutils
from tritondrr.detector import Detector, reorientation
from tritondrr.pose import RigidTransform, convert

F64 = torch.float64


def random_pose(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    rot = 0.5 * torch.randn(batch, 3, generator=g, dtype=F64)
    xyz = torch.randn(batch, 3, generator=g, dtype=F64) * 20 + torch.tensor([0.0, 700.0, 0.0], dtype=F64)
    return convert(rot, xyz, parameterization="euler_angles", convention="ZXY")


def closed_form_targets(pose, reorient, sdd, H, W, delx, dely, x0, y0, reverse_x_axis):
    """(B, H*W, 3) world pixel centres, one pixel at a time from CONVENTIONS.md's formula."""
    out = torch.empty(len(pose), H * W, 3, dtype=F64)
    for b in range(len(pose)):
        M = pose.matrix[b].double() @ reorient.double()
        for i in range(H):
            for j in range(W):
                s = (W - 1) / 2 - j if reverse_x_axis else j - (W - 1) / 2
                t = (H - 1) / 2 - i
                p = torch.tensor([delx * s + x0, dely * t + y0, sdd, 1.0], dtype=F64)
                out[b, i * W + j] = (M @ p)[:3]
    return out


@pytest.mark.parametrize("reverse_x_axis", [True, False])
def test_forward_matches_the_closed_form(reverse_x_axis):
    H, W, sdd, delx, dely, x0, y0 = 5, 4, 900.0, 3.0, 2.5, 4.0, -6.0
    reorient = reorientation("AP")
    det = Detector(sdd, H, W, delx, dely, x0, y0, reorient, reverse_x_axis=reverse_x_axis).double()
    pose = random_pose()
    source, target = det(pose, None)
    assert source.shape == (2, 1, 3) and target.shape == (2, H * W, 3)
    torch.testing.assert_close(source[:, 0], pose.matrix[:, :3, 3])
    torch.testing.assert_close(
        target, closed_form_targets(pose, reorient, sdd, H, W, delx, dely, x0, y0, reverse_x_axis)
    )


def test_per_pose_calibration_and_subsampling():
    H, W = 6, 7
    reorient = reorientation("AP")
    det = Detector(1000.0, H, W, 2.0, 2.0, reorient=reorient, n_subsample=9).double()
    pose = random_pose(1)
    calib = torch.stack([torch.diag(torch.tensor([1.5, 2.5, 800.0, 1.0], dtype=F64)) for _ in range(2)])
    calib[1, 0, 3], calib[1, 1, 3] = 3.0, -2.0
    _, target = det(pose, RigidTransform(calib))
    assert target.shape == (2, 9, 3) and det.n_rays == 9
    ids = det.subsample_indices
    assert sorted(set(ids.tolist())) == sorted(ids.tolist()) and det.subsamples == [ids.tolist()]
    for b, (x0, y0) in enumerate([(0.0, 0.0), (3.0, -2.0)]):
        full = closed_form_targets(pose[b : b + 1], reorient, 800.0, H, W, 1.5, 2.5, x0, y0, True)
        torch.testing.assert_close(target[b], full[0, ids])
    # The whole detector, regardless of the subset.
    _, every = det.rays(pose, calib)
    assert every.shape == (2, H * W, 3)
    torch.testing.assert_close(every[:, ids], target)


@pytest.mark.parametrize("x0, y0", [(0.0, 0.0), (5.0, -3.0)])
def test_diffdrr_valued_attributes(x0, y0):
    H, W, sdd, delx, dely = 9, 12, 1020.0, 2.0, 3.0
    det = Detector(sdd, H, W, delx, dely, x0, y0, reorientation("PA"))
    assert (det.sdd, det.delx, det.dely, det.height, det.width) == (sdd, delx, dely, H, W)
    assert det.offsets == (x0, y0)
    assert (det.x0, det.y0) == (-x0, -y0)  # DiffDRR's properties: the negated offsets
    torch.testing.assert_close(
        det.intrinsic, torch.tensor([[sdd / delx, 0, W / 2 - x0 / delx], [0, sdd / dely, H / 2 - y0 / dely], [0, 0, 1]])
    )
    assert det.intrinsic.dtype == torch.float32 and det.double().intrinsic.dtype == F64
    calibration = torch.tensor([[delx, 0, 0, x0], [0, dely, 0, y0], [0, 0, sdd, 0], [0, 0, 0, 1.0]], dtype=F64)
    torch.testing.assert_close(det.calibration.matrix[0], calibration)
    torch.testing.assert_close(det.calibration_matrix(), calibration)
    det.double().calibration_matrix()[0, 0] = 99.0  # a copy, even in the buffer's dtype
    assert det.delx == delx
    torch.testing.assert_close(det.reorient.matrix[0], reorientation("PA"))
    # DiffDRR's family is consistent: parse(intrinsic) gives (sdd, detector.x0, detector.y0).
    assert tutils.parse_intrinsic_matrix(det.intrinsic, H, W, delx, dely) == pytest.approx(
        (sdd, det.x0, det.y0), abs=1e-4
    )


@pytest.mark.parametrize("reverse_x_axis", [True, False])
def test_diffdrr_intrinsic_projects_like_the_image_after_its_flip(reverse_x_axis):
    """DiffDRR's perspective projection: K @ p, divide by z, then v -> H - v (and u -> W - u with
    reverse_x_axis). With DiffDRR's K that lands every pixel centre on its own pixel."""
    H, W, delx, dely, x0, y0 = 7, 10, 1.5, 2.5, 4.0, -3.0
    det = Detector(500.0, H, W, delx, dely, x0, y0, reverse_x_axis=reverse_x_axis).double()
    cam = det.camera_targets(dtype=F64)[0]  # [H*W, 3]
    uvw = cam @ det.intrinsic.T
    u, v = uvw[:, 0] / uvw[:, 2], uvw[:, 1] / uvw[:, 2]
    v = H - v
    if reverse_x_axis:
        u = W - u
    rows, cols = torch.meshgrid(torch.arange(H, dtype=F64), torch.arange(W, dtype=F64), indexing="ij")
    torch.testing.assert_close(u, cols.reshape(-1) + 0.5)
    torch.testing.assert_close(v, rows.reshape(-1) + 0.5)
    torch.testing.assert_close(det.project(cam), torch.stack([u, v], -1))


def test_tritondrr_positional_form_and_reexports():
    det = Detector(500.0, 3, 4, 1.0, 1.0, 2.0, 1.0, False)  # (..., x0, y0, reverse_x_axis)
    assert det.reverse_x_axis is False and det.offsets == (2.0, 1.0)
    torch.testing.assert_close(det._reorient, torch.eye(4))
    assert det.n_pixels == 12 and det.pixel_offsets().shape == (12, 4)
    torch.testing.assert_close(det.unproject(det.project(det.camera_targets()[0])), det.camera_targets()[0])
    from tritondrr import detector

    for name in ("make_intrinsic_matrix", "parse_intrinsic_matrix", "get_focal_length", "get_principal_point"):
        assert getattr(detector, name) is getattr(tutils, name)
    assert not hasattr(det, "tile_order")


def test_state_dict_keys_and_subset_recovered_on_load():
    a = Detector(800.0, 6, 5, 2.0, 2.0, reorient=reorientation("AP"), n_subsample=7)
    assert list(a.state_dict()) == ["source", "target", "_reorient", "_calibration"]
    b = Detector(800.0, 6, 5, 2.0, 2.0, reorient=reorientation("AP"), n_subsample=7)
    b.draw_subsample_(torch.Generator().manual_seed(123))
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.subsample_indices, a.subsample_indices)
    pose = random_pose(2).to(torch.float32)
    torch.testing.assert_close(b(pose, None), a(pose, None))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="n_subsample must be at most height \\* width = 6, got 7"):
        Detector(800.0, 2, 3, 1.0, 1.0, n_subsample=7)
    with pytest.raises(TypeError, match="x0 must be a number"):
        Detector(800.0, 2, 3, 1.0, 1.0, x0="left")
    with pytest.raises(TypeError, match="height must be an int, got float"):
        Detector(800.0, 2.5, 3, 1.0, 1.0)
    det = Detector(800.0, np.int64(2), torch.tensor(3), np.float32(1.0), torch.tensor(1.0))  # as read from files
    assert (det.height, det.width, det.delx) == (2, 3, 1.0) and type(det.height) is int
    with pytest.raises(
        TypeError, match="calibration must be a RigidTransform or a \\(B, 4, 4\\) tensor, got \\(3, 3\\)"
    ):
        det(RigidTransform(torch.eye(4)), torch.eye(3))


# ------------------------------------------------------------------------------- DiffDRR parity


@pytest.mark.parametrize("x0, y0, reverse_x_axis", [(0.0, 0.0, True), (4.0, -2.5, True), (-3.0, 1.5, False)])
def test_parity_with_diffdrr_detector(x0, y0, reverse_x_axis):
    ddetector = pytest.importorskip("diffdrr.detector")
    dpose = pytest.importorskip("diffdrr.pose")
    H, W, sdd, delx, dely = 6, 5, 1020.0, 2.0, 3.0
    reorient = reorientation("AP").float()
    theirs = ddetector.Detector(sdd, H, W, delx, dely, x0, y0, reorient, reverse_x_axis=reverse_x_axis)
    ours = Detector(sdd, H, W, delx, dely, x0, y0, reorient, reverse_x_axis=reverse_x_axis)
    for name in ("sdd", "delx", "dely", "x0", "y0", "height", "width", "n_subsample", "reverse_x_axis"):
        assert getattr(ours, name) == getattr(theirs, name), name
    torch.testing.assert_close(ours.intrinsic, theirs.intrinsic)
    torch.testing.assert_close(ours.calibration.matrix, theirs.calibration.matrix)
    torch.testing.assert_close(ours.reorient.matrix, theirs.reorient.matrix)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
    matrix = random_pose(3).matrix.float()
    for calibration in (None, torch.diag(torch.tensor([1.0, 2.0, 700.0, 1.0]))[None]):
        ts, tt = theirs(
            dpose.RigidTransform(matrix), None if calibration is None else dpose.RigidTransform(calibration)
        )
        os_, ot = ours(RigidTransform(matrix), calibration)
        torch.testing.assert_close(os_, ts)
        torch.testing.assert_close(ot, tt, atol=1e-4, rtol=1e-6)  # float32 world mm (~1e3): rounding


def test_parity_with_diffdrr_subsampled_detector_state():
    ddetector = pytest.importorskip("diffdrr.detector")
    reorient = reorientation("AP").float()
    theirs = ddetector.Detector(900.0, 8, 7, 2.0, 2.0, 1.0, 2.0, reorient, n_subsample=20, reverse_x_axis=True)
    ours = Detector(900.0, 8, 7, 2.0, 2.0, 1.0, 2.0, reorient, n_subsample=20, reverse_x_axis=True)
    ours.load_state_dict(theirs.state_dict())
    assert ours.subsample_indices.tolist() == theirs.subsamples[-1]
    assert ours.subsamples[-1] == theirs.subsamples[-1]
    assert td.Detector is Detector
