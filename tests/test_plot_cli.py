"""tritondrr.plot and tritondrr.cli: plot_drr draws (Agg), save_png writes PNGs that a real
decoder reads back, and the command line renders a file."""

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from tritondrr.plot import plot_drr, save_png

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]

try:
    import tritondrr.drr  # noqa: F401

    HAVE_DRR = True
except Exception:  # the DRR module lands separately
    HAVE_DRR = False
needs_drr = pytest.mark.skipif(not HAVE_DRR, reason="tritondrr.drr cannot be imported")


@pytest.fixture
def plt():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


# ----------------------------------------------------------------------------- plot_drr


def test_plot_drr_batch_returns_one_axes_per_image(plt):
    img = torch.rand(2, 1, 9, 13, requires_grad=True)
    axs = plot_drr(img, title=["a", "b"])
    assert len(axs) == 2
    assert axs[0].get_xlabel() == "a" and axs[1].get_xlabel() == "b"
    assert [t.get_text() for t in axs[0].get_xticklabels()] == ["1", "13"]
    shown = axs[1].get_images()[0].get_array()
    assert shown.shape == (9, 13)
    torch.testing.assert_close(torch.as_tensor(shown.data), img[1, 0].detach())


def test_plot_drr_single_image_shapes_and_ticks(plt):
    for img in (torch.rand(7, 5), torch.rand(1, 7, 5), torch.rand(1, 1, 7, 5)):
        axs = plot_drr(img, title="x", ticks=False)
        assert len(axs) == 1 and len(axs[0].get_xticks()) == 0
    _, ax = plt.subplots()
    assert plot_drr(torch.rand(1, 1, 4, 4), axs=ax)[0] is ax


def test_plot_drr_multichannel_sums_channels_and_overlays(plt):
    img = torch.zeros(1, 3, 6, 6)
    img[0, 1, :3] = 1.0
    img[0, 2, 3:] = 2.0
    axs = plot_drr(img)
    images = axs[0].get_images()
    assert len(images) == 3  # the sum, then one overlay per structure channel
    torch.testing.assert_close(torch.as_tensor(images[0].get_array().data), img[0].sum(0))


def test_plot_drr_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_drr(torch.rand(1, 1, 4, 4))


# ----------------------------------------------------------------------------- save_png


def _decode_gray_png(data: bytes):
    """Minimal independent decoder for 8-bit grayscale, filter-0 PNGs: (width, height, rows)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        crc = int.from_bytes(data[pos + 8 + n : pos + 12 + n], "big")
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        if kind == b"IHDR":
            ihdr = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    width, height = int.from_bytes(ihdr[:4], "big"), int.from_bytes(ihdr[4:8], "big")
    raw = zlib.decompress(idat)
    rows = [list(raw[r * (width + 1) + 1 : (r + 1) * (width + 1)]) for r in range(height)]
    return width, height, rows


def test_save_png_writes_normalised_gray(tmp_path):
    img = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4) * 2.0 + 5.0  # 5 .. 27
    path = save_png(img, tmp_path / "a.png")
    width, height, rows = _decode_gray_png(path.read_bytes())
    assert (width, height) == (4, 3)
    expected = [[round((v - 5.0) / 22.0 * 255) for v in row] for row in (img[0, 0].tolist())]
    assert rows == expected  # row 0 on top, column 0 on the left
    assert rows[0][0] == 0 and rows[-1][-1] == 255


def test_save_png_decodes_with_matplotlib(tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    img = torch.rand(2, 17, 11)  # (C, H, W): channels are summed
    path = save_png(img, tmp_path / "b.png")
    decoded = mpimg.imread(str(path))
    assert decoded.shape == (17, 11)
    summed = img.sum(0)
    ref = (summed - summed.min()) / (summed.max() - summed.min())
    torch.testing.assert_close(torch.as_tensor(decoded), ref, atol=1 / 255, rtol=0)


def test_save_png_edge_cases(tmp_path):
    path = save_png(torch.full((5, 5), 3.0), tmp_path / "flat.png")
    assert _decode_gray_png(path.read_bytes())[2] == [[0] * 5] * 5
    with pytest.raises(ValueError, match="batch"):
        save_png(torch.rand(2, 1, 4, 4), tmp_path / "two.png")
    with pytest.raises(ValueError, match="NaN"):
        save_png(torch.tensor([[0.0, float("nan")]]), tmp_path / "nan.png")


# ----------------------------------------------------------------------------- command line


def test_cli_help_exits_zero(capsys):
    from tritondrr.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "render" in out and "DRR" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["render", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--rotations" in out and "mm" in out and "example" in out


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "tritondrr", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "render" in result.stdout


@needs_drr
def test_cli_render_phantom(tmp_path, capsys):
    from tritondrr.cli import main

    out = tmp_path / "drr.png"
    rc = main(["render", "--height", "32", "--delx", "12", "--backend", "torch", "--device", "cpu", "--output", str(out)])
    assert rc == 0
    width, height, rows = _decode_gray_png(out.read_bytes())
    assert (width, height) == (32, 32)
    assert max(max(r) for r in rows) == 255  # something was rendered
    printed = capsys.readouterr().out
    assert str(out) in printed and "32 x 32" in printed


@pytest.mark.parametrize("renderer", ["siddon", "exact"])
def test_cli_render_with_another_renderer(tmp_path, capsys, renderer):
    from tritondrr.cli import main

    out = tmp_path / f"{renderer}.png"
    args = ["render", "--height", "16", "--delx", "24", "--renderer", renderer, "--device", "cpu", "--output", str(out)]
    assert main(args) == 0
    width, height, rows = _decode_gray_png(out.read_bytes())
    assert (width, height) == (16, 16) and max(max(r) for r in rows) == 255
    assert f"({renderer}, backend auto)" in capsys.readouterr().out


@needs_drr
def test_cli_render_nrrd_input_and_errors(tmp_path, capsys):
    from tritondrr.cli import main
    from tritondrr.data import write_nrrd
    from tritondrr.phantom import load_example_ct

    ct = write_nrrd(tmp_path / "ct.nrrd", load_example_ct(shape=(24, 24, 16)))
    out = tmp_path / "ct.png"
    args = ["render", "--input", str(ct), "--height", "16", "--width", "20", "--delx", "20", "--output", str(out)]
    assert main(args + ["--device", "cpu", "--rotations", "0", "90", "0"]) == 0
    assert _decode_gray_png(out.read_bytes())[:2] == (20, 16)
    assert main(["render", "--input", str(tmp_path / "missing.nrrd"), "--output", str(out)]) == 1
    assert "missing.nrrd" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["render", "--height", "0"])
