"""Turn the files of a GPU run (``bench/gpu_check.sh OUT_DIR``) into committed results and the report.

Usage (from the repository root, where the device tool put the returned files)::

    python bench/gpu_ingest.py FILES_DIR [--results bench/results] [--readme README.md | --no-readme] [--allow-dirty]

From ``FILES_DIR`` (``env.json``, ``gpu_check.log``, ``tests.xml``, ``kernels.json``, ``drr.json``,
``accuracy.json``, ``skipping.json``; any may be missing when its stage did not finish) it writes, into the results
folder, with ``<slug>`` the device's (``cuda-nvidia-h200`` on an H200; ``dryrun-<cpu slug>`` for the
files of a dry run, so that they never replace a real run's):

- ``<slug>.json`` (the DRR suite), ``<slug>-accuracy.json``, ``<slug>-kernels.json``,
  ``<slug>-skipping.json``: as measured, and ``<slug>-skipping.md`` (bench/skipping.py's table);
- ``<slug>-gpu-check.json``: ``env.json`` plus the CUDA tests' summary read from ``tests.xml``;
- ``<slug>-gpu-check.log``: the run's log;
- ``<slug>-kernels.md``: the kernel benchmark's tables;

then runs ``bench/report.py`` on every results file of the folder (``<slug>.md``, ``.png`` and the
README's benchmark section; ``--no-readme`` skips the README). A run whose recorded revision is
dirty or unknown is refused unless ``--allow-dirty`` (report.py applies the same rule to every
file it reads).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import report  # noqa: E402

#: Companion files of a results file: not results files themselves.
SUFFIXES = ("-accuracy.json", "-kernels.json", "-gradients.json", "-gpu-check.json", "-skipping.json")


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def tests_summary(path) -> dict | None:
    """Counts and failing test ids from a JUnit XML report."""
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    out["failed"] = failed
    return out


def slug_of(files: str, drr, kernels, env) -> str:
    if drr and drr.get("machine_info", {}).get("bench_device_slug"):
        return drr["machine_info"]["bench_device_slug"]
    name = (kernels or {}).get("device") or (env or {}).get("device") or "unknown"
    kind = (kernels or {}).get("device_type") or ("cpu" if (env or {}).get("dry_run") else "cuda")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug if slug.startswith(kind) else f"{kind}-{slug}"


def results_files(folder: str) -> list[str]:
    """Every results file of the folder (``<slug>.json``), companions and SASS counts left out."""
    names = sorted(f for f in os.listdir(folder) if f.endswith(".json") and not f.endswith(SUFFIXES)
                   and not f.startswith("sass-"))  # fmt: skip
    return [os.path.join(folder, f) for f in names]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", help="the folder holding the GPU run's returned files")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--readme", default=os.path.join(os.path.dirname(HERE), "README.md"))
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--allow-dirty", action="store_true", help="ingest a run of a dirty or unknown revision")
    args = parser.parse_args(argv)

    env = read_json(os.path.join(args.files, "env.json"))
    drr = read_json(os.path.join(args.files, "drr.json"))
    kernels = read_json(os.path.join(args.files, "kernels.json"))
    accuracy = read_json(os.path.join(args.files, "accuracy.json"))
    if not any((env, drr, kernels, accuracy)):
        print(f"{args.files}: none of env.json, drr.json, kernels.json, accuracy.json", file=sys.stderr)
        return 1
    git = (env or {}).get("git") or ((drr or {}).get("tritondrr_bench") or {}).get("git") or {}
    if git.get("dirty") is not False and not args.allow_dirty:
        state = "a dirty tree" if git.get("dirty") else "an unknown revision"
        print(f"{args.files}: the run was measured on {state} ({git.get('describe')}): refusing it; commit, "
              "run `make gpu-prepare`, run again, or pass --allow-dirty", file=sys.stderr)  # fmt: skip
        return 2

    slug = slug_of(args.files, drr, kernels, env)
    profile = ((drr or {}).get("tritondrr_bench") or {}).get("profile")
    if (env or {}).get("dry_run") or profile == "dry":  # never mistaken for (or written over) a real run
        slug = f"dryrun-{slug}"
    os.makedirs(args.results, exist_ok=True)
    base = os.path.join(args.results, slug)
    written = []
    for name, suffix in (("drr.json", ".json"), ("accuracy.json", "-accuracy.json"), ("kernels.json", "-kernels.json"),
                         ("skipping.json", "-skipping.json"), ("gpu_check.log", "-gpu-check.log")):  # fmt: skip
        source = os.path.join(args.files, name)
        if os.path.exists(source):
            shutil.copyfile(source, base + suffix)
            written.append(base + suffix)
    check = dict(env or {})
    check["tests"] = tests_summary(os.path.join(args.files, "tests.xml"))
    check["files"] = sorted(os.listdir(args.files))
    with open(base + "-gpu-check.json", "w") as f:
        json.dump(check, f, indent=1)
    written.append(base + "-gpu-check.json")
    if kernels:
        with open(base + "-kernels.md", "w") as f:
            f.write(f"# Kernel benchmark on {kernels.get('device')}\n\nGenerated by `bench/gpu_ingest.py` from "
                    f"`{slug}-kernels.json`; do not edit.\n\n" + report.kernels_markdown(kernels))  # fmt: skip
        written.append(base + "-kernels.md")
    skipping = read_json(os.path.join(args.files, "skipping.json"))
    if skipping and skipping.get("rows"):
        import skipping as skipping_bench

        skipping["json"] = f"{slug}-skipping.json"
        with open(base + "-skipping.md", "w") as f:
            f.write(skipping_bench.markdown(skipping))
        written.append(base + "-skipping.md")
    print("wrote " + ", ".join(os.path.relpath(p) for p in written))
    for stage in (env or {}).get("stages", []):
        print(f"  stage {stage['name']:9s} {stage['status']:9s} {stage['seconds']:4d} s of {stage['budget_s']}")
    if check["tests"]:
        t = check["tests"]
        print(f"  tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
        for name in t["failed"]:
            print(f"    FAILED {name}")
    if drr is None:
        print("no drr.json (the DRR stage did not finish): the report is not regenerated", file=sys.stderr)
        return 0
    report_args = results_files(args.results)
    report_args += ["--no-readme"] if args.no_readme else ["--readme", args.readme]
    if args.allow_dirty:
        report_args.append("--allow-dirty")
    return report.main(report_args)


if __name__ == "__main__":
    sys.exit(main())
