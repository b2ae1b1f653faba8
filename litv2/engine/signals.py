"""SIGTERM / SIGUSR1 (SLURM's preemption warning) / SIGUSR2 (submitit's): finish the step, save, exit.

The handler only records the signal; the training loop checks ``requested`` after every
optimizer step, saves ``last.pth`` and raises :class:`Preempted`. The CLI then hands the signal
to whatever handler was installed before ours (submitit's, which requeues the job) or exits
with ``trainer.signal_exit_code``.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


class Preempted(Exception):
    def __init__(self, signum: int, step: int, previous_handler=None):
        super().__init__(f"received {signal.Signals(signum).name}: saved the checkpoint at step {step} and stopped")
        self.signum, self.step, self.previous_handler = signum, step, previous_handler


class Interrupted(Exception):
    """Ctrl-C (SIGINT): the job ended at once, without a save; its message says which checkpoint is kept."""


class StopOnSignal:
    """Context manager that turns SIGTERM/SIGUSR1/SIGUSR2 into a polite stop request."""

    def __init__(self, signals=SIGNALS):
        self.signals, self.requested, self.previous = signals, None, {}

    def _handler(self, signum, frame):
        if self.requested is None:
            log.warning("received %s: will save and stop after the current step", signal.Signals(signum).name)
        self.requested = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)
        return False
