"""The paper's augmentation recipe runs end to end, and the input-pipeline benchmark works."""
import importlib.util
import runpy
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp, rand_augment_transform

REPO = Path(__file__).resolve().parents[1]


def test_randaugment_inc1_posterize_at_max_magnitude():
    """rand-m9-mstd0.5-inc1 can draw magnitude 10, where increasing posterize keeps 0 bits.

    Pillow 13 raises on posterize(bits=0) and would kill a training epoch; requirements pin a Pillow
    that accepts it (the image becomes black, the behaviour the recipe was tuned with).
    """
    img = Image.new("RGB", (32, 32), (200, 120, 40))
    out = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10, hparams={})(img)
    assert out.getpixel((0, 0)) == (0, 0, 0)
    ra = rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": (124, 116, 104)})
    for _ in range(200):
        ra(img)


def test_benchmark_data_smoke():
    bench = runpy.run_path(str(REPO / "scripts" / "benchmark_data.py"))
    threads = torch.get_num_threads()
    result = bench["main"](["--images", "8", "--seconds", "0.5", "--workers", "0", "--batches", "1",
                            "--batch-size", "4", "--target", "100"])
    assert result["per_worker"] > 0 and result["loader"][0] > 0
    assert result["workers_needed"] >= 1
    assert torch.get_num_threads() == threads  # the single-threaded worker measurement is undone


def test_benchmark_data_times_shards_against_the_image_folder():
    """--source folder,shards: the same JPEGs read from a folder and from chunks (and pre-resized), files opened per
    10,000 samples, the conversion rate."""
    bench = runpy.run_path(str(REPO / "scripts" / "benchmark_data.py"))
    result = bench["main"](["--images", "12", "--jpeg-size", "96x72", "--seconds", "0.6", "--rounds", "2",
                            "--workers", "0", "--batches", "1", "--batch-size", "4", "--source", "folder,shards",
                            "--chunk-mb", "0.1", "--resize", "48", "--convert-workers", "1"])
    sources = result["sources"]
    assert set(sources) == {"folder", "shards", "shards, resized to 48"}
    assert all(r["per_worker"] > 0 for r in sources.values())
    assert sources["folder"]["opens_per_10k"] >= 9_000  # one open per sample
    assert sources["shards"]["opens_per_10k"] < 2_000  # 12 JPEGs in 2 or 3 chunks, kept open
    assert set(result["conversion"]) == {"shards, 1 worker(s)", "shards, resized to 48, 1 worker(s)"}


@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="NVIDIA DALI is not installed")
def test_benchmark_data_times_dali_on_cpu():
    bench = runpy.run_path(str(REPO / "scripts" / "benchmark_data.py"))
    result = bench["main"](["--images", "8", "--jpeg-size", "96x72", "--seconds", "0.2", "--workers", "0",
                            "--batches", "2", "--batch-size", "4", "--dali", "cpu", "--dali-threads", "1"])
    assert result["dali"][1] > 0
