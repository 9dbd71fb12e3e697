"""Instruction economy without a GPU: SASS instructions of each kernel's inner sample loop on sm_90.

Every specialisation of ``tests/compile_sm90.py::specialisations()`` (the combinations the launchers
can produce, for every renderer whose kernels are listed there) is compiled for sm_90 with the
ptxas bundled in Triton's wheel, at the launch configuration that specialisation names (the
launchers' defaults for large problems) and, for the float32 forward and backward kernels, at
every configuration of the kernel benchmark's grid (``bench/bench_kernels.py::CONFIGS``). The
cubin is disassembled with the wheel's ``nvdisasm`` and the sample loop is found from the
control flow: every backward branch (a ``BRA`` to a lower address) closes a loop whose body is
the address range [target, branch]; the sample loop is the loop whose body holds the most
global loads (``LDG``: the eight gathers per sample). Nothing here runs a kernel.

Definitions (per specialisation):

- ``loop_instr``: SASS instructions in the sample loop's body (static count of one iteration,
  every predicated instruction counted once). ``inner_branches`` counts the forward branches
  inside the body (the volume-gradient kernels branch around each masked atomic): with them the
  static count is an upper bound of what a lane issues.
- ``samples_per_lane``: samples one thread (lane) handles per loop iteration,
  ``BLOCK_R * BLOCK_S / (32 * num_warps)``: a ``[BLOCK_R, BLOCK_S]`` block is spread evenly over
  the program's threads.
- ``instr_per_sample``: ``loop_instr / samples_per_lane``, SASS instructions a lane issues per
  sample (a warp issues this many instructions per 32 samples). This is the number to reduce: at
  one warp instruction per cycle per scheduler, 4 schedulers per SM, 132 SMs and 1.98 GHz an H200
  issues ~1.0e12 warp instructions/s, i.e. at most ``3.3e13 / instr_per_sample`` samples/s if
  issue were the only limit.
- instruction classes per sample (same divisor): ``ldg`` (gathers; 8 per sample is the floor for
  a trilinear sample), ``atom`` (volume-gradient atomics), ``ldl_stl`` (local memory: register
  spills), ``cvt`` (float<->int conversions ``F2I``/``I2F``/``F2F``/``FRND``), ``mask`` (compare
  and predicate logic, ``LOP3``/``SEL``/``FSEL``: masks and selects), ``fp`` (``FADD``/``FMUL``/
  ``FFMA``/``FMNMX``...), ``int`` (``IMAD``/``IADD3``/``LEA``/``SHF``...: addresses), ``branch``
  (``BRA``/``BSSY``/``BSYNC``: a masked atomic is a branch around it), ``other``.
- ``regs`` and ``stack_bytes`` from ``cuobjdump --dump-resource-usage`` of the cubin (what
  ``compiled.n_regs`` reports on a GPU), and ``spill_stores_bytes`` / ``spill_loads_bytes`` from
  ptxas's ``-v`` log (what ``compiled.n_spills`` sums), when Triton exposes the log.

Usage (run from the repository root, without ``TRITON_INTERPRET=1``; it re-executes itself
without it)::

    python bench/sass_count.py [--out bench/results] [--no-grid] [NAME_SUBSTRING ...]

Writes ``<out>/sass-sm90.json`` and ``<out>/sass-sm90.md``. These are compile-time facts for the
Triton and ptxas versions recorded in the JSON; a GPU's own Triton may compile differently.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET", "0") == "1":
    # The kernels must be defined without the interpreter: start again without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import triton  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

#: (BLOCK_R, BLOCK_S, num_warps) grid, shared with the kernel benchmark (bench/bench_kernels.py).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_configs import CONFIGS  # noqa: E402

_CLASSES = {
    "ldg": ("LDG",),
    "atom": ("RED", "REDG", "ATOM", "ATOMG"),
    "ldl_stl": ("LDL", "STL"),
    "cvt": ("F2I", "I2F", "F2F", "FRND", "I2FP", "F2IP"),
    "mask": ("ISETP", "FSETP", "DSETP", "PLOP3", "PSETP", "P2R", "R2P", "LOP3", "ULOP3", "VOTE", "SEL", "FSEL"),
    "fp": ("FADD", "FMUL", "FFMA", "FMNMX", "FSET", "FCHK", "MUFU", "DADD", "DMUL", "DFMA", "DSETP", "HADD2",
           "HMUL2", "HFMA2"),
    "int": ("IMAD", "IADD3", "IADD", "LEA", "SHF", "IMNMX", "VIADD", "VIMNMX", "MOV", "IABS", "SHL", "SHR",
            "PRMT", "CS2R", "UMOV", "UIADD3", "ULEA", "USHF", "UIMAD", "VIADDMNMX", "LDC", "ULDC"),
    "branch": ("BRA", "BSSY", "BSYNC", "BAR", "WARPSYNC"),
}  # fmt: skip
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def _compiler_environment() -> None:
    """Set before compiling: the GPU's fp fusion default (silences triton 3.9's warning), no cache
    hits (they would skip ptxas and its ``-v`` log), and that log printed."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("sass_count.py compiles kernels: run it without TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def _load_compile_sm90():
    spec = importlib.util.spec_from_file_location("_compile_sm90", os.path.join(REPO, "tests", "compile_sm90.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nvidia_tool(name: str) -> str:
    """Path of a tool bundled in Triton's NVIDIA backend (``cuobjdump``, ``nvdisasm``, ``ptxas``)."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in Triton's wheel at {path}")
    return path


def opcode(text: str) -> str:
    """``@!P0 IMAD.WIDE.U32 R2, ...`` -> ``IMAD``."""
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def parse_sass(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """Instructions as (address, text) and labels as name -> address of the next instruction."""
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            address = int(m.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            instrs.append((address, m.group(2)))
    return instrs, labels


def loops(instrs, labels) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every loop: a branch back to a lower address."""
    index = {address: i for i, (address, _) in enumerate(instrs)}
    out = []
    for i, (address, text) in enumerate(instrs):
        if opcode(text) != "BRA":
            continue
        m = _TARGET.search(text)
        if m and m.group(1) in labels and labels[m.group(1)] < address:
            out.append((index[labels[m.group(1)]], i))
    return out


def classify(texts) -> dict[str, int]:
    counts = collections.Counter()
    for text in texts:
        op = opcode(text)
        for name, ops in _CLASSES.items():
            if op in ops:
                counts[name] += 1
                break
        else:
            counts["other"] += 1
    return {name: counts.get(name, 0) for name in (*_CLASSES, "other")}


def sample_loop(sass: str) -> dict:
    """The sample loop of one kernel's SASS: body size, classes, inner branches, loop count."""
    instrs, labels = parse_sass(sass)
    found = loops(instrs, labels)
    if not found:
        return {"loops": 0, "total_instr": len(instrs)}

    def gathers(span):
        return sum(opcode(t) == "LDG" for _, t in instrs[span[0] : span[1] + 1])

    first, last = max(found, key=lambda span: (gathers(span), span[1] - span[0]))
    body = [t for _, t in instrs[first : last + 1]]
    inner = sum(opcode(t) == "BRA" for t in body) - 1
    return {
        "loops": len(found),
        "total_instr": len(instrs),
        "loop_instr": len(body),
        "inner_branches": inner,
        "classes": classify(body),
        "total_ldl_stl": sum(opcode(t) in ("LDL", "STL") for _, t in instrs),
    }


def resource_usage(cubin_path: str) -> dict:
    text = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", cubin_path], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    out = {}
    for key, name in (("REG", "regs"), ("STACK", "stack_bytes"), ("LOCAL", "local_bytes"), ("SHARED", "shared_bytes")):
        m = re.search(rf"\b{key}:(\d+)", text)
        out[name] = int(m.group(1)) if m else None
    return out


def spills_from_log(log: str) -> dict:
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"spill_stores_bytes": int(m.group(1)), "spill_loads_bytes": int(m.group(2))} if m else {}


def count(name: str, kernel, signature: dict, constexprs: dict, num_warps: int, tmp: str, target) -> dict:
    """Compile one specialisation for sm_90 and measure its sample loop."""
    start = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                  options={"num_warps": num_warps})  # fmt: skip
    cubin = os.path.join(tmp, f"{name}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    sass = subprocess.run([nvidia_tool("nvdisasm"), "-c", "-ndf", cubin], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    row = {"name": name, "kernel": getattr(kernel, "__name__", str(kernel)), "num_warps": num_warps,
           "block_r": constexprs.get("BLOCK_R"), "block_s": constexprs.get("BLOCK_S")}  # fmt: skip
    row.update(resource_usage(cubin))
    row.update(spills_from_log(log.getvalue()))
    row.update(sample_loop(sass))
    if row.get("block_r") and row.get("block_s") and "loop_instr" in row:
        lanes = 32 * num_warps
        per_lane = row["block_r"] * row["block_s"] / lanes
        row["samples_per_lane"] = per_lane
        row["instr_per_sample"] = row["loop_instr"] / per_lane
        row["per_sample"] = {k: v / per_lane for k, v in row["classes"].items()}
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


