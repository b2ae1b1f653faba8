#!/usr/bin/env python
"""Everything a GPU machine should check, in one run of about ten minutes, written up as one Markdown report.

    python scripts/gpu_check.py                 # on a GPU machine; writes docs/gpu_check.md
    python scripts/gpu_check.py --smoke         # CPU, tiny sizes: every part runs (what CI runs); outputs/gpu_check/

Parts, each a subprocess with its own time limit (a part that fails or runs out of time is reported, the rest run):

1. ``tests/test_gpu.py`` (CUDA kernels against the CPU, bf16, fused SDPA, compile, memory, the recomputes);
2. ``benchmark_models.py`` at batch 64, bf16 autocast, eager and compiled, LITv2-S against Swin-T, ConvNeXt-T,
   ResNet-50 and FasterViT-0, with train and test memory;
3. ``benchmark_dtm.py --devices cuda`` (torchvision's deformable conv against the resampled one);
4. the ConvFFN recompute A/B (``litv2_s``, ``@keep-gelu``, ``@recompute-dwconv``: train speed and memory);
5. 200 steps of LITv2-S training on synthetic data in bf16 and in fp16: the loss must stay finite and fall;
6. ``benchmark_data.py`` under the paper's training transform, against the training throughput of part 5.

The report reads the targets against the measurements: bf16 batch-64 inference >= 1.5x Swin-T and >= 1.0x
FasterViT-0, train memory <= 0.8x Swin-T, and an input pipeline (``data.num_workers`` of the ImageNet preset)
delivering >= 1.2x the training throughput. Figures are what ran here; nothing is estimated.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS = ("swin_tiny_patch4_window7_224", "convnext_tiny", "resnet50", "faster_vit_0_224")
TINY = ["++model.embed_dim=16", "++model.depths=[1,1,2,1]", "++model.num_heads=[1,2,4,8]"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, seconds per part")
    p.add_argument("--out", default=None, help="report path (default docs/gpu_check.md; smoke: outputs/gpu_check/)")
    p.add_argument("--steps", type=int, default=200, help="training steps per precision (part 5)")
    p.add_argument("--part-timeout", type=int, default=240,
                   help="seconds each part may take (twice that for the compiled model benchmark)")
    p.add_argument("--parts", default="tests,models,dtm,recompute,train,data", help="comma list of parts to run")
    args = p.parse_args(argv)
    if not args.smoke:
        import torch
        if not torch.cuda.is_available():
            p.error("no CUDA device here; --smoke runs the CPU check")
    args.out = Path(args.out or (REPO / "outputs" / "gpu_check" / "gpu_check.md" if args.smoke
                                 else REPO / "docs" / "gpu_check.md"))
    return args


def run(cmd: list[str], timeout: int, env: dict | None = None) -> dict:
    """One part: its command, exit status, wall time and the tail of its output."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", **(env or {})})
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    shown = " ".join(c if " " not in c else f"'{c}'" for c in cmd).replace(sys.executable, "python")
    return {"cmd": shown, "rc": rc, "seconds": round(time.perf_counter() - start, 1), "tail": out[-3000:]}


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / name), *args]


def part_tests(a, work: Path) -> dict:
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                 a.part_timeout, env={"LITV2_TEST_DEVICE": "cpu"} if a.smoke else None)
    last = [line for line in result["tail"].splitlines() if " passed" in line or " failed" in line]
    result["summary"] = last[-1] if last else "no pytest summary"
    result["ok"] = result["rc"] == 0
    return result


def part_models(a, work: Path, models: str, extra: list[str]) -> dict:
    out = work / models.replace(",", "_").replace("@", "-")[:80]
    device = ["--smoke", "--devices", "cpu"] if a.smoke else ["--devices", "cuda", "--gpu-batch-size", "64"]
    result = run(script("benchmark_models.py", "--models", models, "--train", "--memory", *device, *extra,
                        "--out-dir", str(out)), a.part_timeout * (2 if "--compile" in extra else 1))
    result["ok"] = result["rc"] == 0
    if result["ok"]:
        payload = json.loads((out / "benchmark_models.json").read_text())
        result["rows"], result["table"] = payload["rows"], (out / "benchmark_models.md").read_text()
    return result


