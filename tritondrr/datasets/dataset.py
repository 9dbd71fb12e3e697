"""Datasets of DRRs: rendered on the fly (``DRRDataset``) or read from generated shards (``ShardDataset``).

Both are map-style ``torch.utils.data.Dataset``s over *pose indices*. With S subjects and N
poses per subject, index g in [0, S N) is subject ``g // N`` seen at pose ``g`` of the sampler
(a ``FixedPoseSampler`` of N poses gives each subject every pose). An item is a dict::

    image          (C, H, W) float32 line integrals (C = 1)
    pose           (4, 4) float32 camera -> world matrix (``RigidTransform.matrix``), mm
    pose_index     int, the global index g
    subject_index  int, g // N

Example (a training loop renders its batches on its own device; see also ``tritondrr generate``):
    >>> import tritondrr as td
    >>> from tritondrr.datasets import DRRDataset, UniformPoseSampler
    >>> data = DRRDataset(td.load_example_ct(shape=(32, 32, 24)), UniformPoseSampler(seed=0), 100,
    ...                   sdd=1020.0, height=16, delx=25.0)
    >>> tuple(data[7]["image"].shape)
    (1, 16, 16)
    >>> loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
"""

from __future__ import annotations

import bisect
import collections
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..data import Subject, read
from ..drr import DRR
from .samplers import PoseSampler

__all__ = ["DRRDataset", "ShardDataset", "default_device"]


