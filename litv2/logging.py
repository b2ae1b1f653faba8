"""Run reporting: progress bar, JSON-lines metrics, summary.json, wandb (offline by default).

Only rank 0 creates a :class:`RunLogger` that writes; other ranks get a silent one.
"""
from __future__ import annotations

import json
import logging
import math
import secrets
import sys
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("litv2")


def _clean(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


class RunLogger:
    """metrics.jsonl + summary.json in the run dir, mirrored to wandb when logger=wandb."""

    def __init__(self, run_dir, cfg=None, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir) if run_dir else None
        self.metrics_path = self.run_dir / "metrics.jsonl" if self.run_dir else None
        self.wandb = None
        if not enabled:
            return
        if resume_step is not None and self.metrics_path.exists():
            # a killed run may have logged steps past its last checkpoint: drop them, they are redone
            rows = [r for r in self.metrics_path.read_text().splitlines() if r.strip()]
            keep = [r for r in rows if json.loads(r).get("step", 0) <= resume_step]
            self.metrics_path.write_text("".join(r + "\n" for r in keep))
        self._file = open(self.metrics_path, "a")
        if cfg is not None and cfg.logger.name == "wandb" and cfg.logger.wandb.mode != "disabled":
            self._init_wandb(cfg)

    def _init_wandb(self, cfg):
        import wandb
        from omegaconf import OmegaConf

        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        w = cfg.logger.wandb
        self.wandb = wandb.init(
            project=w.project, entity=w.entity, group=w.group, tags=list(w.tags), mode=w.mode,
            dir=str(self.run_dir), id=run_id, resume="allow", name=f"{cfg.name}/{self.run_dir.name}",
            config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, row: dict):
        if not self.enabled:
            return
        row = _clean(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row.get("step"))

    def summary(self, summary: dict):
        if not self.enabled:
            return
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})

    def progress(self, total: int, initial: int = 0, desc: str = ""):
        return tqdm(total=total, initial=initial, desc=desc, disable=not self.enabled, dynamic_ncols=True,
                    leave=False, file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def info(self, msg: str, *args):
        if self.enabled:
            log.info(msg, *args)

    def close(self):
        if not self.enabled:
            return
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def format_table(rows: dict) -> str:
    """Two-column plain-text table for the CLI."""
    width = max(len(k) for k in rows)
    out = []
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        elif isinstance(v, int):
            v = f"{v:,}"
        out.append(f"{k:<{width}}  {v}")
    return "\n".join(out)
