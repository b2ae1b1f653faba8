"""scripts/benchmark_kernels.py on CPU under Triton's interpreter (marked triton: ``make test`` counts these apart)."""
import json

import pytest
import torch

from engine_utils import load_script  # noqa: E402

pytest.importorskip("triton")
from litv2.accel import stats  # noqa: E402

pytestmark = pytest.mark.triton


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run (a GPU runs the real benchmark)")
def test_smoke_times_every_litv2_op_the_model_calls_and_checks_accuracy(tmp_path):
    from litv2.accel.triton import ops

    if not ops.INTERPRETED:
        pytest.skip("CPU tensors need Triton's interpreter")
    script = load_script("benchmark_kernels.py")
    payload = script["main"](["--smoke", "--accuracy", "--out-dir", str(tmp_path)])
    registered = script["registered_ops"]()
    assert payload["registered"] == registered and {"litv2::add_layer_norm", "litv2::dwconv3x3_gelu_backward",
                                                    "litv2::hilo_attention", "litv2::dtm_gather"} <= set(registered)
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
    script = load_script("benchmark_kernels.py")
    with pytest.raises(SystemExit, match="no CUDA device here; --smoke runs the CPU check"):
        script["main"](["--out-dir", "unused"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run under the interpreter")
def test_benchmark_attention_times_hilo_on_the_triton_kernels_beside_the_plain_layer(tmp_path):
    """``--methods hilo,hilo@triton,msa``: the Table IV layer on the Triton kernels is a row of its own, with the
    plain layer's params and FLOPs; "all" leaves it out."""
    script = load_script("benchmark_attention.py")
    stats.clear()
    script["main"](["--smoke", "--methods", "hilo,hilo@triton,msa", "--dim", "64", "--heads", "4", "--no-plot",
                    "--out-dir", str(tmp_path)])
    res = json.loads((tmp_path / "attention_table.json").read_text())["results"]
    assert res["hilo@triton"]["name"] == "HiLo (Triton)" and stats["triton_hilo_attention"] > 0
    assert (res["hilo@triton"]["params"], res["hilo@triton"]["flops"]) == (res["hilo"]["params"], res["hilo"]["flops"])
    assert all(isinstance(res[k]["cpu_img_s"], float) and res[k]["cpu_img_s"] > 0 for k in res)
    assert "hilo@triton" not in script["select_methods"](script["layer_methods"](64, 4), "all")
