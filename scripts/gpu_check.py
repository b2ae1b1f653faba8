#!/usr/bin/env python
"""Everything a GPU machine should check, in one run of at most ten minutes, written up as one Markdown report.

    python scripts/gpu_check.py                 # on a GPU machine; writes docs/gpu_check.md
    python scripts/gpu_check.py --smoke         # CPU, tiny sizes: every part's code runs (what CI runs)

Parts, each one or more subprocesses with their own time limits, run in this order (a part that fails or runs out
of time is reported and the rest run; ``--budget`` seconds in all, after which the remaining parts are reported as
not run, so a report always comes out):

1. ``models``: ``benchmark_models.py`` at batch 64, 224², bf16 autocast, eager and CUDA-graph modes, inference and
   training, peak train and test memory (each model alone on the device): LITv2-S plain (``accel=auto``) and with
   ``kernels=triton`` (``litv2_s@triton``), Swin-T, ConvNeXt-T, ResNet-50 and FasterViT-0 (skipped, with a note,
   where the ``fastervit`` package is absent);
2. ``fp32``: the same models in fp32 as in the paper, TF32 off, then on (inference and training);
3. ``attention``: the paper's Table IV layer (``benchmark_attention.py``), HiLo (plain and on the Triton kernels)
   against MSA, bf16, flash SDPA only;
4. ``kernels``: ``benchmark_kernels.py --accuracy``: each Triton kernel at LITv2-S shapes against the copy rate;
   Triton LITv2-S against plain in fp32, TF32 off (logits and gradients within 1e-4);
5. ``train``: 200 steps of LITv2-S training on synthetic data in bf16 with ``kernels=triton``, in bf16 and in fp16:
   the loss must stay finite and fall;
6. ``tests``: ``tests/test_gpu.py``, ``tests/test_cuda_graphs.py`` and the Triton kernel tests on CUDA tensors;
7. ``compiled``: ``benchmark_models.py --modes compile`` (bf16, inference and training), one model per subprocess,
   LITv2-S and Swin-T first (compiling takes minutes: what the budget leaves);
8. ``dtm``: ``benchmark_dtm.py --devices cuda``; 9. ``recompute``: the ConvFFN recompute A/B; 10. ``data``:
   ``benchmark_data.py`` against the training throughput of part 5.

The report marks each model's fastest mode and reads the targets against the measurements only (a target without
a measurement is "not measured"): bf16 inference LITv2-S >= 1.5x Swin-T, >= 1.0x ConvNeXt-T and ResNet-50, >= 1.2x
FasterViT-0; fp32 inference >= 1.5x Swin-T; bf16 training >= 1.3x Swin-T; peak train memory <= 0.8x Swin-T; the
HiLo layer >= 1.5x MSA in bf16; the memory-bound kernels >= 60 % of the copy rate; an input pipeline
(``data.num_workers`` of the ImageNet preset) delivering >= 1.2x the training throughput. Nothing is estimated.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWIN, CONVNEXT, RESNET, FASTERVIT = "swin_tiny_patch4_window7_224", "convnext_tiny", "resnet50", "faster_vit_0_224"
PEERS = (SWIN, CONVNEXT, RESNET, FASTERVIT)
LITV2 = ("litv2_s", "litv2_s@triton")
NAMES = {SWIN: "Swin-T", CONVNEXT: "ConvNeXt-T", RESNET: "ResNet-50", FASTERVIT: "FasterViT-0"}
TINY = ["++model.embed_dim=16", "++model.depths=[1,1,2,1]", "++model.num_heads=[1,2,4,8]"]
PARTS = ("models", "fp32", "attention", "kernels", "train", "tests", "compiled", "dtm", "recompute", "data")
# (part key, benchmark_models options, label) of the three precision regimes
REGIMES = {"models": ([], "bf16 autocast"), "fp32": (["--gpu-fp32", "--tf32", "off"], "fp32, TF32 off"),
           "fp32 tf32": (["--gpu-fp32", "--tf32", "on"], "fp32, TF32 on")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, seconds per part")
    p.add_argument("--out", default=None, help="report path (default docs/gpu_check.md; smoke: outputs/gpu_check/)")
    p.add_argument("--steps", type=int, default=200, help="training steps per run (part train)")
    p.add_argument("--part-timeout", type=int, default=240, help="the most seconds one subprocess may take")
    p.add_argument("--budget", type=int, default=600,
                   help="seconds for all parts together (0: no limit); parts left when it is spent are not run")
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of parts to run, of: " + ", ".join(PARTS))
    args = p.parse_args(argv)
    unknown = [x for x in args.parts.split(",") if x.strip() and x.strip() not in PARTS]
    if unknown:
        p.error(f"--parts: unknown part {unknown[0]!r} (choose from {', '.join(PARTS)})")
    if not args.smoke:
        import torch
        if not torch.cuda.is_available():
            p.error("no CUDA device here; --smoke runs the CPU check")
    args.out = Path(args.out or (REPO / "outputs" / "gpu_check" / "gpu_check.md" if args.smoke
                                 else REPO / "docs" / "gpu_check.md"))
    return args


class Budget:
    """What is left of ``--budget``: each subprocess gets at most that (and at most its own limit)."""

    def __init__(self, seconds: int):
        self.end = time.monotonic() + seconds if seconds > 0 else math.inf

    def timeout(self, wanted: int) -> int:
        return int(max(0, min(wanted, self.end - time.monotonic() - 5)))


def run(cmd: list[str], timeout: int, env: dict | None = None) -> dict:
    """One subprocess: its command, exit status, wall time and the tail of its output."""
    shown = " ".join(c if " " not in c else f"'{c}'" for c in cmd).replace(sys.executable, "python")
    if timeout < 10:
        return {"cmd": shown, "rc": "not run (budget spent)", "seconds": 0.0, "tail": "", "ok": False}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", **(env or {})})
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = f"timeout after {timeout} s"
    return {"cmd": shown, "rc": rc, "seconds": round(time.perf_counter() - start, 1), "tail": out[-3000:],
            "ok": rc == 0}


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / name), *args]


def merge(results: list[dict]) -> dict:
    """One part of several subprocesses: all commands, the worst status, the summed time, the tails."""
    if len(results) == 1:
        return results[0]
    bad = [r for r in results if not r["ok"]]
    return {"cmd": "; ".join(r["cmd"] for r in results), "rc": bad[0]["rc"] if bad else 0,
            "seconds": round(sum(r["seconds"] for r in results), 1), "ok": not bad,
            "tail": "\n".join(r["tail"] for r in bad)[-3000:]}


def has_fastervit() -> bool:
    return importlib.util.find_spec("fastervit") is not None


def part_tests(a, work: Path, budget: Budget) -> dict:
    # on a GPU the Triton kernel tests run on CUDA tensors (bf16 tl.dot included); on a CPU they need the
    # interpreter and minutes, which the smoke run leaves to make test's own line
    kernels = [] if a.smoke else ["tests/test_triton.py", "tests/test_triton_hilo.py", "tests/test_triton_dtm.py"]
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
                  "tests/test_cuda_graphs.py", *kernels], budget.timeout(a.part_timeout),
                 env={"LITV2_TEST_DEVICE": "cpu"} if a.smoke else None)
    last = [line for line in result["tail"].splitlines() if " passed" in line or " failed" in line]
    result["summary"] = last[-1] if last else "no pytest summary"
    return result


PROGRESS = re.compile(r"^\[(\w+), batch \d+\] (.*)$")


def progress_rows(tail: str) -> dict:
    """Rates from benchmark_models' progress lines (``[gpu, batch 64] litv2_s 123.4 img/s, ...``): what a run that
    ran out of time had measured."""
    rows: dict = {}
    for line in tail.splitlines():
        m = PROGRESS.match(line.strip())
        if not m:
            continue
        for item in m.group(2).split(", "):
            name, _, value = item.rpartition(" ")[0].rpartition(" ")
            try:
                rows.setdefault(name, {})[f"{m.group(1)}_img_s"] = float(value)
            except ValueError:
                rows.setdefault(name, {})[f"{m.group(1)}_img_s"] = value
    return rows


def bench_models(a, work: Path, budget: Budget, models: list[str], extra: list[str], tag: str,
                 timeout: int | None = None) -> dict:
    """One benchmark_models.py run; its rows from its JSON, or from its progress lines if it stopped early."""
    out = work / tag
    device = ["--smoke", "--devices", "cpu"] if a.smoke else ["--devices", "cuda", "--gpu-batch-size", "64"]
    result = run(script("benchmark_models.py", "--models", ",".join(models), *device, "--keep-going", *extra,
                        "--out-dir", str(out)),
                 budget.timeout(timeout or a.part_timeout))
    if result["ok"]:
        payload = json.loads((out / "benchmark_models.json").read_text())
        result["rows"], result["table"] = payload["rows"], (out / "benchmark_models.md").read_text()
    else:
        result["rows"] = progress_rows(result["tail"])
    result["notes"] = [f"{tag}: {line.strip()}" for line in result["tail"].splitlines()  # --keep-going's rows
                       if re.search(r"(failed to build|failed|capture of \w+ failed): ", line)]
    return result


def model_set(a) -> tuple[list[str], list[str]]:
    """(models to run, notes): LITv2-S plain and Triton and the peers; FasterViT-0 only where fastervit is."""
    notes = []
    if a.smoke:  # the Triton model under the interpreter is too slow for a whole-model smoke (part kernels has it)
        return ["litv2_s", SWIN], notes
    peers = list(PEERS)
    if not has_fastervit():
        peers.remove(FASTERVIT)
        notes.append("FasterViT-0 skipped: the `fastervit` package is not installed here (its targets are not "
                     "measured)")
    return [*LITV2, *peers], notes


def part_models(a, work: Path, budget: Budget, regime: str) -> dict:
    models, notes = model_set(a)
    options, _ = REGIMES[regime]
    train = ["--train"] + ([] if regime == "models" or a.smoke else ["--rounds", "3"])  # fp32 steps take longer
    if a.smoke and regime != "models":  # the CPU runs fp32 anyway: only the options' path is checked
        models, train = models[:1], ["--no-peak"]
    extra = ["--modes", "eager,cudagraph", *train, *options] + (["--memory"] if regime == "models" else [])
    result = bench_models(a, work, budget, models, extra, regime.replace(" ", "_"))
    result["notes"] = notes + result["notes"]
    return result


def part_fp32(a, work: Path, budget: Budget) -> dict:
    """fp32 with TF32 off, then on (a CPU smoke run: once, TF32 is a CUDA setting)."""
    return {regime: part_models(a, work, budget, regime) for regime in ("fp32", "fp32 tf32")[:1 if a.smoke else 2]}


def part_compiled(a, work: Path, budget: Budget) -> dict:
    """One subprocess per model (a compile that runs out of time costs that model only), most wanted first."""
    models, _ = model_set(a)
    order = [m for m in ("litv2_s", SWIN) if m in models] + [m for m in models if m not in ("litv2_s", SWIN)]
    runs = [bench_models(a, work, budget, [m], ["--modes", "compile", "--train", "--no-peak"], f"compiled_{i}")
            for i, m in enumerate(order)]
    result = merge(runs)
    result["rows"] = {k: v for r in runs for k, v in r.get("rows", {}).items()}
    result["notes"] = [n for r in runs for n in r["notes"]]
    result["table"] = "\n\n".join(r["table"].strip() for r in runs if "table" in r)
    return result


def part_attention(a, work: Path, budget: Budget) -> dict:
    out = work / "attention"
    device = ["--smoke"] if a.smoke else ["--devices", "cuda"]
    result = run(script("benchmark_attention.py", "--methods", "hilo,hilo@triton,msa", "--amp", "--sdpa", "flash",
                        "--no-plot", *device, "--out-dir", str(out)), budget.timeout(a.part_timeout))
    if result["ok"]:
        result["results"] = json.loads((out / "attention_table.json").read_text())["results"]
        result["table"] = (out / "attention_table.md").read_text()
    return result


def part_kernels(a, work: Path, budget: Budget) -> dict:
    out = work / "kernels"
    result = run(script("benchmark_kernels.py", "--accuracy", *(["--smoke"] if a.smoke else []), "--out-dir",
                        str(out)), budget.timeout(a.part_timeout), env={"TRITON_INTERPRET": "1"} if a.smoke else None)
    if result["ok"]:
        result["payload"] = json.loads((out / "benchmark_kernels.json").read_text())
        result["table"] = (out / "benchmark_kernels.md").read_text()
        result["ok"] = bool((result["payload"]["accuracy"] or {}).get("ok"))
    return result


def part_dtm(a, work: Path, budget: Budget) -> dict:
    device = ["--smoke", "--devices", "cpu"] if a.smoke else ["--devices", "cuda", "--batch-size", "64"]
    result = run(script("benchmark_dtm.py", *device, "--out-dir", str(work / "dtm")), budget.timeout(a.part_timeout))
    if result["ok"]:
        result["table"] = (work / "dtm" / "benchmark_dtm.md").read_text()
    return result


def part_train(a, work: Path, budget: Budget, precision: str, kernels: str | None = None) -> dict:
    runs = work / f"runs_{precision}_{kernels}"
    size = (["data.img_size=32", "data.batch_size=8", "data.train_size=64", "data.val_size=16", *TINY] if a.smoke
            else ["data.img_size=224", "data.batch_size=64", "data.train_size=1024", "data.val_size=128"])
    result = run([sys.executable, str(REPO / "train.py"), "model=litv2_s", "data=synthetic", "aug=none",
                  f"trainer.precision={precision}", f"trainer.max_steps={a.steps}", "trainer.epochs=1000",
                  "trainer.log_every=10", "trainer.eval_every=1000", "sched.warmup_epochs=0", "optim.lr=1e-3",
                  "optim.lr_base_batch=64", "data.num_workers=4" if not a.smoke else "data.num_workers=0",
                  *([f"model.kernels={kernels}"] if kernels else []),
                  "logger=none", "profile.enabled=false", f"paths.runs_root={runs}", *size],
                 budget.timeout(a.part_timeout))
    rows = []
    for path in runs.rglob("metrics.jsonl"):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    rates = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r][1:]  # the first window compiles
    finite = bool(losses) and all(v is not None and math.isfinite(v) for v in losses)
    falls = finite and len(losses) >= 2 and losses[-1] < losses[0]
    result.update(ok=result["rc"] == 0 and finite and falls, losses=losses, finite=finite, falls=falls, steps=a.steps,
                  images_per_s=sorted(rates)[len(rates) // 2] if rates else None)
    return result


def part_data(a, work: Path, budget: Budget, target: float | None) -> dict:
    sizes = (["--images", "16", "--jpeg-size", "96x72", "--seconds", "1", "--workers", "1", "--batches", "2",
              "--batch-size", "8"] if a.smoke else ["--seconds", "10", "--workers", "1,2,4"])
    has_dali = importlib.util.find_spec("nvidia.dali") is not None
    dali = ["--dali", "gpu", "--dali-threads", "1,4"] if has_dali and not a.smoke else []
    result = run(script("benchmark_data.py", *sizes, *dali, *(["--target", f"{target:.0f}"] if target else [])),
                 budget.timeout(a.part_timeout))
    result["table"] = "\n".join(line for line in result["tail"].splitlines() if line.startswith("|"))
    for line in result["tail"].splitlines():
        if line.startswith("| 1 worker"):
            result["per_worker"] = float(line.strip().strip("|").split("|")[-1])
    return result


# ---- reading the results --------------------------------------------------------------------------------------

def fmt(v, spec=".2f", unit="") -> str:
    return "-" if v is None else format(v, spec) + unit


def number(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def base_of(name: str) -> str:
    """A row's model without its mode: ``litv2_s@triton@cudagraph`` -> ``litv2_s@triton``."""
    for mode in ("@compile", "@reduce-overhead", "@max-autotune", "@cudagraph"):
        if name.endswith(mode):
            return name[:-len(mode)]
    return name


