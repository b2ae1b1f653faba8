"""HiLo on the Triton kernels (``litv2::hilo_attention``, ``litv2::add_layer_norm_pool``), without a GPU: run by
Triton's interpreter on CPU tensors against the plain HiLo and the plain-torch references. The sm_90 compile of
their launches is checked with the others' in test_triton.py.

The interpreter multiplies bf16 ``tl.dot`` operands as integers: bf16 is checked on the paths without a dot (Hi-Fi
and the pooling LayerNorm) only.
"""
import copy

import pytest
import torch

from engine_utils import KERNEL_DEVICE

pytest.importorskip("triton")
from litv2.accel import accelerate, restore, stats  # noqa: E402
from litv2.accel.triton import hilo, reference  # noqa: E402
from litv2.accel.triton import modules as triton_modules  # noqa: E402
from litv2.models.hilo import HiLo  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("kernel_device")]
# on CUDA tensors where there is a GPU, else on CPU tensors, which need Triton's interpreter
interpreted = pytest.mark.skipif(KERNEL_DEVICE == "cpu" and not hilo.INTERPRETED,
                                 reason="no GPU, and CPU tensors need Triton's interpreter")
ON_GPU = pytest.mark.skipif(KERNEL_DEVICE == "cpu", reason="bf16 tl.dot: on a GPU only")
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
HILO_STATS = ("triton_hilo_attention", "triton_hilo_attention_backward")


def _step(model, x, grad):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


@interpreted
@pytest.mark.parametrize("H, W, s, alpha, dim, qkv_bias", [
    (5, 7, 1, 0.5, 64, True),  # MSA: one key block
    (9, 8, 1, 0.5, 64, True),  # MSA: 72 keys, two query blocks and several key blocks
    (5, 7, 2, 0.0, 64, True), (5, 7, 2, 0.5, 64, True), (5, 7, 2, 1.0, 64, True),  # padded on both sides
    (7, 5, 3, 0.0, 64, True), (5, 7, 3, 0.5, 64, True), (5, 7, 3, 1.0, 64, True),
    (4, 6, 2, 0.5, 64, True),  # no padding
    (5, 7, 3, 0.5, 64, False),  # padding without bias: zero keys and values
    (5, 7, 2, 0.5, 48, True),  # head_dim 12: masked head channels
])
def test_triton_hilo_equals_the_plain_hilo(H, W, s, alpha, dim, qkv_bias):
    """TritonHiLo (one GEMM, litv2::hilo_attention) against HiLo in fp32: output, input gradient and every parameter
    gradient within 1e-4, on non-square maps that need padding for the windows and the pool."""
    torch.manual_seed(0)
    plain = HiLo(dim, 4, window_size=s, alpha=alpha, qkv_bias=qkv_bias).train()
    model = accelerate(copy.deepcopy(plain), kernels="triton")
    assert type(model) is triton_modules.TritonHiLo
    x = torch.randn(2, H, W, dim)
    grad = torch.randn(2, H, W, dim)
    stats.clear()
    out, dx, grads = _step(model, x, grad)
    assert all(stats[k] == 1 for k in HILO_STATS), dict(stats)
    want, want_dx, want_grads = _step(plain, x, grad)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dx, want_dx, atol=1e-4, rtol=1e-4)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], atol=1e-4, rtol=1e-4, msg=name)
    assert type(restore(model)) is HiLo and model.state_dict().keys() == plain.state_dict().keys()


@interpreted
@pytest.mark.parametrize("dtype, H, W, s, hifi, lofi", [
    *[(torch.float16, *case) for case in ((5, 7, 2, 2, 2), (7, 5, 3, 1, 2), (3, 5, 1, 0, 3), (5, 7, 2, 2, 0))],
    (torch.bfloat16, 5, 7, 2, 2, 0), (torch.bfloat16, 7, 5, 3, 1, 0),  # Hi-Fi only: no dot
    *[pytest.param(torch.bfloat16, *case, marks=ON_GPU) for case in ((5, 7, 2, 2, 2), (3, 5, 1, 0, 3))],  # Lo-Fi's dot
])
def test_hilo_attention_in_low_precision_matches_the_reference(dtype, H, W, s, hifi, lofi):
    """The op on fp16 (every path) and bf16 (Hi-Fi only under the interpreter) q/k/v against the fp32 reference on
    the same values: output and the gradients of p, kv and the padding's bias (an fp32 parameter, as under
    autocast)."""
    torch.manual_seed(0)
    d, Dh, Dl = 16, hifi * 16, lofi * 16
    p = torch.randn(2, H, W, 3 * Dh + Dl).to(dtype)
    kv = torch.randn(2, -(-H // s), -(-W // s), 2 * Dl).to(dtype) if lofi else None
    bias = torch.randn(3 * Dh) if hifi else None
    inputs = [t for t in (p, kv, bias) if t is not None]
    dout = torch.randn(2, H, W, Dh + Dl).to(dtype)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        it = iter(leaves)
        args = [next(it) if t is not None else None for t in (p, kv, bias)]
        out = fn(*args, hifi, lofi, d, s, d ** -0.5)
        out = out[0] if isinstance(out, tuple) else out
        return out.detach(), torch.autograd.grad(out, leaves, dout)

    stats.clear()
    got, got_grads = run(hilo.hilo_attention)
    assert all(stats[k] == 1 for k in HILO_STATS), dict(stats)
    want, want_grads = run(reference.hilo_attention)
    atol, rtol = TOL[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=atol * max(1.0, float(w.abs().max())), rtol=rtol)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, s, uses", [((2, 5, 7, 24), 2, "yzp"), ((2, 5, 7, 40), 3, "zp"),
                                            ((1, 4, 6, 24), 2, "p"), ((2, 3, 5, 24), 2, "yz")])
