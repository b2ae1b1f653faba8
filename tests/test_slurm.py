"""SLURM: which processes are ranks, their ports and devices (pure functions, no scheduler), then the same code
under a live one-node SLURM cluster (``-m slurm``; tests/slurm_cluster.py starts it, skipped without slurm-wlm)."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from engine_utils import (CONF, FAST, ROOT, TINY_LITV2, assert_same_tensors, compose, load_state, make_digits_subset,
                          metrics_rows)
from slurm_cluster import slurm, slurm_cluster  # noqa: F401  (fixtures)

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
    assert [rank_1[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")] == ["1", "2", "1", "node1"]
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
    assert build_train_loader(cfg, index)[0].loader.persistent_workers
    assert not build_eval_loader(cfg.data, index).loader.persistent_workers


# ---- under a live SLURM cluster -----------------------------------------------------------------------------

PY = sys.executable
# The SLURM launcher preset on this one node: 2 tasks (ranks) of 1 CPU per job, no GPU.
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from litv2.data import prepare_digits

    return prepare_digits(tmp_path_factory.mktemp("slurm-data") / "digits")


@pytest.fixture(scope="module")
def small(digits):
    return make_digits_subset(digits, digits.parent / "small", per_class_train=8, val_total=21)  # 80 train, 21 val


def tiny_run(small, runs: Path, max_steps: int) -> list[str]:
    """A few-second deterministic 2-rank run: the tiny LITv2 on 80 digits, 5 steps per epoch."""
    return ["experiment=quickstart", "data=folder", "data.num_classes=10", f"data.root={small}", "data.batch_size=8",
            *TINY_LITV2, "trainer.log_every=1", "trainer.deterministic=true", f"trainer.max_steps={max_steps}",
            f"paths.runs_root={runs}", "hydra.sweep.subdir=${hydra.job.num}", *FAST]  # short sweep dir names


def run_dirs(runs: Path) -> list[Path]:
    return sorted(p.parent for p in Path(runs).rglob("config_hash"))


def steps_logged(runs: Path, glob: str = "*") -> int:
    dirs = [d for d in run_dirs(runs) if d.match(glob) and (d / "metrics.jsonl").exists()]
    return max((r["step"] for d in dirs for r in metrics_rows(d, "train/loss")), default=0)


def wait_for_step(cluster, runs: Path, step: int, proc=None, timeout: float = 120, glob: str = "*"):
    def reached():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before step {step}: {proc.log.read_text()[-3000:]}")
        return steps_logged(runs, glob) >= step
    cluster.wait_until(reached, timeout, f"step {step} under {runs}", interval=0.1)


def job_log(runs: Path, job_id: str) -> str:
    """stdout + stderr of every task of a submitit job (all its runs: submitit appends)."""
    return "".join(f.read_text(errors="replace") for f in sorted(Path(runs).rglob(f"{job_id}_*_log.*")))


def background(cluster, cmd: list[str], name: str) -> subprocess.Popen:
    """cmd in the background, its output in the file ``proc.log`` (a pipe nobody reads could fill up)."""
    log = cluster.root / f"{name}-{time.monotonic_ns()}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=cluster.env, stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def sweep(cluster, args, name: str) -> subprocess.Popen:
    """`python train.py -m hydra/launcher=slurm ...` in the background; it returns when its jobs have ended."""
    return background(cluster, [PY, str(ROOT / "train.py"), "-m", *LAUNCHER, f"hydra.launcher.name={name}", *args],
                      name)


def job_id_of(cluster, name: str, timeout: float = 60) -> str:
    return cluster.wait_until(lambda: [j["id"] for j in cluster.jobs(name, all_states=True)], timeout,
                              f"job {name} to be queued")[0]


def finish(proc, timeout: float = 240) -> str:
    """Wait for a background command; its output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.log.read_text(errors="replace")


