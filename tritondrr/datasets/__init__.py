"""Training-scale data: pose samplers, on-the-fly DRR datasets, and generated shard datasets.

- ``UniformPoseSampler``, ``NormalPoseSampler``, ``FixedPoseSampler``: C-arm poses around the
  AP/PA view; pose ``i`` is a pure function of (seed, i).
- ``DRRDataset``: renders items on the fly on the process's device (DataLoader-worker safe).
- ``ShardDataset``: reads a directory written by ``tritondrr generate`` (``generate.py``).
"""

from .dataset import DRRDataset, ShardDataset, default_device
from .samplers import (
    FixedPoseSampler,
    NormalPoseSampler,
    PoseSampler,
    UniformPoseSampler,
    load_pose_file,
    sampler_from_dict,
)

__all__ = [
    "DRRDataset",
    "FixedPoseSampler",
    "NormalPoseSampler",
    "PoseSampler",
    "ShardDataset",
    "UniformPoseSampler",
    "default_device",
    "load_pose_file",
    "sampler_from_dict",
]
