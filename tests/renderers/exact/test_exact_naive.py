"""The exact renderer's PyTorch reference against independent oracles.

Oracles: ``tests/oracles.py::exact_line_integrals`` (sorted crossings + Simpson, no tritondrr
code), a dense-sampling float64 midpoint rule written here (also for the label channels), closed
forms for constant volumes, float64 finite differences and gradcheck for the pose, and the
adjoint identity for the volume gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tritondrr.renderers.exact import naive

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from oracles import exact_line_integrals, trilinear

SHAPE = (7, 5, 6)


def _volume(seed=0, shape=SHAPE, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype) + 0.1


def _rays(n, seed=1, shape=SHAPE, batch=1, dtype=torch.float64, margin=3.0):
    """Random segments with both ends in the support box grown by ``margin`` voxels: (B, N, 3) each."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor(shape, dtype=dtype)
    lo, hi = -1.0 - margin, size + margin
    src = lo + (hi - lo) * torch.rand(batch, n, 3, generator=g, dtype=dtype)
    tgt = lo + (hi - lo) * torch.rand(batch, n, 3, generator=g, dtype=dtype)
    return src, tgt


def _oracle(density, src, tgt):
    """exact_line_integrals (world mm, identity affine) divided by the length: (N,) per t."""
    eye = torch.eye(4, dtype=torch.float64)
    s, e = src.reshape(-1, 3).double(), tgt.reshape(-1, 3).double()
    length = (e - s).norm(dim=-1)
    return exact_line_integrals(density, eye, s, e) / length


def _dense(density, src, tgt, n=20000, labels=None, n_channels=1, soft=False):
    """Midpoint rule with n samples per ray in float64, with label channels: (N, C)."""
    density = density.double()
    s, e = src.reshape(-1, 3).double(), tgt.reshape(-1, 3).double()
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # [n]
    out = torch.zeros(s.shape[0], n_channels, dtype=torch.float64)
    shape = torch.tensor(density.shape)
    for r in range(s.shape[0]):
        p = s[r] + u[:, None] * (e[r] - s[r])  # [n, 3]
        if labels is None:
            out[r, 0] = trilinear(density, p).mean()
        elif not soft:  # the nearest voxel's label; channel 0 outside the grid
            vox = torch.round(p).long()
            inside = ((vox >= 0) & (vox < shape)).all(dim=-1)
            vox = torch.where(inside[:, None], vox, 0)
            lab = torch.where(inside, labels[vox[:, 0], vox[:, 1], vox[:, 2]], 0)
            out[r].index_add_(0, lab, trilinear(density, p) / n)
        else:  # each corner's weight to its own label
            base = torch.floor(p).long()
            frac = p - base
            for corner in range(8):
                off = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
                idx = base + off
                inside = ((idx >= 0) & (idx < shape)).all(dim=-1)
                idx = torch.where(inside[:, None], idx, 0)
                weight = torch.where(off.bool(), frac, 1 - frac).prod(dim=-1)
                value = torch.where(inside, weight * density[idx[:, 0], idx[:, 1], idx[:, 2]], 0.0)
                lab = torch.where(inside, labels[idx[:, 0], idx[:, 1], idx[:, 2]], 0)
                out[r].index_add_(0, lab, value / n)
    return out


def test_matches_exact_oracle_on_random_rays():
    density = _volume()
    src, tgt = _rays(64)
    got = naive.integrate(density, src, tgt)[0, 0]
    want = _oracle(density, src, tgt)
    assert want.abs().max() > 0.5  # the rays do hit
    # Measured 4e-16: both are exact up to rounding.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * float(want.abs().max()))


def test_matches_dense_sampling():
    density = _volume(3)
    src, tgt = _rays(6, seed=4)
    got = naive.integrate(density, src, tgt)[0, 0]
    want = _dense(density, src, tgt, n=20000)[:, 0]
    # Midpoint rule with 20000 samples: measured error 8e-9 of the max.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7 * float(want.abs().max()))


