"""Test configuration: Triton kernels run under the interpreter on CPU, one thread per test run."""

import os

# Must be set before any module defining @triton.jit kernels is imported (TRITON.md).
os.environ.setdefault("TRITON_INTERPRET", "1")
# The compiled CPU path is tested against the grid_sample path in tests/renderers/trilinear/test_trilinear_cpu.py only.
os.environ.setdefault("TRITONDRR_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for backend tests: cpu, cuda or mps")


@pytest.fixture
def device(request):
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    if name == "mps" and not torch.backends.mps.is_available():
        pytest.skip("MPS not available")
    return torch.device(name)
