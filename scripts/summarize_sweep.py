#!/usr/bin/env python
"""Summarise a Hydra multirun (e.g. an alpha / window-size sweep) into a CSV, a Markdown table and a plot.

Paper Fig. 4 (effect of alpha) and supplementary Table II (effect of the window size s)::

    python train.py -m experiment=... hilo.alpha=0.0,0.5,0.9,1.0 hilo.window_size=2,4
    python scripts/summarize_sweep.py runs/multirun/litv2_s/2026-01-01_12-00-00

Every run directory below the given folder (``multirun/DATE/TIME/0``, ``.../1`` of the local launcher,
``<num>_<overrides>`` job dirs next to the ``.submitit/`` folder of the submitit launcher, or a single run
dir) is found by its ``summary.json`` or its saved config. The config is read from the run dir's
``config.yaml`` (the resolved config ``train.py`` saves), ``resolved_config.yaml`` or Hydra's
``.hydra/config.yaml`` (plus ``.hydra/overrides.yaml``); metrics from ``summary.json`` as ``train.py`` writes
it (``best_top1``, ``final_top1``, ``params``, ``gflops``, ``throughput``, ``train_mem_mb``, ...; other
spellings and nested dicts are searched too). Missing values stay blank; a run with a config but no summary
is listed with status ``incomplete``.

Writes ``sweep_summary.csv``, ``sweep_summary.md`` and ``sweep_summary.png`` (into ``--out-dir``, default
the multirun folder) and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

# the engine saves the resolved config as config.yaml in the run dir; Hydra keeps the unresolved one in .hydra/
CONFIG_FILES = ("config.yaml", "resolved_config.yaml", ".hydra/config.yaml")
SKIP_DIRS = {".submitit", ".hydra", "wandb", "__pycache__", "checkpoints", "tb"}

# column -> candidate keys (compared after flattening nested dicts, lower-cased, with / . - as _)
METRIC_KEYS = {
    "top1": ("best_top1", "top1_best", "best_acc1", "max_top1", "best_val_top1", "best_eval_top1"),
    "top1_final": ("final_top1", "top1_final", "last_top1", "val_top1", "eval_top1", "top1", "acc1"),
    "top5": ("best_top5", "top5_best", "final_top5", "top5_final", "val_top5", "eval_top5", "top5", "acc5"),
    "params_m": ("params_m",),
    "params": ("params", "num_params", "n_params"),
    "gflops": ("gflops", "flops_g"),
    "img_s": ("throughput", "img_s", "imgs_per_s", "images_per_s", "throughput_img_s"),
    "train_mem_mb": ("train_mem_mb", "train_memory_mb", "train_mem"),
    "test_mem_mb": ("test_mem_mb", "test_memory_mb", "test_mem"),
    "epochs": ("epoch", "epochs", "final_epoch"),
}
COLUMNS = ("run", "model", "attention", "alpha", "window_size", "params_m", "gflops", "img_s",
           "train_mem_mb", "test_mem_mb", "top1", "top1_final", "top5", "epochs", "status")


def _norm(key: str) -> str:
    return re.sub(r"[/.\-]", "_", key.lower())


def _dotted(key: str) -> str:
    return re.sub(r"/", ".", key.lower()).replace("-", "_")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def find_value(flat: dict, candidates) -> object:
    """First candidate present as a full key, else as the last component(s) of a nested key."""
    normed = {_norm(k): v for k, v in flat.items()}
    for c in candidates:
        if normed.get(c) is not None:
            return normed[c]
    dotted = {_dotted(k): v for k, v in flat.items()}
    for c in candidates:
        for k, v in dotted.items():
            if k.endswith("." + c) and v is not None:
                return v
    return None


def load_config(run_dir: Path) -> dict:
    """The run's config as a plain dict (interpolations resolved where possible) plus its overrides."""
    cfg: dict = {}
    for name in CONFIG_FILES:
        path = run_dir / name
        if path.is_file():
            cfg = _load_yaml(path)
            if cfg:
                break
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        import yaml
        for item in yaml.safe_load(overrides.read_text()) or []:
            key, _, value = str(item).lstrip("+~").partition("=")
            cfg.setdefault("_overrides", {})[key] = _parse_scalar(value)
    return cfg


def _load_yaml(path: Path) -> dict:
    try:
        from omegaconf import OmegaConf
        conf = OmegaConf.load(path)
        try:
            return OmegaConf.to_container(conf, resolve=True) or {}
        except Exception:  # noqa: BLE001 - e.g. a resolver only Hydra knows: keep it unresolved
            return OmegaConf.to_container(conf, resolve=False) or {}
    except ImportError:  # pragma: no cover
        import yaml
        return yaml.safe_load(path.read_text()) or {}