@pytest.mark.slurm
def test_sweep_through_the_slurm_launcher_runs_its_points_side_by_side(slurm, digits, tmp_path):
    """The issue's command: two points, 2 ranks each, at the same time on one node; each its own process group."""
    proc = sweep(slurm, ["experiment=quickstart", "trainer.max_steps=6", "logger=none", "hilo.alpha=0.5,1.0",
                         f"data.root={digits}", f"paths.runs_root={tmp_path}"], "sweep")
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    points = run_dirs(tmp_path)
    assert len(points) == 2
    for point, alpha in zip(points, (0.5, 1.0)):
        summary = json.loads((point / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 6 and summary["world_size"] == 2
        assert f"hilo.alpha={alpha}" in point.name and compose_saved(point).hilo.alpha == alpha
        assert {"last.pth", "best.pth", "metrics.jsonl", "config.yaml"} <= {p.name for p in point.iterdir()}
    # submitit has the results before the tasks have exited: the jobs leave the queue a moment later
    slurm.wait_until(lambda: not slurm.jobs("sweep"), 60, "the sweep's jobs to leave the queue")
    jobs = slurm.jobs("sweep", all_states=True)
    assert len(jobs) == 2 and {j["state"] for j in jobs} == {"COMPLETED"}, jobs
    assert max(j["start"] for j in jobs) < min(j["end"] for j in jobs), jobs  # they ran at the same time


def compose_saved(run_dir: Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / "config.yaml")


@pytest.fixture(scope="module")
def straight_and_usr2(slurm_cluster, small, tmp_path_factory):
    """A 2-point sweep of the same training (paths.runs_root differs, so neither adopts the other's run dir):
    point 0 runs uninterrupted; point 1 gets USR2, submitit's preemption signal, while it trains."""
    cluster, root = slurm_cluster, tmp_path_factory.mktemp("usr2")
    proc = sweep(cluster, [*tiny_run(small, root, 30), f"hydra.sweep.dir={root / 'sweep'}",
                           f"paths.runs_root={root / 'straight'},{root / 'usr2'}"], "usr2")
    try:
        array = job_id_of(cluster, "usr2").split("_")[0]
        wait_for_step(cluster, root / "sweep", 3, proc, glob="1")
        cluster.run(["scancel", "--signal=USR2", f"{array}_1"])
        out = finish(proc)
        cluster.wait_until(lambda: not cluster.jobs("usr2"), 60, "the sweep's jobs to leave the queue")
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.cancel_all()
    assert proc.returncode == 0, out[-4000:]
    return [point(cluster, root, f"{array}_{i}", run_dirs(root / "sweep")[i]) for i in (0, 1)]


def point(cluster, root: Path, job: str, run_dir: Path) -> dict:
    return {"run_dir": run_dir, "job": job, "scontrol": cluster.job(job), "log": job_log(root, job)}


def assert_saved_requeued_resumed(run: dict, signame: str, reference: Path, max_steps: int = 30):
    """Both ranks saved at the same step on the signal, SLURM ran the job twice, the rerun resumed from that
    step and ended with the weights of the uninterrupted run."""
    assert run["scontrol"]["JobState"] == "COMPLETED" and run["scontrol"]["Restarts"] == "1", run["scontrol"]
    saved = re.findall(rf"stopped: received {signame}: saved the checkpoint at step (\d+)", run["log"])
    assert len(saved) == 2 and len(set(saved)) == 1, run["log"][-3000:]
    assert 3 <= int(saved[0]) < max_steps
    assert re.search(rf"resuming from {re.escape(str(run['run_dir'] / 'last.pth'))} at epoch \d+, step {saved[0]}\n",
                     run["log"]), run["log"][-3000:]
    assert json.loads((run["run_dir"] / "summary.json").read_text())["steps"] == max_steps
    resumed, straight = load_state(run["run_dir"] / "last.pth"), load_state(reference / "last.pth")
    assert resumed["progress"]["global_step"] == straight["progress"]["global_step"] == max_steps
    assert_same_tensors(straight["model"], resumed["model"])


@pytest.mark.slurm
def test_usr2_to_a_job_saves_and_submitit_requeues_it_to_the_uninterrupted_weights(straight_and_usr2):
    straight, signalled = straight_and_usr2
    assert straight["scontrol"]["Restarts"] == "0"
    assert "Requeued job" in signalled["log"]  # submitit's handler, after our save
    assert_saved_requeued_resumed(signalled, "SIGUSR2", straight["run_dir"])


@pytest.mark.slurm
def test_a_preempted_job_saves_on_sigterm_and_resumes_to_the_uninterrupted_weights(slurm, small, tmp_path,
                                                                                     straight_and_usr2):
    """Real preemption (PreemptMode=REQUEUE): a job in a higher-priority partition needs the node; SLURM sends
    SIGTERM, kills what is left after KillWait and requeues the job itself (submitit lets SIGTERM pass)."""
    proc = sweep(slurm, [*tiny_run(small, tmp_path, 30), f"hydra.sweep.dir={tmp_path / 'sweep'}"], "term")
    try:
        job = job_id_of(slurm, "term")
        wait_for_step(slurm, tmp_path / "sweep", 3, proc)
        urgent = slurm.sbatch("#!/bin/bash\ntrue\n", "-p", "urgent", "-J", "urgent", "-o", "/dev/null")
        out = finish(proc)
        slurm.wait_until(lambda: not slurm.jobs(), 60, "the jobs to leave the queue")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert slurm.job(urgent)["JobState"] == "COMPLETED"
    run = point(slurm, tmp_path, job, run_dirs(tmp_path / "sweep")[0])
    assert "DUE TO PREEMPTION" in run["log"]
    assert_saved_requeued_resumed(run, "SIGTERM", straight_and_usr2[0]["run_dir"])


@pytest.mark.slurm
def test_a_job_at_its_time_limit_saves_and_is_requeued_before_the_kill(slurm, small, tmp_path):
    """A 1-minute limit with submitit's --signal=USR2@5. slurmctld looks at time limits every 30 s and sends the
    signal at the first look that is less than 30 s + 5 s before the limit: 25-55 s after the start (after the
    trainer's startup), at least 30 s before the look that kills the job (60-90 s)."""
    proc = sweep(slurm, [*tiny_run(small, tmp_path, 10**6), "trainer.epochs=100000", "hydra.launcher.timeout_min=1",
                         "hydra.launcher.signal_delay_s=5", "hydra.launcher.max_num_timeout=3"], "limit")
    try:
        job = job_id_of(slurm, "limit")
        slurm.wait_until(lambda: "resuming from" in job_log(tmp_path, job), 150, "the requeued job to resume",
                         interval=0.5)
        log, info = job_log(tmp_path, job), slurm.job(job)
    finally:
        slurm.cancel_all()
        proc.kill()  # it would wait for the cancelled job's result (without sacct, submitit cannot tell it is gone)
        proc.wait()
    saved = re.findall(r"stopped: received SIGUSR2: saved the checkpoint at step (\d+)", log)
    assert len(saved) == 2 and len(set(saved)) == 1, log[-3000:]
    assert "this job is timed-out" in log and "Requeued job" in log, log[-3000:]  # submitit's view of it
    assert info["Restarts"] == "1" and info["JobState"] in ("RUNNING", "COMPLETING"), info
    assert "DUE TO TIME LIMIT" not in log  # slurmstepd's message when it kills a job at its limit
    (run_dir,) = run_dirs(tmp_path)
    assert re.search(rf"resuming from {re.escape(str(run_dir / 'last.pth'))} at epoch \d+, step {saved[0]}\n", log)


@pytest.mark.slurm
def test_srun_with_two_tasks_trains_as_two_ranks_in_one_run_dir(slurm, small, tmp_path):
    proc = slurm.run(["srun", "-n", "2", "-J", "srun2", PY, str(ROOT / "train.py"), *tiny_run(small, tmp_path, 6)],
                     cwd=ROOT, timeout=180)
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6, proc.stdout[-3000:]
    assert "| 2 rank(s) |" in proc.stdout


@pytest.mark.slurm
def test_torchrun_in_an_sbatch_job_saves_on_the_steps_signal_and_the_job_requeues_itself(slurm, small, tmp_path):
    """scripts/slurm_torchrun.sbatch: USR1 to the step (what its --signal=USR1@120 sends) reaches the trainers
    through torchrun's agent, they save, the script requeues the job and the rerun resumes. Without the agent's
    --signals-to-handle, USR1 kills the agent and slurmstepd the trainers (with proctrack/cgroup), unsaved."""
    out = tmp_path / "job.out"
    job = slurm.sbatch((ROOT / "scripts" / "slurm_torchrun.sbatch").read_text(), "--gpus-per-node=0", "--mem=4G",
                       "--cpus-per-task=2", "-J", "torchrun", "-o", str(out), args=tiny_run(small, tmp_path, 30),
                       cwd=ROOT, env={**slurm.env, "PYTHON": PY, "NPROC_PER_NODE": "2"})
    wait_for_step(slurm, tmp_path, 3)
    slurm.run(["scancel", "--signal=USR1", job])
    info = slurm.wait_final(job, 180)
    log = out.read_text(errors="replace")
    saved = re.findall(r"stopped: received SIGUSR1: saved the checkpoint at step (\d+)", log)
    assert len(saved) == 2 and len(set(saved)) == 1, log[-3000:]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    (run_dir,) = run_dirs(tmp_path)
    assert re.search(rf"resuming from {re.escape(str(run_dir / 'last.pth'))} at epoch \d+, step {saved[0]}\n", log)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 30


PLAIN_SCRIPT = """#!/bin/bash
#SBATCH --ntasks-per-node=2 --cpus-per-task=1
{py} {train} {args}
"""


@pytest.mark.slurm
def test_a_plain_python_in_a_two_task_sbatch_script_is_one_process(slurm, small, tmp_path):
    """No srun: the batch script is one process, whatever SLURM_NTASKS says; also when it was submitted from an
    `srun` session, whose step variables it inherits."""
    jobs = {}
    for how in ("sbatch", "from-a-step"):
        runs = tmp_path / how
        script = PLAIN_SCRIPT.format(py=PY, train=ROOT / "train.py", args=shlex.join(tiny_run(small, runs, 3)))
        if how == "sbatch":
            jobs[how] = slurm.sbatch(script, "-J", "plain", "-o", str(tmp_path / f"{how}.out"), cwd=ROOT)
        else:
            path = tmp_path / "plain.sh"
            path.write_text(script)
            jobs[how] = slurm.run(["srun", "-n", "1", "-J", "submitter", "sbatch", "--parsable", "-J", "plain",
                                   "-o", str(tmp_path / f"{how}.out"), str(path)], cwd=ROOT).stdout.strip()
    for how, job in jobs.items():
        info = slurm.wait_final(job, 150)  # a process waiting for a second rank would sit here until the timeout
        log = (tmp_path / f"{how}.out").read_text(errors="replace")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
        (run_dir,) = run_dirs(tmp_path / how)
        assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 1
        assert "| 1 rank(s) |" in log


@pytest.mark.slurm
def test_a_rank_killed_mid_epoch_fails_the_job_within_the_timeout_and_a_rerun_resumes(slurm, small, tmp_path):
    cmd = ["srun", "-n", "2", "-J", "kill9", PY, str(ROOT / "train.py"), *tiny_run(small, tmp_path, 60),
           "trainer.ckpt_every_steps=2", "trainer.dist_timeout_s=30"]
    proc = background(slurm, cmd, "kill9")
    try:
        wait_for_step(slurm, tmp_path, 8, proc)  # mid-epoch 2, a checkpoint at step 6 at least
        job = slurm.jobs("kill9")[0]["id"]
        pids = slurm.run(["scontrol", "listpids", job]).stdout.splitlines()[1:]
        rank_1 = [int(p.split()[0]) for p in pids if p.split()[4] == "1" and "train.py" in _cmdline(p.split()[0])]
        killed_at = time.monotonic()
        os.kill(rank_1[0], signal.SIGKILL)
        out = finish(proc, timeout=60)
        failed_after = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and failed_after < 30 + 15, (failed_after, out[-3000:])
    stopped_at = load_state(run_dirs(tmp_path)[0] / "last.pth")["progress"]["global_step"]
    assert 6 <= stopped_at < 60
    rerun = slurm.run(cmd, cwd=ROOT, timeout=180)
    (run_dir,) = run_dirs(tmp_path)
    assert f"resuming from {run_dir / 'last.pth'} at epoch" in rerun.stdout, rerun.stdout[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 60


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""
