"""Every renderer through ``render`` and ``DRR`` in world mm, on both backends, against oracles.

The renderers' own tests work in index space; these check the world layer around them (affine
inverse, ray lengths in mm, the dispatch table) with a sheared, rotated affine, against
brute-force float64 oracles written here and in ``tests/oracles.py``.
"""

import pytest
import torch

from tests.oracles import exact_line_integrals
from tritondrr import DRR, load_example_ct, render
from tritondrr.renderers import RENDERER_NAMES, RENDERERS

F64 = torch.float64


def sheared_affine():
    affine = torch.eye(4, dtype=F64)
    affine[:3, :3] = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.25], [0.15, 0.0, 2.0]], dtype=F64)
    affine[:3, 3] = torch.tensor([-4.0, 3.0, -7.0], dtype=F64)
    return affine


def scene(seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(7, 6, 5, generator=g, dtype=F64)
    affine = sheared_affine()
    centre = affine[:3, :3] @ torch.tensor([3.0, 2.5, 2.0], dtype=F64) + affine[:3, 3]
    source = (centre + torch.tensor([30.0, -20.0, 25.0], dtype=F64))[None, None]  # (1, 1, 3)
    target = centre + torch.randn(1, n, 3, generator=g, dtype=F64) * 4.0
    target[0, 0] = centre + 500.0  # a ray that misses
    return density, affine, source, target


def nearest_oracle(density, affine, source, target):
    """Siddon's integral: sorted crossings of the voxel faces, the voxel at each midpoint (float64)."""
    inverse = torch.linalg.inv(affine)
    s = (source[0].expand_as(target[0]) @ inverse[:3, :3].T + inverse[:3, 3]).double()
    e = (target[0] @ inverse[:3, :3].T + inverse[:3, 3]).double()
    out = []
    for a, b in zip(s, e):
        d = b - a
        ts = [torch.tensor([0.0, 1.0], dtype=F64)]
        for axis, n in enumerate(density.shape):
            if d[axis] != 0:
                ts.append(((torch.arange(n + 1, dtype=F64) - 0.5 - a[axis]) / d[axis]).clamp(0, 1))
        t = torch.sort(torch.cat(ts)).values
        mid = a + ((t[1:] + t[:-1]) / 2)[:, None] * d
        idx = torch.floor(mid + 0.5).long()
        inside = ((idx >= 0) & (idx < torch.tensor(density.shape))).all(-1)
        idx = torch.where(inside[:, None], idx, 0)
        values = torch.where(inside, density[idx[:, 0], idx[:, 1], idx[:, 2]], 0.0)
        out.append(((t[1:] - t[:-1]) * values).sum())
    return torch.stack(out) * (target[0] - source[0]).norm(dim=-1)


def test_every_renderer_has_both_backends():
    assert set(RENDERERS) == {(name, backend) for name in RENDERER_NAMES for backend in ("torch", "triton")}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_siddon_in_world_mm_matches_sorted_crossings(backend):
    density, affine, source, target = scene()
    out = render(density, affine, source, target, renderer="siddon", backend=backend)[0, 0]
    expected = nearest_oracle(density, affine, source, target)
    assert float(expected[0]) == 0.0 and float(out[0]) == 0.0
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_exact_in_world_mm_matches_the_simpson_oracle(backend):
    density, affine, source, target = scene(seed=1)
    out = render(density, affine, source, target, renderer="exact", backend=backend)[0, 0]
    expected = exact_line_integrals(density, affine, source[0], target[0])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("renderer", ["siddon", "exact"])
def test_drr_renders_with_every_renderer_and_pose_gradients_match_finite_differences(renderer):
    drr = DRR(load_example_ct(shape=(20, 18, 12)), sdd=1020.0, height=6, delx=30.0, renderer=renderer).double()
    kwargs = dict(parameterization="euler_angles", convention="ZXY")
    rot = torch.tensor([[0.3, -0.2, 0.1]], dtype=F64, requires_grad=True)
    xyz = torch.tensor([[3.0, 850.0, -4.0]], dtype=F64)
    img = drr(rot, xyz, **kwargs)
    assert img.shape == (1, 1, 6, 6) and float(img.max()) > 0
    (grad,) = torch.autograd.grad(img.sum(), rot)
    step = 1e-6
    for k in range(3):
        delta = torch.zeros_like(rot)
        delta[0, k] = step
        with torch.no_grad():
            fd = (drr(rot + delta, xyz, **kwargs).sum() - drr(rot - delta, xyz, **kwargs).sum()) / (2 * step)
        # Piecewise smooth (siddon) / smooth (exact) in the pose: central differences agree away
        # from the measure-zero poses where a ray crosses a voxel edge.
        assert abs(float(grad[0, k]) - float(fd)) <= 1e-5 * max(1.0, abs(float(fd))), (k, float(grad[0, k]), float(fd))


@pytest.mark.parametrize("renderer", RENDERER_NAMES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("soft", [False, True])
def test_label_channels_sum_to_the_plain_image(renderer, backend, soft):
    subject = load_example_ct(shape=(20, 18, 12))
    drr = DRR(subject, sdd=1020.0, height=6, delx=30.0, renderer=renderer, backend=backend, soft_labels=soft).double()
    kwargs = dict(parameterization="euler_angles", convention="ZXY")
    rot, xyz = torch.tensor([[0.3, -0.2, 0.1]], dtype=F64), torch.tensor([[3.0, 850.0, -4.0]], dtype=F64)
    plain = drr(rot, xyz, **kwargs)
    channels = drr(rot, xyz, mask_to_channels=True, **kwargs)
    assert channels.shape[1] == int(drr.mask.max()) + 1 > 2
    assert (channels[:, 1:].abs().amax(dim=(0, 2, 3)) > 0).sum() >= 2  # several structures are seen
    torch.testing.assert_close(channels.sum(dim=1, keepdim=True), plain, rtol=1e-9, atol=1e-9)
