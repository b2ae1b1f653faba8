"""The Triton kernels of litv2.accel.triton against the plain-torch reference: on CUDA tensors where there is a GPU,
else run by Triton's interpreter on CPU tensors (conftest.py turns it on where CUDA is absent), and compiled ahead of
time for Hopper (sm_90) to check the resources each launch takes. ``make test`` runs these apart:
``pytest tests -m triton``.

The add + LayerNorm and dwconv kernels use no ``tl.dot``, so bf16 is checked in full there (outputs and gradients);
its tolerance covers the interpreter's fp32 -> bf16 conversion, which truncates where a GPU rounds to nearest. The
interpreter's bf16 ``tl.dot`` is wrong (Lo-Fi attention's launches cast to fp32 under it: test_triton_hilo.py).
"""
import copy
import json
import subprocess
import sys
import weakref
from collections import Counter

import pytest
import torch

from engine_utils import (ENV, FAST, KERNEL_DEVICE, ROOT, TINY, TINY_LITV2, assert_one_line_error,
                          compiled_matches_eager, compose)

pytest.importorskip("triton")
from litv2.accel import accelerate, is_accelerated, restore, stats  # noqa: E402
from litv2.accel.triton import NO_INTERPRETER, ops, reference  # noqa: E402
from litv2.accel.triton import modules as triton_modules  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("kernel_device")]
# on CUDA tensors where there is a GPU, else on CPU tensors, which need Triton's interpreter
interpreted = pytest.mark.skipif(KERNEL_DEVICE == "cpu" and not ops.INTERPRETED,
                                 reason="no GPU, and CPU tensors need Triton's interpreter")
# (atol, rtol) against the reference: fp32 within 1e-4; fp16 a few ulps; bf16 two ulps plus the truncation above
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
KERNEL_STATS = ("triton_add_layer_norm", "triton_add_layer_norm_backward", "triton_dwconv_gelu",
                "triton_dwconv_gelu_backward")
HILO_STATS = ("triton_hilo_attention", "triton_hilo_attention_backward")
POOL_STATS = ("triton_add_layer_norm_pool", "triton_add_layer_norm_pool_backward")
NO_INTERPRETER_ENV = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}


def _grads(fn, inputs, grad_outputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    outputs = fn(*leaves)
    used = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad([o for o, _ in used], wrt, [g for _, g in used], allow_unused=True)
    return [o.detach() for o in outputs], grads


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, uses", [((2, 5, 7, 24), "yz"), ((3, 1, 9, 40), "yz"), ((2, 3, 5, 24), "z"),
                                         ((2, 3, 5, 24), "y")])
def test_add_layer_norm_matches_the_reference(shape, uses, dtype):
    """y = x + r and z = LayerNorm(y) (maps 5x7, 1x9, 3x5, C 24 and 40, more rows than one program's tiles), and
    the gradients of x, r, weight and bias with both outputs used, only z (no y gradient), only y."""
    torch.manual_seed(0)
    C = shape[-1]
    x, r = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    weight, bias = (1 + 0.5 * torch.randn(C)).to(dtype), torch.randn(C).to(dtype)
    dy, dz = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    grad_outputs = (dy if "y" in uses else None, dz if "z" in uses else None)
    stats.clear()
    got, got_grads = _grads(lambda *t: ops.add_layer_norm(*t, 1e-5, dtype)[:2], (x, r, weight, bias), grad_outputs)
    want, want_grads = _grads(lambda *t: reference.add_layer_norm(*t, 1e-5, dtype), (x, r, weight, bias),
                              grad_outputs)
    assert stats["triton_add_layer_norm"] == 1 and stats["triton_add_layer_norm_backward"] == ("z" in uses)
    atol, rtol = TOL[dtype]
    for name, g, w in zip(("y", "z", "dx", "dr", "dweight", "dbias"), got + list(got_grads), want + list(want_grads)):
        if w is None:  # only y used: LayerNorm parameters get no gradient
            assert g is None, name
            continue
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=name)


