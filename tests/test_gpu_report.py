"""The GPU report's machinery on CPU: benchmark_models' execution modes and fastest-mode marks, gpu_check's
targets read from a synthetic results dict."""
import runpy
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> dict:
    return runpy.run_path(str(SCRIPTS / name), run_name=f"_test_{Path(name).stem}")


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
