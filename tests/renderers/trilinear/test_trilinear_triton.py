"""The Triton backend (``tritondrr.renderers.trilinear.op.raymarch``, run by the interpreter on CPU) against the reference.

Every test compares the op with ``tritondrr.renderers.trilinear.naive.raymarch`` -- output and every gradient --
or checks an identity the op must satisfy (adjoint, determinism, every pixel written). Errors are
relative to the largest value of the quantity compared. Shapes are deliberately odd: 17x23x31
volumes, 13x9 detectors (N = 117 rays), 48 or 37 samples.

Every call passes a per-ray sampling phase: ``"half"`` (1/2 for every ray: the midpoint rule, the
end correction vanishes) or ``"random"`` (uniform in [0, 1) from a fixed generator, with exact 0,
1e-7 and 1 - 1e-7 among them: the end correction is largest there). The comparisons with the
reference run both; the identities run with random phases, which exercise every term.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from tritondrr import volume
from tritondrr._config import interpreting
from tritondrr.kernels import trilinear as kernels
from tritondrr.renderers.trilinear import naive as reference
from tritondrr.renderers.trilinear import op as ops
from tritondrr.render import render

SHAPE = (17, 23, 31)
N_SAMPLES = 48
DET = (13, 9)  # detector rows x columns: N = 117 rays

#: (output, gradients) tolerances relative to the largest value, per rays' dtype. float64: both
#: sides compute the same sums in double precision. float32: rounding of ~50-term sums and of the
#: reference's grid_sample coordinate normalisation, ~1e-6 measured.
TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4)}

INNER_BOX = ([1.5, 2.0, 3.25], [14.0, 19.5, 27.0])  # cuts through non-zero density: clip terms matter

PHASES = ["half", "random"]

#: Where ``_run`` executes both sides: the CPU under the interpreter, or the GPU with
#: ``TRITON_INTERPRET=0 python -m pytest tests/test_triton.py --device cuda``.
DEVICE = torch.device("cpu")


@pytest.fixture(autouse=True)
def _device(device):
    global DEVICE
    if device.type == "cuda" and interpreting():
        pytest.skip("--device cuda needs TRITON_INTERPRET=0 (the kernels are interpreted otherwise)")
    DEVICE = device
    yield
    DEVICE = torch.device("cpu")


def _phase(n, kind="random", dtype=torch.float64, seed=0):
    """(N,) sampling phases: all 1/2, or uniform in [0, 1) with 0, 1e-7 and 1 - 1e-7 in front."""
    if kind == "half":
        return torch.full((n,), 0.5, dtype=dtype)
    phase = torch.rand(n, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    extremes = torch.tensor([0.0, 1e-7, 1.0 - 1e-7], dtype=torch.float64)[: min(n, 3)]
    phase[: len(extremes)] = extremes
    return phase.to(dtype)


def _volume(dtype=torch.float64, seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)


def _geometry(batch=2, dtype=torch.float64, *, seed=0, shape=SHAPE, det=DET, span=0.9):
    """Cone-beam rays in index space: a source per pose on a sphere, a jittered 13x9 detector.

    Directions are random (oblique to every axis); the detector is wide enough that the outer
    rays miss the box. Returns source (B, 1, 3), target (B, N, 3).
    """
    g = torch.Generator().manual_seed(seed)
    size = max(shape)
    centre = torch.tensor(shape, dtype=torch.float64) / 2 - 0.5
    radius = 1.5 * size
    direction = torch.randn(batch, 3, generator=g, dtype=torch.float64)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    helper = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64).expand(batch, 3)
    u = torch.linalg.cross(direction, helper)
    u = u / u.norm(dim=-1, keepdim=True)
    v = torch.linalg.cross(direction, u)
    rows = torch.linspace(-1, 1, det[0], dtype=torch.float64)
    cols = torch.linspace(-1, 1, det[1], dtype=torch.float64)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    rr, cc = rr.reshape(-1), cc.reshape(-1)  # row-major, N = rows * cols
    source = centre + radius * direction  # [B, 3]
    panel = centre - radius * direction
    target = panel[:, None] + span * size * (rr[None, :, None] * u[:, None] + cc[None, :, None] * v[:, None])
    target = target + 0.1 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    return source[:, None, :].to(dtype), target.to(dtype)


def _run(fn, density, source, target, phase, lo, hi, n_samples, grad_out, **kwargs):
    """Output and gradients (density, source, target) of ``fn`` for the upstream gradient ``grad_out``."""
    leaves = [x.detach().to(DEVICE).clone().requires_grad_() for x in (density, source, target)]
    out = fn(*leaves, phase.to(DEVICE), lo, hi, n_samples, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.to(DEVICE))
    return out.detach().cpu(), tuple(g.cpu() for g in grads)


def _compare(density, source, target, lo, hi, n_samples=N_SAMPLES, tol=None, seed=1, phase="random", **kwargs):
    """Assert the op matches the reference in output and gradients; return the relative errors.

    ``phase`` is a kind for ``_phase`` ("half" or "random") or an (N,) tensor.
    """
    dtype = target.dtype
    out_tol, grad_tol = tol or TOL[dtype]
    if isinstance(phase, str):
        phase = _phase(target.shape[1], phase, dtype)
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn((target.shape[0], 1, target.shape[1]), generator=g, dtype=torch.float64).to(dtype)
    ours, our_grads = _run(ops.raymarch, density, source, target, phase, lo, hi, n_samples, grad_out, **kwargs)
    ref, ref_grads = _run(reference.raymarch, density, source, target, phase, lo, hi, n_samples, grad_out)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.isfinite(ours).all()
    errors = {"out": _rel(ours, ref)}
    assert errors["out"] <= out_tol, f"output error {errors['out']:.3g} > {out_tol}"
    for name, a, b in zip(("density", "source", "target"), our_grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), f"non-finite {name} gradient"
        errors[name] = _rel(a, b)
        assert errors[name] <= grad_tol, f"{name} gradient error {errors[name]:.3g} > {grad_tol}"
    return errors, ours


def _rel(a, b):
    scale = b.double().abs().max().clamp(min=1e-30)
    return float((a.double() - b.double()).abs().max() / scale)


# ------------------------------------------------------------------------------------------------
# Against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("box", ["support", "inner"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_shared_source_matches_reference(dtype, box, phase):
    density = _volume(dtype)
    source, target = _geometry(2, dtype)
    lo, hi = volume.support_box(SHAPE) if box == "support" else INNER_BOX
    _, out = _compare(density, source, target, lo, hi, phase=phase)
    hits = (out != 0).sum()
    assert 0 < hits < out.numel(), "the geometry must contain rays that hit and rays that miss"


@pytest.mark.parametrize("phase", PHASES)
def test_per_ray_sources_inside_and_targets_inside(phase):
    """(B, N, 3) sources: sources inside the volume, targets inside the volume, both, neither.

    With random phases this is where the end correction's f(p_0end) (sources inside: t0 = 0)
    and f(p_1end) (targets inside: t1 = 1) are non-zero, with the support box as with the inner one.
    """
    g = torch.Generator().manual_seed(3)
    density = _volume()
    source, target = _geometry(2)
    n = target.shape[1]
    centre = torch.tensor(SHAPE, dtype=torch.float64) / 2 - 0.5
    inside = centre + (torch.rand(2, n, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor(SHAPE) * 0.9
    source = source.expand(2, n, 3).clone()
    quarter = n // 4
    source[:, :quarter] = inside[:, :quarter]  # source inside, target outside
    target[:, quarter : 2 * quarter] = inside[:, quarter : 2 * quarter]  # target inside
    source[:, 2 * quarter : 3 * quarter] = inside[:, 2 * quarter : 3 * quarter]  # both inside
    target[:, 2 * quarter : 3 * quarter] = inside.flip(1)[:, 2 * quarter : 3 * quarter]
    _compare(density, source, target, *volume.support_box(SHAPE), phase=phase)
    _compare(density, source, target, *INNER_BOX, phase=phase)


def test_shared_source_equals_expanded_source():
    density = _volume(torch.float32)
    source, target = _geometry(2, torch.float32)
    g = torch.randn(2, 1, target.shape[1])
    phase = _phase(target.shape[1], dtype=torch.float32)
    a, (_, gs_a, gt_a) = _run(ops.raymarch, density, source, target, phase, *INNER_BOX, N_SAMPLES, g)
    b, (_, gs_b, gt_b) = _run(ops.raymarch, density, source.expand_as(target), target, phase, *INNER_BOX, N_SAMPLES, g)
    assert torch.equal(a, b)
    assert torch.equal(gt_a, gt_b)
    torch.testing.assert_close(gs_a, gs_b.sum(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("phase", PHASES)
def test_special_rays_miss_graze_axis_parallel(phase):
    """Rays that miss, graze a face of the support from inside/outside, run along axes (|d_a| < TINY)."""
    density = _volume()
    I, J, K = SHAPE
    rays = [
        # (source, target)
        ((-5.0, -5.0, -5.0), (-3.0, 40.0, 2.0)),  # misses entirely
        ((30.0, 30.0, 40.0), (60.0, 10.0, 50.0)),  # points away from the box
        ((-10.0, 5.25, 7.75), (30.0, 5.25, 7.75)),  # parallel to axis 0
        ((3.25, -10.0, 7.75), (3.25, 40.0, 7.75)),  # parallel to axis 1
        ((3.25, 9.75, -10.0), (3.25, 9.75, 50.0)),  # parallel to axis 2
        ((-0.999, -10.0, 7.6), (-0.999, 40.0, 8.3)),  # grazes face i = -1 from inside
        ((-1.001, -10.0, 7.6), (-1.001, 40.0, 8.3)),  # grazes face i = -1 from outside
        ((5.3, 22.999, -10.0), (7.2, 22.999, 50.0)),  # grazes face j = J - 1 + 1 from inside
        ((-10.0, -10.0, -10.0), (3.0, 8.0, 1.5)),  # stops inside the volume
        ((4.2, 6.1, 9.9), (4.2, 6.1, 9.9)),  # zero length, inside
        ((-40.0, 6.1, 9.9), (-40.0, 6.1, 9.9)),  # zero length, outside
        ((I + 0.5, J + 0.5, K + 0.5), (I + 2.0, J + 3.0, K + 1.0)),  # outside the support corner
    ]
    source = torch.tensor([[r[0] for r in rays]], dtype=torch.float64)
    target = torch.tensor([[r[1] for r in rays]], dtype=torch.float64)
    errors, out = _compare(density, source, target, *volume.support_box(SHAPE), phase=phase)
    assert out[0, 0, 0] == 0 and out[0, 0, 1] == 0 and out[0, 0, -1] == 0
    _compare(density, source, target, *INNER_BOX, phase=phase)


@pytest.mark.parametrize("phase", PHASES)
def test_rays_exactly_on_a_face_forward(phase):
    """A ray in the plane i = -1 sees a zero field (the tent vanishes there); i = I - 1 sees the last slice.

    Gradients are not compared: the field has a kink there, both one-sided derivatives are valid.
    """
    density = _volume()
    I = SHAPE[0]
    source = torch.tensor([[[-1.0, -5.0, 3.3], [I - 1.0, -5.0, 3.3]]], dtype=torch.float64)
    target = torch.tensor([[[-1.0, 40.0, 9.1], [I - 1.0, 40.0, 9.1]]], dtype=torch.float64)
    ph = _phase(2, phase, seed=1)
    out = ops.raymarch(density, source, target, ph, *volume.support_box(SHAPE), N_SAMPLES)
    ref = reference.raymarch(density, source, target, ph, *volume.support_box(SHAPE), N_SAMPLES)
    assert out[0, 0, 0] == 0
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_zero_length_rays_give_zero_through_render_and_finite_gradients():
    density = _volume(torch.float32).requires_grad_()
    affine = torch.diag(torch.tensor([1.5, 0.8, 1.2, 1.0]))
    point = torch.tensor([[[6.1, 9.3, 12.7], [-50.0, 0.3, 0.2]]])  # inside, outside (mm); off the voxel grid
    source = point.clone().requires_grad_()
    target = point.clone().requires_grad_()
    out = render(density, affine, source, target, n_samples=16, backend="triton")
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (density, source, target))
    assert all(torch.isfinite(g).all() for g in grads)
    # The op itself returns f(s) for a zero-length ray inside the box, as the reference does.
    for phase in PHASES:
        _compare(density.detach().double(), point.double(), point.double(), *volume.support_box(SHAPE), phase=phase)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("vdtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_volumes(vdtype, phase):
    """The reference samples the same rounded volume upcast to the rays' dtype; accumulation is fp32.

    Output and pose gradients are fp32 computations of the same function (f32 tolerances); the
    volume gradient is accumulated in fp32 and rounded once to ``vdtype`` on both sides, so the
    two may differ by one unit in the last place of ``vdtype`` (2^-10 fp16, 2^-7 bf16 relative).
    """
    density = _volume(torch.float32).to(vdtype)
    source, target = _geometry(2, torch.float32)
    g = torch.randn(2, 1, target.shape[1], generator=torch.Generator().manual_seed(5))
    ph = _phase(target.shape[1], phase, torch.float32)
    ours, our_grads = _run(ops.raymarch, density, source, target, ph, *INNER_BOX, N_SAMPLES, g)
    ref, ref_grads = _run(reference.raymarch, density, source, target, ph, *INNER_BOX, N_SAMPLES, g)
    assert ours.dtype == torch.float32 and our_grads[0].dtype == vdtype
    assert _rel(ours, ref) <= 1e-5
    assert _rel(our_grads[1], ref_grads[1]) <= 1e-4
    assert _rel(our_grads[2], ref_grads[2]) <= 1e-4
    ulp = 2.0**-10 if vdtype == torch.float16 else 2.0**-7
    diff = (our_grads[0].double() - ref_grads[0].double()).abs()
    assert (diff <= ulp * ref_grads[0].double().abs() + 1e-6).all()


@pytest.mark.parametrize("phase", PHASES)
def test_float64_gradcheck_pose(phase):
    """Finite differences of the op itself (not only agreement with the reference), clip terms included.

    Random phases add the end terms; the inner box makes f non-zero at both ends.
    """
    density = _volume(shape=(9, 11, 13))
    source, target = _geometry(1, shape=(9, 11, 13), det=(3, 2), span=0.4)
    lo, hi = [1.25, 0.5, 2.5], [7.0, 9.75, 10.5]
    ph = _phase(target.shape[1], phase, seed=2)
    source.requires_grad_()
    target.requires_grad_()
    fn = lambda s, t: ops.raymarch(density, s, t, ph, lo, hi, 16)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (source, target), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("phase", PHASES)
def test_int64_addressing_path(monkeypatch, phase):
    """The INT64 specialisation (chosen for > 2^31 elements) computes the same, on a small problem."""
    assert kernels.needs_int64((1291, 1291, 1291), 3) and not kernels.needs_int64(SHAPE, 3 * 117 * 2)
    assert kernels.needs_int64((8, 8, 8), 2**31)
    monkeypatch.setattr(kernels, "needs_int64", lambda *args: True)
    density = _volume(torch.float32)
    source, target = _geometry(2, torch.float32)
    _compare(density, source, target, *INNER_BOX, phase=phase)


def test_tiny_matches_reference():
    assert kernels.TINY == volume.TINY


# ------------------------------------------------------------------------------------------------
# Identities: adjoint, determinism, every pixel written
# ------------------------------------------------------------------------------------------------


def test_adjoint_identity_float64():
    """<A x, y> = <x, A^T y>: A is the op as a linear map of the volume, A^T the backward's volume path."""
    g = torch.Generator().manual_seed(7)
    source, target = _geometry(2)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    y = torch.randn(2, 1, target.shape[1], generator=g, dtype=torch.float64)
    xg = x.clone().requires_grad_()
    ax = ops.raymarch(xg, source, target, _phase(target.shape[1]), *INNER_BOX, N_SAMPLES)
    (aty,) = torch.autograd.grad(ax, xg, y)
    lhs, rhs = float((ax.detach() * y).sum()), float((x * aty).sum())
    assert math.isclose(lhs, rhs, rel_tol=1e-12), (lhs, rhs)
    assert aty.abs().sum() > 0


