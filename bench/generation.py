"""Dataset generation throughput (DRRs/s): ``tritondrr generate`` with 1 and more processes.

Runs the command as a user would (``python -m tritondrr generate`` for one process,
``python -m torch.distributed.run --nproc_per_node P -m tritondrr generate`` for P), on the
built-in phantom (256 x 256 x 133) at a 256 x 256 detector, into a temporary directory, and
reads the rate the command reports in ``manifest.json`` (``last_run``: DRRs rendered / seconds
from the first render to the end of the last shard, all ranks, so a torch.compile warm-up in the
first render is included), plus the wall time of the whole command (start-up, phantom, compile).

Usage (from the repository root)::

    python bench/generation.py [--poses 32] [--nproc 1 2] [--compile] [--device cpu] [--out bench/results]

Writes ``<device-slug>-generation.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import drrbench as B

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loadavg() -> list[float]:
    return list(os.getloadavg())


def run_once(nproc: int, args, out: str) -> dict:
    launcher = [sys.executable, "-m", "tritondrr"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "tritondrr"]
    cmd = [
        *launcher,
        "generate",
        out,
        "--poses",
        str(args.poses),
        "--height",
        str(args.height),
        "--delx",
        str(args.delx),
        "--sdd",
        "1020",
        "--shard-size",
        str(args.shard_size),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        "0",
    ]
    if args.device:
        cmd += ["--device", args.device]
    if not args.compile:
        cmd.append("--no-compile")
    env = dict(os.environ, PYTHONPATH=REPO)
    if nproc == 1 and args.threads_per_process:
        env["OMP_NUM_THREADS"] = str(args.threads_per_process)
    load = loadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "manifest.json")) as f:
        last = json.load(f)["last_run"]
    print(proc.stdout.strip().splitlines()[-1])
    return {
        "nproc": nproc,
        "command": " ".join(cmd[1:]),
        "rendered": last["rendered"],
        "render_s": last["seconds"],
        "drrs_per_second": last["drrs_per_second"],
        "wall_s": round(wall, 3),
        "drrs_per_second_wall": round(last["rendered"] / wall, 3),
        "loadavg_before": load,
        "loadavg_after": loadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poses", type=int, default=32)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--delx", type=float, default=1.6)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default=None, help="passed to --device (default: the command's)")
    parser.add_argument("--compile", action="store_true", help="let the CPU ray marcher compile (library default)")
    parser.add_argument("--threads-per-process", type=int, default=None, help="OMP_NUM_THREADS of the 1-process run")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = []
    for nproc in args.nproc:
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(run_once(nproc, args, os.path.join(tmp, "data")))
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": B.device_name(device),
        "cpu_count": os.cpu_count(),
        "versions": B.versions(),
        "settings": {
            "volume": "phantom 256x256x133",
            "height": args.height,
            "width": args.height,
            "delx": args.delx,
            "poses": args.poses,
            "shard_size": args.shard_size,
            "batch_size": args.batch_size,
            "compile": args.compile,
            "omp_threads_1_process": args.threads_per_process,
        },
        "runs": runs,
    }
    os.makedirs(args.out, exist_ok=True)
    suffix = ("-compiled" if args.compile else "") + (
        f"-omp{args.threads_per_process}" if args.threads_per_process else ""
    )
    path = os.path.join(args.out, f"{B.device_slug(device)}-generation{suffix}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    for r in runs:
        print(
            f"{r['nproc']} process(es): {r['drrs_per_second']:.2f} DRRs/s rendering, "
            f"{r['drrs_per_second_wall']:.2f} DRRs/s wall ({r['wall_s']:.1f} s), load {r['loadavg_before'][0]:.2f}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
