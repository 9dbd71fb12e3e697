"""The Triton Siddon kernels (under TRITON_INTERPRET=1 on CPU) against the naive reference and the oracle.

Every output and gradient (volume, source, target; labels on and off) is compared with
``tritondrr.renderers.siddon.naive`` in float64 and float32, for random rays and the special rays
(axis-parallel, in faces, along edges, through corners, misses, zero length, sources inside),
with a small-block launch for the tail masks and B > 1 with shared (B, 1, 3) and per-ray
(B, N, 3) sources. The forward is also checked against the brute-force oracle of
``test_siddon_naive.py`` and the pose gradient against finite differences, independently of
the naive path.
"""

from __future__ import annotations

import pytest
import torch
from test_siddon_naive import SHAPE, _general_rays, oracle_batch, random_rays, special_rays

from tritondrr.renderers.siddon import naive

op = pytest.importorskip("tritondrr.renderers.siddon.op", reason="Triton is not installed")
from tritondrr.kernels import siddon as kernels  # noqa: E402

# Max abs error against the naive path: fp64 measured 6e-16, fp32 measured 3.6e-7 (values ~1).
TOL = {torch.float64: 1e-12, torch.float32: 5e-6}


def _rays(gen, batch, n, dtype, shared):
    src, tgt = random_rays(gen, batch, n, dtype=dtype)
    ss, st = special_rays(dtype=dtype)
    src = torch.cat([src, ss.expand(batch, -1, -1)], dim=1)
    tgt = torch.cat([tgt, st.expand(batch, -1, -1)], dim=1)
    if shared:
        # Sources outside, inside and on a face of the volume, shared by each pose's rays.
        src = torch.tensor([[[-6.0, 2.2, 2.7]], [[3.1, 2.2, 2.6]], [[2.5, -7.0, -0.5]]], dtype=dtype)[:batch]
    return src, tgt


def _run(mod, vol, src, tgt, w, **kw):
    v = vol.clone().requires_grad_(True)
    s = src.clone().requires_grad_(True)
    e = tgt.clone().requires_grad_(True)
    out = mod.integrate(v, s, e, **kw)
    (out * w).sum().backward()
    return out.detach(), v.grad, s.grad, e.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-ray-source", "shared-source"])
