"""DRRDataset (on-the-fly rendering) and ShardDataset (generated shards) against direct DRR renders."""

import doctest
import importlib
import pickle

import nrrd
import numpy as np
import pytest
import torch

import tritondrr as td
from tritondrr.cli import main
from tritondrr.datasets import (
    DRRDataset,
    FixedPoseSampler,
    ShardDataset,
    UniformPoseSampler,
)

SHAPE = (32, 32, 24)
GEOMETRY = {"sdd": 1020.0, "height": 16, "delx": 25.0}
N_SAMPLES = 48


@pytest.fixture(scope="module")
def phantom():
    return td.load_example_ct(shape=SHAPE)


@pytest.fixture(scope="module")
def small_phantom():
    return td.load_example_ct(shape=(20, 24, 16))


def direct(subject, matrices):
    """Oracle: the public DRR module rendering the given (n, 4, 4) poses one at a time."""
    drr = td.DRR(subject, **GEOMETRY, n_samples=N_SAMPLES)
    with torch.no_grad():
        return torch.cat([drr(td.RigidTransform(m[None].to(torch.float32))) for m in matrices])


def assert_images_close(actual, expected):
    # Same renderer, same rays: measured max |difference| 0 (batching does not change the
    # arithmetic per ray); allow float32 rounding of the largest value.
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_items_match_direct_renders(phantom):
    sampler = UniformPoseSampler(seed=2)
    data = DRRDataset(phantom, sampler, 12, **GEOMETRY, n_samples=N_SAMPLES, batch_size=5)
    assert len(data) == 12
    item = data[7]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert item["pose"].shape == (4, 4) and item["pose"].dtype == torch.float32
    assert item["pose_index"] == 7 and item["subject_index"] == 0
    assert item["image"].abs().max() > 0
    # The pose is the sampler's, the image the DRR of that pose.
    assert torch.equal(item["pose"], sampler([7]).matrix[0].float())
    assert_images_close(item["image"][None], direct(phantom, sampler([7]).matrix))
    # Negative indices count from the end.
    assert data[-5]["pose_index"] == 7
    # A batch (DataLoader's __getitems__) equals the items one by one, in the requested order.
    order = [11, 0, 7, 3, 3, 9]
    batch = data.__getitems__(order)
    assert [b["pose_index"] for b in batch] == order
    images, poses, subject_index = data.render(order)
    assert images.shape == (6, 1, 16, 16) and poses.shape == (6, 4, 4) and subject_index.tolist() == [0] * 6
    assert_images_close(images, direct(phantom, sampler(order).matrix))
    for b, n in zip(batch, range(6)):
        assert torch.equal(b["image"], images[n])


def test_several_subjects(phantom, small_phantom):
    rows = np.array([[10.0, -5.0, 3.0, 1.0, 800.0, -2.0], [-20.0, 7.0, 1.0, 0.0, 650.0, 9.0], [90, 0, 0, 0, 850, 0]])
    sampler = FixedPoseSampler(rows)
    data = DRRDataset([phantom, small_phantom], sampler, 3, **GEOMETRY, n_samples=N_SAMPLES)
    assert len(data) == 6
    images, poses, subject_index = data.render(range(6))
    assert subject_index.tolist() == [0, 0, 0, 1, 1, 1]
    # Each subject is seen at every pose of the file: pose g mod 3.
    assert torch.equal(poses[:3], poses[3:])
    assert_images_close(images[:3], direct(phantom, sampler.matrices))
    assert_images_close(images[3:], direct(small_phantom, sampler.matrices))
    assert not torch.allclose(images[:3], images[3:])


