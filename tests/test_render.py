"""The PyTorch reference renderer against closed forms, the exact integral, and its own adjoint."""

import math

import pytest
import torch

from tests.oracles import exact_line_integrals
from tritondrr.renderers.trilinear import naive as reference
from tritondrr.volume import occupied_box, support_box
from tritondrr.render import ray_phases, render, samples_per_ray


def oblique_affine(dtype=torch.float64):
    """Anisotropic, sheared, translated voxel -> world map (mm)."""
    affine = torch.eye(4, dtype=dtype)
    affine[:3, :3] = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.1, 0.0, 2.0]], dtype=dtype)
    affine[:3, 3] = torch.tensor([-10.0, -12.0, -30.0], dtype=dtype)
    return affine


def fan_of_rays(n, center, distance=100.0, spread=15.0, seed=0, dtype=torch.float64):
    """A source on one side of ``center`` and ``n`` targets scattered on the other side (world mm)."""
    g = torch.Generator().manual_seed(seed)
    center = torch.as_tensor(center, dtype=dtype)
    source = (center + torch.tensor([0.0, distance, 5.0], dtype=dtype))[None, None]
    target = center + torch.tensor([0.0, -distance / 2, 0.0], dtype=dtype)
    target = target + spread * torch.randn(1, n, 3, generator=g, dtype=dtype)
    return source, target


def volume(shape=(17, 23, 31), seed=0, dtype=torch.float64):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def world_center(affine, shape):
    index = torch.tensor([(n - 1) / 2 for n in shape], dtype=affine.dtype)
    return affine[:3, :3] @ index + affine[:3, 3]


def test_converges_to_the_exact_integral_at_second_order():
    v, affine = volume(), oblique_affine()
    source, target = fan_of_rays(150, world_center(affine, v.shape))
    exact = exact_line_integrals(v, affine, source[0], target[0])
    errors = []
    for n in (64, 256, 1024):
        out = render(v, affine, source, target, n_samples=n)[0, 0]
        errors.append(float((out - exact).abs().max() / exact.abs().max()))
    assert errors[-1] < 2e-5
    # Midpoint rule on a piecewise cubic with kinks: error ~ 1/n^2, so 4x the samples -> ~16x less.
    assert errors[0] / errors[1] > 8 and errors[1] / errors[2] > 8


def test_default_sampling_is_accurate_on_rough_volumes():
    v, affine = volume((24, 20, 28), seed=3), oblique_affine()
    source, target = fan_of_rays(300, world_center(affine, v.shape), seed=4)
    exact = exact_line_integrals(v, affine, source[0], target[0])
    out = render(v, affine, source, target)[0, 0]
    hit = exact > 0.05 * exact.max()
    relative = ((out - exact).abs() / exact)[hit]
    # Uniform noise is far rougher than a CT; still well inside nanodrr-class accuracy.
    assert float(relative.median()) < 2e-4
    assert float(relative.quantile(0.99)) < 2e-3


def test_constant_volume_gives_density_times_length_inside():
    c = 0.7
    v = torch.full((9, 10, 11), c, dtype=torch.float64)
    affine = oblique_affine()
    # Both endpoints inside [0, I-1] x [0, J-1] x [0, K-1], where the interpolant is exactly c.
    a = torch.tensor([[1.0, 2.0, 3.0], [0.5, 8.5, 9.0], [7.5, 1.0, 0.2]], dtype=torch.float64)
    b = torch.tensor([[7.0, 8.0, 9.5], [7.9, 0.3, 1.0], [0.1, 8.9, 9.9]], dtype=torch.float64)
    to_world = lambda p: p @ affine[:3, :3].T + affine[:3, 3]  # noqa: E731
    source, target = to_world(a)[:, None], to_world(b)[:, None]
    out = render(v, affine, source, target, n_samples=7)
    length = (to_world(b) - to_world(a)).norm(dim=-1)
    torch.testing.assert_close(out[:, 0, 0], c * length, rtol=1e-12, atol=0)


