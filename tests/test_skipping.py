"""Empty-space skipping (tritondrr.occupancy): never clears a non-zero field, changes no result.

Oracles: the field sampled densely in float64 along each segment (the skipping test must never
clear a segment where it is non-zero), and every renderer on both backends without skipping
(results and pose gradients must agree to float64 rounding). Groups that claim the whole volume
is empty show that each path consults them (it then renders 0).
"""

import pytest
import torch
import torch.nn.functional as F

from tritondrr import DRR, Subject
from tritondrr.occupancy import (
    BRICK,
    Bricks,
    brick_groups,
    may_be_nonzero,
    occupied_interval,
)
from tritondrr.render import render
from tritondrr.volume import Volume, occupied_box

BACKENDS = ("torch", "triton")
RENDERERS = ("trilinear", "siddon", "exact")


def sparse_volume(shape=(41, 35, 27), seed=0, dtype=torch.float64):
    """Two blocks with empty space between them and around them, and a few lone voxels."""
    g = torch.Generator().manual_seed(seed)
    v = torch.zeros(shape, dtype=dtype)
    v[4:13, 6:20, 3:11] = torch.rand(9, 14, 8, generator=g, dtype=dtype) + 0.5
    v[26:36, 18:30, 15:24] = torch.rand(10, 12, 9, generator=g, dtype=dtype)
    for i, j, k in ((20, 3, 25), (38, 33, 2), (0, 0, 0), (17, 27, 13)):
        v[i, j, k] = 1.0
    return v


def field(v, points, mode="bilinear"):
    """The zero-extended trilinear (or nearest) field of ``v`` at index points (..., 3), float64."""
    shape = torch.tensor(v.shape[::-1], dtype=v.dtype)
    grid = (points.flip(-1) * 2 + 1) / shape - 1
    flat = grid.reshape(1, -1, 1, 1, 3)
    out = F.grid_sample(v[None, None], flat, mode=mode, padding_mode="zeros", align_corners=False)
    return out.reshape(points.shape[:-1])


def lying(bricks: Bricks) -> Bricks:
    """Bricks that claim the whole volume is empty."""
    return Bricks(torch.zeros_like(bricks.occupied), torch.zeros_like(bricks.groups), 0.0)


def oblique_affine(dtype=torch.float64):
    affine = torch.eye(4, dtype=dtype)
    affine[:3, :3] = torch.tensor([[1.1, 0.1, 0.0], [0.0, 0.9, 0.15], [0.05, 0.0, 1.6]], dtype=dtype)
    affine[:3, 3] = torch.tensor([-20.0, -15.0, -20.0], dtype=dtype)
    return affine


def fan(n=40, seed=1, dtype=torch.float64):
    """A shared source and ``n`` targets around the volume's centre (world mm), 2 poses."""
    g = torch.Generator().manual_seed(seed)
    centre = oblique_affine(dtype)[:3, :3] @ torch.tensor([20.0, 17.0, 13.0], dtype=dtype) + oblique_affine(dtype)[:3, 3]
    source = torch.stack([centre + torch.tensor([3.0, 80.0, 6.0], dtype=dtype), centre + torch.tensor([70.0, 5.0, -20.0], dtype=dtype)])
    target = (2 * centre - source)[:, None, :] + 18.0 * torch.randn(2, n, 3, generator=g, dtype=dtype)
    return source[:, None, :], target


def test_the_test_never_clears_a_segment_where_the_field_is_not_zero():
    v = sparse_volume()
    groups = brick_groups(v).groups
    g = torch.Generator().manual_seed(2)
    p = torch.rand(6000, 3, generator=g, dtype=torch.float64) * torch.tensor([45.0, 39.0, 31.0]) - 2
    q = p + (torch.rand(6000, 3, generator=g, dtype=torch.float64) * 2 - 1) * (BRICK - 1)
    cleared = ~may_be_nonzero(groups, p, q)
    t = torch.linspace(0, 1, 257, dtype=torch.float64)
    points = p[:, None] + t[None, :, None] * (q - p)[:, None]
    for mode in ("bilinear", "nearest"):
        f = field(v, points, mode)
        assert not bool(((f != 0).any(dim=1) & cleared).any())
    # The test is worth having: it clears a good part of the random segments.
    assert float(cleared.float().mean()) > 0.2
    # Long segments (ends more than a brick apart) are never cleared.
    far = ~may_be_nonzero(torch.zeros_like(groups), p, p + torch.tensor([2.5 * BRICK, 0.0, 0.0], dtype=p.dtype))
    assert not bool(far.any())


