"""LITv2 / HiLo as written (the plain model) against the paper (Table 1, supplementary Table I/IV), the released
checkpoints and timm's model API. The acceleration layer has its own tests (test_accel.py)."""
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import litv2  # noqa: F401  (registers the models)
from litv2.models import HiLo, LITv2, checkpoint_filter_fn, load_checkpoint
from litv2.profiling import count_flops, count_flops_module, count_params

from engine_utils import FIXTURES, TINY

MANIFEST = json.loads((FIXTURES / "state_dict_manifest.json").read_text())


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
        assert model.layers[0].blocks[0].attn is None  # stages 1-2: ConvFFN blocks only
        attn3 = model.layers[2].blocks[0].attn
        assert (attn3.ws, attn3.l_heads, attn3.h_heads) == (2, math.floor(0.9 * attn3.num_heads),
                                                           attn3.num_heads - math.floor(0.9 * attn3.num_heads))
        attn4 = model.layers[3].blocks[0].attn
        assert (attn4.ws, attn4.h_heads) == (1, 0)  # stage 4: standard MSA
    tuned = timm.create_model("litv2_s", num_classes=7, drop_path_rate=0.05, alpha=0.5, local_ws=[0, 0, 4, 1])
    assert tuned.head.out_features == 7 and tuned.layers[2].blocks[0].attn.ws == 4
    assert tuned.layers[2].blocks[0].attn.l_heads == 6


# ---- released checkpoints --------------------------------------------------------------------------

def test_tiny_release_checkpoint_reproduces_logits(release_tiny):
    kwargs, path, io = release_tiny
    model = LITv2(**kwargs).eval()
    missing, unexpected = load_checkpoint(model, path)
    assert missing == [] and unexpected == []
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


@pytest.mark.inductor
def test_torch_compile_matches_eager():
    """inductor's CPU kernels for LITv2 give eager's logits."""
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


# ---- timm's model API ------------------------------------------------------------------------------

def test_convffn_is_fc1_dwconv_gelu_fc2():
    from litv2.models.litv2 import ConvFFN

    torch.manual_seed(0)
    ffn = ConvFFN(8, 32).eval()
    x = torch.randn(2, 5, 7, 8)
    h = F.linear(x, ffn.fc1.weight, ffn.fc1.bias).permute(0, 3, 1, 2)
    h = F.gelu(F.conv2d(h, ffn.dwconv.dwconv.weight, ffn.dwconv.dwconv.bias, padding=1, groups=32))
    ref = F.linear(h.permute(0, 2, 3, 1), ffn.fc2.weight, ffn.fc2.bias)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), ref)


def test_factory_kwargs_output_format_and_input_channels():
    """timm's create_model passes device= and dtype=; the model declares its NHWC features and in_chans."""
    model = timm.create_model("litv2_s", device="meta", dtype=torch.float64, in_chans=1)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.is_meta for t in tensors)
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
    assert model.output_fmt == "NHWC" and model.in_chans == 1
    out = model.forward_features(torch.randn(1, 1, 224, 224, device="meta", dtype=torch.float64))
    assert out.shape == (1, 7, 7, 768) and out.dtype == torch.float64


def test_feature_hooks_see_each_stage_before_its_token_merging():
    """feature_info names the module whose output is each stage's map (the DTM after it downsamples)."""
    model = timm.create_model("litv2_s", features_only=True, feature_cls="hook", **dict(TINY, num_classes=0))
    assert model.feature_info.channels() == [16, 32, 64, 128]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 24, 16), (1, 8, 12, 32), (1, 4, 6, 64), (1, 2, 3, 128)]


def test_reset_classifier_checks_the_pooling_and_keeps_device_dtype_and_mode(tiny):
    model = tiny().double().eval()
    with pytest.raises(ValueError, match="global_pool must be 'avg' or '', got 'max'"):
        model.reset_classifier(5, "max")
    model.reset_classifier(5)
    assert model.global_pool == "avg" and model.head.weight.dtype == torch.float64 and not model.head.training
    model.reset_classifier(0, "")
    assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 2, 2, 128)


def test_intermediate_indices_out_of_range_are_refused(tiny):
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(AssertionError, match="out of range"):
        model.forward_intermediates(x, indices=[5])
    with pytest.raises(AssertionError, match="out of range"):
        model.forward_intermediates(x, indices=5)
    with torch.no_grad():
        last = model.forward_intermediates(x, indices=[-1], intermediates_only=True)
    assert [tuple(t.shape) for t in last] == [(1, 128, 2, 2)]
    with pytest.raises(AssertionError, match="out of range"):
        model.prune_intermediate_layers([4])


def test_fx_and_torchscript_give_the_eager_outputs(tiny):
    """FX (torchvision's feature extraction, plain symbolic_trace) and TorchScript take the model as written."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = tiny().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), eager)
        torch.testing.assert_close(torch.jit.script(model)(x), eager)
        maps = create_feature_extractor(model, {"layers.1.blocks": "s2", "norm": "out"})(x)
    assert maps["s2"].shape == (2, 8, 12, 32) and maps["out"].shape == (2, 2, 3, 128)


def test_the_model_files_hold_no_private_torch_api_and_no_device_branch():
    """What is computed (litv2/models) stays apart from how it is computed fast (litv2/accel)."""
    import re
    from pathlib import Path

    forbidden = re.compile(r"torch\._C|torch\.ops\.mkldnn|_forward_hooks|saved_tensors_hooks|ctypes|device\.type *(==|!=|in )"
                           r"|is_compiling|is_tracing|is_exporting|is_autocast_enabled|import .*accel|from .*accel")
    for path in Path(litv2.models.__file__).parent.glob("*.py"):
        hits = [line for line in path.read_text().splitlines() if forbidden.search(line)]
        assert not hits, f"{path.name}: {hits}"
