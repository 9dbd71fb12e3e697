"""The examples in the public docstrings run and print what they claim."""

import doctest
import importlib

import pytest
import torch


@pytest.mark.parametrize("name", ["tritondrr.render", "tritondrr.drr"])
def test_docstring_examples(name):
    # importlib: the package exports functions named like these modules.
    result = doctest.testmod(importlib.import_module(name), extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