def test_occupied_interval_holds_every_non_zero_point_of_the_ray():
    v = sparse_volume()
    g = torch.Generator().manual_seed(3)
    source = torch.rand(400, 3, generator=g, dtype=torch.float64) * 100 - 30
    target = torch.rand(400, 3, generator=g, dtype=torch.float64) * 100 - 30
    ta, tb = occupied_interval(source, target, occupied_box(v), brick_groups(v))
    t = torch.linspace(0, 1, 3001, dtype=torch.float64)
    points = source[:, None] + t[None, :, None] * (target - source)[:, None]
    outside = (t[None] < ta[:, None]) | (t[None] > tb[:, None])
    for mode in ("bilinear", "nearest"):
        assert not bool(((field(v, points, mode) != 0) & outside).any())
    hits = (field(v, points) != 0).any(dim=1)
    assert bool(hits.any()) and float((tb - ta)[hits].mean()) < 0.9  # it trims


def test_bricks_of_an_empty_volume_clear_everything_and_a_full_one_what_reaches_the_grid():
    empty = brick_groups(torch.zeros(9, 17, 8))
    assert not bool(empty.groups.any()) and not bool(empty.occupied.any()) and empty.occupied_fraction == 0.0
    shape = (9, 17, 8)
    full = brick_groups(torch.ones(shape))
    assert full.occupied.shape == (3, 4, 3) and full.groups.shape == (4, 5, 4)  # I // 8 + 2 bricks, + 1 groups
    # Brick b reads voxels [8 b - 2, 8 b + 8]: occupied exactly when that range meets the grid.
    reach = [torch.arange(n // 8 + 2) * 8 - 2 <= n - 1 for n in shape]
    expected = reach[0][:, None, None] & reach[1][None, :, None] & reach[2][None, None, :]
    assert torch.equal(full.occupied.bool(), expected)


def _render(v, backend, renderer, source, target, bricks, **kwargs):
    return render(v, oblique_affine(), source, target, renderer=renderer, backend=backend, bricks=bricks, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renderer", RENDERERS)
def test_skipping_changes_neither_images_nor_pose_gradients(backend, renderer):
    v = sparse_volume()
    source, target = fan(24 if renderer == "exact" else 40)
    bricks = brick_groups(v)
    results = []
    for b in (None, bricks):
        src, tgt = source.clone().requires_grad_(), target.clone().requires_grad_()
        img = _render(v, backend, renderer, src, tgt, b)
        (img * torch.linspace(0.5, 1.5, img.shape[-1], dtype=img.dtype)).sum().backward()
        results.append((img.detach(), src.grad, tgt.grad))
    (img0, gs0, gt0), (img1, gs1, gt1) = results
    assert float(img0.abs().max()) > 1.0  # the rays do cross the blocks
    # float64 rounding: the sums are regrouped (measured differences <= 1e-14 relative).
    torch.testing.assert_close(img1, img0, rtol=1e-12, atol=1e-12 * float(img0.abs().max()))
    torch.testing.assert_close(gs1, gs0, rtol=1e-10, atol=1e-10 * float(gs0.abs().max()))
    torch.testing.assert_close(gt1, gt0, rtol=1e-10, atol=1e-10 * float(gt0.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renderer", RENDERERS)
def test_every_path_consults_the_bricks(backend, renderer):
    """Groups claiming all space is empty (a lie) make every path render 0: skipping is on."""
    v = sparse_volume()
    source, target = fan(12)
    real = brick_groups(v)
    liar = lying(real)
    assert float(_render(v, backend, renderer, source, target, real).abs().max()) > 1.0
    assert float(_render(v, backend, renderer, source, target, liar).abs().max()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renderer", RENDERERS)
def test_the_volume_gradient_ignores_the_bricks(backend, renderer):
    """While the density needs a gradient nothing is skipped: it is non-zero in empty space."""
    v = sparse_volume()[:19, :17, :13].contiguous()
    v[10:, :, :] = 0.0
    source, target = fan(12)
    liar = lying(brick_groups(v))
    grads = []
    for b in (None, liar):
        d = v.clone().requires_grad_()
        _render(d, backend, renderer, source, target, b).sum().backward()
        grads.append(d.grad)
    assert torch.equal(grads[0], grads[1])
    assert float(grads[0][10:].abs().max()) > 0  # the gradient reaches zero voxels


def test_triton_kernel_skipping_is_bitwise():
    from tritondrr.kernels import trilinear as kernels

    from tritondrr.renderers._sampling import ray_phases

    v = sparse_volume(dtype=torch.float32)
    source, target = fan(40, dtype=torch.float32)
    inverse = torch.linalg.inv(oblique_affine(torch.float32))
    src = (source @ inverse[:3, :3].T + inverse[:3, 3]).contiguous()
    tgt = (target @ inverse[:3, :3].T + inverse[:3, 3]).contiguous()
    phase = ray_phases(torch.arange(40))
    lo, hi = occupied_box(v)
    occupied = brick_groups(v).occupied
    plain = kernels.raymarch_forward(v, src, tgt, phase, lo, hi, 70)
    skipped = kernels.raymarch_forward(v, src, tgt, phase, lo, hi, 70, occupied=occupied)
    assert torch.equal(plain, skipped)
    grad_out = torch.rand_like(plain)
    _, gs0, gt0 = kernels.raymarch_backward(grad_out, v, src, tgt, phase, lo, hi, 70, need_pose=True, need_volume=False)
    _, gs1, gt1 = kernels.raymarch_backward(
        grad_out, v, src, tgt, phase, lo, hi, 70, need_pose=True, need_volume=False, occupied=occupied
    )
    assert torch.equal(gs0, gs1) and torch.equal(gt0, gt1)


def test_drr_skips_by_default_and_follows_edits_of_the_volume(monkeypatch):
    v = sparse_volume(dtype=torch.float32)
    drr = DRR(Subject(volume=v * 1000, density=v.clone(), affine=oblique_affine()), sdd=300.0, height=12, delx=3.0)
    rotations, translations = torch.zeros(1, 3), torch.tensor([[0.0, 120.0, 0.0]])
    on = drr(rotations, translations, parameterization="euler_angles", convention="ZXY")
    assert drr._volume._bricks is not None  # built and cached
    monkeypatch.setenv("TRITONDRR_SKIP_EMPTY", "0")
    off = drr(rotations, translations, parameterization="euler_angles", convention="ZXY")
    torch.testing.assert_close(on, off, rtol=1e-6, atol=1e-6 * float(off.max()))
    monkeypatch.delenv("TRITONDRR_SKIP_EMPTY")
    # Fill the empty space in place: the cached bricks must not hide the new voxels.
    with torch.no_grad():
        drr.density.add_(0.25)
    filled = drr(rotations, translations, parameterization="euler_angles", convention="ZXY")
    reference = render(
        drr.density, drr._render_affine(), *drr.source_target(rotations, translations, parameterization="euler_angles", convention="ZXY"),
        n_samples=drr.n_samples,
    ).reshape(filled.shape)  # fmt: skip
    torch.testing.assert_close(filled, reference, rtol=1e-5, atol=1e-5 * float(reference.max()))
    assert float((filled - on).min()) > 0


def test_bad_bricks_are_refused():
    v = sparse_volume()[:9, :9, :9].contiguous()
    source, target = fan(4)
    with pytest.raises(TypeError, match="bricks must be a tritondrr.occupancy.Bricks"):
        _render(v, "torch", "trilinear", source, target, "yes")
    assert Volume(v, oblique_affine()).bricks().groups.shape == (4, 4, 4)  # 9 // 8 + 2 bricks, + 1 groups


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", (False, True))
def test_label_channels_skip_and_agree(backend, soft):
    v = sparse_volume()
    labels = (torch.arange(v.numel()).reshape(v.shape) % 3).long()
    source, target = fan(16)
    outs = []
    for b in (None, brick_groups(v), lying(brick_groups(v))):
        outs.append(_render(v, backend, "trilinear", source, target, b, mask=labels, n_channels=3, soft_labels=soft))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12 * float(outs[0].abs().max()))
    assert float(outs[0].abs().max()) > 0.5 and float(outs[2].abs().max()) == 0.0
