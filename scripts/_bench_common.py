"""Shared helpers of the benchmark scripts: round-robin timing, OOM detection, Markdown tables, matmul peak."""
from __future__ import annotations

import contextlib
import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from litv2.accel import keep_freed_memory  # noqa: F401  (--malloc keep; re-exported for the scripts)

_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "defaultcpuallocator",
                "not enough memory", "failed to allocate")


def json_kwargs(spec: str | None, option: str) -> dict:
    """Constructor kwargs from ``option``'s value: a JSON object or a JSON file (its ``constructor_kwargs``, as
    export_hub.py writes them, if present)."""
    if not spec:
        return {}
    path = Path(spec)
    data = json.loads(path.read_text()) if path.is_file() else json.loads(spec)
    if not isinstance(data, dict):
        raise SystemExit(f"{option} must be a JSON object, got {type(data).__name__}")
    return dict(data.get("constructor_kwargs", data))


def is_oom(exc: BaseException) -> bool:
    """True for CUDA OOM and CPU allocation failures (``RuntimeError: ... can't allocate memory``)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def free_memory(device: torch.device | str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(fns: dict[str, Callable[[], object]], device="cpu", rounds: int = 5, warmup: int = 2,
                max_seconds: float | None = None, calls_per_sample: int = 1,
                keep_going: bool = False) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Time every callable alternately: warm-up each, then ``rounds`` rounds visiting all of them.

    The visiting order rotates every round, so a slow drift of the machine (thermal, other load) hits all
    methods alike. Returns ``(seconds per call for each name, {name: "OOM"} for those that ran out of
    memory)``. With ``max_seconds`` the rounds stop once that much time has passed (at least one round).
    Each sample times ``calls_per_sample`` back-to-back calls and one device sync (the paper's GPU
    throughput protocol: the host queues the next call while the GPU runs the last one) and records the
    time per call. With ``keep_going`` any other error of a callable marks it ``"failed"`` too (its first line
    printed) and the others go on.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    errors: dict[str, str] = {}
    n = max(1, int(calls_per_sample))

    def call(name: str) -> float | None:
        try:
            t0 = time.perf_counter()
            for _ in range(n):
                fns[name]()
            sync(device)
            return (time.perf_counter() - t0) / n
        except Exception as e:  # noqa: BLE001 - only OOM is swallowed (and, keep_going, any error)
            if not is_oom(e) and not keep_going:
                raise
            errors[name] = "OOM" if is_oom(e) else "failed"
            if errors[name] == "failed":
                print(f"{name} failed: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", flush=True)
            free_memory(device)
            return None

    for name in fns:
        for _ in range(warmup):
            if name in errors or call(name) is None:
                break
    start = time.perf_counter()
    for r in range(max(1, rounds)):
        live = [n for n in fns if n not in errors]
        if not live:
            break
        shift = r % len(live)
        for name in live[shift:] + live[:shift]:
            t = call(name)
            if t is not None:
                times[name].append(t)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return times, errors


def median_rate(times: Sequence[float], items_per_call: int) -> float | None:
    """Items per second from the median call time (``None`` without measurements)."""
    return items_per_call / statistics.median(times) if times else None


def matmul_peak_gflops(device="cpu", n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Achieved GFLOP/s (2 * n^3 per product, the usual convention): best of ``repeats`` big products.

    On CPU the same product is also run through oneDNN (as a 1x1 convolution of an (n, n) channels-last
    map) and the faster backend counts: on some CPUs (e.g. AMD EPYC with MKL) ``torch.mm`` reaches only
    about half of what the hardware does, and a "% of peak" against it would flatter every model.
    """
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    candidates = [lambda: torch.mm(a, b)]
    if device.type == "cpu":
        x = a.view(1, n, 1, n).permute(0, 3, 1, 2)  # NHWC map of n positions x n channels, as NCHW view
        w = b.t().contiguous().view(n, n, 1, 1)
        candidates.append(lambda: torch.nn.functional.conv2d(x, w))
    best = float("inf")
    for fn in candidates:
        fn()
        sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def resolve_devices(spec: str, auto_gpu_only: bool = False) -> list[torch.device]:
    """``--devices``: ``auto`` (CPU, plus CUDA when present; with ``auto_gpu_only`` the GPU alone when
    present) or a comma list such as ``cpu,cuda``; one clear error when it asks for CUDA that is not there."""
    cuda = torch.cuda.is_available()
    if spec == "auto":
        if auto_gpu_only and cuda:
            return [torch.device("cuda")]
        return [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    devices = [torch.device(d.strip()) for d in spec.split(",") if d.strip()]
    if any(d.type == "cuda" for d in devices) and not cuda:
        raise SystemExit("--devices asks for cuda but CUDA is not available")
    return devices


def cudnn_autotune(devices) -> None:
    """cuDNN times its convolution kernels per shape and keeps the fastest, as ``train.py`` and timm's
    benchmark run them (otherwise its heuristic pick is what gets timed)."""
    if any(torch.device(d).type == "cuda" for d in devices):
        torch.backends.cudnn.benchmark = True


def create_litv2(name: str, accel: bool = True, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` for a LITv2 model, on litv2.accel's kernels as
    training runs it (``accel=False``: the plain model); one clear error for any other model."""
    import timm

    import litv2  # noqa: F401  (registers the models)
    if not timm.is_model(name) or not name.startswith("litv2"):
        raise SystemExit(f"--model must be a LITv2 model (litv2_s, litv2_m, litv2_b, ...), got {name!r}")
    model = timm.create_model(name, pretrained=False, **kwargs)
    return litv2.accel.accelerate(model) if accel else model


def add_cpu_options(parser) -> None:
    """``--threads`` and ``--malloc`` for a benchmark script's CPU runs (see :func:`apply_cpu_options`)."""
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU runs")
    parser.add_argument("--malloc", choices=["default", "keep"], default="default",
                        help="keep: glibc malloc keeps freed memory instead of unmapping big blocks (no page "
                             "faults for large activations; applies to everything the run times)")


def add_gpu_options(parser) -> None:
    """``--gpu-calls``: back-to-back calls per timed GPU sample (see :func:`calls_per_sample`)."""
    parser.add_argument("--gpu-calls", type=int, default=10,
                        help="GPU: each timed sample is this many back-to-back calls and one sync (as the "
                             "paper's throughput protocol); 1 = a sync after every call")


def calls_per_sample(device, args) -> int:
    """``args.gpu_calls`` on a GPU, 1 on CPU (a CPU call is synchronous: one call per sample loses nothing)."""
    return args.gpu_calls if torch.device(device).type == "cuda" else 1


@contextlib.contextmanager
def restored_process_settings():
    """Around a script's work: puts back what the run sets for its own process (thread count, cuDNN autotuning,
    TF32, the CPU fast paths), so that ``main()`` called in-process (tests, notebooks) leaves the caller's settings
    as they were. glibc's malloc setting (``--malloc keep``) cannot be undone and stays, as does the global
    RNG state the scripts seed.

    Inside it the objects that exist on entry (the imported modules: torch, timm, Dynamo, ...) are frozen out of
    the garbage collector, so the ``gc.collect()`` before each memory measurement scans only what the benchmark
    made since; they are unfrozen on exit."""
    from litv2.accel import cpu_fast_paths

    threads, benchmark, fast = torch.get_num_threads(), torch.backends.cudnn.benchmark, cpu_fast_paths()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    gc.collect()  # the caller's garbage goes first: frozen, it would never be collected
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        cpu_fast_paths(fast)


def apply_cpu_options(args) -> None:
    """Apply ``--threads`` / ``--malloc`` before anything is timed; one clear error if malloc cannot be kept."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "keep" and not keep_freed_memory():
        raise SystemExit("--malloc keep needs glibc's malloc (mallopt), which this process does not have")


def inference_fn(model: torch.nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None = None) -> Callable:
    """One timed inference call: ``model(x)`` under inference mode (and autocast when ``amp_dtype``)."""
    def run():
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(x)
    return run


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None = None) -> Callable:
    """One timed training step: forward, cross-entropy on random labels, backward, AdamW step."""
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        model.train()
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return run


def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, str):
        return value
    return format(value, spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description(device="cpu") -> str:
    import platform
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
