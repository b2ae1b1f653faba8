#!/usr/bin/env python
"""Inference (and optionally training) speed of LITv2-S/M/B next to peer models (paper Table 1 rows in timm).

Models are measured alternately in one run (round-robin: warm-up, then ``--rounds`` rounds visiting every
model, median per model), so drifting machine load affects all alike. Defaults follow the paper's
protocol where this machine allows: CPU fp32 at batch 16 (``--batch-size``) and, when CUDA is available,
bf16 autocast at batch 64 (``--gpu-batch-size``); input 224x224. Params and GFLOPs (fvcore, MACs, one
image) come from :mod:`litv2.profiling`. The machine's ``torch.mm`` GFLOP/s (fp32 on CPU, the GPU run's
precision on GPU) is measured first so each model's achieved FLOP rate can be read as a share of that
peak (``2 * GMACs * img/s / peak``).

``--modes`` times every model in each of several execution modes, one row per model and mode: ``eager`` (rows
``<name>``), ``compile`` (``<name>@compile``: ``torch.compile(dynamic=False)``, compiled during the warm-up, which
is not timed; ``--compile`` is ``--modes eager,compile``), ``reduce-overhead`` and ``max-autotune``
(``<name>@reduce-overhead``, ...: ``torch.compile`` in that mode; reduce-overhead replays CUDA graphs, at training
too) and ``cudagraph`` (``<name>@cudagraph``: the eager forward captured in a CUDA graph and replayed,
:mod:`litv2.accel.cudagraphs`; inference on CUDA only, "n/a" elsewhere). The table marks each model's fastest mode
per column with a ``*``. ``--tf32 on|off`` sets TF32 for fp32 matmuls and convolutions on the GPU (torch's own
default otherwise: matmuls off, convolutions on). ``--inductor-freezing`` lets inductor fold and pre-pack
the weights of inference graphs. ``--memory`` adds peak train (forward + backward) and test memory at the
run's batch sizes (:func:`litv2.profiling.measure_memory`: CUDA max allocated, weights included; CPU
peak of the tensor bytes the step allocates and holds, allocator-independent, weights excluded), the
paper's Table 1 columns.

Weights are never downloaded (``pretrained=False``); FasterViT comes from the ``fastervit`` package
(registered with timm on import) and is timed at inference in its deploy mode (see :func:`set_deploy`).

Examples::

    python scripts/benchmark_models.py                                   # default set, CPU (+ GPU if present)
    python scripts/benchmark_models.py --models default,large --train    # + Swin-S/B, ConvNeXt-S/B, ...
    python scripts/benchmark_models.py --models litv2_s,resnet50 --threads 2 --rounds 7
    python scripts/benchmark_models.py --channels-last --malloc keep   # every model in its fastest CPU setting
    python scripts/benchmark_models.py --models litv2_s,swin_tiny_patch4_window7_224 --compile --train --memory
    python scripts/benchmark_models.py --models litv2_s --devices cuda --modes eager,compile,cudagraph --train
    python scripts/benchmark_models.py --smoke                           # seconds, tiny input, 1 round
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    add_cpu_options, add_gpu_options, apply_cpu_options, calls_per_sample, cudnn_autotune, fmt, free_memory,
    inference_fn, is_oom, machine_description, markdown_table, matmul_peak_gflops, median_rate, resolve_devices,
    restored_process_settings, round_robin, train_step_fn,
)

from litv2.accel.cudagraphs import CaptureFailed, GraphedForward  # noqa: E402

DEFAULT_MODELS = ("litv2_s", "litv2_m", "litv2_b", "swin_tiny_patch4_window7_224", "convnext_tiny", "resnet50",
                  "pvt_v2_b2", "faster_vit_0_224")
LARGE_MODELS = ("swin_small_patch4_window7_224", "swin_base_patch4_window7_224", "convnext_small", "convnext_base",
                "resnet101", "resnet152", "twins_pcpvt_small", "twins_svt_small", "twins_svt_base", "twins_svt_large",
                "faster_vit_1_224", "faster_vit_2_224")
SMOKE_MODELS = ("litv2_s", "resnet50", "faster_vit_0_224")
MODES = ("eager", "compile", "reduce-overhead", "max-autotune", "cudagraph")  # --modes; rows <name>@<mode>
COMPILE_SUFFIXES = {"@compile": None, "@reduce-overhead": "reduce-overhead", "@max-autotune": "max-autotune"}
REFERENCE = "litv2_s"
MEMORY_PEER = "swin_tiny_patch4_window7_224"
# Paper Table 1: GPU throughput (img/s, RTX 3090, batch 64, fp32 as published) for the rows timm has.
PAPER_GPU = {"litv2_s": 1471, "litv2_m": 812, "litv2_b": 602, "swin_tiny_patch4_window7_224": 961,
             "swin_small_patch4_window7_224": 582, "swin_base_patch4_window7_224": 386, "convnext_tiny": 1079,
             "convnext_small": 639, "convnext_base": 469, "resnet50": 1279, "resnet101": 722, "resnet152": 512,
             "twins_pcpvt_small": 998, "twins_svt_base": 621, "twins_svt_large": 440}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="default",
                   help="comma list of timm names; 'default' and 'large' expand to the built-in sets")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16, help="CPU batch (inference and --train)")
    p.add_argument("--gpu-batch-size", type=int, default=64, help="GPU batch (inference, --train, --memory)")
    p.add_argument("--devices", default="auto", help="cpu, cuda or cpu,cuda (default: cpu + cuda if available)")
    p.add_argument("--gpu-fp32", action="store_true", help="fp32 on GPU instead of bf16 autocast")
    p.add_argument("--train", action="store_true", help="also time a training step (fwd + bwd + AdamW)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=None, help="stop the timing rounds after this long")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--channels-last", action="store_true",
                   help="every model's conv weights and the input batch in channels-last memory format (timm's "
                        "benchmark option; convnets' fastest CPU/GPU layout, LITv2 is channels-last inside anyway)")
    p.add_argument("--compile", action="store_true",
                   help="also time every model under torch.compile (rows <name>@compile; a name@compile in "
                        "--models adds just that one); the same as --modes eager,compile")
    p.add_argument("--modes", default="eager",
                   help="comma list of execution modes for every model: " + ", ".join(MODES) +
                        " (rows <name>@<mode>; eager rows are <name>)")
    p.add_argument("--keep-going", action="store_true",
                   help="a model that fails to build or run is marked 'failed' (its error printed) instead of "
                        "ending the run")
    p.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                   help="GPU fp32: TF32 matmuls and convolutions on or off (default: torch's, matmuls off)")
    p.add_argument("--inductor-freezing", action="store_true",
                   help="torch._inductor.config.freezing: inductor folds and pre-packs inference weights")
    p.add_argument("--memory", action="store_true",
                   help="also measure peak train (fwd + bwd) and test memory per model at the run's batch sizes")
    add_cpu_options(p)
    add_gpu_options(p)
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long check: 64x64 input, batch 2, 1 round, CPU, models " + ",".join(SMOKE_MODELS))
    p.add_argument("--out-dir", default="outputs/benchmark_models")
    args = p.parse_args(argv)
    if args.smoke:
        args.img_size, args.batch_size, args.rounds, args.warmup, args.devices = 64, 2, 1, 1, "cpu"
        if args.models == "default":
            args.models = ",".join(SMOKE_MODELS)
    for name in ("img_size", "batch_size", "gpu_batch_size", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.modes = parse_modes(args.modes, args.compile)
    except ValueError as e:
        p.error(str(e))
    return args


def parse_modes(spec: str, compile_: bool = False) -> list[str]:
    """``--modes``: the known mode names in the order given, without repeats (``--compile`` adds ``compile``);
    ValueError naming an unknown one."""
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"--modes: unknown mode {unknown[0]!r} (choose from {', '.join(MODES)})" if unknown
                         else "--modes is empty")
    modes += ["compile"] if compile_ else []
    return list(dict.fromkeys(modes))


def mode_of(name: str) -> tuple[str, str]:
    """``(base name, mode)`` of a row name: ``litv2_s@cudagraph`` -> ``("litv2_s", "cudagraph")``."""
    for mode in MODES[1:]:
        if name.endswith("@" + mode):
            return name[:-len(mode) - 1], mode
    return name, "eager"


def fastest_modes(rows: dict, key: str) -> dict[str, str]:
    """``{base model: its fastest row name}`` by ``rows[name][key]`` (img/s), among models measured in more than one
    mode; rows without a number (OOM, n/a) do not count."""
    best: dict[str, tuple[float, str]] = {}
    counts: dict[str, int] = {}
    for name, r in rows.items():
        v = r.get(key)
        if not isinstance(v, float):
            continue
        base = mode_of(name)[0]
        counts[base] = counts.get(base, 0) + 1
        if base not in best or v > best[base][0]:
            best[base] = (v, name)
    return {base: name for base, (v, name) in best.items() if counts[base] > 1}


def expand_models(spec: str, compile_all: bool = False, modes=("eager",)) -> list[str]:
    """The row names: every model of ``spec`` (groups expanded) in every mode (``compile_all``: plus compile);
    a name given with a mode suffix stays as given."""
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        group = {"default": DEFAULT_MODELS, "large": LARGE_MODELS}.get(item.lower(), (item,) if item else ())
        names += [n for n in group if n not in names]
    if not names:
        raise SystemExit("--models is empty")
    modes = list(modes) + (["compile"] if compile_all and "compile" not in modes else [])
    plain = [n for n in names if mode_of(n)[1] == "eager"]
    for mode in (m for m in modes if m != "eager"):
        names += [f"{n}@{mode}" for n in plain if f"{n}@{mode}" not in names]
    if "eager" not in modes:
        names = [n for n in names if n not in plain]
    return names


class PlainLinearKernel(nn.Module):
    """A LITv2 on plain ops (``F.linear``/addmm, conv then ``F.gelu``) on CPU: the reference kernels.

    ``--models litv2_s,litv2_s@addmm`` times both kernels of the same weights in one run.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        from litv2.accel import cpu_fast_paths

        previous = cpu_fast_paths()
        cpu_fast_paths(False)
        try:
            return self.model(x)
        finally:
            cpu_fast_paths(previous)