def test_subject_paths_are_read_lazily(tmp_path, small_phantom):
    path = tmp_path / "ct.nrrd"
    spacing = small_phantom.spacing.tolist()
    nrrd.write(
        str(path),
        small_phantom.volume.numpy(),
        {"space": "right-anterior-superior", "space directions": np.diag(spacing), "space origin": np.zeros(3)},
    )
    sampler = UniformPoseSampler(seed=4)
    data = DRRDataset(str(path), sampler, 4, **GEOMETRY, n_samples=N_SAMPLES)
    assert data._drrs == {}  # nothing read or built before the first item
    images, _, _ = data.render(range(4))
    assert_images_close(images, direct(td.read(path), sampler(range(4)).matrix))


def test_pickles_without_rendered_state(phantom):
    data = DRRDataset(phantom, UniformPoseSampler(seed=1), 4, **GEOMETRY, n_samples=N_SAMPLES)
    first = data[1]["image"]
    assert len(data._drrs) == 1
    clone = pickle.loads(pickle.dumps(data))
    assert len(clone._drrs) == 0 and clone._pid is None
    assert torch.equal(clone[1]["image"], first)


def test_dataloader_workers_render_in_the_workers(phantom):
    data = DRRDataset(phantom, UniformPoseSampler(seed=6), 8, **GEOMETRY, n_samples=N_SAMPLES)
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, multiprocessing_context="fork")
    batches = list(loader)
    assert len(data._drrs) == 0  # the parent built no DRR (no device initialised there)
    images = torch.cat([b["image"] for b in batches])
    assert torch.cat([b["pose_index"] for b in batches]).tolist() == list(range(8))
    assert_images_close(images, direct(phantom, data.sampler(range(8)).matrix))


def test_errors(phantom):
    sampler = UniformPoseSampler()
    with pytest.raises(ValueError, match="poses_per_subject"):
        DRRDataset(phantom, sampler, 0, **GEOMETRY)
    with pytest.raises(TypeError, match="sampler"):
        DRRDataset(phantom, "uniform", 3, **GEOMETRY)
    with pytest.raises(TypeError, match="subjects"):
        DRRDataset([42], sampler, 3, **GEOMETRY)
    with pytest.raises(ValueError, match="subjects"):
        DRRDataset([], sampler, 3, **GEOMETRY)
    data = DRRDataset(phantom, sampler, 3, **GEOMETRY)
    with pytest.raises(IndexError, match="out of range"):
        data[3]
    with pytest.raises(IndexError, match="out of range"):
        data.render([0, 5])
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardDataset("/nonexistent-dir")


def test_shard_dataset_reads_generated_data(tmp_path, phantom):
    out = tmp_path / "data"
    args = [
        "generate",
        str(out),
        "--phantom-shape",
        *map(str, SHAPE),
        "--poses",
        "10",
        "--height",
        "16",
        "--delx",
        "25",
        "--shard-size",
        "4",
        "--seed",
        "5",
        "--n-samples",
        str(N_SAMPLES),
        "--batch-size",
        "3",
    ]
    assert main(args) == 0
    shards = ShardDataset(out)
    assert len(shards) == 10
    assert shards.manifest["seed"] == 5 and len(shards.manifest["shards"]) == 3
    live = DRRDataset(phantom, UniformPoseSampler(seed=5), 10, **GEOMETRY, n_samples=N_SAMPLES)
    images = torch.stack([shards[g]["image"] for g in range(10)])
    poses = torch.stack([shards[g]["pose"] for g in range(10)])
    assert [shards[g]["pose_index"] for g in range(10)] == list(range(10))
    assert torch.equal(poses, UniformPoseSampler(seed=5)(range(10)).matrix.float())
    assert torch.equal(images, live.render(range(10))[0])
    assert_images_close(images, direct(phantom, poses.double()))
    with pytest.raises(IndexError):
        shards[10]
    loader = torch.utils.data.DataLoader(shards, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = torch.cat([b["pose_index"] for b in loader])
    assert sorted(seen.tolist()) == list(range(10))


@pytest.mark.parametrize("name", ["tritondrr.datasets.samplers", "tritondrr.datasets.dataset"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
