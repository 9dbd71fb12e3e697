"""`tritondrr.legacy`: early DiffDRR's "How to use" flow (volume + spacing, spherical C-arm).

Oracles: early DiffDRR's C-arm written out in float64 here (source sdr e1 + b, pixels on the
antipodal plane along e2/e3), the exact line integrals of tests/oracles.py, and central finite
differences of the rendered loss for the parameters' gradients.
"""

import math

import numpy as np
import pytest
import torch

from tests.oracles import exact_line_integrals
from tritondrr.legacy import DRR, load_example_ct

F64 = torch.float64
SHAPE = (12, 12, 7)


def rot(axis, a):
    c, s = math.cos(a), math.sin(a)
    return {
        "x": torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=F64),
        "y": torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=F64),
        "z": torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=F64),
    }[axis]


def early_carm(sdr, theta, phi, gamma, b, H, W, delx, dely):
    """Early DiffDRR's source and pixel centres (H*W, 3), from its documented construction."""
    E = rot("z", theta) @ rot("y", phi) @ rot("x", gamma)
    e1, e2, e3 = E[:, 0], E[:, 1], E[:, 2]
    b = torch.tensor(b, dtype=F64)
    i = torch.arange(H, dtype=F64)[:, None, None] - (H - 1) / 2
    j = torch.arange(W, dtype=F64)[None, :, None] - (W - 1) / 2
    pixels = -sdr * e1 + b + i * delx * e2 + j * dely * e3
    return sdr * e1 + b, pixels.reshape(-1, 3)


@pytest.fixture(scope="module")
def ct():
    return load_example_ct(shape=SHAPE)


def test_load_example_ct_returns_volume_and_spacing(ct):
    volume, spacing = ct
    assert isinstance(volume, np.ndarray) and volume.shape == SHAPE and volume.dtype == np.float32
    np.testing.assert_allclose(spacing, [360 / 12, 360 / 12, 332.5 / 7])
    assert volume.min() == pytest.approx(-1000.0) and volume.max() > 300  # air and bone, in HU


@pytest.mark.parametrize("angles", [(math.pi, 0.0, math.pi / 2), (0.3, -0.4, 1.1)])
def test_rays_are_early_diffdrrs_carm(ct, angles):
    volume, spacing = ct
    H, W, delx, dely = 5, 7, 4.0, 3.0
    drr = DRR(volume, spacing, height=H, width=W, delx=delx, dely=dely, dtype=F64)
    b = (180.0, 170.0, 160.0)
    source, target = drr.rays(300.0, *angles, *b)
    src, pix = early_carm(300.0, *angles, b, H, W, delx, dely)
    torch.testing.assert_close(source[0, 0], src, atol=1e-9, rtol=0)
    torch.testing.assert_close(target[0], pix, atol=1e-9, rtol=0)


def test_how_to_use_flow_runs_and_matches_exact_integrals(ct):
    volume, spacing = ct
    bx, by, bz = torch.tensor(volume.shape) * torch.tensor(spacing) / 2
    kwargs = {"sdr": 300.0, "theta": torch.pi, "phi": 0, "gamma": torch.pi / 2, "bx": bx, "by": by, "bz": bz}
    drr = DRR(volume, spacing, height=9, delx=30.0).to("cpu")
    img = drr.project(**kwargs)  # the page's call, default sampling
    assert img.shape == (1, 1, 9, 9) and img.dtype == torch.float32 and torch.isfinite(img).all()
    fine = DRR(volume, spacing, height=9, delx=30.0, step=5.0)
    source, target = fine.rays(**kwargs)
    exact = exact_line_integrals(fine.density, fine.affine.double(), source[0].double(), target[0].double())
    # 5 mm steps on 30 mm voxels: measured max error 0.042% of the max (2.2% at the default
    # one-voxel step on this coarse 12 x 12 x 7 grid)
    got = fine.project(**kwargs)
    torch.testing.assert_close(got.double().reshape(-1), exact.reshape(-1), atol=2e-3 * float(exact.max()), rtol=0)
    assert float(got[0, 0, 4, 4]) > 0.25 * float(got.max())  # the central ray crosses the body

    params = torch.tensor([[300.0, math.pi, 0.0, math.pi / 2, float(bx), float(by), float(bz)]])
    drr = DRR(volume, spacing, height=9, delx=30.0, params=params)
    out = drr()
    torch.testing.assert_close(out, img)
    out.mean().backward()
    for p in (drr.sdr, drr.rotations, drr.translations):
        assert isinstance(p, torch.nn.Parameter) and p.grad is not None and torch.isfinite(p.grad).all()
    assert drr.translations.grad.abs().sum() > 0 and drr.rotations.grad.abs().sum() > 0
    assert drr.params.shape == (1, 7)


