"""Micro-benchmark: DRRs of many subjects in one call (``BatchDRR``) against one subject (``DRR``).

32 poses over 8 subjects (4 poses each, ``subject_index`` shuffled) with ``BatchDRR``, against the
same 32 poses on one subject with ``DRR`` and with ``BatchDRR`` (all indices 0). The subjects are
the example phantom at 8 slightly different shapes (within +-10% per axis of ``--shape``), so
the work per DRR is comparable. Reports the median time per DRR over ``--repeats`` calls after
``--warmup`` calls; forward only by default, forward + backward with respect to the pose with
``--backward``.

On CUDA (``--backend auto``) BatchDRR renders all 32 poses in one Triton launch over a packed
pool; on the CPU (PyTorch backend) it renders one call per subject present in the batch.

Usage: ``python bench/batched_volumes.py [--shape 96 96 64] [--height 64] [--poses 32] [--subjects 8]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import tritondrr as td


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(cases: dict, device, warmup: int, repeats: int) -> dict:
    """Median seconds per call of each case; the cases take turns, so load changes hit them alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--poses", type=int, default=32)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backward", action="store_true", help="time forward + backward w.r.t. the pose")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    g = torch.Generator().manual_seed(0)
    base = torch.tensor(args.shape, dtype=torch.float64)
    shapes = [tuple(round(float(x)) for x in base * (0.9 + 0.2 * torch.rand(3, generator=g))) for _ in range(args.subjects)]
    subjects = [td.load_example_ct(shape=s, labelmap=False) for s in shapes]
    detector = {"sdd": 1020.0, "height": args.height, "delx": 2.0 * 256 / args.height}
    rotations = 0.2 * (torch.rand(args.poses, 3, generator=g) - 0.5)
    translations = torch.tensor([0.0, 850.0, 0.0]) + 20.0 * (torch.rand(args.poses, 3, generator=g) - 0.5)
    rotations, translations = rotations.to(device), translations.to(device)
    index = torch.randperm(args.poses, generator=g) % args.subjects
    pose = {"parameterization": "euler_angles", "convention": "ZXY"}

    one = td.DRR(subjects[0], backend=args.backend, **detector).to(device)
    many = td.BatchDRR(subjects, backend=args.backend, **detector).to(device)

    def run(fn):
        def call():
            if args.backward:
                rot = rotations.clone().requires_grad_()
                fn(rot).sum().backward()
            else:
                with torch.no_grad():
                    fn(rotations)

        return call

    cases = {
        "DRR, 1 subject": run(lambda r: one(r, translations, **pose)),
        "BatchDRR, 1 subject": run(lambda r: many(r, translations, subject_index=torch.zeros_like(index).to(device), **pose)),
        f"BatchDRR, {args.subjects} subjects": run(lambda r: many(r, translations, subject_index=index.to(device), **pose)),
    }
    results = {}
    for name, seconds in _time(cases, device, args.warmup, args.repeats).items():
        results[name] = 1e3 * seconds / args.poses
        print(f"{name:>24}: {results[name]:8.3f} ms per DRR ({seconds * 1e3:.1f} ms per {args.poses} poses)", flush=True)
    report = {
        "config": {**vars(args), "shapes": shapes, "samples_per_ray_subject0": one.n_samples},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "ms_per_drr": results,
    }
    print(json.dumps(report, default=str))
    return report


if __name__ == "__main__":
    main()
