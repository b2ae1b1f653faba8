"""What train.py / eval.py need around the engine: one-line errors and torchrun-safe Hydra dirs."""
from __future__ import annotations

import os
import signal
import sys
import tempfile

from litv2.errors import UserError

from .checkpoint import remove_if_unused
from .distributed import RankFailed
from .signals import Interrupted, Preempted


def _launched_rank() -> int:
    """torchrun's RANK, else the task's SLURM_PROCID inside an srun step (see distributed.in_srun_step), else 0."""
    from .distributed import in_srun_step

    if "RANK" in os.environ:
        return int(os.environ["RANK"] or 0)
    return int(os.environ.get("SLURM_PROCID", "0") or 0) if in_srun_step() else 0


def rank_zero_hydra_overrides(argv: list[str]) -> list[str]:
    """Under torchrun, only rank 0 lets Hydra create the run dir; other ranks get it from rank 0.

    Every rank resolves ``${now:...}`` on its own, so left alone each would make its own dir.
    Ranks > 0 point Hydra at an existing scratch dir and write no .hydra/ files there.
    """
    if _launched_rank() == 0 or any(a in ("-m", "--multirun") for a in argv):
        return argv
    return argv + ["hydra.output_subdir=null", f"hydra.run.dir={tempfile.gettempdir()}"]


def main_guard(fn, *args, exit_code_on_signal: int = 143, fresh_dir=None, **kwargs):
    """Call fn; a UserError becomes one line on stderr and exit status 2 (and ``fresh_dir``, the
    run dir Hydra made for this command, is removed if nothing but setup files landed in it); a rank
    that stopped because another one failed, one line and status 1; Ctrl-C, one line and status 130; a
    save-on-signal stop hands the signal on (e.g. to submitit's requeue handler) or exits with
    ``exit_code_on_signal``. Any other exception propagates (Hydra prints it, status 1)."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if fresh_dir:
            remove_if_unused(fresh_dir)
        sys.exit(2)
    except RankFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"stopped: {e or 'interrupted'}", file=sys.stderr, flush=True)
        if fresh_dir:
            remove_if_unused(fresh_dir)
        sys.exit(130)
    except Preempted as p:
        print(f"stopped: {p}", file=sys.stderr, flush=True)
        prev = p.previous_handler
        if callable(prev) and prev not in (signal.default_int_handler,):
            prev(p.signum, None)
        sys.exit(exit_code_on_signal)
