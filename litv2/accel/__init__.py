"""How LITv2 is computed faster, never what: applied to a built model explicitly and reversibly.

    model = timm.create_model("litv2_s")   # the paper's model (litv2.models), plain torch ops
    litv2.accel.accelerate(model)          # in place: the same parameters, outputs within float rounding
    litv2.accel.restore(model)             # the plain modules again (FX, TorchScript, export)

What :func:`accelerate` swaps in (``litv2.accel.modules``):

* CPU kernels (eager): linears over channels-last maps as oneDNN 1x1 convs, ConvFFN's depthwise conv + GELU as
  one oneDNN kernel at inference, conv weights kept in oneDNN's blocked layout at fp32 inference
  (:mod:`~litv2.accel.onednn`); the DTM's deformable conv as bilinear resampling + a strided conv
  (:mod:`~litv2.accel.dtm`, also under ``torch.compile`` on any device); stage blocks over the batch in chunks at
  inference.
* Training memory: ConvFFN recomputes its GELU output (``recompute_gelu``, on by default) and optionally its
  depthwise-conv output (``recompute_dwconv``) in backward instead of keeping them (:mod:`~litv2.accel.recompute`).

``Flags`` switches single CPU paths off (``cpu_fast_paths(False)``: all of them) and ``stats`` counts the calls that
took each; the private torch APIs all of this uses are in :mod:`~litv2.accel._internals`, behind a version check.
:func:`keep_freed_memory` is the glibc malloc setting for CPU runs (``trainer.cpu_keep_freed_memory``).
The engine applies all of it from the config (``model.accel=auto|none``, ``model.recompute_gelu``,
``model.recompute_dwconv``).
"""
from .flags import Flags, cpu_fast_paths, stats
from .malloc import keep_freed_memory
from .modules import accelerate, is_accelerated, restore

__all__ = ["Flags", "accelerate", "cpu_fast_paths", "is_accelerated", "keep_freed_memory", "restore", "stats"]
