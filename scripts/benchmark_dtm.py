"""DTM's deformable conv: torchvision's ``deform_conv2d`` vs resampling + a strided conv, per DTM of a LITv2.

    python scripts/benchmark_dtm.py                                # litv2_s's three DTMs, batch 16, CPU (+ CUDA)
    python scripts/benchmark_dtm.py --devices cuda --batch-size 64 # the A/B a GPU session needs
    python scripts/benchmark_dtm.py --smoke                        # seconds-long check

For each deformable conv of the model (input shapes taken from one forward at ``--img-size``) three kernels
run on the same input, offsets (uniform in +-``--offset-px`` pixels, i.e. off the pixel grid, like a
trained DTM's), weights and bias: torchvision's op, and ``litv2.accel.dtm.resample_and_conv`` with each of
its two bilinear samplers, ``grid_sample`` (what compiled models and GPUs use) and ``embedding_bag`` (what the
accelerated model uses eager on CPU). Each is timed forward under inference mode, and forward + backward with gradients for
all four inputs. Timings are round-robin medians (milliseconds), one table row per kernel, with its speed-up
over torchvision's op and its largest output difference from it, so a row that is fast but wrong shows. On
CUDA the accelerated model takes torchvision's op eager; this script is how to decide whether that should change. fp32
throughout: LITv2 runs DTM in fp32 under autocast.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    add_cpu_options, add_gpu_options, apply_cpu_options, calls_per_sample, create_litv2, cudnn_autotune, fmt,
    machine_description, markdown_table, resolve_devices, restored_process_settings, round_robin,
)

KERNELS = ("torchvision", "grid_sample", "embedding_bag")  # the last two: resample_and_conv's samplers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="litv2_s")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--devices", default="auto", help="cpu, cuda or cpu,cuda (default: cpu + cuda if available)")
    p.add_argument("--offset-px", type=float, default=2.0, help="offsets uniform in +- this many pixels")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    add_cpu_options(p)
    add_gpu_options(p)
    p.add_argument("--smoke", action="store_true", help="64x64, batch 2, 1 round, CPU")
    p.add_argument("--out-dir", default="outputs/benchmark_dtm")
    args = p.parse_args(argv)
    if args.smoke:
        args.img_size, args.batch_size, args.rounds, args.warmup, args.devices = 64, 2, 1, 1, "cpu"
    if args.batch_size < 1 or args.rounds < 1 or args.img_size < 1:
        p.error("--batch-size, --rounds and --img-size must be >= 1")
    return args


def dtm_shapes(model_name: str, img_size: int) -> list[dict]:
    """Input shape, weight shape, stride and padding of every DeformConv2d of ``model_name``."""
    from litv2.models.litv2 import DeformConv2d

    model = create_litv2(model_name, img_size=img_size).eval()
    shapes = []
    for name, m in model.named_modules():
        if isinstance(m, DeformConv2d):
            m.register_forward_pre_hook(lambda mod, inp, name=name: shapes.append(
                dict(name=name, input=list(inp[0].shape[1:]), weight=list(mod.weight.shape), stride=mod.stride,
                     padding=mod.padding)))
    with torch.inference_mode():
        model(torch.zeros(1, 3, img_size, img_size))
    if not shapes:
        raise SystemExit(f"{model_name} has no deformable conv (DTM)")
    return shapes


def make_inputs(shape: dict, batch: int, offset_px: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    c, h, w = shape["input"]
    k, s, p = shape["weight"][-1], shape["stride"], shape["padding"]
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    x = torch.randn(batch, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    offset = (torch.rand(batch, 2 * k * k, ho, wo, generator=g) * 2 - 1) * offset_px
    weight = torch.randn(*shape["weight"], generator=g) / (c * k * k) ** 0.5
    bias = torch.randn(shape["weight"][0], generator=g)
    return tuple(t.to(device) for t in (x, offset, weight, bias))


def kernel_fn(kernel: str, shape: dict):
    from torchvision.ops import deform_conv2d

    from litv2.accel.dtm import resample_and_conv

    s, p = shape["stride"], shape["padding"]
    if kernel == "torchvision":
        return lambda x, o, w, b: deform_conv2d(x, o, w, b, stride=s, padding=p)
    return lambda x, o, w, b: resample_and_conv(x, o, w, b, s, p, sampler=kernel)


def _ratio(a, b) -> float | None:
    """``a / b`` for two timings; ``None`` when either is an error marker (e.g. OOM) instead of a time."""
    return a / b if isinstance(a, float) and isinstance(b, float) else None


def main(argv=None) -> dict:
    with restored_process_settings():
        return _main(argv)


def _main(argv=None) -> dict:
    args = parse_args(argv)
    apply_cpu_options(args)
    devices = resolve_devices(args.devices)
    cudnn_autotune(devices)
    shapes = dtm_shapes(args.model, args.img_size)

    results, table = [], []
    for device in devices:
        for shape in shapes:
            inputs = make_inputs(shape, args.batch_size, args.offset_px, device)
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
            fns, outputs = {}, {}
            for kernel in KERNELS:
                f = kernel_fn(kernel, shape)
                with torch.inference_mode():
                    outputs[kernel] = f(*inputs).float()

                def forward(f=f):
                    with torch.inference_mode():
                        return f(*inputs)

                def forward_backward(f=f):
                    f(*leaves).sum().backward()
                    for t in leaves:
                        t.grad = None

                fns[f"{kernel} fwd"], fns[f"{kernel} fwd+bwd"] = forward, forward_backward
            times, errors = round_robin(fns, device, rounds=args.rounds, warmup=args.warmup,
                                         calls_per_sample=calls_per_sample(device, args))
            ms = {k: errors.get(k) or 1e3 * statistics.median(times[k]) for k in fns}
            speedup = {k: {what: _ratio(ms[f"torchvision {what}"], ms[f"{k} {what}"]) for what in ("fwd", "fwd+bwd")}
                       for k in KERNELS}
            diff = {k: (outputs["torchvision"] - outputs[k]).abs().max().item() for k in KERNELS}
            results.append(dict(device=device.type, **shape, batch=args.batch_size, ms=ms, speedup=speedup,
                                max_abs_diff=diff))
            c, h, w = shape["input"]
            table += [[device.type, shape["name"], f"{c}x{h}x{w} -> {shape['weight'][0]}", k,
                       fmt(ms[f"{k} fwd"], ".2f"), fmt(speedup[k]["fwd"], ".2f"), fmt(ms[f"{k} fwd+bwd"], ".2f"),
                       fmt(speedup[k]["fwd+bwd"], ".2f"), f"{diff[k]:.1e}"] for k in KERNELS]
    headers = ["Device", "DTM", "Input -> out channels", "kernel", "fwd (ms)", "× torchvision", "fwd+bwd (ms)",
               "× torchvision", "max |diff|"]
    cmd = "python scripts/benchmark_dtm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = "; ".join(machine_description(d) for d in devices)
    md = (f"{args.model} DTM deformable convs, batch {args.batch_size}, {args.img_size}px, fp32, offsets +-"
          f"{args.offset_px:g} px, {args.rounds} round(s), median; {machine}; malloc {args.malloc}\n`{cmd}`\n\n"
          + markdown_table(headers, table))
    print(md)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark_dtm.md").write_text(md + "\n")
    payload = {"args": vars(args), "machine": machine, "results": results}
    (out / "benchmark_dtm.json").write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
