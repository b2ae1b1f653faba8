"""train.py with a fault injected, for the tests: ``python tests/fault_train.py <train.py args>`` (also under torchrun).

``LITV2_FAULT`` says what goes wrong and where, ``<what>@<step>[:<rank>]``: at the optimizer step ``<step>`` (1-based)
of rank ``<rank>`` (every rank if omitted)

- ``raise``: a RuntimeError, as a bug, an out-of-memory or a backend error would;
- ``interrupt``: SIGINT to this process (Ctrl-C);
- ``hang``: the rank stops in a long sleep outside any collective (e.g. a slow validation);

and ``LITV2_FAULT_SAVE`` makes a checkpoint save fail with ENOSPC. ``LITV2_SAMPLE_LOG=<folder>`` records which records
(data=shards) each rank trained on: ``<folder>/rank<r>.jsonl``, one row ``{"epoch", "step", "ids"}`` per optimizer step.
Not a test module.
"""
import errno
import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def install(spec: str) -> None:
    import litv2.engine.trainer as trainer

    for one in spec.split(","):
        _install_one(one)


def _install_one(spec: str) -> None:
    import litv2.engine.trainer as trainer

    what, _, where = spec.partition("@")
    step, _, rank = where.partition(":")
    step = int(step)
    if rank and int(rank) != _rank():
        return
    real = trainer._optimizer_step

    def faulty(run, found_inf):
        if run.progress.global_step + 1 == step:
            if what == "raise":
                raise RuntimeError(f"injected fault at step {step} on rank {_rank()}")
            if what == "interrupt":
                os.kill(os.getpid(), signal.SIGINT)
            if what == "hang":
                time.sleep(600)
        return real(run, found_inf)

    trainer._optimizer_step = faulty


def install_save_failure() -> None:
    import litv2.engine.checkpoint as ckpt

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ckpt.torch.save = no_space


def install_sample_log(folder: str) -> None:
    """Training records carry their index from the loader workers to the main process, which writes the indices of
    each step's micro-batches once the step is taken (a step cut short by a kill is not recorded)."""
    import json

    import litv2.data.builder as builder
    import litv2.data.shards as shards
    import litv2.engine.trainer as trainer

    real_getitem, real_device_loader, real_step = shards.ShardDataset.__getitem__, builder._device_loader, \
        trainer._optimizer_step
    pending = []
    log = open(Path(folder) / f"rank{_rank()}.jsonl", "a")

    def getitem(self, key):
        img, target = real_getitem(self, key)
        return (img, (target, key[0])) if self.split == "train" else (img, target)

    class Strip:
        def __init__(self, loader):
            self.loader, self.dataset = loader, loader.dataset

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for images, targets, skipped in self.loader:
                if targets is not None:
                    targets, ids = targets
                    pending.extend(ids.tolist())
                yield images, targets, skipped

    def device_loader(loader, data_cfg, device, aug_cfg=None):
        return real_device_loader(Strip(loader) if aug_cfg is not None else loader, data_cfg, device, aug_cfg)

    def step(run, found_inf):
        out = real_step(run, found_inf)
        log.write(json.dumps({"epoch": run.progress.epoch, "step": run.progress.global_step + 1, "ids": pending}) + "\n")
        log.flush()
        pending.clear()
        return out

    shards.ShardDataset.__getitem__, builder._device_loader, trainer._optimizer_step = getitem, device_loader, step


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if os.environ.get("LITV2_FAULT"):
        install(os.environ["LITV2_FAULT"])
    if os.environ.get("LITV2_FAULT_SAVE"):
        install_save_failure()
    if os.environ.get("LITV2_SAMPLE_LOG"):
        install_sample_log(os.environ["LITV2_SAMPLE_LOG"])
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
