"""LITv2 / HiLo against the paper (Table 1, supplementary Table I/IV) and the released checkpoints."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import litv2
from litv2.models import HiLo, LITv2, checkpoint_filter_fn, load_checkpoint
from litv2.models.litv2 import ConvFFN
from litv2.profiling import count_flops, count_flops_module, count_params

FIXTURES = Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "state_dict_manifest.json").read_text())
TINY = dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_classes=10)


# ---- Table 1 / supplementary Table I -------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("litv2_s", 27_844_000), ("litv2_m", 48_830_368), ("litv2_b", 86_520_704)])
def test_param_counts_exact(name, params):
    model = timm.create_model(name)
    assert count_params(model) == params == MANIFEST[name]["num_params"]


@pytest.mark.parametrize("name", ["litv2_s", "litv2_m", "litv2_b"])
def test_flops_match_analytic_counts(name):
    model = timm.create_model(name)
    flops = count_flops(model, 224)
    analytic = MANIFEST[name]["flops_224_analytic"]
    assert abs(flops - analytic) / analytic < 0.005, (flops, analytic)
    # the paper's rounded figures
    assert round(flops / 1e9, 1) == {"litv2_s": 3.7, "litv2_m": 7.5, "litv2_b": 13.2}[name]


@pytest.mark.parametrize("window_size,params,flops", [(2, 2_198_528, 298_296_320), (1, 2_362_368, 521_428_992)])
def test_single_layer_table_iv(window_size, params, flops):
    """Supplementary Table IV: HiLo 2.20 M / 298.3 M, MSA (s = 1) 2.36 M / 521.4 M on 14x14, 768-d, 12 heads."""
    layer = HiLo(768, 12, window_size=window_size, alpha=0.9, qkv_bias=True)
    assert count_params(layer) == params
    assert count_flops_module(layer, (torch.randn(1, 14, 14, 768),)) == flops
    assert round(params / 1e6, 2) == (2.20 if window_size == 2 else 2.36)
    assert round(flops / 1e6, 1) == (298.3 if window_size == 2 else 521.4)


def test_registered_variants_follow_table_i():
    s, m, b = (timm.create_model(n) for n in ("litv2_s", "litv2_m", "litv2_b"))
    assert (s.embed_dim, s.depths, s.num_heads_per_stage) == (96, [2, 2, 6, 2], [3, 6, 12, 24])
    assert (m.embed_dim, m.depths, m.num_heads_per_stage) == (96, [2, 2, 18, 2], [3, 6, 12, 24])
    assert (b.embed_dim, b.depths, b.num_heads_per_stage) == (128, [2, 2, 18, 2], [4, 8, 16, 32])
    for model, dpr in ((s, 0.2), (m, 0.3), (b, 0.5)):
        assert model.local_ws == [0, 0, 2, 1] and model.alpha == [0.9] * 4
        assert model.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(dpr)
        assert not hasattr(model.layers[0].blocks[0], "attn")  # stages 1-2: ConvFFN blocks only
        attn3 = model.layers[2].blocks[0].attn
        assert (attn3.ws, attn3.l_heads, attn3.h_heads) == (2, math.floor(0.9 * attn3.num_heads),
                                                           attn3.num_heads - math.floor(0.9 * attn3.num_heads))
        attn4 = model.layers[3].blocks[0].attn
        assert (attn4.ws, attn4.h_heads) == (1, 0)  # stage 4: standard MSA
    tuned = timm.create_model("litv2_s", num_classes=7, drop_path_rate=0.05, alpha=0.5, local_ws=[0, 0, 4, 1])
    assert tuned.head.out_features == 7 and tuned.layers[2].blocks[0].attn.ws == 4
    assert tuned.layers[2].blocks[0].attn.l_heads == 6


# ---- released checkpoints --------------------------------------------------------------------------

def test_tiny_release_checkpoint_reproduces_logits():
    kwargs = json.loads((FIXTURES / "tiny_a05_ws2.json").read_text())["constructor_kwargs"]
    model = LITv2(**kwargs).eval()
    missing, unexpected = load_checkpoint(model, FIXTURES / "tiny_a05_ws2.pth")
    assert missing == [] and unexpected == []
    io = torch.load(FIXTURES / "tiny_a05_ws2_io.pt", weights_only=True)
    with torch.no_grad():
        logits = model(io["input"])
    torch.testing.assert_close(logits, io["logits"], atol=1e-4, rtol=0)
    # every path matters: the loaded deformable offsets are non-zero
    assert model.layers[0].downsample.dconv.conv_offset.weight.abs().sum() > 0


@pytest.mark.parametrize("name", ["litv2_s", "litv2_m", "litv2_b"])
def test_release_state_dict_converts_key_for_key(name):
    manifest = MANIFEST[name]["state_dict"]
    release = {"model": {("module." + k if i % 2 else k): torch.zeros(shape) for i, (k, shape) in
                         enumerate(manifest.items())}}
    model = timm.create_model(name, drop_path_rate=0.0)
    converted = checkpoint_filter_fn(release, model)
    assert {k: list(v.shape) for k, v in converted.items()} == manifest
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_checkpoint_with_other_classifier_loads_for_finetuning(tmp_path):
    src = LITv2(**TINY, img_size=64)
    torch.save({"model": src.state_dict()}, tmp_path / "release.pth")
    dst = LITv2(**{**TINY, "num_classes": 3})
    missing, _ = load_checkpoint(dst, tmp_path / "release.pth")
    assert set(missing) == {"head.weight", "head.bias"}
    torch.testing.assert_close(dst.layers[2].blocks[0].attn.l_q.weight, src.layers[2].blocks[0].attn.l_q.weight)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": LITv2(**TINY).state_dict()}, good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        load_checkpoint(LITv2(**TINY), bad)


# ---- HiLo against naive references ---------------------------------------------------------------

def zero_padded(x: torch.Tensor, s: int) -> torch.Tensor:
    """Copy of a (B, H, W, C) map into zeros whose sides are the next multiples of s."""
    B, H, W, C = x.shape
    xp = torch.zeros(B, math.ceil(H / s) * s, math.ceil(W / s) * s, C, dtype=x.dtype)
    xp[:, :H, :W] = x
    return xp


def naive_hifi(layer: HiLo, x: torch.Tensor) -> torch.Tensor:
    """Explicit loop over s x s windows and heads; zero-padded inputs, cropped output."""
    B, H, W, C = x.shape
    s, nh, hd = layer.ws, layer.h_heads, layer.head_dim
    xp = zero_padded(x, s)
    Hp, Wp = xp.shape[1:3]
    qkv = xp @ layer.h_qkv.weight.T + layer.h_qkv.bias
    out = torch.zeros(B, Hp, Wp, nh * hd, dtype=x.dtype)
    for i in range(0, Hp, s):
        for j in range(0, Wp, s):
            win = qkv[:, i:i + s, j:j + s].reshape(B, s * s, 3, nh, hd)
            for h in range(nh):
                q, k, v = win[:, :, 0, h], win[:, :, 1, h], win[:, :, 2, h]
                attn = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5, dim=-1)
                out[:, i:i + s, j:j + s, h * hd:(h + 1) * hd] = (attn @ v).reshape(B, s, s, hd)
    return out[:, :H, :W] @ layer.h_proj.weight.T + layer.h_proj.bias


def naive_lofi(layer: HiLo, x: torch.Tensor) -> torch.Tensor:
    """Every query attends to explicitly averaged s x s windows of the zero-padded map."""
    B, H, W, C = x.shape
    s, nh, hd = layer.ws, layer.l_heads, layer.head_dim
    xp = zero_padded(x, s)
    Hp, Wp = xp.shape[1:3]
    pooled = torch.stack([xp[:, i:i + s, j:j + s].sum(dim=(1, 2)) / (s * s)
                          for i in range(0, Hp, s) for j in range(0, Wp, s)], dim=1)  # (B, M, C)
    q = x.reshape(B, H * W, C) @ layer.l_q.weight.T + layer.l_q.bias
    kv = pooled @ layer.l_kv.weight.T + layer.l_kv.bias
    k, v = kv[..., :nh * hd], kv[..., nh * hd:]
    heads = []
    for h in range(nh):
        sl = slice(h * hd, (h + 1) * hd)
        attn = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) * hd ** -0.5, dim=-1)
        heads.append(attn @ v[..., sl])
    out = torch.cat(heads, dim=-1) @ layer.l_proj.weight.T + layer.l_proj.bias
    return out.reshape(B, H, W, nh * hd)


@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (5, 9), (6, 9)])
@pytest.mark.parametrize("s", [2, 3])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_hilo_matches_naive_reference(hw, s, alpha):
    torch.manual_seed(0)
    layer = HiLo(40, 10, window_size=s, alpha=alpha).double().eval()
    for p in layer.parameters():  # non-zero biases so zero-padded tokens are not trivially inert
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, *hw, 40, dtype=torch.float64)
    parts = []
    if layer.h_heads:
        ref_h = naive_hifi(layer, x)
        torch.testing.assert_close(layer.hifi(x), ref_h)
        parts.append(ref_h)
    if layer.l_heads:
        ref_l = naive_lofi(layer, x)
        torch.testing.assert_close(layer.lofi(x), ref_l)
        parts.append(ref_l)
    assert (layer.l_heads, layer.h_heads) == (math.floor(10 * alpha), 10 - math.floor(10 * alpha))
    torch.testing.assert_close(layer(x), torch.cat(parts, dim=-1))  # output = [Hi-Fi, Lo-Fi]


def test_window_size_one_is_standard_msa():
    torch.manual_seed(0)
    layer = HiLo(32, 4, window_size=1, alpha=0.3).double().eval()
    assert (layer.l_heads, layer.h_heads) == (4, 0)
    x = torch.randn(2, 5, 6, 32, dtype=torch.float64)
    q = layer.l_q(x).reshape(2, 30, 4, 8).transpose(1, 2)
    k, v = layer.l_kv(x).reshape(2, 30, 2, 4, 8).permute(2, 0, 3, 1, 4)
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    ref = layer.l_proj(ref.transpose(1, 2).reshape(2, 5, 6, 32))
    torch.testing.assert_close(layer(x), ref)


# ---- behaviour of the whole network --------------------------------------------------------------

def test_any_input_size_and_not_tied_to_img_size():
    torch.manual_seed(0)
    model = LITv2(**TINY, img_size=64).eval()
    with torch.no_grad():
        for hw in [(64, 64), (96, 160), (72, 40), (100, 100)]:
            assert model(torch.randn(1, 3, *hw)).shape == (1, 10)


def test_outputs_independent_of_batch_composition():
    torch.manual_seed(0)
    model = LITv2(**TINY).eval()
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        batched = model(x)
        alone = model(x[3:4])
    torch.testing.assert_close(alone, batched[3:4], atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter_including_offsets():
    torch.manual_seed(0)
    model = LITv2(**TINY, drop_path_rate=0.1).train()
    loss = F.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.layers[0].downsample.dconv.conv_offset.weight.grad.abs().sum() > 0


def test_grad_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    model = LITv2(**TINY).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def _gelu_outputs_alive_after_forward(model, x, monkeypatch):
    """Run a training forward; return whether each tensor a ConvFFN chose to recompute (GELU output,
    depthwise-conv output) is still alive before backward, and the output."""
    import weakref

    import litv2.models.litv2 as litv2_module

    targets = []

    class Recording(litv2_module.recompute_when_saved):
        def __init__(self, target, remake):
            targets.append(weakref.ref(target))
            super().__init__(target, remake)

    monkeypatch.setattr(litv2_module, "recompute_when_saved", Recording)
    out = model(x)
    return [t() is not None for t in targets], out


@pytest.mark.parametrize("fast_paths, amp", [(True, False), (False, False), (True, True), (False, True)])
def test_convffn_recomputes_gelu_instead_of_keeping_it(fast_paths, amp, monkeypatch):
    """With recompute_gelu (the default) no GELU output outlives the forward pass; outputs and gradients
    are bitwise those of the plain model; activation checkpointing, no_grad and the flag turn it off."""
    from litv2.models.layers import cpu_fast_paths

    previous = cpu_fast_paths()
    cpu_fast_paths(fast_paths)
    try:
        torch.manual_seed(0)
        plain = LITv2(**TINY, recompute_gelu=False).train()
        model = LITv2(**TINY).train()
        model.load_state_dict(plain.state_dict())
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
def test_convffn_recomputes_the_dwconv_output_too(recompute_gelu, fast_paths, amp, monkeypatch):
    """recompute_dwconv: no depthwise-conv output (GELU's input) outlives the forward pass either; the
    backward pass makes it again under the forward's autocast state (not the caller's at backward time),
    once per block when the GELU output is recomputed too; outputs and gradients are bitwise those of the
    plain model."""
    import litv2.models.litv2 as litv2_module
    from litv2.models.layers import cpu_fast_paths

    reruns = []
    run = litv2_module._DWConvRecompute._run
    monkeypatch.setattr(litv2_module._DWConvRecompute, "_run", lambda self: reruns.append(run(self)) or reruns[-1])
    previous = cpu_fast_paths()
    cpu_fast_paths(fast_paths)
    try:
        torch.manual_seed(0)
        plain = LITv2(**TINY, recompute_gelu=False).train()
        model = LITv2(**TINY, recompute_gelu=recompute_gelu, recompute_dwconv=True).train()
        model.load_state_dict(plain.state_dict())
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
    import litv2.models.litv2 as litv2_module

    reruns = []
    run = litv2_module._DWConvRecompute._run
    monkeypatch.setattr(litv2_module._DWConvRecompute, "_run", lambda self: reruns.append(run(self)) or reruns[-1])
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 8, requires_grad=True)
    models = [ConvFFN(8, 32, recompute_gelu=flag, recompute_dwconv=flag).train() for flag in (True, False)]
    models[1].load_state_dict(models[0].state_dict())
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
    model = ConvFFN(8, 32, recompute_dwconv=True).to("meta").train()
    assert model(torch.randn(2, 5, 7, 8, device="meta", requires_grad=True)).shape == (2, 5, 7, 8)


def test_dwconv_recompute_stands_aside_for_conv_hooks_and_parametrizations():
    """A hooked or parametrized depthwise conv keeps its output: spectral norm's power iteration runs once per
    forward (gradients equal the plain model's), and a forward hook sees one call per forward."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 8, requires_grad=True)
    plain, model = ConvFFN(8, 32).train(), ConvFFN(8, 32, recompute_dwconv=True).train()
    for m in (plain, model):
        spectral_norm(m.dwconv.dwconv)
    model.load_state_dict(plain.state_dict())
    grads = [torch.autograd.grad(m(x).square().sum(), [x, *m.parameters()]) for m in (plain, model)]
    for u, v in zip(*grads):
        assert torch.equal(u, v)

    plain, model = ConvFFN(8, 32).train(), ConvFFN(8, 32, recompute_dwconv=True).train()
    model.load_state_dict(plain.state_dict())
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

    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 8)
    models = [ConvFFN(8, 32, recompute_gelu=flag, recompute_dwconv=flag).train() for flag in (True, False)]
    models[1].load_state_dict(models[0].state_dict())
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
    from litv2.models.layers import recompute_when_saved

    y = torch.randn(4, 6, requires_grad=True)
    g = F.gelu(y)
    w = torch.randn(3, 6)
    w = two_tensor.TwoTensor(w, w.clone()).requires_grad_()
    with recompute_when_saved(g, lambda: F.gelu(y)):
        out = F.linear(g, w)
    out.sum().backward()
    assert y.grad is not None and w.grad is not None