def test_deterministic_volume_gradient():
    density = _volume(torch.float32)
    source, target = _geometry(2, torch.float32)
    g = torch.randn(2, 1, target.shape[1], generator=torch.Generator().manual_seed(9))
    ph = _phase(target.shape[1], dtype=torch.float32)
    runs = [
        _run(ops.raymarch, density, source, target, ph, *INNER_BOX, N_SAMPLES, g, deterministic=True) for _ in range(2)
    ]
    atomic = _run(ops.raymarch, density, source, target, ph, *INNER_BOX, N_SAMPLES, g)
    (out_a, grads_a), (out_b, grads_b) = runs
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)
    assert torch.equal(grads_a[1], atomic[1][1]) and torch.equal(grads_a[2], atomic[1][2])
    assert _rel(grads_a[0], atomic[1][0]) <= 1e-6
    assert grads_a[0].dtype == torch.float32


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
def test_deterministic_propagates_non_finite_upstream_gradient():
    density = _volume(torch.float32).requires_grad_()
    source, target = _geometry(1, torch.float32)
    out = ops.raymarch(density, source, target, _phase(target.shape[1]), *INNER_BOX, 8, deterministic=True)
    g = torch.ones_like(out)
    g[0, 0, 0] = float("inf")
    (grad,) = torch.autograd.grad(out, density, g)
    assert torch.isnan(grad).all()


