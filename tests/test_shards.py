"""data=shards (issue 30): the chunk order and its sharding, the conversion's manifest and atomicity, reading records
(locally, through the download path, damaged ones), and what LitData's own streaming loader cannot do.
The end-to-end runs (torchrun kill -9, world-size changes, a killed conversion) are in test_shards_e2e.py."""
import bisect
import collections
import hashlib
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from engine_utils import FAST, TINY_LITV2, assert_one_line_error, compose, make_digits_subset, run_script, \
    train_in_process


def _shards_cfg(root, *more):
    return compose(["data=shards", f"data.root={root}", "data.num_classes=10", "data.img_size=32", "data.crop_pct=1.0",
                    "data.num_workers=0", "data.batch_size=8", *more])


# ---- the order: a pure function of (seed, epoch), a window of chunks at a time, ranks interleaved ----------------

def test_window_order_is_a_seeded_permutation_read_a_window_of_chunks_at_a_time():
    from litv2.data.samplers import window_order

    sizes = [7, 5, 9, 6, 8, 3, 7]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    chunk_of = {i: c for c, (s, n) in enumerate(zip(starts, sizes)) for i in range(s, s + n)}
    order = window_order(sizes, 3, torch.Generator().manual_seed(5))
    assert sorted(order.tolist()) == list(range(sum(sizes)))
    assert torch.equal(order, window_order(sizes, 3, torch.Generator().manual_seed(5)))
    assert not torch.equal(order, window_order(sizes, 3, torch.Generator().manual_seed(6)))
    # consecutive windows of 3 chunks: each window's records come from its own 3 chunks, all of them
    chunks_seen, at = [], 0
    while at < len(order):
        first = {chunk_of[int(order[at])]}
        window = set()
        n = 0
        while at + n < len(order) and len(window | {chunk_of[int(order[at + n])]}) <= 3:
            window.add(chunk_of[int(order[at + n])])
            n += 1
        assert sum(sizes[c] for c in window) == n and first <= window
        chunks_seen += sorted(window)
        at += n
    assert sorted(chunks_seen) == list(range(len(sizes)))
    # within a window the records of its chunks are mixed, not chunk after chunk
    head = [chunk_of[int(i)] for i in order[:10]]
    assert len(set(head)) > 1 and head != sorted(head)


