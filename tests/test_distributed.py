"""torchrun with 2 CPU ranks (gloo): one run dir, the single-process loss curve, exact val metrics on
an odd-sized val set, and SIGTERM + rerun = an uninterrupted 2-rank run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine_utils import ENV, FAST, ROOT, assert_same_tensors, load_state, make_digits_subset, metrics_rows, \
    train_in_process

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo + signals")

# A LayerNorm-only model (a 2-block ViT): with BatchNorm, per-rank statistics would legitimately differ.
DDP = ["data=folder", "data.num_classes=10", "data.img_size=32", "data.crop_pct=1.0", "aug=none",
       "model=timm", "model.name=vit_tiny_patch16_224", "+model.img_size=32", "+model.patch_size=8", "+model.depth=2",
       "trainer.log_every=1", "trainer.deterministic=true", "optim.lr=1e-3", "optim.lr_base_batch=16",
       "sched.warmup_epochs=0", "trainer.epochs=8", *FAST]


def torchrun(args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "train.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from litv2.data import prepare_digits

    tmp = tmp_path_factory.mktemp("ddp")
    digits = prepare_digits(tmp / "digits")
    return make_digits_subset(digits, tmp / "small", per_class_train=8, val_total=21)  # 80 train, odd val


@pytest.fixture(scope="module")
def two_rank_run(data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs2")
    args = [*DDP, f"data.root={data}", "data.batch_size=8", "trainer.max_steps=12", f"paths.runs_root={runs}"]
    proc = torchrun(args)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    return runs, args


def test_two_ranks_one_run_dir_and_single_process_curve(two_rank_run, data, tmp_path):
    runs, _ = two_rank_run
    run_dirs = [p.parent for p in runs.rglob("config_hash")]
    assert len(run_dirs) == 1 and len(list(runs.rglob("metrics.jsonl"))) == 1
    assert len(list(runs.rglob("summary.json"))) == 1 and len(list(runs.rglob("last.pth"))) == 1
    assert [p.name for p in (runs / "vit_tiny_patch16_224").iterdir()] == [run_dirs[0].name]
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 16

    # one process with the same global batch (16) sees the same images in each step
    single = tmp_path / "single"
    train_in_process([*DDP, f"data.root={data}", "data.batch_size=16", "trainer.max_steps=12"], single)
    ddp_loss = [r["train/loss"] for r in metrics_rows(run_dirs[0], "train/loss")]
    one_loss = [r["train/loss"] for r in metrics_rows(single, "train/loss")]
    assert len(ddp_loss) == len(one_loss) == 12
    assert ddp_loss[:6] == pytest.approx(one_loss[:6], rel=1e-4, abs=1e-5)

    # val on 21 images (not divisible by 2 ranks): no duplicates, the same top-1 as one process
    ddp_val = metrics_rows(run_dirs[0], "val/top1")[-1]
    one_val = metrics_rows(single, "val/top1")[-1]
    assert ddp_val["val/images"] == one_val["val/images"] == 21
    assert ddp_val["val/top1"] == one_val["val/top1"]


def test_sigterm_two_ranks_then_rerun_matches_uninterrupted(two_rank_run, tmp_path):
    ref_runs, args = two_rank_run
    runs = tmp_path / "runs"
    args = [a if not a.startswith("paths.runs_root=") else f"paths.runs_root={runs}" for a in args]
    proc = torchrun(args, start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            metrics = list(runs.rglob("metrics.jsonl"))
            if metrics and any(r["step"] >= 3 for r in metrics_rows(metrics[0].parent, "train/loss")):
                break
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both ranks
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    stopped = load_state(next(runs.rglob("last.pth")))["progress"]["global_step"]
    assert 3 <= stopped < 12, out[-3000:]
    assert "stopped: received SIGTERM" in out, out[-3000:]  # saved by the signal handler, not an epoch end
    assert not list(runs.rglob("summary.json"))

    time.sleep(1.1)
    rerun = torchrun(args)
    out, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, out[-4000:]
    assert len(list(runs.rglob("config_hash"))) == 1
    resumed = load_state(next(runs.rglob("last.pth")))
    straight = load_state(next(ref_runs.rglob("last.pth")))
    assert resumed["progress"]["global_step"] == straight["progress"]["global_step"] == 12
    assert_same_tensors(straight["model"], resumed["model"])


def test_slurm_tasks_become_torch_ranks():
    """Under srun / submitit (one task per GPU) the engine exports torchrun's variables from SLURM's."""
    from unittest import mock

    from litv2.engine.distributed import _slurm_env_to_torchrun_env

    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}  # a task of an srun step
    with mock.patch.dict(os.environ, slurm):  # restores the whole environment afterwards
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
        _slurm_env_to_torchrun_env()
        exported = dict(os.environ)
    assert (exported["RANK"], exported["WORLD_SIZE"], exported["LOCAL_RANK"]) == ("3", "4", "1")
    assert exported["MASTER_ADDR"] == "gpu07" and int(exported["MASTER_PORT"]) > 1024
    assert "RANK" not in os.environ and "SLURM_JOB_ID" not in os.environ


def test_two_nodes_one_rank_each_train_as_one_node_with_two(two_rank_run, tmp_path):
    """Multi-node: two torchrun launches (node ranks 0 and 1, one process each, static rendezvous on
    localhost) are ranks 0 and 1 with LOCAL_RANK 0 on both; they must train exactly as the 2-process node."""
    import socket

    ref_runs, args = two_rank_run
    runs = tmp_path / "runs"
    args = [a if not a.startswith("paths.runs_root=") else f"paths.runs_root={runs}" for a in args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                               str(ROOT / "train.py"), *args],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert len(list(runs.rglob("config_hash"))) == 1 and len(list(runs.rglob("last.pth"))) == 1
    run_dir = next(runs.rglob("config_hash")).parent
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    ref_dir = next(ref_runs.rglob("config_hash")).parent
    two_nodes = [r["train/loss"] for r in metrics_rows(run_dir, "train/loss")]
    one_node = [r["train/loss"] for r in metrics_rows(ref_dir, "train/loss")]
    # the same steps; gloo between "nodes" (TCP) may sum gradients in another order than within one: float noise
    assert len(two_nodes) == 12 and two_nodes == pytest.approx(one_node, rel=1e-5, abs=1e-6)
    want, got = load_state(next(ref_runs.rglob("last.pth")))["model"], load_state(run_dir / "last.pth")["model"]
    assert list(got) == list(want)
    for name in want:
        a, b = got[name], want[name]
        if name.endswith("attn.qkv.bias"):
            # the key bias has zero gradient in exact arithmetic (softmax ignores a per-query constant), so
            # AdamW's normalised steps follow rounding noise there: compare only the query and value parts
            dim = a.shape[0] // 3
            a, b = torch.cat([a[:dim], a[2 * dim:]]), torch.cat([b[:dim], b[2 * dim:]])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_two_rank_litv2_run_has_no_gradient_copy_and_evaluates_the_ema_on_rank_0s_statistics(data, tmp_path):
    """LITv2's depthwise-conv weight gradients arrive channels-last: DDP must not have to copy (and warn about)
    them. Its EMA copy has BatchNorm buffers that differ per rank: the logged EMA metrics must be those of rank
    0's EMA, i.e. what one process computes from the saved EMA weights on the whole val set."""
    from litv2.data import build_eval_loader
    from litv2.engine.builders import build_model
    from litv2.engine.evaluate import evaluate

    from engine_utils import TINY_LITV2, compose

    args = ["experiment=quickstart", "data=folder", "data.num_classes=10", f"data.root={data}", "data.batch_size=8",
            "trainer.max_steps=3", "trainer.log_every=1", "trainer.ema.enabled=true", "trainer.ema.decay=0.5",
            f"paths.runs_root={tmp_path}", *TINY_LITV2, *FAST]
    proc = torchrun(args)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    assert "Grad strides do not match" not in out, out[-4000:]
    run_dir = next(tmp_path.rglob("config_hash")).parent
    logged = metrics_rows(run_dir, "val_ema/loss")[-1]
    cfg = compose(args)
    ema = build_model(cfg)
    ema.load_state_dict(load_state(run_dir / "last.pth")["ema"])
    mine = evaluate(ema, build_eval_loader(cfg.data, data), torch.device("cpu"))
    assert logged["val_ema/images"] == mine["images"] == 21
    assert logged["val_ema/loss"] == pytest.approx(mine["loss"], rel=1e-5, abs=1e-6)


