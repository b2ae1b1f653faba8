"""The GPU report's machinery on CPU: benchmark_models' execution modes and fastest-mode marks, gpu_check's
targets read from a synthetic results dict."""
import pytest

from engine_utils import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark_models.py")


def test_modes_parse_in_order_and_unknown_ones_are_one_line_errors(bench, capsys):
    assert bench["parse_modes"]("eager, cudagraph,eager") == ["eager", "cudagraph"]
    assert bench["parse_modes"]("eager", compile_=True) == ["eager", "compile"]
    with pytest.raises(ValueError, match="unknown mode 'graphs'"):
        bench["parse_modes"]("eager,graphs")
    with pytest.raises(SystemExit):
        bench["parse_args"](["--modes", "fast"])
    assert "--modes: unknown mode 'fast'" in capsys.readouterr().err
    assert bench["parse_args"](["--compile"]).modes == ["eager", "compile"]


def test_every_model_gets_a_row_per_mode(bench):
    expand = bench["expand_models"]
    assert expand("litv2_s,resnet50", modes=["eager", "compile", "cudagraph"]) == [
        "litv2_s", "resnet50", "litv2_s@compile", "resnet50@compile", "litv2_s@cudagraph", "resnet50@cudagraph"]
    assert expand("litv2_s,resnet50@compile", modes=["cudagraph"]) == ["resnet50@compile", "litv2_s@cudagraph"]
    assert expand("litv2_s", compile_all=True) == ["litv2_s", "litv2_s@compile"]
    assert bench["mode_of"]("litv2_s@keep-gelu@reduce-overhead") == ("litv2_s@keep-gelu", "reduce-overhead")
    assert bench["mode_of"]("resnet50") == ("resnet50", "eager")


def test_fastest_mode_of_each_model_among_measured_rows(bench):
    rows = {"litv2_s": {"gpu_img_s": 100.0}, "litv2_s@compile": {"gpu_img_s": 150.0},
            "litv2_s@cudagraph": {"gpu_img_s": 120.0}, "resnet50": {"gpu_img_s": 90.0},
            "resnet50@compile": {"gpu_img_s": "OOM"}, "swin": {"gpu_img_s": 80.0}}
    assert bench["fastest_modes"](rows, "gpu_img_s") == {"litv2_s": "litv2_s@compile"}  # one number: no mark


def test_compile_modes_reach_torch_compile_and_cudagraph_rows_are_na_off_cuda(bench, tmp_path, monkeypatch):
    import torch

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or model)
    for mode in ("compile", "reduce-overhead", "max-autotune", "cudagraph"):
        bench["build_model"](f"resnet18@{mode}", 64)
    assert compiled == [{"dynamic": False}, {"dynamic": False, "mode": "reduce-overhead"},
                        {"dynamic": False, "mode": "max-autotune"}]
    payload = bench["main"](["--smoke", "--no-peak", "--models", "resnet18", "--modes", "eager,cudagraph,compile",
                             "--rounds", "2", "--out-dir", str(tmp_path)])
    rows = payload["rows"]
    assert rows["resnet18@cudagraph"]["cpu_img_s"] == "n/a"
    fastest = [n for n, r in rows.items() if r["cpu_fastest"]]
    assert len(fastest) == 1 and fastest[0] in ("resnet18", "resnet18@compile")
    md = (tmp_path / "benchmark_models.md").read_text()
    assert f"| {fastest[0]} |" in md and " * |" in md and "* the model's fastest mode" in md


# ---- gpu_check: the targets read from a results dict ------------------------------------------------------------

@pytest.fixture(scope="module")
def check():
    return load_script("gpu_check.py")


SWIN = "swin_tiny_patch4_window7_224"