@pytest.mark.parametrize(
    "name, s, e",
    [
        ("axis-parallel on voxel-centre lines", (-4.0, 2.0, 3.0), (11.0, 2.0, 3.0)),
        ("axis-parallel on half-integer planes", (3.5, -3.0, 2.5), (3.5, 9.0, 2.5)),
        ("diagonal through voxel centres (cell corners)", (-2.0, -2.0, -2.0), (8.0, 8.0, 8.0)),
        ("through cell edges", (-2.0, 1.0, -2.0), (8.0, 1.0, 8.0)),
        ("source inside the volume", (3.2, 2.1, 2.7), (12.0, -4.0, 9.0)),
        ("both ends inside", (1.3, 0.2, 4.9), (5.1, 3.7, 0.4)),
        ("starting on the support face", (-1.0, 2.0, 2.0), (7.0, 2.5, 3.0)),
    ],
)
def test_special_rays_match_oracle(name, s, e):
    density = _volume(5)
    src = torch.tensor([[s]], dtype=torch.float64)
    tgt = torch.tensor([[e]], dtype=torch.float64)
    got = naive.integrate(density, src, tgt)[0, 0]
    want = _oracle(density, src, tgt)
    assert float(want.abs().max()) > 0.05, name
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_constant_volume_closed_form():
    # All-ones grid: along an interior voxel-centre line the field is 1 on [0, I - 1] and ramps
    # to 0 over one voxel at each end, so the integral is I voxels (t-units: I / |d|).
    density = torch.ones(SHAPE, dtype=torch.float64)
    src = torch.tensor([[[-5.0, 2.0, 3.0], [1.0, -7.0, 4.0]]], dtype=torch.float64)
    tgt = torch.tensor([[[15.0, 2.0, 3.0], [1.0, 13.0, 4.0]]], dtype=torch.float64)
    got = naive.integrate(density, src, tgt)[0, 0]
    want = torch.tensor([SHAPE[0] / 20.0, SHAPE[1] / 20.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


def test_missing_and_zero_length_rays_give_zero_with_finite_gradients():
    density = _volume().requires_grad_()
    src = torch.tensor([[[-5.0, -5.0, -5.0], [3.0, 2.0, 2.0], [-3.0, 2.0, 2.0], [3.0, 2.0, 2.0]]], dtype=torch.float64)
    tgt = torch.tensor([[[-5.0, 9.0, -5.0], [3.0, 2.0, 2.0], [-2.0, 2.0, 2.0], [3.0, 2.0, 2.0 + 1e-13]]])
    tgt = tgt.double()
    src.requires_grad_()
    tgt.requires_grad_()
    out = naive.integrate(density, src, tgt)
    assert torch.equal(out, torch.zeros_like(out))  # miss, zero length, ends before the support, ~zero length
    gd, gs, gt = torch.autograd.grad(out.sum(), [density, src, tgt])
    for g in (gd, gs, gt):
        assert torch.isfinite(g).all()
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("mode", ["plain", "hard", "soft"])
def test_pose_gradient_matches_finite_differences(mode):
    density = _volume(7)
    src, tgt = _rays(12, seed=8, margin=1.0)
    kw = {}
    if mode != "plain":
        kw = {"labels": torch.randint(0, 3, SHAPE, generator=torch.Generator().manual_seed(9)), "n_channels": 3}
        kw["soft_labels"] = mode == "soft"
    weight = torch.linspace(-1.0, 2.0, 3 * 12 if mode != "plain" else 12, dtype=torch.float64)

    def loss(s, e):
        return (naive.integrate(density, s, e, **kw).reshape(-1) * weight).sum()

    s, e = src.clone().requires_grad_(), tgt.clone().requires_grad_()
    gs, ge = torch.autograd.grad(loss(s, e), [s, e])
    eps = 1e-6
    for which, base, grad in (("source", src, gs), ("target", tgt, ge)):
        fd = torch.zeros_like(base)
        for n in range(base.shape[1]):
            for a in range(3):
                plus, minus = base.clone(), base.clone()
                plus[0, n, a] += eps
                minus[0, n, a] -= eps
                if which == "source":
                    fd[0, n, a] = (loss(plus, tgt) - loss(minus, tgt)) / (2 * eps)
                else:
                    fd[0, n, a] = (loss(src, plus) - loss(src, minus)) / (2 * eps)
        # Central differences in float64: measured 2e-10 to 6e-10 of the max; bound 1e-6.
        err = float((grad - fd).abs().max() / fd.abs().max())
        print(f"{mode} {which}: finite-difference error {err:.1e} of the max")
        assert err < 1e-6, (mode, which, err)


def test_gradcheck():
    density = _volume(11, shape=(4, 3, 5)).requires_grad_()
    src, tgt = _rays(3, seed=12, shape=(4, 3, 5), margin=1.0)
    src.requires_grad_()
    tgt.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, s, e: naive.integrate(v, s, e), (density, src, tgt), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["plain", "hard", "soft"])
def test_volume_gradient_is_the_adjoint(mode):
    x = _volume(13) - 0.5
    src, tgt = _rays(20, seed=14)
    kw = {}
    if mode != "plain":
        kw = {"labels": torch.randint(0, 4, SHAPE, generator=torch.Generator().manual_seed(15)), "n_channels": 4}
        kw["soft_labels"] = mode == "soft"
    y = torch.randn(
        naive.integrate(x, src, tgt, **kw).shape, generator=torch.Generator().manual_seed(16), dtype=torch.float64
    )
    probe = torch.zeros_like(x, requires_grad=True)
    (adjoint,) = torch.autograd.grad((naive.integrate(probe, src, tgt, **kw) * y).sum(), probe)
    lhs = (naive.integrate(x, src, tgt, **kw) * y).sum()
    rhs = (x * adjoint).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)
    assert adjoint.abs().max() > 0


