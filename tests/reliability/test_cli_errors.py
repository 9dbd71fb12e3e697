"""Command-line user errors: one line naming the flag on stderr, exit code 2, never a traceback,
and never a partial output file (outputs are written to a temporary file and renamed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritondrr.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["render", "--height", "8", "--delx", "40", "--device", "cpu", "--backend", "torch"]


def run_main(argv, capsys):
    """(exit code, stderr) of ``main(argv)``, whether it returns or exits."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--sdd", "nan"], "--sdd"),
        (["--sdd", "inf"], "--sdd"),
        (["--delx", "-inf"], "--delx"),
        (["--rotations", "0", "nan", "0"], "--rotations"),
        (["--translations", "0", "inf", "0"], "--translations"),
        (["--sdd", "far"], "--sdd"),
        (["--height", "0"], "--height"),
        (["--delx", "0"], "--delx"),
    ],
)
def test_bad_numbers_name_the_flag_on_one_line(argv, flag, capsys, tmp_path):
    code, err = run_main(SMALL + ["--output", str(tmp_path / "x.png")] + argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_output_that_is_a_folder_or_under_a_file(capsys, tmp_path):
    code, err = run_main(SMALL + ["--output", str(tmp_path)], capsys)
    assert code == 2 and "--output" in err and "directory" in err and len(err.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = run_main(SMALL + ["--output", str(blocker / "x.png")], capsys)
    assert code == 2 and "--output" in err and "is a file" in err and len(err.strip().splitlines()) == 1
    code, err = run_main(SMALL + ["--output", str(tmp_path / "missing" / "x.png")], capsys)
    assert code == 2 and "--output" in err and "does not exist" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys, tmp_path):
    code, err = run_main(SMALL[:-4] + ["--device", "cuda", "--output", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "--device" in err and "not available" in err and len(err.strip().splitlines()) == 1
    code, err = run_main(SMALL[:-4] + ["--device", "tpu:x", "--output", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "--device" in err and "Traceback" not in err


def test_failures_after_parsing_are_one_line_and_keep_the_old_output(capsys, tmp_path):
    out = tmp_path / "drr.png"
    out.write_bytes(b"old image")
    corrupt = tmp_path / "ct.nrrd"
    corrupt.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 1000 1000 1000\nencoding: raw\n\n\x00\x00")
    code, err = run_main(["render", "--input", str(corrupt), "--output", str(out), "--device", "cpu"], capsys)
    assert code == 1 and "ct.nrrd" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"old image"


def test_a_successful_render_leaves_only_the_png(capsys, tmp_path):
    out = tmp_path / "drr.png"
    code, _ = run_main(SMALL + ["--output", str(out)], capsys)
    assert code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["drr.png"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_installed_command_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "tritondrr", "render", "--sdd", "nan", "--output", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--sdd" in result.stderr and "Traceback" not in result.stderr
