"""The accelerated LITv2 modules and :func:`accelerate` / :func:`restore`, which swap them in and out.

Each accelerated class is a subclass of the plain one with only ``forward`` replaced: the same parameters, buffers,
state-dict keys and hooks, and outputs equal to the plain module's up to float rounding. :func:`accelerate` changes
the class of the modules of a built model in place (as ``torch.nn.utils.parametrize`` does), :func:`restore`
changes it back.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from litv2.models.litv2 import ConvFFN, DeformConv2d, PatchEmbed, Stage

from . import dtm, onednn
from .flags import Flags, taken
from .recompute import DWConvRecompute, recompute_when_saved, saved_tensor_hooks_active


class _PackedWeights:
    """Setting the mode (``train()`` / ``eval()``) drops the module's cached oneDNN-blocked weights: a fused
    optimizer updates weights in place without bumping their version, which the cache could not see."""

    def _packed(self) -> tuple[nn.Module, ...]:
        return (self,)

    def train(self, mode: bool = True):
        for m in self._packed():
            onednn.forget_packed(m)
        return super().train(mode)


class FastLinear(_PackedWeights, nn.Linear):
    """On a CPU ``(B, H, W, C)`` map: a 1x1 conv of its channels-last view (oneDNN; fp32 inference takes the
    cached blocked weight). Elsewhere ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn.linear(self, x)


