"""I/O faults (issue 28): an unreadable checkpoint is described in plain words."""
import re

import pytest
import torch


# ---- 2. an unreadable checkpoint, in plain words -----------------------------------------------------------

def _truncated_checkpoint(path):
    torch.save({"w": torch.arange(1000.0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return f"is truncated or damaged: an incomplete PyTorch zip archive ({len(data) // 2:,} bytes)"


def _legacy_truncated(path):
    torch.save({"w": torch.arange(1000.0)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return f"is truncated or damaged: a PyTorch file in the legacy (pickle) format ({len(data) // 2:,} bytes)"


def _refused(path):
    import argparse

    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    return "holds objects that weights_only loading refuses (Unsupported global: GLOBAL argparse.Namespace"


def _foreign_zip(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("weights.txt", "1 2 3")
    return "is a zip archive but not a PyTorch checkpoint (it holds weights.txt)"


def _written(content: bytes, expected: str):
    def make(path):
        path.write_bytes(content)
        return expected
    return make


@pytest.mark.parametrize("make", [
    _written(b"hello, this is not a checkpoint\nline 2\n",
             "is not a PyTorch checkpoint but a text file, starting 'hello, this is not a checkpoint'"),
    _written(b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n",
             "is not a PyTorch checkpoint but an HTML page (a download that returned a web page?), starting "
             "'<!DOCTYPE html>'"),
    _written(b"", "is empty (0 bytes)"),
    _written(bytes(range(256)), "is not a PyTorch checkpoint (unrecognised binary data, 256 bytes)"),
    _truncated_checkpoint, _legacy_truncated, _refused, _foreign_zip,
], ids=["text", "html", "empty", "binary", "truncated", "legacy-truncated", "refused", "foreign-zip"])
def test_an_unreadable_checkpoint_is_described_in_plain_words(make, tmp_path):
    from litv2.engine import checkpoint as ckpt

    path = tmp_path / "x.pth"
    expected = make(path)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_file(path)
    assert str(e.value).startswith(f"checkpoint {path} {expected}"), str(e.value)
    assert "\n" not in str(e.value) and not re.search(r"\(\d+\)", str(e.value)), str(e.value)
