"""The acceleration layer (litv2.accel): the same model on faster kernels and with less training memory.

What it must never do is change what is computed: outputs and gradients are the plain model's (to float rounding,
or bitwise where the same kernels run); it is applied and undone explicitly; and each CPU fast path it promises is
actually taken on the pinned torch (a torch upgrade that loses one must fail here, not go unnoticed).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import litv2  # noqa: F401  (registers the models)
from litv2.accel import Flags, accelerate, cpu_fast_paths, dtm, is_accelerated, modules, onednn, restore, stats
from litv2.accel.recompute import recompute_when_saved
from litv2.models import LITv2, load_checkpoint
from litv2.models.litv2 import ConvFFN

from engine_utils import TINY


def ffn(**options):
    """An accelerated ConvFFN (8 -> 32 -> 8) in training mode, seeded."""
    torch.manual_seed(0)
    return accelerate(ConvFFN(8, 32).train(), **options)


def _record_dwconv_reruns(monkeypatch) -> list:
    """The depthwise-conv outputs the backward pass makes again."""
    reruns = []
    run = modules.DWConvRecompute._run
    monkeypatch.setattr(modules.DWConvRecompute, "_run", lambda self: reruns.append(run(self)) or reruns[-1])
    return reruns


# ---- applied explicitly and reversibly ----------------------------------------------------------------------

def test_accelerate_and_restore_keep_parameters_state_dict_and_outputs(tiny):
    plain = tiny().eval()
    model = copy.deepcopy(plain)
    params = {n: p for n, p in model.named_parameters()}
    accelerate(model)
    assert is_accelerated(model) and not is_accelerated(plain)
    assert {n: p for n, p in model.named_parameters()} == params  # the same tensors, not copies
    assert list(model.state_dict()) == list(plain.state_dict())
    x = torch.randn(3, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-4, rtol=0)
        restore(model)
        assert not is_accelerated(model)
        assert {type(m) for m in model.modules()} == {type(m) for m in plain.modules()}
        assert torch.equal(model(x), plain(x))
        torch.jit.script(model)  # the plain modules again: scriptable


def test_each_cpu_fast_path_is_taken(tiny, monkeypatch):
    """Inference and a training step of the accelerated model on CPU take every fast path: oneDNN linears,
    blocked weights, fused dwconv+GELU, the embedding_bag DTM, batch chunks, the two recomputes."""
    monkeypatch.setattr(Flags, "chunk_bytes", 16 * 16 * 64 * 4)  # one sample of TINY's stage 1 per chunk
    model = accelerate(tiny(), recompute_dwconv=True)
    stats.clear()
    with torch.inference_mode():
        model.eval()(torch.randn(2, 3, 64, 64))
    model.train()(torch.randn(2, 3, 64, 64)).sum().backward()
    assert set(stats) == {"onednn_linear", "packed_weights", "fused_dwconv_gelu", "dtm_embedding_bag",
                          "batch_chunks", "recompute_gelu", "recompute_dwconv"}, dict(stats)
    assert all(n > 0 for n in stats.values())


def test_private_torch_apis_are_off_with_a_warning_on_an_unchecked_torch(monkeypatch):
    from litv2.accel import _internals

    monkeypatch.setattr(_internals, "torch_version", lambda: (_internals.CHECKED[1][0], _internals.CHECKED[1][1] + 1))
    monkeypatch.setattr(_internals, "_warned", set())
    monkeypatch.delenv("LITV2_TRUST_TORCH", raising=False)
    with pytest.warns(RuntimeWarning, match="oneDNN CPU kernels .* is off .*outside the releases it was checked on"):
        assert _internals.onednn_conv_pointwise() is None
    monkeypatch.setenv("LITV2_TRUST_TORCH", "1")
    assert _internals.onednn_conv_pointwise() is not None


def test_the_engine_applies_accel_from_the_config(tiny):
    from engine_utils import compose
    from litv2.engine.builders import apply_accel, build_model

    cfg = compose(["data=digits", "model.recompute_dwconv=true"])
    model = apply_accel(build_model(cfg), cfg)
    ffns = [m for m in model.modules() if isinstance(m, ConvFFN)]
    assert ffns and all(type(m) is modules.FastConvFFN and m.recompute_dwconv and m.recompute_gelu for m in ffns)
    cfg = compose(["data=digits", "model.accel=none"])
    assert not is_accelerated(apply_accel(build_model(cfg), cfg))
    cfg = compose(["data=digits", "model=timm", "model.name=resnet10t"])
    assert apply_accel(build_model(cfg), cfg) is not None


# ---- training memory: the ConvFFN recomputes ------------------------------------------------------------------

def _gelu_outputs_alive_after_forward(model, x, monkeypatch):
    """Run a training forward; return whether each tensor a ConvFFN chose to recompute (GELU output,
    depthwise-conv output) is still alive before backward, and the output."""
    import weakref

    targets = []

    class Recording(modules.recompute_when_saved):
        def __init__(self, target, remake):
            targets.append(weakref.ref(target))
            super().__init__(target, remake)

    monkeypatch.setattr(modules, "recompute_when_saved", Recording)
    out = model(x)
    return [t() is not None for t in targets], out


@pytest.mark.parametrize("fast_paths, amp", [(True, False), (False, False), (True, True), (False, True)])
def test_convffn_recomputes_gelu_instead_of_keeping_it(fast_paths, amp, monkeypatch, tiny):
    """With recompute_gelu (the default) no GELU output outlives the forward pass; outputs and gradients
    are bitwise those of the plain model; activation checkpointing, no_grad and the flag turn it off."""
    previous = cpu_fast_paths()
    cpu_fast_paths(fast_paths)
    try:
        plain = accelerate(tiny().train(), recompute_gelu=False)  # the same kernels, keeping its GELU outputs
        model = accelerate(tiny().train())
        x = torch.randn(2, 3, 64, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):  # fast paths: CPU 1x1 convs, else F.linear
            alive, out = _gelu_outputs_alive_after_forward(model, x, monkeypatch)
            ref = plain(x)
        assert alive == [False] * sum(TINY["depths"])  # one per block, none kept
        out.float().square().sum().backward()
        ref.float().square().sum().backward()
        assert torch.equal(out, ref)
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            assert torch.equal(p.grad, q.grad), name

        model.set_grad_checkpointing(True)  # checkpointing recomputes whole blocks; ConvFFN stands aside
        assert _gelu_outputs_alive_after_forward(model, x, monkeypatch)[0] == []
        model.set_grad_checkpointing(False)
        with torch.no_grad():
            assert _gelu_outputs_alive_after_forward(model, x, monkeypatch)[0] == []
        assert _gelu_outputs_alive_after_forward(plain, x, monkeypatch)[0] == []
    finally:
        cpu_fast_paths(previous)


@pytest.mark.parametrize("fast_paths, amp", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("recompute_gelu", [True, False])
def test_convffn_recomputes_the_dwconv_output_too(recompute_gelu, fast_paths, amp, monkeypatch, tiny):
    """recompute_dwconv: no depthwise-conv output (GELU's input) outlives the forward pass either; the
    backward pass makes it again under the forward's autocast state (not the caller's at backward time),
    once per block when the GELU output is recomputed too; outputs and gradients are bitwise those of the
    plain model."""
    reruns = _record_dwconv_reruns(monkeypatch)
    previous = cpu_fast_paths()
    cpu_fast_paths(fast_paths)
    try:
        plain = accelerate(tiny().train(), recompute_gelu=False)
        model = accelerate(tiny().train(), recompute_gelu=recompute_gelu, recompute_dwconv=True)
        x = torch.randn(2, 3, 64, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            alive, out = _gelu_outputs_alive_after_forward(model, x, monkeypatch)
            ref = plain(x)
        blocks = sum(TINY["depths"])
        assert alive == [False] * (blocks * (2 if recompute_gelu else 1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not amp):  # the opposite state at backward
            out.float().square().sum().backward()  # (on CPU an enclosing autocast changes backward kernels too)
            ref.float().square().sum().backward()
        assert [y.dtype for y in reruns] == [torch.bfloat16 if amp else torch.float32] * blocks
        assert torch.equal(out, ref)
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            assert torch.equal(p.grad, q.grad), name
    finally:
        cpu_fast_paths(previous)


def test_dwconv_recompute_gives_the_same_second_backward_and_second_order_gradients(monkeypatch):
    """retain_graph: a second backward recomputes again; create_graph: double backward through the FFN (as
    gradient penalties need) gives the plain model's second-order gradients (autograd attaches the remade
    tensors to the forward's graph, so the rerun builds no graph of its own)."""
    reruns = _record_dwconv_reruns(monkeypatch)
    x = torch.randn(2, 5, 7, 8, requires_grad=True)
    models = [ffn(recompute_gelu=flag, recompute_dwconv=flag) for flag in (True, False)]
    results = []
    for m in models:
        out = m(x).square().sum()
        first = torch.autograd.grad(out, [x, *m.parameters()], retain_graph=True)
        again = torch.autograd.grad(out, [x, *m.parameters()], create_graph=True)
        second = torch.autograd.grad(again[0].square().sum(), [x, *m.parameters()])
        results.append((first, again, second))
    for a, b in zip(*results):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert len(reruns) >= 2 and not any(y.requires_grad for y in reruns)  # from the second on under create_graph