class FastConvFFN(_PackedWeights, ConvFFN):
    """At CPU inference the depthwise conv + GELU run as one oneDNN kernel. In training, with
    ``recompute_gelu`` / ``recompute_dwconv``, the GELU output / the depthwise conv's output are not kept for the
    backward pass but recomputed there (one, then a second, hidden-width map per block less memory; bitwise the
    same gradients while the conv kernel is deterministic, as on CPU and cuDNN's forward algorithms).

    The recomputes stand aside under ``torch.compile`` (inductor chooses what to recompute itself), tracing,
    export, other saved-tensor hooks (activation checkpointing recomputes the whole block anyway) or hooks
    switched off (``torch.func``), for tensor subclasses and with FFN dropout. A depthwise conv with forward hooks
    or a parametrized weight keeps its output (the rerun would skip the hooks, or run them twice). The depthwise
    ``Conv2d`` is called directly, so hooks on the ``DWConv`` wrapper do not run (hooks on ``dwconv.dwconv`` do, and
    keep it off the fused kernel).
    """

    recompute_gelu: bool = True
    recompute_dwconv: bool = False

    def _packed(self) -> tuple[nn.Module, ...]:
        return (self.dwconv.dwconv,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self._recomputes(x):
            return self._forward_recomputing(x)
        x = x.permute(0, 3, 1, 2)  # every path runs the conv and GELU on this (channels-last) view
        y = onednn.dwconv_gelu(x, self.dwconv.dwconv) if self._exact_gelu() else None
        x = self.act(self.dwconv.dwconv(x)) if y is None else y  # (fc1's output is freed here)
        del y
        return self.drop(self.fc2(self.drop(x.permute(0, 2, 3, 1))))

    def _exact_gelu(self) -> bool:
        return type(self.act) is nn.GELU and self.act.approximate == "none"

    def _recomputes(self, x: torch.Tensor) -> bool:
        return ((self.recompute_gelu or self.recompute_dwconv) and self.drop.p == 0 and torch.is_grad_enabled()
                and x.requires_grad and type(x) is torch.Tensor and self._exact_gelu()
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and not torch.compiler.is_exporting() and not saved_tensor_hooks_active())

    def _forward_recomputing(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.permute(0, 3, 1, 2)
        y = self.dwconv.dwconv(xc)
        if self.recompute_dwconv and DWConvRecompute.applies(self.dwconv.dwconv):
            taken("recompute_dwconv")
            conv = DWConvRecompute(self.dwconv.dwconv, xc)
            with recompute_when_saved(y, conv.take):
                g = self.act(y)
            del y  # the recipes below must not hold it

            def remake_g():
                return self.act(conv.keep())
        else:
            g = self.act(y)

            def remake_g():
                return self.act(y)
        if not self.recompute_gelu:
            return self.fc2(g.permute(0, 2, 3, 1))
        taken("recompute_gelu")
        with recompute_when_saved(g, remake_g):
            return self.fc2(g.permute(0, 2, 3, 1))


class FastDeformConv2d(_PackedWeights, DeformConv2d):
    """On CPU (eager) and under ``torch.compile`` (any device): the deformable conv as resampling + a strided
    conv (:mod:`litv2.accel.dtm`). Under autocast the sampling runs in fp32; compiled, the strided conv after it
    follows autocast like any conv, eager the whole deformable conv runs in fp32, as torchvision's does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(x)
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            if torch.compiler.is_compiling() and dtm.resampled_dtm_ok(x):
                return dtm.resample_and_conv(x.float(), offset.float(), self.weight, self.bias, self.stride,
                                             self.padding)
            with torch.autocast(device_type=device, enabled=False):
                return dtm.deform_conv2d_resampled(x.float(), offset.float(), self.weight.float(),
                                                   self.bias.float(), self.stride, self.padding)
        return dtm.deform_conv2d_resampled(x, offset, self.weight, self.bias, self.stride, self.padding, self)


class FastStage(Stage):
    """At CPU inference the blocks (all per-sample) run the batch in chunks whose widest activation (the FFN's
    hidden map) stays within ``Flags.chunk_bytes``: the maps stay cache-sized, and no allocation is big enough for
    glibc to map it afresh from the kernel on every call."""

    widest: int = 0  # widest activation of the blocks, in channels (set by accelerate)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self.inference_chunk(x)
        if chunk < x.shape[0]:  # equal chunks: ceil(B / chunk) of them
            taken("batch_chunks")
            return torch.cat([super(FastStage, self).forward_blocks(part)
                              for part in x.tensor_split(-(-x.shape[0] // chunk))])
        return super().forward_blocks(x)

    def inference_chunk(self, x: torch.Tensor) -> int:
        """Samples per chunk: ``B`` (no chunks) unless at eager CPU inference; then the most samples whose widest
        activation fits in ``Flags.chunk_bytes``, at least one."""
        B = x.shape[0]
        if B < 2 or not Flags.chunk_bytes or not onednn.eager_cpu(x) or not onednn.no_grad_needed(x):
            return B
        per_sample = x.shape[1] * x.shape[2] * self.widest * x.element_size()
        return max(1, min(B, Flags.chunk_bytes // max(per_sample, 1)))


class FastPatchEmbed(PatchEmbed):
    """The patch conv on a channels-last input writes a channels-last output, so the (B, H, W, C) view the
    LayerNorm reads is contiguous; from NCHW, the LayerNorm first copies the permuted map element by element."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.contiguous(memory_format=torch.channels_last))  # (the converted input is freed here)
        return self.norm(x.permute(0, 2, 3, 1))


_FAST = {nn.Linear: FastLinear, ConvFFN: FastConvFFN, DeformConv2d: FastDeformConv2d, Stage: FastStage,
         PatchEmbed: FastPatchEmbed}
_PLAIN = {fast: plain for plain, fast in _FAST.items()}
_ADDED = ("recompute_gelu", "recompute_dwconv", "widest")  # instance attributes accelerate sets


KERNELS = (None, "auto", "triton")


def accelerate(model: nn.Module, recompute_gelu: bool = True, recompute_dwconv: bool = False,
               kernels: str | None = None) -> nn.Module:
    """Swap the LITv2 modules of ``model`` (in place) for their accelerated versions; returns ``model``.

    Covers ``nn.Linear``, ConvFFN, the DTM's deformable conv, the stages and the patch embedding, wherever they
    are (a whole LITv2, a single HiLo or ablation layer). A module with a parametrization keeps its class. Calling
    it again updates the recompute options and the kernels.

    ``kernels``: None or ``"auto"``, the kernels above; ``"triton"`` adds the Triton kernels of
    :mod:`litv2.accel.triton` (blocks, stages, ConvFFNs, HiLo and DTMs; opt-in: not yet measured on a GPU). They run on
    CUDA, and on CPU only under Triton's interpreter: otherwise a one-line
    :class:`~litv2.accel.triton.TritonUnavailable`, before anything is swapped.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} is not one of {', '.join(map(repr, KERNELS))}")
    fast = _FAST
    if kernels == "triton":
        from .triton import modules as triton_modules  # (importing it registers its classes in _PLAIN)
        triton_modules.check_model(model)
        fast = {**_FAST, **triton_modules.FAST}
    for m in model.modules():
        plain = _PLAIN.get(type(m), type(m))
        if plain in fast:
            m.__class__ = fast[plain]
        elif plain is not type(m):  # a class of other kernels, none here
            m.__class__ = plain
        if isinstance(m, FastConvFFN):
            m.recompute_gelu, m.recompute_dwconv = bool(recompute_gelu), bool(recompute_dwconv)
        elif isinstance(m, FastStage):
            m.widest = max([b.norm2.normalized_shape[0] for b in m.blocks]
                           + [b.mlp.fc1.out_features for b in m.blocks])
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate` (in place): the plain modules, e.g. for FX, TorchScript or export; returns ``model``."""
    for m in model.modules():
        cls = type(m)
        if cls in _PLAIN:
            m.__class__ = _PLAIN[cls]
        elif parametrize.is_parametrized(m) and cls.__bases__[0] in _PLAIN:  # parametrized after accelerate
            cls.__bases__ = (_PLAIN[cls.__bases__[0]],)
        else:
            continue
        for name in _ADDED:
            m.__dict__.pop(name, None)
        onednn.forget_packed(m)
    return model


def is_accelerated(model: nn.Module) -> bool:
    return any(type(m) in _PLAIN or (parametrize.is_parametrized(m) and type(m).__bases__[0] in _PLAIN)
               for m in model.modules())
