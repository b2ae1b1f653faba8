"""Process-group setup and the few collectives the engine needs.

One code path for: a single process, ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set, one or
many nodes), and SLURM tasks (SLURM_PROCID / SLURM_NTASKS, e.g. Hydra's submitit launcher with
tasks_per_node = GPUs). NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

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


def _slurm_env_to_torchrun_env():
    """Under `srun` / submitit with several tasks (one per GPU), export torchrun's variables from SLURM's."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.slurm.slurm import SlurmJobEnvironment  # parses SLURM_JOB_NODELIST (gpu[07-08] -> gpu07, gpu08)

    env = SlurmJobEnvironment()
    os.environ.setdefault("MASTER_ADDR", env.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(20000 + int(env.job_id.split("_")[0]) % 20000))
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.num_tasks // env.num_nodes))


def init_distributed(device: str = "auto") -> DistInfo:
    _slurm_env_to_torchrun_env()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                device_id=dev if use_cuda else None)
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
