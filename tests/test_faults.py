"""Failures end the job cleanly (issue 28): an error mid-epoch or Ctrl-C ends the process in seconds with its loader
workers, a failed rank ends the others, an unreadable micro-batch on one rank does not desynchronise DDP, one live job
per run dir, and a resume under another config is refused or mapped. Faults are injected with tests/fault_train.py."""
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine_utils import (ENV, FAST, ROOT, TINY_LITV2, compose, kill_all, load_state, make_digits_subset, metrics_rows,
                          processes_of, train_in_process, user_error_line)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signals, gloo")

FAULT = str(ROOT / "tests" / "fault_train.py")
# The quickstart on a one-block-per-stage LITv2, logged and checkpointed often.
QUICK = ["experiment=quickstart", *TINY_LITV2, "++model.depths=[1,1,1,1]", "data.batch_size=16",
         "trainer.log_every=1", "logger=none", "profile.enabled=false"]
# The 2-rank setup of test_distributed.py: a LayerNorm-only 2-block ViT.
DDP = ["data=folder", "data.num_classes=10", "data.img_size=32", "data.crop_pct=1.0", "aug=none",
       "model=timm", "model.name=vit_tiny_patch16_224", "+model.img_size=32", "+model.patch_size=8", "+model.depth=2",
       "trainer.log_every=1", "optim.lr=1e-3", "optim.lr_base_batch=16", "sched.warmup_epochs=0", "logger=none",
       "profile.enabled=false"]


def _start(args, fault=None, torchrun=False, **env):
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if torchrun else []),
           FAULT, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **({"LITV2_FAULT": fault} if fault else {}), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc, timeout, marker: str):
    """(returncode, stdout, stderr, seconds); kills everything it started if it outlives ``timeout``."""
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc, marker)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err, time.monotonic() - t0