@pytest.mark.parametrize("before,after,steps", [(2, 1, 3), (1, 2, 4), (2, 3, 3), (4, 2, 3)])
def test_chunk_sampler_resumed_at_another_world_size_takes_every_record_once(before, after, steps):
    """The trainer's contract (trainer.fit, _map_position): ``start`` = samples this rank has taken; a step of W ranks
    consumes the next W x step_samples positions of one global order, so a resume at another world size continues
    after the samples seen."""
    from litv2.data import ChunkWindowSampler

    sizes, b = [13] * 9 + [5], 4  # 122 records; 4 samples per rank per step
    one = list(ChunkWindowSampler(sizes, seed=3, window=4, run=3))
    assert sorted(i for i, _ in one) == list(range(122))
    first = [list(ChunkWindowSampler(sizes, r, before, seed=3, window=4, run=3, step_samples=b))[:steps * b]
             for r in range(before)]
    seen = steps * b * before
    assert seen % (after * b) == 0
    rest = []
    for r in range(after):
        s = ChunkWindowSampler(sizes, r, after, seed=3, window=4, run=3, step_samples=b)
        s.set_epoch(0, start=seen // after)
        assert len(s) == 122 // after - seen // after
        rest.append(list(s))
    taken = [x for part in first + rest for x in part]
    counts = collections.Counter(i for i, _ in taken)
    assert max(counts.values()) == 1 and len(counts) == 122 - 122 % after  # the tail a world size drops
    seeds = dict(one)
    assert all(seeds[i] == seed for i, seed in taken), "a record's augmentation seed does not depend on the ranks"
    # a step of 2 ranks = the next 8 positions of the single-process order, rank 0's block first
    two = [list(ChunkWindowSampler(sizes, r, 2, seed=3, window=4, run=3, step_samples=b)) for r in range(2)]
    assert [x for k in range(122 // 8) for r in range(2) for x in two[r][k * b:(k + 1) * b]] == one[:122 // 8 * 8]


def _opens(keys_of_worker, chunk_of, lru: int) -> int:
    from collections import OrderedDict

    open_, n = OrderedDict(), 0
    for i in keys_of_worker:
        c = chunk_of(i)
        if c in open_:
            open_.move_to_end(c)
        else:
            n += 1
            open_[c] = True
            if len(open_) > lru:
                open_.popitem(last=False)
    return n


def test_a_worker_opens_few_chunks_per_sample_at_any_scale():
    """ImageNet's layout (2,200 chunks of 582 records), 64 ranks x 8 loader workers x batch 128: a worker's batches
    come from contiguous runs of the order, so it opens a few chunks per batch, not (as with a shuffled window dealt
    out round-robin to 512 readers) nearly one per sample."""
    import bisect as bisect_

    from litv2.data import ChunkWindowSampler

    sizes = [582] * 2200
    starts = [582 * c for c in range(2200)]
    chunk_of = lambda i: bisect_.bisect_right(starts, i) - 1  # noqa: E731
    ranks, workers, batch = 64, 8, 128
    mine = list(ChunkWindowSampler(sizes, 5, ranks, seed=0, window=8, run=32, step_samples=batch))
    worker_0 = [i for k in range(0, len(mine) // batch, workers) for i, _ in mine[k * batch:(k + 1) * batch]]
    per_10k = 1e4 * _opens(worker_0, chunk_of, lru=16) / len(worker_0)
    assert len(worker_0) >= 2_500 and per_10k < 400  # about 4 chunks per batch of 128 (runs of 32); measured 309
    dealt = ChunkWindowSampler(sizes, seed=0, window=8, run=1)
    order = dealt.global_order(torch.Generator().manual_seed(0))[5 * 8 + 0::ranks * workers][:len(worker_0)]
    assert 1e4 * _opens(order.tolist(), chunk_of, lru=16) / len(order) > 5000  # measured 6,230


# ---- reading records ---------------------------------------------------------------------------------------------

def test_shard_records_give_the_imagefolder_images_for_the_same_bytes_and_seed(digits, digit_shards):
    from omegaconf import OmegaConf

    from litv2.data import RobustImageFolder, build_transform, dataset_index
    from litv2.data.shards import ShardDataset

    cfg = _shards_cfg(digit_shards, "aug=deit")
    source = dataset_index(cfg.data)
    assert source.records == {"train": 1437, "val": 360} and source.num_classes == 10
    transform = build_transform(cfg.data, cfg.aug, is_training=True)
    shards = ShardDataset(source, "train", transform)
    folder = RobustImageFolder(str(digits / "train"), transform=transform)
    by_path = {os.path.relpath(p, digits / "train"): i for i, (p, _) in enumerate(folder.samples)}
    positions = [shards.reader.read(k)["index"] for k in range(len(shards))]
    assert sorted(positions) == list(range(1437)) and positions != sorted(positions)  # stored shuffled
    for k in (0, 17, 700, 1436):
        record = shards.reader.read(k)
        j = by_path[record["path"]]
        assert record["index"] == j and record["image"] == (digits / "train" / record["path"]).read_bytes()
        a, ta = shards[(k, 99 + k)]
        b, tb = folder[(j, 99 + k)]
        assert ta == tb == int(record["path"].split("/")[0]) and torch.equal(a, b)
    assert OmegaConf.select(cfg, "data.shuffle_window") == 8


def test_a_reader_keeps_its_chunk_files_open(digit_shards, monkeypatch):
    """An epoch in the sampler's order opens each chunk file about once per process (an LRU of handles); an
    ImageFolder opens one file per sample."""
    from litv2.data import ChunkWindowSampler, dataset_index
    from litv2.data.shards import ShardDataset

    cfg = _shards_cfg(digit_shards, "aug=none", "data.shuffle_window=4", "data.open_chunks=6")
    ds = ShardDataset(dataset_index(cfg.data), "train", None, max_open=6)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (opened.append(str(path)), real_open(path, *a, **k))[1])
    sampler = ChunkWindowSampler(ds.chunk_sizes, seed=0, window=4)
    for key in sampler:
        img, target = ds[key]
        assert img is not None
    chunks = len(ds.chunk_sizes)
    assert chunks >= 15 and len([p for p in opened if p.endswith(".bin")]) == chunks == ds.reader.opens
    opened.clear()
    ds.reader.max_open = 1  # records of a window of 4 chunks one by one through one handle: 3 in 4 are an open
    ds.reader.close()
    for key in list(ChunkWindowSampler(ds.chunk_sizes, seed=0, window=4, run=1))[:200]:
        ds[key]
    assert len(opened) > 100


def test_remote_root_is_read_through_whole_chunks_downloaded_into_the_cache(digit_shards, tmp_path):
    """An object-store URL goes through LitData's downloaders (``local:`` is LitData's local stand-in for one): the
    manifest and index come first, each chunk is downloaded whole, once, when first read, and kept."""
    from litv2.data import dataset_index
    from litv2.data.shards import ShardDataset

    with pytest.raises(Exception, match="set data.cache_dir"):
        dataset_index(_shards_cfg(f"local:{digit_shards}").data)
    cfg = _shards_cfg(f"local:{digit_shards}", f"data.cache_dir={tmp_path / 'cache'}")
    remote = ShardDataset(dataset_index(cfg.data), "val")
    local = ShardDataset(dataset_index(_shards_cfg(digit_shards).data), "val")
    cached = list((tmp_path / "cache").rglob("*.bin"))
    assert not cached and list((tmp_path / "cache").rglob("index.json"))
    for k in range(len(local)):
        assert remote.reader.read(k) == local.reader.read(k)
    summary = json.loads((digit_shards / "val" / "summary.json").read_text())
    cached = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "cache").rglob("*.bin")}
    assert cached == {c["file"]: c["sha256"] for c in summary["chunks"]}
    assert remote.reader.opens == len(cached)


def test_a_damaged_record_is_skipped_and_counted(digit_shards, tmp_path):
    """Garbage in place of a record's image bytes (storage damage after conversion): that sample comes back as
    (None, label) and the collate counts it; the rest of the chunk reads as before."""
    from litv2.data import build_eval_loader, dataset_index
    from litv2.data.shards import ChunkReader

    root = tmp_path / "shards"
    shutil.copytree(digit_shards, root)
    reader = ChunkReader(str(root / "val"))
    record = reader.read(3)
    path = reader.chunk_path(0)
    data = bytearray(open(path, "rb").read())
    at = data.find(record["image"])
    assert at > 0 and reader.read(3)["index"] == record["index"]
    data[at + 40:at + len(record["image"])] = b"\0" * (len(record["image"]) - 40)  # a truncated-looking PNG
    open(path, "wb").write(bytes(data))
    cfg = _shards_cfg(root, "data.batch_size=360")
    loader = build_eval_loader(cfg.data, dataset_index(cfg.data))
    images, targets, skipped = next(iter(loader))
    assert skipped == 1 and len(images) == 359


# ---- the conversion ----------------------------------------------------------------------------------------------

def test_conversion_manifest_counts_checksums_and_unreadable_images(digits, digit_shards, tmp_path):
    from litv2.data import list_image_folder
    from litv2.data.convert import convert
    from litv2.data.shards import read_manifest

    manifest = read_manifest(str(digit_shards))
    listing = list_image_folder(digits)
    assert manifest["classes"] == [str(c) for c in range(10)]
    for split in ("train", "val"):
        s = manifest["splits"][split]
        assert s["per_class"] == {c: len(f) for c, f in listing[split].items()} and not s["corrupt"]
        summary = json.loads((digit_shards / split / "summary.json").read_text())
        for chunk in summary["chunks"]:
            data = (digit_shards / split / chunk["file"]).read_bytes()
            assert len(data) == chunk["bytes"] and hashlib.sha256(data).hexdigest() == chunk["sha256"]
        assert sum(c["records"] for c in summary["chunks"]) == s["records"]
        assert max(c["bytes"] for c in summary["chunks"]) < 130_000  # chunk_mb=0.1 (one record may overflow)

    src = make_digits_subset(digits, tmp_path / "src", per_class_train=3, val_total=10)
    (src / "train" / "4" / "truncated.jpg").write_bytes((src / "train" / "4" / sorted(
        p.name for p in (src / "train" / "4").iterdir())[0]).read_bytes()[:60])
    Image.new("RGB", (9, 9)).save(src / "val" / "2" / "fine.jpg")
    out = convert(src, tmp_path / "dst", chunk_mb=1, workers=1, seed=1)
    train = out["splits"]["train"]
    assert train["images"] == 31 and train["records"] == 30 and train["per_class"]["4"] == 3
    assert [c["path"] for c in train["corrupt"]] == ["4/truncated.jpg"] and train["corrupt"][0]["error"]
    assert out["splits"]["val"]["records"] == 11
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "dst").rglob("*")}
    assert convert(src, tmp_path / "dst", chunk_mb=1, workers=1, seed=1) == out  # complete: nothing is redone
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "dst").rglob("*")} == before
    with pytest.raises(Exception, match="already holds a conversion with other options"):
        convert(src, tmp_path / "dst", chunk_mb=1, workers=1, seed=2)


