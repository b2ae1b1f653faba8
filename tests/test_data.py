"""Data: the embedded digits tree, resumable/sharded samplers, the dataset tools in data/."""
import runpy
import subprocess
import sys

import torch
from PIL import Image

from engine_utils import ENV, ROOT


def test_digits_tree_is_a_deterministic_rgb_imagefolder(digits, tmp_path):
    from litv2.data import check_image_folder, prepare_digits

    report = check_image_folder(digits, verify=True, num_classes=10)
    assert report["train"]["images"] + report["val"]["images"] == 1797
    assert report["val"]["images"] == 360 and not report["train"]["unreadable"]
    img = Image.open(next((digits / "train" / "7").iterdir()))
    assert img.format == "PNG" and img.mode == "RGB"
    again = prepare_digits(tmp_path / "digits")
    assert sorted(p.name for p in (again / "val" / "3").iterdir()) == sorted(p.name for p in (digits / "val" / "3").iterdir())


def test_resumable_sampler_shards_resumes_and_seeds_per_sample():
    from litv2.data import ResumableSampler

    full = list(ResumableSampler(103, seed=1))
    assert sorted(i for i, _ in full) == list(range(103))
    s = ResumableSampler(103, seed=1)
    s.set_epoch(0, start=40)
    assert list(s) == full[40:] and len(s) == 63
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in full]
    ranks = [list(ResumableSampler(103, rank=r, world_size=2, seed=1)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 51  # same step count on every rank
    assert not {i for i, _ in ranks[0]} & {i for i, _ in ranks[1]}
    # rank r takes positions r, r+2, ... of the global order: step k of 2 ranks = step k of 1 process
    assert [x for pair in zip(*ranks) for x in pair] == full[:102]


def test_shard_sampler_counts_every_val_image_once():
    from litv2.data import ShardSampler

    shards = [list(ShardSampler(21, r, 4)) for r in range(4)]
    assert sorted(sum(shards, [])) == list(range(21))


def test_seeded_augmentation_does_not_depend_on_global_rng(digits):
    from omegaconf import OmegaConf

    from litv2.data import RobustImageFolder, build_transform

    aug = OmegaConf.load(ROOT / "conf" / "aug" / "deit.yaml")
    data = OmegaConf.load(ROOT / "conf" / "data" / "digits.yaml")
    ds = RobustImageFolder(str(digits / "train"), transform=build_transform(data, aug, is_training=True))
    torch.manual_seed(0)
    a = ds[(5, 1234)][0]
    torch.manual_seed(99)
    state = torch.get_rng_state()
    b = ds[(5, 1234)][0]
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())
    assert not torch.equal(a, ds[(5, 4321)][0])


def test_check_dataset_tool(digits, tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "data" / "check_dataset.py"), run_name="_test_check_dataset")["main"]
    assert main([str(digits), "--num-classes", "10"]) == 0
    assert "train: 10 classes, 1437 images" in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere")]) == 1
    assert "does not exist; expected <root>/train" in capsys.readouterr().err


def test_prepare_imagenet_val_sorts_a_flat_folder(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    labels = {"ILSVRC2012_val_00000001.JPEG": "n01440764", "ILSVRC2012_val_00000002.JPEG": "n01443537",
              "ILSVRC2012_val_00000003.JPEG": "n01440764"}
    for name in labels:
        Image.new("RGB", (8, 8)).save(val / name, format="JPEG")
    (tmp_path / "labels.txt").write_text("".join(f"{k} {v}\n" for k, v in labels.items()))
    tool = [sys.executable, str(ROOT / "data" / "prepare_imagenet_val.py"), str(val), "--labels", str(tmp_path / "labels.txt")]
    out = subprocess.run(tool, capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (val / "n01440764").iterdir()) == ["ILSVRC2012_val_00000001.JPEG",
                                                                      "ILSVRC2012_val_00000003.JPEG"]
    assert (val / "n01443537" / "ILSVRC2012_val_00000002.JPEG").exists()


def test_prepare_imagenet_val_from_the_devkit(tmp_path):
    """--devkit: ground-truth ILSVRC2012_IDs in file order, mapped to WordNet ids through meta.mat."""
    import numpy as np
    from scipy.io import savemat

    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    # meta.mat holds a 'synsets' struct array; IDs above 1000 are the non-leaf synsets, never in the ground truth
    synsets = np.array([(1, "n01440764", 1300), (2, "n01443537", 1300), (1001, "n00001740", 0)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_train_images", "O")])
    savemat(devkit / "data" / "meta.mat", {"synsets": synsets})
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n2\n")
    val = tmp_path / "val"
    val.mkdir()
    names = [f"ILSVRC2012_val_0000000{i}.JPEG" for i in (3, 1, 2)]  # created out of order: the tool sorts
    for name in names:
        Image.new("RGB", (8, 8)).save(val / name, format="JPEG")
    tool = [sys.executable, str(ROOT / "data" / "prepare_imagenet_val.py"), str(val), "--devkit", str(devkit)]
    out = subprocess.run(tool + ["--copy"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    assert "sorted 3 images into 2 class folders" in out.stdout
    assert sorted(p.name for p in (val / "n01443537").iterdir()) == ["ILSVRC2012_val_00000001.JPEG",
                                                                      "ILSVRC2012_val_00000003.JPEG"]
    assert [p.name for p in (val / "n01440764").iterdir()] == ["ILSVRC2012_val_00000002.JPEG"]
    assert (val / names[0]).exists()  # --copy keeps the originals

    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n")
    short = subprocess.run(tool, capture_output=True, text=True, env=ENV)
    assert short.returncode == 1 and "the ground truth lists 2 images but the folder has 3" in short.stderr


def test_loader_workers_are_capped_at_the_usable_cpus(digits, monkeypatch, caplog):
    from engine_utils import compose

    from litv2.data import builder

    monkeypatch.setattr(builder, "usable_cpus", lambda: 2)
    cfg = compose(["data=digits", f"data.root={digits}", "data.num_workers=8"])
    with caplog.at_level("WARNING"):
        loader = builder.build_eval_loader(cfg.data, digits)
    assert loader.loader.num_workers == 2  # the imagenet preset's 8 on a 2-CPU machine
    assert "data.num_workers=8 is more than the 2 CPUs" in caplog.text
    cfg.data.num_workers = 1
    caplog.clear()
    assert builder.build_eval_loader(cfg.data, digits).loader.num_workers == 1 and not caplog.text
    assert builder.usable_cpus() >= 1


def test_loaders_ship_uint8_images_and_normalise_them_on_the_device(digits):
    """Workers decode and augment to (H, W, C) uint8; the loader hands the model normalised float batches whose
    (B, C, H, W) view is channels-last in memory; random erasing runs on the batch (training)."""
    from engine_utils import compose

    from litv2.data import build_eval_loader, build_train_loader

    cfg = compose(["data=digits", f"data.root={digits}", "data.num_workers=0", "data.batch_size=4", "aug=deit"])
    loader = build_eval_loader(cfg.data, digits)
    raw = loader.dataset[0][0]
    assert raw.dtype == torch.uint8 and raw.shape == (32, 32, 3)
    images, targets, skipped = next(iter(loader))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 32, 32) and skipped == 0
    assert images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(images[0], (raw.permute(2, 0, 1).float() / 255 - 0.5) / 0.5)
    train, _ = build_train_loader(cfg, digits)
    assert train.random_erasing is not None and train.random_erasing.probability == cfg.aug.reprob
    images, _, _ = next(iter(train))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 32, 32)