def _resume_on_rank(rank, world_size, store_path, nodes, results):
    import torch.distributed as dist

    from litv2.engine import checkpoint as ckpt
    from litv2.engine.distributed import DistInfo

    os.chdir(nodes[rank])  # each rank on its own "node": the relative run dir is node-local storage
    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"file://{store_path}")
    try:
        state, path = ckpt.load_resume_state_on_all_ranks("runs/r", "auto", DistInfo(rank, rank, world_size))
        results[rank] = (state["progress"]["global_step"], float(state["model"]["w"][0]), str(path))
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_from_rank_0s_checkpoint(tmp_path):
    """Rank 0 chooses the file; a rank that reads an older version of it (a stale network-file-system entry) or
    cannot read it at all (a node-local runs_root) gets rank 0's copy: all replicas start at the same step."""
    import torch.multiprocessing as mp

    from litv2.engine import checkpoint as ckpt

    def node(name, step=None, prev_step=None):
        d = tmp_path / name / "runs" / "r"
        d.mkdir(parents=True)
        for file, s in ((ckpt.PREV, prev_step), (ckpt.LAST, step)):
            if s is not None:
                ckpt.save_atomic({"format": ckpt.FORMAT, "model": {"w": torch.full((3,), float(s))},
                                  "progress": {"global_step": s}}, d / file)
        return tmp_path / name

    rank0 = node("node0", step=7, prev_step=6)
    (rank0 / "runs" / "r" / ckpt.LAST).write_bytes(b"truncated")  # rank 0 falls back to last.prev.pth
    for other in (node("stale", step=7, prev_step=5), node("local"), node("same", step=7, prev_step=6)):
        results = mp.Manager().dict()
        mp.start_processes(_resume_on_rank, args=(2, str(tmp_path / f"store-{other.name}"), [rank0, other], results),
                           nprocs=2, start_method="fork")
        assert dict(results) == {r: (6, 6.0, "runs/r/last.prev.pth") for r in (0, 1)}, other.name