def test_constant_volume_axis_aligned_full_crossing():
    # Along an axis through the interior the tent sum of a constant grid integrates to I voxels.
    v = torch.full((6, 5, 4), 2.0, dtype=torch.float64)
    spacing = torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64)
    affine = torch.diag(torch.cat([spacing, torch.ones(1, dtype=torch.float64)]))
    source = torch.tensor([[[-50.0, 3.0, 4.5]]], dtype=torch.float64)
    target = torch.tensor([[[50.0, 3.0, 4.5]]], dtype=torch.float64)
    out = render(v, affine, source, target, n_samples=4000)
    assert float(out) == pytest.approx(2.0 * 6 * 0.5, rel=1e-6)


def test_rays_that_miss_or_have_zero_length_give_zero_without_nan():
    v = volume((8, 8, 8)).requires_grad_()
    affine = torch.eye(4, dtype=torch.float64)
    source = torch.tensor([[[100.0, 100.0, 100.0]], [[3.0, 3.0, 3.0]]], dtype=torch.float64).requires_grad_()
    target = torch.tensor([[[200.0, 100.0, 100.0]], [[3.0, 3.0, 3.0]]], dtype=torch.float64).requires_grad_()
    out = render(v, affine, source, target)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for x in (v, source, target):
        assert torch.isfinite(x.grad).all()


def test_grazing_ray_on_the_support_boundary_is_zero():
    v = volume((8, 8, 8))
    affine = torch.eye(4, dtype=torch.float64)
    # The plane x = -1 bounds the support: the tent is zero there.
    source = torch.tensor([[[-1.0, -20.0, 3.0]]], dtype=torch.float64)
    target = torch.tensor([[[-1.0, 20.0, 3.0]]], dtype=torch.float64)
    assert float(render(v, affine, source, target).abs()) < 1e-12


def test_pose_gradients_pass_gradcheck():
    v, affine = volume((7, 8, 9)), oblique_affine()
    source, target = fan_of_rays(6, world_center(affine, v.shape), distance=30.0, spread=4.0)
    source.requires_grad_(), target.requires_grad_()
    fn = lambda s, t: render(v, affine, s, t, n_samples=40)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (source, target), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradients_include_the_clipping_terms():
    # Source and target inside the volume: moving an endpoint changes the interval itself.
    v = volume((8, 8, 8))
    affine = torch.eye(4, dtype=torch.float64)
    source = torch.tensor([[[1.3, 2.2, 3.1]]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[5.7, 4.4, 2.9]]], dtype=torch.float64, requires_grad=True)
    fn = lambda s, t: render(v, affine, s, t, n_samples=64)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (source, target), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_volume_gradient_is_the_adjoint():
    shape, affine = (9, 7, 8), oblique_affine()
    source, target = fan_of_rays(40, world_center(affine, shape), distance=40.0, spread=6.0)
    x, y = volume(shape, seed=1).requires_grad_(), torch.randn(1, 1, 40, dtype=torch.float64)
    ax = render(x, affine, source, target, n_samples=33)
    (aty,) = torch.autograd.grad(ax, x, y)
    assert float((ax.detach() * y).sum()) == pytest.approx(float((x.detach() * aty).sum()), rel=1e-12)
    # A^T y at one voxel is <A e, y> for that voxel's basis vector e (same box: the whole support).
    e = torch.zeros(shape, dtype=torch.float64)
    e[4, 3, 4] = 1.0
    ae = render(e, affine, source, target, n_samples=33, box=support_box(shape))
    assert float((ae * y).sum()) == pytest.approx(float(aty[4, 3, 4]), abs=1e-12)


