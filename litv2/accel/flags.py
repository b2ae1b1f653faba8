"""Switches for the acceleration layer's CPU paths (for ablations and A/B runs) and counts of the paths taken."""
from __future__ import annotations

from collections import Counter


class Flags:
    cpu_fast_paths = True  # the master switch of the CPU paths below
    onednn = True  # linears as oneDNN 1x1 convs, fused dwconv + GELU at inference
    packed_weights = True  # oneDNN's blocked weight layout, made once per weight (fp32 inference)
    dtm_resample = True  # the deformable conv as bilinear resampling + a strided conv
    dtm_embedding_bag = True  # eager CPU resampling by embedding_bag (False: grid_sample, as compiled / on GPUs)
    chunk_bytes = 16 << 20  # CPU inference runs a stage's batch in chunks of this much hidden map; 0: no chunks


def cpu_fast_paths(enabled: bool | None = None) -> bool:
    """Get (or set) whether accelerated modules take the CPU fast paths."""
    if enabled is not None:
        Flags.cpu_fast_paths = bool(enabled)
    return Flags.cpu_fast_paths


# path name -> calls that took it (eager calls only; what runs under torch.compile is inductor's)
stats: Counter = Counter()


def taken(path: str) -> None:
    stats[path] += 1