def test_an_unfinished_conversion_is_refused_and_a_rerun_finishes_it(digits, tmp_path, capsys):
    """No manifest = not complete, whatever else is there (a published train split, a half-written val work dir):
    training refuses it in one line, and the same command keeps the published split and redoes the rest."""
    from litv2.data import dataset_index
    from litv2.data.convert import convert
    from litv2.errors import UserError

    src = make_digits_subset(digits, tmp_path / "src", per_class_train=4, val_total=12)
    dst = tmp_path / "dst"
    convert(src, dst, chunk_mb=0.02, workers=2, seed=0)
    train_files = {p.name: p.stat().st_ino for p in (dst / "train").iterdir()}
    (dst / "manifest.json").unlink()
    os.replace(dst / "val", dst / ".work-val-999999")  # a run killed before it published val
    (dst / ".work-val-999999" / "chunk-0-0.bin").write_bytes(b"half")
    with pytest.raises(UserError, match="holds an unfinished conversion .no manifest.json.: rerun data/make_shards.py"):
        dataset_index(_shards_cfg(dst).data)
    proc = run_script("data/make_shards.py", ["--src", str(src), "--dst", str(dst), "--chunk-mb", "0.02",
                                              "--workers", "2"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "complete:" in proc.stdout and "val: 12 records of 12 images" in proc.stdout
    assert "lightning.ai" not in proc.stdout + proc.stderr  # LitData's advert line is left out
    assert {p.name: p.stat().st_ino for p in (dst / "train").iterdir()} == train_files  # kept as published
    assert not list(dst.glob(".work-*")) and dataset_index(_shards_cfg(dst).data).records == {"train": 40, "val": 12}


def test_train_on_shards_with_a_bad_root_fails_in_one_line(digit_shards, tmp_path):
    from litv2.data import dataset_index
    from litv2.errors import UserError

    proc = run_script("train.py", ["data=shards", f"data.root={tmp_path / 'nowhere'}", f"paths.runs_root={tmp_path}",
                                   "logger=none"], timeout=120)
    assert_one_line_error(proc, f"dataset root {tmp_path / 'nowhere'} does not exist; make it with data/make_shards.py")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a converted dataset .no manifest.json."):
        dataset_index(_shards_cfg(tmp_path / "empty").data)
    with pytest.raises(UserError, match="has 10 classes but data.num_classes=1000"):
        dataset_index(compose(["data=shards", f"data.root={digit_shards}"]).data)


def test_a_corrupt_record_is_counted_in_the_metrics_and_the_run_completes(digits, tmp_path):
    """In-process training from chunks with a damaged record: it is skipped every epoch, counted in metrics.jsonl and
    summary.json, and the run completes."""
    from litv2.data.convert import convert
    from litv2.data.shards import ChunkReader

    src = make_digits_subset(digits, tmp_path / "src", per_class_train=8, val_total=20)  # 80 train, batch 16
    dst = tmp_path / "dst"
    convert(src, dst, chunk_mb=0.05, workers=1, seed=0)
    reader = ChunkReader(str(dst / "train"))
    for k in (5, 50):
        record, path = reader.read(k), reader.chunk_path(bisect.bisect_right(reader.starts, k) - 1)
        data = bytearray(open(path, "rb").read())
        at = data.find(record["image"])
        data[at + 20:at + len(record["image"])] = os.urandom(len(record["image"]) - 20)
        open(path, "wb").write(bytes(data))
    summary = train_in_process(["experiment=quickstart", *TINY_LITV2, "data=shards", f"data.root={dst}",
                                "data.num_classes=10", "data.img_size=32", "data.crop_pct=1.0", "data.batch_size=16",
                                "trainer.epochs=2", "trainer.log_every=1", *FAST], tmp_path / "run")
    assert summary["status"] == "completed" and summary["skipped_images"] == 2 * 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/skipped_images"] == 4 and summary["steps"] == 2 * 5
