"""scripts/benchmark_kernels.py on CPU under Triton's interpreter (marked triton: ``make test`` counts these apart)."""
import json
import runpy
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.triton
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run (a GPU runs the real benchmark)")
def test_smoke_times_every_litv2_op_the_model_calls_and_checks_accuracy(tmp_path):
    from litv2.accel.triton import ops

    if not ops.INTERPRETED:
        pytest.skip("CPU tensors need Triton's interpreter")
    script = runpy.run_path(str(SCRIPT), run_name="_test_benchmark_kernels")
    payload = script["main"](["--smoke", "--accuracy", "--out-dir", str(tmp_path)])
    registered = script["registered_ops"]()
    assert payload["registered"] == registered and {"litv2::add_layer_norm", "litv2::dwconv3x3_gelu_backward"} <= \
        set(registered)
    timed = {r["op"] for r in payload["kernels"]}
    assert {"litv2::add_layer_norm", "litv2::add_layer_norm_backward", "litv2::dwconv3x3_gelu",
            "litv2::dwconv3x3_gelu_backward"} <= timed <= set(registered)
    for r in payload["kernels"]:
        assert r["us"] > 0 and r["bytes"] > 0 and r["pct_copy"] > 0 and r["calls_per_step"] >= 1
    assert payload["copy_gb_s"] > 0 and payload["smoke"] is True
    acc = payload["accuracy"]
    assert acc["ok"] and acc["logits_err"] <= 1e-4 and acc["grads_compared"] > 50 and not acc["grads_missing"]
    md = (tmp_path / "benchmark_kernels.md").read_text()
    assert "CPU smoke run under Triton's interpreter" in md and "| litv2::dwconv3x3_gelu |" in md
    assert json.loads((tmp_path / "benchmark_kernels.json").read_text())["kernels"] == json.loads(
        json.dumps(payload["kernels"]))


def test_without_a_gpu_the_full_run_is_one_line_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    script = runpy.run_path(str(SCRIPT), run_name="_test_benchmark_kernels")
    with pytest.raises(SystemExit, match="no CUDA device here; --smoke runs the CPU check"):
        script["main"](["--out-dir", "unused"])