def mode_name(name: str) -> str:
    base = base_of(name)
    return name[len(base) + 1:] if name != base else "eager"


def best(rows: dict, model: str, key: str, family: bool = False) -> tuple[float | None, str | None]:
    """The fastest measured row of ``model`` (``family``: of every LITv2-S variant too) by ``key``: (value, row)."""
    found = [(number(r.get(key)), name) for name, r in rows.items()
             if base_of(name) == model or (family and base_of(name).split("@")[0] == model)]
    found = [(v, n) for v, n in found if v is not None]
    return max(found) if found else (None, None)


def regime_rows(results: dict, regime: str) -> dict:
    """Every row measured in a regime: the bf16 one merges the eager/CUDA-graph and compiled parts."""
    if regime == "models":
        rows = {k: dict(v) for k, v in results.get("models", {}).get("rows", {}).items()}
        for k, v in results.get("compiled", {}).get("rows", {}).items():
            rows.setdefault(k, {}).update(v)
        return rows
    return results.get("fp32", {}).get(regime, {}).get("rows", {})


def verdict(value, ok: bool, smoke: bool) -> str:
    if value is None:
        return "not measured"
    return "(smoke run)" if smoke else ("**met**" if ok else "**not met**")


def targets(results: dict, smoke: bool) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows of the issue's targets, read from the measured values only."""
    key = "cpu" if smoke else "gpu"
    out = []

    def ratio_rows(rows, what, peer, bound, col, at_least=True):
        for family, label in ((False, "eager vs eager"), (True, "fastest mode of each")):
            if family:
                mine, mine_row = best(rows, "litv2_s", col, family=True)
                theirs, their_row = best(rows, peer, col)
            else:
                mine, mine_row = number(rows.get("litv2_s", {}).get(col)), "litv2_s"
                theirs, their_row = number(rows.get(peer, {}).get(col)), peer
            v = mine / theirs if mine is not None and theirs else None
            detail = f" ({mine_row} {fmt(mine, '.0f')} vs {their_row} {fmt(theirs, '.0f')})" if v is not None else ""
            sign = "≥" if at_least else "≤"
            out.append((f"{what} LITv2-S {sign} {bound}× {NAMES[peer]}, {label}", f"{fmt(v, unit='×')}{detail}",
                        verdict(v, v is not None and (v >= bound if at_least else v <= bound), smoke)))

    bf16, fp32 = regime_rows(results, "models"), regime_rows(results, "fp32")
    for peer, bound in ((SWIN, 1.5), (CONVNEXT, 1.0), (RESNET, 1.0), (FASTERVIT, 1.2)):
        ratio_rows(bf16, "bf16 inference", peer, bound, f"{key}_img_s")
    ratio_rows(fp32, "fp32 (TF32 off) inference", SWIN, 1.5, f"{key}_img_s")
    ratio_rows(bf16, "bf16 training", SWIN, 1.3, f"{key}_train_img_s")
    mem_col = f"{key}_train_mem_mb"
    mine, theirs = number(bf16.get("litv2_s", {}).get(mem_col)), number(bf16.get(SWIN, {}).get(mem_col))
    m = mine / theirs if mine is not None and theirs else None
    out.append(("peak train memory LITv2-S ≤ 0.8× Swin-T (bf16, batch 64, each alone)",
                fmt(m, unit="×") + (f" ({mine:.0f} vs {theirs:.0f} MiB)" if m is not None else ""),
                verdict(m, m is not None and m <= 0.8, smoke)))
    att = results.get("attention", {}).get("results", {})
    col = f"{'cpu' if smoke else 'cuda'}_img_s"
    rates = [number(att.get(k, {}).get(col)) for k in ("hilo", "hilo@triton")]  # the faster HiLo: plain or Triton
    hilo, msa = max((r for r in rates if r is not None), default=None), number(att.get("msa", {}).get(col))
    h = hilo / msa if hilo is not None and msa else None
    out.append(("HiLo layer ≥ 1.5× MSA (Table IV layer, bf16, flash SDPA)", fmt(h, unit="×"),
                verdict(h, h is not None and h >= 1.5, smoke)))
    payload = results.get("kernels", {}).get("payload") or {}
    kernels = [k for k in payload.get("kernels", []) if number(k.get("pct_copy")) is not None]
    if kernels:
        worst = min(kernels, key=lambda k: k["pct_copy"])
        text = f"lowest {worst['pct_copy']:.0f} % ({worst['op']}, {'x'.join(map(str, worst['input'] or []))})"
        out.append(("memory-bound Triton kernels ≥ 60 % of the copy rate (each)", text,
                    verdict(worst["pct_copy"], worst["pct_copy"] >= 60, smoke)))
    else:
        out.append(("memory-bound Triton kernels ≥ 60 % of the copy rate (each)", "-", "not measured"))
    acc = payload.get("accuracy")
    out.append(("LITv2-S kernels=triton equals plain within 1e-4 (fp32, TF32 off; logits, gradients)",
                f"logits {acc['logits_err']:.1e}, gradients {acc['grad_err']:.1e}" if acc else "-",
                verdict(acc and acc["logits_err"], bool(acc and acc["ok"]), smoke)))
    for name in ("train bf16 triton", "train bf16", "train fp16"):
        r = results.get(name)
        if r is not None and r.get("rc") != "not run (budget spent)":
            losses = r.get("losses") or []
            out.append((f"{name}: {r.get('steps')} steps, loss finite and falling",
                        f"{fmt(losses[0] if losses else None, '.3f')} → {fmt(losses[-1] if losses else None, '.3f')}",
                        verdict(losses or None, bool(r.get("ok")), smoke)))
        else:
            out.append((f"{name}: loss finite and falling", "-", "not measured"))
    train = results.get("train bf16", {}).get("images_per_s")
    per_worker, workers = results.get("data", {}).get("per_worker"), results.get("workers", 1)
    feed = per_worker * workers / train if per_worker and train else None
    out.append((f"input pipeline ≥ 1.2× training throughput ({workers} workers × {fmt(per_worker, '.0f')} img/s vs "
                f"{fmt(train, '.0f')} img/s)", fmt(feed, unit="×"),
                verdict(feed, feed is not None and feed >= 1.2, smoke)))
    return out


