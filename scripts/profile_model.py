#!/usr/bin/env python
"""Where the time goes: per-stage timings and the top operators of one model (inference or training).

    python scripts/profile_model.py --model litv2_s --batch-size 16            # CPU, fp32 inference
    python scripts/profile_model.py --model litv2_s --train                     # forward + backward
    python scripts/profile_model.py --model litv2_s --device cuda --amp bf16 --batch-size 64
    python scripts/profile_model.py --model litv2_s --linear-kernel addmm      # compare CPU GEMM kernels

Per-stage rows time each part of a LITv2 (patch embedding, the blocks of every stage, every DTM, the
head) on the activations the previous part produced (median of ``--rounds``). The operator table is
torch.profiler's self-time ranking over one full pass.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import add_cpu_options, apply_cpu_options  # noqa: E402


def _timer(device: torch.device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return sync


def time_call(fn, rounds: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def stage_breakdown(model, x, rounds: int, sync) -> list[tuple[str, float]]:
    """(part, ms) for each part of a LITv2, each fed with the previous part's output."""
    rows = []
    h = model.patch_embed(x)
    rows.append(("patch_embed", time_call(lambda: model.patch_embed(x), rounds, sync)))
    for i, stage in enumerate(model.layers):
        inp = h
        rows.append((f"stage{i + 1} blocks x{len(stage.blocks)}", time_call(lambda: stage.forward_blocks(inp), rounds, sync)))
        h = stage.forward_blocks(inp)
        if stage.downsample is not None:
            blk_out = h
            rows.append((f"stage{i + 1} -> {i + 2} DTM", time_call(lambda: stage.downsample(blk_out), rounds, sync)))
            h = stage.downsample(blk_out)
    feats = h
    rows.append(("norm + pool + head", time_call(lambda: model.forward_head(model.norm(feats)), rounds, sync)))
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="litv2_s")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--train", action="store_true", help="profile forward + backward instead of inference")
    p.add_argument("--rounds", type=int, default=5)
    add_cpu_options(p)
    p.add_argument("--linear-kernel", choices=["auto", "addmm"], default="auto",
                   help="auto: LITv2 uses its oneDNN CPU kernels (litv2.models.layers); addmm: plain F.linear/conv/GELU")
    p.add_argument("--row-limit", type=int, default=15)
    p.add_argument("--kwargs", default="", help="extra model kwargs, e.g. 'embed_dim=16,depths=[1,1,2,1]'")
    args = p.parse_args(argv)

    import timm
    import litv2  # noqa: F401  (registers the models)
    from litv2.models.layers import cpu_fast_paths
    from litv2.profiling import count_flops

    apply_cpu_options(args)
    cpu_fast_paths(args.linear_kernel == "auto")
    kwargs = {}
    for item in filter(None, _split_kwargs(args.kwargs)):
        k, v = item.split("=", 1)
        kwargs[k] = eval(v, {}, {})  # noqa: S307  (developer tool: literals like [1,1,2,1])
    device = torch.device(args.device)
    model = timm.create_model(args.model, **kwargs).to(device).train(args.train)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    sync = _timer(device)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    grad = contextlib.nullcontext() if args.train else torch.inference_mode()

    def full_pass():
        out = model(x)
        if args.train:
            out.float().mean().backward()

    flops = count_flops(model, args.img_size)
    result = {"model": args.model, "gflops": flops / 1e9}
    with grad, autocast:
        total = time_call(full_pass, args.rounds, sync)
        result["total_ms"] = total
        result["img_per_s"] = args.batch_size / total * 1000
        print(f"{args.model}: batch {args.batch_size}, {args.img_size}px, {args.device}, {args.amp}, "
              f"{'train step' if args.train else 'inference'}, {torch.get_num_threads()} threads, "
              f"linear kernel {args.linear_kernel}")
        print(f"full pass {total:.1f} ms = {result['img_per_s']:.2f} img/s; "
              f"{flops / 1e9:.3f} GFLOPs (MACs)/img -> {2 * flops * args.batch_size / total / 1e6:.1f} GFLOP/s achieved")
        if hasattr(model, "layers") and hasattr(model, "patch_embed") and not args.train:
            rows = stage_breakdown(model, x, args.rounds, sync)
            result["stages"] = dict(rows)
            print("\n| part | ms | share |\n|---|---|---|")
            for name, ms in rows:
                print(f"| {name} | {ms:.1f} | {ms / total:.0%} |")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            full_pass()
            sync()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print()
    print(prof.key_averages().table(sort_by=sort, row_limit=args.row_limit))
    return result


def _split_kwargs(s: str) -> list[str]:
    """Split 'a=1,b=[1,2]' at top-level commas."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "[(" and 1 or (ch in "])" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


if __name__ == "__main__":
    main()