# LITv2 memory options as model-name suffixes, for train memory / speed A/Bs in one run
LITV2_VARIANTS = {"@keep-gelu": ("recompute_gelu", False), "@recompute-dwconv": ("recompute_dwconv", True),
                  "@plain": ("accel", False), "@triton": ("kernels", "triton")}


def build_model(name: str, img_size: int) -> nn.Module:
    """``timm.create_model(name, pretrained=False)``; non-224 inputs get the size-dependent kwargs.

    ``<litv2 name>@addmm`` builds that LITv2 with the plain ``F.linear`` kernel (see PlainLinearKernel);
    ``<litv2 name>@keep-gelu`` builds it with ``recompute_gelu=False`` (its ConvFFNs keep their GELU
    outputs for backward, as the authors' code does: the train memory / speed A/B of that option);
    ``<litv2 name>@recompute-dwconv`` builds it with ``recompute_dwconv=True`` (its ConvFFNs recompute the
    depthwise-conv outputs in backward too); ``<litv2 name>@plain`` is the model as written, without litv2.accel
    (``model.accel=none``); ``<litv2 name>@triton`` adds the Triton kernels (``model.kernels=triton``); these
    suffixes combine, e.g. ``litv2_s@keep-gelu@recompute-dwconv``;
    ``<name>@compile`` wraps the model in ``torch.compile(dynamic=False)`` (as ``trainer.compile=true``),
    ``<name>@reduce-overhead`` / ``@max-autotune`` in ``torch.compile`` in that mode (``trainer.compile_mode``);
    ``<name>@cudagraph`` is the eager model, timed as a CUDA-graph replay (see :func:`measure`).
    """
    import timm

    import litv2  # noqa: F401  (registers litv2_*)
    for suffix, mode in COMPILE_SUFFIXES.items():
        if name.endswith(suffix):
            kw = {"mode": mode} if mode else {}
            return torch.compile(build_model(name[:-len(suffix)], img_size), dynamic=False, **kw)
    if name.endswith("@cudagraph"):
        return build_model(name[:-len("@cudagraph")], img_size)
    if name.endswith("@addmm"):
        return PlainLinearKernel(build_model(name[:-len("@addmm")], img_size)).eval()
    kwargs = {}
    while suffix := next((s for s in LITV2_VARIANTS if name.endswith(s)), None):  # any combination
        name = name[:-len(suffix)]
        if not name.startswith("litv2"):
            raise SystemExit(f"{suffix} applies to LITv2 models only, got {name!r}")
        key, value = LITV2_VARIANTS[suffix]
        kwargs[key] = value
    if name.startswith("faster_vit"):
        import fastervit  # noqa: F401  (registers faster_vit_* with timm)
        if img_size != 224:
            name = re.sub(r"_224$", "_any_res", name)
            kwargs["resolution"] = [img_size, img_size]
    elif img_size != 224 and name.startswith(("swin", "litv2", "twins")):
        kwargs["img_size"] = img_size
    if not timm.is_model(name):
        raise SystemExit(f"unknown model {name!r} (not in timm's registry)")
    options = {k: kwargs.pop(k) for k in ("recompute_gelu", "recompute_dwconv", "accel", "kernels") if k in kwargs}
    model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs).eval()
    if name.startswith("litv2") and options.pop("accel", True):  # as training runs it (model.accel=auto)
        # the Triton kernels check the device they will run on: accelerated on the GPU (then parked on the CPU)
        park = options.get("kernels") == "triton" and torch.cuda.is_available()
        litv2.accel.accelerate(model.cuda() if park else model, **options)
        model = model.cpu() if park else model
    return model


