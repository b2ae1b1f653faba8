"""Process-group setup and the few collectives the engine needs.

One code path for: a single process, ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set, one or
many nodes), and the tasks of an ``srun`` step (SLURM_PROCID / SLURM_NTASKS, e.g. Hydra's submitit
launcher with tasks_per_node = GPUs). NCCL on GPUs, gloo on CPU. See docs/distributed.md.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def in_srun_step() -> bool:
    """Whether this process is a task of an ``srun`` step (submitit's jobs are one).

    Only step tasks are ranks: an sbatch script or an salloc shell also sees SLURM_NTASKS (the job's task
    count), but it is one process, and treating it as one of N would wait for ranks that never come. srun sets
    SLURM_STEP_ID and SLURM_STEP_NUM_TASKS in its tasks, and SLURM_NTASKS to the step's count. A batch script
    submitted from inside a step (an ``srun --pty bash`` session) inherits that step's SLURM_STEP_* variables
    but gets its own job's SLURM_NTASKS, hence the comparison.
    """
    env = os.environ
    return "SLURM_STEP_ID" in env and env.get("SLURM_STEP_NUM_TASKS") == env.get("SLURM_NTASKS")


def slurm_master_port() -> int:
    """The rendezvous port of this SLURM job: MASTER_PORT if set, else one derived from SLURM_JOB_ID.

    SLURM_JOB_ID is unique per job and per array task (an array shares SLURM_ARRAY_JOB_ID only), and job ids are
    consecutive, so jobs whose ids are less than 40,000 apart never get the same port on a shared node.
    """
    from submitit.slurm.slurm import SlurmJobEnvironment

    if "MASTER_PORT" in os.environ:
        return int(os.environ["MASTER_PORT"])
    return 20000 + int(SlurmJobEnvironment().raw_job_id) % 40000


def _slurm_env_to_torchrun_env():
    """In an srun step of several tasks (one per GPU; submitit's jobs too), export torchrun's variables from
    SLURM's, parsed by submitit (SLURM_JOB_NODELIST gpu[07-08] -> gpu07, gpu08). Under torchrun (RANK set) or
    outside a step, nothing changes."""
    if "RANK" in os.environ or not in_srun_step() or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.slurm.slurm import SlurmJobEnvironment

    env = SlurmJobEnvironment()
    os.environ.setdefault("MASTER_ADDR", env.hostnames[0])
    os.environ["MASTER_PORT"] = str(slurm_master_port())
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.num_tasks // env.num_nodes))


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device of the process with this LOCAL_RANK, given how many devices it sees.

    A task that sees every GPU of its node (torchrun, ``srun --gpus-per-node``) takes the one at its local rank;
    one that SLURM bound to its own GPU(s) (``--gpus-per-task=1``, ``--gpu-bind``, CUDA_VISIBLE_DEVICES of one
    device) sees only those, numbered from 0, and takes ``local_rank % visible_devices`` of them.
    """
    if visible_devices < 1:
        raise RuntimeError("CUDA is available but this process sees no CUDA device (CUDA_VISIBLE_DEVICES)")
    return local_rank % visible_devices


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """This process's rank and device; joins the process group when there are several ranks.

    ``timeout_s`` bounds every collective (trainer.dist_timeout_s): a rank that waits longer for the others (one
    died, or rank 0 is still listing a dataset) fails instead of hanging; None keeps torch's default. With several
    ranks, a :class:`FailureWatch` on the job's rendezvous store ends this rank within seconds of another one's
    failure (see :func:`failure_watch`).
    """
    _slurm_env_to_torchrun_env()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", cuda_device_index(local_rank, torch.cuda.device_count())) if use_cuda \
        else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(timeout_s)) if timeout_s is not None \
            else dist.constants.default_pg_timeout
        # the env:// rendezvous init_process_group would do (its store: the failure watch's fallback)
        store, rank, world_size = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
        store.set_timeout(timeout)
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world_size,
                                device_id=dev if use_cuda else None, timeout=timeout)
        global _watch
        _watch = FailureWatch(_watch_client(store), rank)
    return DistInfo(rank, local_rank, world_size, dev)


def _watch_client(store):
    """A connection of the failure watch's own to the rendezvous store, with a short timeout: a store whose host
    vanished (no connection closed) must not keep the watch waiting for the whole collective timeout."""
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=FailureWatch.STORE_TIMEOUT_S),
                             wait_for_workers=False)
    except Exception as e:  # (not a TCP store: share the rendezvous store's connection)
        log.debug("failure watch on the rendezvous store's connection (%s)", e)
        return store


def cleanup(completed: bool = True):
    """Stop the failure watch and leave the process group. After a completed job the ranks meet once more first:
    rank 0 may host the store, and no rank's watch may see it go away as a failure."""
    global _watch
    watch, _watch = _watch, None
    if watch is not None:
        watch.stop()
    if dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()


# ---- a failed rank ends the job --------------------------------------------------------------------------------

class RankFailed(Exception):
    """Another rank of this job failed, and this one stopped because of it; the message names that rank and its
    error (its traceback is in that rank's output)."""


