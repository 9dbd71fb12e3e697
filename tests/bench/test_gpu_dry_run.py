"""The GPU run rehearsed on CPU: ``bench/gpu_check.sh --dry-run`` end to end, then ``bench/gpu_ingest.py``.

The dry run does every stage of the GPU run (setup, CUDA tests, kernel benchmark, DRR suite,
accuracy) on CPU with tiny sizes under ``TRITON_INTERPRET=1``, so on the lent GPU the only unknown
is the GPU. One dry run (about 40-80 s on 2 busy cores) serves every test here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"
INGEST = REPO / "bench" / "gpu_ingest.py"
FILES = {"gpu_check.log", "env.json", "tests.xml", "kernels.json", "drr.json", "accuracy.json", "skipping.json"}


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BENCH_PROFILE", "BENCH_QUICK")}
    env.update(PYTHON=sys.executable, PEERS_DIR="none", GPU_CHECK_REVISION="/nonexistent")
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("timeout") is None or shutil.which("bash") is None:
        pytest.skip("gpu_check.sh needs bash and coreutils' timeout")
    out = tmp_path_factory.mktemp("gpu") / "out"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], env=_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=400)  # fmt: skip
    return out, done


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_every_stage_runs_and_writes_at_most_eight_flat_files(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    names = set(os.listdir(out))
    assert names == FILES, names  # the device tool returns at most 8 files, folders cost depth
    assert all((out / n).is_file() for n in names)
    env = _json(out / "env.json")
    assert env["dry_run"] is True
    assert [s["name"] for s in env["stages"]] == ["setup", "tests", "kernels", "drr", "accuracy", "skipping"]
    assert all(s["status"] == "ok" for s in env["stages"]), env["stages"]
    assert sum(s["budget_s"] for s in env["stages"]) < 8 * 60
    assert env["peers"] == "absent"
    # The summary table is the last thing printed: the device tool returns the end of the output.
    assert "accuracy   ok" in done.stdout and "skipping   ok" in done.stdout


def test_kernel_benchmark_covers_every_renderer_and_configurations_agree(dry_run):
    out, _ = dry_run
    sys.path.insert(0, str(REPO))
    from tritondrr.renderers import RENDERER_NAMES

    kernels = _json(out / "kernels.json")
    assert kernels["interpreter"] is True and "wall-clock" in kernels["timer"]
    seen = {r["renderer"] for r in kernels["rows"]} | {s["renderer"] for s in kernels["skipped"] + kernels["errors"]}
    assert seen == set(RENDERER_NAMES)  # a renderer is measured, or skipped / failed with its reason
    modes = {(r["mode"], r["config"] is None) for r in kernels["rows"] if r["renderer"] == "trilinear"}
    assert modes == {(m, d) for m in ("forward", "backward_pose", "backward_volume") for d in (True, False)}
    for row in kernels["rows"]:
        assert "error" not in row, row
        assert row["ms"] > 0 and math.isfinite(row["ms"])
    # Another launch configuration computes the same images: one rounding apart in float32 (0 measured).
    for row in kernels["rows"]:
        if row["mode"] == "forward" and row.get("max_rel_diff_vs_default") is not None:
            assert row["max_rel_diff_vs_default"] < 1e-5
    first = next(r for r in kernels["rows"] if r["renderer"] == "trilinear" and r["mode"] == "forward")
    assert first["finite"] and first["max_abs"] > 0  # the phantom is not all air: the rays saw something
    assert kernels["gather_ceiling"] and "ms" in kernels["gather_ceiling"][0]


def test_drr_suite_and_accuracy_have_the_dry_profile(dry_run):
    out, _ = dry_run
    drr = _json(out / "drr.json")
    assert drr["tritondrr_bench"]["profile"] == "dry"
    cases = {(b["extra_info"]["mode"], b["extra_info"]["height"], b["extra_info"]["batch"])
             for b in drr["benchmarks"] if b["extra_info"].get("impl") == "tritondrr"}  # fmt: skip
    sizes = [tuple(c) for c in drr["tritondrr_bench"]["cases"]]
    assert cases == {(m, h, b) for m in ("forward", "backward_pose", "backward_volume") for b, h, _ in sizes}
    accuracy = _json(out / "accuracy.json")
    rows = [r for r in accuracy["rows"] if r["impl"] == "tritondrr"]
    assert len(rows) == len(sizes)
    for row in rows:
        # Against tests/oracles.py's exact integral: 5.9e-4 median, 1.8e-3 p99 measured (38 samples per ray).
        assert 0 < row["rel_err_median"] < 1e-2 and row["rel_err_p99"] < 2e-2


def _ingest(files, results, readme, *extra):
    return subprocess.run([sys.executable, str(INGEST), str(files), "--results", str(results), "--readme",
                           str(readme), *extra], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_ingest_writes_results_and_the_readme_section(dry_run, tmp_path):
    out, _ = dry_run
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    results = tmp_path / "results"
    done = _ingest(out, results, readme, "--allow-dirty")
    assert done.returncode == 0, done.stdout + done.stderr
    names = set(os.listdir(results))
    slug = next(n for n in names if n.endswith("-gpu-check.json")).removesuffix("-gpu-check.json")
    assert slug.startswith("dryrun-")  # a dry run never takes a real device's file names
    for suffix in (
        ".json", ".md", "-accuracy.json", "-kernels.json", "-kernels.md", "-gpu-check.json", "-gpu-check.log",
        "-skipping.json", "-skipping.md",
    ):  # fmt: skip
        assert slug + suffix in names, names
    check = _json(results / f"{slug}-gpu-check.json")
    assert check["tests"]["tests"] >= 1 and check["tests"]["failures"] == 0
    text = readme.read_text()
    assert "old" not in text and "<!-- bench:start -->" in text and "tritondrr" in text
    md = (results / f"{slug}.md").read_text()
    assert "## Kernels" in md and "## The GPU run" in md and "profile dry" in md


@pytest.mark.parametrize("dirty", [True, None])
def test_ingest_refuses_a_dirty_or_unknown_revision(dry_run, tmp_path, dirty):
    out, _ = dry_run
    files = tmp_path / "files"
    shutil.copytree(out, files)
    env = _json(files / "env.json")
    env["git"] = {"describe": "abc1234-dirty" if dirty else None, "commit": None, "dirty": dirty}
    (files / "env.json").write_text(json.dumps(env))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\n<!-- bench:end -->\n")
    done = _ingest(files, tmp_path / "results", readme)
    assert done.returncode == 2 and "refusing" in done.stderr
    assert not (tmp_path / "results").exists()  # nothing written


def test_skipping_stage_measures_every_renderer_on_and_off(dry_run):
    out, _ = dry_run
    skipping = _json(out / "skipping.json")
    assert {r["impl"] for r in skipping["rows"]} == {"tritondrr", "tritondrr-siddon", "tritondrr-exact"}
    for row in skipping["rows"]:
        assert row["forward_on_s"] > 0 and row["pose_backward_off_s"] > 0
        # Skipping must not change the image beyond float32 rounding (2.3e-7 measured on the phantom).
        assert row["max_rel_diff"] < 1e-5
        assert 0 < row["occupied_bricks"] < 1  # the phantom has air to skip
