"""The plain-PyTorch Siddon renderer against brute-force float64 oracles written here.

Oracles: (1) every plane crossing of the segment, sorted, and the nearest-neighbour field at each
sub-segment's midpoint (``floor(p + 1/2)``: the voxel ``[i - 1/2, i + 1/2)``, round half up);
(2) central finite differences for the source/target gradients; (3) the adjoint identity
<A x, y> = <x, A^T y> for the volume gradient. Volumes are odd-sized (7 x 5 x 6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tritondrr.renderers.siddon.naive import integrate

SHAPE = (7, 5, 6)


def oracle(vol, s, e, labels=None, n_channels=1):
    """Exact integral over t in [0, 1] by sorted crossings and midpoint lookups, float64. (C,)"""
    vol = np.asarray(vol, dtype=np.float64)
    s, e = np.asarray(s, dtype=np.float64), np.asarray(e, dtype=np.float64)
    out = np.zeros(n_channels)
    d = e - s
    if not d.any():
        return out  # zero-length ray: 0 by contract
    n = np.array(vol.shape)
    ts = [0.0, 1.0]
    for a in range(3):
        if d[a] != 0:
            t = (np.arange(-1, n[a]) + 0.5 - s[a]) / d[a]
            ts += list(t[(t > 0) & (t < 1)])
    ts = np.sort(np.array(ts))
    mids = (ts[:-1] + ts[1:]) / 2
    idx = np.floor(s[None] + mids[:, None] * d[None] + 0.5).astype(np.int64)
    for k in np.nonzero(((idx >= 0) & (idx < n)).all(axis=1))[0]:
        i, j, m = idx[k]
        out[0 if labels is None else labels[i, j, m]] += (ts[k + 1] - ts[k]) * vol[i, j, m]
    return out


def oracle_batch(vol, source, target, labels=None, n_channels=1):
    """(B, C, N) oracle for (B, 1|N, 3) sources and (B, N, 3) targets."""
    vol = vol.detach().double().numpy()
    lab = None if labels is None else labels.numpy()
    src = source.detach().double().expand(target.shape).numpy()
    tgt = target.detach().double().numpy()
    out = np.zeros((tgt.shape[0], n_channels, tgt.shape[1]))
    for b in range(tgt.shape[0]):
        for r in range(tgt.shape[1]):
            out[b, :, r] = oracle(vol, src[b, r], tgt[b, r], lab, n_channels)
    return torch.from_numpy(out)


def random_rays(gen, batch, n, shape=SHAPE, spread=6.0, dtype=torch.float64):
    """Rays between random points around the volume (most cross it, some miss, some start inside)."""
    centre = (torch.tensor(shape, dtype=dtype) - 1) / 2
    src = centre + (torch.rand(batch, n, 3, generator=gen, dtype=dtype) - 0.5) * 2 * spread
    tgt = centre + (torch.rand(batch, n, 3, generator=gen, dtype=dtype) - 0.5) * 2 * spread
    return src, tgt


def special_rays(shape=SHAPE, dtype=torch.float64):
    """Axis-parallel rays, rays in voxel faces, along edges, through corners, misses, zero length."""
    i, j, k = shape
    rays = [
        # axis-parallel through voxel centres and off-centre
        ((-3, 2, 3), (i + 2, 2, 3)),
        ((1.3, -2, 2.2), (1.3, j + 4, 2.2)),
        ((4.1, 3.7, k + 3), (4.1, 3.7, -5)),
        # in a face plane (x_1 = 1.5), on the grid's faces (x_0 = -0.5 and x_0 = I - 0.5)
        ((-2, 1.5, 2.2), (i + 1, 1.5, 3.9)),
        ((-0.5, -1, 1.2), (-0.5, j + 1, 4.4)),
        ((i - 0.5, -1, 1.2), (i - 0.5, j + 1, 4.4)),
        # along an edge (x_0 = 2.5, x_1 = 1.5) and through voxel corners (diagonals)
        ((2.5, 1.5, -3), (2.5, 1.5, k + 2)),
        ((-1.5, -1.5, -1.5), (5.5, 5.5, 5.5)),
        ((-2.5, 6.5, 0.5), (6.5, -2.5, 0.5)),
        ((-0.5, -0.5, -0.5), (i - 0.5, j - 0.5, k - 0.5)),
        # misses, zero length (inside and outside), source inside, both ends inside
        ((-5, -5, -5), (-5, 20, 20)),
        ((20, 2, 2), (30, 2, 2)),
        ((3, 2, 2), (3, 2, 2)),
        ((-9, 2, 2), (-9, 2, 2)),
        ((3.2, 2.1, 2.7), (15, -7, 9)),
        ((1.2, 0.3, 4.9), (5.1, 3.3, 0.4)),
        # grazing the grid's box on an edge
        ((-0.5, -0.5, -3), (-0.5, -0.5, k + 3)),
    ]
    src = torch.tensor([r[0] for r in rays], dtype=dtype)[None]
    tgt = torch.tensor([r[1] for r in rays], dtype=dtype)[None]
    return src, tgt


def _volume(gen, dtype=torch.float64, shape=SHAPE):
    return torch.rand(shape, generator=gen, dtype=dtype) + 0.5


@pytest.mark.parametrize("shared", [False, True], ids=["per-ray-source", "shared-source"])
def test_random_rays_match_sorted_crossings(shared):
    gen = torch.Generator().manual_seed(1)
    vol = _volume(gen)
    src, tgt = random_rays(gen, 2, 200)
    if shared:
        src = src[:, :1]
    out = integrate(vol, src, tgt)
    ref = oracle_batch(vol, src, tgt)
    assert out.shape == (2, 1, 200)
    assert (ref > 0).sum() > 150  # most rays cross the volume
    # Measured 2e-16 (float64 rounding).
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_special_rays_match_oracle():
    gen = torch.Generator().manual_seed(2)
    vol = _volume(gen)
    src, tgt = special_rays()
    out = integrate(vol, src, tgt)
    ref = oracle_batch(vol, src, tgt)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # Axis-parallel through the centres of row (:, 2, 3): the row sum / (I + 5) in units of t.
    torch.testing.assert_close(out[0, 0, 0], vol[:, 2, 3].sum() / (SHAPE[0] + 5), rtol=0, atol=1e-12)
    # The face x_0 = I - 0.5 lies outside the grid under round half up; x_0 = -0.5 is voxel 0.
    assert out[0, 0, 5] == 0 and out[0, 0, 4] > 0
    # Misses and zero-length rays give exactly 0.
    assert out[0, 0, 10] == 0 and out[0, 0, 11] == 0 and out[0, 0, 12] == 0 and out[0, 0, 13] == 0


def test_float32_rays_close_to_float64():
    gen = torch.Generator().manual_seed(3)
    vol = _volume(gen)
    src, tgt = random_rays(gen, 1, 300)
    ref = oracle_batch(vol, src, tgt)
    out = integrate(vol.float(), src.float(), tgt.float())
    assert out.dtype == torch.float32
    # Measured 6e-7 max abs error (values up to ~1.2).
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_long_rays_many_crossings_float32():
    # Source far away (as a C-arm's): t-accuracy is measured from the entry point.
    gen = torch.Generator().manual_seed(4)
    vol = _volume(gen, shape=(41, 37, 23))
    n = 64
    tgt = torch.rand(1, n, 3, generator=gen, dtype=torch.float64) * torch.tensor([40.0, 36.0, 22.0])
    tgt[..., 1] = -3.0
    src = torch.tensor([[[20.0, 900.0, 11.0]]], dtype=torch.float64)
    ref = oracle_batch(vol, src, tgt)
    out = integrate(vol.float(), src.float(), tgt.float())
    # Measured 3e-7 relative-to-max error.
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_box_only_skips_work():
    gen = torch.Generator().manual_seed(5)
    vol = torch.zeros(SHAPE, dtype=torch.float64)
    vol[2:5, 1:4, 1:5] = torch.rand(3, 3, 4, generator=gen, dtype=torch.float64)
    src, tgt = random_rays(gen, 1, 200)
    vf, vb = vol.clone().requires_grad_(True), vol.clone().requires_grad_(True)
    sf, sb = src.clone().requires_grad_(True), src.clone().requires_grad_(True)
    full = integrate(vf, sf, tgt)
    boxed = integrate(vb, sb, tgt, box=((1.5, 0.5, 0.5), (4.5, 3.5, 4.5)))
    torch.testing.assert_close(boxed, full, rtol=0, atol=1e-12)
    full.sum().backward()
    boxed.sum().backward()
    torch.testing.assert_close(sb.grad, sf.grad, rtol=0, atol=1e-12)
    # The box declares the field zero outside it: only voxels inside get a gradient.
    torch.testing.assert_close(vb.grad[2:5, 1:4, 1:5], vf.grad[2:5, 1:4, 1:5], rtol=0, atol=1e-12)
    # (up to crossings within rounding of a box face: measured 1e-17)
    assert vb.grad[:2].abs().max() < 1e-14 and vf.grad[:2].abs().max() > 0.1


def _general_rays(gen, n):
    """Random rays that cross the volume in general position, with both ends outside or inside."""
    src, tgt = random_rays(gen, 1, n)
    keep = oracle_batch(torch.ones(SHAPE, dtype=torch.float64), src, tgt)[0, 0] > 0.05
    return src[:, keep], tgt[:, keep]


def _finite_difference(fn, x, h=1e-6):
    grad = torch.zeros_like(x)
    flat = x.view(-1)
    for idx in range(flat.numel()):
        old = flat[idx].item()
        flat[idx] = old + h
        up = fn(x).sum()
        flat[idx] = old - h
        down = fn(x).sum()
        flat[idx] = old
        grad.view(-1)[idx] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("inside", [False, True], ids=["outside", "source-inside"])
def test_pose_gradients_match_finite_differences(inside):
    gen = torch.Generator().manual_seed(6)
    vol = _volume(gen)
    src, tgt = _general_rays(gen, 40)
    if inside:
        src = src.clone()
        src[..., :] = torch.tensor([3.1, 2.2, 2.6], dtype=torch.float64)
    w = torch.rand(1, 1, src.shape[1], generator=gen, dtype=torch.float64)
    s = src.clone().requires_grad_(True)
    e = tgt.clone().requires_grad_(True)
    (integrate(vol, s, e) * w).sum().backward()
    with torch.no_grad():
        fd_s = _finite_difference(lambda x: integrate(vol, x, tgt) * w, src.clone())
        fd_e = _finite_difference(lambda x: integrate(vol, src, x) * w, tgt.clone())
    assert s.grad.abs().max() > 1e-3
    # Measured 3e-10 (central differences, h = 1e-6, piecewise-rational function).
    torch.testing.assert_close(s.grad, fd_s, rtol=0, atol=1e-6)
    torch.testing.assert_close(e.grad, fd_e, rtol=0, atol=1e-6)


def test_shared_source_gradient_is_the_sum():
    gen = torch.Generator().manual_seed(7)
    vol = _volume(gen)
    _, tgt = _general_rays(gen, 30)
    src = torch.tensor([[[3.0, -9.0, 2.4]]], dtype=torch.float64, requires_grad=True)
    integrate(vol, src, tgt).sum().backward()
    with torch.no_grad():
        fd = _finite_difference(lambda x: integrate(vol, x, tgt), src.detach().clone())
    torch.testing.assert_close(src.grad, fd, rtol=0, atol=1e-6)


def test_volume_gradient_is_the_adjoint():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    src, tgt = random_rays(gen, 2, 100)
    src = torch.cat([src, special_rays()[0].expand(2, -1, -1)], dim=1)
    tgt = torch.cat([tgt, special_rays()[1].expand(2, -1, -1)], dim=1)
    y = torch.randn(2, 1, src.shape[1], generator=gen, dtype=torch.float64)
    vol = x.clone().requires_grad_(True)
    (integrate(vol, src, tgt) * y).sum().backward()
    lhs = (oracle_batch(x, src, tgt) * y).sum()
    rhs = (x * vol.grad).sum()
    # Measured 1e-15 relative.
    torch.testing.assert_close(rhs, lhs, rtol=1e-12, atol=1e-12)
    # Each ray's gradient is its crossing lengths: a one-hot volume picks one voxel's length.
    one = torch.zeros(SHAPE, dtype=torch.float64)
    one[3, 2, 3] = 1.0
    v1 = torch.zeros(SHAPE, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(2, 1, src.shape[1], dtype=torch.float64)
    w[1, 0, 7] = 1.0
    (integrate(v1, src, tgt) * w).sum().backward()
    torch.testing.assert_close(v1.grad[3, 2, 3], oracle_batch(one, src, tgt)[1, 0, 7], rtol=0, atol=1e-12)


def test_zero_length_and_missing_rays_have_finite_zero_gradients():
    gen = torch.Generator().manual_seed(9)
    vol = _volume(gen).requires_grad_(True)
    src, tgt = special_rays()
    s = src[:, 10:14].clone().requires_grad_(True)
    e = tgt[:, 10:14].clone().requires_grad_(True)
    out = integrate(vol, s, e)
    assert (out == 0).all()
    out.sum().backward()
    for g in (s.grad, e.grad, vol.grad):
        assert torch.isfinite(g).all() and (g == 0).all()


def test_special_rays_gradients_finite():
    gen = torch.Generator().manual_seed(10)
    vol = _volume(gen).requires_grad_(True)
    src, tgt = special_rays()
    s, e = src.clone().requires_grad_(True), tgt.clone().requires_grad_(True)
    integrate(vol, s, e).sum().backward()
    for g in (s.grad, e.grad, vol.grad):
        assert torch.isfinite(g).all()
    # The parallel ray through centres: its volume gradient is 1/(I + 5) on the row it crosses.
    vol.grad = None
    w = torch.zeros(1, 1, src.shape[1], dtype=torch.float64)
    w[0, 0, 0] = 1
    (integrate(vol, src, tgt) * w).sum().backward()
    expect = torch.zeros(SHAPE, dtype=torch.float64)
    expect[:, 2, 3] = 1.0 / (SHAPE[0] + 5)
    torch.testing.assert_close(vol.grad, expect, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_label_channels(dtype):
    gen = torch.Generator().manual_seed(11)
    vol = _volume(gen)
    labels = torch.randint(0, 4, SHAPE, generator=gen)
    src, tgt = random_rays(gen, 2, 80)
    src = torch.cat([src, special_rays()[0].expand(2, -1, -1)], dim=1)
    tgt = torch.cat([tgt, special_rays()[1].expand(2, -1, -1)], dim=1)
    v, s, e = vol.to(dtype), src.to(dtype), tgt.to(dtype)
    out = integrate(v, s, e, labels=labels, n_channels=4)
    soft = integrate(v, s, e, labels=labels, n_channels=4, soft_labels=True)
    plain = integrate(v, s, e)
    ref = oracle_batch(vol, src, tgt, labels, 4)
    tol = 1e-12 if dtype == torch.float64 else 2e-5  # fp32: measured 5e-7
    assert out.shape == (2, 4, src.shape[1])
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol)
    torch.testing.assert_close(soft, out, rtol=0, atol=0)
    torch.testing.assert_close(out.sum(dim=1, keepdim=True), plain, rtol=0, atol=tol)


def test_label_gradients():
    gen = torch.Generator().manual_seed(12)
    vol = _volume(gen)
    labels = torch.randint(0, 3, SHAPE, generator=gen)
    src, tgt = _general_rays(gen, 25)
    w = torch.rand(1, 3, src.shape[1], generator=gen, dtype=torch.float64)
    v = vol.clone().requires_grad_(True)
    s = src.clone().requires_grad_(True)
    e = tgt.clone().requires_grad_(True)
    (integrate(v, s, e, labels=labels, n_channels=3) * w).sum().backward()
    with torch.no_grad():
        fd_s = _finite_difference(lambda x: integrate(vol, x, tgt, labels=labels, n_channels=3) * w, src.clone())
        fd_e = _finite_difference(lambda x: integrate(vol, src, x, labels=labels, n_channels=3) * w, tgt.clone())
    torch.testing.assert_close(s.grad, fd_s, rtol=0, atol=1e-6)
    torch.testing.assert_close(e.grad, fd_e, rtol=0, atol=1e-6)
    # Adjoint: <A x, w> = <x, A^T w> with A the labelled forward.
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    lhs = (oracle_batch(x, src, tgt, labels, 3) * w).sum()
    torch.testing.assert_close((x * v.grad).sum(), lhs, rtol=1e-12, atol=1e-12)


def test_half_volumes_upcast():
    gen = torch.Generator().manual_seed(13)
    vol = _volume(gen, dtype=torch.float32)
    src, tgt = random_rays(gen, 1, 50, dtype=torch.float32)
    for half in (torch.float16, torch.bfloat16):
        out = integrate(vol.to(half), src, tgt)
        ref = integrate(vol.to(half).float(), src, tgt)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_errors_name_the_argument():
    vol = torch.ones(SHAPE)
    src, tgt = torch.zeros(1, 1, 3), torch.ones(1, 4, 3)
    with pytest.raises(ValueError, match="density"):
        integrate(vol[0], src, tgt)
    with pytest.raises(ValueError, match="source"):
        integrate(vol, torch.zeros(1, 2, 3), tgt)
    with pytest.raises(TypeError, match="float32 or float64"):
        integrate(vol, src.half(), tgt.half())
    with pytest.raises(ValueError, match="labels"):
        integrate(vol, src, tgt, labels=torch.zeros(3, 3, 3, dtype=torch.int64), n_channels=2)
    with pytest.raises(ValueError, match="n_channels"):
        integrate(vol, src, tgt, n_channels=2)


def test_chunks_and_plane_slabs(monkeypatch):
    # 16 rays per chunk and 4 planes per slab: many chunks, partial slabs, forward and backward.
    import tritondrr.renderers.siddon.naive as naive

    gen = torch.Generator().manual_seed(14)
    vol = _volume(gen)
    labels = torch.randint(0, 3, SHAPE, generator=gen)
    src, tgt = random_rays(gen, 2, 45)
    w = torch.rand(2, 3, 45, generator=gen, dtype=torch.float64)

    def run():
        v = vol.clone().requires_grad_(True)
        s = src.clone().requires_grad_(True)
        out = integrate(v, s, tgt, labels=labels, n_channels=3)
        (out * w).sum().backward()
        return out.detach(), v.grad, s.grad

    whole = run()
    monkeypatch.setattr(naive, "CHUNK_RAYS", 16)
    monkeypatch.setattr(naive, "CHUNK_ELEMENTS", 64)
    chunked = run()
    torch.testing.assert_close(chunked[0], oracle_batch(vol, src, tgt, labels, 3), rtol=0, atol=1e-12)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