def default_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` (torchrun sets it; 0 otherwise) when CUDA is
    available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class DRRDataset(torch.utils.data.Dataset):
    """DRRs rendered on demand: item g is subject ``g // poses_per_subject`` at pose ``sampler(g)``.

    Args:
        subjects: a ``tritondrr.Subject``, a CT path (read with ``tritondrr.read``'s defaults,
            lazily, in the process that renders), or a sequence of them.
        sampler: a ``PoseSampler`` (``UniformPoseSampler``, ``NormalPoseSampler``,
            ``FixedPoseSampler``, ...) giving the world pose of each index.
        poses_per_subject: N; the dataset has ``len(subjects) * N`` items.
        sdd, height, delx, width, dely, x0, y0, reverse_x_axis: the detector, as ``tritondrr.DRR``
            (mm, pixels).
        device: where to render; default ``default_device()`` of the rendering process.
        batch_size: most poses per render call in ``render`` and ``__getitems__``.
        cache_size: most subjects' ``DRR`` modules (volumes) kept per process (LRU).
        **drr_kwargs: other ``tritondrr.DRR`` arguments (``n_samples``, ``step``, ``backend``, ...).

    Workers: the ``DRR`` modules are built lazily, in the process that renders (each DataLoader
    worker builds its own), and are not pickled, so the parent never initialises CUDA. With CUDA
    rendering keep ``num_workers=0`` (the GPU is the worker) or use the "spawn" context.
    A DataLoader fetching a batch calls ``__getitems__``, which renders the batch in one call per
    subject. Images are rendered without autograd.

    Training at scale: under torchrun/DDP give the DataLoader a
    ``torch.utils.data.DistributedSampler``; each rank renders its indices on its own GPU
    (``cuda:LOCAL_RANK``). Poses cost nothing to store, so ``poses_per_subject`` may be huge
    (e.g. 10**9) for an endless stream of distinct, reproducible poses.
    """

    def __init__(
        self,
        subjects,
        sampler: PoseSampler,
        poses_per_subject: int,
        *,
        sdd: float,
        height: int,
        delx: float,
        width: int | None = None,
        dely: float | None = None,
        x0: float = 0.0,
        y0: float = 0.0,
        reverse_x_axis: bool = True,
        device=None,
        batch_size: int = 32,
        cache_size: int = 4,
        **drr_kwargs,
    ):
        if isinstance(subjects, (Subject, str, os.PathLike)) or not isinstance(subjects, collections.abc.Sequence):
            subjects = [subjects]
        subjects = list(subjects)
        if not subjects:
            raise ValueError("subjects must hold at least one subject")
        for s in subjects:
            if not isinstance(s, (str, os.PathLike)) and getattr(s, "density", None) is None:
                raise TypeError(f"subjects must be tritondrr.Subject objects or CT paths, got {type(s).__name__}")
        if not isinstance(sampler, PoseSampler):
            raise TypeError(f"sampler must be a tritondrr.datasets.PoseSampler, got {type(sampler).__name__}")
        self.subjects = subjects
        self.sampler = sampler
        self.poses_per_subject = _count("poses_per_subject", poses_per_subject)
        self.batch_size = _count("batch_size", batch_size)
        self.cache_size = _count("cache_size", cache_size)
        self.geometry = {
            "sdd": float(sdd),
            "height": int(height),
            "width": int(height if width is None else width),
            "delx": float(delx),
            "dely": float(delx if dely is None else dely),
            "x0": float(x0),
            "y0": float(y0),
            "reverse_x_axis": bool(reverse_x_axis),
        }
        self.drr_kwargs = dict(drr_kwargs)
        self.device = None if device is None else torch.device(device)
        self._drrs = collections.OrderedDict()
        self._pid = None

    def __len__(self) -> int:
        return len(self.subjects) * self.poses_per_subject

    def __getstate__(self):  # workers get the recipe, not the rendered modules
        state = self.__dict__.copy()
        state["_drrs"], state["_pid"] = collections.OrderedDict(), None
        return state

    def _render_device(self) -> torch.device:
        return default_device() if self.device is None else self.device

    def drr(self, subject_index: int) -> DRR:
        """This process's ``DRR`` module of a subject (built on first use, LRU-cached)."""
        if self._pid != os.getpid():  # a forked worker must not reuse its parent's modules
            self._drrs, self._pid = collections.OrderedDict(), os.getpid()
        if subject_index in self._drrs:
            self._drrs.move_to_end(subject_index)
            return self._drrs[subject_index]
        subject = self.subjects[subject_index]
        if isinstance(subject, (str, os.PathLike)):
            subject = read(subject)
        drr = DRR(subject, **self.geometry, **self.drr_kwargs).to(self._render_device())
        self._drrs[subject_index] = drr
        while len(self._drrs) > self.cache_size:
            self._drrs.popitem(last=False)
        return drr

    def _check_indices(self, indices) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise IndexError(f"pose index {bad} out of range for a dataset of {len(self)} DRRs")
        return idx

    @torch.no_grad()
    def render(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Render pose indices: images (n, C, H, W) float32 on the render device, poses (n, 4, 4)
        float32 world matrices (CPU) and subject indices (n,) int64 (CPU), in the given order.

        Each subject's poses are rendered ``batch_size`` at a time; an image does not depend on
        which other poses share its batch.
        """
        idx = self._check_indices(indices)
        poses = self.sampler(idx).matrix.to(torch.float32)  # [n, 4, 4]
        subject_index = idx // self.poses_per_subject
        images = None
        for s in torch.unique(subject_index).tolist():
            rows = torch.nonzero(subject_index == s).squeeze(1)
            drr = self.drr(s)
            for start in range(0, len(rows), self.batch_size):
                part = rows[start : start + self.batch_size]
                img = drr(poses[part].to(drr.density.device), parameterization="matrix").float()
                if images is None:
                    images = img.new_empty((len(idx), *img.shape[1:]))
                images[part.to(img.device)] = img
        if images is None:  # no indices
            g = self.geometry
            images = torch.empty(0, 1, g["height"], g["width"], device=self._render_device())
        return images, poses, subject_index

    def _items(self, idx, images, poses, subject_index) -> list[dict]:
        return [
            {"image": images[n], "pose": poses[n], "pose_index": int(g), "subject_index": int(subject_index[n])}
            for n, g in enumerate(idx.tolist())
        ]

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if index < 0:
            index += len(self)
        idx = self._check_indices([index])
        return self._items(idx, *self.render(idx))[0]

    def __getitems__(self, indices) -> list[dict]:
        """A batch in one render per subject (``torch.utils.data.DataLoader`` calls this)."""
        idx = self._check_indices(indices)
        return self._items(idx, *self.render(idx))


class ShardDataset(torch.utils.data.Dataset):
    """The DRRs of a ``tritondrr generate`` output directory, item g = pose index g.

    Args:
        root: the directory holding ``manifest.json`` and the ``.npz`` shards.
        cache_shards: most decoded shards kept in memory per process (LRU).

    Items are dicts as ``DRRDataset``'s, on the CPU. ``manifest`` holds the geometry, sampler,
    subjects and versions the data was made with.
    """

    def __init__(self, root, cache_shards: int = 2):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} does not exist: not a generated dataset, or the generation did not finish "
                "(rerun the same tritondrr generate command to complete it)"
            )
        with open(path) as f:
            self.manifest = json.load(f)
        self.shards = self.manifest["shards"]
        self._starts = [int(s["first"]) for s in self.shards]
        self._length = int(self.manifest["total"])
        if self._starts != sorted(self._starts) or sum(int(s["count"]) for s in self.shards) != self._length:
            raise ValueError(f"{str(path)!r}: the shard list does not cover pose indices 0..{self._length - 1}")
        self.cache_shards = _count("cache_shards", cache_shards)
        self._cache = collections.OrderedDict()

    def __len__(self) -> int:
        return self._length

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = collections.OrderedDict()
        return state

    def _shard(self, s: int) -> dict:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        entry = self.shards[s]
        path = self.root / entry["file"]
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"shard {str(path)!r} cannot be read ({e}); rerun tritondrr generate to rebuild it") from e
        expected = np.arange(entry["first"], entry["first"] + entry["count"], dtype=np.int64)
        if not np.array_equal(arrays.get("pose_index"), expected):
            raise ValueError(f"shard {str(path)!r} does not hold pose indices {expected[0]}..{expected[-1]}")
        self._cache[s] = arrays
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return arrays

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"pose index {index} out of range for a dataset of {self._length} DRRs")
        s = bisect.bisect_right(self._starts, index) - 1
        arrays = self._shard(s)
        n = index - self._starts[s]
        subject = arrays["subject_index"][n] if "subject_index" in arrays else 0
        return {
            "image": torch.from_numpy(arrays["images"][n]),
            "pose": torch.from_numpy(arrays["poses"][n]),
            "pose_index": int(arrays["pose_index"][n]),
            "subject_index": int(subject),
        }
