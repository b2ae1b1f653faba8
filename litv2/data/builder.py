"""From the `data` and `aug` configs to datasets, timm transforms, loaders, Mixup and the loss."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybePILToTensor
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from litv2.errors import UserError

from .datasets import (RobustImageFolder, SyntheticDataset, check_image_folder, collate_skip_corrupt, list_image_folder,
                       prepare_digits)
from .device import DeviceLoader, ToUint8HWC
from .samplers import ChunkWindowSampler, ResumableSampler, ShardSampler
from .shards import ShardDataset, ShardSource, open_shards

log = logging.getLogger(__name__)


@dataclass
class DatasetIndex:
    """An ImageFolder tree's root and its images (``{split: {class: [files]}}``, see list_image_folder)."""
    root: Path
    files: dict


def dataset_index(data_cfg, splits=("train", "val")) -> DatasetIndex | ShardSource | None:
    """The dataset's root and image files, listed once and checked (building the digits on first use); None for
    synthetic data. The trainer builds it on rank 0 and sends it to the other ranks, so a 1.3M-image ImageNet
    tree is listed once per job, not twice on every rank. Converted chunks (data=shards) are not listed: their
    manifest is read and checked (:func:`litv2.data.shards.open_shards`).

    Raises UserError, naming the path and the expected layout, if the tree is missing or malformed.
    """
    if data_cfg.name == "synthetic":
        return None
    if data_cfg.root is None:
        raise UserError(f"data.root is not set for data={data_cfg.name}")
    if data_cfg.name == "shards":
        return open_shards(data_cfg, splits)
    root = Path(str(data_cfg.root)).expanduser()
    if data_cfg.name == "digits":
        prepare_digits(root)
    listing = list_image_folder(root, splits)
    check_image_folder(root, splits=splits, num_classes=data_cfg.num_classes, listing=listing)
    return DatasetIndex(root, listing)


def dataset_root(data_cfg, splits=("train", "val")) -> Path | ShardSource | None:
    """Where the ImageFolder tree is (checked as by :func:`dataset_index`), the converted dataset (data=shards), or
    None for synthetic data."""
    index = dataset_index(data_cfg, splits)
    return index.root if isinstance(index, DatasetIndex) else index


def build_transform(data_cfg, aug_cfg, is_training: bool):
    """What a loader worker does to one image: timm's transform in its prefetcher mode (no ToTensor, Normalize or
    random erasing; :class:`DeviceLoader` does those on the device), ending in a (H, W, C) uint8 tensor."""
    if not is_training:
        t = create_transform(
            data_cfg.img_size, is_training=False, interpolation=data_cfg.interpolation,
            crop_pct=data_cfg.crop_pct, crop_mode=data_cfg.crop_mode, use_prefetcher=True)
    else:
        t = create_transform(
            data_cfg.img_size, is_training=True, scale=tuple(aug_cfg.scale), ratio=tuple(aug_cfg.ratio),
            hflip=aug_cfg.hflip, auto_augment=aug_cfg.auto_augment,
            color_jitter=aug_cfg.color_jitter or None, interpolation=aug_cfg.interpolation,
            mean=tuple(data_cfg.mean), use_prefetcher=True)  # mean: RandAugment's fill colour
    if not isinstance(t.transforms[-1], MaybePILToTensor):
        raise RuntimeError(f"timm's prefetcher transform no longer ends in MaybePILToTensor: {t}")
    t.transforms[-1] = ToUint8HWC()  # its uint8 tensor without the transpose to (C, H, W)
    return t


def _device_loader(loader, data_cfg, device, aug_cfg=None) -> DeviceLoader:
    erasing = None
    if aug_cfg is not None and aug_cfg.reprob > 0:
        erasing = RandomErasing(aug_cfg.reprob, mode=aug_cfg.remode, max_count=aug_cfg.recount, device=device)
    return DeviceLoader(loader, device, data_cfg.mean, data_cfg.std, erasing)


def _dataset(data_cfg, aug_cfg, root, split: str, is_training: bool):
    """``root``: a DatasetIndex (its listing is used), the tree's path (listed here) or a ShardSource."""
    if data_cfg.name == "synthetic":
        size = data_cfg.train_size if split == "train" else data_cfg.val_size
        return SyntheticDataset(size, data_cfg.img_size, data_cfg.num_classes)
    transform = build_transform(data_cfg, aug_cfg, is_training)
    if isinstance(root, ShardSource):
        return ShardDataset(root, split, transform, max_open=data_cfg.get("open_chunks", 16))
    if isinstance(root, DatasetIndex):
        return RobustImageFolder(str(root.root / split), transform=transform, files=root.files[split])
    return RobustImageFolder(str(root / split), transform=transform)


