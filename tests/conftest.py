"""Fixtures shared by the test modules; constants and helpers are in engine_utils.py."""
from __future__ import annotations

import pytest
import torch

from engine_utils import FIXTURES, TINY


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The embedded digits as an ImageFolder tree, built once per test session."""
    from litv2.data import prepare_digits

    return prepare_digits(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture
def tiny():
    """A factory of the tiny LITv2 (``tiny(**overrides)``), seeded: the same weights in every test."""
    from litv2.models import LITv2

    def make(**overrides):
        torch.manual_seed(0)
        return LITv2(**{**TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def release_tiny():
    """The release-format tiny checkpoint: (constructor kwargs, checkpoint path, {"input", "logits"})."""
    import json

    kwargs = json.loads((FIXTURES / "tiny_a05_ws2.json").read_text())["constructor_kwargs"]
    io = torch.load(FIXTURES / "tiny_a05_ws2_io.pt", weights_only=True)
    return kwargs, FIXTURES / "tiny_a05_ws2.pth", io
