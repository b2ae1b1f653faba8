#!/usr/bin/env python
"""The memory-bound Triton kernels of ``litv2.accel.triton``, each timed at the shapes LITv2-S gives it, as a share of
the device's copy bandwidth; with ``--accuracy``, the Triton model against the plain one.

Which kernels: every op registered under ``torch.ops.litv2`` (listed from torch's dispatcher, not from a fixed list).
One training step of LITv2-S with ``kernels="triton"`` (batch 64, 224x224, bf16 autocast by default) runs under a
dispatch mode that records each call of a ``litv2::`` op with its arguments; every distinct call (op, shapes,
dtypes) is then replayed alone and timed (CUDA events, median). Its bytes moved are the bytes of its tensor inputs
and outputs (each read or written once: the least any kernel moves), and its rate is set against the device's
copy rate, ``dst.copy_(src)`` of a large buffer (read + write). An op registered but not called at this setting is
listed as such, untimed.

``--accuracy``: LITv2-S plain (``accel=auto``) and with ``kernels="triton"``, the same weights and batch, fp32 with
TF32 off: logits and every parameter's gradient must agree within 1e-4 (max |difference| <= 1e-4 * max(1, max
|plain|)).

``--smoke`` runs on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set here) with a tiny LITv2 at 32x32: it
proves the script works (each op at its first shape only); its figures are interpreter timings, not GPU ones, and are
labelled so.

    python scripts/benchmark_kernels.py                      # on a GPU: LITv2-S shapes at batch 64
    python scripts/benchmark_kernels.py --accuracy
    python scripts/benchmark_kernels.py --smoke --accuracy   # CPU, interpreter, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv[1:]:  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import fmt, machine_description, markdown_table, restored_process_settings  # noqa: E402

TINY = dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])
NAMESPACE = "litv2::"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="litv2_s")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast of the recorded step")
    p.add_argument("--reps", type=int, default=20, help="timed calls per kernel (median)")
    p.add_argument("--copy-mb", type=int, default=1024, help="size of the buffer the copy rate is measured on")
    p.add_argument("--accuracy", action="store_true", help="also compare the Triton model with the plain one")
    p.add_argument("--accuracy-batch", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, a tiny LITv2: seconds")
    p.add_argument("--out-dir", default="outputs/benchmark_kernels")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.img_size, args.reps, args.copy_mb, args.accuracy_batch = 2, 32, 1, 16, 2
    for name in ("batch_size", "img_size", "reps", "copy_mb", "accuracy_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def registered_ops() -> list[str]:
    """Every op of the ``litv2`` namespace the dispatcher knows (importing litv2.accel.triton.modules registers them
    all: the HiLo and DTM ops too)."""
    from litv2.accel.triton import modules  # noqa: F401

    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith(NAMESPACE))


def _signature(args) -> tuple:
    leaves, _ = tree_flatten(args)
    return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves)


class RecordLitv2Calls(TorchDispatchMode):
    """Records the first call of each distinct (op, argument shapes and dtypes) of the litv2 namespace, with copies
    of its arguments, and how often each was called."""

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, dict] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith(NAMESPACE):
            key = (name, _signature((args, kwargs)))
            if key not in self.calls:
                copy = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
                self.calls[key] = {"op": name, "func": func, "count": 0,
                                   "args": torch.utils._pytree.tree_map(copy, args),
                                   "kwargs": torch.utils._pytree.tree_map(copy, kwargs)}
            self.calls[key]["count"] += 1
        return func(*args, **kwargs)


def build(args, kernels: str | None, device: torch.device) -> torch.nn.Module:
    """The model (seeded: the same weights every time) on ``device``, then accelerated (the Triton kernels check the
    device they run on); no stochastic depth."""
    import timm

    import litv2  # noqa: F401  (registers litv2_*)
    from litv2.accel import accelerate

    torch.manual_seed(0)
    kw = dict(TINY, img_size=args.img_size) if args.smoke else {}
    model = timm.create_model(args.model, pretrained=False, drop_path_rate=0.0, **kw)
    return accelerate(model.to(device), kernels=kernels)


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def record_step(args, device: torch.device) -> dict:
    """One training step (forward, loss, backward) of the Triton model under :class:`RecordLitv2Calls`."""
    model = build(args, "triton", device).train()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    target = torch.randint(0, 1000, (args.batch_size,), device=device)
    recorder = RecordLitv2Calls()
    with recorder:
        with autocast(device, args.precision):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
    return recorder.calls


def tensor_bytes(tree) -> int:
    leaves, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def time_call(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median seconds of one call (CUDA events on a GPU; the clock on CPU)."""
    times = []
    if device.type == "cuda":
        for _ in range(warmup):
            fn()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(warmup):
            fn()
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_rate(device: torch.device, megabytes: int, reps: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (bytes read + bytes written) on a buffer of ``megabytes``."""
    src = torch.empty(megabytes << 20, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_call(lambda: dst.copy_(src), device, max(reps, 3))


def measure_kernels(args, device: torch.device) -> tuple[list[dict], float]:
    calls = list(record_step(args, device).values())
    if args.smoke:  # the interpreter is slow: each op at its first shape only
        first: dict[str, dict] = {}
        for call in calls:
            first.setdefault(call["op"], call)
        calls = list(first.values())
    copy = copy_rate(device, args.copy_mb, args.reps)
    rows = []
    for call in calls:
        func, a, kw = call["func"], call["args"], call["kwargs"]
        out = func(*a, **kw)  # (the warm-up call)
        moved = tensor_bytes((a, kw)) + tensor_bytes(out)
        seconds = time_call(lambda: func(*a, **kw), device, args.reps, warmup=0 if args.smoke else 3)
        shapes = [list(t.shape) for t in tree_flatten(a)[0] if isinstance(t, torch.Tensor)][:1]
        rows.append({"op": call["op"], "input": shapes[0] if shapes else None,
                     "dtype": str(next((t.dtype for t in tree_flatten(a)[0] if isinstance(t, torch.Tensor)), "-")
                                  ).replace("torch.", ""),
                     "calls_per_step": call["count"], "us": seconds * 1e6, "bytes": moved,
                     "gb_s": moved / seconds / 1e9, "pct_copy": 100 * moved / seconds / copy})
    return rows, copy


def accuracy(args, device: torch.device) -> dict:
    """Plain and Triton LITv2 on the same weights and batch in fp32, TF32 off: the worst logits and gradient error,
    each as max |difference| / max(1, max |plain|)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(1)
        x = torch.randn(args.accuracy_batch, 3, args.img_size, args.img_size, device=device)
        results = []
        for kernels in (None, "triton"):
            model = build(args, kernels, device).train()
            logits = model(x)
            logits.float().square().mean().backward()
            results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
            del model
        (plain, plain_grads), (triton_, triton_grads) = results

        def err(a, b):
            return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1)).item()

        grad_errs = {n: err(triton_grads[n], g) for n, g in plain_grads.items() if n in triton_grads}
        worst = max(grad_errs, key=grad_errs.get)
        missing = sorted(set(plain_grads) ^ set(triton_grads))
        result = {"logits_err": err(triton_, plain), "grad_err": grad_errs[worst], "worst_grad": worst,
                  "grads_compared": len(grad_errs), "grads_missing": missing, "tolerance": 1e-4}
        result["ok"] = result["logits_err"] <= 1e-4 and result["grad_err"] <= 1e-4 and not missing
        return result
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def report(args, device, rows, copy, registered, acc, machine) -> str:
    title = ("Triton kernel benchmark (CPU smoke run under Triton's interpreter: proves the script works, not GPU "
             "figures)" if args.smoke else "Triton kernel benchmark")
    lines = [f"{title}: {args.model}{' (tiny)' if args.smoke else ''} training step at batch {args.batch_size}, "
             f"{args.img_size}x{args.img_size}, {args.precision}; {machine}; copy rate {copy / 1e9:.1f} GB/s "
             f"(read + write of {args.copy_mb} MiB); median of {args.reps} call(s)", ""]
    lines.append(markdown_table(
        ["Op", "Input", "dtype", "Calls / step", "µs", "MB moved", "GB/s", "% of copy"],
        [[r["op"], "x".join(map(str, r["input"] or [])), r["dtype"], r["calls_per_step"], fmt(r["us"], ".1f"),
          fmt(r["bytes"] / 1e6, ".2f"), fmt(r["gb_s"], ".1f"), fmt(r["pct_copy"], ".1f")] for r in rows]))
    called = {r["op"] for r in rows}
    idle = [op for op in registered if op not in called]
    lines += ["", f"Registered litv2 ops: {', '.join(registered) or 'none'}"]
    if idle:
        lines.append(f"Not called by {args.model} at this setting (not timed): {', '.join(idle)}")
    if acc is not None:
        lines += ["", f"Accuracy, fp32, TF32 off, batch {args.accuracy_batch}: logits {acc['logits_err']:.2e}, worst "
                      f"gradient {acc['grad_err']:.2e} ({acc['worst_grad']}, {acc['grads_compared']} compared"
                      f"{', missing: ' + ', '.join(acc['grads_missing']) if acc['grads_missing'] else ''}); "
                      f"tolerance 1e-4: {'within' if acc['ok'] else 'NOT within'}"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with restored_process_settings():
        return _main(args, argv)


def _main(args, argv=None) -> dict:
    from litv2.accel.triton import TritonUnavailable, import_ops

    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; --smoke runs the CPU check under Triton's interpreter")
    try:
        ops = import_ops()
        ops.check_device(device)
    except TritonUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    t0 = time.perf_counter()
    registered = registered_ops()
    rows, copy = measure_kernels(args, device)
    acc = accuracy(args, device) if args.accuracy else None
    machine = machine_description(device)
    md = report(args, device, rows, copy, registered, acc, machine)
    cmd = "python scripts/benchmark_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = md.replace("\n", f"\n`{cmd}`\n", 1)
    print(md)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark_kernels.md").write_text(md + "\n")
    payload = {"args": vars(args), "machine": machine, "smoke": args.smoke, "copy_gb_s": copy / 1e9,
               "registered": registered, "kernels": rows, "accuracy": acc,
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "benchmark_kernels.json").write_text(json.dumps(payload, indent=2, default=str))
    return payload


if __name__ == "__main__":
    main()