def collective_error(e: BaseException) -> bool:
    """Whether ``e`` is a collective or the store failing (a lost peer, a timeout), not this rank's own fault."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection closed by peer",
                                                                   "Connection reset by peer", "Timed out waiting"))


class FailureWatch:
    """News of a failed rank, out of band: through the job's rendezvous store, not the collectives.

    A collective waits for every rank: after one rank fails, the others would wait in theirs until
    ``trainer.dist_timeout_s`` (NCCL), or sit wherever they are (a long validation) until a launcher kills them,
    and srun does not. So a rank that fails says so in the store first (:meth:`announce`), and a thread on every
    rank polls the store every ``poll_s``: on another rank's failure, or when the store itself is gone (its host,
    rank 0 or torchrun's agent, died: ``LOST_AFTER`` polls in a row that got no answer within ``STORE_TIMEOUT_S``),
    it gives the main thread ``grace_s`` to end on its own (gloo collectives
    fail at once when a peer's connection closes), then prints one line and ends the process, loader workers
    included. The keys carry torchrun's restart count: an elastic restart does not see the last attempt's news.
    """

    STORE_TIMEOUT_S = 3.0  # one poll's longest wait for the store
    LOST_AFTER = 3         # polls in a row without the store before it counts as lost

    def __init__(self, store, rank: int, poll_s: float = 1.0, grace_s: float = 5.0):
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"litv2/{attempt}/", store)
        self.rank, self.poll_s, self.grace_s = rank, poll_s, grace_s
        self.on_abort: list = []  # last things to do before the watch ends the process (e.g. release a lease)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="litv2-failure-watch", daemon=True)
        self._thread.start()

    def _call(self, fn, *args):
        """``fn(*args)``, given up after ``STORE_TIMEOUT_S`` with TimeoutError: a store whose host vanished without
        closing its connections never answers, and TCPStore's own timeout does not cover that (the call is left to
        its daemon thread)."""
        box = {}

        def call():
            try:
                box["value"] = fn(*args)
            except BaseException as e:  # noqa: BLE001  (handed to the caller)
                box["error"] = e

        thread = threading.Thread(target=call, name="litv2-store-call", daemon=True)
        thread.start()
        thread.join(self.STORE_TIMEOUT_S)
        if thread.is_alive():
            raise TimeoutError(f"no answer within {self.STORE_TIMEOUT_S:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def announce(self, exc: BaseException) -> None:
        """Tell the other ranks that this one failed with ``exc`` (the first failure of the job is kept)."""
        what = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
        try:
            if self._call(self.store.add, "failures", 1) == 1:
                self._call(self.store.set, "failure", json.dumps({"rank": self.rank, "host": socket.gethostname(),
                                                                  "error": what}))
        except Exception:  # the store is gone too: the others learn it from that
            pass

    def peer_failure(self) -> str | None:
        """A line naming another rank's failure, or the loss of the store; None if neither."""
        news = self._read()
        return None if news is None else news[1]

    def _read(self):
        try:
            if not self._call(self.store.check, ["failure"]):
                return None
            news = json.loads(self._call(self.store.get, "failure"))
        except Exception as e:
            return "lost", f"lost the job's rendezvous store ({type(e).__name__}: {e}): the process that hosted it " \
                           f"(rank 0 or torchrun's agent) or its node has gone"
        if news["rank"] == self.rank:
            return None
        return "failed", f"rank {news['rank']} (host {news['host']}) failed: {news['error']}"

    def _run(self):
        unreachable = 0
        while not self._stop.wait(self.poll_s):
            news = self._read()
            unreachable = unreachable + 1 if news is not None and news[0] == "lost" else 0
            if news is None or 0 < unreachable < self.LOST_AFTER:  # unreachable for LOST_AFTER polls in a row
                continue
            if self._stop.wait(self.grace_s):  # the main thread ended the rank on its own
                return
            # (on a line of its own: a progress bar may hold the current one)
            print(f"\nerror: {news[1]}; rank {self.rank} stopped too", file=sys.stderr, flush=True)
            for fn in self.on_abort:
                try:
                    fn()
                except Exception:
                    pass
            _end_child_processes()
            os._exit(1)

    def stop(self):
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.poll_s + 5)


_watch: FailureWatch | None = None


def failure_watch() -> FailureWatch | None:
    """This process's watch (multi-rank jobs only)."""
    return _watch


def _end_child_processes():
    """Kill this process's multiprocessing children (loader workers ignore SIGTERM)."""
    import multiprocessing

    for p in multiprocessing.active_children():
        p.kill()
    deadline = time.monotonic() + 2.0
    for p in multiprocessing.active_children():
        p.join(max(0.0, deadline - time.monotonic()))


def broadcast_object(obj, info: DistInfo):
    """rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier(info: DistInfo):
    if info.distributed:
        dist.barrier()


def rank_ordered_mean(state, bucket):
    """DDP communication hook: each gradient's mean over the ranks, summed in rank order (an all-gather, then the
    sum here). An all-reduce over more than two ranks sums an element in an order that depends on where it falls
    in its bucket, and DDP lays its buckets out again after a process's first step: a resumed run would round its
    first step differently from an uninterrupted one. ``state``: the process group, or None for all ranks."""
    group = state if state is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    grad = bucket.buffer()
    parts = [torch.empty_like(grad) for _ in range(world)]
    gathered = dist.all_gather(parts, grad, group=group, async_op=True).get_future()

    def mean(_):
        total = parts[0].clone()
        for part in parts[1:]:
            total.add_(part)
        return total.div_(world)

    return gathered.then(mean)


def sync_buffers(model: torch.nn.Module, info: DistInfo):
    """Give every rank rank 0's buffers (BatchNorm running stats) so evaluation is rank-independent."""
    if info.distributed:
        for b in model.buffers():
            dist.broadcast(b, src=0)