def _ignore_stop_signals(_worker_id: int):
    """Loader workers leave SIGTERM/SIGUSR1/SIGUSR2 to the main process, which saves and then shuts
    them down (SLURM signals every process of a job; a worker dying first would crash the step)."""
    import signal

    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


_exit_hook_registered = False


def _end_workers_at_exit():
    """At interpreter exit, end the daemonic child processes still alive (loader workers that outlived their loader):
    multiprocessing's own exit handler sends them SIGTERM, which loader workers ignore, and then waits for them
    without a timeout. Registered after it, so it runs before it."""
    import multiprocessing
    import signal
    import time

    children = [p for p in multiprocessing.active_children() if p.daemon]
    if children and hasattr(signal, "SIGCHLD"):  # torch's handler would raise on the first worker that ends
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        p.terminate()
    deadline = time.monotonic() + 1.0
    for p in children:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def _register_exit_hook():
    global _exit_hook_registered
    if not _exit_hook_registered:
        import atexit
        import multiprocessing.util  # noqa: F401  registers multiprocessing's exit handler first

        atexit.register(_end_workers_at_exit)
        _exit_hook_registered = True


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM or container CPU set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(requested: int) -> int:
    """``data.num_workers``, capped at the CPUs this process may use.

    More workers than CPUs only compete with each other and the main process (torch warns about it);
    the presets ask for 8, sized for GPU hosts, and the same command then also runs on a laptop. Data
    order and augmentation depend on (seed, epoch, index) only, so the cap changes no result.
    """
    cpus = usable_cpus()
    if requested > cpus:
        log.warning("data.num_workers=%d is more than the %d CPUs this process can use; using %d workers",
                    requested, cpus, cpus)
        return cpus
    return requested


def _loader(data_cfg, dataset, sampler, drop_last: bool, persistent: bool):
    workers = loader_workers(int(data_cfg.num_workers))
    if workers:
        _register_exit_hook()
    return torch.utils.data.DataLoader(
        dataset, batch_size=data_cfg.batch_size, sampler=sampler, drop_last=drop_last,
        num_workers=workers, pin_memory=bool(data_cfg.pin_memory) and torch.cuda.is_available(),
        persistent_workers=persistent and workers > 0,
        collate_fn=collate_skip_corrupt, worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        generator=torch.Generator())  # its own generator: iterating never consumes the global RNG


def build_train_loader(cfg, root, rank: int = 0, world_size: int = 1, device="cpu"):
    """Training loader (normalised, randomly erased batches on ``device``) and its ResumableSampler (call
    ``sampler.set_epoch(epoch, start)`` per epoch)."""
    ds = _dataset(cfg.data, cfg.aug, root, "train", is_training=True)
    if len(ds) < world_size * cfg.data.batch_size:
        raise UserError(f"the training set ({len(ds)} images) is smaller than one global batch "
                        f"({world_size} x data.batch_size={cfg.data.batch_size})")
    if isinstance(ds, ShardDataset):  # the same order contract, over chunk windows
        sampler = ChunkWindowSampler(ds.chunk_sizes, rank, world_size, seed=cfg.seed, window=cfg.data.shuffle_window,
                                     run=cfg.data.run_length, step_samples=cfg.data.batch_size * cfg.trainer.accum_steps)
    else:
        sampler = ResumableSampler(len(ds), rank, world_size, seed=cfg.seed, shuffle=True)
    loader = _loader(cfg.data, ds, sampler, drop_last=True, persistent=bool(cfg.data.persistent_workers))
    return _device_loader(loader, cfg.data, device, cfg.aug), sampler


def build_eval_loader(data_cfg, root, rank: int = 0, world_size: int = 1, split: str = "val", device="cpu"):
    """Validation loader (this rank's shard, normalised batches on ``device``). Its workers are not persistent:
    they would sit idle, holding memory, between the evaluations of a run."""
    ds = _dataset(data_cfg, None, root, split, is_training=False)
    loader = _loader(data_cfg, ds, ShardSampler(len(ds), rank, world_size), drop_last=False, persistent=False)
    return _device_loader(loader, data_cfg, device)


def build_mixup_and_criterion(aug_cfg, num_classes: int):
    """timm Mixup/CutMix (or None) and the matching training loss."""
    active = aug_cfg.mixup > 0 or aug_cfg.cutmix > 0 or aug_cfg.cutmix_minmax is not None
    if active and aug_cfg.mixup_prob > 0:
        mixup = Mixup(mixup_alpha=aug_cfg.mixup, cutmix_alpha=aug_cfg.cutmix, cutmix_minmax=aug_cfg.cutmix_minmax,
                      prob=aug_cfg.mixup_prob, switch_prob=aug_cfg.mixup_switch_prob, mode=aug_cfg.mixup_mode,
                      label_smoothing=aug_cfg.smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if aug_cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=aug_cfg.smoothing)
    return None, torch.nn.CrossEntropyLoss()
