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


@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="NVIDIA DALI is not installed")
def test_benchmark_data_times_dali_on_cpu():
    bench = runpy.run_path(str(REPO / "scripts" / "benchmark_data.py"))
    result = bench["main"](["--images", "8", "--jpeg-size", "96x72", "--seconds", "0.2", "--workers", "0",
                            "--batches", "2", "--batch-size", "4", "--dali", "cpu", "--dali-threads", "1"])
    assert result["dali"][1] > 0