def synthetic_results() -> dict:
    """A GPU run's results: LITv2-S fastest as @triton@cudagraph in bf16, ResNet-50 faster than it, the rest absent."""
    bf16 = {"litv2_s": {"gpu_img_s": 300.0, "gpu_train_img_s": 100.0, "gpu_train_mem_mb": 700.0},
            "litv2_s@cudagraph": {"gpu_img_s": 320.0, "gpu_train_img_s": "n/a"},
            "litv2_s@triton@cudagraph": {"gpu_img_s": 400.0},
            SWIN: {"gpu_img_s": 200.0, "gpu_train_img_s": 90.0, "gpu_train_mem_mb": 1000.0},
            f"{SWIN}@cudagraph": {"gpu_img_s": 210.0},
            "resnet50": {"gpu_img_s": 350.0}, "resnet50@cudagraph": {"gpu_img_s": 500.0}}
    compiled = {f"{SWIN}@compile": {"gpu_img_s": 260.0, "gpu_train_img_s": 95.0}}
    return {"models": {"rows": bf16, "ok": True, "rc": 0, "seconds": 1.0},
            "compiled": {"rows": compiled, "ok": False, "rc": "timeout after 240 s", "seconds": 240.0},
            "fp32": {"fp32": {"rows": {"litv2_s": {"gpu_img_s": 160.0}, SWIN: {"gpu_img_s": 100.0}}, "ok": True,
                              "rc": 0, "seconds": 1.0}},
            "attention": {"results": {"hilo": {"cuda_img_s": 3000.0}, "msa": {"cuda_img_s": 2500.0}}, "ok": True,
                          "rc": 0, "seconds": 1.0},
            "kernels": {"payload": {"kernels": [{"op": "litv2::a", "input": [64, 56, 56, 64], "pct_copy": 75.0},
                                                {"op": "litv2::b", "input": [64, 28, 28, 128], "pct_copy": 55.0}],
                                    "accuracy": {"logits_err": 2e-6, "grad_err": 3e-6, "ok": True}},
                        "ok": True, "rc": 0, "seconds": 1.0},
            "train bf16 triton": {"losses": [6.9, 6.1, 5.0], "ok": True, "rc": 0, "seconds": 1.0, "steps": 200},
            "train bf16": {"rc": "not run (budget spent)", "ok": False, "seconds": 0.0},
            "workers": 8}


def test_targets_pass_fail_and_not_measured_from_measured_values_only(check):
    rows = {t: (m, v) for t, m, v in check["targets"](synthetic_results(), smoke=False)}
    get = lambda start: next(v for k, v in rows.items() if k.startswith(start))  # noqa: E731
    assert get("bf16 inference LITv2-S ≥ 1.5× Swin-T, eager vs eager") == ("1.50× (litv2_s 300 vs "
                                                                          f"{SWIN} 200)", "**met**")
    # fastest of each: LITv2-S's Triton CUDA-graph row against Swin-T's compiled row (from the compiled part)
    assert get("bf16 inference LITv2-S ≥ 1.5× Swin-T, fastest") == (
        f"1.54× (litv2_s@triton@cudagraph 400 vs {SWIN}@compile 260)", "**met**")
    assert get("bf16 inference LITv2-S ≥ 1.0× ResNet-50, eager")[1] == "**not met**"  # 300 / 350
    assert get("bf16 inference LITv2-S ≥ 1.0× ResNet-50, fastest")[1] == "**not met**"  # 400 / 500
    assert get("bf16 inference LITv2-S ≥ 1.0× ConvNeXt-T, eager") == ("-", "not measured")
    assert get("bf16 inference LITv2-S ≥ 1.2× FasterViT-0, fastest") == ("-", "not measured")
    assert get("fp32 (TF32 off) inference LITv2-S ≥ 1.5× Swin-T, eager")[1] == "**met**"  # 1.6
    assert get("bf16 training LITv2-S ≥ 1.3× Swin-T, eager")[1] == "**not met**"  # 100 / 90
    assert get("bf16 training LITv2-S ≥ 1.3× Swin-T, fastest")[0].startswith("1.05× (litv2_s 100 vs")
    assert get("peak train memory") == ("0.70× (700 vs 1000 MiB)", "**met**")
    assert get("HiLo layer") == ("1.20×", "**not met**")
    faster = synthetic_results()
    faster["attention"]["results"]["hilo@triton"] = {"cuda_img_s": 4000.0}  # the faster HiLo counts
    assert next(v for t, m, v in check["targets"](faster, smoke=False) if t.startswith("HiLo layer")) == "**met**"
    assert get("memory-bound Triton kernels")[1] == "**not met**" and "55 %" in get("memory-bound Triton kernels")[0]
    assert get("LITv2-S kernels=triton equals plain")[1] == "**met**"
    assert get("train bf16 triton: 200 steps") == ("6.900 → 5.000", "**met**")
    assert get("train bf16: loss") == ("-", "not measured") and get("train fp16: loss") == ("-", "not measured")
    assert get("input pipeline")[1] == "not measured"


