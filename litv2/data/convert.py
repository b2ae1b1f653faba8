"""An ImageFolder tree -> LitData chunks (what ``data/make_shards.py`` runs; read back by :mod:`litv2.data.shards`).

Each split is written by LitData's ``optimize`` (worker processes, its tqdm bar) into ``<dst>/.work-<split>-<pid>/``:
records ``{"index": position in the ImageFolder listing, "image": the file's bytes, "label", "path": relative}``
in a seeded shuffled order, every image decoded once to check it (an unreadable one is listed in the manifest and
left out). The chunks are then read back once: per-class counts, SHA-256 of every chunk file, every index present
once. Only then is the folder renamed to ``<dst>/<split>`` (one atomic rename) with its ``summary.json``, and
``manifest.json`` is written last (temporary file + rename): a killed conversion leaves no manifest, and a rerun
keeps the published splits, deletes the unfinished ones and writes them again.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from litv2.errors import UserError

from .datasets import CORRUPT_IMAGE_ERRORS, check_image_folder, list_image_folder
from .shards import FORMAT, MANIFEST

log = logging.getLogger(__name__)
SUMMARY = "summary.json"


def encode_record(item):
    """One optimize() input -> its record, or None (and a note in the corrupt folder) if the image does not decode.
    ``resize``: (short side, JPEG quality): an image with a longer short side is stored resized and re-encoded."""
    index, path, rel, label, corrupt_dir, resize = item
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            if resize is not None and min(img.size) > resize[0]:
                data = _resized_jpeg(img, *resize)
            else:
                img.load()  # the whole image decoded: truncation and corrupt data show here
    except CORRUPT_IMAGE_ERRORS as e:
        Path(corrupt_dir, f"{index}.json").write_text(json.dumps({"index": index, "path": rel, "error": str(e)}))
        return None
    return {"index": index, "image": data, "label": label, "path": rel}


def _resized_jpeg(img, short_side: int, quality: int) -> bytes:
    from PIL import Image

    w, h = img.size
    scale = short_side / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img.draft("RGB", size)  # JPEG: decode at the smallest DCT scale that is still >= size
    out = io.BytesIO()
    img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(out, format="JPEG", quality=quality)
    return out.getvalue()


_readers: dict = {}


def read_chunk(path: str) -> tuple[str, int, str, list[tuple[int, int]]]:
    """(file name, bytes, SHA-256, [(index, label) of each record]) of one chunk file, its records decoded by
    LitData's record loader (through :class:`litv2.data.shards.ChunkReader`)."""
    from .shards import ChunkReader

    folder = str(Path(path).parent)
    if folder not in _readers:
        _readers[folder] = ChunkReader(folder)
    loader = _readers[folder]._loader
    data = Path(path).read_bytes()
    (n,) = struct.unpack_from("<I", data, 0)
    offsets = struct.unpack_from(f"<{n + 1}I", data, 4)
    records = []
    for i in range(n):
        record = loader.deserialize(data[offsets[i]:offsets[i + 1]])
        records.append((int(record["index"]), int(record["label"])))
    return Path(path).name, len(data), hashlib.sha256(data).hexdigest(), records