def test_dwconv_recompute_runs_on_a_device_without_autocast():
    """The meta device (shape checks, deferred init) has no autocast state to record."""
    model = ffn(recompute_dwconv=True).to("meta")
    assert model(torch.randn(2, 5, 7, 8, device="meta", requires_grad=True)).shape == (2, 5, 7, 8)


def test_dwconv_recompute_stands_aside_for_conv_hooks_and_parametrizations():
    """A hooked or parametrized depthwise conv keeps its output: spectral norm's power iteration runs once per
    forward (gradients equal the plain model's), and a forward hook sees one call per forward."""
    from torch.nn.utils.parametrizations import spectral_norm

    x = torch.randn(2, 5, 7, 8, requires_grad=True)
    plain, model = ffn(), ffn(recompute_dwconv=True)
    for m in (plain, model):
        spectral_norm(m.dwconv.dwconv)
    model.load_state_dict(plain.state_dict())  # the same power-iteration vectors
    grads = [torch.autograd.grad(m(x).square().sum(), [x, *m.parameters()]) for m in (plain, model)]
    for u, v in zip(*grads):
        assert torch.equal(u, v)

    plain, model = ffn(), ffn(recompute_dwconv=True)
    calls = []
    for m in (plain, model):  # a hook that changes the output: the rerun (no hooks) would differ
        m.dwconv.dwconv.register_forward_hook(lambda mod, inp, out: calls.append(torch.is_grad_enabled()) or out * 2)
    grads = [torch.autograd.grad(m(x).square().sum(), [x, *m.parameters()]) for m in (plain, model)]
    for u, v in zip(*grads):
        assert torch.equal(u, v)
    assert calls == [True, True]  # once per forward, none in backward


