"""Malformed and forged NRRD/NIfTI files: ``read`` returns a Subject or raises one clear ValueError,
and never allocates what a forged header claims (``tritondrr._limits`` checks the header first)."""

from __future__ import annotations

import gzip
import time
import tracemalloc

import nibabel
import nrrd
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tritondrr import Subject
from tritondrr.data import read

#: Peak Python/numpy allocation allowed while reading any file here (the valid ones are < 100 kB).
PEAK_BYTES = 32 << 20


def read_bounded(path):
    """``read(path)`` under tracemalloc: (Subject or the exception, peak bytes allocated)."""
    tracemalloc.start()
    try:
        try:
            result = read(path)
        except Exception as e:  # noqa: BLE001 - the caller checks the type
            result = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak


def nifti_header(shape, dtype=np.float32) -> bytes:
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4


def nrrd_header(sizes, encoding="raw", type_="float", extra="") -> bytes:
    return (
        "NRRD0004\n"
        f"type: {type_}\ndimension: {len(sizes)}\nsizes: {' '.join(str(n) for n in sizes)}\n"
        f"encoding: {encoding}\nendian: little\n{extra}\n"
    ).encode()


# ------------------------------------------------------------------------------------- forged sizes


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_header_claiming_a_billion_voxels_fails_fast_and_small(tmp_path, suffix):
    data = nifti_header((1000, 1000, 1000))
    path = tmp_path / f"forged{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    assert path.stat().st_size < 400
    start = time.perf_counter()
    result, peak = read_bounded(path)
    assert isinstance(result, ValueError)
    assert "(1000, 1000, 1000)" in str(result) and "truncated" in str(result)
    assert peak < PEAK_BYTES and time.perf_counter() - start < 5.0


@pytest.mark.parametrize("encoding", ["raw", "gzip", "ascii"])
def test_nrrd_header_claiming_a_billion_voxels_fails_fast_and_small(tmp_path, encoding):
    payload = {"raw": b"\x00" * 64, "gzip": gzip.compress(b"\x00" * 64), "ascii": b"0 0 0 0\n"}[encoding]
    path = tmp_path / "forged.nrrd"
    path.write_bytes(nrrd_header((1000, 1000, 1000), encoding) + payload)
    result, peak = read_bounded(path)
    assert isinstance(result, ValueError)
    assert "(1000, 1000, 1000)" in str(result) and "truncated" in str(result)
    assert peak < PEAK_BYTES


def test_detached_nrrd_data_file_is_checked(tmp_path):
    (tmp_path / "data.raw").write_bytes(b"\x00" * 100)
    path = tmp_path / "forged.nhdr"
    path.write_bytes(nrrd_header((100, 100, 100), extra="data file: data.raw"))
    result, _ = read_bounded(path)
    assert isinstance(result, ValueError) and "truncated" in str(result)
    path.write_bytes(nrrd_header((4, 5, 5), extra="data file: missing.raw"))
    result, _ = read_bounded(path)
    assert isinstance(result, ValueError) and "missing.raw" in str(result)


def test_a_valid_file_above_the_limit_names_the_variable(tmp_path, monkeypatch):
    path = tmp_path / "ct.nrrd"
    nrrd.write(str(path), np.zeros((16, 16, 16), np.float32), index_order="F")
    assert isinstance(read(path), Subject)
    monkeypatch.setenv("TRITONDRR_MAX_BYTES", "4K")
    with pytest.raises(ValueError, match=r"\(16, 16, 16\)\) needs about 16.0 KiB.*TRITONDRR_MAX_BYTES"):
        read(path)


# ------------------------------------------------------------------------------------- fuzzing

FIELDS = st.sampled_from(
    [
        "",
        "space: left-posterior-superior",
        "space: nowhere",
        "space directions: (1,0,0) (0,1,0) (0,0,1)",
        "space directions: (1,0,0) (0,0,0) (0,0,1)",
        "space directions: (nan,0,0) (0,1,0) (0,0,1)",
        "space directions: garbage",
        "space origin: (0,0,0)",
        "space origin: (1,2)",
        "spacings: 1 2 3",
        "spacings: 0 0 0",
        "byte skip: -1",
        "byte skip: 100000",
        "line skip: 3",
        "kinds: domain domain domain",
        "data file: nowhere.raw",
        "centerings: cell cell cell",
    ]
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    sizes=st.lists(st.one_of(st.integers(-2, 12), st.integers(10**4, 10**7)), min_size=1, max_size=4),
    type_=st.sampled_from(["float", "double", "short", "uint8", "int64", "block", "complex", "float32?"]),
    encoding=st.sampled_from(["raw", "gzip", "ascii", "hex", "bzip2", "zip?"]),
    fields=st.lists(FIELDS, max_size=3),
    payload=st.binary(max_size=3000),
    compress=st.booleans(),
)
def test_fuzzed_nrrd_headers_give_a_subject_or_a_value_error(
    tmp_path, sizes, type_, encoding, fields, payload, compress
):
    path = tmp_path / "fuzz.nrrd"
    if compress and encoding == "gzip":
        payload = gzip.compress(payload)
    path.write_bytes(nrrd_header(sizes, encoding, type_, "\n".join(fields)) + payload)
    result, peak = read_bounded(path)
    assert isinstance(result, (Subject, ValueError)), repr(result)
    assert peak < PEAK_BYTES
    if isinstance(result, ValueError):
        assert "fuzz.nrrd" in str(result)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    flips=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), min_size=1, max_size=6),
    gz=st.booleans(),
    cut=st.integers(0, 600),
)
def test_fuzzed_nifti_headers_give_a_subject_or_a_value_error(tmp_path, flips, gz, cut):
    image = nibabel.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.diag([1.0, 2.0, 3.0, 1.0]))
    good = tmp_path / "good.nii"
    nibabel.save(image, str(good))
    data = bytearray(good.read_bytes())
    for position, value in flips:
        data[position] = value
    data = bytes(data[: len(data) - cut])
    path = tmp_path / ("fuzz.nii.gz" if gz else "fuzz.nii")
    path.write_bytes(gzip.compress(data) if gz else data)
    result, peak = read_bounded(path)
    assert isinstance(result, (Subject, ValueError)), repr(result)
    assert peak < PEAK_BYTES
    if isinstance(result, Subject):
        assert torch.isfinite(result.density).all()
