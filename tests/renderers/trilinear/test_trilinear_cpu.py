"""The compiled CPU path (eight explicit gathers under torch.compile) against the grid_sample path.

Both compute the same function (``tritondrr.renderers.trilinear.naive``); the rest of the suite runs the
grid_sample path (TRITONDRR_COMPILE=0 in conftest) to avoid compiling in every test.
"""

import pytest
import torch

from tritondrr.render import render


@pytest.fixture
def compiled(monkeypatch):
    from tritondrr import _config

    # The command line's in-process tests turn compilation off for the process (set_compile):
    # back to the environment, which each call below sets.
    monkeypatch.setattr(_config, "_compile_override", None)

    def run(flag, *args, **kwargs):
        monkeypatch.setenv("TRITONDRR_COMPILE", flag)
        return render(*args, **kwargs)

    return run


def rays(dtype):
    g = torch.Generator().manual_seed(0)
    affine = torch.eye(4, dtype=dtype)
    affine[:3, :3] = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.1, 0.0, 2.0]], dtype=dtype)
    source = torch.tensor([[[9.0, 60.0, 40.0]], [[-30.0, 10.0, 25.0]]], dtype=dtype)
    target = torch.randn(2, 37, 3, generator=g, dtype=dtype) * 8 + torch.tensor([10.0, -20.0, 30.0], dtype=dtype)
    target[0, 0] = source[0, 0]  # a zero-length ray
    target[1, 1] = torch.tensor([500.0, 500.0, 500.0], dtype=dtype)  # a ray that misses
    return affine, source, target


def test_compiled_gathers_match_grid_sample_with_gradients(compiled):
    affine, source, target = rays(torch.float64)
    density = torch.rand(17, 23, 31, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = {}
    for flag in ("0", "1"):
        v, s, t = (x.clone().requires_grad_() for x in (density, source, target))
        out = compiled(flag, v, affine, s, t, n_samples=45)
        grads = torch.autograd.grad((out * out).sum(), (v, s, t))
        results[flag] = (out.detach(), *grads)
    for a, b in zip(results["0"], results["1"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(a.abs().max()))


def test_compiled_float32_inference_matches_grid_sample(compiled):
    affine, source, target = rays(torch.float32)
    density = torch.rand(17, 23, 31, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = compiled("0", density, affine, source, target)
        fused = compiled("1", density, affine, source, target)
    torch.testing.assert_close(fused, plain, rtol=0, atol=2e-6 * float(plain.abs().max()))


def test_compiled_pose_gradients_reuse_the_forward_and_survive_retain_graph(compiled):
    """Pose-only gradients come from sums kept by the forward; a second backward recomputes them."""
    affine, source, target = rays(torch.float64)
    density = torch.rand(17, 23, 31, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights = torch.randn(2, 1, 37, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    results = {}
    for flag in ("0", "1"):
        s, t = source.clone().requires_grad_(), target.clone().requires_grad_()
        out = compiled(flag, density, affine, s, t, n_samples=45)
        first = torch.autograd.grad((out * weights).sum(), (s, t), retain_graph=True)
        second = torch.autograd.grad((out * weights).sum(), (s, t))
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
        results[flag] = first
    for a, b in zip(results["0"], results["1"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(a.abs().max()))


def test_ray_order_is_a_permutation_that_keeps_detector_neighbours_together():
    from tritondrr import DRR, load_example_ct
    from tritondrr.renderers.trilinear.cpu import ray_order

    drr = DRR(load_example_ct(shape=(24, 20, 16)), sdd=1020.0, height=37, width=21, delx=2.0)
    source, target = drr.source_target(
        torch.tensor([[0.3, -0.2, 0.1]]), torch.tensor([[0.0, 850.0, 0.0]]), parameterization="euler_angles", convention="ZXY"
    )
    order = ray_order(source, target)
    assert torch.equal(order.sort().values, torch.arange(37 * 21))
    # Z-curve: the first 64 rays marched form a compact block of pixels, not a row of 64.
    rows, cols = order[:64] // 21, order[:64] % 21
    assert int(rows.max() - rows.min()) < 12 and int(cols.max() - cols.min()) < 12


def test_compiled_skipping_is_bitwise_and_keeps_pose_gradients(compiled, monkeypatch):
    """Empty-space skipping in the compiled path: each tile of rays marches a shorter range of the
    same samples (positions k stride from the same first point): bitwise the same sums, images and
    pose gradients, over more than one tile (300 rays) with rays that miss and rays of length 0."""
    from tritondrr.occupancy import Bricks, brick_groups

    # Compiled code for this test alone: past torch.compile's recompile limit (other tests' dtypes
    # and flags in the same process) Dynamo would run some calls eagerly, which rounds differently.
    torch._dynamo.reset()
    affine, source, target = rays(torch.float64)
    target = target.repeat(1, 9, 1)[:, :300]
    density = torch.zeros(33, 29, 31, dtype=torch.float64)
    density[3:12, 4:20, 8:16] = torch.rand(9, 16, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    density[25:30, 20:27, 20:29] = 1.0
    weights = torch.randn(2, 1, 300, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    results = []
    bricks = brick_groups(density)
    from tritondrr.renderers.trilinear import cpu

    calls = []
    skipping = cpu._skipping_gather_sums
    monkeypatch.setattr(cpu, "_skipping_gather_sums", lambda *a: calls.append(1) or skipping(*a))
    for b in (None, bricks, Bricks(torch.zeros_like(bricks.occupied), torch.zeros_like(bricks.groups), 0.0)):
        s, t = source.clone().requires_grad_(), target.clone().requires_grad_()
        out = compiled("1", density, affine, s, t, n_samples=45, bricks=b)
        results.append((out.detach(), *torch.autograd.grad((out * weights).sum(), (s, t))))
    assert calls  # the compiled path skipped (not grid_sample)
    assert float(results[0][0].abs().max()) > 1.0
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    # The groups are consulted: lying ones blank the samples; only the end correction at the box
    # faces, where the field is zero up to rounding, is left (6.9e-16 measured).
    assert float(results[2][0].abs().max()) < 1e-12 * float(results[0][0].abs().max())
