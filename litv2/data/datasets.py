"""Datasets: ImageFolder trees (ImageNet layout), the embedded digits, synthetic tensors.

Every dataset here accepts either an integer index or an ``(index, sample_seed)`` pair from
:class:`litv2.data.samplers.ResumableSampler`. With a seed, the random augmentation of that
sample is a pure function of the seed, so a run resumed mid-epoch (or with a different number
of loader workers) sees exactly the same images as an uninterrupted one.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from litv2.errors import UserError

log = logging.getLogger(__name__)

LAYOUT = "<root>/train/<class>/<image> and <root>/val/<class>/<image> (ImageFolder layout)"
# What PIL raises for corrupt / truncated files.
CORRUPT_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _seeded_call(fn, x, seed: int | None):
    """Run fn(x) with python/numpy/torch RNGs seeded from ``seed``, restoring them afterwards."""
    if seed is None:
        return fn(x)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            return fn(x)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _split_key(key):
    return key if isinstance(key, tuple) else (key, None)


class RobustImageFolder(ImageFolder):
    """torchvision ImageFolder that skips unreadable images instead of crashing mid-epoch.

    A corrupt or truncated file yields ``(None, target)``; :func:`collate_skip_corrupt` drops it
    from the batch and counts it, and the engine reports the count in the metrics.

    ``files`` (``{class: [image paths relative to its folder]}``, from :func:`list_image_folder`) gives
    the images instead of listing ``root`` again: the same samples in the same order.
    """

    def __init__(self, root, transform=None, files: dict[str, list[str]] | None = None, **kwargs):
        self._files = files
        super().__init__(root, transform=transform, **kwargs)

    def find_classes(self, directory):
        if self._files is None:
            return super().find_classes(directory)
        classes = sorted(self._files)
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, *args, **kwargs):
        if self._files is None:
            return super().make_dataset(directory, class_to_idx, *args, **kwargs)
        return [(os.path.join(directory, c, f), class_to_idx[c]) for c in sorted(class_to_idx) for f in self._files[c]]

    def __getitem__(self, key):
        index, seed = _split_key(key)
        path, target = self.samples[index]
        try:
            img = self.loader(path)
        except CORRUPT_IMAGE_ERRORS as e:
            log.warning("skipping unreadable image %s (%s)", path, e)
            return None, target
        if self.transform is not None:
            img = _seeded_call(self.transform, img, seed)
        return img, target


class SyntheticDataset(torch.utils.data.Dataset):
    """Random uint8 (H, W, C) images of a fixed size (deterministic per index), as the image loaders give them;
    no decoding, no disk."""

    def __init__(self, size: int, img_size: int, num_classes: int, in_chans: int = 3):
        self.size, self.img_size, self.num_classes, self.in_chans = size, img_size, num_classes, in_chans

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        index, _ = _split_key(key)
        g = torch.Generator().manual_seed(index)
        x = torch.randint(0, 256, (self.img_size, self.img_size, self.in_chans), generator=g, dtype=torch.uint8)
        return x, index % self.num_classes


def collate_skip_corrupt(batch):
    """Default collate over the readable samples; returns (images, targets, n_skipped)."""
    good = [b for b in batch if b[0] is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    images, targets = torch.utils.data.default_collate(good)
    return images, targets, skipped


def list_image_folder(root, splits=("train", "val")) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: [image paths relative to the class folder]}}``: one listing of an ImageFolder tree,
    in torchvision's ImageFolder order (classes sorted, each class folder walked in sorted order, sub-folders
    included). Raises UserError if the root or a split folder is missing."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist; expected {LAYOUT}")
    listing = {}
    for split in splits:
        d = root / split
        if not d.is_dir():
            raise UserError(f"dataset root {root} has no {split}/ folder; expected {LAYOUT}")
        listing[split] = {}
        for c in sorted(e.name for e in os.scandir(d) if e.is_dir()):
            listing[split][c] = [os.path.relpath(os.path.join(top, f), d / c)
                                 for top, _, names in sorted(os.walk(d / c, followlinks=True))
                                 for f in sorted(names) if _is_image(f)]
    return listing


def check_image_folder(root, splits=("train", "val"), verify: bool = False, num_classes: int | None = None,
                       listing: dict | None = None) -> dict:
    """Check an ImageFolder tree; raise UserError (one line, naming the path) if it is unusable.

    Returns ``{split: {"classes": n, "images": n, "unreadable": [paths]}}``. With ``verify`` every
    image is decoded (slow on ImageNet: meant for data/check_dataset.py, not for every run).
    ``listing`` (from :func:`list_image_folder`) spares listing the tree again.
    """
    root = Path(root)
    listing = list_image_folder(root, splits) if listing is None else listing
    report = {}
    for split in splits:
        d, files = root / split, listing[split]
        if not files:
            raise UserError(f"{d} has no class folders; expected {LAYOUT}")
        empty = [c for c, names in files.items() if not names]
        if empty:
            raise UserError(f"{d}: class folder(s) without images: {', '.join(empty[:5])}; expected {LAYOUT}")
        unreadable = []
        if verify:
            for c, names in files.items():
                for f in names:
                    try:
                        with Image.open(d / c / f) as im:
                            im.load()
                    except CORRUPT_IMAGE_ERRORS:
                        unreadable.append(str(d / c / f))
        report[split] = {"classes": len(files), "images": sum(map(len, files.values())), "unreadable": unreadable}
    if len(splits) > 1 and len({tuple(listing[s]) for s in splits}) > 1:
        raise UserError(f"dataset root {root}: the class folders differ between {', '.join(splits)}")
    if num_classes is not None:
        for split in splits:
            if len(listing[split]) != num_classes:
                raise UserError(f"{root / split} has {len(listing[split])} class folders but "
                                f"data.num_classes={num_classes}")
    return report


def prepare_digits(root, seed: int = 0, val_fraction: float = 0.2, size: int = 32) -> Path:
    """Write scikit-learn's bundled handwritten digits as an ImageFolder tree (once) and return root.

    1,797 8x8 grey images (10 classes), upscaled bicubically to ``size`` and saved as RGB PNG;
    stratified train/val split with a fixed seed. Built in a temporary folder and renamed into
    place, so concurrent processes (e.g. DDP ranks) never see half a tree.
    """
    root = Path(root)
    marker = root / ".complete"
    if marker.exists():
        return root
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists but is not a complete digits tree (no .complete marker); delete it to rebuild")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    ids = np.arange(len(images))
    train_ids, val_ids = train_test_split(ids, test_size=val_fraction, random_state=seed, stratify=digits.target)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, split_ids in (("train", train_ids), ("val", val_ids)):
        for i in split_ids:
            d = tmp / split / str(digits.target[i])
            d.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            img.save(d / f"{i:04d}.png")
    (tmp / ".complete").write_text(f"sklearn load_digits, seed={seed}, val_fraction={val_fraction}, size={size}\n")
    try:
        if root.exists():
            root.rmdir()  # empty folder left by someone else: take its place
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        if not marker.exists():
            raise
    log.info("built the digits ImageFolder tree at %s (%d train / %d val)", root, len(train_ids), len(val_ids))
    return root