def test_every_pixel_written_and_tail_masks():
    """NaN-poisoned output, small blocks (tails in rays and samples): every pixel written, none past the end.

    The phase buffer is a view with NaN past its end: a read past N would poison an output.
    """
    density = _volume(torch.float32)
    source, target = _geometry(2, torch.float32)
    batch, n = target.shape[:2]
    n_samples = 37
    phase_buffer = torch.full((n + 64,), float("nan"))
    phase_buffer[:n] = _phase(n, dtype=torch.float32)
    phase = phase_buffer[:n]
    buffer = torch.full((batch * n + 64,), float("nan"))
    out = buffer[: batch * n].view(batch, 1, n)
    kernels.raymarch_forward(density, source, target, phase, *INNER_BOX, n_samples, out=out, block_r=16, block_s=16)
    assert not torch.isnan(out).any(), "some pixels were never written"
    assert torch.isnan(buffer[batch * n :]).all(), "the kernel wrote past the output"
    ref = reference.raymarch(density, source, target, phase, *INNER_BOX, n_samples)
    assert _rel(out, ref) <= 1e-5
    # The backward with the same small blocks.
    g = torch.randn(batch, 1, n, generator=torch.Generator().manual_seed(2))
    grads = kernels.raymarch_backward(
        g,
        density,
        source,
        target,
        phase,
        *INNER_BOX,
        n_samples,
        need_pose=True,
        need_volume=True,
        block_r=16,
        block_s=16,
    )
    _, ref_grads = _run(reference.raymarch, density, source, target, phase, *INNER_BOX, n_samples, g)
    for a, b in zip(grads, ref_grads):
        assert _rel(a, b) <= 1e-4


