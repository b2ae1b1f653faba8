"""Training and evaluation from LitData chunks (``data=shards``), written by ``data/make_shards.py``.

A converted dataset is a folder (or an object-store URL LitData supports: ``s3://``, ``gs://``, ``azure://``, ...)
holding ``manifest.json`` (written last: its presence means complete), and per split a LitData ``index.json`` and
chunk files of records ``{"index", "image" (the JPEG's bytes), "label", "path"}`` in a seeded shuffled order.

LitData provides the format, its writer and the downloads; the order is ours (see
:class:`litv2.data.samplers.ChunkWindowSampler`): LitData's own iterable reader decides it per worker and per
rank, which neither resumes a run at another world size exactly nor keeps the augmentation of a sample fixed.
:class:`ChunkReader` reads any record by index, with ``pread`` through a small LRU of open chunk files per
process; a remote split's chunks are downloaded whole into ``data.cache_dir`` the first time they are needed.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from litv2.errors import UserError

from .datasets import CORRUPT_IMAGE_ERRORS, _seeded_call, _split_key

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "litv2-shards-v1"
CONVERT = "data/make_shards.py --src <ImageFolder root> --dst"


def is_remote(root: str) -> bool:
    """An object-store URL (or LitData's ``local:`` prefix, a local folder read through the download path)."""
    return "://" in root or root.startswith("local:")


@dataclass
class ShardSource:
    """Where a converted dataset is and what its manifest says; small, sent from rank 0 to the others."""
    root: str                 # a local folder or a URL
    cache_dir: str | None     # where a remote root's files are downloaded to (node-local)
    records: dict             # {split: number of records}
    num_classes: int

    def local_dir(self, split: str) -> str:
        """The folder that holds (or, for a remote root, will hold) the split's index.json and chunk files."""
        if not is_remote(self.root):
            return str(Path(self.root) / split)
        return str(Path(_cache_root(self.root, self.cache_dir)) / split)

    def remote_dir(self, split: str) -> str | None:
        return f"{self.root.rstrip('/')}/{split}" if is_remote(self.root) else None


def _cache_root(root: str, cache_dir: str | None) -> str:
    if not cache_dir:
        raise UserError(f"data.root={root} is remote: set data.cache_dir to a node-local folder for its chunks")
    return str(Path(str(cache_dir)).expanduser() / hashlib.sha1(root.encode()).hexdigest()[:16])


def read_manifest(root: str, cache_dir: str | None = None) -> dict:
    """The manifest of a converted dataset; a missing, unfinished or foreign one raises UserError (one line)."""
    if is_remote(root):
        from litdata.streaming.downloader import get_downloader

        local = Path(_cache_root(root, cache_dir))
        local.mkdir(parents=True, exist_ok=True)
        path = local / MANIFEST
        try:
            get_downloader(root, str(local), []).download_file(f"{root.rstrip('/')}/{MANIFEST}", str(path))
        except Exception as e:  # the backends raise their own types (FileNotFoundError, botocore, obstore, ...)
            raise UserError(f"cannot read {root.rstrip('/')}/{MANIFEST}: {str(e).splitlines()[0] if str(e) else e!r} "
                            f"(an unfinished conversion has none: rerun {CONVERT} ...)") from None
    else:
        path = Path(root).expanduser() / MANIFEST
        if not path.parent.is_dir():
            raise UserError(f"dataset root {root} does not exist; make it with {CONVERT} {root}")
        if not path.is_file():
            unfinished = any(p.name.startswith(".work-") or p.name in ("train", "val") for p in path.parent.iterdir())
            if unfinished:
                raise UserError(f"{root} holds an unfinished conversion (no {MANIFEST}): rerun {CONVERT} {root} to "
                                f"finish it")
            raise UserError(f"{root} is not a converted dataset (no {MANIFEST}); make it with {CONVERT} {root}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{root}/{MANIFEST} is unreadable ({e}); rerun {CONVERT} {root}") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{root}/{MANIFEST} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest


def open_shards(data_cfg, splits=("train", "val")) -> ShardSource:
    """Check a converted dataset against the config (rank 0, before anything is built)."""
    root = str(data_cfg.root)
    cache_dir = data_cfg.get("cache_dir")
    manifest = read_manifest(root, cache_dir)
    missing = [s for s in splits if s not in manifest["splits"]]
    if missing:
        raise UserError(f"{root} has no {', '.join(missing)} split (converted: {', '.join(manifest['splits'])})")
    num_classes = len(manifest["classes"])
    if data_cfg.num_classes is not None and num_classes != data_cfg.num_classes:
        raise UserError(f"{root} has {num_classes} classes but data.num_classes={data_cfg.num_classes}")
    return ShardSource(root, None if cache_dir is None else str(cache_dir),
                       {s: manifest["splits"][s]["records"] for s in splits}, num_classes)


class ChunkReader:
    """Records of one split by index: LitData's index.json and record format, read with ``pread`` through an LRU of
    at most ``max_open`` open chunk files (per process: reset in each loader worker); a remote split's chunks are
    downloaded whole into the local folder first (LitData's downloaders, atomic and locked per file)."""

    def __init__(self, local_dir: str, remote_dir: str | None = None, max_open: int = 16):
        self.local_dir, self.remote_dir, self.max_open = local_dir, remote_dir, max(1, int(max_open))
        self._config, self._loader, self._fds, self._pid = None, None, OrderedDict(), None
        self.opens = 0  # chunk files opened by this process
        self._load()

    def _load(self):
        from litdata.streaming.config import ChunksConfig
        from litdata.streaming.item_loader import PyTreeLoader
        from litdata.streaming.serializers import _get_serializers

        if self.remote_dir is not None:
            os.makedirs(self.local_dir, exist_ok=True)
        self._loader = PyTreeLoader()
        try:
            self._config = ChunksConfig.load(self.local_dir, _get_serializers(None), self.remote_dir, self._loader)
        except Exception as e:
            raise UserError(f"cannot read the index of {self.remote_dir or self.local_dir}: {e}") from None
        if self._config is None:
            raise UserError(f"{self.remote_dir or self.local_dir} has no index.json")
        intervals = self._config.intervals
        self.starts = [int(iv[0]) for iv in intervals]
        self.chunk_sizes = [int(iv[3] - iv[0]) for iv in intervals]
        self.length = sum(self.chunk_sizes)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"], state["_pid"] = OrderedDict(), None  # handles are per process
        return state

    def __len__(self) -> int:
        return self.length

    def chunk_path(self, chunk: int) -> str:
        from litdata.streaming.sampler import ChunkedIndex

        return self._config[ChunkedIndex(index=-1, chunk_index=chunk)][0]

    def _fd(self, chunk: int) -> int:
        if self._pid != os.getpid():  # a forked loader worker: the parent's handles are not ours to keep
            self._fds, self._pid, self.opens = OrderedDict(), os.getpid(), 0
        fd = self._fds.get(chunk)
        if fd is not None:
            self._fds.move_to_end(chunk)
            return fd
        path = self.chunk_path(chunk)
        if self.remote_dir is not None:
            self._download(chunk, path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.opens += 1
        self._fds[chunk] = fd
        if len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _download(self, chunk: int, path: str, timeout_s: float = 3600.0):
        """The whole chunk file into the cache; another process of the node may be downloading it (the backends
        return at once when another holds the file's lock): wait until it is there."""
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(path):
            self._config.download_chunk_from_index(chunk)
            if os.path.exists(path):
                break
            if time.monotonic() > deadline:
                raise OSError(f"chunk {path} did not arrive from {self.remote_dir} within {timeout_s:.0f} s")
            time.sleep(0.05)

    def read(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"record {index} of {self.length}")
        chunk = bisect.bisect_right(self.starts, index) - 1
        fd = self._fd(chunk)
        begin, end = struct.unpack("<II", os.pread(fd, 8, 4 * (1 + index - self.starts[chunk])))
        raw = os.pread(fd, end - begin, begin)
        if len(raw) != end - begin:
            raise OSError(f"{self.chunk_path(chunk)} is truncated (record {index})")
        return self._loader.deserialize(raw)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ShardDataset(torch.utils.data.Dataset):
    """One split of a converted dataset, as RobustImageFolder gives an ImageFolder split: ``dataset[index]`` or
    ``dataset[(index, sample_seed)]`` is ``(transformed image, label)``, ``(None, label)`` for an unreadable record
    (counted by :func:`litv2.data.datasets.collate_skip_corrupt`). Decoding is PIL's, as torchvision's loader does
    it, so the same JPEG bytes and seed give the same tensor from either source."""

    def __init__(self, source: ShardSource, split: str, transform=None, max_open: int = 16):
        self.source, self.split, self.transform = source, split, transform
        self.reader = ChunkReader(source.local_dir(split), source.remote_dir(split), max_open)

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def chunk_sizes(self) -> list[int]:
        return self.reader.chunk_sizes

    def __getitem__(self, key):
        index, seed = _split_key(key)
        try:
            record = self.reader.read(index)
        except (OSError, struct.error, ValueError) as e:  # a damaged chunk file: this record is lost, not the run
            log.warning("skipping unreadable record %d of %s (%s)", index, self.split, e)
            return None, -1
        target = int(record["label"])
        try:
            img = Image.open(io.BytesIO(record["image"])).convert("RGB")
        except CORRUPT_IMAGE_ERRORS as e:
            log.warning("skipping unreadable image %s (%s)", record.get("path"), e)
            return None, target
        if self.transform is not None:
            img = _seeded_call(self.transform, img, seed)
        return img, target
