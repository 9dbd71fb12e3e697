"""Labelmap channels in the Triton kernels (``op.raymarch(..., labels, n_channels, soft_labels)``, interpreted on CPU).

Oracles: a brute-force float64 evaluation of the sampling rule of docs/sampling.md written here
(explicit 8-corner interpolant from ``tests/oracles.py``, the channel of each point from
``torch.round`` of its coordinates), the PyTorch reference (``naive.raymarch``: ``grid_sample``
in nearest mode for hard labels, one plain pass per masked volume for soft labels), the plain
(C = 1) image the channels must sum to, finite differences, and the adjoint identity.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.oracles import trilinear
from tritondrr.renderers import RENDERERS, Sampling
from tritondrr.renderers.trilinear import naive as reference
from tritondrr.renderers.trilinear import op as ops

SHAPE = (9, 11, 13)
C = 5
N_SAMPLES = 17
INNER_BOX = ([1.5, 2.0, 3.25], [7.0, 9.5, 11.0])
SUPPORT_BOX = ([-1.0, -1.0, -1.0], [9.0, 11.0, 13.0])


def _problem(seed=0, dtype=torch.float64, batch=2, n=30):
    g = torch.Generator().manual_seed(seed)
    density = (0.5 + torch.rand(SHAPE, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, C, SHAPE, generator=g)
    source = (torch.randn(batch, 1, 3, generator=g, dtype=torch.float64) * 20 + 6).to(
        dtype
    )
    target = (torch.randn(batch, n, 3, generator=g, dtype=torch.float64) * 6 + 6).to(
        dtype
    )
    phase = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    phase[:2] = torch.tensor([0.0, 0.5])
    return density, labels, source, target, phase


def _run(fn, density, source, target, phase, box, grad_out, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in (density, source, target)]
    out = fn(*leaves, phase, *box, N_SAMPLES, **kwargs)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out)


def _rel(a, b):
    return float(
        (a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)
    )


@pytest.mark.parametrize("box", [INNER_BOX, SUPPORT_BOX], ids=["inner", "support"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_channels_match_reference_forward_and_gradients(soft, box):
    """Output, volume, source and target gradients against the reference, float64.

    Measured: <= 1.4e-15 (output), <= 1.6e-14 (gradients) relative to the largest value.
    """
    density, labels, source, target, phase = _problem()
    grad_out = torch.randn(
        2,
        C,
        target.shape[1],
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64,
    )
    kw = {"labels": labels, "n_channels": C, "soft_labels": soft}
    ours, our_grads = _run(
        ops.raymarch, density, source, target, phase, box, grad_out, **kw
    )
    ref, ref_grads = _run(
        reference.raymarch, density, source, target, phase, box, grad_out, **kw
    )
    assert ours.shape == (2, C, target.shape[1])
    assert _rel(ours, ref) <= 1e-13
    for name, a, b in zip(("density", "source", "target"), our_grads, ref_grads):
        assert torch.isfinite(a).all() and _rel(a, b) <= 1e-12, name
    # Every channel receives something, and the channels sum to the plain (C = 1) image.
    assert (ours.abs().sum(dim=(0, 2)) > 0).all()
    plain = reference.raymarch(density, source, target, phase, *box, N_SAMPLES)
    assert _rel(ours.sum(dim=1, keepdim=True), plain) <= 1e-13


def test_soft_channel_is_the_integral_of_the_masked_volume():
    """Soft channel c equals the plain kernel on density * (labels == c); labels outside [0, C) go nowhere."""
    density, labels, source, target, phase = _problem(seed=2)
    labels[0, :, :] = C + 3  # out of range: counted in no channel
    ours = ops.raymarch(
        density,
        source,
        target,
        phase,
        *INNER_BOX,
        N_SAMPLES,
        labels=labels,
        n_channels=C,
        soft_labels=True,
    )
    for c in range(C):
        masked = ops.raymarch(
            density * (labels == c), source, target, phase, *INNER_BOX, N_SAMPLES
        )
        assert _rel(ours[:, c : c + 1], masked) <= 1e-13


def _oracle_hard(density, labels, n_channels, source, target, phase, lo, hi, n_samples):
    """Brute-force hard-label channels of each ray, float64: docs/sampling.md's rule point by point.

    source, target (R, 3), phase (R,). Returns (C, R).
    """
    d = target - source
    dm = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t_lo = (torch.tensor(lo, dtype=torch.float64) - source) / dm
    t_hi = (torch.tensor(hi, dtype=torch.float64) - source) / dm
    t0 = torch.minimum(t_lo, t_hi).amax(dim=1).clamp(min=0.0)
    t1 = torch.maximum(t_lo, t_hi).amin(dim=1).clamp(max=1.0)
    length = (t1 - t0).clamp(min=0.0)
    h = length / n_samples
    k = torch.arange(n_samples, dtype=torch.float64)
    t = torch.cat(
        [
            t0[:, None] + (k[None] + phase[:, None]) * h[:, None],
            t0[:, None],
            (t0 + length)[:, None],
        ],
        dim=1,
    )
    weight = torch.cat(
        [
            torch.ones(len(phase), n_samples),
            (phase - 0.5)[:, None],
            (0.5 - phase)[:, None],
        ],
        dim=1,
    )
    points = source[:, None] + t[..., None] * d[:, None]  # [R, S + 2, 3]
    values = trilinear(density, points) * weight
    nearest = torch.round(points).long()  # round half to even
    inside = ((nearest >= 0) & (nearest < torch.tensor(density.shape))).all(dim=-1)
    nearest = torch.where(inside[..., None], nearest, 0)
    channel = torch.where(
        inside, labels[nearest[..., 0], nearest[..., 1], nearest[..., 2]], 0
    )
    out = torch.zeros(n_channels, len(phase), dtype=torch.float64)
    for c in range(n_channels):
        out[c] = torch.where(channel == c, values, 0.0).sum(dim=1) * h
    return out


def test_hard_labels_round_half_to_even_on_ties():
    """Rays along axis 0 at half-integer (j, k), samples at exact half-integers along i (S = 16, d_i = 8).

    Every tie is decided by round half to even, in the brute-force oracle, the reference and the
    kernels alike; labels vary along every axis so a wrong rounding moves a value to another
    channel. Sizes are powers of two so the reference's grid_sample normalisation is exact.
    """
    shape = (8, 8, 8)
    g = torch.Generator().manual_seed(4)
    density = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
    i, j, k = torch.meshgrid(*(torch.arange(8),) * 3, indexing="ij")
    labels = (i + 2 * j + 3 * k) % C  # differs between neighbours on every axis
    transverse = [
        (1.5, 2.5),
        (2.5, 3.5),
        (0.5, -0.5),
        (6.5, 7.5),
        (3.0, 4.5),
        (-0.5, 5.5),
    ]
    source = torch.tensor([[[-1.0, a, b] for a, b in transverse]], dtype=torch.float64)
    target = source + torch.tensor([8.0, 0.0, 0.0], dtype=torch.float64)
    phase = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0, 0.5], dtype=torch.float64)
    lo, hi = [-1.0, -1.0, -1.0], [7.0, 8.0, 8.0]
    oracle = _oracle_hard(density, labels, C, source[0], target[0], phase, lo, hi, 16)
    ours = ops.raymarch(
        density, source, target, phase, lo, hi, 16, labels=labels, n_channels=C
    )[0]
    ref = reference.raymarch(
        density, source, target, phase, lo, hi, 16, labels=labels, n_channels=C
    )[0]
    torch.testing.assert_close(ours, oracle, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(ref, oracle, rtol=1e-13, atol=1e-14)
    # Round half up (or away from zero) would give a different image: the test can fail.
    up = _oracle_hard(
        density,
        labels,
        C,
        source[0] + torch.tensor([0.0, 1e-9, 1e-9]),
        target[0] + torch.tensor([0.0, 1e-9, 1e-9]),
        phase,
        lo,
        hi,
        16,
    )
    assert (up - oracle).abs().max() > 1e-3


def test_hard_labels_match_brute_force_oracle_oblique_rays():
    density, labels, source, target, phase = _problem(seed=5)
    ours = ops.raymarch(
        density,
        source,
        target,
        phase,
        *INNER_BOX,
        N_SAMPLES,
        labels=labels,
        n_channels=C,
    )
    for b in range(2):
        oracle = _oracle_hard(
            density,
            labels,
            C,
            source[b].expand_as(target[b]),
            target[b],
            phase,
            *INNER_BOX,
            N_SAMPLES,
        )
        assert _rel(ours[b], oracle) <= 1e-13


def test_soft_labels_gradcheck_pose():
    """Soft channels are smooth in the pose: finite differences of the kernels themselves."""
    density, labels, source, target, phase = _problem(seed=6, batch=1, n=3)
    source.requires_grad_()
    target.requires_grad_()

    def fn(s, t):
        return ops.raymarch(
            density,
            s,
            t,
            phase,
            *INNER_BOX,
            12,
            labels=labels,
            n_channels=C,
            soft_labels=True,
        )

    assert torch.autograd.gradcheck(
        fn, (source, target), eps=1e-6, atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_adjoint_identity_with_channels(soft):
    """<A x, y> = <x, A^T y> with A the channel images as a linear map of the volume."""
    _, labels, source, target, phase = _problem(seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    y = torch.randn(2, C, target.shape[1], generator=g, dtype=torch.float64)
    xg = x.clone().requires_grad_()
    ax = ops.raymarch(
        xg,
        source,
        target,
        phase,
        *INNER_BOX,
        N_SAMPLES,
        labels=labels,
        n_channels=C,
        soft_labels=soft,
    )
    (aty,) = torch.autograd.grad(ax, xg, y)
    lhs, rhs = float((ax.detach() * y).sum()), float((x * aty).sum())
    assert math.isclose(lhs, rhs, rel_tol=1e-12), (lhs, rhs)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_float32_small_blocks_and_deterministic(soft):
    """float32 rays, tail masks (16-ray blocks, 16-sample blocks), deterministic volume gradient."""
    density, labels, source, target, phase = _problem(seed=9, dtype=torch.float32, n=37)
    grad_out = torch.randn(2, C, 37, generator=torch.Generator().manual_seed(2))
    ref, ref_grads = _run(
        reference.raymarch,
        density,
        source,
        target,
        phase,
        INNER_BOX,
        grad_out,
        labels=labels,
        n_channels=C,
        soft_labels=soft,
    )
    from tritondrr.kernels import trilinear as kernels

    kw = {
        "labels": labels,
        "n_channels": C,
        "soft_labels": soft,
        "block_r": 16,
        "block_s": 16,
    }
    out = kernels.raymarch_forward(
        density, source, target, phase, *INNER_BOX, N_SAMPLES, **kw
    )
    assert _rel(out, ref) <= 1e-5  # measured <= 7.5e-7
    for det in (False, True):
        grads = kernels.raymarch_backward(
            grad_out, density, source, target, phase, *INNER_BOX, N_SAMPLES, need_pose=True, need_volume=True,
            deterministic=det, **kw,
        )  # fmt: skip
        grad_src = grads[1]
        for a, b in zip((grads[0], grad_src, grads[2]), ref_grads):
            assert _rel(a, b) <= 1e-4  # measured <= 3.8e-6


def test_renderer_row_triton_matches_torch_and_falls_back_above_max_channels():
    density, labels, source, target, phase = _problem(seed=10)
    sampling = Sampling(phase, N_SAMPLES)
    for soft in (False, True):
        kw = {
            "box": INNER_BOX,
            "labels": labels,
            "n_channels": C,
            "soft_labels": soft,
            "sampling": sampling,
        }
        a = RENDERERS[("trilinear", "triton")](density, source, target, **kw)
        b = reference.raymarch(
            density,
            source,
            target,
            phase,
            *INNER_BOX,
            N_SAMPLES,
            labels=labels,
            n_channels=C,
            soft_labels=soft,
        )
        assert _rel(a, b) <= 1e-13
    many = ops.MAX_CHANNELS + 3
    wide = labels * 7  # labels up to 28 + ... within [0, many)
    kw = {
        "box": INNER_BOX,
        "labels": wide,
        "n_channels": many,
        "soft_labels": False,
        "sampling": sampling,
    }
    a = RENDERERS[("trilinear", "triton")](density, source, target, **kw)
    b = reference.raymarch(
        density,
        source,
        target,
        phase,
        *INNER_BOX,
        N_SAMPLES,
        labels=wide,
        n_channels=many,
    )
    assert a.shape == (2, many, target.shape[1]) and _rel(a, b) <= 1e-13


def test_label_validation_errors_name_the_argument():
    density, labels, source, target, phase = _problem()
    args = (density, source, target, phase, *INNER_BOX, 8)
    cases = [
        (
            TypeError,
            "labels must be an integer tensor",
            {"labels": labels.double(), "n_channels": C},
        ),
        (
            ValueError,
            "labels must have density's shape",
            {"labels": labels[:-1], "n_channels": C},
        ),
        (ValueError, "n_channels must be", {"labels": labels, "n_channels": 0}),
        (
            ValueError,
            "n_channels must be",
            {"labels": labels, "n_channels": ops.MAX_CHANNELS + 1},
        ),
        (
            TypeError,
            "soft_labels must be a bool",
            {"labels": labels, "n_channels": C, "soft_labels": 1},
        ),
    ]
    for exc, words, kw in cases:
        with pytest.raises(exc, match=words):
            ops.raymarch(*args, **kw)


def test_render_mask_triton_matches_torch():
    """``render(mask=...)`` through both backends (world rays, sheared affine), hard and soft, with gradients."""
    from tritondrr.render import render

    density, labels, source, target, _ = _problem(seed=11, dtype=torch.float32)
    affine = torch.tensor(
        [
            [1.2, 0.1, 0.0, -5.0],
            [0.0, 0.9, 0.2, 3.0],
            [0.1, 0.0, 1.1, 2.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    to_world = lambda p: p @ affine[:3, :3].T + affine[:3, 3]
    source, target = to_world(source), to_world(target)
    g = torch.randn(2, C, target.shape[1], generator=torch.Generator().manual_seed(3))
    for soft in (False, True):
        results = []
        for backend in ("triton", "torch"):
            leaves = [x.clone().requires_grad_() for x in (density, source, target)]
            out = render(
                leaves[0],
                affine,
                *leaves[1:],
                mask=labels,
                n_channels=C,
                soft_labels=soft,
                n_samples=24,
                backend=backend,
            )
            results.append((out.detach(), torch.autograd.grad(out, leaves, g)))
        (a, ga), (b, gb) = results
        assert a.shape == (2, C, target.shape[1])
        assert _rel(a, b) <= 1e-5  # float32; measured <= 7.2e-7
        for x, y in zip(ga, gb):
            assert _rel(x, y) <= 1e-4  # measured <= 2.5e-6
