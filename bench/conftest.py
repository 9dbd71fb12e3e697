"""pytest-benchmark configuration: device option, the shared scene, skips recorded in the JSON.

Run with ``make bench`` (installs the peers, writes ``bench/results/<device-slug>.json`` and the
report) or ``python -m pytest bench --benchmark-json=...``. ``BENCH_QUICK=1`` keeps heights 100
and 200 and a small batch case; ``BENCH_PROFILE`` picks a fixed case list (quick, full, gpu, dry;
``drrbench.PROFILES``).
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

if os.path.dirname(__file__) not in sys.path:  # any --import-mode: drrbench sits beside this file
    sys.path.insert(0, os.path.dirname(__file__))

import drrbench  # noqa: E402

_SKIPPED: list[dict] = []


def pytest_addoption(parser):
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.addoption("--bench-device", default=default, help=f"device to benchmark on: cpu or cuda (default {default})")


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    name = request.config.getoption("--bench-device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device(name)


@pytest.fixture(scope="session")
def scene():
    return drrbench.load_scene()


@pytest.fixture(autouse=True)
def _release_memory(bench_device):
    """Each case starts from a clean heap / CUDA cache, whatever the previous one left."""
    yield
    gc.collect()
    if bench_device.type == "cuda":
        torch.cuda.empty_cache()


def pytest_configure(config):
    # torchio (imported by the peers) uses torch.jit.script_method, deprecated in torch 2.13.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    """Smallest detectors first, every implementation and mode side by side at each size: a run
    stopped early (the GPU run's stage timeout) has measured the smaller sizes for everyone."""

    def key(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "size" not in params:
            return (-1, 0, 0)
        batch, height, width = params["size"]
        return (batch * height * width, drrbench.IMPLS.index(params["impl_name"]), drrbench.MODES.index(params["mode"]))

    items.sort(key=key)


def pytest_runtest_logreport(report):
    """Keep every skipped case with its reason, so the results say what was not measured."""
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"name": report.nodeid.split("::")[-1], "reason": reason.removeprefix("Skipped: ")})


def pytest_benchmark_update_machine_info(config, machine_info):
    device = torch.device(config.getoption("--bench-device"))
    machine_info["bench_device"] = drrbench.device_name(device)
    machine_info["bench_device_type"] = device.type
    machine_info["bench_device_slug"] = drrbench.device_slug(device)
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["versions"] = drrbench.versions()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    scene = drrbench.load_scene()
    output_json["tritondrr_bench"] = {
        "scene": scene.name,
        "volume_shape": list(scene.shape),
        "quick": drrbench.quick(),
        "profile": drrbench.profile().name,
        "cases": [list(size) for size in drrbench.sizes()],
        "git": drrbench.git_state(),
        "skipped": _SKIPPED,
    }