def part_dtm(a, work: Path) -> dict:
    device = ["--smoke", "--devices", "cpu"] if a.smoke else ["--devices", "cuda", "--batch-size", "64"]
    result = run(script("benchmark_dtm.py", *device, "--out-dir", str(work / "dtm")), a.part_timeout)
    result["ok"] = result["rc"] == 0
    if result["ok"]:
        result["table"] = (work / "dtm" / "benchmark_dtm.md").read_text()
    return result


def part_train(a, work: Path, precision: str) -> dict:
    runs = work / f"runs_{precision}"
    size = (["data.img_size=32", "data.batch_size=8", "data.train_size=64", "data.val_size=16", *TINY] if a.smoke
            else ["data.img_size=224", "data.batch_size=64", "data.train_size=1024", "data.val_size=128"])
    result = run([sys.executable, str(REPO / "train.py"), "model=litv2_s", "data=synthetic", "aug=none",
                  f"trainer.precision={precision}", f"trainer.max_steps={a.steps}", "trainer.epochs=1000",
                  "trainer.log_every=10", "trainer.eval_every=1000", "sched.warmup_epochs=0", "optim.lr=1e-3",
                  "optim.lr_base_batch=64", "data.num_workers=4" if not a.smoke else "data.num_workers=0",
                  "logger=none", "profile.enabled=false", f"paths.runs_root={runs}", *size], a.part_timeout)
    rows = []
    for path in runs.rglob("metrics.jsonl"):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    rates = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r][1:]  # the first window compiles
    finite = bool(losses) and all(v is not None and math.isfinite(v) for v in losses)
    falls = finite and len(losses) >= 2 and losses[-1] < losses[0]
    result.update(ok=result["rc"] == 0 and finite and falls, losses=losses, finite=finite, falls=falls,
                  images_per_s=sorted(rates)[len(rates) // 2] if rates else None)
    return result


def part_data(a, work: Path, target: float | None) -> dict:
    sizes = (["--images", "16", "--jpeg-size", "96x72", "--seconds", "1", "--workers", "1", "--batches", "2",
              "--batch-size", "8"] if a.smoke else ["--seconds", "10", "--workers", "1,2,4"])
    has_dali = importlib.util.find_spec("nvidia.dali") is not None
    dali = ["--dali", "gpu", "--dali-threads", "1,4"] if has_dali and not a.smoke else []
    result = run(script("benchmark_data.py", *sizes, *dali, *(["--target", f"{target:.0f}"] if target else [])),
                 a.part_timeout)
    result["ok"] = result["rc"] == 0
    result["table"] = "\n".join(line for line in result["tail"].splitlines() if line.startswith("|"))
    for line in result["tail"].splitlines():
        if line.startswith("| 1 worker"):
            result["per_worker"] = float(line.strip().strip("|").split("|")[-1])
    return result


def ratio(rows: dict, a_name: str, b_name: str, key: str):
    a, b = rows.get(a_name, {}).get(key), rows.get(b_name, {}).get(key)
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


SMOKE = False  # a smoke run's figures are tiny-size CPU numbers: no verdicts


def verdict(value, ok) -> str:
    if value is None:
        return "not measured"
    return "(smoke run)" if SMOKE else ("**met**" if ok else "**not met**")


def report(a, results: dict, machine: str, workers: int) -> str:
    key = "cpu" if a.smoke else "gpu"
    lines = [f"# GPU check{' (CPU smoke run: tiny sizes, not figures to read)' if a.smoke else ''}", "",
             f"{machine}; {time.strftime('%Y-%m-%d')}; `python scripts/gpu_check.py{' --smoke' if a.smoke else ''}`",
             "", "| Part | Result | Time (s) |", "|---|---|---:|"]
    for name, r in results.items():
        state = "ok" if r.get("ok") else f"failed (exit {r['rc']})"
        lines.append(f"| {name} | {state}{' — ' + r['summary'] if 'summary' in r else ''} | {r['seconds']} |")
    models = results.get("models", {}).get("rows", {})
    lines += ["", "## Targets", "", "| Target | Measured | |", "|---|---:|---|"]
    for peer, bound, what in (("swin_tiny_patch4_window7_224", 1.5, "Swin-T"), ("faster_vit_0_224", 1.0,
                                                                                 "FasterViT-0")):
        v = ratio(models, "litv2_s", peer, f"{key}_img_s")
        lines.append(f"| bf16 batch-64 inference ≥ {bound}× {what} (eager) | {fmt(v)}× | "
                     f"{verdict(v, v is not None and v >= bound)} |")
        vc = ratio(models, "litv2_s@compile", peer + "@compile", f"{key}_img_s")
        lines.append(f"| the same, both compiled | {fmt(vc)}× | {verdict(vc, vc is not None and vc >= bound)} |")
    m = ratio(models, "litv2_s", "swin_tiny_patch4_window7_224", f"{key}_train_mem_mb")
    lines.append(f"| train memory ≤ 0.8× Swin-T | {fmt(m)}× | {verdict(m, m is not None and m <= 0.8)} |")
    train = results.get("train bf16", {}).get("images_per_s")
    per_worker = results.get("data", {}).get("per_worker")
    feed = per_worker * workers / train if per_worker and train else None
    lines.append(f"| input pipeline ≥ 1.2× training throughput ({workers} workers × {fmt(per_worker, '.0f')} img/s "
                 f"vs {fmt(train, '.0f')} img/s) | {fmt(feed)}× | {verdict(feed, feed is not None and feed >= 1.2)} |")
    for name in ("train bf16", "train fp16"):
        r = results.get(name)
        if r:
            lines.append(f"| {name}: loss finite and falling | {fmt(r['losses'][0] if r['losses'] else None, '.3f')} "
                         f"→ {fmt(r['losses'][-1] if r['losses'] else None, '.3f')} | "
                         f"{verdict(r['ok'], r['ok'])} |")
    for name in ("models", "recompute", "dtm", "data"):
        r = results.get(name, {})
        if "table" in r:
            lines += ["", f"## {name}", "", r["table"].strip()]
    lines += ["", "## Commands", ""] + [f"- {name}: `{r['cmd']}`" for name, r in results.items()]
    failed = [name for name, r in results.items() if not r.get("ok")]
    for name in failed:
        lines += ["", f"## {name}: output tail", "", "```", results[name]["tail"].strip()[-2000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    global SMOKE
    a = parse_args(argv)
    SMOKE = a.smoke
    parts = {p.strip() for p in a.parts.split(",") if p.strip()}
    if a.smoke:
        a.steps = min(a.steps, 12)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "tests" in parts:
            results["tests"] = part_tests(a, work)
        if "models" in parts:
            models = ",".join(["litv2_s", *PEERS[:1 if a.smoke else None]])
            results["models"] = part_models(a, work, models, [] if a.smoke else ["--compile"])
        if "dtm" in parts:
            results["dtm"] = part_dtm(a, work)
        if "recompute" in parts:
            results["recompute"] = part_models(a, work, "litv2_s,litv2_s@keep-gelu,litv2_s@recompute-dwconv", [])
        if "train" in parts:
            for precision in ("bf16", "fp16"):
                results[f"train {precision}"] = part_train(a, work, precision)
        if "data" in parts:
            results["data"] = part_data(a, work, results.get("train bf16", {}).get("images_per_s"))
    from omegaconf import OmegaConf

    import torch
    machine = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if torch.cuda.is_available() and not a.smoke
               else f"CPU ({os.cpu_count()} cores), torch {torch.__version__}")
    workers = int(OmegaConf.load(REPO / "conf" / "data" / "imagenet.yaml").num_workers)
    text = report(a, results, machine, workers)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)
    failed = [name for name, r in results.items() if not r.get("ok")]
    print(f"report: {a.out}" + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    if failed:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