def test_gelu_recompute_stands_aside_for_torch_func_and_disabled_hooks():
    """torch.func transforms switch saved-tensor hooks off (per-sample gradients, Opacus): the plain path
    runs there, with the same gradients as the model that keeps its GELU outputs."""
    from torch.func import functional_call, grad

    x = torch.randn(2, 5, 7, 8)
    models = [ffn(recompute_gelu=flag, recompute_dwconv=flag) for flag in (True, False)]
    grads = []
    for m in models:
        params = {k: v.detach() for k, v in m.named_parameters()}
        grads.append(grad(lambda p: functional_call(m, p, (x,)).square().sum())(params))
        with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
            m(x).sum().backward()
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_recompute_when_saved_passes_tensor_subclasses_through():
    """A saved weight that is a storage-less subclass (as DTensor or float8 weights) is kept as it is."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")

    y = torch.randn(4, 6, requires_grad=True)
    g = F.gelu(y)
    w = torch.randn(3, 6)
    w = two_tensor.TwoTensor(w, w.clone()).requires_grad_()
    with recompute_when_saved(g, lambda: F.gelu(y)):
        out = F.linear(g, w)
    out.sum().backward()
    assert y.grad is not None and w.grad is not None


def test_recompute_when_saved_refuses_a_different_layout():
    y = torch.randn(4, 6, requires_grad=True)
    g = F.gelu(y)
    with recompute_when_saved(g, lambda: F.gelu(y).t().contiguous().t()):  # same values, other strides
        out = g @ torch.randn(6, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="remade tensor has layout"):
        out.sum().backward()
    g = F.gelu(y)
    with recompute_when_saved(g, lambda: F.gelu(y.double())):  # same strides, other dtype (e.g. no autocast)
        out = g @ torch.randn(6, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="float64"):
        out.sum().backward()


@pytest.mark.parametrize("train", [False, True])
def test_torch_compile_on_cpu_traces_the_fast_formulation(train, tiny):
    """Under torch.compile on CPU, linears stay 1x1 convs and DTM stays resample + conv (no batch chunks).

    Inductor then sends them to oneDNN itself; with the plain model it gets ``F.linear`` (MKL's slow path on
    AMD CPUs) and torchvision's scalar ``deform_conv2d``.
    """
    from torchvision.ops import deform_conv2d

    targets = []

    def capture(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    model = accelerate(tiny().train(train))
    x = torch.randn(2, 3, 64, 64)
    with torch.set_grad_enabled(train):
        out = torch.compile(model, backend=capture, dynamic=False)(x)
        eager = model(x)
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=0)
    assert targets.count(F.linear) == 1  # the classifier on pooled features; every block linear is a conv
    assert F.conv2d in targets
    assert F.grid_sample in targets and deform_conv2d not in targets
    torch._dynamo.reset()


@pytest.mark.parametrize("autocast", [False, True])
def test_torch_compile_without_the_cpu_fast_paths_still_traces_the_resampled_dtm(autocast, tiny):
    """Compiled on a device without the CPU fast paths (a GPU; here CPU with them switched off), the DTM is
    resample + conv, not torchvision's opaque op: inductor fuses the sampling. Under autocast the sampling stays
    fp32 and the strided conv follows autocast; eager keeps torchvision's op in fp32."""
    from torchvision.ops import deform_conv2d

    calls, strided = [], []  # (target, traced output) of every call; outputs of the convs of sampled maps

    def capture(gm, example_inputs):
        for n in gm.graph.nodes:
            if n.op == "call_function":
                calls.append((n.target, n.meta.get("example_value")))
                if n.target is F.conv2d and getattr(n.args[0], "target", None) is F.grid_sample:
                    strided.append(n.meta.get("example_value"))
        return gm.forward

    torch._dynamo.reset()
    model = accelerate(tiny().eval())
    for m in model.modules():  # offsets off the pixel grid
        if hasattr(m, "conv_offset"):
            torch.nn.init.normal_(m.conv_offset.weight, std=0.5)
    x = torch.randn(2, 3, 64, 64)
    previous = cpu_fast_paths()
    try:
        cpu_fast_paths(False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            eager = model(x)
            out = torch.compile(model, backend=capture, dynamic=False)(x)
    finally:
        cpu_fast_paths(previous)
        torch._dynamo.reset()
    targets = [t for t, _ in calls]
    assert F.grid_sample in targets and deform_conv2d not in targets and targets.count(F.linear) > 1
    samples = [v for t, v in calls if t is F.grid_sample]
    assert len(samples) == 3 and all(v.dtype == torch.float32 for v in samples)
    assert len(strided) == 3 and all(v.dtype == (torch.bfloat16 if autocast else torch.float32) for v in strided)
    tol = 0.05 if autocast else 1e-5
    torch.testing.assert_close(out.float(), eager.float(), atol=tol, rtol=tol)


def test_activations_stay_channels_last_from_patch_embedding_to_the_head(tiny):
    """Every conv writes channels-last, so the (B, H, W, C) maps between layers need no layout copy."""
    model = accelerate(tiny().eval())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]  # patch embed, DTM offsets
    outputs = []
    for conv in convs:
        conv.register_forward_hook(lambda mod, inp, out: outputs.append(out))
    dtm_outputs = []
    for stage in model.layers:
        if getattr(stage, "downsample", None) is not None:
            stage.downsample.register_forward_hook(lambda mod, inp, out: dtm_outputs.append(out))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))  # an NCHW batch, as loaders give it
    assert outputs and all(o.is_contiguous(memory_format=torch.channels_last) for o in outputs)
    assert dtm_outputs and all(o.is_contiguous() for o in dtm_outputs)  # (B, H, W, C)


