"""tritondrr against DiffDRR 0.6.1 and nanodrr, same volume, same rays, same run.

One case = implementation x mode x detector size. The timed callable renders through the public
API and synchronises the device before returning; ``extra_info`` carries what the report needs
(see bench/README.md for every field and how it is measured).
"""

from __future__ import annotations

import pytest
import torch

import drrbench as B

SIZES = [(1, h, h) for h in (B.QUICK_HEIGHTS if B.quick() else B.HEIGHTS)]
SIZES.append(B.QUICK_BATCH if B.quick() else B.BATCH)


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

    benchmark.group = f"{mode}-{_size_id(size)}"
    rotations, translations = B.seed_pose(batch, device)
    try:
        impl = B.build(impl_name, scene, height, width, device, volume_grad=(mode == "backward_volume"))
        run = B.make_callable(impl, mode, rotations, translations, device)
        seconds, image, peak, method = B.warm_up(run, device)
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        pytest.skip(f"out of memory on {device}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):
            raise
        pytest.skip(f"out of memory on {device}: {str(e).splitlines()[0]}")

    rays = batch * height * width
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
    )
    info.update(B.accuracy(scene, impl, image, rotations, translations))
    del image

    rounds = B.rounds_for(seconds, device)
    info["rounds"] = rounds
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median = stats.stats.median
        info["time_median_s"] = median
        info["samples_per_s"] = rays * impl.samples_per_ray / median