def fastest_table(results: dict, smoke: bool) -> str:
    """Each model's fastest mode (and its img/s) in each regime, inference and training."""
    key = "cpu" if smoke else "gpu"
    columns = [(regime, train) for regime in REGIMES for train in (False, True)]
    all_rows = {regime: regime_rows(results, regime) for regime in REGIMES}
    models = list(dict.fromkeys(base_of(n) for rows in all_rows.values() for n in rows))
    if not models:
        return ""
    lines = ["| Model | " + " | ".join(f"{REGIMES[r][1]} {'train' if t else 'inference'}" for r, t in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for model in models:
        cells = []
        for regime, train in columns:
            v, row = best(all_rows[regime], model, f"{key}_{'train_' if train else ''}img_s")
            cells.append(f"{v:.0f} ({mode_name(row)})" if v is not None else "-")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flat(results: dict) -> dict:
    """The parts as one level (the fp32 part holds one result per TF32 setting)."""
    out = {}
    for name, r in results.items():
        if name == "fp32":
            out.update({f"models {k}": v for k, v in r.items()})
        elif isinstance(r, dict) and "rc" in r:
            out[name] = r
    return out


def report(a, results: dict, machine: str) -> str:
    smoke = a.smoke
    lines = [f"# GPU check{' (CPU smoke run: tiny sizes, not figures to read)' if smoke else ''}", "",
             f"{machine}; {time.strftime('%Y-%m-%d')}; `python scripts/gpu_check.py{' --smoke' if smoke else ''}`"
             + ("" if smoke or not a.budget else f"; budget {a.budget} s"),
             "", "| Part | Result | Time (s) |", "|---|---|---:|"]
    parts = flat(results)
    for name, r in parts.items():
        state = "ok" if r.get("ok") else (r["rc"] if isinstance(r["rc"], str) else f"failed (exit {r['rc']})")
        lines.append(f"| {name} | {state}{' — ' + r['summary'] if 'summary' in r else ''} | {r['seconds']} |")
    notes = [n for r in parts.values() for n in r.get("notes", [])] + results.get("notes", [])
    lines += [""] + [f"- {n}" for n in dict.fromkeys(notes)] if notes else []
    lines += ["", "## Targets", "", "| Target | Measured | |", "|---|---:|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(results, smoke)]
    table = fastest_table(results, smoke)
    if table:
        lines += ["", "## Fastest mode of each model", "", "img/s (mode); batch 64, 224²"
                  + (" (smoke: CPU, tiny sizes)" if smoke else ""), "", table]
    for name, r in parts.items():
        if r.get("table"):
            lines += ["", f"## {name}", "", r["table"].strip()]
    lines += ["", "## Commands", ""] + [f"- {name}: `{r['cmd']}`" for name, r in parts.items() if r.get("cmd")]
    for name, r in parts.items():
        if not r.get("ok") and r.get("tail"):
            lines += ["", f"## {name}: output tail", "", "```", r["tail"].strip()[-2000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    a = parse_args(argv)
    parts = [p for p in PARTS if p in {x.strip() for x in a.parts.split(",")}]
    if a.smoke:
        a.steps = min(a.steps, 12)
    budget = Budget(0 if a.smoke else a.budget)
    results: dict = {"notes": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part in parts:
            if part == "models":
                results["models"] = part_models(a, work, budget, "models")
            elif part == "fp32":
                results["fp32"] = part_fp32(a, work, budget)
            elif part == "attention":
                results["attention"] = part_attention(a, work, budget)
            elif part == "kernels":
                results["kernels"] = part_kernels(a, work, budget)
            elif part == "train":
                if a.smoke:
                    results["notes"].append("smoke: the kernels=triton training run is left out (the interpreter "
                                            "takes seconds a step); part kernels runs the Triton kernels")
                else:
                    results["train bf16 triton"] = part_train(a, work, budget, "bf16", "triton")
                for precision in ("bf16", "fp16"):
                    results[f"train {precision}"] = part_train(a, work, budget, precision)
            elif part == "tests":
                results["tests"] = part_tests(a, work, budget)
            elif part == "compiled":
                if a.smoke:
                    results["notes"].append("smoke: part compiled is left out (inductor takes minutes on a CPU)")
                else:
                    results["compiled"] = part_compiled(a, work, budget)
            elif part == "dtm":
                results["dtm"] = part_dtm(a, work, budget)
            elif part == "recompute":
                results["recompute"] = bench_models(a, work, budget,
                                                    ["litv2_s", "litv2_s@keep-gelu", "litv2_s@recompute-dwconv"],
                                                    ["--train", "--memory"], "recompute")
            elif part == "data":
                results["data"] = part_data(a, work, budget, results.get("train bf16", {}).get("images_per_s"))
    from omegaconf import OmegaConf

    import torch
    machine = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if torch.cuda.is_available() and not a.smoke
               else f"CPU ({os.cpu_count()} cores), torch {torch.__version__}")
    results["workers"] = int(OmegaConf.load(REPO / "conf" / "data" / "imagenet.yaml").num_workers)
    text = report(a, results, machine)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)
    failed = [name for name, r in flat(results).items() if not r.get("ok")]
    print(f"report: {a.out}" + (f"; failed or not run: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    if failed:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