def test_chunking_does_not_change_the_result_or_gradients():
    v, affine = volume((10, 11, 12)).requires_grad_(), oblique_affine()
    source, target = fan_of_rays(50, world_center(affine, v.shape), distance=40.0, spread=6.0)
    target.requires_grad_()
    lo, hi = support_box(v.shape)
    inv = torch.linalg.inv(affine)
    s, t = source @ inv[:3, :3].T + inv[:3, 3], target @ inv[:3, :3].T + inv[:3, 3]
    phase = torch.rand(50, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    whole = reference.raymarch(v, s, t, phase, lo, hi, 30)
    pieces = reference.raymarch(v, s, t, phase, lo, hi, 30, chunk_samples=30 * 7)
    torch.testing.assert_close(whole, pieces, rtol=1e-13, atol=0)
    g_whole = torch.autograd.grad(whole.sum(), (v, target), retain_graph=True)
    g_pieces = torch.autograd.grad(pieces.sum(), (v, target))
    for a, b in zip(g_whole, g_pieces):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_each_pose_is_independent_of_the_batch():
    v, affine = volume((10, 11, 12)), oblique_affine()
    center = world_center(affine, v.shape)
    s1, t1 = fan_of_rays(20, center, seed=1)
    s2, t2 = fan_of_rays(20, center + 3.0, distance=400.0, seed=2)
    alone = render(v, affine, s1, t1)
    batched = render(v, affine, torch.cat([s1, s2]), torch.cat([t1, t2]))
    torch.testing.assert_close(batched[:1], alone, rtol=1e-13, atol=0)


def test_occupied_box_renders_the_same_integral():
    v = torch.zeros(20, 20, 20, dtype=torch.float64)
    v[6:12, 8:15, 5:9] = volume((6, 7, 4))
    lo, hi = occupied_box(v)
    assert lo == [5.0, 7.0, 4.0] and hi == [12.0, 15.0, 9.0]
    affine = torch.eye(4, dtype=torch.float64)
    source, target = fan_of_rays(60, [9.0, 11.0, 6.5], distance=30.0, spread=3.0)
    exact = exact_line_integrals(v, affine, source[0], target[0])
    tight = render(v, affine, source, target, n_samples=2000)[0, 0]
    torch.testing.assert_close(tight, exact, rtol=0, atol=2e-6 * float(exact.max()))
    assert occupied_box(torch.zeros(3, 3, 3))[0] == [0.0, 0.0, 0.0]


def test_float32_matches_float64():
    v, affine = volume(), oblique_affine()
    source, target = fan_of_rays(100, world_center(affine, v.shape))
    ref = render(v, affine, source, target, n_samples=200)
    out = render(v.float(), affine.float(), source.float(), target.float(), n_samples=200)
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_half_precision_volumes_render_in_float32():
    v, affine = volume().float(), oblique_affine().float()
    source, target = fan_of_rays(50, world_center(affine, v.shape), dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        rounded = v.to(dtype)
        out = render(rounded, affine, source, target, n_samples=64)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, render(rounded.float(), affine, source, target, n_samples=64))


def test_mask_channels_sum_to_the_image_and_follow_the_labels():
    v = volume((12, 12, 12))
    labels = torch.zeros(12, 12, 12, dtype=torch.long)
    labels[:, :6] = 1
    labels[:, 6:] = 2
    affine = torch.eye(4, dtype=torch.float64)
    # Rays parallel to i at j = 2 see only label 1; at j = 9 only label 2.
    source = torch.tensor([[[-5.0, 2.0, 5.0], [-5.0, 9.0, 5.0]]], dtype=torch.float64)
    target = torch.tensor([[[20.0, 2.0, 5.0], [20.0, 9.0, 5.0]]], dtype=torch.float64)
    plain = render(v, affine, source, target, n_samples=100)
    split = render(v, affine, source, target, mask=labels, n_samples=100)
    assert split.shape == (1, 3, 2)
    torch.testing.assert_close(split.sum(dim=1, keepdim=True), plain)
    assert float(split[0, 2, 0]) == 0 and float(split[0, 1, 1]) == 0
    assert float(split[0, 1, 0]) > 0 and float(split[0, 2, 1]) > 0


def test_samples_per_ray_depends_on_the_volume_not_the_rays():
    affine = torch.diag(torch.tensor([0.5, 0.5, 2.0, 1.0], dtype=torch.float64))
    lo, hi = support_box((100, 100, 40))
    diagonal = math.sqrt((101 * 0.5) ** 2 * 2 + (41 * 2.0) ** 2)
    assert samples_per_ray(affine, lo, hi) == math.ceil(diagonal / 0.5)
    assert samples_per_ray(affine, lo, hi, step=2.0) == math.ceil(diagonal / 2.0)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(density=torch.rand(4, 4)), ValueError, "density must be 3-D"),
        (dict(density=torch.ones(4, 4, 4, dtype=torch.long)), TypeError, "density must be a floating"),
        (dict(affine=torch.eye(3)), ValueError, "affine must be (4, 4)"),
        (dict(source=torch.zeros(1, 2, 2)), ValueError, "source must be 3-D"),
        (dict(source=torch.zeros(2, 1, 3)), ValueError, "source must be (B, 1, 3)"),
        (dict(target=[[0.0, 0.0, 0.0]]), TypeError, "target must be a torch.Tensor"),
        (dict(step=-1.0), ValueError, "step must be a positive"),
        (dict(n_samples=0), ValueError, "n_samples must be a positive int"),
        (dict(step=1.0, n_samples=3), ValueError, "step or n_samples"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(mask=torch.zeros(3, 3, 3, dtype=torch.long)), ValueError, "mask must have density's shape"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, words):
    args = dict(
        density=torch.rand(4, 4, 4),
        affine=torch.eye(4),
        source=torch.zeros(1, 1, 3),
        target=torch.ones(1, 5, 3),
    )
    args.update(kwargs)
    density, affine, source, target = (args.pop(k) for k in ("density", "affine", "source", "target"))
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        render(density, affine, source, target, **args)