def convert(src, dst, splits=("train", "val"), chunk_mb: float = 64.0, workers: int | None = None, seed: int = 0,
            resize: tuple[int, int] | None = None) -> dict:
    """Convert (or finish converting) ``src`` into ``dst``; returns the manifest. Idempotent: a complete ``dst`` with
    the same options is returned as it is."""
    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser()
    options = {"chunk_mb": chunk_mb, "seed": seed, "resize": list(resize) if resize else None}
    done = _complete_manifest(dst)
    if done is not None:
        if done["options"] != options or list(done["splits"]) != list(splits):
            raise UserError(f"{dst} already holds a conversion with other options ({done['options']}, splits "
                            f"{', '.join(done['splits'])}); choose another --dst or delete it")
        log.info("%s is complete (%s): nothing to do", dst, MANIFEST)
        return done
    listing = list_image_folder(src, splits)
    check_image_folder(src, splits, listing=listing)
    classes = sorted(listing[splits[0]])
    dst.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for n, split in enumerate(splits):
        summaries[split] = _split(src, dst, split, listing[split], classes, options, workers,
                                  np.random.default_rng([seed, n]))
    manifest = {"format": FORMAT, "source": str(src), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "options": options, "classes": classes,
                "splits": {s: {k: v for k, v in summ.items() if k != "chunks"} for s, summ in summaries.items()}}
    _write_atomic(dst / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _complete_manifest(dst: Path) -> dict | None:
    try:
        manifest = json.loads((dst / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("format") == FORMAT else None


def _split(src: Path, dst: Path, split: str, files: dict, classes: list, options: dict, workers, rng) -> dict:
    """Write one split, or take the one a previous run published."""
    final = dst / split
    if (final / SUMMARY).is_file():
        log.info("%s is complete: kept", final)
        return json.loads((final / SUMMARY).read_text())
    if final.exists():
        raise UserError(f"{final} exists but was not written by make_shards.py (no {SUMMARY}); move it away")
    for stale in dst.glob(f".work-{split}-*"):  # what a killed run left
        shutil.rmtree(stale, ignore_errors=True)
    work = dst / f".work-{split}-{os.getpid()}"
    corrupt_dir, out = work / "corrupt", work / "chunks"
    corrupt_dir.mkdir(parents=True)
    records = [(i, str(src / split / c / f), f"{c}/{f}", label)
               for i, (label, c, f) in enumerate((label, c, f) for label, c in enumerate(classes) for f in files[c])]
    resize = tuple(options["resize"]) if options["resize"] else None
    inputs = [(*records[i], str(corrupt_dir), resize) for i in rng.permutation(len(records))]
    workers = max(1, min(int(workers or os.cpu_count() or 1), len(inputs)))
    log.info("%s: %d images -> %s (%d workers)", split, len(inputs), final, workers)
    _optimize(inputs, out, options["chunk_mb"], workers)
    summary = _verify(out, corrupt_dir, len(records), classes, workers)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1))
    os.replace(out, final)  # the split appears complete or not at all
    _fsync_dir(dst)
    shutil.rmtree(work, ignore_errors=True)
    return summary


class _WithoutAdverts(io.TextIOBase):
    """Standard output less the line LitData's optimize prints to advertise its hosted service."""

    ADVERT = "Create an account on https://lightning.ai/"

    def __init__(self, out):
        self.out, self.pending = out, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not line.startswith(self.ADVERT):
                self.out.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not self.pending.startswith(self.ADVERT):
            self.out.write(self.pending)
        self.pending = ""
        self.out.flush()


def _optimize(inputs, out: Path, chunk_mb: float, workers: int):
    from litdata import optimize

    quiet = _WithoutAdverts(sys.stdout)
    with contextlib.redirect_stdout(quiet):
        try:
            optimize(fn=encode_record, inputs=inputs, output_dir=str(out), chunk_bytes=max(1, int(chunk_mb * 1e6)),
                     num_workers=workers, keep_data_ordered=True, reorder_files=False, mode="overwrite",
                     start_method="fork")
        finally:
            quiet.flush()


def _verify(out: Path, corrupt_dir: Path, total: int, classes: list, workers: int) -> dict:
    """Read every chunk back: per-class counts, checksums, and every index of the split written once or listed
    as corrupt."""
    from tqdm import tqdm

    index = json.loads((out / "index.json").read_text())
    paths = [str(out / c["filename"]) for c in index["chunks"]]
    with get_context("fork").Pool(workers) as pool:
        chunks = list(tqdm(pool.imap(read_chunk, paths), total=len(paths), desc="checking chunks", unit="chunk"))
    corrupt = sorted((json.loads(p.read_text()) for p in corrupt_dir.iterdir()), key=lambda c: c["index"])
    seen = [i for _, _, _, recs in chunks for i, _ in recs]
    if sorted(seen + [c["index"] for c in corrupt]) != list(range(total)):
        raise RuntimeError(f"{out}: the chunks hold {len(seen)} records and {len(corrupt)} images were unreadable, "
                           f"but the split has {total} images")
    per_class = np.bincount([label for _, _, _, recs in chunks for _, label in recs], minlength=len(classes))
    return {"records": len(seen), "images": total, "per_class": dict(zip(classes, per_class.tolist())),
            "corrupt": corrupt, "index_sha256": hashlib.sha256((out / "index.json").read_bytes()).hexdigest(),
            "chunks": [{"file": name, "bytes": size, "records": len(recs), "sha256": digest}
                       for name, size, digest, recs in chunks]}


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path):
    try:
        fd = os.open(d, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass
