"""SLURM: which processes are ranks, their ports and devices (pure functions, no scheduler), then the same code
under a live one-node SLURM cluster (``-m slurm``; tests/slurm_cluster.py starts it, skipped without slurm-wlm)."""
import os

import pytest
import torch

from engine_utils import FAST, compose

@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("tree")
    for split, n in (("train", 3), ("val", 2)):
        for c in ("b", "a", "c"):
            (root / split / c / "sub").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8)).save(root / split / c / f"{i}.png")
            Image.new("RGB", (8, 8)).save(root / split / c / "sub" / "x.JPG")
            (root / split / c / "notes.txt").write_text("not an image")
    return root


def test_a_listed_tree_gives_imagefolders_samples(small_tree):
    from torchvision.datasets import ImageFolder

    from litv2.data import RobustImageFolder, list_image_folder

    listing = list_image_folder(small_tree)
    for split in ("train", "val"):
        ds = RobustImageFolder(str(small_tree / split), files=listing[split])
        plain = ImageFolder(str(small_tree / split))
        assert ds.samples == plain.samples and ds.classes == plain.classes and len(ds) in (12, 9)


def _list_on_rank(rank, world_size, store_path, root, results):
    import torch.distributed as dist

    from litv2.data import build_eval_loader, build_train_loader
    from litv2.engine.distributed import DistInfo
    from litv2.engine.trainer import _shared_dataset_root

    listed = []
    real_walk, real_listdir, real_scandir = os.walk, os.listdir, os.scandir

    def note(kind, path):
        if str(path).startswith(str(root)):
            listed.append((kind, os.path.relpath(path, root)))

    def walk(top, *a, **k):
        note("walk", top)
        return real_walk(top, *a, **k)

    def listdir(path="."):
        note("listdir", path)
        return real_listdir(path)

    def scandir(path="."):  # also what os.walk calls for every folder
        note("scandir", path)
        return real_scandir(path)

    os.walk, os.listdir, os.scandir = walk, listdir, scandir  # this forked rank only
    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"file://{store_path}")
    try:
        cfg = compose(["data=folder", f"data.root={root}", "data.num_classes=3", "data.batch_size=2", *FAST])
        info = DistInfo(rank, rank, world_size)
        index = _shared_dataset_root(cfg, info)
        train, _ = build_train_loader(cfg, index, rank, world_size)
        val = build_eval_loader(cfg.data, index, rank, world_size)
        results[rank] = (listed, train.dataset.samples, val.dataset.samples)
    finally:
        dist.destroy_process_group()


def test_rank_0_lists_the_tree_once_and_the_other_ranks_not_at_all(small_tree, tmp_path):
    """ImageNet's 1.33 M files were listed twice on every rank (the layout check, then ImageFolder)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.start_processes(_list_on_rank, args=(2, str(tmp_path / "store"), small_tree, results), nprocs=2,
                       start_method="fork")
    listed_0, train_0, val_0 = results[0]
    listed_1, train_1, val_1 = results[1]
    assert listed_1 == []
    walks = [p for kind, p in listed_0 if kind == "walk"]
    assert sorted(walks) == sorted({os.path.join(s, c) for s in ("train", "val") for c in "abc"}), listed_0
    assert not [p for kind, p in listed_0 if kind == "listdir"]
    assert train_0 == train_1 and val_0 == val_1 and len(train_0) == 12


def test_val_loader_workers_are_not_persistent(small_tree):
    from litv2.data import build_eval_loader, build_train_loader, dataset_index

    cfg = compose(["data=folder", f"data.root={small_tree}", "data.num_classes=3", "data.batch_size=2",
                   "data.num_workers=1", "data.persistent_workers=true", "logger=none"])
    index = dataset_index(cfg.data)
    assert build_train_loader(cfg, index)[0].persistent_workers
    assert not build_eval_loader(cfg.data, index).persistent_workers