def set_deploy(model: nn.Module, x: torch.Tensor, deploy: bool) -> None:
    """Switch a model's own inference mode (FasterViT's ``switch_to_deploy``) on for inference, off for training.

    FasterViT evaluates its position-bias MLP on every call unless its attention modules are in deploy
    mode, which adds the bias cached by the last non-deploy forward (the same output, bitwise). That
    forward is run here, on the eager module, before switching. Models without the switch are untouched.
    """
    switchable = [m for m in model.modules() if hasattr(m, "switch_to_deploy") and hasattr(m, "deploy")]
    if not switchable:
        return
    for m in switchable:
        m.deploy = False
    if deploy:
        eager = getattr(model, "_orig_mod", model)
        with torch.inference_mode():
            eager.eval()(x)
        for m in switchable:
            m.switch_to_deploy()


def peak_memory_mb(model: nn.Module, device: torch.device, batch: int, args, amp_dtype, train: bool):
    """Peak memory (MiB) of one train (fwd + bwd) or test forward, or "OOM"."""
    from litv2.profiling import measure_memory

    try:
        return measure_memory(model, batch, args.img_size, device, train, amp_dtype,
                              channels_last=args.channels_last) / 2 ** 20
    except Exception as e:  # noqa: BLE001 - only OOM is swallowed
        if not is_oom(e):
            raise
        free_memory(device)
        return "OOM"


