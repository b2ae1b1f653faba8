"""GPU correctness: the CUDA paths compute what the CPU paths compute. Skipped where CUDA is absent (CI).

On a GPU machine: ``python -m pytest -q tests/test_gpu.py``. ``LITV2_TEST_DEVICE=cpu`` runs the same
tests on CPU (except the CUDA-kernel one), which checks the tests themselves on a machine without a GPU.
"""
import os

import pytest
import torch

from litv2.accel import accelerate
from litv2.models import LITv2

from engine_utils import TINY

DEVICE = torch.device(os.environ.get("LITV2_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def no_tf32():
    """Full fp32 convolutions and matmuls on the GPU (cuDNN allows TF32 by default)."""
    if DEVICE.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("sampler", ["grid_sample", "embedding_bag"])
@pytest.mark.parametrize("offset_scale", [0.0, 2.5])
def test_resampled_deformable_conv_is_torchvisions_on_the_device(offset_scale, sampler):
    """The A/B of scripts/benchmark_dtm.py compares equal functions: outputs and all four gradients, fp64."""
    from torchvision.ops import deform_conv2d

    from litv2.accel.dtm import resample_and_conv

    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device=DEVICE)
    x = torch.randn(2, 6, 12, 16, **kw)
    offset = offset_scale * torch.randn(2, 8, 6, 8, **kw)
    weight, bias = torch.randn(7, 6, 2, 2, **kw), torch.randn(7, **kw)
    grad_out = torch.randn(2, 7, 6, 8, **kw)
    results = []
    for fn in (lambda *t: deform_conv2d(*t, stride=2, padding=0),
               lambda *t: resample_and_conv(*t, 2, 0, sampler=sampler)):
        leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
        out = fn(*leaves)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("accel", [False, True], ids=["plain", "accel"])
def test_litv2_on_the_device_matches_cpu(accel):
    """Same weights, fp32: the device's kernels (cuDNN, torchvision's CUDA deform conv, SDPA) vs the CPU's."""
    torch.manual_seed(0)
    model = LITv2(**TINY).eval()
    if accel:
        accelerate(model)
    for m in model.modules():  # DTM offsets off the pixel grid, so the deformable sampling is exercised
        if hasattr(m, "conv_offset"):
            torch.nn.init.normal_(m.conv_offset.weight, std=0.5)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        got = model.to(DEVICE)(x.to(DEVICE)).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("accel", [False, True], ids=["plain", "accel"])
def test_bf16_autocast_forward_is_close_to_fp32_and_backward_reaches_every_parameter(accel):
    torch.manual_seed(0)
    model = LITv2(**TINY).to(DEVICE)
    if accel:
        accelerate(model)
    x = torch.randn(4, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        fp32 = model.eval()(x)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            bf16 = model(x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = model.train()(x)  # (after the eval passes: train mode updates the DTM BatchNorm statistics)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max() <= 0.05 * fp32.abs().max()
    out.float().logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA attention kernels")
def test_hilo_runs_on_fused_sdpa_kernels_under_bf16():
    """Both HiLo branches and stage-4 MSA qualify for flash / memory-efficient attention (no math fallback)."""
    import timm
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import litv2  # noqa: F401

    torch.manual_seed(0)
    model = accelerate(timm.create_model("litv2_s", num_classes=10)).to(DEVICE)
    x = torch.randn(2, 3, 224, 224, device=DEVICE)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
    assert torch.isfinite(out.float()).all()


def test_torch_compile_on_the_device_matches_eager():
    """The accelerated model compiled (resampled DTM traced) against the plain model eager."""
    torch.manual_seed(0)
    plain = LITv2(**TINY).to(DEVICE).eval()
    model = accelerate(LITv2(**TINY).to(DEVICE).eval())
    model.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = plain(x)
        compiled = torch.compile(model, dynamic=False)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_efficiency_report_on_the_device():
    from litv2.profiling import efficiency_report

    report = efficiency_report(accelerate(LITv2(**TINY)), img_size=64, device=DEVICE, batch_size=8, runs=2, warmup=1)
    assert report["throughput"] > 0 and report["train_mem_mb"] > report["test_mem_mb"] > 0
    assert report["device"] == (torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu")


@pytest.mark.parametrize("option", ["recompute_gelu", "recompute_dwconv"])
def test_ffn_recompute_on_the_device_saves_hidden_maps_with_the_same_gradients(option):
    """bf16 autocast on the device's kernels: gradients bitwise those of the model without the option
    (recompute_gelu against the model that keeps its GELU outputs; recompute_dwconv against the default,
    which keeps its depthwise-conv outputs), and (CUDA) peak train memory lower by most of one bf16 hidden
    map per block."""
    from litv2.profiling import measure_memory

    torch.manual_seed(0)
    cfg = dict(TINY, embed_dim=32)
    plain = accelerate(LITv2(**cfg).to(DEVICE).train(), recompute_gelu=option != "recompute_gelu")
    model = accelerate(LITv2(**cfg).to(DEVICE).train(), recompute_dwconv=option == "recompute_dwconv")
    model.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 128, 128, device=DEVICE)
    for m in (model, plain):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            m(x).float().logsumexp(1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    if DEVICE.type == "cuda":
        model.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        saved = measure_memory(plain, 8, 128, DEVICE, train=True, amp_dtype=torch.bfloat16) \
            - measure_memory(model, 8, 128, DEVICE, train=True, amp_dtype=torch.bfloat16)
        side, width, hidden_maps = 128 // 4, 32, 0
        for depth in cfg["depths"]:  # one (8, side, side, 4 * width) bf16 map per block
            hidden_maps += depth * 8 * side * side * 4 * width * 2
            side, width = side // 2, width * 2
        # where the peak falls (end of forward, or a cuDNN workspace in backward) decides how much shows
        assert saved >= 0.5 * hidden_maps, (saved, hidden_maps)
