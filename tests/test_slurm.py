"""SLURM: which processes are ranks, their ports and devices (pure functions, no scheduler), then the same code
under a live one-node SLURM cluster (``-m slurm``; tests/slurm_cluster.py starts it, skipped without slurm-wlm)."""
import os
from unittest import mock

import pytest
import torch

from engine_utils import CONF, FAST, compose

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _exported(slurm_env: dict) -> dict:
    """torchrun's variables the engine exports for a process with these SLURM variables."""
    from litv2.engine.distributed import _slurm_env_to_torchrun_env

    with mock.patch.dict(os.environ, slurm_env):  # restores the whole environment afterwards
        for k in TORCHRUN_VARS:
            if k not in slurm_env:
                os.environ.pop(k, None)
        _slurm_env_to_torchrun_env()
        return {k: os.environ[k] for k in TORCHRUN_VARS if k in os.environ}


def _step_task(job_id: int, procid: int = 0, **extra) -> dict:
    return {"SLURM_JOB_ID": str(job_id), "SLURM_NTASKS": "2", "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid), "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
            "SLURM_JOB_NODELIST": "node1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", **extra}


def test_array_tasks_and_concurrent_jobs_get_their_own_port():
    """The two tasks of a 2-point sweep (one array) used to share the array's job id, hence one port: on a
    shared node their ranks met in one process group."""
    point_0 = _exported(_step_task(101, SLURM_ARRAY_JOB_ID="100", SLURM_ARRAY_TASK_ID="0"))
    point_1 = _exported(_step_task(102, SLURM_ARRAY_JOB_ID="100", SLURM_ARRAY_TASK_ID="1"))
    assert point_0["MASTER_PORT"] != point_1["MASTER_PORT"]
    ports = {_exported(_step_task(job))["MASTER_PORT"] for job in range(5000, 5100)}
    assert len(ports) == 100 and all(1024 < int(p) < 65536 for p in ports)
    assert _exported(_step_task(101, MASTER_PORT="29999"))["MASTER_PORT"] == "29999"  # the user's choice wins


def test_only_the_tasks_of_an_srun_step_are_ranks():
    rank_1 = _exported(_step_task(7, procid=1))
    assert (rank_1["RANK"], rank_1["WORLD_SIZE"], rank_1["LOCAL_RANK"], rank_1["MASTER_ADDR"]) == ("1", "2", "1", "node1")
    batch_script = {k: v for k, v in _step_task(7).items() if not k.startswith("SLURM_STEP_")}
    assert _exported(batch_script) == {}  # sbatch --ntasks-per-node=2 without srun: one process
    # a batch script submitted from an `srun --pty bash` session inherits that 1-task step's variables
    assert _exported(_step_task(7, SLURM_STEP_NUM_TASKS="1")) == {}
    assert _exported({**_step_task(7, procid=1), "RANK": "0", "WORLD_SIZE": "2"})["RANK"] == "0"  # torchrun's


def test_the_cuda_device_follows_what_the_task_sees():
    from litv2.engine.distributed import cuda_device_index

    assert [cuda_device_index(r, 8) for r in range(8)] == list(range(8))  # each task sees the node's 8 GPUs
    assert [cuda_device_index(r, 1) for r in range(8)] == [0] * 8  # --gpus-per-task=1 / --gpu-bind
    assert [cuda_device_index(r, 2) for r in range(4)] == [0, 1, 0, 1]  # --gpus-per-task=2, one process each
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        cuda_device_index(0, 0)


@pytest.mark.parametrize("experiment", ["litv2_s_in1k", "litv2_b_in1k"])
def test_the_slurm_preset_fits_one_rank_per_gpu_with_its_loader_workers(experiment):
    """64 GB for 8 ranks x (main + 8 train + 8 persistent val workers) was OOM-killed; the sizing rule: a CPU for
    each training loader worker and the main process, and >= 24 GB of host memory per rank."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = hydra_compose("config", overrides=["hydra/launcher=slurm", f"experiment={experiment}"],
                            return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.cpus_per_task >= cfg.data.num_workers + 1
    assert launcher.mem_gb / launcher.tasks_per_node >= 24


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
