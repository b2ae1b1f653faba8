"""A private one-node SLURM cluster for the tests (not a test module; tests/test_slurm.py uses it).

munged, slurmctld and slurmd from Debian's slurm-wlm, with their key, socket, config, state and logs in one
temporary directory and their own ports, so they touch no system-wide SLURM or munge. Every CPU of this machine
is one partition ``debug`` that up to 4 jobs share (OverSubscribe=FORCE:4), so the jobs of a sweep run at the
same time; a job in partition ``urgent`` takes the whole node and preempts them (requeue). Needs root (slurmd
starts the jobs) and ``apt-get install -y slurm-wlm``; .ci/run installs it.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
# Terminal states of a job that is not going to run again (a requeued job passes through REQUEUED, PENDING).
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def unavailable() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"SLURM tests skipped: {', '.join(missing)} not found; to run them install Debian's slurm-wlm "
                f"as root (apt-get update && apt-get install -y slurm-wlm), as .ci/run does")
    if os.geteuid() != 0:
        return "SLURM tests skipped: they start slurmd, which needs root (run pytest as root, as CI does)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """start() / stop() the daemons; run SLURM's commands against them; look at jobs."""

    def __init__(self, root: Path, env: dict | None = None):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**(env if env is not None else os.environ), "SLURM_CONF": str(self.conf)}
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if k != "SLURM_CONF":
                del self.env[k]  # pytest itself may run inside a job of some other cluster
        self._pids: dict[str, int] = {}
        self.freezer = Path("/sys/fs/cgroup/freezer")
        # A step's processes live in its cgroup, as on most clusters: when a step's task exits, slurmstepd kills
        # what it left behind (torchrun's trainers, once the agent is gone). linuxproc, where cgroup v1's freezer
        # is not mounted (slurm 22.05's cgroup v2 wants systemd), loses track of orphaned processes.
        self.proctrack = ("ProctrackType=proctrack/cgroup" if self.freezer.is_dir()
                          else "ProctrackType=proctrack/linuxproc")

    # ---- daemons -------------------------------------------------------------------------------------------

    def _write_config(self):
        munge, state, spool, log = (self.root / d for d in ("munge", "state", "spool", "log"))
        for d in (munge, state, spool, log):
            d.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld_port, d_port = _free_ports(2)
        if self.freezer.is_dir():
            (self.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n")
        mem_mb = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]) // 1024
        self.conf.write_text(f"""\
ClusterName=pytest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long (default 120 s) before it may start again
AuthInfo=socket={munge}/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={log}/slurmctld.log
SlurmdLogFile={log}/slurmd.log
{self.proctrack}
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
# finished jobs stay visible to scontrol for 10 minutes (there is no accounting database for sacct)
MinJobAge=600
# look at pending jobs every second (a requeued job starts as soon as it may), not every 30-60 s
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=10
# A job in "urgent" preempts the "debug" jobs on its node: SIGTERM, KillWait seconds to stop, SIGKILL, requeue.
# (With a GraceTime, a job that stops within it is not requeued.)
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_mb * 3 // 4} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4 PriorityTier=1
PartitionName=urgent Nodes={self.node} MaxTime=INFINITE State=UP OverSubscribe=EXCLUSIVE PriorityTier=2
""")

    def _start_controller(self):
        """munged and slurmctld, on the config ``_write_config`` wrote."""
        munge = self.root / "munge"
        self._daemon("munged", [_binary("munged"), "--force", f"--socket={munge}/munge.socket",
                                f"--key-file={munge}/munge.key", f"--log-file={munge}/munged.log",
                                f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed"],
                     munge / "munged.pid")
        self._daemon("slurmctld", [_binary("slurmctld"), "-f", str(self.conf)], self.root / "slurmctld.pid")

    def start(self, timeout: float = 60):
        self._write_config()
        self._start_controller()
        self._daemon("slurmd", [_binary("slurmd"), "-f", str(self.conf), "-N", self.node], self.root / "slurmd.pid")
        self.wait_until(lambda: self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() == "idle",
                        timeout, "the node to come up idle")

    def _daemon(self, name: str, cmd: list[str], pid_file: Path, timeout: float = 20):
        """Start a daemon (it forks into the background and writes its pid file)."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} did not start: {proc.stderr.strip()}\n{self.logs()}")
        self.wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout, f"{name}'s pid file")
        self._pids[name] = int(pid_file.read_text().split()[0])

    def stop(self, timeout: float = 30):
        """Cancel whatever is still queued, then stop the daemons this object started (slurmd first)."""
        try:
            self.cancel_all(timeout)
        finally:
            _terminate([self._pids.pop(name) for name in reversed(DAEMONS) if name in self._pids], timeout)
            for d in sorted(self.freezer.glob(f"slurm_{self.node}/**/"), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()  # the (empty) cgroups slurmd made for the jobs
                except OSError:
                    pass

    def logs(self, lines: int = 30) -> str:
        out = []
        for f in sorted(self.root.glob("log/*.log")) + sorted(self.root.glob("munge/*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # ---- commands and jobs ---------------------------------------------------------------------------------

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, script: str, *options: str, args=(), cwd: Path | None = None, env: dict | None = None) -> str:
        """Submit a batch script (its text) with sbatch options and script arguments; returns the job id. The
        job runs in ``cwd``; the script file goes to the cluster's directory."""
        path = self.root / "scripts" / f"job-{time.monotonic_ns()}.sh"
        path.parent.mkdir(exist_ok=True)
        path.write_text(script)
        cmd = ["sbatch", "--parsable", *options, str(path), *args]
        return self.run(cmd, cwd=cwd or self.root, env=env or self.env).stdout.strip()

    def jobs(self, name: str | None = None, all_states: bool = False) -> list[dict]:
        """squeue's jobs (pending/running; with all_states also the recently finished), as dicts."""
        cmd = ["squeue", "-h", "-o", "%i|%j|%T|%r|%S|%e"] + (["-t", "all"] if all_states else []) + \
            (["-n", name] if name else [])
        rows = self.run(cmd).stdout.split("\n")
        return [dict(zip(("id", "name", "state", "reason", "start", "end"), r.split("|"))) for r in rows if r.strip()]

    def job(self, job_id: str) -> dict:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return {}
        line = proc.stdout.splitlines()[0]
        return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait_until(self, predicate, timeout: float, what: str, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}")
            time.sleep(interval)

    def wait_final(self, job_id: str, timeout: float) -> dict:
        """Wait until the job has ended for good; returns its scontrol fields."""
        return self.wait_until(lambda: (j := self.job(job_id)) and j.get("JobState") in FINAL and j,
                               timeout, f"job {job_id} to end")

    def cancel_all(self, timeout: float = 30):
        ids = [j["id"] for j in self.jobs()]
        if ids:
            self.run(["scancel", *ids], check=False)
            self.wait_until(lambda: not self.jobs(), timeout, "the cancelled jobs to leave the queue")


def _terminate(pids: list[int], timeout: float):
    """SIGTERM to each, then SIGKILL to those still alive after ``timeout`` seconds."""
    alive = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def session_cluster(cls, tmp_path_factory, name: str, why_not=None):
    """A fixture body: a ``cls`` cluster (``LocalSlurm`` or a subclass) under a tmp dir ``name``, running for the
    whole session (skips where ``why_not()``, by default :func:`unavailable`, gives a reason); its daemons stop at
    the end, also when pytest is sent SIGTERM (a CI timeout): it then stops as on Ctrl-C, running the teardowns."""
    reason = (why_not or unavailable)()
    if reason:
        pytest.skip(reason)
    from engine_utils import ENV

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"pytest received {signal.Signals(signum).name}")

    cluster = cls(tmp_path_factory.mktemp(name), env={**ENV, "OMP_NUM_THREADS": "1"})
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The running one-node cluster for the whole session (see :func:`session_cluster`)."""
    yield from session_cluster(LocalSlurm, tmp_path_factory, "slurm")


@pytest.fixture
def slurm(slurm_cluster):
    """The cluster, with nothing left queued after the test (a failed test's jobs are cancelled)."""
    yield slurm_cluster
    slurm_cluster.cancel_all()
