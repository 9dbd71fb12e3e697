"""``tritondrr generate``: one process vs torchrun, disjoint and complete shards, resumable runs, errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nrrd
import numpy as np
import pytest
import torch

import tritondrr as td
from tritondrr.cli import main
from tritondrr.datasets import UniformPoseSampler

REPO = Path(__file__).resolve().parents[2]
SHAPE = (32, 32, 24)
N_SAMPLES = 48
# 26 poses in shards of 4: 7 shards, the last one partial; split unevenly over 2 and 3 processes.
BASE = [
    "--phantom-shape",
    *map(str, SHAPE),
    "--poses",
    "26",
    "--height",
    "16",
    "--delx",
    "25",
    "--sdd",
    "1020",
    "--shard-size",
    "4",
    "--seed",
    "13",
    "--batch-size",
    "3",
    "--n-samples",
    str(N_SAMPLES),
]
N_SHARDS = 7


def env():
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    e.setdefault("TRITON_INTERPRET", "1")
    e.setdefault("TRITONDRR_COMPILE", "0")
    return e


def run_cli(argv, capsys=None):
    """In-process ``tritondrr ...``: (exit status, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def load(out: Path) -> dict:
    """All shards of OUT by file name: {name: {array: value}}."""
    shards = {}
    for path in sorted(out.glob("shard-*.npz")):
        with np.load(path, allow_pickle=False) as f:
            shards[path.name] = {k: f[k] for k in f.files}
    return shards


def by_pose_index(shards: dict) -> dict:
    images = {}
    for arrays in shards.values():
        for g, img in zip(arrays["pose_index"].tolist(), arrays["images"]):
            assert g not in images, f"pose index {g} in two shards"
            images[g] = img
    return images


def mtimes(out: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The dataset of BASE made by one process (in this process)."""
    out = tmp_path_factory.mktemp("ref") / "data"
    code, _ = run_cli(["generate", str(out), *BASE])
    assert code == 0
    return out


def copy(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(reference, out)
    return out


def test_one_process_dataset(reference):
    shards = load(reference)
    assert sorted(shards) == [f"shard-{s:06d}.npz" for s in range(N_SHARDS)]
    # Disjoint and complete: every pose index once; shard s holds [4 s, 4 s + 4).
    images = by_pose_index(shards)
    assert sorted(images) == list(range(26))
    for s, (name, arrays) in enumerate(sorted(shards.items())):
        assert arrays["pose_index"].dtype == np.int64
        assert arrays["pose_index"].tolist() == list(range(4 * s, min(26, 4 * s + 4)))
        assert arrays["images"].dtype == np.float32 and arrays["images"].shape[1:] == (1, 16, 16)
        assert arrays["poses"].dtype == np.float32 and arrays["poses"].shape[1:] == (4, 4)
        assert "subject_index" not in arrays  # one subject
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["seed"] == 13 and manifest["total"] == 26 and manifest["shard_size"] == 4
    assert manifest["geometry"]["height"] == 16 and manifest["geometry"]["delx"] == 25.0
    assert manifest["sampler"]["name"] == "uniform" and manifest["subjects"][0]["shape"] == list(SHAPE)
    assert [s["file"] for s in manifest["shards"]] == sorted(shards)
    assert {"tritondrr", "torch", "numpy"} <= set(manifest["versions"])
    # Oracle: the sampler's poses rendered by the public DRR module, one at a time.
    poses = np.concatenate([a["poses"] for _, a in sorted(shards.items())])
    np.testing.assert_array_equal(poses, UniformPoseSampler(seed=13)(range(26)).matrix.float().numpy())
    drr = td.DRR(td.load_example_ct(shape=SHAPE), sdd=1020.0, height=16, delx=25.0, n_samples=N_SAMPLES)
    with torch.no_grad():
        expected = torch.cat([drr(td.RigidTransform(torch.from_numpy(p)[None])) for p in poses]).numpy()
    got = np.stack([images[g] for g in range(26)])
    # Same renderer and rays; measured difference 0, bound: float32 rounding of the largest value.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    assert np.abs(expected).max() > 0


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_gives_the_same_dataset(reference, tmp_path, nproc):
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "tritondrr"]
    proc = subprocess.run(
        [*cmd, "generate", str(out), *BASE],
        env=env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"with {nproc} processes" in proc.stdout
    got, ref = load(out), load(reference)
    assert sorted(got) == sorted(ref)
    for name in ref:  # bitwise, array by array
        assert sorted(got[name]) == sorted(ref[name])
        for key in ref[name]:
            np.testing.assert_array_equal(got[name][key], ref[name][key], err_msg=f"{name}:{key}")
    assert sorted(by_pose_index(got)) == list(range(26))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == json.loads((reference / "manifest.json").read_text())["shards"]
    assert manifest["last_run"]["world_size"] == nproc and manifest["last_run"]["rendered"] == 26
    assert not list(out.glob(".*tmp"))


@pytest.mark.parametrize("batch_size", ["3", "1"])
def test_deleted_shard_is_regenerated_and_others_untouched(reference, tmp_path, capsys, batch_size):
    """The rerun rebuilds the same bytes, also with another --batch-size (not part of the settings)."""
    out = copy(reference, tmp_path)
    before = mtimes(out)
    (out / "shard-000003.npz").unlink()
    time.sleep(0.01)
    argv = ["generate", str(out), *BASE]
    argv[argv.index("--batch-size") + 1] = batch_size
    code, _ = run_cli(argv, capsys)
    assert code == 0
    after = mtimes(out)
    assert sorted(after) == sorted(before)
    assert {n for n in after if after[n] != before[n]} == {"shard-000003.npz"}
    assert (out / "shard-000003.npz").read_bytes() == (reference / "shard-000003.npz").read_bytes()
    assert json.loads((out / "manifest.json").read_text())["last_run"]["rendered"] == 4


def test_leftovers_of_a_killed_run_are_handled(reference, tmp_path, capsys):
    out = copy(reference, tmp_path)
    (out / "manifest.json").unlink()  # killed before the end: no manifest yet
    stray = out / ".shard-000001.npz.host.12345.tmp"
    stray.write_bytes(b"partial write")
    whole = (out / "shard-000002.npz").read_bytes()
    (out / "shard-000002.npz").write_bytes(whole[: len(whole) // 2])  # truncated
    shutil.copy(out / "shard-000004.npz", out / "shard-000005.npz")  # whole file, wrong pose indices
    before = mtimes(out)
    code, _ = run_cli(["generate", str(out), *BASE], capsys)
    assert code == 0
    assert not stray.exists()
    after = mtimes(out)
    assert {n for n in after if after[n] != before[n]} == {"shard-000002.npz", "shard-000005.npz"}
    for name in ("shard-000002.npz", "shard-000005.npz"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert (
        json.loads((out / "manifest.json").read_text())["shards"]
        == json.loads((reference / "manifest.json").read_text())["shards"]
    )


def test_a_run_killed_midway_completes_identically(tmp_path, capsys):
    args = [
        "--phantom-shape",
        *map(str, SHAPE),
        "--poses",
        "48",
        "--height",
        "32",
        "--delx",
        "12.5",
        "--shard-size",
        "3",
        "--seed",
        "2",
        "--batch-size",
        "1",
        "--n-samples",
        "96",
    ]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tritondrr", "generate", str(killed), *args],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (killed / "shard-000001.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    # It was killed midway: some shards (or none) written, no manifest.
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "manifest.json").exists()
    assert 1 <= len(list(killed.glob("shard-*.npz"))) < 16
    for name in os.listdir(killed):  # whatever it left is a whole shard or a temporary file
        assert name.startswith("shard-") and name.endswith(".npz") or name.endswith(".tmp"), name
    code, _ = run_cli(["generate", str(killed), *args], capsys)
    assert code == 0
    code, _ = run_cli(["generate", str(clean), *args], capsys)
    assert code == 0
    a, b = load(killed), load(clean)
    assert sorted(a) == sorted(b) and len(a) == 16
    for name in a:
        for key in b[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name}:{key}")
    assert not list(killed.glob(".*tmp"))


def test_other_settings_in_the_same_out_are_refused(reference, tmp_path, capsys):
    out = copy(reference, tmp_path)
    before = mtimes(out)
    argv = ["generate", str(out), *BASE]
    argv[argv.index("--seed") + 1] = "14"
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "seed" in err and "other settings" in err
    assert mtimes(out) == before


def test_pose_file_and_several_subjects(tmp_path, capsys):
    paths = []
    for n, shape in enumerate([(20, 24, 16), (24, 20, 18)]):
        subject = td.load_example_ct(shape=shape)
        path = tmp_path / f"ct{n}.nrrd"
        header = {
            "space": "right-anterior-superior",
            "space directions": np.diag(subject.spacing.tolist()),
            "space origin": np.zeros(3),
        }
        nrrd.write(str(path), subject.volume.numpy(), header)
        paths.append(path)
    rows = np.array([[10.0, -5.0, 3.0, 1.0, 800.0, -2.0], [-20.0, 7.0, 1.0, 0.0, 650.0, 9.0], [90, 0, 0, 0, 850, 0]])
    pose_file = tmp_path / "poses.npy"
    np.save(pose_file, rows)
    out = tmp_path / "data"
    argv = [
        "generate",
        str(out),
        "--subjects",
        *map(str, paths),
        "--pose-file",
        str(pose_file),
        "--height",
        "16",
        "--delx",
        "25",
        "--shard-size",
        "4",
        "--n-samples",
        str(N_SAMPLES),
    ]
    code, _ = run_cli(argv, capsys)
    assert code == 0
    shards = load(out)
    images = np.concatenate([a["images"] for _, a in sorted(shards.items())])
    poses = np.concatenate([a["poses"] for _, a in sorted(shards.items())])
    subject_index = np.concatenate([a["subject_index"] for _, a in sorted(shards.items())])
    assert subject_index.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(poses[:3], poses[3:])
    for s, path in enumerate(paths):
        drr = td.DRR(td.read(path), sdd=1020.0, height=16, delx=25.0, n_samples=N_SAMPLES)
        with torch.no_grad():
            expected = torch.cat([drr(td.RigidTransform(torch.from_numpy(p)[None])) for p in poses[3 * s : 3 * s + 3]])
        atol = 1e-6 * float(expected.max())
        np.testing.assert_allclose(images[3 * s : 3 * s + 3], expected.numpy(), rtol=0, atol=atol)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler"]["name"] == "file" and manifest["poses_per_subject"] == 3
    assert [s["path"] for s in manifest["subjects"]] == [str(p) for p in paths]
    # --poses N < the file's rows: the first N poses, for every subject.
    argv[argv.index(str(out))] = str(tmp_path / "first2")
    code, _ = run_cli([*argv, "--poses", "2"], capsys)
    assert code == 0
    short = load(tmp_path / "first2")
    short_poses = np.concatenate([a["poses"] for _, a in sorted(short.items())])
    np.testing.assert_array_equal(short_poses, np.concatenate([poses[:2], poses[:2]]))


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    return path


@pytest.fixture
def three_poses(tmp_path):
    path = tmp_path / "three.npy"
    np.save(path, np.tile([0.0, 0.0, 0.0, 0.0, 850.0, 0.0], (3, 1)))
    return path


BAD = [
    (["--poses", "0"], "--poses"),
    (["--poses", "-3"], "--poses"),
    (["--poses", "x"], "--poses"),
    ([], "--poses"),
    (["--poses", "2", "--height", "0"], "--height"),
    (["--poses", "2", "--width", "-1"], "--width"),
    (["--poses", "2", "--shard-size", "0"], "--shard-size"),
    (["--poses", "2", "--batch-size", "0"], "--batch-size"),
    (["--poses", "2", "--n-samples", "0"], "--n-samples"),
    (["--poses", "2", "--delx", "-1"], "--delx"),
    (["--poses", "2", "--sdd", "0"], "--sdd"),
    (["--poses", "2", "--sdd", "nan"], "--sdd"),
    (["--poses", "2", "--seed", "-1"], "--seed"),
    (["--poses", "2", "--sampler", "cauchy"], "--sampler"),
    (["--poses", "2", "--view", "LAT"], "--view"),
    (["--poses", "2", "--subjects", "missing.nii.gz"], "--subjects"),
    (["--poses", "2", "--phantom-shape", "1", "8", "8"], "--phantom-shape"),
    (["--poses", "2", "--r1", "10", "-10"], "--r1"),
    (["--poses", "2", "--sampler", "normal", "--ty", "850", "-5"], "--ty"),
    (["--poses", "2", "--pose-file", "missing.npy"], "--pose-file"),
    (["--pose-file", "{three}", "--sampler", "normal"], "--pose-file"),
    (["--pose-file", "{three}", "--poses", "4"], "--poses"),
    (["--poses", "2", "--device", "nonsense"], "--device"),
]


@pytest.mark.parametrize("extra, flag", BAD, ids=[" ".join(b[0]) or "no-poses" for b in BAD])
def test_bad_arguments(tmp_path, capsys, three_poses, extra, flag):
    extra = [a.replace("{three}", str(three_poses)) for a in extra]
    code, err = run_cli(["generate", str(tmp_path / "out"), *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("tritondrr generate: error:"), err
    assert flag in err, err
    assert not (tmp_path / "out").exists()


def test_out_is_a_file(a_file, capsys):
    code, err = run_cli(["generate", str(a_file), "--poses", "2"], capsys)
    assert code == 2 and "OUT" in err and "is a file" in err and err.count("\n") == 1


def test_bad_arguments_exit_status_from_the_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tritondrr", "generate", str(tmp_path / "out"), "--poses", "0"],
        env=env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tritondrr generate: error: --poses must be a positive integer, got 0"