def _all_gone(marker: str) -> bool:
    """No process the test started (loader workers included) is left; kills what is."""
    deadline = time.monotonic() + 5
    while processes_of(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = processes_of(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return not left


def _wait_for(path_glob, root: Path, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(root.glob(path_glob))
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    pytest.fail(f"no {path_glob} under {root} after {timeout} s")


# ---- an error or Ctrl-C ends the process, loader workers included -------------------------------------------

def test_an_error_mid_epoch_with_loader_workers_ends_the_process_in_seconds(digits, tmp_path):
    """It used to hang forever: the workers ignore SIGTERM, and multiprocessing's exit handler waits for them."""
    proc = _start([*QUICK, f"data.root={digits}", f"paths.runs_root={tmp_path}", "data.num_workers=2"], "raise@3")
    rc, _, err, _ = _finish(proc, 60, str(tmp_path))
    assert rc == 1 and "RuntimeError: injected fault at step 3 on rank 0" in err, err[-3000:]
    assert _all_gone(str(tmp_path)), "loader workers outlived the process"


def test_an_error_shuts_the_loader_workers_down_before_train_returns(digits, tmp_path, monkeypatch):
    """Not left to interpreter exit: train() itself ends its workers (persistent training ones and validation ones)
    and releases the run dir."""
    import litv2.engine.trainer as trainer

    real = trainer._optimizer_step

    def failing(run, found_inf):
        if run.progress.global_step == 2:
            assert multiprocessing.active_children(), "the loader should be running workers now"
            raise RuntimeError("injected")
        return real(run, found_inf)

    monkeypatch.setattr(trainer, "_optimizer_step", failing)
    with pytest.raises(RuntimeError, match="injected") as failed:  # holds the traceback, as Hydra's handler does
        train_in_process([*QUICK, f"data.root={digits}", "data.num_workers=2", "data.persistent_workers=true"],
                         tmp_path / "run")
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children() and failed.value.__traceback__ is not None
    assert not (tmp_path / "run" / ".lease").exists()


def test_ctrl_c_ends_the_run_in_one_line_naming_the_checkpoint_kept(digits, tmp_path):
    """SIGINT to the process group, as a terminal sends it: exit status 130, no traceback, workers gone."""
    proc = _start([*QUICK, f"data.root={digits}", f"paths.runs_root={tmp_path}", "data.num_workers=2",
                   "trainer.ckpt_every_steps=3"])
    _wait_for("quickstart/*/last.pth", tmp_path, proc)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    rc, _, err, seconds = _finish(proc, 30, str(tmp_path))
    lines = [ln for ln in err.splitlines() if ln.startswith(("stopped:", "error:", "Traceback"))]
    assert rc == 130 and seconds < 10, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("stopped: interrupted at step "), err[-3000:]
    run_dir = next(tmp_path.glob("quickstart/*"))
    saved = load_state(run_dir / "last.pth")["progress"]["global_step"]
    assert f"{run_dir / 'last.pth'} (step {saved}) is kept" in lines[0]
    assert _all_gone(str(tmp_path)) and not (run_dir / ".lease").exists()


# ---- several ranks ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from litv2.data import prepare_digits

    tmp = tmp_path_factory.mktemp("faults")
    return make_digits_subset(prepare_digits(tmp / "digits"), tmp / "small", per_class_train=8, val_total=21)


def test_a_failed_rank_ends_the_other_ranks_within_seconds(small, tmp_path):
    """Rank 1 raises at step 3 under torchrun, with 2 loader workers each, while rank 0 is busy outside any collective
    (as in a long validation): rank 0 learns it through the rendezvous store and ends within seconds, naming rank 1's
    error, instead of sitting until torchrun kills it (30 s later) or, under srun, until the collective timeout."""
    proc = _start([*DDP, f"data.root={small}", "data.batch_size=8", "trainer.epochs=8", "data.num_workers=2",
                   f"paths.runs_root={tmp_path}", "trainer.dist_timeout_s=600"], "raise@3:1,hang@3:0",
                  torchrun=True)
    rc, _, err, seconds = _finish(proc, 90, str(tmp_path))
    assert rc != 0 and seconds < 25, err[-3000:]
    assert "RuntimeError: injected fault at step 3 on rank 1" in err
    assert "error: rank 1 (host " in err and "failed: RuntimeError: injected fault at step 3 on rank 1; rank 0 " \
                                               "stopped too" in err, err[-3000:]
    assert _all_gone(str(tmp_path))
    assert not list(tmp_path.rglob(".lease")), "rank 0 ended without releasing the run dir"


def test_an_unreadable_micro_batch_on_one_rank_does_not_desynchronise_ddp(small, tmp_path):
    """Batch 1 per rank and three zero-byte JPEGs: a rank whose image is unreadable still joins the gradient
    all-reduce, the run completes and the images are counted as skipped (once per epoch)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(small, root)
    for c in ("1", "4", "7"):
        (root / "train" / c / "zero.jpg").write_bytes(b"")
    proc = _start([*DDP, f"data.root={root}", "data.batch_size=1", "trainer.epochs=2", "data.num_workers=0",
                   f"paths.runs_root={tmp_path / 'runs'}", "trainer.dist_timeout_s=30"], torchrun=True)
    rc, _, err, seconds = _finish(proc, 120, str(tmp_path))
    assert rc == 0, err[-3000:]
    summary = json.loads(next((tmp_path / "runs").rglob("summary.json")).read_text())
    assert summary["skipped_images"] == 3 * 2 and summary["steps"] == 2 * (83 // 2)


# ---- one live job per run dir -------------------------------------------------------------------------------

def test_one_live_job_per_run_dir(digits, tmp_path, capsys):
    """A job holds its run dir: the same command in the same dir fails in one line naming it; resume=auto does not
    pick the dir while its job lives; after a kill -9, a rerun on the same host takes the dir over at once."""
    from litv2.engine import train

    held = tmp_path / "runs" / "quickstart" / "held"
    args = [*QUICK, f"data.root={digits}", f"paths.runs_root={tmp_path / 'runs'}", "data.num_workers=0",
            "trainer.ckpt_every_steps=2", "trainer.max_steps=8"]
    proc = _start([*args, f"hydra.run.dir={held}"], "hang@5")  # checkpoints at steps 2 and 4, then stalls
    try:
        _wait_for("metrics.jsonl", held, proc)
        while len(metrics_rows(held, "train/loss")) < 4:
            assert proc.poll() is None
            time.sleep(0.05)
        line = user_error_line(capsys, train, compose(args), run_dir=held, fresh_dir=held)
        assert f"run dir {held} is in use by PID {proc.pid} on host {socket.gethostname()}" in line
        assert held.is_dir() and (held / ".lease").exists(), "the failed start removed the live job's dir"

        other = tmp_path / "runs" / "quickstart" / "other"  # resume=auto must not continue the live run
        summary = train_in_process(args, other)
        assert summary["run_dir"] == str(other) and summary["steps"] == 8
    finally:
        kill_all(proc, str(tmp_path))
        proc.wait()
    assert (held / ".lease").exists() and not (held / "summary.json").exists()  # as the killed job left it
    rerun = tmp_path / "runs" / "quickstart" / "rerun"
    summary = train_in_process(args, rerun)
    assert summary["run_dir"] == str(held) and not rerun.exists()
    assert [r["step"] for r in metrics_rows(held, "train/loss")] == list(range(1, 9))


def test_the_lease_is_taken_over_only_when_stale(tmp_path, monkeypatch):
    from litv2.engine.lease import LEASE, RunDirBusy, RunDirLease, is_held

    def holder(**fields):
        base = {"token": "x", "host": "node-b", "pid": 4242, "start": None, "job": None, "heartbeat": time.time()}
        (tmp_path / LEASE).write_text(json.dumps({**base, **fields}))

    holder()  # another host, heartbeat fresh: busy
    with pytest.raises(RunDirBusy, match="in use by PID 4242 on host node-b"):
        RunDirLease(tmp_path, ttl_s=60).acquire()
    assert is_held(tmp_path, 60)["host"] == "node-b"
    holder(heartbeat=time.time() - 61)  # another host, silent for longer than the TTL: stale
    assert is_held(tmp_path, 60) is None
    RunDirLease(tmp_path, ttl_s=60).acquire().release()
    assert not (tmp_path / LEASE).exists()
    holder(job="slurm:77")  # a fresh lease of this very SLURM job (before a requeue): taken over
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lease = RunDirLease(tmp_path, ttl_s=60).acquire()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == lease.token
    lease.release()
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job's: busy, named
    holder(job="slurm:77")
    with pytest.raises(RunDirBusy, match=r"node-b \(SLURM job 77\)"):
        RunDirLease(tmp_path, ttl_s=60).acquire()


def test_a_holder_whose_lease_was_taken_over_stops(tmp_path):
    from litv2.engine.lease import LEASE, RunDirBusy, RunDirLease

    lease = RunDirLease(tmp_path, ttl_s=0.2).acquire()
    record = json.loads((tmp_path / LEASE).read_text())
    (tmp_path / LEASE).write_text(json.dumps({**record, "token": "someone-else", "host": "node-c"}))
    deadline = time.monotonic() + 5
    while lease.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(RunDirBusy, match="taken over by PID .* on host node-c"):
        lease.check()
    lease.release()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "someone-else"  # not ours to delete


def test_a_rerun_continues_in_the_dir_of_a_run_stopped_before_its_first_checkpoint(digits, tmp_path, monkeypatch):
    """A run killed before any checkpoint leaves its dir (config, metrics rows, a stale lease): the rerun starts again
    there, not in yet another dir, and its metrics hold no row of the lost run."""
    import litv2.engine.trainer as trainer

    args = [*QUICK, f"data.root={digits}", f"paths.runs_root={tmp_path}", "data.num_workers=0", "trainer.max_steps=4"]
    real = trainer._optimizer_step
    monkeypatch.setattr(trainer, "_optimizer_step", lambda run, f: (_ for _ in ()).throw(RuntimeError("x"))
                        if run.progress.global_step == 3 else real(run, f))
    first = tmp_path / "quickstart" / "first"
    with pytest.raises(RuntimeError):
        train_in_process(args, first)
    monkeypatch.setattr(trainer, "_optimizer_step", real)
    dead = subprocess.run(["true"])  # noqa: S607  a PID that has ended
    (first / ".lease").write_text(json.dumps({"token": "t", "host": socket.gethostname(), "pid": os.getpid() + 10**6,
                                              "start": None, "job": None, "heartbeat": time.time()}))
    assert dead.returncode == 0 and len(metrics_rows(first, "train/loss")) == 3 and not (first / "last.pth").exists()
    summary = train_in_process(args, tmp_path / "quickstart" / "second")
    assert summary["run_dir"] == str(first) and not (tmp_path / "quickstart" / "second").exists()
    assert [r["step"] for r in metrics_rows(first, "train/loss")] == [1, 2, 3, 4]


# ---- resume under another config ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_at_step_6(tmp_path_factory):
    from litv2.data import prepare_digits

    tmp = tmp_path_factory.mktemp("resume")
    digits = prepare_digits(tmp / "digits")
    args = [*QUICK, f"data.root={digits}", "data.num_workers=0", "trainer.max_steps=6"]
    train_in_process(args, tmp / "first")
    return digits, args, tmp / "first" / "last.pth"


@pytest.mark.parametrize("change,expected", [
    (["++model.embed_dim=24"], "was trained on another model: model.embed_dim 16 -> 24"),
    (["hilo.alpha=0.9"], "was trained on another model: hilo.alpha 0.5 -> 0.9"),
    (["data=synthetic", "data.img_size=32"], "was trained on another dataset: data.name digits -> synthetic"),
])
def test_resuming_another_model_or_dataset_fails_in_one_line_before_a_run_dir(change, expected, checkpoint_at_step_6,
                                                                             tmp_path, capsys):
    from litv2.engine import train

    _, args, last = checkpoint_at_step_6
    run_dir = tmp_path / "quickstart" / "new"
    run_dir.mkdir(parents=True)
    line = user_error_line(capsys, train, compose([*args, *change, f"trainer.resume={last}"]), run_dir=run_dir,
                           fresh_dir=run_dir)
    assert expected in line and "trainer.init_from=" in line
    assert not list(tmp_path.rglob("*")), "a refused resume must leave no run dir behind"


def test_resuming_under_another_recipe_warns_maps_the_position_by_samples_and_restarts_the_best(checkpoint_at_step_6,
                                                                                                tmp_path, caplog):
    """6 steps of 16 images, resumed at batch 32 and another LR: the epoch continues after those 96 images (step 3 of
    the new 44), with one warning naming the changes; the best metrics are the new run's only."""
    digits, args, last = checkpoint_at_step_6
    state = load_state(last)
    state["progress"]["best"] = {"top1": 100.0, "top5": 100.0, "epoch": 1, "step": 6}  # a best the new run won't reach
    torch.save(state, tmp_path / "best_at_100.pth")
    with caplog.at_level("WARNING"):
        summary = train_in_process([*args, "data.batch_size=32", "optim.lr=1e-3", "trainer.max_steps=5",
                                    f"trainer.resume={tmp_path / 'best_at_100.pth'}"], tmp_path / "second")
    warnings = [r.getMessage() for r in caplog.records if "another recipe" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "data.batch_size 16 -> 32" in warnings[0] and "optim.lr 0.002 -> 0.001" in warnings[0]
    assert "after the 96 samples it has seen, at step 3 of 44" in warnings[0]
    assert [r["step"] for r in metrics_rows(tmp_path / "second", "train/loss")] == [4, 5]
    progress = load_state(tmp_path / "second" / "last.pth")["progress"]
    assert progress["step_in_epoch"] == 5 and progress["global_step"] == 5
    assert summary["best_top1"] == summary["final_top1"] < 100.0


def test_an_image_folder_and_its_chunks_are_one_dataset_to_resume():
    """data=imagenet -> data=shards (the same images converted by make_shards.py) resumes as a recipe change, with
    a warning; another dataset is still refused."""
    from omegaconf import OmegaConf

    from litv2.engine import checkpoint as ckpt
    from litv2.engine.builders import build_model

    tiny = [*TINY_LITV2, "data.num_classes=10"]
    folder = compose(["data=imagenet", *tiny])
    with torch.device("meta"):
        weights = build_model(folder, pretrained=False).state_dict()
    state = {"format": ckpt.FORMAT, "config": OmegaConf.to_container(folder, resolve=True), "model": weights,
             "world_size": 1}
    shards = compose(["data=shards", *tiny])
    ckpt.check_resumable(shards, state, "last.pth")
    assert "data.name imagenet -> shards" in ckpt.recipe_changes(shards, state, 1)
    with pytest.raises(ckpt.CheckpointError, match="another dataset: data.name imagenet -> synthetic"):
        ckpt.check_resumable(compose(["data=synthetic", *tiny]), state, "last.pth")


def test_resuming_the_same_recipe_keeps_the_best_and_says_nothing(checkpoint_at_step_6, tmp_path, caplog):
    """Where to stop, how many loader workers: not the recipe. The run goes on with its best metrics."""
    _, args, last = checkpoint_at_step_6
    state = load_state(last)
    state["progress"]["best"] = {"top1": 100.0, "top5": 100.0, "epoch": 1, "step": 6}
    torch.save(state, tmp_path / "best_at_100.pth")
    with caplog.at_level("WARNING"):
        summary = train_in_process([*args, "data.num_workers=1", "trainer.max_steps=7",
                                    f"trainer.resume={tmp_path / 'best_at_100.pth'}"], tmp_path / "again")
    assert not [r for r in caplog.records if "another recipe" in r.getMessage()]
    assert summary["best_top1"] == 100.0 and summary["steps"] == 7


def test_the_failure_watch_names_the_first_failed_rank_and_not_its_own():
    from litv2.engine.distributed import FailureWatch

    store = torch.distributed.HashStore()
    watches = [FailureWatch(store, rank, poll_s=3600) for rank in range(3)]  # (no polling during the test)
    try:
        assert all(w.peer_failure() is None for w in watches)
        watches[2].announce(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"))
        watches[1].announce(ValueError("a later failure"))
        assert watches[2].peer_failure() is None
        host = socket.gethostname()
        for w in watches[:2]:
            assert w.peer_failure() == f"rank 2 (host {host}) failed: RuntimeError: CUDA out of memory. Tried to " \
                                       f"allocate 2.00 GiB"
    finally:
        for w in watches:
            w.stop()


_LOST_STORE = """
import multiprocessing as mp, sys, time
import torch.distributed as dist
from litv2.engine.distributed import FailureWatch

def host(port, ready):
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    ready.set()
    time.sleep(600)

if __name__ == "__main__":
    port = int(sys.argv[1])
    ready = mp.get_context("fork").Event()
    p = mp.get_context("fork").Process(target=host, args=(port, ready), daemon=True)
    p.start()
    ready.wait(60)
    watch = FailureWatch(dist.TCPStore("127.0.0.1", port, 2, is_master=False), rank=1, poll_s=0.2, grace_s=0.5)
    p.kill()  # the store's host dies (rank 0 under srun, torchrun's agent)
    print("killed", flush=True)
    time.sleep(60)
    print("still alive", flush=True)
"""


def test_a_rank_that_loses_the_rendezvous_store_ends(tmp_path):
    """The store's host died (its node was lost): after a few polls in a row without it, the rank ends in one line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "lost_store.py"
    script.write_text(_LOST_STORE)
    proc = subprocess.run([sys.executable, str(script), str(port)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "killed" in proc.stdout and "still alive" not in proc.stdout, proc.stderr[-2000:]
    assert "error: lost the job's rendezvous store" in proc.stderr and "rank 1 stopped too" in proc.stderr