def test_nothing_measured_reads_not_measured_and_smoke_gives_no_verdicts(check):
    assert {v for _, _, v in check["targets"]({}, smoke=False)} == {"not measured"}
    smoke = {v for _, _, v in check["targets"](synthetic_results(), smoke=True)}
    assert "**met**" not in smoke and "**not met**" not in smoke


def test_report_marks_fastest_modes_and_lists_parts_not_run(check):
    import argparse

    args = argparse.Namespace(smoke=False, budget=600)
    text = check["report"](args, synthetic_results(), "NVIDIA H200")
    assert "| litv2_s | 320 (cudagraph) |" in text and "| litv2_s@triton | 400 (cudagraph) |" in text
    assert f"| {SWIN} | 260 (compile) | 95 (compile) |" in text
    assert "| train bf16 | not run (budget spent) | 0.0 |" in text
    assert "| compiled | timeout after 240 s | 240.0 |" in text


def test_progress_lines_of_a_run_that_ran_out_of_time_still_give_rates(check):
    tail = ("noise\n[gpu, batch 64] litv2_s 1234.5 img/s, swin_tiny_patch4_window7_224@compile 999.0 img/s\n"
            "[gpu_train, batch 64] litv2_s 300.0 img/s, resnet50 OOM img/s\n")
    assert check["progress_rows"](tail) == {
        "litv2_s": {"gpu_img_s": 1234.5, "gpu_train_img_s": 300.0},
        "swin_tiny_patch4_window7_224@compile": {"gpu_img_s": 999.0}, "resnet50": {"gpu_train_img_s": "OOM"}}


def test_the_budget_caps_each_part_and_a_spent_budget_runs_nothing(check):
    budget = check["Budget"](0)
    assert budget.timeout(240) == 240
    spent = check["Budget"](3)
    assert spent.timeout(240) == 0
    result = check["run"](["true"], spent.timeout(240))
    assert result["rc"] == "not run (budget spent)" and not result["ok"]


def test_unknown_parts_are_one_line_errors(check, capsys):
    with pytest.raises(SystemExit):
        check["parse_args"](["--smoke", "--parts", "models,speed"])
    assert "--parts: unknown part 'speed'" in capsys.readouterr().err


def test_attention_sdpa_option_allows_only_that_backend():
    import torch
    import torch.nn.functional as F

    attention = load_script("benchmark_attention.py")
    q = torch.randn(1, 2, 16, 8)
    with attention["sdpa_backend"]("math"):
        F.scaled_dot_product_attention(q, q, q)
    with attention["sdpa_backend"]("efficient"), pytest.raises(RuntimeError):  # no CPU kernel of that backend
        F.scaled_dot_product_attention(q, q, q)
    with attention["sdpa_backend"]("auto"):
        F.scaled_dot_product_attention(q, q, q)
    assert attention["parse_args"](["--sdpa", "flash"]).sdpa == "flash"


def test_keep_going_marks_a_failing_callable_and_times_the_others(capsys):
    common = load_script("_bench_common.py")

    def bad():
        raise ValueError("kernel launch failed\nmore")

    times, errors = common["round_robin"]({"ok": lambda: None, "bad": bad}, rounds=2, warmup=1, keep_going=True)
    assert errors == {"bad": "failed"} and len(times["ok"]) == 2 and not times["bad"]
    assert "bad failed: kernel launch failed" in capsys.readouterr().out
    with pytest.raises(ValueError):
        common["round_robin"]({"bad": bad}, rounds=1, warmup=1)
