#!/usr/bin/env python
"""Where the time goes: per-stage timings and the top operators of one model (inference or training).

    python scripts/profile_model.py --model litv2_s --batch-size 16            # CPU, fp32 inference
    python scripts/profile_model.py --model litv2_s --train                     # forward + backward
    python scripts/profile_model.py --model litv2_s --device cuda --amp bf16 --batch-size 64
    python scripts/profile_model.py --model litv2_s --linear-kernel addmm      # compare CPU GEMM kernels

Per-stage rows time each part of a LITv2 (patch embedding, the blocks of every stage, every DTM, the
head) on the activations the previous part produced (median of ``--rounds``); ``--memory`` adds each
part's peak memory above what was allocated when it started (CUDA max allocated; on CPU the peak of the
live tensor bytes it allocates).
The operator table is torch.profiler's self-time ranking over one full pass. ``--compile`` times and
profiles the full pass of ``torch.compile(model)`` (compiled before timing); the per-stage rows stay eager.

    python scripts/profile_model.py --model litv2_s --device cuda --amp bf16 --batch-size 64 --compile --memory
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    add_cpu_options, apply_cpu_options, cudnn_autotune, restored_process_settings,
)


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


def stage_parts(model, x) -> list[tuple[str, Callable[[], object]]]:
    """(part, call) for each part of a LITv2, each call fed with the previous part's output."""
    parts = [("patch_embed", lambda: model.patch_embed(x))]
    h = model.patch_embed(x)
    for i, stage in enumerate(model.layers):
        parts.append((f"stage{i + 1} blocks x{len(stage.blocks)}", lambda s=stage, inp=h: s.forward_blocks(inp)))
        h = stage.forward_blocks(h)
        if stage.downsample is not None:
            parts.append((f"stage{i + 1} -> {i + 2} DTM", lambda s=stage, inp=h: s.downsample(inp)))
            h = stage.downsample(h)
    parts.append(("norm + pool + head", lambda feats=h: model.forward_head(model.norm(feats))))
    return parts


def main(argv=None) -> dict:
    with restored_process_settings():
        return _main(argv)


def _main(argv=None) -> dict:
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
                   help="auto: LITv2 on litv2.accel's CPU kernels; addmm: the same with the CPU paths off (plain "
                        "F.linear/conv/GELU)")
    p.add_argument("--row-limit", type=int, default=15)
    p.add_argument("--memory", action="store_true", help="per-stage peak memory (MiB) next to the timings")
    p.add_argument("--compile", action="store_true",
                   help="time and profile the full pass under torch.compile(dynamic=False)")
    p.add_argument("--kwargs", default="", help="extra model kwargs, e.g. 'embed_dim=16,depths=[1,1,2,1]'")
    args = p.parse_args(argv)

    import timm
    import litv2  # noqa: F401  (registers the models)
    from litv2.accel import accelerate, cpu_fast_paths
    from litv2.models import LITv2
    from litv2.profiling import count_flops, peak_memory

    apply_cpu_options(args)
    cpu_fast_paths(args.linear_kernel == "auto")
    kwargs = {}
    for item in filter(None, _split_kwargs(args.kwargs)):
        k, v = item.split("=", 1)
        kwargs[k] = eval(v, {}, {})  # noqa: S307  (developer tool: literals like [1,1,2,1])
    device = torch.device(args.device)
    cudnn_autotune([device])
    model = timm.create_model(args.model, **kwargs).to(device).train(args.train)
    if isinstance(model, LITv2):  # as training runs it (model.accel=auto)
        accelerate(model)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    sync = _timer(device)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    grad = contextlib.nullcontext() if args.train else torch.inference_mode()

    run_model = torch.compile(model, dynamic=False) if args.compile else model

    def full_pass():
        out = run_model(x)
        if args.train:
            out.float().mean().backward()

    flops = count_flops(model, args.img_size)
    result = {"model": args.model, "gflops": flops / 1e9}
    with grad, autocast:
        if args.compile:
            full_pass()  # compiles; not timed
        total = time_call(full_pass, args.rounds, sync)
        result["total_ms"] = total
        result["img_per_s"] = args.batch_size / total * 1000
        print(f"{args.model}: batch {args.batch_size}, {args.img_size}px, {args.device}, {args.amp}, "
              f"{'train step' if args.train else 'inference'}, {torch.get_num_threads()} threads, "
              f"linear kernel {args.linear_kernel}{', compiled' if args.compile else ''}")
        passes = 3 if args.train else 1  # a backward pass costs about twice the forward's FLOPs
        print(f"full pass {total:.1f} ms = {result['img_per_s']:.2f} img/s; "
              f"{flops / 1e9:.3f} GFLOPs (MACs)/img -> {2 * passes * flops * args.batch_size / total / 1e6:.1f} "
              f"GFLOP/s achieved" + (" (forward + backward counted as 3x the forward)" if args.train else ""))
        if args.memory:
            result["peak_mib"] = peak_memory(full_pass, device) / 2 ** 20
            print(f"peak memory of the full pass: {result['peak_mib']:.1f} MiB "
                  f"({'max allocated on the device' if device.type == 'cuda' else 'live tensors allocated'})")
            if args.train:
                model.zero_grad(set_to_none=True)
        if isinstance(model, LITv2) and not args.train:
            parts = stage_parts(model, x)
            result["stages"] = {name: time_call(fn, args.rounds, sync) for name, fn in parts}
            if args.memory:
                result["stage_peak_mib"] = {name: peak_memory(fn, device, above_current=True) / 2 ** 20
                                            for name, fn in parts}
            eager = " (eager)" if args.compile else ""
            print(f"\n| part{eager} | ms | share |" + (" peak MiB |" if args.memory else "")
                  + "\n|---|---|---|" + ("---|" if args.memory else ""))
            for name, ms in result["stages"].items():
                mem = f" {result['stage_peak_mib'][name]:.1f} |" if args.memory else ""
                print(f"| {name} | {ms:.1f} | {ms / total:.0%} |{mem}")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            full_pass()
            sync()
            result["profiled_ms"] = (time.perf_counter() - start) * 1000
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # the profiler can slow a pass down (docs/performance.md): shares in the table are of the profiled pass, so
    # say how far it is from the timed one
    print(f"\nprofiled pass {result['profiled_ms']:.1f} ms = {result['profiled_ms'] / total:.2f}x the timed median "
          f"({total:.1f} ms); the operator table below is of the profiled pass")
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
