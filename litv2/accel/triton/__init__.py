"""Triton kernels for LITv2 (``accelerate(model, kernels="triton")``), registered as ``torch.library`` ops.

``ops`` has the ops (``torch.ops.litv2.*``) and their launches, ``kernels`` the Triton kernels, ``reference`` the
same computations in plain torch (what the tests compare against), ``modules`` the modules that call them,
``dtm`` the DTM's bilinear gather (its kernels, ops and reference), ``hilo`` and ``hilo_kernels`` the same for HiLo
attention, and ``aot`` the ahead-of-time compile for a GPU target the tests use to check resources without a GPU.

They run on CUDA devices, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before Python
imports triton), which is how they are tested without a GPU. Opt-in: not measured faster on a GPU yet.
"""
from litv2.errors import UserError

NO_INTERPRETER = ("litv2.accel: kernels='triton' on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
                  "before Python imports triton, or use a CUDA device")


class TritonUnavailable(UserError, RuntimeError):
    """The Triton kernels cannot run here (no triton, or a CPU without the interpreter); the message says why."""


def import_ops():
    """:mod:`.ops`, or :class:`TritonUnavailable` if triton is not installed."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise TritonUnavailable(f"litv2.accel: kernels='triton' needs the triton package ({e})") from None
    from . import ops
    return ops
