"""The DTM on Triton kernels (litv2.accel.triton.dtm): the bilinear gather of the 2x2/2 deformable conv's taps and
its backward, run by Triton's interpreter on CPU tensors, against the plain-torch reference and the plain modules
(torchvision's ``deform_conv2d``): odd maps whose last row or column the conv drops, offsets that sample outside
the map, exactly on its border and on integer positions.
"""
import copy

import pytest
import torch

from engine_utils import KERNEL_DEVICE, compiled_matches_eager
from litv2.models.litv2 import DeformableTokenMerging, DeformConv2d

pytest.importorskip("triton")
from litv2.accel import accelerate, restore, stats  # noqa: E402
from litv2.accel.triton import ops  # noqa: E402
from litv2.accel.triton import dtm  # noqa: E402
from litv2.accel.triton import modules as triton_modules  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("kernel_device")]
# on CUDA tensors where there is a GPU, else on CPU tensors, which need Triton's interpreter
interpreted = pytest.mark.skipif(KERNEL_DEVICE == "cpu" and not ops.INTERPRETED,
                                 reason="no GPU, and CPU tensors need Triton's interpreter")
# (atol, rtol) of a value rounded to the dtype (bf16: the interpreter truncates where a GPU rounds to nearest)
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
DTM_STATS = ("triton_dtm_gather", "triton_dtm_gather_backward")


def _offsets(B, Ho, Wo, H, W):
    """Random offsets up to 2.5 pixels (many taps sample partly or wholly off the map); output (0, 0)'s taps on
    integers, at rows -1, 0, H, -1 and columns 0, 2, -1, W (one pixel off the map: zero, with a one-sided slope),
    and the last output's taps on integers."""
    off = (torch.rand(B, Ho, Wo, 8) * 5 - 2.5)
    off[0, 0, 0] = torch.tensor([-1.0, 0.0, 0.0, 1.0, float(H - 1), -1.0, -2.0, float(W - 1)])
    off[-1, -1, -1] = off[-1, -1, -1].round()
    return off


def _close(got, want, dtype, name, summed=False):
    atol, rtol = TOL[dtype]
    scale = float(want.abs().max()) if summed else 1.0  # sums over many products: relative to their size
    torch.testing.assert_close(got, want, atol=atol * max(scale, 1.0), rtol=rtol, msg=name)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 7, 12), (1, 4, 9, 72)])