@pytest.mark.parametrize("offsets, dtype, tol", [("fresh", torch.float32, 1e-4), ("trained", torch.float64, 1e-9)])
def test_cpu_fast_paths_kernels_compute_the_same_as_plain_ops(offsets, dtype, tol, tiny):
    """oneDNN kernels (linear as 1x1 conv, fused dwconv+GELU) and the resampled DTM are a speed change
    only: outputs and grads against the plain model, with DTM offsets at zero (a fresh model) or well off the
    pixel grid. (Off the grid, fp32 gradients through BatchNorm at batch 2 differ by rounding beyond 1e-4; fp64
    shows the two compute the same function.)"""
    plain = tiny().train().to(dtype)
    if offsets == "trained":
        for module in plain.modules():
            if hasattr(module, "conv_offset"):
                torch.nn.init.normal_(module.conv_offset.weight, std=0.3)  # offsets of 1.5-3 pixels
    fast = accelerate(copy.deepcopy(plain))
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    results = []
    for model in (fast, plain):
        out = model(x)
        out.sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_fast, g_fast), (out_plain, g_plain) = results
    torch.testing.assert_close(out_fast, out_plain, atol=tol, rtol=0)
    for name, grad in g_plain.items():
        if name.endswith("dconv.bias"):  # feeds train-mode BatchNorm: its gradient is 0 up to rounding
            assert grad.abs().max() < 1e3 * tol
            continue
        torch.testing.assert_close(g_fast[name], grad, atol=tol, rtol=tol, msg=name)


