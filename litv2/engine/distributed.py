"""Process-group setup and the few collectives the engine needs.

One code path for: a single process, ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set, one or
many nodes), and the tasks of an ``srun`` step (SLURM_PROCID / SLURM_NTASKS, e.g. Hydra's submitit
launcher with tasks_per_node = GPUs). NCCL on GPUs, gloo on CPU. See docs/distributed.md.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    died, or rank 0 is still listing a dataset) fails instead of hanging; None keeps torch's default.
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
        timeout = None if timeout_s is None else datetime.timedelta(seconds=float(timeout_s))
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                device_id=dev if use_cuda else None, timeout=timeout)
    return DistInfo(rank, local_rank, world_size, dev)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


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


def sync_buffers(model: torch.nn.Module, info: DistInfo):
    """Give every rank rank 0's buffers (BatchNorm running stats) so evaluation is rank-independent."""
    if info.distributed:
        for b in model.buffers():
            dist.broadcast(b, src=0)
