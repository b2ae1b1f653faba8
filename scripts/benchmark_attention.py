#!/usr/bin/env python
"""Single-attention-layer benchmark: supplementary Table IV and, with ``--resolutions``, paper Fig. 3.

Table IV setting (default): one attention layer on a 14x14 map (the 1/16 scale of a 224x224 image),
dim 768 = 12 heads x 64, batch 64, every method with its own default at that scale: HiLo (alpha 0.9,
s 2), MSA, SRA (PVT, sr 2), Local Window / Shifted Window (Swin, window 7, relative position bias),
T-MSA (Twins: LSA window 7 and GSA sr 2, one row each), XCA (timm's XCiT layer), Linformer (k 256),
Performer (FAVOR+, 256 features), Cross Window (CSWin, stripes of 7 with LePE), VAN (large kernel
attention), HorNet (gnConv, order 4), Focal (Focal-T's two levels: window 7, expand 3, 3x3 pooled
windows), DAT (deformable attention, DAT-T's 1/16-scale offset network: 3 groups, 5x5 kernel),
QuadTree (QuadTree-B's 1/16-scale setting: two levels, top 8).
Params and FLOPs (fvcore, one image, MAC convention) are deterministic; throughput is measured
round-robin over the methods (warm-up, several rounds, median).

``--resolutions 224,448,...`` (Fig. 3) grows the map (side = resolution / 16) and reports FLOPs,
throughput and peak train / test memory per method; a method that runs out of memory (or takes more than
``--max-seconds`` for one pass) is marked OOM / slow and skipped at larger sizes.
``--in-model litv2_s`` measures the whole LITv2-S with each attention of the ablation instead (Fig. 3's
own setting; methods hilo, msa, sra, wmsa, tmsa, input resolution instead of map side).

Examples::

    python scripts/benchmark_attention.py                       # Table IV (CPU, + GPU column if CUDA)
    python scripts/benchmark_attention.py --resolutions fig3 --batch-size 8 --max-seconds 60
    python scripts/benchmark_attention.py --in-model litv2_s --resolutions 224,384,512 --batch-size 16
    python scripts/benchmark_attention.py --smoke                # seconds; FLOP/param columns still exact
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    add_cpu_options, add_gpu_options, apply_cpu_options, calls_per_sample, cudnn_autotune, fmt, free_memory,
    is_oom, machine_description, markdown_table, median_rate, resolve_devices, restored_process_settings, round_robin,
)

from litv2.accel import accelerate  # noqa: E402  (every layer on the same kernels, as in the model)
from litv2.models.attentions import (  # noqa: E402
    ATTENTION_CHOICES, CrossShapedWindowAttention, DeformableAttention, FocalAttention, LargeKernelAttention,
    LinformerAttention, LocallyGroupedAttention, MultiHeadSelfAttention, PerformerAttention, QuadTreeAttention,
    RecursiveGatedConv, SpatialReductionAttention, TokenAttention, WindowAttention,
)
from litv2.models.hilo import HiLo  # noqa: E402
from litv2.profiling import count_flops_module, count_params, peak_memory  # noqa: E402

FIG3_RESOLUTIONS = "224,320,448,512,640,768,896,1024"  # --resolutions fig3
SDPA_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}  # --sdpa
# Supplementary Table IV (params M, FLOPs M) for the rows this script reproduces.
PAPER_TABLE_IV = {
    "MSA": (2.36, 521.4), "SRA": (4.72, 419.6), "Local Window": (2.36, 477.2), "Shifted Window": (2.36, 477.2),
    "XCA": (2.36, 481.7), "Linformer": (2.46, 616.6), "Performer": (2.36, 617.2), "VAN": (1.83, 358.0),
    "HorNet": (2.23, 436.5), "Cross Window": (2.37, 493.3), "Focal": (2.44, 526.9),
    "DAT": (2.38, 528.7), "QuadTree": (5.33, 613.3), "HiLo": (2.20, 298.3),
}
# Rows whose Table IV FLOPs leave out work the layer does (footnotes under the table).
PAPER_FLOPS_NOTES = {
    "QuadTree": "Table IV's FLOPs leave out QuadTree's fine level, which it runs in two CUDA kernels fvcore "
                "does not trace (inferred: the count without it matches to the digit): 196 queries x 32 "
                "candidate keys x 768 channels for the scores and as many for the values, 9.6 M. This layer "
                "runs them as matmuls, and its count includes them.",
}


def _xca(dim: int, heads: int) -> nn.Module:
    from timm.models.xcit import XCA
    return TokenAttention(XCA(dim, num_heads=heads, qkv_bias=True))


def dat_groups(heads: int) -> int:
    """DAT's offset groups for ``heads`` heads: 4 heads per group as DAT-T (3 groups of its 12 heads at
    1/16 scale), or the nearest smaller count that divides ``heads``."""
    return next(g for g in range(max(1, heads // 4), 0, -1) if heads % g == 0)


def layer_methods(dim: int, heads: int) -> dict[str, tuple[str, Callable[[int], nn.Module]]]:
    """key -> (display name, builder(map side) -> module) for the single-layer benchmark."""
    return {
        "hilo": ("HiLo", lambda s: HiLo(dim, heads, window_size=2, alpha=0.9)),
        "hilo@triton": ("HiLo (Triton)", lambda s: HiLo(dim, heads, window_size=2, alpha=0.9)),
        "msa": ("MSA", lambda s: MultiHeadSelfAttention(dim, heads)),
        "sra": ("SRA", lambda s: SpatialReductionAttention(dim, heads, sr_ratio=2)),
        "local": ("Local Window", lambda s: WindowAttention(dim, heads, window_size=7, shift_size=0)),
        "shifted": ("Shifted Window", lambda s: WindowAttention(dim, heads, window_size=7, shift_size=3)),
        "tmsa-lsa": ("T-MSA (LSA)", lambda s: LocallyGroupedAttention(dim, heads, window_size=7)),
        "tmsa-gsa": ("T-MSA (GSA)", lambda s: SpatialReductionAttention(dim, heads, sr_ratio=2)),
        "xca": ("XCA", lambda s: _xca(dim, heads)),
        "linformer": ("Linformer", lambda s: LinformerAttention(dim, heads, seq_len=s * s, k=256)),
        "performer": ("Performer", lambda s: PerformerAttention(dim, heads, num_features=256)),
        "crosswin": ("Cross Window", lambda s: CrossShapedWindowAttention(dim, heads, split_size=7)),
        "van": ("VAN", lambda s: LargeKernelAttention(dim)),
        "hornet": ("HorNet", lambda s: RecursiveGatedConv(dim, order=4)),
        "focal": ("Focal", lambda s: FocalAttention(dim, heads, window_size=7, expand_size=3, focal_window=3)),
        "dat": ("DAT", lambda s: DeformableAttention(dim, heads, map_size=s, groups=dat_groups(heads), kernel_size=5)),
        "quadtree": ("QuadTree", lambda s: QuadTreeAttention(dim, heads, levels=2, topk=8)),
    }


def model_methods(model_name: str) -> dict[str, tuple[str, Callable[[int], nn.Module]]]:
    """key -> (display name, builder(resolution) -> model) for ``--in-model`` (paper Table 4 / Fig. 3)."""
    import timm

    import litv2  # noqa: F401  (registers the LITv2 models with timm)

    names = {"hilo": "HiLo", "msa": "MSA", "sra": "SRA", "wmsa": "W-MSA", "tmsa": "T-MSA"}
    return {a: (f"{model_name} {names[a]}", lambda r, a=a: timm.create_model(model_name, attention=a))
            for a in ATTENTION_CHOICES}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="all", help="comma list of method keys (default: all); see --list")
    p.add_argument("--list", action="store_true", help="print the method keys and exit")
    p.add_argument("--in-model", default=None, metavar="MODEL",
                   help="benchmark a whole LITv2 model per ablation attention (e.g. litv2_s) instead of one layer")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--map-size", type=int, default=14, help="map side of the Table IV run (1/16 of 224)")
    p.add_argument("--img-size", type=int, default=224, help="input resolution of the --in-model table run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolutions", default=None,
                   help="comma list of input resolutions, or 'fig3' for " + FIG3_RESOLUTIONS +
                        " (Fig. 3); map side = resolution / 16 for one layer")
    p.add_argument("--devices", default="auto", help="comma list of cpu,cuda (default: cpu, plus cuda if available; "
                   "--resolutions uses cuda if available, else cpu)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on GPU (default fp32, like the paper)")
    p.add_argument("--sdpa", choices=list(SDPA_BACKENDS), default="auto",
                   help="the only scaled_dot_product_attention backend allowed (e.g. flash: HiLo and MSA on the "
                        "flash kernel); auto: torch's choice")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    add_cpu_options(p)
    add_gpu_options(p)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop timing rounds after this long; with --resolutions also the longest single pass "
                        "before a method is skipped at larger sizes")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns of --resolutions")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long check: batch 2, 1 round, 1 warm-up, CPU only (params/FLOPs unchanged)")
    p.add_argument("--out-dir", default="outputs/benchmark_attention", help="where the .md/.json/.png go")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.rounds, args.warmup, args.devices = 2, 1, 1, "cpu"
        args.max_seconds = args.max_seconds or 30.0
    for name in ("batch_size", "rounds", "dim", "heads", "map_size", "img_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.dim % args.heads:
        p.error(f"--heads {args.heads} must divide --dim {args.dim}")
    return args


# Methods run on litv2.accel's Triton kernels (accelerate(kernels="triton")): on CUDA, or on CPU under Triton's
# interpreter; only when named (not in "all"). Their params and FLOPs are the plain layer's.
TRITON_METHODS = {"hilo@triton"}


def select_methods(all_methods: dict, spec: str) -> dict:
    if spec == "all":
        return {k: v for k, v in all_methods.items() if k not in TRITON_METHODS}
    keys = [k.strip().lower() for k in spec.split(",") if k.strip()]
    unknown = [k for k in keys if k not in all_methods]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(all_methods)}")
    return {k: all_methods[k] for k in keys}


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_input(args, size: int, batch: int, device) -> torch.Tensor:
    if args.in_model:
        return torch.randn(batch, 3, size, size, device=device)
    return torch.randn(batch, size, size, args.dim, device=device)


def peak_memory_mb(module: nn.Module, x: torch.Tensor, train: bool, amp: bool) -> float | str:
    """Peak memory of one forward (test) or forward + backward (train): CUDA max allocated, CPU peak of
    the live tensor bytes the pass allocates (:func:`litv2.profiling.peak_memory`)."""
    device = x.device
    module.train(train)
    ctx = contextlib.nullcontext() if train else torch.inference_mode()
    def step():
        with ctx, _autocast(device, amp):
            out = module(x)
            if train:
                out.float().mean().backward()

    try:
        free_memory(device)
        return peak_memory(step, device) / 2 ** 20
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        return "OOM"
    finally:
        module.zero_grad(set_to_none=True)
        module.eval()
        free_memory(device)


def static_figures(module: nn.Module, args, size: int) -> tuple[int, int]:
    """(params, FLOPs of one sample) - FLOPs traced on CPU with a batch-1 input."""
    return count_params(module), count_flops_module(module, (make_input(args, size, 1, "cpu"),))


def forward_fn(module: nn.Module, x: torch.Tensor, amp: bool) -> Callable[[], object]:
    def run():
        with torch.inference_mode(), _autocast(x.device, amp):
            return module(x)
    return run


# ---- Table IV ---------------------------------------------------------------------------------------

def run_table(args, methods: dict, devices: list[torch.device]) -> dict:
    size = args.img_size if args.in_model else args.map_size
    results = {}
    modules = {}
    for key, (name, build) in methods.items():
        torch.manual_seed(0)
        m = accelerate(build(size)).eval()
        params, flops = static_figures(m, args, size)
        modules[key] = m
        results[key] = {"name": name, "params": params, "flops": flops}
    for device in devices:
        fns, unavailable = {}, {}
        for key, m in modules.items():
            m.to(device)
            if key in TRITON_METHODS:
                from litv2.accel.triton import TritonUnavailable
                try:
                    accelerate(m, kernels="triton")
                except TritonUnavailable:
                    unavailable[key] = "n/a (Triton kernels: CUDA, or TRITON_INTERPRET=1)"
                    continue
            fns[key] = forward_fn(m, make_input(args, size, args.batch_size, device), args.amp)
        times, errors = round_robin(fns, device, rounds=args.rounds, warmup=args.warmup, max_seconds=args.max_seconds,
                                    calls_per_sample=calls_per_sample(device, args))
        for key in modules:
            if key in unavailable:
                results[key][f"{device.type}_img_s"], results[key][f"{device.type}_rounds"] = unavailable[key], 0
                continue
            results[key][f"{device.type}_img_s"] = errors.get(key) or median_rate(times[key], args.batch_size)
            results[key][f"{device.type}_rounds"] = len(times[key])
        for m in modules.values():
            m.cpu()
        del fns
        free_memory(device)
    return results


def table_markdown(results: dict, devices: list[torch.device], args) -> str:
    paper = not args.in_model and args.dim == 768 and args.heads == 12 and args.map_size == 14
    headers = ["Method", "Params (M)", "FLOPs (M)" if not args.in_model else "FLOPs (G)"]
    headers += [f"{d.type.upper()} (img/s)" for d in devices]
    if paper:
        headers += ["Table IV Params (M)", "Table IV FLOPs (M)"]
    rows = []
    for r in results.values():
        flops = r["flops"] / 1e6 if not args.in_model else r["flops"] / 1e9
        row = [r["name"], f"{r['params'] / 1e6:.2f}", f"{flops:.1f}" if not args.in_model else f"{flops:.2f}"]
        row += [fmt(r.get(f"{d.type}_img_s"), ".0f") for d in devices]
        if paper:
            ref = PAPER_TABLE_IV.get(r["name"])
            mark = "*" * (1 + list(PAPER_FLOPS_NOTES).index(r["name"])) if r["name"] in PAPER_FLOPS_NOTES else ""
            row += [fmt(ref[0], ".2f"), fmt(ref[1], ".1f") + mark] if ref else ["-", "-"]
        rows.append(row)
    notes = [f"{'*' * (i + 1)} {name}: {text}" for i, (name, text) in enumerate(PAPER_FLOPS_NOTES.items())
             if paper and any(r["name"] == name for r in results.values())]
    return markdown_table(headers, rows) + "".join("\n\n" + n for n in notes)


def plot_table(results: dict, devices: list[torch.device], args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results.values()]
    colors = ["tab:red" if "HiLo" in n else "tab:blue" for n in names]
    panels = [("FLOPs (M)" if not args.in_model else "FLOPs (G)",
               [r["flops"] / (1e6 if not args.in_model else 1e9) for r in results.values()])]
    for d in devices:
        vals = [r.get(f"{d.type}_img_s") for r in results.values()]
        panels.append((f"{d.type.upper()} throughput (img/s)", [v if isinstance(v, float) else 0.0 for v in vals]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * len(names) + 1.5), squeeze=False)
    for ax, (title, vals) in zip(axes[0], panels):
        ax.barh(range(len(names)), vals, color=colors)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    what = f"{args.in_model} at {args.img_size}" if args.in_model else (
        f"one layer, {args.map_size}x{args.map_size} map, dim {args.dim}, {args.heads} heads")
    fig.suptitle(f"Attention benchmark ({what}, batch {args.batch_size})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- Fig. 3: growing resolution -----------------------------------------------------------------------

def run_resolutions(args, methods: dict, device: torch.device, resolutions: list[int]) -> dict:
    """{key: {"name", "points": [{res, side, params, flops, img_s, train_mem_mb, test_mem_mb, status}]}}."""
    results = {key: {"name": name, "points": []} for key, (name, _) in methods.items()}
    alive = set(methods)
    for res in resolutions:
        size = res if args.in_model else res // 16
        if size < 1:
            raise SystemExit(f"resolution {res} gives an empty map")
        mods, fns = {}, {}
        for key, (name, build) in methods.items():
            if key not in alive:
                continue
            point = {"res": res, "side": size, "status": "ok"}
            results[key]["points"].append(point)
            try:
                torch.manual_seed(0)
                m = accelerate(build(size)).eval()
                point["params"], point["flops"] = static_figures(m, args, size)
                m.to(device)
                x = make_input(args, size, args.batch_size, device)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                point["status"] = "OOM"
                alive.discard(key)
                free_memory(device)
                continue
            mods[key] = (m, x)
            fns[key] = forward_fn(m, x, args.amp)
        if not fns:
            break
        times, errors = round_robin(fns, device, rounds=args.rounds, warmup=args.warmup, max_seconds=args.max_seconds,
                                    calls_per_sample=calls_per_sample(device, args))
        for key, (m, x) in mods.items():
            point = results[key]["points"][-1]
            if key in errors:
                point["status"] = errors[key]
                alive.discard(key)
                continue
            point["img_s"] = median_rate(times[key], args.batch_size)
            if not args.no_memory:
                for train in (True, False):
                    mem = peak_memory_mb(m, x, train, args.amp)
                    point["train_mem_mb" if train else "test_mem_mb"] = mem
                    if mem == "OOM":
                        point["status"] = "OOM"
                        alive.discard(key)
            if args.max_seconds is not None and times[key] and min(times[key]) > args.max_seconds:
                point["status"] = "slow"
                alive.discard(key)
        del mods, fns
        free_memory(device)
    return results


def resolutions_markdown(results: dict, args) -> str:
    unit = 1e9
    headers = ["Method", "Resolution", "Map", "Params (M)", "FLOPs (G)", "Throughput (img/s)",
               "Train mem (MB)", "Test mem (MB)", "Status"]
    rows = []
    for r in results.values():
        for p in r["points"]:
            params, flops = p.get("params"), p.get("flops")
            rows.append([r["name"], p["res"], f"{p['side']}x{p['side']}", fmt(params and params / 1e6, ".2f"),
                         fmt(flops and flops / unit, ".2f"), fmt(p.get("img_s"), ".1f"),
                         fmt(p.get("train_mem_mb"), ".0f"), fmt(p.get("test_mem_mb"), ".0f"), p["status"]])
    return markdown_table(headers, rows)


def plot_resolutions(results: dict, args, device: torch.device, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("flops", "FLOPs (G)", 1e9), ("img_s", "Throughput (img/s)", 1.0)]
    if not args.no_memory:
        panels += [("train_mem_mb", "Train memory (MB)", 1.0), ("test_mem_mb", "Test memory (MB)", 1.0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    # one colour per method while tab10 lasts, then dashed lines with square markers (16 methods)
    styles = [dict(color=plt.get_cmap("tab10")(i % 10), ls="-" if i < 10 else "--", marker="o" if i < 10 else "s")
              for i in range(len(results))]
    for ax, (field, title, scale) in zip(axes[0], panels):
        for r, style in zip(results.values(), styles):
            xs, ys, crosses = [], [], []
            for p in r["points"]:
                v = p.get(field)
                if p["status"] != "ok" and field != "flops" and not isinstance(v, float):
                    crosses.append(p["res"])
                elif isinstance(v, (int, float)):
                    xs.append(p["res"])
                    ys.append(v / scale)
            ax.plot(xs, ys, ms=3, label=r["name"], lw=2.5 if r["name"].endswith("HiLo") else 1.2, **style)
            for c in crosses:  # the paper's black cross for out-of-memory
                ax.plot([c], [ys[-1] if ys else 0.0], marker="x", color="black", ms=9, mew=2)
        ax.set_title(title)
        ax.set_xlabel("input resolution")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    what = args.in_model or f"one layer (dim {args.dim}, {args.heads} heads, map = res/16)"
    fig.suptitle(f"{what}, batch {args.batch_size}, {device.type}; x = OOM / over --max-seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    with restored_process_settings():
        return _main(argv)


def sdpa_backend(name: str):
    """``--sdpa``: a context that allows only that ``scaled_dot_product_attention`` backend (auto: all)."""
    if SDPA_BACKENDS[name] is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


def _main(argv=None) -> dict:
    args = parse_args(argv)
    methods = model_methods(args.in_model) if args.in_model else layer_methods(args.dim, args.heads)
    if args.list:
        print("\n".join(f"{k}: {v[0]}" for k, v in methods.items()))
        return {}
    methods = select_methods(methods, args.methods)
    apply_cpu_options(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = FIG3_RESOLUTIONS if args.resolutions == "fig3" else args.resolutions
    try:
        resolutions = sorted({int(r) for r in spec.split(",") if r.strip()}) if spec else None
    except ValueError:
        raise SystemExit(f"--resolutions must be a comma list of integers or 'fig3', got {args.resolutions!r}")
    devices = resolve_devices(args.devices, auto_gpu_only=resolutions is not None)
    cudnn_autotune(devices)
    t0 = time.perf_counter()
    with sdpa_backend(args.sdpa):
        results, table, stem, machine = _run(args, methods, devices, resolutions, out_dir)
    header = (f"Attention benchmark: batch {args.batch_size}, {args.rounds} round(s) round-robin (median), "
              f"{'bf16 autocast' if args.amp else 'fp32'}{'' if args.sdpa == 'auto' else f', SDPA {args.sdpa} only'}"
              f"; {machine}\n"
              f"`python {' '.join(sys.argv) if argv is None else 'scripts/benchmark_attention.py ' + ' '.join(argv)}`")
    print(header + "\n\n" + table)
    (out_dir / f"{stem}.md").write_text(header + "\n\n" + table + "\n")
    payload = {"args": vars(args), "machine": machine, "seconds": round(time.perf_counter() - t0, 1), "results": results}
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    if not args.no_plot:
        print(f"plot: {out_dir / (stem + '.png')}")
    return payload


def _run(args, methods, devices, resolutions, out_dir) -> tuple[dict, str, str, str]:
    if resolutions:
        device = devices[0]
        results = run_resolutions(args, methods, device, resolutions)
        table = resolutions_markdown(results, args)
        stem = "attention_resolutions" if not args.in_model else f"{args.in_model}_attention_resolutions"
        if not args.no_plot:
            plot_resolutions(results, args, device, out_dir / f"{stem}.png")
        machine = machine_description(device)
    else:
        results = run_table(args, methods, devices)
        table = table_markdown(results, devices, args)
        stem = "attention_table" if not args.in_model else f"{args.in_model}_attention_table"
        if not args.no_plot:
            plot_table(results, devices, args, out_dir / f"{stem}.png")
        machine = "; ".join(machine_description(d) for d in devices)
    return results, table, stem, machine


if __name__ == "__main__":
    main()
