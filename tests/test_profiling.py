"""Efficiency figures: FLOPs/params equal the model's own counts, speed and memory are measured."""
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from litv2.accel import accelerate
from litv2.models import LITv2
from litv2.profiling import count_flops, count_params, efficiency_report, measure_memory

from engine_utils import TINY

REPO = Path(__file__).resolve().parents[1]


def test_efficiency_report_fields_are_sane():
    model = LITv2(**TINY)
    report = efficiency_report(model, img_size=64, batch_size=4, runs=2, warmup=1)
    assert report["params"] == count_params(model) == sum(p.numel() for p in model.parameters())
    assert report["gflops"] == round(count_flops(model, 64) / 1e9, 4) > 0
    assert report["throughput"] > 0
    assert report["train_mem_mb"] > 0 and report["test_mem_mb"] >= 0
    assert report["img_size"] == [64, 64] and report["device"] == "cpu"
    assert model.training  # measuring leaves the mode as it was


def test_efficiency_report_times_and_measures_channels_last_inputs_when_asked():
    model = LITv2(**TINY)
    layouts = []
    model.register_forward_pre_hook(lambda mod, inputs: layouts.append(
        inputs[0].is_contiguous(memory_format=torch.channels_last) and not inputs[0].is_contiguous()))
    efficiency_report(model, img_size=64, batch_size=4, runs=1, warmup=0, channels_last=True)
    # after the FLOP count: throughput, then train and test memory (each one unmeasured call, then the measured one)
    assert layouts[1:] == [True] * 5


def test_flops_scale_with_input_and_non_square():
    model = LITv2(**TINY)
    f64, f128 = count_flops(model, 64), count_flops(model, 128)
    assert 3.5 < f128 / f64 < 4.5  # ~linear in pixels at these sizes (attention adds a little)
    assert count_flops(model, (64, 128)) > f64


def test_train_step_needs_more_memory_than_inference():
    torch.manual_seed(0)
    model = LITv2(**TINY)
    train = measure_memory(model, batch_size=32, img_size=96, train=True)
    test = measure_memory(model, batch_size=32, img_size=96, train=False)
    assert train > test
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind


def test_cpu_peak_memory_is_the_peak_of_live_tensors():
    """Exact bytes, independent of the C allocator: 10 MiB + 5 MiB alive together, then 8 MiB alone."""
    from torch.profiler import profile

    from litv2.profiling import cpu_live_peak, peak_memory

    def fn():
        a = torch.empty(10 * 2 ** 20, dtype=torch.uint8)
        b = torch.empty(5 * 2 ** 20, dtype=torch.uint8)
        del a, b
        return torch.empty(8 * 2 ** 20, dtype=torch.uint8)

    assert cpu_live_peak(fn) == peak_memory(fn) == 15 * 2 ** 20
    kept = []
    assert cpu_live_peak(lambda: kept.append(torch.empty(8 * 2 ** 20, dtype=torch.uint8))) == 8 * 2 ** 20

    def free_older_then_allocate():  # a block from the last session freed in this one does not count
        kept.clear()
        return torch.empty(4 * 2 ** 20, dtype=torch.uint8)

    assert cpu_live_peak(free_older_then_allocate) == 4 * 2 ** 20

    def fails():
        torch.empty(2 ** 20)
        raise ValueError("inside fn")

    with pytest.raises(ValueError, match="inside fn"):  # propagates; profiler and stderr restored
        cpu_live_peak(fails)
    assert cpu_live_peak(fn) == 15 * 2 ** 20
    from litv2 import profiling
    with profiling._LIVE_PEAK_LOCK:  # another thread measuring: no second session
        assert cpu_live_peak(fn) is None
    with profile() as prof:  # inside the user's profiler: no nested session (it would end theirs)
        assert cpu_live_peak(fn) is None
        assert peak_memory(fn) >= 0  # resident-memory fallback
        torch.ones(3).sum()
    assert any(e.key == "aten::sum" for e in prof.key_averages())


