"""Inference forwards replayed from a CUDA graph (``trainer.cuda_graphs``, ``benchmark_models.py`` ``@cudagraph``).

:class:`GraphedForward` captures a module's forward once, at the shape of the first input it sees, and then, for
every input of that shape (and layout, dtype and autocast state), copies it into a static buffer, replays the graph
and returns a copy of the static output. Any other input (the smaller last batch of an evaluation) runs eagerly, so
results equal eager ones call for call. The capture follows torch's recipe: warm-up calls on a side stream (cuDNN
autotuning, Triton and inductor compiles happen there), then one call under ``torch.cuda.graph``; autocast's weight
cache is off throughout (a cached cast made before the capture would be freed under the graph).

The module's parameters must stay where they are (in-place updates are seen by the replays); the graph's memory
is freed with the object. CUDA only: :class:`GraphsUnavailable` (one line) on any other device. A forward that
cannot be captured (one that synchronises with the host) raises :class:`CaptureFailed`, or with ``fallback=True``
logs one warning and runs eagerly from then on.
"""
from __future__ import annotations

import logging

import torch

from litv2.errors import UserError

log = logging.getLogger(__name__)


class GraphsUnavailable(UserError, RuntimeError):
    """CUDA graphs asked for where there is no CUDA device (one line)."""


class CaptureFailed(RuntimeError):
    """The module's forward could not be captured in a CUDA graph; the message gives the first line of why."""


def _autocast_state() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


class GraphedForward:
    """``GraphedForward(module)(x)``: ``module(x)`` replayed from a CUDA graph captured at the first input's shape;
    inputs of another shape run eagerly. ``captures`` and ``replays`` count what happened."""

    def __init__(self, module: torch.nn.Module, warmup: int = 3, fallback: bool = False):
        self.module, self.warmup, self.fallback = module, max(1, int(warmup)), fallback
        self.graph = self.key = self.static_in = self.static_out = None
        self.captures = self.replays = 0
        self.failed: str | None = None  # why the capture failed (fallback: every call runs eagerly)

    @staticmethod
    def signature(x: torch.Tensor) -> tuple:
        return tuple(x.shape), x.stride(), x.dtype, x.device, _autocast_state(), torch.is_grad_enabled()

    def __call__(self, x: torch.Tensor):
        if x.device.type != "cuda":
            raise GraphsUnavailable(f"CUDA graphs run on CUDA devices, not on {x.device.type} "
                                    "(trainer.cuda_graphs=false, or a CUDA device)")
        if self.failed is not None:
            return self.module(x)
        if self.graph is None:
            try:
                self._capture(x)
            except Exception as e:  # noqa: BLE001 - any capture error: eager (fallback) or one clear error
                self.release()
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                if not self.fallback:
                    raise CaptureFailed(f"CUDA graph capture of {type(self.module).__name__} failed: {reason}") from e
                self.failed = reason
                log.warning("CUDA graph capture of %s failed (%s); running it eagerly", type(self.module).__name__,
                            reason)
                return self.module(x)
        if self.signature(x) != self.key:
            return self.module(x)
        self.static_in.copy_(x)
        self.graph.replay()
        self.replays += 1
        return self.static_out.clone()

    def _capture(self, x: torch.Tensor) -> None:
        enabled, dtype = _autocast_state()
        self.key = self.signature(x)
        self.static_in = torch.empty_like(x)  # x's strides (channels-last stays channels-last)
        self.static_in.copy_(x)
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.module(self.static_in)
            torch.cuda.current_stream(x.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self.module(self.static_in)
        self.captures += 1

    def release(self) -> None:
        """Drop the graph, its memory pool and the static buffers (the next call captures again)."""
        self.graph = self.key = self.static_in = self.static_out = None