@pytest.mark.parametrize("channels", [1, 3], ids=["plain", "labels"])
def test_triton_matches_naive(dtype, shared, channels):
    gen = torch.Generator().manual_seed(20)
    vol = (torch.rand(SHAPE, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    src, tgt = _rays(gen, 3, 60, dtype, shared)
    kw = {} if channels == 1 else {"labels": torch.randint(0, channels, SHAPE, generator=gen), "n_channels": channels}
    w = torch.rand(3, channels, tgt.shape[1], generator=gen, dtype=dtype)
    got = _run(op, vol, src, tgt, w, **kw)
    ref = _run(naive, vol, src, tgt, w, **kw)
    assert got[0].shape == (3, channels, tgt.shape[1])
    assert got[2].shape == src.shape
    for name, a, b in zip(("out", "volume", "source", "target"), got, ref):
        assert a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=0, atol=TOL[dtype] * max(1.0, b.abs().max().item()), msg=name)


def test_triton_forward_matches_oracle_and_poisoned_output():
    gen = torch.Generator().manual_seed(21)
    vol = torch.rand(SHAPE, generator=gen, dtype=torch.float64) + 0.5
    labels = torch.randint(0, 3, SHAPE, generator=gen)
    src, tgt = _rays(gen, 2, 50, torch.float64, False)
    out = torch.full((2, 1, tgt.shape[1]), float("nan"), dtype=torch.float64)
    kernels.siddon_forward(vol, src, tgt, out=out)
    torch.testing.assert_close(out, oracle_batch(vol, src, tgt), rtol=0, atol=1e-12)
    out3 = torch.full((2, 3, tgt.shape[1]), float("nan"), dtype=torch.float64)
    kernels.siddon_forward(vol, src, tgt, labels, 3, out=out3)
    torch.testing.assert_close(out3, oracle_batch(vol, src, tgt, labels, 3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("channels", [1, 3], ids=["plain", "labels"])
def test_small_blocks_tail_masks(channels):
    # 37 rays in blocks of 16, planes in chunks of 2: partial ray blocks and plane chunks.
    gen = torch.Generator().manual_seed(22)
    vol = torch.rand(SHAPE, generator=gen, dtype=torch.float64) + 0.5
    labels = torch.randint(0, channels, SHAPE, generator=gen)
    src, tgt = random_rays(gen, 2, 37)
    out = torch.full((2, channels, 37), float("nan"), dtype=torch.float64)
    kernels.siddon_forward(vol, src, tgt, labels, channels, out=out, block_r=16, block_s=2)
    ref = naive.integrate(vol, src, tgt, labels=labels if channels > 1 else None, n_channels=channels)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    w = torch.rand(2, channels, 37, generator=gen, dtype=torch.float64)
    got = kernels.siddon_backward(
        w, vol, src, tgt, labels, channels, need_pose=True, need_volume=True, block_r=16, block_s=2
    )
    v = vol.clone().requires_grad_(True)
    s = src.clone().requires_grad_(True)
    e = tgt.clone().requires_grad_(True)
    (naive.integrate(v, s, e, labels=labels if channels > 1 else None, n_channels=channels) * w).sum().backward()
    for a, b in zip(got, (v.grad, s.grad, e.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _per_ray_difference(fn, x, h=1e-6):
    """Central differences of fn (B, 1, N) with respect to x (B, N, 3), every ray at once (rays are
    independent: moving coordinate k of all rays moves each ray's own output only)."""
    grad = torch.zeros_like(x)
    for k in range(3):
        step = torch.zeros_like(x)
        step[..., k] = h
        grad[..., k] = (fn(x + step) - fn(x - step))[:, 0] / (2 * h)
    return grad


def test_triton_pose_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(23)
    vol = torch.rand(SHAPE, generator=gen, dtype=torch.float64) + 0.5
    src, tgt = _general_rays(gen, 20)
    s = src.clone().requires_grad_(True)
    e = tgt.clone().requires_grad_(True)
    op.integrate(vol, s, e).sum().backward()
    with torch.no_grad():
        fd_s = _per_ray_difference(lambda x: op.integrate(vol, x, tgt), src)
        fd_e = _per_ray_difference(lambda x: op.integrate(vol, src, x), tgt)
    # Measured 3e-10 (central differences, h = 1e-6).
    torch.testing.assert_close(s.grad, fd_s, rtol=0, atol=1e-6)
    torch.testing.assert_close(e.grad, fd_e, rtol=0, atol=1e-6)


def test_backward_computes_only_what_is_asked():
    gen = torch.Generator().manual_seed(24)
    vol = torch.rand(SHAPE, generator=gen, dtype=torch.float64) + 0.5
    src, tgt = random_rays(gen, 1, 30)
    w = torch.rand(1, 1, 30, generator=gen, dtype=torch.float64)
    gv, gs, _ = kernels.siddon_backward(w, vol, src, tgt, need_pose=True, need_volume=False)
    assert gv is None and gs is not None
    gv2, gs2, ge2 = kernels.siddon_backward(w, vol, src, tgt, need_pose=False, need_volume=True)
    assert gs2 is None and ge2 is None and gv2 is not None
    gv3, gs3, _ = kernels.siddon_backward(w, vol, src, tgt, need_pose=True, need_volume=True)
    torch.testing.assert_close(gv2, gv3, rtol=0, atol=1e-15)
    torch.testing.assert_close(gs, gs3, rtol=0, atol=0)
    # Through autograd: a volume without requires_grad gets no gradient, the pose does.
    s = src.clone().requires_grad_(True)
    op.integrate(vol, s, tgt).sum().backward()
    assert s.grad is not None and vol.grad is None


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_volumes(half):
    gen = torch.Generator().manual_seed(25)
    vol = (torch.rand(SHAPE, generator=gen) + 0.5).to(half)
    src, tgt = random_rays(gen, 1, 40, dtype=torch.float32)
    w = torch.rand(1, 1, 40, generator=gen)
    got = _run(op, vol, src, tgt, w)
    ref = _run(naive, vol.float(), src, tgt, w)
    assert got[1].dtype == half
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=5e-6)
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=5e-5)
    torch.testing.assert_close(got[1].float(), ref[1], rtol=1e-2, atol=1e-3)  # rounded to the half dtype


def test_box_only_skips_work():
    gen = torch.Generator().manual_seed(26)
    vol = torch.zeros(SHAPE, dtype=torch.float64)
    vol[2:5, 1:4, 1:5] = torch.rand(3, 3, 4, generator=gen, dtype=torch.float64)
    src, tgt = random_rays(gen, 1, 60)
    w = torch.rand(1, 1, 60, generator=gen, dtype=torch.float64)
    full = _run(op, vol, src, tgt, w)
    boxed = _run(op, vol, src, tgt, w, box=((1.5, 0.5, 0.5), (4.5, 3.5, 4.5)))
    for name, a, b in zip(("out", "volume", "source", "target"), full, boxed):
        if name == "volume":
            # The box declares the field zero outside it: voxels there get no gradient (up to
            # crossings within rounding of a box face: measured 1e-17).
            assert b[:2].abs().max() < 1e-14 and b[5:].abs().max() < 1e-14 and b[2:5, 1:4, 1:5].abs().max() > 0.1
            a, b = a[2:5, 1:4, 1:5], b[2:5, 1:4, 1:5]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


def test_int64_offsets_give_the_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(27)
    vol = torch.rand(SHAPE, generator=gen, dtype=torch.float64) + 0.5
    labels = torch.randint(0, 3, SHAPE, generator=gen)
    src, tgt = _rays(gen, 2, 20, torch.float64, False)
    w = torch.rand(2, 3, tgt.shape[1], generator=gen, dtype=torch.float64)
    kw = {"labels": labels, "n_channels": 3}
    int32 = _run(op, vol, src, tgt, w, **kw)
    monkeypatch.setattr(kernels, "needs_int64", lambda *args: True)
    int64 = _run(op, vol, src, tgt, w, **kw)
    for a, b in zip(int32, int64):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_int64_switch():
    assert not kernels.needs_int64((256, 256, 133), 3 * 40000)
    assert kernels.needs_int64((2048, 1024, 1024), 3)
    assert kernels.needs_int64((8, 8, 8), 2**31)


def test_errors_name_the_argument():
    vol = torch.ones(SHAPE)
    src, tgt = torch.zeros(1, 1, 3), torch.ones(1, 4, 3)
    with pytest.raises(ValueError, match="density"):
        op.integrate(vol[0], src, tgt)
    with pytest.raises(ValueError, match="source"):
        op.integrate(vol, torch.zeros(1, 2, 3), tgt)
    with pytest.raises(TypeError, match="float32 or float64"):
        op.integrate(vol, src.half(), tgt.half())
    with pytest.raises(ValueError, match="n_channels"):
        op.integrate(vol, src, tgt, n_channels=0)
    with pytest.raises(ValueError, match="labels"):
        op.integrate(vol, src, tgt, labels=torch.zeros(3, 3, 3, dtype=torch.int64), n_channels=2)
    with pytest.raises(TypeError, match="box"):
        op.integrate(vol, src, tgt, box=("a", "b"))