def test_parameter_gradients_match_finite_differences():
    # A smooth blob (sigma 3 voxels), integrated as given: the image is smooth in the parameters
    # up to the trilinear field's kinks, which central differences with small steps barely see.
    n, spacing = 14, (10.0, 11.0, 12.0)
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=F64),) * 3, indexing="ij"), -1)
    volume = torch.exp(-((grid - 6.5) ** 2).sum(-1) / (2 * 3.0**2))
    params = torch.tensor(
        [[200.0, 3.0, 0.2, 1.4, 70.0, 80.0, 85.0], [220.0, 2.8, -0.1, 1.7, 75.0, 78.0, 80.0]], dtype=F64
    )
    drr = DRR(volume, spacing, height=6, width=5, delx=25.0, params=params, density=None, dtype=F64,
              backend="torch", step=1.0)
    weights = torch.rand(2, 1, 6, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    (drr() * weights).sum().backward()
    grads = torch.cat([drr.sdr.grad, drr.rotations.grad, drr.translations.grad], -1)

    def loss(q):
        with torch.no_grad():
            return float((drr(q[:, 0:1], q[:, 1:4], q[:, 4:7]) * weights).sum())

    for k, h in enumerate((0.05, 1e-4, 1e-4, 1e-4, 0.05, 0.05, 0.05)):
        for b in (0, 1):
            plus, minus = params.clone(), params.clone()
            plus[b, k] += h
            minus[b, k] -= h
            fd = (loss(plus) - loss(minus)) / (2 * h)
            # measured: agreement to about 1e-4 relative on this blob
            assert float(grads[b, k]) == pytest.approx(fd, rel=1e-2, abs=1e-3 * float(grads.abs().max())), (b, k)


def test_subsample_and_reshape(ct):
    volume, spacing = ct
    torch.manual_seed(0)
    full = DRR(volume, spacing, height=6, delx=40.0)
    sparse = DRR(volume, spacing, height=6, delx=40.0, p_subsample=0.25)
    flat = DRR(volume, spacing, height=6, delx=40.0, p_subsample=0.25, reshape=False)
    c = (300.0, math.pi, 0.0, math.pi / 2, 180.0, 180.0, 166.0)
    a, s = full.project(*c), sparse.project(*c)
    picked = sparse.subsamples
    assert len(picked) == 9 and s.shape == (1, 1, 6, 6)
    torch.testing.assert_close(s.reshape(-1)[picked], a.reshape(-1)[picked])
    others = torch.ones(36, dtype=torch.bool)
    others[picked] = False
    assert s.reshape(-1)[others].abs().max() == 0
    assert flat.project(*c).shape == (1, 1, 9)


def test_errors_name_the_argument(ct):
    volume, spacing = ct
    with pytest.raises(ValueError, match="params must be \\(batch, 7\\)"):
        DRR(volume, spacing, height=4, delx=1.0, params=torch.zeros(1, 6))
    with pytest.raises(TypeError, match="params="):
        DRR(volume, spacing, height=4, delx=1.0)()
    with pytest.raises(ValueError, match="spacing must be"):
        DRR(volume, (1.0, 2.0), height=4, delx=1.0)
    with pytest.raises(ValueError, match="p_subsample"):
        DRR(volume, spacing, height=4, delx=1.0, p_subsample=0.0)