def test_cpu_fast_paths_inference_matches_plain_ops_on_release_weights(release_tiny):
    """Inference path (fused dwconv+GELU, no autograd) against the plain model."""
    kwargs, path, _ = release_tiny
    model = LITv2(**kwargs).eval()
    load_checkpoint(model, path)
    plain = copy.deepcopy(model)
    accelerate(model)
    x = torch.randn(3, 3, 80, 48)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), plain(x), atol=1e-4, rtol=0)


def _torchvision_deform_conv2d_and_grads(x, offset, weight, bias, stride, padding, grad_out):
    from torchvision.ops import deform_conv2d
    leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
    out = deform_conv2d(*leaves, stride=stride, padding=padding)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def _forbid_the_other_sampler(monkeypatch, embedding_bag: bool) -> None:
    """Make the sampler that ``Flags.dtm_embedding_bag`` does not pick raise, so a test sees which one ran."""
    def not_called(*args, **kwargs):
        raise AssertionError(f"the {'grid_sample' if embedding_bag else 'embedding_bag'} sampler ran")

    if embedding_bag:
        monkeypatch.setattr(F, "grid_sample", not_called)
    else:
        monkeypatch.setattr(dtm, "_bilinear_patches", not_called)


@pytest.mark.parametrize("embedding_bag", [True, False], ids=["embedding_bag", "grid_sample"])
@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((2, 6, 12, 16), 2, 2, 0),  # DTM's 2x2/2
    ((2, 5, 9, 7), 2, 2, 0),  # odd sides: the last row/column is not sampled by the grid
    ((1, 4, 8, 10), 3, 1, 1),  # 3x3/1 with zero padding: taps outside the map
    ((2, 3, 1, 6), 1, 1, 0),  # a one-pixel-high map
])
def test_deform_conv2d_resampled_is_torchvisions_deformable_conv(monkeypatch, shape, kernel, stride, padding,
                                                                 embedding_bag):
    """DTM on CPU: resampling (either sampler) + strided conv gives torchvision's outputs and all four gradients."""
    monkeypatch.setattr(Flags, "dtm_embedding_bag", embedding_bag)
    _forbid_the_other_sampler(monkeypatch, embedding_bag)
    torch.manual_seed(0)
    B, C, H, W = shape
    Ho, Wo = (H + 2 * padding - kernel) // stride + 1, (W + 2 * padding - kernel) // stride + 1
    x = torch.randn(shape, dtype=torch.float64)
    offset = 2.5 * torch.randn(B, 2 * kernel * kernel, Ho, Wo, dtype=torch.float64)  # many taps off the map
    weight, bias = torch.randn(7, C, kernel, kernel, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    grad_out = torch.randn(B, 7, Ho, Wo, dtype=torch.float64)
    ref, ref_grads = _torchvision_deform_conv2d_and_grads(x, offset, weight, bias, stride, padding, grad_out)

    def not_called(*args, **kwargs):
        raise AssertionError("fell back to torchvision's deform_conv2d")

    monkeypatch.setattr(dtm, "deform_conv2d", not_called)
    with torch.no_grad():
        torch.testing.assert_close(dtm.deform_conv2d_resampled(x, offset, weight, bias, stride, padding), ref,
                                   atol=1e-10, rtol=0)
    leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
    dtm.deform_conv2d_resampled(*leaves, stride, padding).backward(grad_out)
    for got, want in zip([t.grad for t in leaves], ref_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("embedding_bag", [True, False], ids=["embedding_bag", "grid_sample"])
@pytest.mark.parametrize("H, W", [(56, 56), (28, 30)])
def test_deform_conv2d_resampled_offset_gradient_at_zero_offsets_is_torchvisions(monkeypatch, H, W, embedding_bag):
    """A fresh DTM samples whole pixels (offsets 0); fp32 gradients there must take torchvision's side.

    At an integer position the offset gradient is a one-sided difference. Unpadded, ``grid_sample``'s
    normalised coordinate comes back one float step below some integers and takes the other side.
    """
    monkeypatch.setattr(Flags, "dtm_embedding_bag", embedding_bag)
    _forbid_the_other_sampler(monkeypatch, embedding_bag)
    torch.manual_seed(0)
    x = torch.randn(2, 8, H, W)
    offset = torch.zeros(2, 8, H // 2, W // 2)
    weight, bias = torch.randn(5, 8, 2, 2), torch.randn(5)
    grad_out = torch.randn(2, 5, H // 2, W // 2)
    ref, ref_grads = _torchvision_deform_conv2d_and_grads(x, offset, weight, bias, 2, 0, grad_out)
    leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
    out = dtm.deform_conv2d_resampled(*leaves, 2, 0)
    out.backward(grad_out)
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=0)
    for got, want in zip([t.grad for t in leaves], ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_cpu_dtm_samples_channels_last_rows_without_grid_sample(monkeypatch):
    """Eager CPU DTM: the samples come from ``embedding_bag`` over the channels-last map's pixel rows and come
    out channels-last for the strided conv (``grid_sample`` wrote NCHW, and the conv then copied the whole
    sampled map into channels-last first)."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 10, 8).permute(0, 3, 1, 2)  # NCHW view of a channels-last (B, H, W, C) map
    offset = 1.5 * torch.randn(2, 8, 6, 5)
    weight, bias = torch.randn(5, 8, 2, 2), torch.randn(5)
    ref, ref_grads = _torchvision_deform_conv2d_and_grads(x, offset, weight, bias, 2, 0, torch.ones(2, 5, 6, 5))

    def not_called(*args, **kwargs):
        raise AssertionError("grid_sample on the eager CPU path")

    with pytest.raises(ValueError, match="sampler must be 'embedding_bag', 'grid_sample' or None, got 'bicubic'"):
        dtm.resample_and_conv(x, offset, weight, bias, 2, 0, sampler="bicubic")
    grid_sampled = dtm.resample_and_conv(x, offset, weight, bias, 2, 0, sampler="grid_sample")
    monkeypatch.setattr(F, "grid_sample", not_called)
    torch.testing.assert_close(dtm.resample_and_conv(x, offset, weight, bias, 2, 0, sampler="embedding_bag"),
                               grid_sampled, atol=1e-5, rtol=0)
    sampled = dtm._bilinear_patches(x, offset, 2, 2, 2, 0)
    assert sampled.shape == (2, 8, 12, 10) and sampled.is_contiguous(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
    out = dtm.resample_and_conv(*leaves, 2, 0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=0)
    out.sum().backward()
    for got, want in zip([t.grad for t in leaves], ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_deform_conv2d_resampled_takes_torchvision_when_switched_off(monkeypatch):
    from torchvision.ops import deform_conv2d

    calls = []
    monkeypatch.setattr(dtm, "deform_conv2d", lambda *a, **k: calls.append(1) or deform_conv2d(*a, **k))
    x, offset, weight = torch.randn(1, 4, 6, 6), torch.randn(1, 8, 3, 3), torch.randn(3, 4, 2, 2)
    try:
        cpu_fast_paths(False)
        dtm.deform_conv2d_resampled(x, offset, weight, None, 2, 0)
    finally:
        cpu_fast_paths(True)
    dtm.deform_conv2d_resampled(x, offset, weight, None, 2, 0)
    assert calls == [1]


def test_cpu_inference_runs_stage_blocks_in_chunks_with_unchanged_outputs(monkeypatch, tiny):
    """Blocks are per-sample, so CPU inference runs the batch in chunks that keep the FFN map small."""
    model = accelerate(tiny().eval())
    x = torch.randn(7, 3, 64, 64)
    batches = []
    model.layers[0].blocks[0].register_forward_hook(lambda m, inp, out: batches.append(inp[0].shape[0]))
    with torch.inference_mode():
        whole = model(x)
        # stage 1 of TINY at 64x64: 16x16 map, widest = 64 FFN channels -> 64 KiB per sample
        monkeypatch.setattr(Flags, "chunk_bytes", 3 * 16 * 16 * 64 * 4)
        chunked = model(x)
    assert batches == [7, 3, 2, 2]  # whole batch at the default budget; then ceil(7 / 3) = 3 even chunks
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    # training (autograd) never chunks
    batches.clear()
    model(x).sum().backward()
    assert batches == [7]


@pytest.mark.parametrize("optimizer", ["sgd", "fused_adamw"])
def test_cached_onednn_weights_follow_optimizer_and_ema_updates(tiny, optimizer):
    """CPU inference caches oneDNN-blocked weights; every in-place update must be seen (no stale cache), also
    the fused AdamW the trainer uses, which updates weights without bumping their version."""
    from timm.utils import ModelEmaV3

    model = accelerate(tiny())
    ema = ModelEmaV3(model, decay=0.5)
    opt = (torch.optim.SGD(model.parameters(), lr=0.5) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=0.05, fused=True))
    x = torch.randn(2, 3, 64, 64)

    def fast_and_plain(m):
        m.eval()
        try:
            with torch.inference_mode():
                fast = m(x)
                cpu_fast_paths(False)
                plain = m(x)
        finally:
            cpu_fast_paths(True)
        return fast, plain

    for _ in range(2):  # inference (fills the cache), optimizer step + EMA update, inference again
        for m in (model, ema.module):
            fast, plain = fast_and_plain(m)
            torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
        assert model.layers[0].blocks[0].mlp.fc1 in onednn._packed_weights
        model.train()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        ema.update(model)
    model.load_state_dict(tiny(drop_path_rate=0.1).state_dict())  # copies in place: the cache is refreshed
    fast, plain = fast_and_plain(model)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_cached_onednn_weights_follow_computed_and_swapped_weights(tiny):
    """A weight computed on every call (a parametrization, e.g. weight norm or a LoRA delta) or swapped in
    with ``param.data = ...`` lives in a new storage, which the allocator may put at a freed one's address
    with the same version: the cache must not take it for the weight it packed before."""
    from torch.nn.utils import parametrize

    class Scaled(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, w):
            return w * self.scale

    model = accelerate(tiny().eval())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
    cached = list(onednn._packed_weights.keys())
    packed = [m for m in model.modules() if m in cached]
    assert {type(m).__name__ for m in packed} >= {"FastLinear", "Conv2d", "FastDeformConv2d"}
    scale = torch.nn.Parameter(torch.ones(()))
    for m in packed:
        parametrize.register_parametrization(m, "weight", Scaled(scale))

    def fast_and_plain():
        with torch.no_grad():  # not inference_mode: its computed weights are inference tensors, never cached
            fast = model(x)
            cpu_fast_paths(False)
            try:
                plain = model(x)
            finally:
                cpu_fast_paths(True)
        return fast, plain

    for step in range(6):
        with torch.no_grad():
            scale.fill_(1.0 + 0.5 * step)
        fast, plain = fast_and_plain()
        torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-5, msg=f"parametrized, step {step}")

    lin = accelerate(torch.nn.Linear(32, 32))
    y = torch.randn(2, 4, 4, 32)
    for step in range(20):  # two swaps between calls: the second storage may reuse the first's address
        lin.weight.data = torch.randn(32, 32)
        lin.weight.data = torch.randn(32, 32)
        with torch.no_grad():
            fast = lin(y)
        torch.testing.assert_close(fast, F.linear(y, lin.weight, lin.bias), atol=1e-5, rtol=0,
                                   msg=f"swapped, step {step}")

