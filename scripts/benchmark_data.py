#!/usr/bin/env python
"""Input-pipeline throughput: decoded + augmented images/s per worker, and workers needed.

Makes a small ImageFolder of JPEGs shaped like ImageNet photos (default 500x375, quality 90), builds
the *training* transform exactly as `train.py` does (Hydra compose of `data=<data> aug=<aug>`,
default the paper's DeiT/Swin recipe: RandomResizedCrop 224 bicubic, flip, RandAugment
rand-m9-mstd0.5-inc1, colour jitter 0.4, random erasing 0.25), then measures

* one worker: images/s of ``dataset[i]`` (JPEG decode + augmentation + to-tensor) in this process;
* a DataLoader with ``--workers`` processes (batch 64), images/s end to end;

and prints how many workers are needed to feed a given training throughput
(``--target`` img/s; e.g. the GPU train throughput from ``scripts/benchmark_models.py --train``).

``--dali cpu|gpu`` also times NVIDIA DALI (``pip install nvidia-dali-cuda120``) on the same files: its
reader, fused decode + random crop (``gpu``: nvJPEG), bicubic resize, flip and DALI's own RandAugment
(n=2, the recipe's magnitude) with ``--dali-threads`` CPU threads. DALI's RandAugment has no magnitude
noise (mstd), Invert or SolarizeAdd, so it is the nearest DALI pipeline, not the paper's recipe.

    python scripts/benchmark_data.py                       # 1 and 2 workers on this machine
    python scripts/benchmark_data.py --workers 1,2,4,8 --target 1000 --images 512
    python scripts/benchmark_data.py --dali gpu --dali-threads 1,8
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_jpegs(root: Path, n: int, size: tuple[int, int], classes: int = 4, seed: int = 0) -> Path:
    """Photo-like JPEGs: smooth colour fields plus texture (decode cost close to real photos)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        c = i % classes
        d = root / "train" / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        fx, fy, ph = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(xx * fx + ph * k) * np.cos(yy * fy + k) for k in range(3)], -1)
        img = (base * 80 + 128 + rng.normal(0, 18, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img_{i:05d}.JPEG", quality=90)
    return root


def train_transform(data: str, aug: str, img_size: int | None):
    from hydra import compose, initialize_config_dir

    from litv2.data.builder import build_transform

    overrides = [f"data={data}", f"aug={aug}"] + ([f"data.img_size={img_size}"] if img_size else [])
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return build_transform(cfg.data, cfg.aug, is_training=True), cfg


def per_worker_rate(dataset, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        dataset[n % len(dataset)]
        n += 1
    return n / (time.perf_counter() - start)


def loader_rate(dataset, workers: int, batch_size: int, batches: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=False)
    it = iter(loader)
    next(it)  # start-up (worker spawn, first batch) is not part of the steady-state rate
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images, _ = next(it)
        except StopIteration:
            it = iter(loader)
            images, _ = next(it)
        n += images.shape[0]
    return n / (time.perf_counter() - start)


def dali_rate(root: Path, aug_cfg, img_size: int, device: str, threads: int, batch_size: int,
              batches: int) -> float:
    """Images/s of DALI's nearest equivalent of the training transform (uint8 HWC batches, as our loaders give)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment

    magnitude = next((int(p[1:]) for p in str(aug_cfg.auto_augment or "").split("-") if p[:1] == "m"), None)

    @pipeline_def(enable_conditionals=True)
    def pipeline():
        jpegs, labels = fn.readers.file(file_root=str(root / "train"), random_shuffle=True)
        images = fn.decoders.image_random_crop(
            jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
            random_area=list(aug_cfg.scale), random_aspect_ratio=list(aug_cfg.ratio))
        images = fn.resize(images, resize_x=img_size, resize_y=img_size, interp_type=types.INTERP_CUBIC,
                           antialias=True)
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=aug_cfg.hflip))
        if magnitude is not None:
            images = rand_augment.rand_augment(images, n=2, m=magnitude)
        return images, labels

    pipe = pipeline(batch_size=batch_size, num_threads=threads, device_id=0 if device == "gpu" else None, seed=0)
    pipe.build()
    pipe.run()  # start-up and the first batch are not part of the steady-state rate
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = pipe.run()
        images.as_tensor()  # the batch in one contiguous piece, as a DataLoader's collate makes it
    return batches * batch_size / (time.perf_counter() - start)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="JPEGs to generate")
    p.add_argument("--jpeg-size", default="500x375", help="WxH of generated JPEGs (ImageNet average ~500x375)")
    p.add_argument("--data", default="imagenet", help="data config group (img_size, mean/std)")
    p.add_argument("--aug", default="deit", help="aug config group (deit = the paper's recipe)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--seconds", type=float, default=10.0, help="time budget of the per-worker measurement")
    p.add_argument("--workers", default="1,2", help="DataLoader worker counts to measure")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
    p.add_argument("--target", type=float, default=None, help="training img/s to feed (e.g. GPU train throughput)")
    p.add_argument("--root", default=None, help="existing ImageFolder with a train/ split instead of generated JPEGs")
    p.add_argument("--dali", choices=("cpu", "gpu"), default=None, help="also time NVIDIA DALI's pipeline")
    p.add_argument("--dali-threads", default="1,2", help="DALI CPU thread counts to measure")
    args = p.parse_args(argv)
    if args.dali:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            p.error("--dali needs NVIDIA DALI: pip install nvidia-dali-cuda120")

    from litv2.data.datasets import RobustImageFolder

    transform, cfg = train_transform(args.data, args.aug, args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else make_jpegs(
            Path(tmp), args.images, tuple(int(v) for v in args.jpeg_size.split("x")))
        dataset = RobustImageFolder(str(root / "train"), transform=transform)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
        try:
            rate1 = per_worker_rate(dataset, args.seconds)
        finally:
            torch.set_num_threads(threads)  # main() is also called in-process (tests, notebooks)
        loader_rates = {w: loader_rate(dataset, w, args.batch_size, args.batches)
                        for w in (int(v) for v in args.workers.split(",") if v.strip())}
        dali_rates = {t: dali_rate(root, cfg.aug, cfg.data.img_size, args.dali, t, args.batch_size, args.batches)
                      for t in (int(v) for v in args.dali_threads.split(",") if v.strip())} if args.dali else {}

    print(f"training transform: data={args.data} aug={args.aug} img_size={cfg.data.img_size} "
          f"auto_augment={cfg.aug.auto_augment} reprob={cfg.aug.reprob} ({os.cpu_count()} CPUs here)")
    print("| measurement | images/s |\n|---|---|")
    print(f"| 1 worker, decode + augment ({args.jpeg_size} JPEG) | {rate1:.1f} |")
    for w, r in loader_rates.items():
        print(f"| DataLoader, {w} worker(s), batch {args.batch_size} | {r:.1f} |")
    for t, r in dali_rates.items():
        print(f"| DALI ({args.dali}), {t} thread(s), batch {args.batch_size} | {r:.1f} |")
    result = {"per_worker": rate1, "loader": loader_rates, "dali": dali_rates}
    if args.target:
        need = math.ceil(args.target / rate1)
        result["workers_needed"] = need
        print(f"\nfeeding {args.target:.0f} img/s needs >= {need} workers at {rate1:.1f} img/s each "
              f"(plus headroom for the main process and collation)")
    return result


if __name__ == "__main__":
    main()