def test_pose_only_backward_skips_volume():
    density = _volume(torch.float32)  # does not require grad
    source, target = _geometry(1, torch.float32)
    target.requires_grad_()
    phase = _phase(target.shape[1], dtype=torch.float32)
    out = ops.raymarch(density, source, target, phase, *INNER_BOX, 16)
    (gt,) = torch.autograd.grad(out.sum(), target)
    assert torch.isfinite(gt).all() and gt.abs().sum() > 0
    grad_vol, grad_src, _ = kernels.raymarch_backward(
        torch.ones_like(out), density, source, target.detach(), phase, *INNER_BOX, 16, need_pose=True, need_volume=False
    )
    assert grad_vol is None and grad_src.shape == source.shape


# ------------------------------------------------------------------------------------------------
# Through render(), torch.compile, validation
# ------------------------------------------------------------------------------------------------


def _world_geometry():
    g = torch.Generator().manual_seed(11)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = rotation @ torch.diag(torch.tensor([0.9, 1.3, 0.7], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-12.0, 5.0, 30.0])
    source, target = _geometry(2)
    to_world = lambda p: p @ affine[:3, :3].T + affine[:3, 3]  # noqa: E731
    return affine.float(), to_world(source).float(), to_world(target).float()


def test_render_triton_matches_torch():
    affine, source, target = _world_geometry()
    density = torch.zeros(SHAPE)
    density[2:-3, 4:-2, 3:-5] = _volume(torch.float32)[2:-3, 4:-2, 3:-5]  # an occupied box smaller than the grid
    outs = {b: render(density, affine, source, target, backend=b) for b in ("triton", "torch")}
    assert _rel(outs["triton"], outs["torch"]) <= 1e-5
    g = torch.randn(outs["torch"].shape, generator=torch.Generator().manual_seed(4))
    grads = {}
    for backend in ("triton", "torch"):
        leaves = [x.clone().requires_grad_() for x in (density, source, target)]
        out = render(*leaves[:1], affine, *leaves[1:], n_samples=40, backend=backend)
        grads[backend] = torch.autograd.grad(out, leaves, g)
    for a, b in zip(grads["triton"], grads["torch"]):
        assert _rel(a, b) <= 1e-4