@pytest.mark.parametrize("soft", [False, True])
def test_label_channels_sum_to_plain_and_match_dense_sampling(soft):
    density = _volume(17)
    labels = torch.randint(0, 3, SHAPE, generator=torch.Generator().manual_seed(18))
    src, tgt = _rays(5, seed=19, margin=0.5)
    got = naive.integrate(density, src, tgt, labels=labels, n_channels=3, soft_labels=soft)  # [1, 3, N]
    plain = naive.integrate(density, src, tgt)
    torch.testing.assert_close(got.sum(dim=1), plain[:, 0], rtol=1e-13, atol=1e-15)
    want = _dense(density, src, tgt, n=40000, labels=labels, n_channels=3, soft=soft).T  # [3, N]
    assert (want > 0.05).sum() >= 6  # several channels carry signal
    # Hard labels jump at half-integer planes: the midpoint rule's error is O(1/n) there
    # (measured 1.6e-5 of the max with n = 40000); soft channels are continuous (measured 1.2e-9).
    tol = 5e-5 if not soft else 1e-7
    torch.testing.assert_close(got[0], want, rtol=0, atol=tol * float(want.abs().max()))


def test_hard_labels_round_half_to_even_on_half_planes():
    # A ray lying in the plane i = 2.5: torch.round sends it to voxel i = 2 (half to even).
    density = torch.ones(SHAPE, dtype=torch.float64)
    labels = torch.zeros(SHAPE, dtype=torch.long)
    labels[2] = 1
    labels[3] = 2
    src = torch.tensor([[[2.5, -3.0, 2.0]]], dtype=torch.float64)
    tgt = torch.tensor([[[2.5, 9.0, 2.0]]], dtype=torch.float64)
    got = naive.integrate(density, src, tgt, labels=labels, n_channels=3)[0, :, 0]
    total = SHAPE[1] / 12.0  # closed form as in test_constant_volume_closed_form
    # Points with j in [-0.5, J - 0.5) are inside the grid: label 1; the tails lie outside: channel 0.
    inside = SHAPE[1] / 12.0 - 2 * (0.5 * 0.5 * 0.5) / 12.0  # the outer half-voxels carry ramps 1/2 -> 0
    torch.testing.assert_close(got, torch.tensor([total - inside, inside, 0.0], dtype=torch.float64))


def test_batch_shared_and_per_ray_sources_and_float32():
    density = _volume(21)
    src, tgt = _rays(9, seed=22, batch=2)
    shared = src[:, :1]
    a = naive.integrate(density, shared, tgt)
    b = naive.integrate(density, shared.expand(2, 9, 3).contiguous(), tgt)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    c = naive.integrate(density.float(), src.float(), tgt.float())
    d = naive.integrate(density, src, tgt)
    assert c.dtype == torch.float32
    # float32 against float64: measured 1.4e-7 of the max.
    torch.testing.assert_close(c.double(), d, rtol=0, atol=3e-6 * float(d.abs().max()))
    e = naive.integrate(density.half(), src.float(), tgt.float())  # fp16 volume upcast
    torch.testing.assert_close(e.double(), naive.integrate(density.half().double(), src, tgt), rtol=0, atol=1e-5)


def test_box_and_chunking_do_not_change_the_result():
    density = torch.zeros(9, 8, 7, dtype=torch.float64)
    density[2:6, 3:5, 1:6] = _volume(23, shape=(4, 2, 5))
    src, tgt = _rays(30, seed=24, shape=(9, 8, 7))
    plain = naive.integrate(density, src, tgt)
    boxed = naive.integrate(density, src, tgt, box=((1.0, 2.0, 0.0), (6.0, 5.0, 6.0)))
    chunked = naive.integrate(density, src, tgt, chunk_elements=64)
    torch.testing.assert_close(boxed, plain, rtol=0, atol=1e-14)
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-15)


def test_uses_no_sort_or_nonzero(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the exact reference must not sort or call nonzero (MPS-safe, no host-size ops)")

    for name in ("sort", "argsort", "nonzero", "unique", "msort"):
        monkeypatch.setattr(torch, name, forbidden)
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    density = _volume().requires_grad_()
    src, tgt = _rays(8)
    labels = torch.randint(0, 2, SHAPE)
    for kw in ({}, {"labels": labels, "n_channels": 2}, {"labels": labels, "n_channels": 2, "soft_labels": True}):
        naive.integrate(density, src, tgt, **kw).sum().backward()


def test_errors_name_the_argument():
    density = _volume()
    src, tgt = _rays(4)
    with pytest.raises(ValueError, match="density"):
        naive.integrate(density[0], src, tgt)
    with pytest.raises(ValueError, match="source"):
        naive.integrate(density, src[:, :2], tgt)
    with pytest.raises(TypeError, match="source and target"):
        naive.integrate(density, src.float(), tgt)
    with pytest.raises(ValueError, match="labels"):
        naive.integrate(density, src, tgt, labels=torch.zeros(3, 3, 3, dtype=torch.long), n_channels=2)
    with pytest.raises(ValueError, match="n_channels"):
        naive.integrate(density, src, tgt, labels=torch.zeros(SHAPE, dtype=torch.long), n_channels=0)
