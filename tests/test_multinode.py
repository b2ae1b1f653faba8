"""Multi-node for real: a two-host SLURM cluster on this machine (tests/slurm_hosts.py; ``-m multinode``, skipped
without slurm-wlm or root): the submitit launcher, torchrun per node and ``srun -N 2`` train as one run of 4 ranks
over both hosts, and a run that loses a host mid-epoch ends within the collective timeout and resumes to the
uninterrupted weights."""
import json
import re
import time

import pytest

from engine_utils import ROOT, assert_same_tensors, load_state, make_digits_subset, metrics_rows
from slurm_hosts import two_hosts  # noqa: F401  (fixture)
from test_slurm import PY, background, finish, run_dirs, tiny_run, wait_for_step

pytestmark = pytest.mark.multinode

# The submitit launcher over both hosts: 2 nodes x 2 tasks (ranks) of 1 CPU, no GPU.
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2"]
STEPS = 16  # 2 steps per epoch at 4 ranks x 8 images


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from litv2.data import prepare_digits

    tmp = tmp_path_factory.mktemp("multinode-data")
    return make_digits_subset(prepare_digits(tmp / "digits"), tmp / "small", per_class_train=8, val_total=21)


def srun_4(small, runs, steps=STEPS, *extra):
    return ["srun", "-N", "2", "-n", "4", "-J", "srun4", PY, str(ROOT / "train.py"), *tiny_run(small, runs, steps),
            *extra]


def assert_one_run_of_4_ranks_over_both_hosts(runs, log: str, steps: int = STEPS):
    (run_dir,) = run_dirs(runs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] == steps and summary["global_batch"] == 32, log[-3000:]
    assert "| 4 rank(s) |" in log
    assert metrics_rows(run_dir, "val/images")[-1]["val/images"] == 21  # every val image once over 4 ranks
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(two_hosts, small, tmp_path_factory):
    """``srun -N 2 -n 4 python train.py``: 2 ranks on each host, one run dir; the reference for the lost host."""
    runs = tmp_path_factory.mktemp("srun4")
    proc = two_hosts.run(srun_4(small, runs), cwd=ROOT, timeout=300)
    return runs, proc.stdout + proc.stderr


def test_srun_over_two_hosts_trains_as_one_run_of_four_ranks(uninterrupted):
    runs, log = uninterrupted
    run_dir = assert_one_run_of_4_ranks_over_both_hosts(runs, log)
    assert (run_dir / "last.pth").exists() and not (run_dir / ".lease").exists()


def test_the_slurm_launcher_with_two_nodes_of_two_tasks(two_hosts, small, tmp_path):
    proc = background(two_hosts, [PY, str(ROOT / "train.py"), "-m", *LAUNCHER, "hydra.launcher.name=nodes2",
                                  *tiny_run(small, tmp_path, STEPS)], "nodes2")
    out = finish(proc, timeout=300)
    assert proc.returncode == 0, out[-4000:]
    logs = "".join(f.read_text(errors="replace") for f in sorted(tmp_path.rglob("*_log.*")))
    assert_one_run_of_4_ranks_over_both_hosts(tmp_path, logs)
    two_hosts.wait_until(lambda: not two_hosts.jobs("nodes2"), 60, "the job to leave the queue")
    (job,) = two_hosts.jobs("nodes2", all_states=True)
    info = two_hosts.job(job["id"])
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", info


def test_torchrun_per_node_with_a_c10d_rendezvous_on_the_first_node(two_hosts, small, tmp_path):
    """scripts/slurm_torchrun.sbatch on 2 nodes: one torchrun per host, 2 trainers each, rendezvous at node1."""
    out = tmp_path / "job.out"
    job = two_hosts.sbatch((ROOT / "scripts" / "slurm_torchrun.sbatch").read_text(), "--nodes=2", "--gpus-per-node=0",
                           "--mem=2G", "--cpus-per-task=2", "-J", "torchrun2", "-o", str(out),
                           args=tiny_run(small, tmp_path, STEPS), cwd=ROOT,
                           env={**two_hosts.env, "PYTHON": PY, "NPROC_PER_NODE": "2"})
    info = two_hosts.wait_final(job, 300)
    log = out.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", (info, log[-3000:])
    assert_one_run_of_4_ranks_over_both_hosts(tmp_path, log)


def test_a_lost_host_ends_the_run_within_the_timeout_and_a_rerun_resumes_exactly(two_hosts, small, tmp_path,
                                                                                 uninterrupted):
    """node1 (ranks 0 and 1, the rendezvous store, the checkpoint writer) vanishes mid-epoch: link down, every
    process killed. The ranks on node2 end within trainer.dist_timeout_s with a line saying what was lost; the
    checkpoints on disk are whole; with node1 back, the same command resumes from the last one and ends with the
    weights of the uninterrupted run."""
    timeout_s = 30
    cmd = srun_4(small, tmp_path, STEPS, "trainer.ckpt_every_steps=2", f"trainer.dist_timeout_s={timeout_s}")
    proc = background(two_hosts, cmd, "lost")
    try:
        wait_for_step(two_hosts, tmp_path, 7, proc, timeout=240)
        lost_at = time.monotonic()
        two_hosts.lose_host("node1")
        two_hosts.wait_until(lambda: not [p for p in two_hosts.host_pids("node2") if "train.py" in _cmdline(p)],
                             timeout_s + 30, "node2's ranks to end")
        ended_after = time.monotonic() - lost_at
        out = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"node2's ranks ended {ended_after:.1f} s after node1 was lost")  # (pytest -s shows it; docs/distributed.md)
    assert ended_after < timeout_s, (ended_after, out[-3000:])
    assert "error: lost the job's rendezvous store" in out and "rank 2 stopped too" in out, out[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    saved = load_state(run_dir / "last.pth")["progress"]["global_step"]  # whole, loadable
    assert 2 <= saved < STEPS
    if (run_dir / "last.prev.pth").exists():
        load_state(run_dir / "last.prev.pth")

    two_hosts.restore_host("node1")
    rerun = two_hosts.run(cmd, cwd=ROOT, timeout=300, check=False)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-4000:]
    assert re.search(rf"resuming from {re.escape(str(run_dir / 'last.pth'))} at epoch \d+, step {saved}\n", log), \
        log[-3000:]
    assert_one_run_of_4_ranks_over_both_hosts(tmp_path, log)
    ref_runs, _ = uninterrupted
    straight, resumed = load_state(run_dirs(ref_runs)[0] / "last.pth"), load_state(run_dir / "last.pth")
    assert resumed["progress"]["global_step"] == straight["progress"]["global_step"] == STEPS
    assert_same_tensors(straight["model"], resumed["model"])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