def test_cpu_peak_memory_keeps_stderr_clean_but_for_the_callers_own_lines():
    """torch.profiler's C++ side prints start/stop lines (and c10 a note on older blocks) to stderr on
    every session; a memory figure must not spray them over a user's log, nor swallow real output."""
    code = ("import sys, torch\n"
            "from litv2.profiling import cpu_live_peak\n"
            "old = torch.ones(2 ** 20)\n"
            "def fn():\n"
            "    global old\n"
            "    old = None\n"
            "    print('line from fn', file=sys.stderr)\n"
            "    return torch.ones(1000)\n"
            "print(cpu_live_peak(fn), cpu_live_peak(fn))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["4000", "4000"]
    assert out.stderr.splitlines() == ["line from fn", "line from fn"], out.stderr


def test_cpu_test_memory_does_not_depend_on_what_ran_before():
    """The first inference call builds the CPU fast path's packed weight copies, which the model keeps;
    a fresh model's test memory equals the one measured after it has run."""
    torch.manual_seed(0)
    model = accelerate(LITv2(**TINY))
    first = measure_memory(model, batch_size=8, img_size=96, train=False)
    assert measure_memory(model, batch_size=8, img_size=96, train=False) == first > 0


def test_cpu_train_memory_is_repeatable_and_sees_the_ffn_recomputes():
    """The CPU figure is the same on every call, and the GELU recompute, then the depthwise-conv recompute,
    each show as most of one fp32 hidden map per block less at the peak."""
    torch.manual_seed(0)
    cfg = dict(TINY, embed_dim=32)
    plain, model = accelerate(LITv2(**cfg), recompute_gelu=False), accelerate(LITv2(**cfg))
    both = accelerate(LITv2(**cfg), recompute_dwconv=True)
    first = measure_memory(model, batch_size=8, img_size=128, train=True)
    assert measure_memory(model, batch_size=8, img_size=128, train=True) == first
    side, width, hidden_maps = 128 // 4, 32, 0
    for depth in cfg["depths"]:  # one (8, side, side, 4 * width) fp32 map per block
        hidden_maps += depth * 8 * side * side * 4 * width * 4
        side, width = side // 2, width * 2
    saved = measure_memory(plain, batch_size=8, img_size=128, train=True) - first
    assert 0.9 * hidden_maps <= saved <= hidden_maps, (saved, hidden_maps)
    saved = first - measure_memory(both, batch_size=8, img_size=128, train=True)
    # with both maps gone the peak can move into the backward pass (0.84 of the maps at 1 thread, 0.92 at 2)
    assert 0.75 * hidden_maps <= saved <= hidden_maps, (saved, hidden_maps)


def test_profile_model_script_smoke():
    script = runpy.run_path(str(REPO / "scripts" / "profile_model.py"))
    autotuned = []  # cuDNN autotuning is asked for the profiled device, as in the benchmark scripts
    script["main"].__globals__["cudnn_autotune"] = autotuned.append
    result = script["main"](["--batch-size", "2", "--img-size", "64", "--rounds", "1", "--row-limit", "3",
                             "--kwargs", "embed_dim=16,depths=[1,1,2,1],num_heads=[1,2,4,8]"])
    assert result["img_per_s"] > 0
    assert {"patch_embed", "stage3 blocks x2", "stage1 -> 2 DTM"} <= set(result["stages"])
    assert autotuned == [[torch.device("cpu")]]


def test_profile_model_train_step_counts_forward_and_backward_flops(capsys):
    import re

    script = runpy.run_path(str(REPO / "scripts" / "profile_model.py"))
    result = script["main"](["--batch-size", "2", "--img-size", "64", "--rounds", "1", "--row-limit", "3", "--train",
                             "--kwargs", "embed_dim=16,depths=[1,1,2,1],num_heads=[1,2,4,8]"])
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("full pass"))
    rate = float(re.search(r"-> ([\d.]+) GFLOP/s achieved \(forward \+ backward counted as 3x the forward\)",
                           line).group(1))
    assert rate == pytest.approx(2 * 3 * result["gflops"] * 2 / result["total_ms"] * 1e3, abs=0.051)
    # the operator table's pass is timed too, against the median the rates come from
    assert result["profiled_ms"] > 0
    assert f"profiled pass {result['profiled_ms']:.1f} ms = {result['profiled_ms'] / result['total_ms']:.2f}x the " \
           f"timed median ({result['total_ms']:.1f} ms)" in out


def test_profile_model_memory_and_compile(monkeypatch, capsys):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or model)
    from litv2.accel import cpu_fast_paths

    script = runpy.run_path(str(REPO / "scripts" / "profile_model.py"))
    threads = torch.get_num_threads()
    result = script["main"](["--batch-size", "2", "--img-size", "64", "--rounds", "1", "--row-limit", "3",
                             "--memory", "--compile", "--linear-kernel", "addmm", "--threads", "1",
                             "--kwargs", "embed_dim=16,depths=[1,1,2,1],num_heads=[1,2,4,8]"])
    assert compiled == [{"dynamic": False}]
    assert cpu_fast_paths() and torch.get_num_threads() == threads  # the run's settings are undone
    assert set(result["stage_peak_mib"]) == set(result["stages"]) and min(result["stage_peak_mib"].values()) >= 0
    out = capsys.readouterr().out
    assert ", compiled" in out and "| part (eager) | ms | share | peak MiB |" in out


def test_profile_model_on_a_timm_model_gives_the_full_pass_and_its_memory():
    script = runpy.run_path(str(REPO / "scripts" / "profile_model.py"))
    # Swin has `layers` and `patch_embed` too; the LITv2 stage rows must not be tried on it
    result = script["main"](["--model", "swin_tiny_patch4_window7_224", "--batch-size", "1", "--rounds", "1",
                             "--row-limit", "3", "--memory"])
    assert result["img_per_s"] > 0 and result["peak_mib"] >= 0 and "stages" not in result


def test_peak_memory_sees_what_the_call_allocates():
    from litv2.profiling import peak_memory

    def allocate():
        t = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        return int(t[::4096].sum())

    assert peak_memory(allocate, "cpu") >= 48 << 20
    assert peak_memory(lambda: None, "cpu") < 16 << 20