def test_dtm_gather_matches_the_reference(shape, dtype):
    """The gathered taps (fp32, read from a map in ``dtype``) and the gradients of the map and the offsets, on a
    5x7 map (the conv drops its last row and column) with 12 channels and a 4x9 one with 72 (two channel blocks,
    one partial); one program per launch under the interpreter."""
    torch.manual_seed(0)
    B, H, W, C = shape
    x = torch.randn(shape).to(dtype)
    off = _offsets(B, H // 2, W // 2, H, W)
    dcols = torch.randn(B, H // 2, W // 2, 4 * C)
    leaves = [x.clone().requires_grad_(), off.clone().requires_grad_()]
    refs = [x.clone().requires_grad_(), off.clone().requires_grad_()]
    stats.clear()
    got = dtm.dtm_gather(*leaves, torch.float32)
    want = dtm.reference_gather(*refs)
    got.backward(dcols)
    want.backward(dcols)
    assert stats["triton_dtm_gather"] == 1 and stats["triton_dtm_gather_backward"] == 1
    assert got.dtype == torch.float32 and got.shape == (B, H // 2, W // 2, 4 * C)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the samples of the same values in fp32
    assert leaves[0].grad.dtype == dtype and leaves[1].grad.dtype == torch.float32
    _close(leaves[0].grad, refs[0].grad, dtype, "dx")
    _close(leaves[1].grad, refs[1].grad, torch.float32, "doffset", summed=True)
    assert (got[0, 0, 0, :C] == 0).all()  # tap (0, 0) of output (0, 0) at row -1: off the map


def _deform(C=12, C_out=16, offsets="random", dtype=torch.float32):
    torch.manual_seed(0)
    conv = DeformConv2d(C, C_out)
    with torch.no_grad():
        conv.bias.normal_()
        if offsets == "random":  # offsets of a few pixels: taps off the map
            conv.conv_offset.weight.normal_(0, 0.6)
            conv.conv_offset.bias.normal_(0, 1.0)
        else:  # every tap on integer positions, some on the border, some off the map
            conv.conv_offset.bias.copy_(torch.tensor([-1.0, 0.0, 0.0, 1.0, 2.0, -1.0, -3.0, 4.0]))
    return conv.to(dtype)


def _step(module, x, grad):
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


@interpreted
@pytest.mark.parametrize("offsets", ["random", "integer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_deform_conv_equals_the_plain_one(offsets, dtype):
    """TritonDeformConv2d (gather + GEMM) against DeformConv2d (torchvision's op, fp32 inside) on a 5x7 map: the
    output and the gradients of the input, the offset conv's weight and bias, the weight and the bias; fp16 layers
    round the same fp32 results."""
    plain = _deform(offsets=offsets, dtype=dtype)
    model = accelerate(copy.deepcopy(plain), kernels="triton")
    assert type(model) is triton_modules.TritonDeformConv2d
    x = torch.randn(2, 12, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 16, 2, 3).to(dtype)
    stats.clear()
    got, got_dx, got_grads = _step(model, x, grad)
    assert all(stats[k] == 1 for k in DTM_STATS), dict(stats)
    want, want_dx, want_grads = _step(plain, x, grad)
    assert got.dtype == want.dtype == dtype
    _close(got, want, dtype, "out")
    _close(got_dx, want_dx, dtype, "dx")
    for name, w in want_grads.items():
        assert got_grads[name].dtype == w.dtype, name
        _close(got_grads[name], w, dtype, name, summed=True)


def _dtm(C=12, C_out=16):
    torch.manual_seed(1)
    m = DeformableTokenMerging(C, C_out)
    m.dconv = _deform(C, C_out)
    with torch.no_grad():
        m.norm_layer.weight.uniform_(0.5, 1.5)
        m.norm_layer.bias.normal_()
        m.norm_layer.running_mean.normal_()
        m.norm_layer.running_var.uniform_(0.5, 2.0)
    return m


@interpreted
def test_triton_dtm_training_step_equals_the_plain_one_and_moves_the_same_running_statistics():
    """Train mode: the BatchNorm stays a BatchNorm on batch statistics; output, every gradient and the running
    mean, variance and batch count equal the plain DTM's."""
    plain = _dtm().train()
    model = accelerate(copy.deepcopy(plain), kernels="triton")
    assert type(model) is triton_modules.TritonDTM
    x, grad = torch.randn(2, 5, 7, 12), torch.randn(2, 2, 3, 16)
    stats.clear()
    got, got_dx, got_grads = _step(model, x, grad)
    assert all(stats[k] == 1 for k in DTM_STATS) and not stats["triton_dtm_bn_fold"], dict(stats)
    want, want_dx, want_grads = _step(plain, x, grad)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_dx, want_dx, atol=1e-4, rtol=1e-4)
    for name, w in want_grads.items():
        _close(got_grads[name], w, torch.float32, name, summed=True)
    for (name, b), w in zip(model.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b, w, atol=1e-5, rtol=1e-5, msg=name)
    assert int(model.norm_layer.num_batches_tracked) == 1


@interpreted
def test_triton_dtm_eval_folds_the_batchnorm_into_the_gemm():
    """Eval mode: the BatchNorm folded into the GEMM's weight and bias (GELU after), equal to the plain DTM on its
    running statistics; the parameters and buffers untouched."""
    plain = _dtm().eval()
    model = accelerate(copy.deepcopy(plain), kernels="triton")
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 5, 7, 12)
    stats.clear()
    with torch.no_grad():
        got, want = model(x), plain(x)
    assert stats["triton_dtm_bn_fold"] == 1 and stats["triton_dtm_gather"] == 1, dict(stats)
    assert got.shape == want.shape == (2, 2, 3, 16)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@interpreted
def test_triton_dtm_under_bf16_autocast_runs_the_deformable_conv_in_fp32_as_the_plain_one():
    """CPU bf16 autocast: the offset conv follows autocast (as the plain layer's), the sampling and the GEMM stay
    fp32: the same fp32 output as the plain DTM."""
    plain = _dtm().train()
    model = accelerate(copy.deepcopy(plain), kernels="triton")
    x = torch.randn(2, 5, 7, 12)
    stats.clear()
    with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
        got, want = model(x), plain(x)
    assert stats["triton_dtm_gather"] == 1
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@interpreted
def test_deterministic_algorithms_take_the_plain_path_for_gradients():
    """The gather's backward adds with atomics: under ``torch.use_deterministic_algorithms`` a forward that needs
    gradients takes the plain deformable conv, inference still the gather."""
    model = accelerate(_dtm().train(), kernels="triton")
    x = torch.randn(2, 5, 7, 12)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        stats.clear()
        model(x).sum().backward()
        assert not stats["triton_dtm_gather"] and not stats["triton_dtm_gather_backward"], dict(stats)
        with torch.no_grad():
            model(x)
        assert stats["triton_dtm_gather"] == 1
    finally:
        torch.use_deterministic_algorithms(was)


@interpreted
def test_torch_compile_traces_the_dtm_ops_without_graph_breaks():
    """fullgraph=True with aot_eager: the DTM's forward and backward call litv2::dtm_gather and its backward, the
    results equal eager's."""
    model = accelerate(_dtm().train(), kernels="triton")
    taken = compiled_matches_eager(model, torch.randn(2, 5, 7, 12), loss=lambda out: out.square().sum())
    assert all(taken.get(k) == 1 for k in DTM_STATS), taken


@interpreted
def test_tiny_litv2_dtms_on_triton_equal_the_plain_model(tiny):
    """A training step of the tiny LITv2 with non-zero offsets (three DTMs: 12x20 -> 6x10 -> 3x5 -> 1x2, the last
    dropping a row and a column) with kernels="triton": logits and every gradient within 1e-4 of the plain model's,
    the gather taken; eval (BatchNorm folded) too; restore() gives back the plain classes and state-dict keys."""
    plain = tiny().train()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "conv_offset" in name:
                p.normal_(0, 0.05)
    model = accelerate(copy.deepcopy(plain), kernels="triton")
    assert sum(type(m) is triton_modules.TritonDTM for m in model.modules()) == 3
    x = torch.randn(2, 3, 48, 80)
    stats.clear()
    out = model(x)
    out.sum().backward()
    assert stats["triton_dtm_gather"] == 3 and stats["triton_dtm_gather_backward"] == 3, dict(stats)
    ref = plain(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)

    model.load_state_dict(plain.state_dict())  # (the train-mode BatchNorm statistics moved by rounding)
    stats.clear()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x), atol=1e-4, rtol=0)
    assert stats["triton_dtm_bn_fold"] == 3
    restore(model)
    assert {type(m) for m in model.modules()} == {type(m) for m in plain.modules()}
    assert list(model.state_dict()) == list(plain.state_dict())
