"""pytest-benchmark configuration: device option, the shared scene, skips recorded in the JSON.

Run with ``make bench`` (installs the peers, writes ``bench/results/<device-slug>.json`` and the
report) or ``python -m pytest bench --benchmark-json=...``. ``BENCH_QUICK=1`` keeps heights 100
and 200 and a small batch case.
"""

from __future__ import annotations

import pytest
import torch

import drrbench

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
        "skipped": _SKIPPED,
    }