def step_fn(name: str, model: nn.Module, x: torch.Tensor, amp_dtype, train: bool):
    """The timed call of one row: a training step or an inference forward; ``@cudagraph`` rows replay the forward
    from a CUDA graph, ``@reduce-overhead`` rows begin a new CUDA-graph step before each call (a training step's
    outputs are not read after the next one)."""
    mode = mode_of(name)[1]
    if mode == "cudagraph":
        return inference_fn(GraphedForward(model), x, amp_dtype)
    fn = (train_step_fn if train else inference_fn)(model, x, amp_dtype)
    if mode != "reduce-overhead":
        return fn

    def marked():
        torch.compiler.cudagraph_mark_step_begin()
        return fn()
    return marked


def measure(models: dict[str, nn.Module], device: torch.device, batch: int, args, amp_dtype,
            train: bool) -> tuple[dict, dict]:
    """img/s of every model (round-robin) and, with ``--memory``, its peak memory (MiB) afterwards."""
    fns, skipped = {}, {}
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    for name, m in models.items():
        if mode_of(name)[1] == "cudagraph" and (train or device.type != "cuda"):
            skipped[name] = "n/a"  # an inference forward on CUDA only (training: @reduce-overhead)
            continue
        m.to(device, memory_format=layout)
        x = torch.randn(batch, 3, args.img_size, args.img_size, device=device).contiguous(memory_format=layout)
        set_deploy(m, x, deploy=not train)
        fns[name] = step_fn(name, m, x, amp_dtype, train)
        if mode_of(name)[1] == "cudagraph":  # captured here (the first call): a model that cannot be is marked
            try:
                fns[name]()
            except Exception as e:  # noqa: BLE001 - a capture failure, OOM (or, --keep-going, any error) marks the row
                if not isinstance(e, CaptureFailed) and not is_oom(e) and not args.keep_going:
                    raise
                skipped[name] = "capture failed" if isinstance(e, CaptureFailed) else "OOM" if is_oom(e) else "failed"
                print(f"{name}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", flush=True)
                del fns[name]
                free_memory(device)
    times, errors = round_robin(fns, device, rounds=args.rounds, warmup=args.warmup, max_seconds=args.max_seconds,
                                calls_per_sample=calls_per_sample(device, args), keep_going=args.keep_going)
    errors.update(skipped)
    fns.clear()  # drops the optimizers' state (and the CUDA graphs) before memory is measured
    rates = {name: errors.get(name) or median_rate(times[name], batch) for name in models}
    for m in models.values():
        m.zero_grad(set_to_none=True)
        m.eval().cpu()
    free_memory(device)
    memory = {}
    if args.memory:  # after the timing, so compiled models are compiled already
        for name, m in models.items():  # one model on the device at a time: its peak holds no other's weights
            if name in errors or mode_of(name)[1] == "cudagraph":  # a replayed graph: its eager row's memory
                memory[name] = errors.get(name)
                continue
            m.to(device, memory_format=layout)
            memory[name] = peak_memory_mb(m, device, batch, args, amp_dtype, train)  # leaves no gradients
            m.cpu()
            free_memory(device)
    return rates, memory