@interpreted
def test_add_layer_norm_takes_a_low_precision_branch_and_writes_the_autocast_dtype():
    """Under autocast the fused module path reads the fp32 residual stream and the bf16 branch as they are and
    writes z in bf16 (autocast's LayerNorm would write fp32, for the next linear layer to cast); y stays fp32."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(24)
    x, r = torch.randn(2, 5, 7, 24), torch.randn(2, 5, 7, 24).bfloat16()
    stats.clear()
    with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
        y, z = triton_modules.add_norm(x, r, norm)
        plain = norm(x + r)
    assert stats["triton_add_layer_norm"] == 1
    assert (y.dtype, z.dtype, plain.dtype) == (torch.float32, torch.bfloat16, torch.float32)
    torch.testing.assert_close(y, x + r.float(), atol=0, rtol=0)
    torch.testing.assert_close(z.float(), plain, atol=3e-2, rtol=3e-2)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, bias", [((2, 5, 7, 72), True), ((3, 1, 6, 24), True), ((1, 7, 5, 20), False)])
def test_dwconv3x3_gelu_matches_the_reference(shape, bias, dtype):
    """GELU(conv3x3(x) + bias) on non-square maps (5x7, 1x6, 7x5), C 72 (two channel blocks, one partial), 24
    and 20, with and without bias: the output and the gradients of x, weight and bias. Parameters stay fp32, as
    under autocast."""
    torch.manual_seed(0)
    C = shape[-1]
    x = torch.randn(shape).to(dtype)
    weight, b = torch.randn(C, 1, 3, 3), torch.randn(C) if bias else None
    dg = torch.randn(shape).to(dtype)
    stats.clear()
    (got,), got_grads = _grads(lambda *t: (ops.dwconv3x3_gelu(*t),), (x, weight, b), (dg,))
    (want,), want_grads = _grads(lambda *t: (reference.dwconv3x3_gelu(*t),), (x, weight, b), (dg,))
    assert stats["triton_dwconv_gelu"] == 1 and stats["triton_dwconv_gelu_backward"] == 1
    atol, rtol = TOL[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for name, g, w in zip(("dx", "dweight", "dbias"), got_grads, want_grads):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        # dweight and dbias sum a product over every position: relative to their size
        scale = 1.0 if name == "dx" else float(w.abs().max())
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, msg=name)


@interpreted
def test_dwconv3x3_gelu_keeps_only_its_input_for_backward():
    """Autograd keeps the op's input and parameters, not its output or the conv's (the backward recomputes)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 24, requires_grad=True)
    weight, bias = torch.randn(24, 1, 3, 3, requires_grad=True), torch.randn(24, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.dwconv3x3_gelu(x, weight, bias)
    assert sorted(t.data_ptr() for t in saved) == sorted(t.data_ptr() for t in (x, weight, bias))
    assert out.data_ptr() not in {t.data_ptr() for t in saved}


@interpreted
def test_triton_convffn_keeps_no_gelu_output_and_gives_the_same_gradients():
    """With recompute_gelu, fc2's input (the kernel's output) does not outlive the forward pass; the backward
    pass runs the kernel again and the gradients are bitwise those of the module that keeps it."""
    from litv2.models.litv2 import ConvFFN

    torch.manual_seed(0)
    keep = accelerate(ConvFFN(8, 40).train(), recompute_gelu=False, kernels="triton")
    model = accelerate(copy.deepcopy(keep), kernels="triton")
    targets = []

    class Recording(triton_modules.recompute_when_saved):
        def __init__(self, target, remake):
            targets.append(weakref.ref(target))
            super().__init__(target, remake)

    x = torch.randn(2, 5, 7, 8, requires_grad=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_modules, "recompute_when_saved", Recording)
        stats.clear()
        out = model(x)
        assert len(targets) == 1 and targets[0]() is None  # made, handed to fc2, not kept
        out.square().sum().backward()
        assert stats["triton_dwconv_gelu"] == 2 and stats["triton_dwconv_gelu_backward"] == 1  # one remake
        keep(x.detach()).square().sum().backward()
    assert len(targets) == 1  # the module keeping its GELU output set up no recompute
    for (name, p), q in zip(model.named_parameters(), keep.parameters()):
        assert torch.equal(p.grad, q.grad), name


@interpreted
def test_tiny_litv2_on_triton_kernels_equals_the_plain_model(tiny):
    """A training step of the tiny LITv2 (maps 12x20, 6x10, 3x5, 1x2) with kernels="triton": logits and every
    gradient within 1e-4 of the plain model's, every kernel taken; restore() gives back the plain modules. Every
    HiLo (stage 3: 3x5 map, s=2, padded; stage 4: 1x2, s=1) runs litv2::hilo_attention; the second block of stage 3
    gets its pooled map from the add + LayerNorm before it (the first pools by itself)."""
    plain = tiny().train()
    model = accelerate(copy.deepcopy(plain), kernels="triton")
    names = {type(m).__name__ for m in model.modules()}
    assert {"TritonBlock", "TritonStage", "TritonConvFFN", "TritonHiLo"} <= names
    assert "HiLo" not in names
    x = torch.randn(2, 3, 48, 80)
    stats.clear()
    out = model(x)
    out.sum().backward()
    ref = plain(x)
    ref.sum().backward()
    assert all(stats[k] > 0 for k in KERNEL_STATS + ("recompute_gelu",)), dict(stats)
    assert all(stats[k] == sum(TINY["depths"][2:]) for k in HILO_STATS), dict(stats)
    assert all(stats[k] == 1 for k in POOL_STATS), dict(stats)
    # one fused add + LayerNorm per block but the first of each stage, one more per attention block (the one before a
    # pooling HiLo also pools)
    assert (stats["triton_add_layer_norm"] + stats["triton_add_layer_norm_pool"]
            == sum(TINY["depths"]) - len(TINY["depths"]) + sum(TINY["depths"][2:]))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)

    accelerate(model)  # back to the default kernels
    assert not {"TritonBlock", "TritonStage", "TritonConvFFN"} & {type(m).__name__ for m in model.modules()}
    restore(accelerate(model, kernels="triton"))
    assert not is_accelerated(model)
    assert {type(m) for m in model.modules()} == {type(m) for m in plain.modules()}
    model.load_state_dict(plain.state_dict())  # (the train-mode BatchNorm statistics moved by rounding)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))
    torch.fx.symbolic_trace(model)  # the plain modules again: FX-traceable


