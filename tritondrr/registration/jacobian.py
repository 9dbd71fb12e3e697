"""Per-pixel pose Jacobians of a DRR at about the cost of one backward pass.

A pixel's value depends on the pose only through its own ray: the source ``s`` (shared by all
rays of a pose) and its detector point ``e_n``. So one backward pass of the image summed over
pixels, with the source expanded to one leaf per ray, gives every ray's ``d pixel / d s`` and
``d pixel / d e_n`` at once. The rays are rigidly attached to the camera: for a pose
E = [R_E | T_E] (camera -> world, ``convert``'s matrix), ``s = T_E`` and ``e_n = R_E q_n + T_E`` with
``q_n`` the pose-independent detector point (the reoriented, calibrated camera-frame pixel), so

    d pixel_n / d theta_p = (g_s + g_e) . dT_E/dtheta_p + g_e . (dR_E/dtheta_p q_n),

where ``dE/dtheta`` is the (B, 3, 4, P) Jacobian of the pose matrix, from 12 backward passes
through the tiny ``convert`` graph. The result equals autograd's full Jacobian (one backward per
pixel) to rounding.
"""

from __future__ import annotations

import torch

from .. import RigidTransform, convert

__all__ = ["flatten_parameters", "pose_jacobian", "pose_matrix_jacobian"]

# Dimensions of one pose's parameter tensor, after the batch dimension, per parameterization.
_ITEM_DIMS = {"matrix": 2, "spherical": 0}


def flatten_parameters(args, parameterization: str, batch: int) -> list[torch.Tensor]:
    """Each pose argument as a detached (B, *item) tensor (a batch of 1 or none expanded to B)."""
    rotation_dims = _ITEM_DIMS.get(parameterization, 1)
    item_dims = [rotation_dims if i == 0 or parameterization == "spherical" else 1 for i in range(len(args))]
    out = []
    for i, (arg, dims) in enumerate(zip(args, item_dims)):
        arg = torch.as_tensor(arg)
        if not arg.is_floating_point():
            arg = arg.to(torch.get_default_dtype())
        if arg.dim() == dims:
            arg = arg[None]
        if arg.dim() != dims + 1 or arg.shape[0] not in (1, batch):
            raise ValueError(
                f"pose argument {i} must be ({batch}, ...) or unbatched for parameterization "
                f"{parameterization!r}, got shape {tuple(arg.shape)}"
            )
        out.append(arg.detach().expand(batch, *arg.shape[1:]).clone())
    return out


def pose_matrix_jacobian(params, parameterization, convention=None, degrees=False):
    """The pose matrices and their Jacobians with respect to the flattened parameters.

    Args:
        params: list of (B, *item) tensors (``flatten_parameters``), in ``convert``'s order.

    Returns:
        E (B, 4, 4) detached and dE (B, 3, 4, P): dE[b, i, j, p] = d E[b, i, j] / d theta[b, p],
        theta the concatenation of the flattened parameters (rotation first, then translation).
    """
    params = [p.detach().requires_grad_() for p in params]
    batch = params[0].shape[0]
    with torch.enable_grad():
        E = convert(*params, parameterization=parameterization, convention=convention, degrees=degrees).matrix
        if E.shape[0] != batch:
            raise ValueError(f"the pose arguments make {E.shape[0]} poses, expected {batch}")
        columns = []
        for i in range(3):
            for j in range(4):
                # Pose b depends only on its own parameters: one backward of the batch sum per entry.
                grads = torch.autograd.grad(E[:, i, j].sum(), params, retain_graph=True, allow_unused=True)
                grads = [(torch.zeros_like(p) if g is None else g).reshape(batch, -1) for g, p in zip(grads, params)]
                columns.append(torch.cat(grads, dim=-1))  # [B, P]
    dE = torch.stack(columns, dim=1).reshape(batch, 3, 4, -1)  # [B, 3, 4, P]
    return E.detach(), dE


