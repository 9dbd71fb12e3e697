"""The exact renderer's Triton kernels (under TRITON_INTERPRET=1 on CPU) against the naive reference.

Every output and gradient is compared with ``tritondrr.renderers.exact.naive`` (whose own oracles
are in ``test_exact_naive.py``), in float64 and float32, for plain rays, hard and soft label
channels, shared (B, 1, 3) and per-ray (B, N, 3) sources, a small-block tail, fp16/bf16 volume
loads and the int64-offset specialisation. The kernels' hand-written backward is also checked
on its own: float64 finite differences, gradcheck and the adjoint identity.
"""

from __future__ import annotations

import pytest
import torch

from tritondrr.kernels import exact as kernels
from tritondrr.renderers.exact import naive, op

SHAPE = (7, 5, 6)
MODES = {
    "plain": {},
    "hard": {"n_channels": 3},
    "soft": {"n_channels": 3, "soft_labels": True},
}


def _volume(seed=0, shape=SHAPE, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype) + 0.1


def _labels(seed=1, shape=SHAPE, n=3):
    return torch.randint(0, n, shape, generator=torch.Generator().manual_seed(seed))


def _rays(n, seed=2, batch=1, dtype=torch.float64, margin=1.5):
    """Random segments around the volume plus special ones: (B, N + 6, 3) each."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor(SHAPE, dtype=dtype)
    lo, hi = -1.0 - margin, size + margin
    src = lo + (hi - lo) * torch.rand(batch, n, 3, generator=g, dtype=dtype)
    tgt = lo + (hi - lo) * torch.rand(batch, n, 3, generator=g, dtype=dtype)
    special_src = torch.tensor(
        [
            [-4.0, 2.0, 3.0],  # axis-parallel on a voxel-centre line
            [2.5, -3.0, 2.5],  # axis-parallel on half-integer planes
            [-2.0, -2.0, -2.0],  # diagonal through voxel centres
            [3.2, 2.1, 2.7],  # source inside
            [-5.0, -5.0, -5.0],  # misses
            [3.0, 2.0, 2.0],  # zero length
        ],
        dtype=dtype,
    )
    special_tgt = torch.tensor(
        [[11.0, 2.0, 3.0], [2.5, 9.0, 2.5], [8.0, 8.0, 8.0], [12.0, -4.0, 9.0], [-5.0, 9.0, -5.0], [3.0, 2.0, 2.0]],
        dtype=dtype,
    )
    src = torch.cat([src, special_src.expand(batch, -1, -1)], dim=1)
    tgt = torch.cat([tgt, special_tgt.expand(batch, -1, -1)], dim=1)
    return src, tgt


def _kwargs(mode):
    kw = dict(MODES[mode])
    if mode != "plain":
        kw["labels"] = _labels()
    return kw


def _unkinked(weight, n_random, mode):
    """Zero the weights of the special rays whose pose derivative is one-sided (kinks).

    The rays lying in voxel-centre or half-integer planes sit on kinks (or, for hard labels, on
    label jumps) of the field across the ray; with hard labels, the diagonal crosses three
    half-integer planes at once (the split order depends on the perturbation). There the side of
    the derivative depends on rounding: their outputs are compared, their gradients weighted out.
    """
    weight[..., n_random : n_random + 2] = 0.0
    if mode == "hard":
        weight[..., n_random + 2] = 0.0
    return weight


def _tol(dtype, scale):
    # float64: measured <= 5e-16 of the max; float32 (kernel vs reference, different summation
    # order and grid_sample's normalised coordinates): measured <= 2e-6 of the max.
    return {"rtol": 0, "atol": (1e-12 if dtype == torch.float64 else 2e-5) * max(float(scale), 1e-30)}


def _grads(fn, density, src, tgt, kw, weight):
    v = density.clone().requires_grad_()
    s = src.clone().requires_grad_()
    e = tgt.clone().requires_grad_()
    out = fn(v, s, e, **kw)
    gv, gs, ge = torch.autograd.grad((out * weight).sum(), [v, s, e])
    return out.detach(), gv, gs, ge


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shared", [True, False], ids=["shared-source", "per-ray-source"])
def test_outputs_and_gradients_match_naive(dtype, mode, shared):
    density = _volume(dtype=dtype)
    src, tgt = _rays(20, batch=2, dtype=dtype)
    if shared:
        src = src[:, :1].clone()
    kw = _kwargs(mode)
    channels = kw.get("n_channels", 1)
    weight = torch.linspace(-1.0, 2.0, 2 * channels * tgt.shape[1], dtype=dtype).reshape(2, channels, -1)
    weight = _unkinked(weight, 20, mode)
    want = _grads(naive.integrate, density, src, tgt, kw, weight)
    got = _grads(op.integrate, density, src, tgt, kw, weight)
    for name, g, w in zip(("output", "density", "source", "target"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert w.abs().max() > 0, name
        torch.testing.assert_close(g, w, **_tol(dtype, w.abs().max()), msg=name)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_output_is_written_and_the_tail_block_is_masked(mode):
    # 37 rays in blocks of 16: a partial last block; a NaN-poisoned buffer catches unwritten outputs.
    density = _volume(3)
    src, tgt = _rays(31, seed=4)
    kw = _kwargs(mode)
    channels = kw.get("n_channels", 1)
    label_mode = {"plain": 0, "hard": 1, "soft": 2}[mode]
    out = torch.full((1, channels, tgt.shape[1]), float("nan"), dtype=torch.float64)
    lo, hi = [-1.0] * 3, [float(n) for n in SHAPE]
    kernels.exact_forward(density, kw.get("labels"), src, tgt, lo, hi, channels, label_mode, out=out, block_r=16)
    want = naive.integrate(density, src, tgt, **kw)
    torch.testing.assert_close(out, want, **_tol(torch.float64, want.abs().max()))
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grad_out = _unkinked(grad_out, 31, mode)
    gv, gs, ge = kernels.exact_backward(
        grad_out, density, kw.get("labels"), src, tgt, lo, hi, channels, label_mode,
        need_pose=True, need_volume=True, block_r=16,
    )  # fmt: skip
    v, s, e = density.clone().requires_grad_(), src.clone().requires_grad_(), tgt.clone().requires_grad_()
    wv, ws, we = torch.autograd.grad((naive.integrate(v, s, e, **kw) * grad_out).sum(), [v, s, e])
    for g, w in ((gv, wv), (gs, ws), (ge, we)):
        torch.testing.assert_close(g, w, **_tol(torch.float64, w.abs().max()))


@pytest.mark.parametrize("vdtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_volumes_are_loaded_and_upcast(vdtype):
    density = _volume(6).to(vdtype)
    src, tgt = _rays(12, seed=7, dtype=torch.float32)
    v = density.clone().requires_grad_()
    got = op.integrate(v, src, tgt)
    want = naive.integrate(density.float(), src, tgt)
    torch.testing.assert_close(got, want, **_tol(torch.float32, want.abs().max()))
    (gv,) = torch.autograd.grad(got.sum(), v)
    assert gv.dtype == vdtype
    vf = density.float().requires_grad_()
    (wv,) = torch.autograd.grad(naive.integrate(vf, src, tgt).sum(), vf)
    # The gradient is rounded to the volume's dtype: fp16 / bf16 resolution.
    torch.testing.assert_close(gv.float(), wv, rtol=1e-2, atol=1e-2 * float(wv.abs().max()))


def test_int64_offsets_specialisation(monkeypatch):
    monkeypatch.setattr(kernels, "needs_int64", lambda *args: True)
    density = _volume(8)
    src, tgt = _rays(10, seed=9)
    kw = _kwargs("hard")
    weight = _unkinked(torch.linspace(-1.0, 2.0, 3 * tgt.shape[1], dtype=torch.float64).reshape(1, 3, -1), 10, "hard")
    want = _grads(naive.integrate, density, src, tgt, kw, weight)
    got = _grads(op.integrate, density, src, tgt, kw, weight)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **_tol(torch.float64, w.abs().max()))


@pytest.mark.parametrize("mode", ["plain", "hard"])
def test_kernel_pose_gradient_matches_finite_differences(mode):
    density = _volume(10)
    src, tgt = _rays(2, seed=11, margin=0.5)
    src, tgt = src[:, :2], tgt[:, :2]  # random rays only (the special ones sit on kinks)
    kw = _kwargs(mode)
    weight = torch.linspace(-1.0, 2.0, kw.get("n_channels", 1) * 2, dtype=torch.float64)

    def loss(s, e):
        return (op.integrate(density, s, e, **kw).reshape(-1) * weight).sum()

    s, e = src.clone().requires_grad_(), tgt.clone().requires_grad_()
    gs, ge = torch.autograd.grad(loss(s, e), [s, e])
    eps = 1e-6
    for which, grad in (("source", gs), ("target", ge)):
        fd = torch.zeros_like(grad)
        for n in range(2):
            for a in range(3):
                step = torch.zeros_like(src)
                step[0, n, a] = eps
                if which == "source":
                    fd[0, n, a] = (loss(src + step, tgt) - loss(src - step, tgt)) / (2 * eps)
                else:
                    fd[0, n, a] = (loss(src, tgt + step) - loss(src, tgt - step)) / (2 * eps)
        err = float((grad - fd).abs().max() / fd.abs().max())
        # Central differences in float64: measured 2e-10 to 6e-10 of the max (reference); bound 1e-6.
        assert err < 1e-6, (mode, which, err)


def test_kernel_gradcheck_and_adjoint():
    # gradcheck for the pose (the volume's Jacobian is checked by the adjoint identity below).
    shape = (4, 3, 5)
    density = _volume(12, shape=shape)
    g = torch.Generator().manual_seed(13)
    src = -1.5 + 7.0 * torch.rand(1, 2, 3, generator=g, dtype=torch.float64)
    tgt = -1.5 + 7.0 * torch.rand(1, 2, 3, generator=g, dtype=torch.float64)
    src.requires_grad_()
    tgt.requires_grad_()
    assert torch.autograd.gradcheck(lambda s, e: op.integrate(density, s, e), (src, tgt), eps=1e-6, atol=1e-7)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    y = torch.randn(1, 1, 2, dtype=torch.float64, generator=g)
    probe = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    (adjoint,) = torch.autograd.grad((op.integrate(probe, src.detach(), tgt.detach()) * y).sum(), probe)
    lhs = (op.integrate(x, src.detach(), tgt.detach()) * y).sum()
    torch.testing.assert_close(lhs, (x * adjoint).sum(), rtol=1e-12, atol=0)


def test_missing_and_zero_length_rays_are_zero_with_finite_gradients():
    density = _volume(14).requires_grad_()
    src = torch.tensor([[[-5.0, -5.0, -5.0], [3.0, 2.0, 2.0], [-3.0, 2.0, 2.0]]], dtype=torch.float64)
    tgt = torch.tensor([[[-5.0, 9.0, -5.0], [3.0, 2.0, 2.0], [-2.0, 2.0, 2.0]]], dtype=torch.float64)
    src.requires_grad_()
    tgt.requires_grad_()
    for kw in ({}, _kwargs("hard"), _kwargs("soft")):
        out = op.integrate(density, src, tgt, **kw)
        assert torch.equal(out, torch.zeros_like(out))
        grads = torch.autograd.grad(out.sum(), [density, src, tgt])
        for grad in grads:
            assert torch.equal(grad, torch.zeros_like(grad))


def test_pose_only_backward_skips_the_volume():
    density = _volume(15)
    src, tgt = _rays(5, seed=16)
    lo, hi = [-1.0] * 3, [float(n) for n in SHAPE]
    grad_out = torch.ones(1, 1, tgt.shape[1], dtype=torch.float64)
    gv, gs, ge = kernels.exact_backward(grad_out, density, None, src, tgt, lo, hi, need_pose=True, need_volume=False)
    assert gv is None and gs.shape == src.shape and ge.shape == tgt.shape
    gv, gs, ge = kernels.exact_backward(grad_out, density, None, src, tgt, lo, hi, need_pose=False, need_volume=True)
    assert gs is None and ge is None and gv.shape == density.shape
    s = src.clone().requires_grad_()
    (g,) = torch.autograd.grad(op.integrate(density, s, tgt).sum(), s)  # density needs no gradient
    assert torch.isfinite(g).all()


def test_box_does_not_change_the_result():
    density = torch.zeros(SHAPE, dtype=torch.float64)
    density[2:5, 1:4, 2:5] = _volume(17, shape=(3, 3, 3))
    src, tgt = _rays(16, seed=18)
    plain = op.integrate(density, src, tgt)
    boxed = op.integrate(density, src, tgt, box=((1.0, 0.0, 1.0), (5.0, 4.0, 5.0)))
    torch.testing.assert_close(boxed, plain, rtol=0, atol=1e-14)