@interpreted
def test_tiny_litv2_on_triton_kernels_under_bf16_autocast(tiny):
    """CPU bf16 autocast: the forward close to fp32, every gradient finite."""
    model = accelerate(tiny().train(), kernels="triton")
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        fp32 = model(x)
    with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - fp32).abs().max() <= 0.05 * fp32.abs().max()
    out.float().logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@interpreted
def test_torch_compile_traces_the_ops_without_graph_breaks(tiny):
    """fullgraph=True (a graph break would fail) with aot_eager: forward and backward call the litv2 ops (HiLo's
    and the pooling add + LayerNorm's included), the results equal eager's."""
    model = accelerate(tiny().train(), kernels="triton")
    taken = Counter(compiled_matches_eager(model, torch.randn(2, 3, 48, 80)))
    assert all(taken[k] > 0 for k in KERNEL_STATS + HILO_STATS + POOL_STATS), taken
    assert not taken["recompute_gelu"]  # compiled: the partitioner decides what to keep


@interpreted
def test_the_engine_takes_model_kernels_triton():
    from litv2.engine.builders import apply_accel, build_model

    cfg = compose(["data=digits", "model.kernels=triton"])
    model = apply_accel(build_model(cfg), cfg)
    assert {"TritonBlock", "TritonStage", "TritonConvFFN"} <= {type(m).__name__ for m in model.modules()}


def test_cpu_without_the_interpreter_is_one_line_error(tmp_path):
    """train.py with model.kernels=triton on a CPU, TRITON_INTERPRET unset: one line saying what to do."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=litv2_s", "data=synthetic",
                           "model.kernels=triton", "trainer.device=cpu", "trainer.max_steps=1",
                           f"paths.runs_root={tmp_path}", *TINY_LITV2,
                           *FAST], cwd=ROOT, env=NO_INTERPRETER_ENV, capture_output=True, text=True, timeout=180)
    assert_one_line_error(proc, NO_INTERPRETER)


def test_aot_resource_check_flags_what_would_not_run_on_hopper():
    from litv2.accel.triton import aot

    fine = dict(shared=8192, n_regs=128, n_spills=0, num_warps=8)
    assert aot.problems(fine) == []
    assert aot.problems(dict(fine, shared=228 * 1024))[0].startswith("shared memory")
    assert aot.problems(dict(fine, n_regs=255, num_warps=16))[0].startswith("255 registers x 512 threads")
    assert aot.problems(dict(fine, n_spills=3)) == ["12 B of spills per thread"]


def test_every_kernel_compiles_for_hopper_without_spills():
    """Every launch of a training step of LITv2-S/M/B (batch 64, 224², bf16 autocast and fp32) compiled for sm_90
    with the launcher's block sizes and warps, in a process without the interpreter: within Hopper's shared memory
    and registers per block, no spills (``python -m litv2.accel.triton.aot`` prints the table)."""
    proc = subprocess.run([sys.executable, "-m", "litv2.accel.triton.aot", "--json"], cwd=ROOT,
                          env=NO_INTERPRETER_ENV, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, [(r["kernel"], r["blocks"], r["problems"]) for r in rows if r["problems"]]
    assert {r["kernel"] for r in rows} == {"add_layer_norm_fwd", "add_layer_norm_bwd", "dwconv3x3",
                                           "dwconv3x3_gelu_bwd", "hifi_fwd", "hifi_bwd", "lofi_fwd", "lofi_bwd_dkdv",
                                           "lofi_bwd_dq", "add_layer_norm_pool_fwd", "add_layer_norm_pool_bwd",
                                           "dtm_gather_fwd", "dtm_gather_bwd"}
    shapes = [s for r in rows for s in r["shapes"]]
    # five launches per block; HiLo (s=2 at 14x14): Hi-Fi's two, Lo-Fi's three and the pooling add + LayerNorm's two;
    # MSA (s=1 at 7x7): Lo-Fi's three
    for name in ("litv2_s", "litv2_m", "litv2_b"):
        for side, launches in ((56, 5), (28, 5), (14, 5 + 7), (7, 5 + 3)):
            assert sum(s.startswith(name) and s.endswith(f" {side}x{side}") for s in shapes) == 2 * launches, (name,
                                                                                                            side)
        assert sum(s.startswith(name) and s.endswith(" (DTM)") for s in shapes) == 2 * 3 * 2, name  # 3 DTMs
        assert sum(s.startswith(name) and s.endswith(" (TF32)") for s in shapes) == 3 + 3, name  # fp32 Lo-Fi, 2 maps
    assert any(r["blocks"].get("TF32") for r in rows) and any(r["blocks"].get("TF32") is False for r in rows)
    for r in rows:
        assert r["n_spills"] == 0 and r["shared"] <= 227 * 1024 and r["n_regs"] * r["num_warps"] * 32 <= 65536, r
