"""Batches leave the loader workers as uint8 images and become normalised float tensors on the device.

The workers decode and augment (timm's transforms without their ToTensor / Normalize / random-erasing steps,
timm's "prefetcher" mode) and ship ``(B, H, W, C)`` uint8 batches: a quarter of float32's bytes through shared
memory and to the device. :class:`DeviceLoader` (timm's ``PrefetchLoader``, for this project's
``(images, targets, skipped)`` batches) moves each batch, normalises it and applies random erasing there. The
permuted ``(B, C, H, W)`` view of a ``(B, H, W, C)`` batch is channels-last in memory, the layout LITv2 runs in.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch


class ToUint8HWC:
    """PIL image -> ``(H, W, C)`` uint8 tensor (the last step of a worker's transform)."""

    def __call__(self, img) -> torch.Tensor:
        array = np.array(img, dtype=np.uint8)
        if array.ndim < 3:
            array = array[:, :, None]
        return torch.from_numpy(array)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DeviceLoader:
    """Iterate a DataLoader of ``(uint8 (B, H, W, C) images, targets, skipped)`` batches as
    ``(float (B, C, H, W) images on device, normalised, targets on device, skipped)``.

    Args:
        loader: the DataLoader (its batches may have ``images=None`` when every file was unreadable).
        device: where the batches go (pinned host memory makes the copy asynchronous on CUDA).
        mean, std: per-channel normalisation in [0, 1] units, as timm's configs give them.
        random_erasing: a ``timm.data.RandomErasing`` applied to each normalised batch (training), or None.
    """

    def __init__(self, loader, device, mean, std, random_erasing=None):
        self.loader, self.device, self.random_erasing = loader, torch.device(device), random_erasing
        self.mean = torch.tensor([255.0 * m for m in mean], device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std], device=self.device).view(1, -1, 1, 1)
        self._open = weakref.WeakSet()  # iterations not yet closed

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset

    def __iter__(self):
        batches = self._batches()
        self._open.add(batches)
        return batches

    def close(self) -> None:
        """End every open iteration and let go of the DataLoader, so its worker processes exit now.

        Without this, an error mid-epoch leaves the workers alive as long as the traceback that holds the epoch's
        iterator, and at interpreter exit multiprocessing waits for them (they ignore SIGTERM, see
        :func:`litv2.data.builder._ignore_stop_signals`). Persistent workers belong to the DataLoader and go with it.
        """
        for batches in list(self._open):
            batches.close()
        self._open.clear()
        self.loader = None

    def _batches(self):
        for images, targets, skipped in self.loader:
            if images is not None:
                images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
                images = images.sub_(self.mean).div_(self.std)
                if self.random_erasing is not None:
                    images = self.random_erasing(images)
                targets = targets.to(self.device, non_blocking=True)
            yield images, targets, skipped
