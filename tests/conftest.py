"""Fixtures shared by the test modules; constants and helpers are in engine_utils.py."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

# Without a GPU, the Triton kernels (tests marked triton) run under Triton's interpreter, which must be on before
# triton is imported (timm imports it); with one they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine_utils import FIXTURES, KERNEL_DEVICE, TINY  # noqa: E402


@pytest.fixture
def kernel_device():
    """Tensors and modules the test makes land on KERNEL_DEVICE; TF32 off, so fp32 stays fp32 on a GPU too."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.device(KERNEL_DEVICE):
            yield KERNEL_DEVICE
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


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


class _Tmpfs:
    """Small tmpfs mounts under a test's tmp_path (root only), unmounted when the test ends."""

    def __init__(self, base):
        self.base, self.mounted = base, []

    def mount(self, name: str = "fs", size: str = "256k"):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        d = self.base / name
        d.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                              text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
        self.mounted.append(d)
        return d

    @staticmethod
    def read_only(d):
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True, capture_output=True)

    def unmount_all(self):
        for d in reversed(self.mounted):
            if subprocess.run(["umount", str(d)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(d)], capture_output=True)  # busy: detach it now, free it later


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs.mount(name, size)``: a fresh tmpfs of that size under tmp_path (skips unless root and mount works);
    ``tmpfs.read_only(dir)`` remounts one read-only."""
    fs = _Tmpfs(tmp_path)
    try:
        yield fs
    finally:
        fs.unmount_all()


@pytest.fixture(scope="session")
def digit_shards(digits, tmp_path_factory):
    """The digits converted into LitData chunks by data/make_shards.py's code (small chunks: about 20 train chunks
    of about 70 records), built once per test session."""
    from litv2.data.convert import convert

    dst = tmp_path_factory.mktemp("shards") / "digits"
    convert(digits, dst, chunk_mb=0.1, workers=2, seed=0)
    return dst