def grid_specialisations(C) -> dict:
    """The float32 forward and backward kernels at every configuration of the benchmark grid."""
    out = {}
    for mode, configs in CONFIGS.items():
        for br, bs, warps in configs:
            if mode == "forward":
                kernel, sig, const = C._forward("fp32", "fp32", False, block_r=br, block_s=bs)
            else:
                pose, volume = mode == "backward_pose", mode == "backward_volume"
                kernel, sig, const = C._backward("fp32", "fp32", False, pose, volume, False, block_r=br, block_s=bs)
            out[f"grid-{mode}-r{br}-s{bs}-w{warps}"] = (kernel, sig, const, warps)
    return out


def markdown(result: dict) -> str:
    head = ["specialisation", "BLOCK_R x BLOCK_S / warps", "regs", "stack B", "spill st/ld B", "loop instr",
            "samples/lane", "**instr/sample**", "LDG", "LDL+STL", "cvt", "mask", "fp", "int", "atom", "branch"]  # fmt: skip
    lines = [
        "# SASS instructions per sample, sm_90",
        "",
        "Generated by `bench/sass_count.py`; do not edit. Compile-time facts: triton "
        f"{result['triton']}, ptxas {result['ptxas']}, {result['datetime']}, commit {result['commit']}.",
        "",
        "Per sample = per lane (thread) and sample: the sample loop's SASS instructions divided by the"
        " samples a lane handles per iteration, BLOCK_R x BLOCK_S / (32 x warps). Instruction classes"
        " use the same divisor. A trilinear sample needs 8 gathers (LDG); LDL/STL are register spills"
        " to local memory. See the module docstring for every column.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in result["rows"]:
        if "loop_instr" not in row:
            lines.append(f"| {row['name']} | — | {row.get('regs')} | {row.get('stack_bytes')} | — | no loop found |"
                         + " |" * (len(head) - 6))
            continue
        ps = row.get("per_sample", {})
        spill = (f"{row['spill_stores_bytes']}/{row['spill_loads_bytes']}" if "spill_stores_bytes" in row else "—")
        lines.append("| " + " | ".join([
            row["name"], f"{row['block_r']} x {row['block_s']} / {row['num_warps']}", str(row["regs"]),
            str(row["stack_bytes"]), spill, str(row["loop_instr"]), f"{row['samples_per_lane']:g}",
            f"**{row['instr_per_sample']:.1f}**", *(f"{ps.get(k, 0):.1f}" for k in
                                                    ("ldg", "ldl_stl", "cvt", "mask", "fp", "int", "atom", "branch")),
        ]) + " |")  # fmt: skip
    if result.get("failed"):
        lines += ["", "Failed to compile or disassemble:", ""]
        lines += [f"- {name}: {why}" for name, why in result["failed"].items()]
    return "\n".join(lines) + "\n"


def git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {"commit": git("rev-parse", "HEAD"), "describe": git("describe", "--always", "--dirty")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="only specialisations whose name contains one of these")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--no-grid", action="store_true", help="skip the launch-configuration grid")
    args = parser.parse_args(argv)

    _compiler_environment()
    C = _load_compile_sm90()
    specs = {name: (*spec, 4) for name, spec in C.specialisations().items()}
    if not args.no_grid:
        specs.update(grid_specialisations(C))
    names = [n for n in specs if not args.names or any(w in n for w in args.names)]
    ptxas = subprocess.run([nvidia_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    state = git_state()
    result = {
        "triton": triton.__version__,
        "ptxas": (re.findall(r"V[\d.]+", ptxas) or ["?"])[-1],
        "target": "sm_90 (GPUTarget('cuda', 90, 32))",
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": state["describe"],
        "commit_sha": state["commit"],
        "rows": [],
        "failed": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            kernel, sig, const, warps = specs[name]
            try:
                row = count(name, kernel, sig, const, warps, tmp, C.TARGET)
            except Exception as exc:  # noqa: BLE001 - report every failure, keep going
                result["failed"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                print(f"FAIL {name}: {result['failed'][name]}", flush=True)
                continue
            result["rows"].append(row)
            print(f"{name:45s} regs {row.get('regs')!s:>4} stack {row.get('stack_bytes')!s:>4} "
                  f"loop {row.get('loop_instr', '-')!s:>5} instr/sample {row.get('instr_per_sample', float('nan')):6.1f}"
                  f" ({row['compile_s']} s)", flush=True)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sass-sm90.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "sass-sm90.md"), "w") as f:
        f.write(markdown(result))
    print(f"wrote {os.path.join(args.out, 'sass-sm90.json')} and .md")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
