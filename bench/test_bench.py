"""tritondrr against DiffDRR 0.6.1 and nanodrr, same volume, same rays, same run.

One case = implementation x mode x detector size. The timed callable renders through the public
API and synchronises the device before returning; ``extra_info`` carries what the report needs
(see bench/README.md for every field and how it is measured).
"""

from __future__ import annotations

import pytest
import torch

import drrbench as B

SIZES = B.sizes()  # the profile's fixed case list (BENCH_PROFILE: quick, full, gpu, dry)


def _size_id(size):
    batch, height, width = size
    return f"{height}" if batch == 1 else f"batch{batch}x{height}x{width}"


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
@pytest.mark.parametrize("mode", B.MODES)
@pytest.mark.parametrize("impl_name", B.IMPLS)
def test_drr(benchmark, bench_device, scene, impl_name, mode, size):
    batch, height, width = size
    device = bench_device
    if (why := B.availability(impl_name, device)) is not None:
        pytest.skip(why)
    if impl_name.startswith("diffdrr") and scene.diffdrr_subject is None:
        pytest.skip("DiffDRR's subject needs DiffDRR's example CT (nibabel, torchio)")
    if (why := B.cap_reason(impl_name, mode, height, width, batch, device)) is not None:
        pytest.skip(why)

    rays = batch * height * width
    benchmark.group = f"{mode}-{_size_id(size)}"
    rotations, translations = B.seed_pose(batch, device)
    try:
        impl = B.build(impl_name, scene, height, width, device, volume_grad=(mode == "backward_volume"))
        run = B.make_callable(impl, mode, rotations, translations, device)
        calls = 2 if device.type == "cuda" or impl_name == "tritondrr" else 1
        seconds, image, peak, method = B.warm_up(run, device, calls)
        # A CPU peer call that took over LONG_CALL_S is timed once more, not ten times.
        long_call = device.type == "cpu" and impl_name != "tritondrr" and seconds > B.LONG_CALL_S
        rounds = 1 if long_call else B.rounds_for(seconds, device)
        del image  # accuracy is measured by bench/accuracy.py, not from the timed calls
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        pytest.skip(f"out of memory on {device}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):
            raise
        pytest.skip(f"out of memory on {device}: {str(e).splitlines()[0]}")

    info = benchmark.extra_info
    info.update(
        impl=impl_name,
        mode=mode,
        height=height,
        width=width,
        batch=batch,
        rays=rays,
        device=B.device_name(device),
        device_type=device.type,
        torch=torch.__version__,
        triton=B.versions()["triton"],
        threads=torch.get_num_threads(),
        volume=scene.name,
        volume_shape=list(scene.shape),
        samples_per_ray=impl.samples_per_ray,
        peak_mem_bytes=peak,
        mem_method=method,
        warmup_s=seconds,
        rounds=rounds,
    )
    info["profile"] = B.profile().name
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median = stats.stats.median
        info["time_median_s"] = median
        info["samples_per_s"] = rays * impl.samples_per_ray / median


def test_same_rays(bench_device, scene):
    """The comparison is fair only if every implementation casts the same rays for the same pose."""
    names = [n for n in ("tritondrr", "diffdrr-trilinear", "nanodrr-torch") if B.availability(n, bench_device) is None]
    if scene.diffdrr_subject is None:
        names = [n for n in names if not n.startswith("diffdrr")]
    if len(names) < 2:
        pytest.skip(f"fewer than two implementations installed ({names})")
    assert B.check_same_rays(scene, names, bench_device) < 1e-2  # mm