def pose_jacobian(
    drr,
    *args,
    parameterization: str | None = None,
    convention: str | None = None,
    degrees: bool = False,
    calibration=None,
    mask_to_channels: bool = False,
    return_image: bool = False,
):
    """d image / d pose parameters for every pixel: (B, C, H, W, P) (or (B, C, n, P) with ``reshape=False``).

    Args:
        drr: a ``tritondrr.DRR`` (any backend and renderer; subsampled pixels allowed).
        args: the pose parameters as for ``drr(...)``: rotations (B, d) and translations (B, 3)
            (a batch of 1 or an unbatched vector is shared by the batch, but every pose gets
            its own columns). A bare ``RigidTransform`` has no parameters and is refused.
        parameterization, convention, degrees: as ``tritondrr.convert``; with ``degrees=True``
            the rotation columns are per degree.
        calibration: optional intrinsics, as ``drr(...)``.
        mask_to_channels: one channel per label, as ``drr(...)`` (one backward pass per channel).
        return_image: also return the image (detached), the same as ``drr(...)``.

    Returns:
        The Jacobian, in the image's dtype and layout with a last dimension of P = the number
        of rotation parameters (3 for Euler angles, 4 for quaternions, 9 for a matrix ...) + 3
        translations (mm); rotation columns first. With ``return_image``: ``(image, jacobian)``.
        Pixels that are not rendered (``p_subsample``) have zero rows.

    Example:
        >>> import tritondrr as td
        >>> drr = td.DRR(td.load_example_ct(shape=(32, 32, 16)), sdd=1020.0, height=8, delx=40.0)
        >>> J = drr.jacobian(torch.zeros(1, 3), torch.tensor([[0.0, 850.0, 0.0]]),
        ...                  parameterization="euler_angles", convention="ZXY")
        >>> tuple(J.shape)
        (1, 1, 8, 8, 6)
    """
    if parameterization is None:
        got = type(args[0]).__name__ if len(args) == 1 else f"{len(args)} arguments"
        raise ValueError(
            "pose_jacobian needs pose parameters: pass rotations and translations with a parameterization "
            f"(e.g. parameterization='euler_angles', convention='ZXY'), got {got} without one"
        )
    if any(isinstance(a, RigidTransform) for a in args):
        raise TypeError("pose_jacobian takes parameter tensors, not a RigidTransform")
    options = {"parameterization": parameterization, "convention": convention, "degrees": degrees}
    with torch.no_grad():
        batch = len(convert(*args, **options))
    params = flatten_parameters(args, parameterization, batch)
    _, dE = pose_matrix_jacobian(params, **options)
    dtype = drr.affine.dtype
    dE = dE.to(dtype)
    n_params = dE.shape[-1]

    with torch.no_grad():
        source, target = drr.source_target(*params, calibration=calibration, **options)  # [B, 1, 3], [B, N, 3]
        # The pose-independent detector points q_n: the rays of the identity pose.
        identity = RigidTransform(torch.eye(4, dtype=dtype, device=source.device).expand(batch, 4, 4))
        _, q = drr.source_target(identity, calibration=calibration)  # [B, N, 3]
    n_rays = target.shape[1]
    src = source.expand(batch, n_rays, 3).clone().requires_grad_()  # one leaf per ray
    tgt = target.clone().requires_grad_()
    density = drr.density.detach() if drr.density.requires_grad else drr.density  # no volume gradient work
    with torch.enable_grad():
        ids = drr.subsamples  # the rendered pixels: drr.render renders the rays it is given
        rays = (src, tgt) if ids is None else (src[:, ids], tgt[:, ids])
        img = drr.reshape_transform(drr.render(density, *rays, mask_to_channels=mask_to_channels), batch)
        channels = img.shape[1]
        dT = dE[:, :, 3, :]  # [B, 3, P]
        dR = dE[:, :, :3, :].reshape(batch, 9, n_params)  # [B, 9, P], row-major (i, j)
        per_channel = []
        for c in range(channels):
            g_s, g_e = torch.autograd.grad(img[:, c].sum(), (src, tgt), retain_graph=c + 1 < channels)
            outer = (g_e[..., :, None] * q[..., None, :]).reshape(batch, n_rays, 9)  # g_e,i q_j  [B, N, 9]
            per_channel.append(torch.bmm(g_s + g_e, dT) + torch.bmm(outer, dR))  # [B, N, P]
    jac = torch.stack(per_channel, dim=1)  # [B, C, N, P], full-detector row-major order
    jac = _to_image_layout(drr, jac, img.shape)
    if return_image:
        return img.detach(), jac
    return jac


def _to_image_layout(drr, jac: torch.Tensor, shape) -> torch.Tensor:
    """Full-detector rows (B, C, H*W, P) -> the image's layout: (B, C, H, W, P) or (B, C, n, P)."""
    batch, channels, n_rays, n_params = jac.shape
    rest = tuple(shape[2:])
    if len(rest) == 2:
        return jac.reshape(batch, channels, *rest, n_params)
    if rest[0] == n_rays:
        return jac
    return jac[:, :, drr.subsamples]  # subsampled rays, in the image's order
