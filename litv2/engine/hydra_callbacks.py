"""Hydra callbacks of train.py, registered under ``hydra.callbacks`` in conf/config.yaml."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from litv2.errors import os_error_words


class MakeRunDir(Callback):
    """Create the run dir (``-m``: the sweep dir) before Hydra does, so that one under an unwritable
    ``paths.runs_root`` ends the command with one line and exit status 2 instead of Hydra's traceback.

    Hydra calls this after composing the config and before it makes the dir itself; ``${now:...}`` resolves to the
    same time both times (Hydra caches it). Torchrun ranks > 0 point ``hydra.run.dir`` at an existing scratch dir.
    """

    def on_run_start(self, config, **kwargs) -> None:
        _make(config, "hydra.run.dir", "run dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        _make(config, "hydra.sweep.dir", "sweep dir")


def _make(config, key: str, what: str) -> None:
    try:
        path = OmegaConf.select(config, key)
    except Exception:  # an interpolation Hydra itself reports better
        return
    if path is None:
        return
    try:
        Path(str(path)).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create the {what} {path}: {os_error_words(e)} (set paths.runs_root to a writable place)",
              file=sys.stderr, flush=True)
        sys.exit(2)