def _save_on_rank(rank, world_size, store_path, run_dir, results):
    import time as time_
    from types import SimpleNamespace

    import torch.distributed as dist
    from omegaconf import OmegaConf

    from litv2.engine import checkpoint as ckpt
    from litv2.engine import trainer
    from litv2.engine.distributed import DistInfo

    real = ckpt.save_atomic

    def slow_save(*args, **kwargs):
        time_.sleep(1.0)  # a big checkpoint on a slow file system
        real(*args, **kwargs)
        results["written"] = time_.time()

    ckpt.save_atomic = slow_save
    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"file://{store_path}")
    try:
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = SimpleNamespace(info=DistInfo(rank, rank, world_size), progress=trainer.Progress(), start_time=0.0,
                              model=model, optimizer=opt, scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None,
                              cfg=OmegaConf.create({"a": 1}), run_dir=run_dir, lease=None, saved_step=None)
        trainer.save(run, ckpt.LAST)
        results[rank] = time_.time()
    finally:
        dist.destroy_process_group()


def test_no_rank_returns_from_a_save_before_rank_0_has_written_it(tmp_path):
    """After a stop signal every rank saves and exits; a rank > 0 that exits while rank 0 still writes makes
    torchrun / srun count a failure and kill rank 0 mid-write."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.start_processes(_save_on_rank, args=(2, str(tmp_path / "store"), tmp_path, results), nprocs=2,
                       start_method="fork")
    assert (tmp_path / "last.pth").exists()
    assert results[1] >= results["written"] and results[0] >= results["written"]


def _ordered_mean_on_rank(rank, world_size, store_path, results):
    import torch.distributed as dist

    from litv2.engine.distributed import rank_ordered_mean

    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"file://{store_path}")
    try:
        # values whose float32 sum depends on the order: 1e8 + 1 - 1e8 + 1 is 1 summed left to right, 2 exactly
        grads = [torch.tensor([1e8, 3.0]), torch.tensor([1.0, 1e-7]), torch.tensor([-1e8, 7.0]), torch.tensor([1.0, 0.5])]

        class Bucket:
            def buffer(self):
                return grads[rank].clone()

        results[rank] = rank_ordered_mean(None, Bucket()).wait().tolist()
    finally:
        dist.destroy_process_group()


def test_the_deterministic_gradient_mean_sums_in_rank_order_on_every_rank(tmp_path):
    """trainer.deterministic with more than two ranks reduces gradients with this hook: the same sum, in rank order,
    wherever an element falls in DDP's buckets (a ring all-reduce's order depends on that)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.start_processes(_ordered_mean_on_rank, args=(4, str(tmp_path / "store"), results), nprocs=4,
                       start_method="fork")
    g = [torch.tensor([1e8, 3.0]), torch.tensor([1.0, 1e-7]), torch.tensor([-1e8, 7.0]), torch.tensor([1.0, 0.5])]
    expected = (((g[0] + g[1]) + g[2]) + g[3]).div(4).tolist()
    assert [results[r] for r in range(4)] == [expected] * 4
