"""One live job per run dir: a lease file that rank 0 holds while it trains.

``<run dir>/.lease`` names its holder (host, PID, the process's start time, the SLURM job or torchrun run) and a
heartbeat that a thread renews every ``ttl_s / 4`` seconds. Network file systems do not make ``flock`` reliable,
so the lease needs no lock: it is created with ``O_CREAT | O_EXCL`` (atomic on NFSv3+, Lustre, GPFS), and a lease
is taken over only when it is stale, by renaming it away (only one of several contenders can) and creating a new
one. Stale means:

- its heartbeat is older than ``ttl_s`` (the holder or its host died; hosts' clocks must agree within that);
- or its holder was on this host and that process is gone (a rerun after ``kill -9`` need not wait);
- or its holder belongs to this very SLURM job or torchrun run (a requeued job, a restarted worker group).

A holder that finds its lease taken over (it stalled for longer than ``ttl_s``) stops: see :attr:`RunDirLease.lost`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from litv2.errors import UserError

log = logging.getLogger(__name__)

LEASE = ".lease"


class RunDirBusy(UserError):
    """The run dir is held by another live job."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a PID apart from its reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return start is None or _process_start(pid) in (None, start)


def job_id() -> str | None:
    """This process's job as SLURM or torchrun names it (the same across a requeue or an elastic restart)."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{os.environ['TORCHELASTIC_RUN_ID']}"
    return None


def describe(holder: dict) -> str:
    who = f"PID {holder.get('pid')} on host {holder.get('host')}"
    job = holder.get("job") or ""
    if job.startswith("slurm:"):
        who += f" (SLURM job {job[6:]})"
    age = time.time() - float(holder.get("heartbeat", 0))
    return f"{who}, alive {max(age, 0):.0f} s ago"


def read(run_dir) -> dict | None:
    """The lease's holder, {} if the file is there but unreadable (being written), None if there is none."""
    try:
        text = (Path(run_dir) / LEASE).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except json.JSONDecodeError:
        return {}


def _stale(path: Path, holder: dict, ttl_s: float) -> bool:
    if not holder:  # half written: stale once nobody has touched it for a while
        try:
            return time.time() - path.stat().st_mtime > ttl_s
        except FileNotFoundError:
            return True
    mine = job_id()
    if mine is not None and holder.get("job") == mine:
        return True
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0)), holder.get("start")):
        return True
    return time.time() - float(holder.get("heartbeat", 0)) > ttl_s


def is_held(run_dir, ttl_s: float) -> dict | None:
    """The live holder of ``run_dir``'s lease, or None if it is free (no lease, or a stale one)."""
    holder = read(run_dir)
    if holder is None or _stale(Path(run_dir) / LEASE, holder, ttl_s):
        return None
    return holder


class RunDirLease:
    """Hold ``run_dir`` for this process: :meth:`acquire`, then :meth:`release` (on every exit path)."""

    def __init__(self, run_dir, ttl_s: float = 120.0):
        self.run_dir, self.path, self.ttl_s = Path(run_dir), Path(run_dir) / LEASE, float(ttl_s)
        self.token = uuid.uuid4().hex
        self.lost: str | None = None  # set when another job took the lease over
        self._stop = threading.Event()
        self._thread = None

    def _record(self) -> dict:
        pid = os.getpid()
        return {"token": self.token, "host": socket.gethostname(), "pid": pid, "start": _process_start(pid),
                "job": job_id(), "heartbeat": time.time()}

    def acquire(self) -> "RunDirLease":
        """Take the lease or raise RunDirBusy naming its live holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read(self.run_dir)
                if holder is None:
                    continue  # released meanwhile
                if not _stale(self.path, holder, self.ttl_s):
                    who = describe(holder) if holder else "a job that is starting"
                    raise RunDirBusy(f"run dir {self.run_dir} is in use by {who}; one live job per run dir (its "
                                     f"lease: {self.path})") from None
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
                f.flush()
                os.fsync(f.fileno())
            if (read(self.run_dir) or {}).get("token") == self.token:
                self._start_heartbeat()
                return self
        raise RunDirBusy(f"run dir {self.run_dir}: could not take its lease {self.path} (other jobs keep taking it)")

    def _take_over(self, holder: dict) -> None:
        """Rename the stale lease away (of several contenders, one succeeds) and delete it."""
        aside = self.path.with_name(f"{LEASE}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if holder:
            log.warning("run dir %s: taking over the stale lease of %s", self.run_dir, describe(holder))
        aside.unlink(missing_ok=True)

    def _start_heartbeat(self):
        self._thread = threading.Thread(target=self._beat, name="litv2-run-dir-lease", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(self.ttl_s / 4):
            holder = read(self.run_dir)
            if holder is not None and holder and holder.get("token") != self.token:
                self.lost = f"run dir {self.run_dir} was taken over by {describe(holder)} while this job held it " \
                            f"(no heartbeat for {self.ttl_s:.0f} s: trainer.run_dir_lease_s)"
                return
            tmp = self.path.with_name(f"{LEASE}.tmp-{self.token}")
            try:
                tmp.write_text(json.dumps(self._record()))
                os.replace(tmp, self.path)
            except OSError as e:  # a full disk, a flaky mount: try again at the next beat
                log.warning("run dir %s: could not renew its lease (%s)", self.run_dir, e)
                tmp.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise RunDirBusy if another job took the lease over."""
        if self.lost:
            raise RunDirBusy(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this job's."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if (read(self.run_dir) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