def test_end_correction_makes_any_phase_exact_on_linear_fields():
    # Inside [0, I-1]^3 the interpolant of a linear grid is that linear function, and the offset
    # rule with its Euler-Maclaurin end correction integrates linear functions exactly.
    i, j, k = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (9, 10, 11)), indexing="ij")
    v = 0.3 * i - 0.2 * j + 0.1 * k + 5.0
    g = torch.Generator().manual_seed(7)
    source = torch.rand(1, 40, 3, generator=g, dtype=torch.float64) * 7.5  # rays that start and end inside
    target = torch.rand(1, 40, 3, generator=g, dtype=torch.float64) * 7.5
    phase = torch.rand(40, generator=g, dtype=torch.float64)
    phase[:2] = torch.tensor([0.0, 1.0 - 1e-12], dtype=torch.float64)
    lo, hi = support_box(v.shape)
    out = reference.raymarch(v, source, target, phase, lo, hi, 5)[0, 0]
    mid = (source + target)[0] / 2  # the mean of a linear function over a segment is its midpoint value
    exact = 0.3 * mid[:, 0] - 0.2 * mid[:, 1] + 0.1 * mid[:, 2] + 5.0
    # (Without the correction an offset rule errs by h (phase - 1/2) (f(end) - f(start)) here.)
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=0)


def test_ray_phases_are_spread_and_reproducible():
    phases = ray_phases(torch.arange(40000), torch.float64)
    # Knuth's multiplicative hash written out in Python integers, an independent computation.
    for n in (0, 1, 77, 39999):
        assert float(phases[n]) == ((n + 1) * 2654435761 % 2**32) / 2**32
    # Neighbouring pixels get unrelated phases: every tenth of [0, 1] is hit about equally often.
    counts = torch.histc(phases, bins=10, min=0.0, max=1.0)
    assert float(counts.min()) > 3800 and float(counts.max()) < 4200
    assert float((phases[1:] - phases[:-1]).abs().mean()) > 0.25
    torch.testing.assert_close(ray_phases(torch.tensor([0, 1, 2])), ray_phases(torch.arange(3)))


def test_double_backward_is_refused_not_wrong():
    v = volume((5, 6, 7)).requires_grad_()
    affine = torch.eye(4, dtype=torch.float64)
    source = torch.tensor([[[-3.0, 2.5, 3.0]]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[8.0, 2.0, 3.5]]], dtype=torch.float64)
    out = render(v, affine, source, target, n_samples=16, backend="torch")
    (g,) = torch.autograd.grad(out.sum(), source)  # first derivatives work
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    out = render(v, affine, source, target, n_samples=16, backend="torch")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), source, create_graph=True)
