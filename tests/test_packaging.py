"""The wheel ships the kernels as ``tritondrr.kernels`` (kernels/ mapped by package-dir)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="not a source checkout")
def test_wheel_contains_the_kernels_and_the_command(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("tritondrr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__", "drr", "render", "volume", "renderers/__init__", "renderers/trilinear/naive", "renderers/trilinear/op", "kernels/__init__", "kernels/_common", "kernels/trilinear"):
        assert f"tritondrr/{module}.py" in names
    assert not any(name.startswith(("tests/", "bench/", "kernels/")) for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tritondrr = tritondrr.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_every_package_is_listed_for_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "tritondrr").rglob("__init__.py")
        if not init.parent.is_symlink() and "kernels" not in init.parent.relative_to(ROOT).parts
    }
    assert found | {"tritondrr.kernels"} == listed
