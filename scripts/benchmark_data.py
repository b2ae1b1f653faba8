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

``--source shards`` (or ``folder,shards``) reads the same JPEG bytes from LitData chunks (``data=shards``, converted
by ``litv2.data.convert`` into a temporary folder) in the order training reads them, alternating the sources in
``--rounds`` rounds, and counts the files each source opens (``builtins.open`` and ``os.open`` wrapped in the
process); ``--resize 256`` adds the pre-resized variant (``make_shards.py --resize``). ``--convert-workers 1,2``
times the conversion itself (images/s and per worker). ``--startup 100000`` instead times what a training job does
before its first batch on rank 0 for each source: list and check the tree (ImageFolder) or read the manifest
(chunks), build the train and val datasets and sampler, and how many bytes rank 0 sends the other ranks; the tiny
JPEGs it needs are generated once into ``--startup-dir``.

``--dali cpu|gpu`` also times NVIDIA DALI (``pip install nvidia-dali-cuda120``) on the same files: its
reader, fused decode + random crop (``gpu``: nvJPEG), bicubic resize, flip and DALI's own RandAugment
(n=2, the recipe's magnitude) with ``--dali-threads`` CPU threads. DALI's RandAugment has no magnitude
noise (mstd), Invert or SolarizeAdd, so it is the nearest DALI pipeline, not the paper's recipe.

    python scripts/benchmark_data.py                       # 1 and 2 workers on this machine
    python scripts/benchmark_data.py --workers 1,2,4,8 --target 1000 --images 512
    python scripts/benchmark_data.py --dali gpu --dali-threads 1,8
    python scripts/benchmark_data.py --source folder,shards --resize 256 --images 1000 --convert-workers 1,2
    python scripts/benchmark_data.py --startup 100000 --startup-dir /tmp/startup100k
"""
from __future__ import annotations

import argparse
import builtins
import math
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_jpegs(root: Path, n: int, size: tuple[int, int], classes: int = 4, seed: int = 0, quality: int = 90,
               split: str = "train") -> Path:
    """Photo-like JPEGs: smooth colour fields plus texture (decode cost close to real photos)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        c = i % classes
        d = root / split / f"class_{c:04d}"
        d.mkdir(parents=True, exist_ok=True)
        fx, fy, ph = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(xx * fx + ph * k) * np.cos(yy * fy + k) for k in range(3)], -1)
        img = (base * 80 + 128 + rng.normal(0, 18, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img_{i:06d}.JPEG", quality=quality)
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


class OpenCounter:
    """Counts the files opened in this process (``builtins.open`` and ``os.open``: what PIL / torchvision's loader
    and the chunk reader use) while active."""

    def __enter__(self):
        self.count, self._open, self._os_open = 0, builtins.open, os.open

        def counting(real):
            def wrapped(*args, **kwargs):
                self.count += 1
                return real(*args, **kwargs)
            return wrapped

        builtins.open, os.open = counting(self._open), counting(self._os_open)
        return self

    def __exit__(self, *exc):
        builtins.open, os.open = self._open, self._os_open


def source_keys(datasets: dict, seed: int = 0) -> dict:
    """Per dataset, the (index, sample seed) keys of one training epoch in the chunks' order (ChunkWindowSampler), so
    that every source decodes and augments the same images with the same seeds in the same order (a record's
    ``index`` is its position in the ImageFolder listing); a folder alone: ResumableSampler's order."""
    from litv2.data import ChunkWindowSampler, ResumableSampler
    from litv2.data.shards import ShardDataset

    shards = [ds for ds in datasets.values() if isinstance(ds, ShardDataset)]
    if not shards:
        return {n: list(ResumableSampler(len(ds), seed=seed)) for n, ds in datasets.items()}
    first = shards[0]
    order = [(first.reader.read(k)["index"], s) for k, s in ChunkWindowSampler(first.chunk_sizes, seed=seed)]
    keys = {}
    for name, ds in datasets.items():
        if isinstance(ds, ShardDataset):
            position = {ds.reader.read(k)["index"]: k for k in range(len(ds))}
            keys[name] = [(position[i], s) for i, s in order]
        else:
            keys[name] = order
    return keys


def _read_bytes(dataset, index: int) -> bytes:
    from litv2.data.shards import ShardDataset

    if isinstance(dataset, ShardDataset):
        return dataset.reader.read(index)["image"]
    with open(dataset.samples[index][0], "rb") as f:
        return f.read()


def rates_by_source(datasets: dict, seconds: float, rounds: int) -> dict:
    """Per-worker images/s of each dataset (one thread), the sources alternating in ``rounds`` rounds: the median
    rate and the median of each round's ratio to the first source; the files each opened per 10,000 samples (chunk
    readers start with no file open); and the rate of reading the bytes alone."""
    keys = source_keys(datasets)
    for ds in datasets.values():
        if hasattr(ds, "reader"):
            ds.reader.close()
    done = {name: 0 for name in datasets}
    rates, opens, taken = {n: [] for n in datasets}, {n: 0 for n in datasets}, {n: 0 for n in datasets}
    reads = {n: [] for n in datasets}
    for _ in range(rounds):
        for name, ds in datasets.items():
            with OpenCounter() as counter:
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds / rounds:
                    ds[keys[name][done[name] % len(keys[name])]]
                    done[name] += 1
                    n += 1
                rates[name].append(n / (time.perf_counter() - start))
            opens[name] += counter.count
            taken[name] += n
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < 0.1 * seconds / rounds:
                _read_bytes(ds, keys[name][(done[name] + n) % len(keys[name])][0])
                n += 1
            reads[name].append(n / (time.perf_counter() - start))
    first = next(iter(datasets))
    return {n: {"per_worker": statistics.median(r), "opens_per_10k": 1e4 * opens[n] / max(taken[n], 1),
                "samples": taken[n], "read_only": statistics.median(reads[n]),
                "ratio": statistics.median(x / y for x, y in zip(r, rates[first]))} for n, r in rates.items()}


def convert_rate(root: Path, dst: Path, workers: int, chunk_mb: float, resize=None) -> float:
    """Images/s of converting ``root``'s train split (decode check, chunk writing, read-back and checksums)."""
    import shutil

    from litv2.data.convert import convert

    shutil.rmtree(dst, ignore_errors=True)
    n = sum(1 for _ in (root / "train").rglob("*.JPEG"))
    start = time.perf_counter()
    convert(root, dst, splits=("train",), chunk_mb=chunk_mb, workers=workers, resize=resize)
    return n / (time.perf_counter() - start)


def startup(n: int, folder: Path, chunk_mb: float) -> dict:
    """Rank 0's start-up for each source on ``n`` tiny JPEGs in 1,000 classes (train) plus n/20 (val)."""
    from hydra import compose, initialize_config_dir

    from litv2.data import builder
    from litv2.data.convert import convert

    if not (folder / "tree" / "val").is_dir():
        make_jpegs(folder / "tree", n, (64, 48), classes=1000, quality=75)
        make_jpegs(folder / "tree", max(n // 20, 1000), (64, 48), classes=1000, quality=75, split="val")
    if not (folder / "shards" / "manifest.json").is_file():
        convert(folder / "tree", folder / "shards", chunk_mb=chunk_mb)
    result = {}
    for name, overrides in (("folder", ["data=folder", f"data.root={folder / 'tree'}"]),
                            ("shards", ["data=shards", f"data.root={folder / 'shards'}"])):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*overrides, "data.num_classes=1000", "data.num_workers=0"])
        start = time.perf_counter()
        index = builder.dataset_index(cfg.data)  # rank 0: list + check, or read the manifest
        t_index = time.perf_counter() - start
        sent = len(pickle.dumps(index))  # what rank 0 broadcasts to the other ranks
        loader, sampler = builder.build_train_loader(cfg, index)
        builder.build_eval_loader(cfg.data, index)
        sampler.set_epoch(0)
        next(iter(sampler))
        result[name] = {"index_s": t_index, "total_s": time.perf_counter() - start, "broadcast_bytes": sent,
                        "train_images": len(loader.dataset)}
    return result


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
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of the generated JPEGs")
    p.add_argument("--source", default="folder", help="folder, shards or folder,shards: where the JPEG bytes come from")
    p.add_argument("--rounds", type=int, default=3, help="rounds the sources alternate in (per-worker rates)")
    p.add_argument("--chunk-mb", type=float, default=64.0, help="chunk size of the shards")
    p.add_argument("--resize", type=int, default=None, help="also time shards pre-resized to this short side")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of --resize")
    p.add_argument("--convert-workers", default="", help="time the conversion with these worker counts (e.g. 1,2)")
    p.add_argument("--startup", type=int, default=0, help="time start-up at this many images instead (see above)")
    p.add_argument("--startup-dir", default=None, help="where --startup's JPEGs and shards are kept between runs")
    args = p.parse_args(argv)
    if args.startup:
        folder = Path(args.startup_dir or tempfile.mkdtemp(prefix="startup-"))
        result = startup(args.startup, folder, args.chunk_mb)
        print(f"start-up at {args.startup} train images ({os.cpu_count()} CPUs here)")
        print("| source | index (rank 0) s | index + datasets + sampler s | bytes sent to the other ranks |\n|---|---|---|---|")
        for name, r in result.items():
            print(f"| {name} | {r['index_s']:.3f} | {r['total_s']:.3f} | {r['broadcast_bytes']:,} |")
        return result
    sources = [v.strip() for v in args.source.split(",") if v.strip()]
    if args.dali:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            p.error("--dali needs NVIDIA DALI: pip install nvidia-dali-cuda120")

    from litv2.data.datasets import RobustImageFolder
    from litv2.data.shards import ShardDataset, ShardSource

    transform, cfg = train_transform(args.data, args.aug, args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else make_jpegs(
            Path(tmp), args.images, tuple(int(v) for v in args.jpeg_size.split("x")), quality=args.jpeg_quality)
        dataset = RobustImageFolder(str(root / "train"), transform=transform)
        mean_kb = sum(os.path.getsize(p) for p, _ in dataset.samples) / max(len(dataset), 1) / 1e3
        datasets, conversions = {}, {}
        if "folder" in sources:
            datasets["folder"] = dataset
        variants = [("shards", None)] + ([(f"shards, resized to {args.resize}", (args.resize, args.quality))]
                                         if args.resize else [])
        if "shards" in sources:
            for name, resize in variants:
                dst = Path(tmp) / name.replace(" ", "_").replace(",", "")
                for w in (int(v) for v in args.convert_workers.split(",") if v.strip()):
                    conversions[(name, w)] = convert_rate(root, dst, w, args.chunk_mb, resize)
                if not (dst / "manifest.json").exists():
                    convert_rate(root, dst, os.cpu_count() or 1, args.chunk_mb, resize)
                datasets[name] = ShardDataset(ShardSource(str(dst), None, {}, 0), "train", transform)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
        try:
            if list(datasets) == ["folder"]:
                rate1 = per_worker_rate(dataset, args.seconds)
                by_source = {}
            else:
                by_source = rates_by_source(datasets, args.seconds, args.rounds)
                rate1 = by_source[next(iter(by_source))]["per_worker"]
        finally:
            torch.set_num_threads(threads)  # main() is also called in-process (tests, notebooks)
        dataset = next(iter(datasets.values()))
        loader_rates = {w: loader_rate(dataset, w, args.batch_size, args.batches)
                        for w in (int(v) for v in args.workers.split(",") if v.strip())}
        dali_rates = {t: dali_rate(root, cfg.aug, cfg.data.img_size, args.dali, t, args.batch_size, args.batches)
                      for t in (int(v) for v in args.dali_threads.split(",") if v.strip())} if args.dali else {}

    print(f"training transform: data={args.data} aug={args.aug} img_size={cfg.data.img_size} "
          f"auto_augment={cfg.aug.auto_augment} reprob={cfg.aug.reprob} ({os.cpu_count()} CPUs here); "
          f"{len(dataset)} JPEGs of {mean_kb:.0f} kB on average")
    print("| measurement | images/s |\n|---|---|")
    if by_source:
        first = next(iter(by_source))
        for name, r in by_source.items():
            print(f"| 1 worker, decode + augment from {name} | {r['per_worker']:.1f} ({r['ratio']:.2f}x {first}, "
                  f"median of {args.rounds} rounds' ratios) |")
        for name, r in by_source.items():
            print(f"| reading the bytes alone, {name} | {r['read_only']:.0f} |")
        for name, r in by_source.items():
            chunks = getattr(datasets[name], "chunk_sizes", None)
            where = f", {len(chunks)} chunks of ~{sum(chunks) // len(chunks)} records" if chunks else ""
            print(f"| files opened per 10,000 samples, {name} ({r['samples']} samples{where}) | "
                  f"{r['opens_per_10k']:.1f} |")
        for (name, w), r in conversions.items():
            print(f"| conversion to {name}, {w} worker(s) | {r:.1f} ({r / w:.1f} per worker) |")
    else:
        print(f"| 1 worker, decode + augment ({args.jpeg_size} JPEG) | {rate1:.1f} |")
    for w, r in loader_rates.items():
        print(f"| DataLoader, {w} worker(s), batch {args.batch_size} | {r:.1f} |")
    for t, r in dali_rates.items():
        print(f"| DALI ({args.dali}), {t} thread(s), batch {args.batch_size} | {r:.1f} |")
    result = {"per_worker": rate1, "loader": loader_rates, "dali": dali_rates, "sources": by_source,
              "conversion": {f"{n}, {w} worker(s)": r for (n, w), r in conversions.items()}}
    if args.target:
        need = math.ceil(args.target / rate1)
        result["workers_needed"] = need
        print(f"\nfeeding {args.target:.0f} img/s needs >= {need} workers at {rate1:.1f} img/s each "
              f"(plus headroom for the main process and collation)")
    return result


if __name__ == "__main__":
    main()