def main(argv=None) -> dict:
    args = parse_args(argv)
    with restored_process_settings(), freezing(args.inductor_freezing):
        return _main(args, argv)


def freezing(enabled: bool):
    """``--inductor-freezing``: inductor's weight freezing for the models compiled during this run only."""
    if not enabled:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config
    return inductor_config.patch(freezing=True)


def _main(args, argv=None) -> dict:
    from litv2.profiling import count_flops, count_params

    apply_cpu_options(args)
    devices = resolve_devices(args.devices)
    cudnn_autotune(devices)
    names = expand_models(args.models, modes=args.modes)
    if args.tf32 != "default" and any(d.type == "cuda" for d in devices):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    t0 = time.perf_counter()

    peak, peak_dtype = {}, {}
    if not args.no_peak:  # in the precision the models run in: fp32 on CPU, bf16 on GPU unless --gpu-fp32
        for d in devices:
            dtype = torch.bfloat16 if d.type == "cuda" and not args.gpu_fp32 else torch.float32
            peak_dtype[d.type] = str(dtype).replace("torch.", "")
            peak[d.type] = matmul_peak_gflops(d, n=1024 if args.smoke else (2048 if d.type == "cpu" else 8192),
                                              dtype=dtype)

    models, rows, counted = {}, {}, {}
    for name in names:
        torch.manual_seed(0)
        try:
            m = build_model(name, args.img_size)
        except Exception as e:  # noqa: BLE001 - --keep-going: the other models still run
            if not args.keep_going:
                raise
            print(f"{name} failed to build: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", flush=True)
            continue
        models[name] = m
        arch = name.split("@")[0]  # modes and variants share their architecture's params and FLOPs
        if arch not in counted:  # counted once, on the eager module as built by default (CPU kernels)
            plain = m if name == arch else build_model(arch, args.img_size)
            counted[arch] = {"params": count_params(plain), "gflops": count_flops(plain, args.img_size) / 1e9}
        rows[name] = dict(counted[arch])

    runs = []  # (column key, device, batch, amp dtype, train)
    for d in devices:
        if d.type == "cpu":
            runs.append(("cpu", d, args.batch_size, None, False))
            if args.train:
                runs.append(("cpu_train", d, args.batch_size, None, True))
        else:
            amp = None if args.gpu_fp32 else torch.bfloat16
            runs.append(("gpu", d, args.gpu_batch_size, amp, False))
            if args.train:
                runs.append(("gpu_train", d, args.gpu_batch_size, amp, True))
    for key, d, batch, amp, train in runs:
        rates, memory = measure(models, d, batch, args, amp, train)
        print(f"[{key}, batch {batch}] " + ", ".join(f"{n} {fmt(v, '.1f')} img/s" for n, v in rates.items()),
              flush=True)  # progress: a run stopped later still leaves these
        for name, v in rates.items():
            rows[name][f"{key}_img_s"] = v
        for name, v in memory.items():
            rows[name][f"{key}_mem_mb"] = v

    ref = rows.get(REFERENCE)
    headers = ["Model", "Params (M)", "GFLOPs"]
    for key, d, batch, amp, train in runs:
        what = "train " if train else ""
        prec = "bf16" if amp is not None else "fp32"
        headers += [f"{d.type.upper()} {what}{prec} img/s (bs {batch})"]
        if ref is not None:
            headers += [f"× {REFERENCE}"]
        if not train and d.type in peak:
            headers += ["% matmul peak"]
        if args.memory:
            headers += [f"{d.type.upper()} {'train' if train else 'test'} mem (MiB)"]
    if "gpu" in [r[0] for r in runs]:
        headers += ["Paper GPU img/s"]
    table = []
    fastest = {key: fastest_modes(rows, f"{key}_img_s") for key, *_ in runs}
    for name, r in rows.items():
        row = [name, f"{r['params'] / 1e6:.1f}", f"{r['gflops']:.2f}"]
        for key, d, batch, amp, train in runs:
            v = r.get(f"{key}_img_s")
            r[f"{key}_fastest"] = fastest[key].get(mode_of(name)[0]) == name
            row.append(fmt(v, ".1f") + (" *" if r[f"{key}_fastest"] else ""))
            if ref is not None:
                rv = ref.get(f"{key}_img_s")
                ratio = v / rv if isinstance(v, float) and isinstance(rv, float) else None
                r[f"{key}_ratio"] = ratio
                row.append(fmt(ratio, ".2f"))
            if not train and d.type in peak:
                share = 100 * 2 * r["gflops"] * v / peak[d.type] if isinstance(v, float) else None
                r[f"{key}_pct_peak"] = share
                row.append(fmt(share, ".1f"))
            if args.memory:
                row.append(fmt(r.get(f"{key}_mem_mb"), ".0f"))
        if "gpu" in [x[0] for x in runs]:
            row.append(fmt(PAPER_GPU.get(name), "d"))
        table.append(row)
    machine = "; ".join(machine_description(d) for d in devices)
    peak_txt = ", ".join(f"{k.upper()} {peak_dtype[k]} matmul peak {v:.0f} GFLOP/s" for k, v in peak.items())
    cmd = "python scripts/benchmark_models.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"Model benchmark at {args.img_size}x{args.img_size}, round-robin over {len(models)} models, "
              f"{args.rounds} round(s), median; {machine}; malloc {args.malloc}"
              + ("; channels-last" if args.channels_last else "")
              + ("; inductor freezing" if args.inductor_freezing else "")
              + (f"; TF32 {args.tf32}" if args.tf32 != "default" else "")
              + ("; * the model's fastest mode" if any(fastest.values()) else "")
              + (f"; {calls_per_sample('cuda', args)} back-to-back calls per GPU sample"
                 if any(d.type == "cuda" for d in devices) else "")
              + ("; FasterViT in deploy mode at inference" if any("faster_vit" in n for n in models) else "")
              + (f"; {peak_txt}" if peak_txt else "") + f"\n`{cmd}`")
    md = header + "\n\n" + markdown_table(headers, table)
    if ref is not None and "cpu" in peak and isinstance(ref.get("cpu_img_s"), float):
        achieved = 2 * ref["gflops"] * ref["cpu_img_s"]
        md += (f"\n\n{REFERENCE} on CPU: {achieved:.0f} GFLOP/s achieved "
               f"(2 x {ref['gflops']:.2f} GMACs x {ref['cpu_img_s']:.1f} img/s) = "
               f"{100 * achieved / peak['cpu']:.1f}% of the measured fp32 matmul peak")
    if args.memory:  # issue 6's memory target: LITv2-S against Swin-T, each eager or each compiled
        for suffix in ("", "@compile"):
            mine_name, other = REFERENCE + suffix, MEMORY_PEER + suffix
            if mine_name not in rows or other not in rows:
                continue
            for key, d, batch, amp, train in runs:
                mine, theirs = rows[mine_name].get(f"{key}_mem_mb"), rows[other].get(f"{key}_mem_mb")
                if isinstance(mine, float) and isinstance(theirs, float) and theirs > 0:
                    md += (f"\n\n{mine_name} {d.type.upper()} {'train' if train else 'test'} memory at batch "
                           f"{batch}: {mine / theirs:.2f}x {other}'s ({mine:.0f} vs {theirs:.0f} MiB)")
    print(md)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark_models.md").write_text(md + "\n")
    payload = {"args": vars(args), "machine": machine, "matmul_peak_gflops": peak, "matmul_peak_dtype": peak_dtype,
               "rows": rows,
               "seconds": round(time.perf_counter() - t0, 1)}
    (out_dir / "benchmark_models.json").write_text(json.dumps(payload, indent=2, default=str))
    return payload


if __name__ == "__main__":
    main()