def test_add_layer_norm_pool_matches_the_reference(shape, s, uses, dtype):
    """y = x + r, z = LayerNorm(y) and z's s x s average pool (padding counted), and the gradients of x, r, weight
    and bias with the outputs in ``uses`` (y, z, p: the pool) given gradients."""
    torch.manual_seed(0)
    C = shape[-1]
    x, r = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    weight, bias = (1 + 0.5 * torch.randn(C)).to(dtype), torch.randn(C).to(dtype)
    B, H, W, _ = shape
    douts = [torch.randn(shape).to(dtype), torch.randn(shape).to(dtype),
             torch.randn(B, -(-H // s), -(-W // s), C).to(dtype)]
    douts = [g if k in uses else None for g, k in zip(douts, "yzp")]

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, r, weight, bias)]
        outs = fn(*leaves, 1e-5, dtype, s)[:3]
        used = [(o, g) for o, g in zip(outs, douts) if g is not None]
        grads = torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used], allow_unused=True)
        return [o.detach() for o in outs], grads

    stats.clear()
    got, got_grads = run(hilo.add_layer_norm_pool)
    assert stats["triton_add_layer_norm_pool"] == 1
    assert stats["triton_add_layer_norm_pool_backward"] == ("p" in uses)
    assert stats["triton_add_layer_norm_backward"] == ("p" not in uses and "z" in uses)
    want, want_grads = run(reference.add_layer_norm_pool)
    atol, rtol = TOL[dtype]
    for name, g, w in zip(("y", "z", "pooled", "dx", "dr", "dweight", "dbias"), got + list(got_grads),
                          want + list(want_grads)):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, name
        scale = 1.0 if name in ("y", "z", "pooled", "dx", "dr") else float(w.abs().max())
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, msg=name)


@interpreted
def test_the_ops_pass_opcheck():
    """Schema, fake tensors (what torch.compile traces), autograd registration and AOT dispatch of the two ops."""
    torch.manual_seed(0)
    p, kv, bias = torch.randn(2, 5, 7, 3 * 16 + 32), torch.randn(2, 3, 4, 64), torch.randn(48)
    torch.library.opcheck(torch.ops.litv2.hilo_attention.default, (p.requires_grad_(), kv.requires_grad_(),
                                                                  bias.requires_grad_(), 1, 2, 16, 2, 0.25))
    x, r, weight, b = (torch.randn(2, 5, 7, 24, requires_grad=True), torch.randn(2, 5, 7, 24, requires_grad=True),
                       torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True))
    torch.library.opcheck(torch.ops.litv2.add_layer_norm_pool.default, (x, r, weight, b, 1e-5, torch.float32, 3))


@interpreted
def test_hooks_and_attention_dropout_take_the_plain_paths(tiny):
    """A forward pre-hook on a HiLo: no pooled map from the LayerNorm (the hook could change its input), the
    attention op still runs; a hook on ``l_kv``, or attention dropout in training: HiLo's own path."""
    plain = tiny().eval()
    model = accelerate(copy.deepcopy(plain), kernels="triton")
    x = torch.randn(1, 3, 48, 80)
    second = model.layers[2].blocks[1].attn
    handle = second.register_forward_pre_hook(lambda m, args: None)
    stats.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-4, rtol=0)
    assert stats["triton_hilo_attention"] == 3 and not stats["triton_add_layer_norm_pool"], dict(stats)
    handle.remove()
    z = torch.randn(2, 3, 5, second.dim)
    with second.l_kv.register_forward_hook(lambda m, args, out: None):
        stats.clear()
        second(z)
    assert not stats["triton_hilo_attention"]
    attn = accelerate(HiLo(64, 4, window_size=2, alpha=0.5, attn_drop=0.1), kernels="triton")
    stats.clear()
    attn.train()(z)
    assert not stats["triton_hilo_attention"]
    attn.eval()(z)
    assert stats["triton_hilo_attention"] == 1