def test_torch_compile_forward_backward_matches_eager():
    """torch.compile (Inductor) of a function calling the op, forward and backward, vs eager.

    Under the interpreter the op is an opaque custom_op with a fake implementation; on a GPU it is
    a triton_op that Inductor traces into (not exercised here: no GPU in this test run).
    """
    density = _volume(torch.float32, shape=(9, 11, 13))
    source, target = _geometry(1, torch.float32, shape=(9, 11, 13), det=(5, 4))
    lo, hi = volume.support_box((9, 11, 13))
    phase = _phase(target.shape[1], dtype=torch.float32)

    def loss(d, s, t):
        return (ops.raymarch(d, s * 1.0, t, phase, lo, hi, 16) * 2.0).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    results = []
    for fn in (compiled, loss):
        leaves = [x.clone().requires_grad_() for x in (density, source, target)]
        value = fn(*leaves)
        results.append((value.detach(), torch.autograd.grad(value, leaves)))
    (v_c, g_c), (v_e, g_e) = results
    torch.testing.assert_close(v_c, v_e, rtol=1e-6, atol=0)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_opcheck():
    """torch.library.opcheck: schema, fake implementation, autograd registration, AOT dispatch."""
    density = _volume(torch.float32, shape=(5, 6, 7))
    source, target = _geometry(1, torch.float32, shape=(5, 6, 7), det=(2, 3))
    lo, hi = volume.support_box((5, 6, 7))
    phase = _phase(target.shape[1], dtype=torch.float32)
    torch.library.opcheck(torch.ops.tritondrr.raymarch.default, (density, source, target, phase, lo, hi, 8, False))