def test_recompute_when_saved_refuses_a_different_layout():
    from litv2.models.layers import recompute_when_saved

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


def test_features_only_gives_four_scales():
    model = timm.create_model("litv2_s", features_only=True, embed_dim=16, num_heads=[1, 2, 4, 8]).eval()
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 128, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 32, 24), (1, 32, 16, 12), (1, 64, 8, 6), (1, 128, 4, 3)]


def test_forward_features_and_head_split():
    model = LITv2(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 2, 2, 128)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, 128)
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)
    assert model.no_weight_decay() == set()


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=1.5), "alpha=1.5"),
    (dict(alpha=-0.1), "alpha=-0.1"),
    (dict(local_ws=[0, 0, -1, 1]), "local_ws\\[2\\]=-1"),
    (dict(num_heads=[1, 2, 5, 8]), "num_heads\\[2\\]=5"),
    (dict(depths=[]), "depths=\\[\\]"),
])
def test_bad_values_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LITv2(**{**TINY, **kwargs})


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=1.5), "alpha=1.5"), (dict(window_size=0), "window_size=0"), (dict(num_heads=6), "num_heads=6")])
def test_hilo_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HiLo(**{"dim": 40, "num_heads": 4, "window_size": 2, "alpha": 0.5, **kwargs})


def test_torch_compile_matches_eager():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    torch.manual_seed(0)
    model = LITv2(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = model(x)
        try:
            compiled = torch.compile(model)(x)
        except Exception as e:  # no working C++ toolchain for inductor on this machine
            pytest.skip(f"torch.compile unavailable here: {type(e).__name__}")
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_torch_compile_on_cpu_traces_the_fast_formulation(train):
    """Under torch.compile on CPU, linears stay 1x1 convs and DTM stays resample + conv (no batch chunks).

    Inductor then sends them to oneDNN itself. With the plain path it got ``F.linear`` (MKL, half speed on
    this project's AMD CPU) and torchvision's scalar ``deform_conv2d``: LITv2-S compiled ran 2.2x slower
    than eager.
    """
    import torch.nn.functional as F
    from torchvision.ops import deform_conv2d

    targets = []

    def capture(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LITv2(**TINY).train(train)
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
def test_torch_compile_without_the_cpu_fast_paths_still_traces_the_resampled_dtm(autocast):
    """Compiled on a device without the CPU fast paths (a GPU; here CPU with them switched off), the DTM is
    resample + conv, not torchvision's opaque op: inductor fuses the sampling (compiled LITv2-S bf16 batch 64
    on an H100: 6569 -> 8606 img/s). Under autocast the sampling stays fp32 and the strided conv follows
    autocast; eager keeps torchvision's op in fp32."""
    import torch.nn.functional as F
    from torchvision.ops import deform_conv2d

    from litv2.models.layers import cpu_fast_paths

    calls, strided = [], []  # (target, traced output) of every call; outputs of the convs of sampled maps

    def capture(gm, example_inputs):
        for n in gm.graph.nodes:
            if n.op == "call_function":
                calls.append((n.target, n.meta.get("example_value")))
                if n.target is F.conv2d and getattr(n.args[0], "target", None) is F.grid_sample:
                    strided.append(n.meta.get("example_value"))
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LITv2(**TINY).eval()
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


def test_torch_export_gives_the_plain_model_not_the_cpu_formulation():
    """torch.export / ONNX export on CPU: linear layers and torchvision's deformable conv, as on any device."""
    torch.manual_seed(0)
    model = LITv2(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("torchvision.deform_conv2d.default") == 3 and "aten.grid_sampler.default" not in targets
    assert targets.count("aten.linear.default") > 10
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=0)


def test_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = LITv2(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "litv2.onnx"
    torch.onnx.export(model, (x,), str(path), opset_version=19, dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=0)


def test_activations_stay_channels_last_from_patch_embedding_to_the_head():
    """Every conv writes channels-last, so the (B, H, W, C) maps between layers need no layout copy."""
    torch.manual_seed(0)
    model = LITv2(**TINY).eval()
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
def test_cpu_fast_paths_kernels_compute_the_same_as_plain_ops(offsets, dtype, tol):
    """oneDNN kernels (linear as 1x1 conv, fused dwconv+GELU) and the resampled DTM are a speed change
    only: outputs and grads, with DTM offsets at zero (a fresh model) or well off the pixel grid. (Off
    the grid, fp32 gradients through BatchNorm at batch 2 differ by rounding beyond 1e-4; fp64 shows
    the two paths compute the same function.)"""
    from litv2.models.layers import cpu_fast_paths

    torch.manual_seed(0)
    model = LITv2(**TINY).train().to(dtype)
    if offsets == "trained":
        for module in model.modules():
            if hasattr(module, "conv_offset"):
                torch.nn.init.normal_(module.conv_offset.weight, std=0.3)  # offsets of 1.5-3 pixels
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    results = []
    try:
        for enabled in (True, False):
            cpu_fast_paths(enabled)
            model.zero_grad()
            out = model(x)
            out.sum().backward()
            results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    finally:
        cpu_fast_paths(True)
    (out_fast, g_fast), (out_plain, g_plain) = results
    torch.testing.assert_close(out_fast, out_plain, atol=tol, rtol=0)
    for name, grad in g_plain.items():
        if name.endswith("dconv.bias"):  # feeds train-mode BatchNorm: its gradient is 0 up to rounding
            assert grad.abs().max() < 1e3 * tol
            continue
        torch.testing.assert_close(g_fast[name], grad, atol=tol, rtol=tol, msg=name)


def test_cpu_autocast_bf16_forward_backward():
    """Mixed precision on CPU (trainer.precision=bf16): DTM's deformable conv runs in fp32 inside."""
    torch.manual_seed(0)
    model = LITv2(**TINY).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert model.layers[0].downsample.dconv.conv_offset.weight.grad is not None
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x).float()
    with torch.no_grad():
        ref = model(x)
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def test_cpu_fast_paths_inference_matches_plain_ops_on_release_weights():
    """Inference path (fused dwconv+GELU, no autograd) against plain F.linear / conv / F.gelu."""
    from litv2.models.layers import cpu_fast_paths

    kwargs = json.loads((FIXTURES / "tiny_a05_ws2.json").read_text())["constructor_kwargs"]
    model = LITv2(**kwargs).eval()
    load_checkpoint(model, FIXTURES / "tiny_a05_ws2.pth")
    x = torch.randn(3, 3, 80, 48)
    try:
        with torch.inference_mode():
            fast = model(x)
            cpu_fast_paths(False)
            plain = model(x)
    finally:
        cpu_fast_paths(True)
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)


def _torchvision_deform_conv2d_and_grads(x, offset, weight, bias, stride, padding, grad_out):
    from torchvision.ops import deform_conv2d
    leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
    out = deform_conv2d(*leaves, stride=stride, padding=padding)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def _forbid_the_other_sampler(monkeypatch, embedding_bag: bool) -> None:
    """Make the sampler that ``_Flags.dtm_embedding_bag`` does not pick raise, so a test sees which one ran."""
    from litv2.models import layers

    def not_called(*args, **kwargs):
        raise AssertionError(f"the {'grid_sample' if embedding_bag else 'embedding_bag'} sampler ran")

    if embedding_bag:
        monkeypatch.setattr(F, "grid_sample", not_called)
    else:
        monkeypatch.setattr(layers, "_bilinear_patches", not_called)


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
    from litv2.models import layers

    monkeypatch.setattr(layers._Flags, "dtm_embedding_bag", embedding_bag)
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

    monkeypatch.setattr(layers, "deform_conv2d", not_called)
    with torch.no_grad():
        torch.testing.assert_close(layers.deform_conv2d_resampled(x, offset, weight, bias, stride, padding), ref,
                                   atol=1e-10, rtol=0)
    leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
    layers.deform_conv2d_resampled(*leaves, stride, padding).backward(grad_out)
    for got, want in zip([t.grad for t in leaves], ref_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("embedding_bag", [True, False], ids=["embedding_bag", "grid_sample"])
@pytest.mark.parametrize("H, W", [(56, 56), (28, 30)])
def test_deform_conv2d_resampled_offset_gradient_at_zero_offsets_is_torchvisions(monkeypatch, H, W, embedding_bag):
    """A fresh DTM samples whole pixels (offsets 0); fp32 gradients there must take torchvision's side.

    At an integer position the offset gradient is a one-sided difference. Unpadded, ``grid_sample``'s
    normalised coordinate comes back one float step below some integers and takes the other side.
    """
    from litv2.models import layers

    monkeypatch.setattr(layers._Flags, "dtm_embedding_bag", embedding_bag)
    _forbid_the_other_sampler(monkeypatch, embedding_bag)
    torch.manual_seed(0)
    x = torch.randn(2, 8, H, W)
    offset = torch.zeros(2, 8, H // 2, W // 2)
    weight, bias = torch.randn(5, 8, 2, 2), torch.randn(5)
    grad_out = torch.randn(2, 5, H // 2, W // 2)
    ref, ref_grads = _torchvision_deform_conv2d_and_grads(x, offset, weight, bias, 2, 0, grad_out)
    leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
    out = layers.deform_conv2d_resampled(*leaves, 2, 0)
    out.backward(grad_out)
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=0)
    for got, want in zip([t.grad for t in leaves], ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_cpu_dtm_samples_channels_last_rows_without_grid_sample(monkeypatch):
    """Eager CPU DTM: the samples come from ``embedding_bag`` over the channels-last map's pixel rows and come
    out channels-last for the strided conv (``grid_sample`` wrote NCHW, and the conv then copied the whole
    sampled map into channels-last first)."""
    import torch.nn.functional as F

    from litv2.models import layers

    torch.manual_seed(0)
    x = torch.randn(2, 12, 10, 8).permute(0, 3, 1, 2)  # NCHW view of a channels-last (B, H, W, C) map
    offset = 1.5 * torch.randn(2, 8, 6, 5)
    weight, bias = torch.randn(5, 8, 2, 2), torch.randn(5)
    ref, ref_grads = _torchvision_deform_conv2d_and_grads(x, offset, weight, bias, 2, 0, torch.ones(2, 5, 6, 5))

    def not_called(*args, **kwargs):
        raise AssertionError("grid_sample on the eager CPU path")

    with pytest.raises(ValueError, match="sampler must be 'embedding_bag', 'grid_sample' or None, got 'bicubic'"):
        layers.resample_and_conv(x, offset, weight, bias, 2, 0, sampler="bicubic")
    grid_sampled = layers.resample_and_conv(x, offset, weight, bias, 2, 0, sampler="grid_sample")
    monkeypatch.setattr(F, "grid_sample", not_called)
    torch.testing.assert_close(layers.resample_and_conv(x, offset, weight, bias, 2, 0, sampler="embedding_bag"),
                               grid_sampled, atol=1e-5, rtol=0)
    sampled = layers._bilinear_patches(x, offset, 2, 2, 2, 0)
    assert sampled.shape == (2, 8, 12, 10) and sampled.is_contiguous(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
    out = layers.resample_and_conv(*leaves, 2, 0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=0)
    out.sum().backward()
    for got, want in zip([t.grad for t in leaves], ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_deform_conv2d_resampled_takes_torchvision_when_switched_off(monkeypatch):
    from torchvision.ops import deform_conv2d

    from litv2.models import layers
    from litv2.models.layers import cpu_fast_paths

    calls = []
    monkeypatch.setattr(layers, "deform_conv2d", lambda *a, **k: calls.append(1) or deform_conv2d(*a, **k))
    x, offset, weight = torch.randn(1, 4, 6, 6), torch.randn(1, 8, 3, 3), torch.randn(3, 4, 2, 2)
    try:
        cpu_fast_paths(False)
        layers.deform_conv2d_resampled(x, offset, weight, None, 2, 0)
    finally:
        cpu_fast_paths(True)
    layers.deform_conv2d_resampled(x, offset, weight, None, 2, 0)
    assert calls == [1]


def test_cpu_inference_runs_stage_blocks_in_chunks_with_unchanged_outputs(monkeypatch):
    """Blocks are per-sample, so CPU inference runs the batch in chunks that keep the FFN map small."""
    from litv2.models import layers

    torch.manual_seed(0)
    model = LITv2(**TINY).eval()
    x = torch.randn(7, 3, 64, 64)
    batches = []
    model.layers[0].blocks[0].register_forward_hook(lambda m, inp, out: batches.append(inp[0].shape[0]))
    with torch.inference_mode():
        whole = model(x)
        # stage 1 of TINY at 64x64: 16x16 map, widest = 64 FFN channels -> 64 KiB per sample
        monkeypatch.setattr(layers._Flags, "chunk_bytes", 3 * 16 * 16 * 64 * 4)
        chunked = model(x)
    assert batches == [7, 3, 2, 2]  # whole batch at the default budget; then ceil(7 / 3) = 3 even chunks
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    # training (autograd) never chunks
    batches.clear()
    model(x).sum().backward()
    assert batches == [7]


def test_cached_onednn_weights_follow_optimizer_and_ema_updates():
    """CPU inference caches oneDNN-blocked weights; every in-place update must be seen (no stale cache)."""
    from timm.utils import ModelEmaV3

    from litv2.models import layers

    torch.manual_seed(0)
    model = LITv2(**TINY)
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(2, 3, 64, 64)

    def fast_and_plain(m):
        m.eval()
        try:
            with torch.inference_mode():
                fast = m(x)
                layers.cpu_fast_paths(False)
                plain = m(x)
        finally:
            layers.cpu_fast_paths(True)
        return fast, plain

    for _ in range(2):  # inference (fills the cache), optimizer step + EMA update, inference again
        for m in (model, ema.module):
            fast, plain = fast_and_plain(m)
            torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
        assert model.layers[0].blocks[0].mlp.fc1 in layers._packed_weights
        model.train()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        ema.update(model)
    model.load_state_dict(LITv2(**TINY).state_dict())  # load_state_dict copies in place: cache refreshed
    fast, plain = fast_and_plain(model)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_cached_onednn_weights_follow_computed_and_swapped_weights():
    """A weight computed on every call (a parametrization, e.g. weight norm or a LoRA delta) or swapped in
    with ``param.data = ...`` lives in a new storage, which the allocator may put at a freed one's address
    with the same version: the cache must not take it for the weight it packed before."""
    from torch.nn.utils import parametrize

    from litv2.models import layers

    class Scaled(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, w):
            return w * self.scale

    torch.manual_seed(0)
    model = LITv2(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
    cached = list(layers._packed_weights.keys())
    packed = [m for m in model.modules() if m in cached]
    assert {type(m).__name__ for m in packed} >= {"Linear", "Conv2d", "DeformConv2d"}
    scale = torch.nn.Parameter(torch.ones(()))
    for m in packed:
        parametrize.register_parametrization(m, "weight", Scaled(scale))

    def fast_and_plain():
        with torch.no_grad():  # not inference_mode: its computed weights are inference tensors, never cached
            fast = model(x)
            layers.cpu_fast_paths(False)
            try:
                plain = model(x)
            finally:
                layers.cpu_fast_paths(True)
        return fast, plain

    for step in range(6):
        with torch.no_grad():
            scale.fill_(1.0 + 0.5 * step)
        fast, plain = fast_and_plain()
        torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-5, msg=f"parametrized, step {step}")

    lin = layers.Linear(32, 32)
    y = torch.randn(2, 4, 4, 32)
    for step in range(20):  # two swaps between calls: the second storage may reuse the first's address
        lin.weight.data = torch.randn(32, 32)
        lin.weight.data = torch.randn(32, 32)
        with torch.no_grad():
            fast = lin(y)
        torch.testing.assert_close(fast, F.linear(y, lin.weight, lin.bias), atol=1e-5, rtol=0,
                                   msg=f"swapped, step {step}")


def test_prune_intermediate_layers_keeps_requested_maps():
    torch.manual_seed(0)
    model = LITv2(**TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert model.prune_intermediate_layers([0, 2]) == [0, 2]
        assert len(model.layers) == 3 and model.layers[-1].downsample is None
        pruned = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    for a, b in zip(full, pruned):
        torch.testing.assert_close(a, b)
    assert count_params(model) < count_params(LITv2(**TINY))


def test_builds_on_the_meta_device():
    """Deferred initialisation (FSDP, big-model loading): the model builds under ``torch.device("meta")``."""
    with torch.device("meta"):
        model = timm.create_model("litv2_s", num_classes=10)
    assert all(p.is_meta for p in model.parameters())
    assert count_params(model) == count_params(timm.create_model("litv2_s", num_classes=10))