def _parse_scalar(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _get(cfg: dict, dotted: str):
    cur = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _number(v):
    if isinstance(v, bool) or v is None:
        return None
    if not isinstance(v, (int, float)):
        v = _parse_scalar(str(v))
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def hilo_settings(cfg: dict, flat_summary: dict) -> tuple:
    """(alpha, window_size) from overrides, the hilo group, the model kwargs or the summary."""
    ov = cfg.get("_overrides", {})
    alpha = next((v for v in (ov.get("hilo.alpha"), ov.get("model.alpha"), _get(cfg, "hilo.alpha"),
                              _get(cfg, "model.alpha"), find_value(flat_summary, ("alpha",)))
                  if _number(v) is not None), None)
    ws = next((v for v in (ov.get("hilo.window_size"), _get(cfg, "hilo.window_size"),
                           find_value(flat_summary, ("window_size", "local_ws"))) if _number(v) is not None), None)
    if ws is None:
        local_ws = _get(cfg, "model.local_ws")
        if isinstance(local_ws, (list, tuple)) and len(local_ws) >= 3 and _number(local_ws[2]) is not None:
            ws = local_ws[2]  # stage 3, the HiLo stage with s > 1
    return _number(alpha), _number(ws)


def find_runs(root: Path) -> list[Path]:
    """Run dirs under ``root`` (or ``root`` itself): those holding summary.json or a saved config."""
    runs = set()

    def is_run(d: Path) -> bool:
        return (d / "summary.json").is_file() or any((d / c).is_file() for c in CONFIG_FILES)

    if is_run(root):
        runs.add(root)
    stack = [root]
    while stack:
        d = stack.pop()
        for child in sorted(d.iterdir()):
            if child.is_dir() and child.name not in SKIP_DIRS and not child.is_symlink():
                if is_run(child):
                    runs.add(child)
                stack.append(child)
    return sorted(runs, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def collect(root: Path) -> list[dict]:
    rows = []
    for run_dir in find_runs(root):
        summary_path = run_dir / "summary.json"
        summary = {}
        status = "ok"
        if summary_path.is_file():
            try:
                summary = json.loads(summary_path.read_text())
            except json.JSONDecodeError:
                status = "bad summary.json"
        else:
            status = "incomplete"
        cfg = load_config(run_dir)
        flat = flatten(summary) if isinstance(summary, dict) else {}
        row = {"run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name, "status": status}
        row["model"] = _get(cfg, "model.name") or find_value(flat, ("model", "model_name"))
        row["attention"] = _get(cfg, "model.attention") or find_value(flat, ("attention",))
        row["alpha"], row["window_size"] = hilo_settings(cfg, flat)
        for col, keys in METRIC_KEYS.items():
            row[col] = _number(find_value(flat, keys))
        params = row.pop("params")
        if row["params_m"] is None and params is not None:
            row["params_m"] = params / 1e6
        for col in ("top1", "top1_final", "top5"):
            if row[col] is not None and row[col] < 0:  # the engine's "no evaluation yet" sentinel (-1)
                row[col] = None
        if row["top1"] is None:
            row["top1"] = row["top1_final"]
        if isinstance(summary, dict) and isinstance(summary.get("status"), str) and status == "ok":
            row["status"] = summary["status"]
        rows.append(row)
    return rows


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: _cell(r.get(c)) for c in COLUMNS})


def markdown(rows: list[dict]) -> str:
    headers = ["Run", "Model", "Attention", "α", "s", "Params (M)", "GFLOPs", "Throughput (img/s)",
               "Train mem (MB)", "Test mem (MB)", "Top-1 (%)", "Top-1 final (%)", "Top-5 (%)", "Epochs", "Status"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Fig. 4 / Table II layout: top-1, throughput and GFLOPs against alpha (one line per s) and against s."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("top1", "Top-1 (%)"), ("img_s", "Throughput (img/s)"), ("gflops", "GFLOPs")]
    fig, axes = plt.subplots(2, len(metrics), figsize=(4.5 * len(metrics), 7), squeeze=False)
    for row_i, (xkey, gkey, xlabel, glabel) in enumerate(
            (("alpha", "window_size", "α (share of Lo-Fi heads)", "s"),
             ("window_size", "alpha", "window size s", "α"))):
        groups = sorted({r.get(gkey) for r in rows}, key=lambda v: (v is None, v if v is not None else 0))
        for col_i, (mkey, mlabel) in enumerate(metrics):
            ax = axes[row_i][col_i]
            for g in groups:
                pts = sorted((r[xkey], r[mkey]) for r in rows
                             if r.get(gkey) == g and r.get(xkey) is not None and r.get(mkey) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            label=f"{glabel} = {_cell(g)}" if g is not None else f"{glabel} unknown")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(mlabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title or "HiLo sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("multirun_dir", type=Path, help="a Hydra multirun folder (or any folder holding run dirs)")
    p.add_argument("--out-dir", type=Path, default=None, help="default: the multirun folder")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    root = args.multirun_dir
    if not root.is_dir():
        raise SystemExit(f"not a directory: {root}")
    rows = collect(root)
    if not rows:
        raise SystemExit(f"no run directories (summary.json or saved config) under {root}")
    out = args.out_dir or root
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "sweep_summary.csv")
    table = markdown(rows)
    (out / "sweep_summary.md").write_text(f"Sweep summary of `{root}`\n\n{table}\n")
    if not args.no_plot:
        plot(rows, out / "sweep_summary.png", title=f"HiLo sweep: {root.parent.name}/{root.name}")
    print(table)
    print(f"\nwrote {out / 'sweep_summary.csv'}, {out / 'sweep_summary.md'}"
          + ("" if args.no_plot else f", {out / 'sweep_summary.png'}"))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