def test_validation_errors_name_the_argument():
    density = _volume(torch.float32, shape=(4, 5, 6))
    source, target = _geometry(1, torch.float32, shape=(4, 5, 6), det=(2, 2))
    box = volume.support_box((4, 5, 6))
    ph = _phase(target.shape[1], dtype=torch.float32)
    cases = [
        (ValueError, "density", (density[0], source, target, ph, *box, 8)),
        (TypeError, "density", (density.int(), source, target, ph, *box, 8)),
        (ValueError, "source", (density, source[0], target, ph, *box, 8)),
        (ValueError, "target", (density, source, target[..., :2], ph, *box, 8)),
        (TypeError, "target", (density, source, target.half(), ph, *box, 8)),
        (TypeError, "share a dtype", (density, source.double(), target, ph, *box, 8)),
        (ValueError, "source must be", (density, source.expand(1, 3, 3), target, ph, *box, 8)),
        (ValueError, "n_samples", (density, source, target, ph, *box, 0)),
        (ValueError, "lo", (density, source, target, ph, [0.0, 0.0], box[1], 8)),
        (TypeError, "hi", (density, source, target, ph, box[0], 3.0, 8)),
    ]
    for exc, words, args in cases:
        with pytest.raises(exc, match=words):
            ops.raymarch(*args)


