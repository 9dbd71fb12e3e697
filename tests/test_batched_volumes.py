"""Many volumes per call: ``render`` with a sequence of volumes, ``BatchDRR``, and the packed-pool op.

Oracle: B separate single-volume renders (``render`` with one volume per call, ``DRR`` with one
subject), outputs and every gradient, on both backends (the Triton one under the interpreter).
The pooled Triton path reads each pose's volume offset, shape, box and sample count from device
tensors; the separate renders pass them as launch arguments, so agreement tests the per-pose
indexing. Volumes differ in shape, spacing, rotation and occupied box.
"""

from __future__ import annotations

import pytest
import torch

import tritondrr as td
from tritondrr.kernels import trilinear as kernels
from tritondrr.render import render
from tritondrr.renderers.trilinear import op

SHAPES = [(9, 11, 13), (12, 7, 10), (8, 8, 6)]


def _volumes(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    volumes = []
    for shape in SHAPES:
        v = torch.zeros(shape, dtype=torch.float64)
        v[1:-1, 1:-2, 2:-1] = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)[1:-1, 1:-2, 2:-1]
        volumes.append(v.to(dtype))
    return volumes


def _affines(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        rotation = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
        a = torch.eye(4, dtype=torch.float64)
        a[:3, :3] = rotation @ torch.diag(0.7 + torch.rand(3, generator=g, dtype=torch.float64))
        a[:3, 3] = -(a[:3, :3] @ (torch.tensor(shape, dtype=torch.float64) / 2))  # centred on the origin
        out.append(a)
    return torch.stack(out).to(dtype)


def _rays(batch, dtype=torch.float64, seed=2, n=20):
    """World rays through the origin region: source (B, 1, 3), target (B, N, 3), mm."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(batch, 3, generator=g, dtype=torch.float64), dim=-1)
    source = 30.0 * direction
    target = -30.0 * direction[:, None] + 6.0 * torch.randn(batch, n, 3, generator=g, dtype=torch.float64)
    return source[:, None].to(dtype), target.to(dtype)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def _separate(volumes, affines, index, source, target, grad_out, **kw):
    """B single-volume renders: output and gradients (volumes, source, target)."""
    leaves = [v.clone().requires_grad_() for v in volumes]
    src, tgt = source.clone().requires_grad_(), target.clone().requires_grad_()
    outs = [
        render(leaves[v], affines[v], src[b : b + 1], tgt[b : b + 1], **{k: (x[v] if k in ("mask", "box") else x) for k, x in kw.items()})
        for b, v in enumerate(index)
    ]
    out = torch.cat(outs)
    return out.detach(), torch.autograd.grad(out, [*leaves, src, tgt], grad_out)


def _batched(volumes, affines, index, source, target, grad_out, **kw):
    leaves = [v.clone().requires_grad_() for v in volumes]
    src, tgt = source.clone().requires_grad_(), target.clone().requires_grad_()
    seq_kw = {k: ([x[v] for v in index] if k in ("mask", "box") else x) for k, x in kw.items()}
    out = render([leaves[v] for v in index], affines[index], src, tgt, **seq_kw)
    return out.detach(), torch.autograd.grad(out, [*leaves, src, tgt], grad_out)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_render_sequence_equals_separate_renders_with_gradients(backend):
    """Four poses over three volumes (one volume used twice: its gradient sums both), float64.

    Measured: outputs and pose gradients bitwise equal (torch: source 3.6e-16), volume gradients 1.9e-16
    (summation order).
    """
    volumes, affines = _volumes(), _affines()
    index = [1, 0, 2, 1]
    source, target = _rays(len(index))
    grad_out = torch.randn(len(index), 1, target.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours, our_grads = _batched(volumes, affines, index, source, target, grad_out, backend=backend)
    ref, ref_grads = _separate(volumes, affines, index, source, target, grad_out, backend=backend)
    assert ours.shape == ref.shape == (4, 1, target.shape[1])
    assert (ref != 0).any() and (ref == 0).any(), "rays must hit and miss"
    assert _rel(ours, ref) <= 1e-12
    for name, a, b in zip(("v0", "v1", "v2", "source", "target"), our_grads, ref_grads):
        assert a.shape == b.shape and _rel(a, b) <= 1e-12, name
    assert our_grads[1].abs().sum() > 0


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_render_sequence_with_masks_triton(soft):
    volumes, affines = _volumes(), _affines()
    g = torch.Generator().manual_seed(4)
    masks = [torch.randint(0, 3, s, generator=g) for s in SHAPES]
    index = [2, 0, 1]
    source, target = _rays(len(index), seed=5)
    grad_out = torch.randn(len(index), 3, target.shape[1], generator=g, dtype=torch.float64)
    kw = {"mask": masks, "n_channels": 3, "soft_labels": soft, "n_samples": 20, "backend": "triton"}
    ours, our_grads = _batched(volumes, affines, index, source, target, grad_out, **kw)
    ref, ref_grads = _separate(volumes, affines, index, source, target, grad_out, **kw)
    assert ours.shape == (3, 3, target.shape[1]) and _rel(ours, ref) <= 1e-12
    for a, b in zip(our_grads, ref_grads):
        assert _rel(a, b) <= 1e-12


def test_pool_int64_path_and_zero_copy_views(monkeypatch):
    """The INT64 specialisation of the pooled kernels, and volumes that are views of one buffer
    (used in place, no packing copy) give the same as separate launches."""
    volumes = _volumes()
    flat = torch.cat([v.reshape(-1) for v in volumes])
    views, start = [], 0
    for v in volumes:
        views.append(flat[start : start + v.numel()].view(v.shape))
        start += v.numel()
    packed, offsets = op._pack(views)
    assert packed.data_ptr() == flat.data_ptr() and offsets == [0, volumes[0].numel(), volumes[0].numel() + volumes[1].numel()]
    index = torch.tensor([2, 1, 0])
    g = torch.Generator().manual_seed(6)
    source = torch.randn(3, 1, 3, generator=g, dtype=torch.float64) * 15 + 5
    target = torch.randn(3, 16, 3, generator=g, dtype=torch.float64) * 4 + 5
    phase = torch.rand(16, generator=g, dtype=torch.float64)
    boxes = [([-1.0, -1.0, -1.0], [float(n) for n in s]) for s in SHAPES]
    counts = [13, 21, 8]
    monkeypatch.setattr(kernels, "needs_int64", lambda *args: True)
    ours = op.raymarch_pool(views, index, source, target, phase, boxes, counts)
    ref = torch.cat([op.raymarch(volumes[v], source[b : b + 1], target[b : b + 1], phase, *boxes[v], counts[v]) for b, v in enumerate(index.tolist())])
    assert _rel(ours, ref) <= 1e-14


def test_batch_drr_equals_one_drr_per_subject_with_pose_gradients():
    subjects = [td.load_example_ct(shape=(20, 18, 12)), td.load_example_ct(shape=(14, 16, 18))]
    index = torch.tensor([1, 0, 1])
    rotations = torch.tensor([[0.1, 0.2, -0.1], [0.0, 0.3, 0.2], [0.3, -0.2, 0.1]])
    translations = torch.tensor([[0.0, 850.0, 0.0], [10.0, 840.0, -5.0], [-5.0, 860.0, 8.0]])
    options = {"sdd": 1020.0, "height": 8, "delx": 40.0}
    pose = {"parameterization": "euler_angles", "convention": "ZXY"}
    for backend in ("triton", "torch"):
        batch = td.BatchDRR(subjects, backend=backend, **options)
        rot = rotations.clone().requires_grad_()
        img = batch(rot, translations, subject_index=index, **pose)
        (grad,) = torch.autograd.grad(img.square().sum(), rot)
        for b, s in enumerate(index.tolist()):
            single = td.DRR(subjects[s], backend=backend, **options)
            r = rotations[b : b + 1].clone().requires_grad_()
            ref = single(r, translations[b : b + 1], **pose)
            (ref_grad,) = torch.autograd.grad(ref.square().sum(), r)
            assert img.shape[1:] == ref.shape[1:] and ref.abs().max() > 0
            assert _rel(img[b : b + 1].detach(), ref.detach()) <= 1e-5  # float32; measured 0
            assert _rel(grad[b : b + 1], ref_grad) <= 1e-4  # float32; measured <= 1.1e-6


def test_batch_drr_validation():
    subjects = [td.load_example_ct(shape=(12, 12, 8)), td.load_example_ct(shape=(10, 10, 10))]
    batch = td.BatchDRR(subjects, sdd=1020.0, height=4, delx=40.0, backend="torch")
    rot, xyz = torch.zeros(2, 3), torch.tensor([[0.0, 850.0, 0.0]]).expand(2, 3)
    pose = {"parameterization": "euler_angles", "convention": "ZXY"}
    with pytest.raises(ValueError, match=r"subject_index values must be in \[0, 2\)"):
        batch(rot, xyz, subject_index=torch.tensor([0, 2]), **pose)
    with pytest.raises(ValueError, match="subject_index must be a"):
        batch(rot, xyz, subject_index=[0, 1], **pose)
    # The example subjects carry labelmaps: channels sum to the plain image (float32, measured 1.6e-7).
    channels = batch(rot, xyz, subject_index=torch.tensor([0, 1]), mask_to_channels=True, **pose)
    plain = batch(rot, xyz, subject_index=torch.tensor([0, 1]), **pose)
    assert channels.shape[1] > 1 and _rel(channels.sum(dim=1, keepdim=True), plain) <= 1e-5
    with pytest.raises(ValueError, match="subjects must hold"):
        td.BatchDRR([], sdd=1020.0, height=4, delx=40.0)


def test_render_sequence_validation():
    volumes, affines = _volumes(torch.float32), _affines(torch.float32)
    source, target = _rays(3, torch.float32)
    cases = [
        ("affine must be", (volumes, affines[:2], source, target)),
        ("target must be", (volumes, affines, source[:2], target[:2])),
        ("at least one volume", ([], affines, source, target)),
        (r"density\[1\] must be", ([volumes[0], volumes[1].long(), volumes[2]], affines, source, target)),
    ]
    for words, args in cases:
        with pytest.raises(ValueError, match=words):
            render(*args)
    with pytest.raises(ValueError, match="mask must be a sequence of 3"):
        render(volumes, affines, source, target, mask=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="share one dtype"):
        render([volumes[0], volumes[1].double(), volumes[2]], affines, source, target, backend="triton")


def test_batch_drr_docstring_example():
    import doctest

    import tritondrr.batch

    result = doctest.testmod(tritondrr.batch, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


def test_pool_deterministic_volume_gradient_and_per_ray_sources():
    """Fixed-point (deterministic) volume gradients of the pool: bitwise repeatable, equal to the
    float atomics to 1e-6 (measured ~1e-7, float32); per-ray (B, N, 3) sources."""
    volumes = _volumes(torch.float32)
    g = torch.Generator().manual_seed(7)
    index = torch.tensor([0, 2, 0])
    source = torch.randn(3, 16, 3, generator=g) * 15 + 5
    target = torch.randn(3, 16, 3, generator=g) * 4 + 5
    phase = torch.rand(16, generator=g)
    boxes = [([-1.0, -1.0, -1.0], [float(n) for n in s]) for s in SHAPES]
    grad_out = torch.randn(3, 1, 16, generator=g)

    def grads(deterministic):
        leaves = [v.clone().requires_grad_() for v in volumes]
        out = op.raymarch_pool(leaves, index, source, target, phase, boxes, [12, 9, 10], deterministic=deterministic)
        return torch.autograd.grad(out, [leaves[0], leaves[2]], grad_out)

    a, b, atomic = grads(True), grads(True), grads(False)
    for x, y, z in zip(a, b, atomic):
        assert torch.equal(x, y) and x.abs().sum() > 0
        assert _rel(x, z) <= 1e-6
    ref = torch.cat(
        [op.raymarch(volumes[v], source[i : i + 1], target[i : i + 1], phase, *boxes[v], [12, 9, 10][v]) for i, v in enumerate(index.tolist())]
    )
    assert _rel(op.raymarch_pool(volumes, index, source, target, phase, boxes, [12, 9, 10]), ref) <= 1e-6