def test_phase_validation_errors_and_conversion():
    """phase must be a floating (N,) tensor on the rays' device; other float dtypes are converted."""
    density = _volume(torch.float32, shape=(4, 5, 6))
    source, target = _geometry(1, torch.float32, shape=(4, 5, 6), det=(2, 2))
    box = volume.support_box((4, 5, 6))
    n = target.shape[1]
    ph = _phase(n, dtype=torch.float32)
    cases = [
        (TypeError, "phase must be a torch.Tensor", [0.5] * n),
        (ValueError, r"phase must be \(N,\)", ph[None]),  # (1, N)
        (ValueError, r"phase must be \(N,\)", ph.expand(2, n)),  # one row per pose is not accepted
        (ValueError, r"phase must be \(N,\)", ph[:-1]),  # too short
        (ValueError, r"phase must be \(N,\)", torch.tensor(0.5)),  # 0-d
        (TypeError, "phase must be a floating tensor", torch.zeros(n, dtype=torch.int64)),
        (TypeError, "phase must be a floating tensor", torch.zeros(n, dtype=torch.bool)),
        (ValueError, "phase is on meta", ph.to("meta")),
    ]
    for exc, words, phase in cases:
        with pytest.raises(exc, match=words):
            ops.raymarch(density, source, target, phase, *box, 8)
    # float64 / float16 / non-contiguous phases are converted to the rays' dtype and made contiguous.
    out = ops.raymarch(density, source, target, ph, *box, 8)
    assert torch.equal(out, ops.raymarch(density, source, target, ph.double(), *box, 8))
    strided = torch.stack([ph, torch.full_like(ph, float("nan"))], dim=1)[:, 0]
    assert not strided.is_contiguous()
    assert torch.equal(out, ops.raymarch(density, source, target, strided, *box, 8))
    half = _phase(n, dtype=torch.float16)
    assert torch.equal(
        ops.raymarch(density, source, target, half, *box, 8),
        ops.raymarch(density, source, target, half.float(), *box, 8),
    )
    # A phase that requires grad gets none (it is not differentiable) and breaks nothing.
    leaf = ph.clone().requires_grad_()
    d = density.clone().requires_grad_()
    gd, gp = torch.autograd.grad(ops.raymarch(d, source, target, leaf, *box, 8).sum(), (d, leaf), allow_unused=True)
    assert torch.isfinite(gd).all() and gp is None


def test_empty_ray_sets():
    density = _volume(torch.float32, shape=(4, 5, 6)).requires_grad_()
    target = torch.zeros(2, 0, 3, requires_grad=True)
    source = torch.zeros(2, 1, 3, requires_grad=True)
    out = ops.raymarch(density, source, target, torch.zeros(0), [-1.0] * 3, [4.0, 5.0, 6.0], 8)
    assert out.shape == (2, 1, 0)
    grads = torch.autograd.grad(out.sum(), (density, source, target))
    assert [tuple(g.shape) for g in grads] == [(4, 5, 6), (2, 1, 3), (2, 0, 3)]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_non_contiguous_volume_warns_once_and_matches():
    base = _volume(torch.float32)
    density = base.transpose(0, 2).contiguous().transpose(0, 2)  # same values, non-contiguous
    assert not density.is_contiguous()
    source, target = _geometry(1, torch.float32)
    phase = _phase(target.shape[1], dtype=torch.float32)
    ops._warned_noncontiguous = False
    with pytest.warns(UserWarning, match="density is not contiguous"):
        out = ops.raymarch(density, source, target, phase, *INNER_BOX, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.raymarch(density, source, target, phase, *INNER_BOX, 16)  # no second warning
    assert torch.equal(out, ops.raymarch(base, source, target, phase, *INNER_BOX, 16))
